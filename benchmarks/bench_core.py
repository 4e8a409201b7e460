"""Speed of scosparc_core: stage-1 head (linear vs full matrix) and the whole predict_group.

    .venv/bin/python benchmarks/bench_core.py [--images 8] [--skip-stage1] [--skip-predict]

Prints tables and writes benchmarks/results/core.json. Random weights: timing does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VIT_B8_GFLOP = 156.0  # per 224x224 image forward


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage1_one(n: int, form: str) -> dict:
    """Runs in a child process so that its peak RSS is this configuration's alone."""
    from scosparc_core.modeling import Stage1Head, full_matrix_stage1

    torch.manual_seed(0)
    head = Stage1Head(768)
    tokens = torch.randn(n, 784, 768)
    base = _rss_mb()
    fn = head if form == "linear" else (lambda t: full_matrix_stage1(head, t))
    times = []
    with torch.inference_mode():
        for _ in range(3 if n <= 96 else 1):
            t0 = time.perf_counter()
            fn(tokens)
            times.append(time.perf_counter() - t0)
    return {"n": n, "form": form, "seconds": min(times), "peak_extra_mb": _rss_mb() - base}


def bench_stage1(sizes=(8, 24, 96, 1000)) -> list[dict]:
    rows = []
    free_mb = _available_mb()
    for n in sizes:
        for form in ("linear", "full"):
            need_mb = (n * 784) ** 2 * 4 / 2**20 * 2.2  # similarity matrix + its view/mean temporaries
            if form == "full" and need_mb > 0.6 * free_mb:
                rows.append({"n": n, "form": form, "seconds": None, "peak_extra_mb": None,
                             "note": f"does not fit: needs ~{need_mb / 1024:.0f} GiB"})
                continue
            out = subprocess.run([sys.executable, __file__, "--stage1-one", str(n), form],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\nStage-1 head, C=768, P=784 (CPU, %d threads)" % torch.get_num_threads())
    print(f"{'N':>6} {'form':>7} {'seconds':>10} {'peak extra MiB':>15}")
    for r in rows:
        if r["seconds"] is None:
            print(f"{r['n']:>6} {r['form']:>7} {r['note']:>27}")
        else:
            print(f"{r['n']:>6} {r['form']:>7} {r['seconds']:>10.3f} {r['peak_extra_mb']:>15.0f}")
    return rows


def _available_mb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 1024
    return 8192.0


def matmul_gflops(dtype=torch.float32, device="cpu", size=4096) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b
    _sync(device)
    return 2 * size**3 * 3 / (time.perf_counter() - t0) / 1e9


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench_predict(n_images: int, device: str = "cpu", configs=None) -> list[dict]:
    from pipeline.sample import synthetic_group
    from scosparc_core import SCoSPARC

    images = [rgb for rgb, _ in synthetic_group("horse", n_images)]
    rows = []
    configs = configs or [("float32", False, 0), ("float32", False, 2), ("float32", True, 2),
                          ("bfloat16", False, 2), ("bfloat16", True, 2)]
    peak = {dt: matmul_gflops(torch.float32 if dt == "float32" else torch.bfloat16, device) for dt in {c[0] for c in configs}}
    for dtype, compiled, crf_workers in configs:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = SCoSPARC.from_checkpoints(random_init=True, device=device, dtype=dtype, micro_batch=16 if device == "cpu" else 64,
                                              compile=compiled, crf_workers=crf_workers)
        t0 = time.perf_counter()
        model.predict_group(images[:2], crf="coca")  # warm-up (and compilation)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = model.predict_group(images, crf="coca")
        total = time.perf_counter() - t0
        backbone_per_img = pred.timings["backbone"] / n_images
        achieved = VIT_B8_GFLOP / backbone_per_img
        rows.append({
            "device": device, "dtype": dtype, "compiled": compiled, "crf_workers": crf_workers, "images": n_images,
            "images_per_s": n_images / total, "warmup_s": warm,
            "split_s_per_image": {k: v / n_images for k, v in pred.timings.items()},
            "backbone_gflops": achieved, "matmul_peak_gflops": peak[dtype],
            "backbone_fraction_of_peak": achieved / peak[dtype],
        })
    print(f"\npredict_group, ViT-B/8, {n_images} images, CRF coca, device {device}")
    print(f"{'dtype':>9} {'compiled':>8} {'crf procs':>9} {'img/s':>7} {'decode':>7} {'backbone':>9} {'stage1':>7} {'stage2':>7} "
          f"{'crf':>6}  {'backbone GFLOP/s (of matmul peak)':>34}")
    for r in rows:
        s = r["split_s_per_image"]
        print(f"{r['dtype']:>9} {str(r['compiled']):>8} {r['crf_workers']:>9} {r['images_per_s']:>7.3f} {s['decode']:>7.3f} "
              f"{s['backbone']:>9.3f} {s['stage1']:>7.3f} {s['stage2']:>7.3f} {s['crf']:>6.3f}  "
              f"{r['backbone_gflops']:>10.0f} ({100 * r['backbone_fraction_of_peak']:.0f}% of {r['matmul_peak_gflops']:.0f})")
    return rows


def bench_cuda_backbone(batch: int = 64) -> dict | None:
    if not torch.cuda.is_available():
        return None
    from scosparc_core.modeling import DinoBackbone

    bb = DinoBackbone.create("vit_base_patch8_224", random_init=True).cuda()
    x = torch.randn(batch * 4, 3, 224, 224, device="cuda")
    out = {}
    for compiled in (False, True):
        if compiled:
            bb.compile_forward()
        bb.extract(x[:batch], micro_batch=batch, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        bb.extract(x, micro_batch=batch, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        ips = len(x) / (time.perf_counter() - t0)
        out["compiled" if compiled else "eager"] = {"images_per_s": ips, "tflops": ips * VIT_B8_GFLOP / 1e3}
    out["gpu"] = torch.cuda.get_device_name()
    out["bf16_matmul_peak_tflops"] = matmul_gflops(torch.bfloat16, "cuda", 8192) / 1e3
    for k in ("eager", "compiled"):
        out[k]["mfu_vs_measured_matmul_peak"] = out[k]["tflops"] / out["bf16_matmul_peak_tflops"]
    print(f"\nCUDA backbone, batch {batch} bf16 on {out['gpu']}: eager {out['eager']['images_per_s']:.0f} img/s "
          f"({out['eager']['tflops']:.0f} TFLOP/s), compiled {out['compiled']['images_per_s']:.0f} img/s "
          f"({out['compiled']['tflops']:.0f} TFLOP/s); measured bf16 matmul peak {out['bf16_matmul_peak_tflops']:.0f} TFLOP/s")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--skip-stage1", action="store_true")
    ap.add_argument("--skip-predict", action="store_true")
    ap.add_argument("--stage1-one", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "core.json"))
    args = ap.parse_args()
    if args.stage1_one:
        print(json.dumps(stage1_one(int(args.stage1_one[0]), args.stage1_one[1])))
        return
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__}
    if not args.skip_stage1:
        result["stage1"] = bench_stage1()
    if not args.skip_predict:
        result["predict_group_cpu"] = bench_predict(args.images)
        if torch.cuda.is_available():
            result["predict_group_cuda"] = bench_predict(64, "cuda", [("bfloat16", False, 8), ("bfloat16", True, 8)])
    result["cuda_backbone"] = bench_cuda_backbone()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
