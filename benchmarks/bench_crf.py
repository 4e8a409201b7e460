"""The dense CRF: pydensecrf (per image, one core) against the batched torch CRF on CPU and CUDA.

    .venv/bin/python benchmarks/bench_crf.py [--batches 64,128,256] [--devices cpu,cuda] [--preset coca]
    python benchmarks/bench_crf.py --check --device cuda --out DIR       # a GPU machine: fidelity, then speed
    .venv/bin/python benchmarks/bench_crf.py --check --device cpu --quick --out DIR

Benchmark mode prints img/s for 224x224 images, 10 mean-field iterations, both kernels, warm-up excluded:
pydensecrf one image at a time on one core, torch per batch size on each device (CPU with torch's threads), plus
where the time goes (bilateral lattice build vs mean field) and the memory per image; it writes
benchmarks/results/crf.json.

Check mode runs unattended in <= 90 s and never stops at a failure (each part records its error and the next
one runs): it compares the torch CRF on ``--device`` with pydensecrf (computed in parallel processes) on the
golden fixture, the synthetic sample, the real photos in tests/realphotos (labels: stage-2 masks of the tiny
golden model, and ground truth) and inputs full of ties -- Q after every iteration (max abs difference) and
pixel agreement of the labels -- then times batches. It writes DIR/crf_check.json and DIR/crf_check.txt.
Needs numpy, torch, opencv and pydensecrf; the model masks also need timm and scikit-image (for the sample).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT / "tests" / "realphotos"
GOLDEN = ROOT / "tests" / "golden"
CHECK_BUDGET_S = 90.0


# ----------------------------------------------------------------------------------------------- reference


def reference_q(args) -> np.ndarray:
    """pydensecrf's Q (iterations+1, 2, H, W) float32 for one image (runs in a worker process)."""
    from scosparc_core.crf import dense_crf_q

    return dense_crf_q(*args)


def _pool_ready(_=None) -> int:
    import pydensecrf.densecrf  # noqa: F401  (import once per worker, before the timed work)

    return os.getpid()


# ------------------------------------------------------------------------------------------------- inputs


def real_photos(limit: int | None = None) -> list[tuple]:
    """(name, CRF colour input (224, 224, 3), ground-truth labels (224, 224) uint8, the photo) per real photo;
    ``limit`` photos per class."""
    import cv2

    from scosparc_core.image import crf_image

    out = []
    for group in ("Sheep", "Horse"):
        for path in sorted((REAL / "image" / group).glob("*.jpg"))[:limit]:
            rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            mask = cv2.imread(str(REAL / "groundtruth" / group / f"{path.stem}.png"), cv2.IMREAD_GRAYSCALE)
            truth = (cv2.resize(mask, (224, 224), interpolation=cv2.INTER_NEAREST) > 127).astype(np.uint8)
            out.append((f"{group}/{path.stem}", crf_image(rgb), truth, rgb))
    return out


def sample_images(limit: int | None = None) -> list[tuple]:
    """Like ``real_photos`` for the synthetic sample (the embedded input of jobs/infer.py)."""
    import cv2

    from pipeline.sample import synthetic_group
    from scosparc_core.image import crf_image

    out = []
    for kind, n in (("horse", 4), ("disc", 3)):
        for i, (rgb, mask) in enumerate(synthetic_group(kind, n)[:limit]):
            truth = (cv2.resize(mask, (224, 224), interpolation=cv2.INTER_NEAREST) > 127).astype(np.uint8)
            out.append((f"sample-{kind}/{i}", crf_image(rgb), truth, rgb))
    return out


def ties_batch(height: int, width: int):
    """Flat colours and gradients (equal differences, .5 remainders) with all-0 / all-1 / one-pixel masks."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    flat = np.full((height, width, 3), (128, 64, 33), np.uint8)
    horizontal = np.repeat((xx * 255 / max(width - 1, 1)).astype(np.uint8)[:, :, None], 3, axis=2)
    diagonal = np.stack([(xx + yy) % 256, (2 * xx) % 256, (3 * yy) % 256], axis=2).astype(np.uint8)
    empty = np.zeros((height, width), np.uint8)
    single = empty.copy()
    single[height // 2, width // 3] = 1
    block = empty.copy()
    block[height // 4 : height // 2, width // 4 :] = 1
    rgb = np.stack([np.zeros_like(flat), flat, np.full_like(flat, 255), horizontal, diagonal, flat])
    labels = np.stack([single, empty, empty + 1, block, single, block])
    return rgb, labels


def model_stage2(images: list[np.ndarray], device: str):
    """Stage-2 masks of the tiny golden model for one group: (keep indices, (K, 224, 224) uint8)."""
    import torch

    from scosparc_core import DinoBackbone, SCoSPARC, Stage1Head

    torch.manual_seed(0)
    backbone = DinoBackbone.create("vit_base_patch8_224", checkpoint=GOLDEN / "tiny_dino_vit.pth",
                                   embed_dim=96, depth=2, num_heads=3)
    model = SCoSPARC(backbone, Stage1Head(backbone.embed_dim), device=device)
    pred = model.predict_group(images, crf="none")
    keep = [i for i, fallback in enumerate(pred.fallback) if not fallback]
    return keep, np.asarray(pred.stage2_mask)[keep].astype(np.uint8)


# ---------------------------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_torch(rgb: np.ndarray, labels: np.ndarray, params, batch: int, device: str, repeats: int) -> dict:
    """img/s of dense_crf_torch on one batch (tiled from the given images), warm-up excluded."""
    import torch

    from scosparc_core.crf import _bilateral_kernel, dense_crf_torch

    reps = -(-batch // len(rgb))
    rgb_t = torch.from_numpy(np.concatenate([rgb] * reps)[:batch]).to(device)
    labels_t = torch.from_numpy(np.concatenate([labels] * reps)[:batch]).to(device)
    dense_crf_torch(rgb_t, labels_t, params)  # warm-up: Gaussian lattice, allocator, kernels
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dense_crf_torch(rgb_t, labels_t, params)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / batch / 2**20 if device.startswith("cuda") else None
    t0 = time.perf_counter()
    kernel = _bilateral_kernel(rgb_t, float(params.bilateral_sxy), float(params.bilateral_srgb))
    _sync(device)
    build = time.perf_counter() - t0
    seconds = float(np.median(times))
    return {"device": device, "batch": batch, "seconds": seconds, "img_per_s": batch / seconds,
            "bilateral_build_s": build, "vertices_per_image": kernel.lattice.num_vertices / batch,
            "lattice_mb_per_image": kernel.lattice.nbytes() / batch / 2**20, "peak_mb_per_image": peak,
            "repeats": repeats}


def time_pydensecrf(rgb: np.ndarray, labels: np.ndarray, params, count: int) -> dict:
    from scosparc_core.crf import dense_crf

    dense_crf(rgb[0], labels[0], params)
    t0 = time.perf_counter()
    for i in range(count):
        dense_crf(rgb[i % len(rgb)], labels[i % len(rgb)], params)
    seconds = (time.perf_counter() - t0) / count
    return {"device": "pydensecrf (1 core)", "batch": 1, "seconds": seconds, "img_per_s": 1 / seconds}


def _row(r: dict) -> str:
    extra = ""
    if "bilateral_build_s" in r:
        peak = f"{r['peak_mb_per_image']:.1f}" if r.get("peak_mb_per_image") else "-"
        extra = (f" {r['bilateral_build_s'] * 1e3:>9.1f} {r['vertices_per_image'] / 1e3:>9.1f}k"
                 f" {r['lattice_mb_per_image']:>8.1f} {peak:>8}")
    return f"{r['device']:>20} {r['batch']:>6} {r['seconds'] * 1e3:>11.1f} {r['img_per_s']:>9.1f}{extra}"


HEADER = (f"{'backend':>20} {'batch':>6} {'ms/batch':>11} {'img/s':>9} {'build ms':>9} {'vertices':>10}"
          f" {'lat MB':>8} {'peak MB':>8}")


# --------------------------------------------------------------------------------------------- benchmark


def benchmark(args) -> None:
    import torch

    from scosparc_core.crf import crf_params

    params = crf_params(args.preset)
    photos = real_photos()
    rgb = np.stack([p[1] for p in photos])
    labels = np.stack([p[2] for p in photos])
    rows = [time_pydensecrf(rgb, labels, params, args.pydensecrf_images)]
    print(HEADER)
    print(_row(rows[0]), flush=True)
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    for device in devices:
        for batch in [int(b) for b in args.batches.split(",")]:
            rows.append(time_torch(rgb, labels, params, batch, device, args.repeats))
            print(_row(rows[-1]), flush=True)
    out = Path(args.json or ROOT / "benchmarks" / "results" / "crf.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "iterations": params.iterations, "size": [224, 224],
                               "rows": rows, "environment": environment()}, indent=1))
    print(f"wrote {out}")


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


# ------------------------------------------------------------------------------------------------- check


class Check:
    """Runs named parts, records each result or error, and skips what the time budget no longer allows."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.start, self.budget = out, time.perf_counter(), budget_s
        self.report: dict = {"parts": {}, "errors": {}}
        self.lines: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def part(self, name: str, fn, *args, need_s: float = 0.0):
        if self.elapsed() + need_s > self.budget:
            self.report["errors"][name] = f"skipped: {self.elapsed():.0f} s of {self.budget:.0f} s used"
            self.say(f"[{name}] skipped (time)")
            return None
        t0 = time.perf_counter()
        try:
            result = fn(*args)
            self.report["parts"][name] = {"seconds": round(time.perf_counter() - t0, 2)}
            return result
        except Exception as exc:  # a check must go on: record and continue
            self.report["errors"][name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self.report["parts"][name] = {"seconds": round(time.perf_counter() - t0, 2),
                                          "traceback": traceback.format_exc(limit=6)}
            self.say(f"[{name}] ERROR {self.report['errors'][name]}")
            return None

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self) -> None:
        self.report["total_seconds"] = round(self.elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "crf_check.json").write_text(json.dumps(self.report, indent=1, default=str))
        (self.out / "crf_check.txt").write_text("\n".join(self.lines) + "\n")


def check(args) -> int:
    check = Check(Path(args.out), args.budget)
    quick = args.quick
    device = args.device
    check.say(f"CRF check on {device} ({'quick' if quick else 'full'})")
    if device == "cpu":
        import torch

        torch.set_num_threads(1)  # the pydensecrf workers have the other cores
    workers = max(1, min(15, (os.cpu_count() or 2) - 1))
    # Worker processes start before CUDA is touched (spawn: nothing inherited) and import pydensecrf now.
    pool = check.part("start pydensecrf workers", lambda: ProcessPoolExecutor(
        workers, mp_context=__import__("multiprocessing").get_context("spawn")))
    pending = [pool.submit(_pool_ready) for _ in range(workers)] if pool else []

    env = check.part("environment", environment)
    if env:
        check.report["environment"] = env
        check.say("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))

    from scosparc_core.crf import CRF_PRESETS, CRFParams

    coca = CRF_PRESETS["coca"]
    cases: list[dict] = []  # each: name, params, rgb (B, H, W, 3), labels (B, H, W), names

    def golden_cases():
        g = np.load(GOLDEN / "golden_pipeline.npz")
        n = 1 if quick else 5
        for preset in ("coca", "cosal2015"):
            cases.append({"name": f"golden {preset}", "params": CRF_PRESETS[preset], "rgb": g["crf_rgb"][:n],
                          "labels": g["crf_input"][:n].astype(np.uint8), "names": list(g["names"][:n])})
        return len(cases)

    def photo_cases(source: str, loader, limit):
        items = loader(limit)
        rgb = np.stack([x[1] for x in items])
        cases.append({"name": f"{source} ground truth", "params": coca, "rgb": rgb,
                      "labels": np.stack([x[2] for x in items]), "names": [x[0] for x in items]})
        return items

    def model_cases(source: str, items, groups):
        for group in groups:
            idx = [i for i, x in enumerate(items) if x[0].startswith(group)]
            keep, masks = model_stage2([items[i][3] for i in idx], device)
            cases.append({"name": f"{source} {group} stage 2", "params": coca,
                          "rgb": np.stack([items[idx[k]][1] for k in keep]), "labels": masks,
                          "names": [items[idx[k]][0] for k in keep]})

    def tie_cases():
        for size in ((64, 48), (37, 29)):
            rgb, labels = ties_batch(*size)
            for params in (coca, CRFParams(gaussian_sxy=3, bilateral_sxy=5, bilateral_srgb=13)):
                cases.append({"name": f"ties {size[0]}x{size[1]} sxy={params.gaussian_sxy}", "params": params,
                              "rgb": rgb, "labels": labels, "names": [f"tie{i}" for i in range(len(rgb))]})

    check.part("inputs: golden", golden_cases)
    sample = check.part("inputs: sample", photo_cases, "sample", sample_images, 1 if quick else None)
    photos = check.part("inputs: real photos", photo_cases, "real", real_photos, 1 if quick else None)
    check.part("inputs: ties", tie_cases)
    if sample:
        check.part("inputs: sample stage 2 (tiny model)", model_cases, "sample", sample,
                   ["sample-horse", "sample-disc"])
    if photos:
        check.part("inputs: real photos stage 2 (tiny model)", model_cases, "real", photos, ["Sheep", "Horse"])
    check.say(f"{sum(len(c['rgb']) for c in cases)} images in {len(cases)} cases "
              f"({check.elapsed():.1f} s)")

    # pydensecrf's Q for every image, in the worker processes, while the torch side runs here.
    futures = {}
    if pool:
        for w in pending:
            w.result()
        for ci, case in enumerate(cases):
            for i in range(len(case["rgb"])):
                futures[ci, i] = pool.submit(reference_q, (case["rgb"][i], case["labels"][i], case["params"]))

    def torch_side(case):
        import torch

        from scosparc_core.crf import crf_mean_field, dense_crf_torch

        rgb = torch.from_numpy(np.ascontiguousarray(case["rgb"])).to(device)
        labels = torch.from_numpy(np.ascontiguousarray(case["labels"])).to(device)
        qs = [q.cpu().numpy() for q in crf_mean_field(rgb, labels, case["params"])]
        out = dense_crf_torch(rgb, labels, case["params"]).cpu().numpy()
        return np.stack(qs, axis=1), out  # (B, T, 2, H, W), (B, H, W)

    totals = {"pixels": 0, "agree": 0, "q_diff": 0.0, "images": 0, "differing": []}
    results = check.report["fidelity"] = {}
    for ci, case in enumerate(cases):
        got = check.part(f"torch {case['name']}", torch_side, case)
        if got is None:
            continue
        ours, labels = got
        diffs = np.zeros(ours.shape[1])
        ref_labels = np.zeros_like(labels)
        missing = 0
        for i in range(len(case["rgb"])):
            try:
                ref = futures[ci, i].result(timeout=max(1.0, check.budget - check.elapsed()))
            except Exception as exc:
                missing += 1
                check.report["errors"][f"reference {case['name']} {i}"] = repr(exc)
                continue
            diffs = np.maximum(diffs, np.abs(ours[i] - ref).max(axis=(1, 2, 3)))
            ref_labels[i] = np.argmax(ref[-1], axis=0)
            same = labels[i] == ref_labels[i]
            totals["pixels"] += same.size
            totals["agree"] += int(same.sum())
            totals["images"] += 1
            if not same.all():
                totals["differing"].append(f"{case['name']}: {case['names'][i]} ({int((~same).sum())} px)")
        agreement = float((labels == ref_labels).mean()) if not missing else None
        results[case["name"]] = {"images": len(case["rgb"]), "missing_reference": missing,
                                 "q_max_abs_diff_per_iteration": diffs.tolist(), "agreement": agreement}
        totals["q_diff"] = max(totals["q_diff"], float(diffs.max()))
        agree_text = f"{agreement:.6f}" if agreement is not None else "-"
        check.say(f"{case['name']:>40}: {len(case['rgb']):>3} images, max |dQ| {diffs.max():.2e}, "
                  f"pixel agreement {agree_text}")
    if totals["pixels"]:
        overall = totals["agree"] / totals["pixels"]
        check.report["overall"] = {"images": totals["images"], "pixels": totals["pixels"],
                                   "agreement": overall, "q_max_abs_diff": totals["q_diff"],
                                   "images_that_differ": totals["differing"],
                                   "target": "agreement >= 0.9999 and max |dQ| <= 1e-5",
                                   "met": bool(overall >= 0.9999 and totals["q_diff"] <= 1e-5)}
        check.say(f"OVERALL: {totals['images']} images, pixel agreement {overall:.6f}, max |dQ| "
                  f"{totals['q_diff']:.2e}, images that differ: {totals['differing'] or 'none'}")
    if pool:
        pool.shutdown(wait=False, cancel_futures=True)

    # Speed: real photos tiled to each batch size.
    speed = check.report["speed"] = []
    if photos or sample:
        items = photos or sample
        rgb = np.stack([x[1] for x in items])
        labels = np.stack([x[2] for x in items])
        py = check.part("speed pydensecrf", time_pydensecrf, rgb, labels, coca, 2 if quick else 6)
        if py:
            speed.append(py)
        check.say(HEADER)
        if py:
            check.say(_row(py))
        for batch in ((2, 4) if quick else (64, 128, 256)):
            row = check.part(f"speed torch batch {batch}", time_torch, rgb, labels, coca, batch, device,
                             1 if quick else 3, need_s=2.0)
            if row:
                speed.append(row)
                check.say(_row(row))
    check.say(f"done in {check.elapsed():.1f} s; errors: {list(check.report['errors']) or 'none'}")
    check.write()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fidelity against pydensecrf, then speed")
    parser.add_argument("--device", default="cuda", help="check mode: the torch device")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "crf_check"))
    parser.add_argument("--quick", action="store_true", help="check mode: a few images, tiny batches")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"check mode: seconds (default {CHECK_BUDGET_S:.0f}, with --quick 600)")
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--devices", default="cpu,cuda", help="benchmark mode (cuda only when present)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pydensecrf-images", type=int, default=10)
    parser.add_argument("--preset", default="coca")
    parser.add_argument("--json", default=None, help="benchmark mode: output path")
    args = parser.parse_args()
    if args.budget is None:
        args.budget = 600.0 if args.quick else CHECK_BUDGET_S
    if args.check:
        return check(args)
    benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
