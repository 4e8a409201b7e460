"""Huge photos: decode cost of 12 MP JPEGs, full and with JPEG draft mode (``--fast-decode``), and what draft mode
does to the masks.

    .venv/bin/python benchmarks/bench_decode.py [--images 8] [--repeat 3] [--megapixels 12] [--tiny]

1. Decode cost: ``images`` photos from scikit-image, upscaled to 4000x3000 (12 MP; bicubic) with sensor-like
   noise, saved as JPEG (quality 90), decoded from bytes in memory by ``pipeline.decode.decode_image`` (what the
   job's decode tasks and stage-1 actors run: open, EXIF rotation, RGB, both 224x224 views), full and
   ``fast=True``. Per image: seconds (best of ``repeat``; split into the JPEG decode itself and the views) and
   peak memory: the process's peak RSS during the call above its RSS before it (the kernel's high-water mark,
   reset through ``/proc/self/clear_refs`` after ``malloc_trim``, so freed heap from the previous image does not
   hide this one's).
2. Effect on the masks: the real photos of ``tests/realphotos`` (two groups, Horse and Sheep, up to 375 px) as
   they are (draft mode only scales a JPEG at least twice the 448 px it keeps, so their pixels must be
   identical) and upscaled to ``megapixels`` (bicubic, JPEG quality 95). Each group runs through
   ``SCoSPARC.from_checkpoints(random_init=True).engine.run`` (ViT-B/8, or the tiny ViT with ``--tiny``; CRF
   ``coca``) on the views each decode path gives; the final masks at the original size are compared (IoU of the
   masks >= 128 per image, empty vs empty counts as 1). Random weights: the masks mean nothing as segmentations,
   the comparison shows how much the method's output moves when only the resize input changes.
Prints tables and writes benchmarks/results/decode.json.
"""
from __future__ import annotations

import argparse
import ctypes
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from results_file import code_version, write_result  # noqa: E402
REALPHOTOS = ROOT / "tests" / "realphotos" / "image"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera", "hubble_deep_field", "immunohistochemistry",
          "motorcycle_left", "page")
_LIBC = ctypes.CDLL("libc.so.6")


# --- memory --------------------------------------------------------------------------------------------------

def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in ("VmHWM", "VmRSS")}


def reset_peak() -> int:
    """Returns freed heap to the system and resets the peak-RSS mark; returns the RSS now."""
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status()["VmRSS"]


def measured(fn, *args):
    """(result, seconds, peak RSS above the RSS before the call, bytes)."""
    before = reset_peak()
    t0 = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - t0
    return out, seconds, _status()["VmHWM"] - before


# --- inputs --------------------------------------------------------------------------------------------------

def jpeg(rgb: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo(name: str) -> np.ndarray:
    from skimage import data

    a = getattr(data, name)()
    a = a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def upscale(rgb: np.ndarray, megapixels: float, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Bicubic upscale to about ``megapixels`` (aspect kept), with Gaussian noise of ``noise`` grey levels."""
    import cv2

    h, w = rgb.shape[:2]
    f = (megapixels * 1e6 / (h * w)) ** 0.5
    big = cv2.resize(rgb, (round(w * f), round(h * f)), interpolation=cv2.INTER_CUBIC)
    if noise:
        rng = np.random.default_rng(seed)
        big = np.clip(big + rng.normal(0, noise, big.shape).astype(np.float32), 0, 255).astype(np.uint8)
    return big


def twelve_mp_group(n: int) -> list[bytes]:
    """n JPEGs of exactly 4000x3000 from scikit-image photos (bicubic, noise sigma 4, quality 90)."""
    import cv2

    out = []
    for i in range(n):
        big = cv2.resize(photo(PHOTOS[i % len(PHOTOS)]), (4000, 3000), interpolation=cv2.INTER_CUBIC)
        rng = np.random.default_rng(i)
        big = np.clip(big + rng.normal(0, 4, big.shape).astype(np.float32), 0, 255).astype(np.uint8)
        out.append(jpeg(big, 90))
    return out


# --- 1. decode cost ------------------------------------------------------------------------------------------

def jpeg_only(data: bytes, fast: bool):
    """The JPEG decode alone, as decode_image does it (open, draft when fast, load)."""
    from PIL import Image

    from pipeline.decode import FAST_DECODE_SIZE

    image = Image.open(io.BytesIO(data))
    if fast:
        image.draft("RGB", (FAST_DECODE_SIZE, FAST_DECODE_SIZE))
    image.load()
    return image.size


def view_steps(data: bytes, fast: bool) -> dict:
    """Seconds of each step after the JPEG decode: to_rgb (EXIF rotation, RGB array), the network's view (PIL
    bilinear), the CRF's view (OpenCV bilinear)."""
    from PIL import Image

    from pipeline.decode import FAST_DECODE_SIZE
    from scosparc_core.image import crf_image, network_pixels, to_rgb

    image = Image.open(io.BytesIO(data))
    if fast:
        image.draft("RGB", (FAST_DECODE_SIZE, FAST_DECODE_SIZE))
    image.load()
    t0 = time.perf_counter()
    rgb = to_rgb(image)
    t1 = time.perf_counter()
    network_pixels(rgb)
    t2 = time.perf_counter()
    crf_image(rgb)
    return {"to_rgb_s": t1 - t0, "network_view_s": t2 - t1, "crf_view_s": time.perf_counter() - t2}


def decode_cost(blobs: list[bytes], repeat: int) -> dict:
    from pipeline.decode import decode_image

    decode_image(blobs[0])  # warm: libjpeg, OpenCV and PIL's first allocations
    rows = []
    for i, data in enumerate(blobs):
        row = {"image": i, "bytes": len(data)}
        for mode, fast in (("full", False), ("fast", True)):
            total, load, peak, steps = [], [], [], []
            for _ in range(repeat):
                steps.append(view_steps(data, fast))
                (net, crf, h, w), s, p = measured(lambda: decode_image(data, fast=fast))
                total.append(s)
                peak.append(p)
                size, s2, _ = measured(lambda: jpeg_only(data, fast))
                load.append(s2)
            row[mode] = {"s": min(total), "jpeg_s": min(load), "views_s": max(min(total) - min(load), 0.0),
                         "peak_bytes": min(peak), "decoded_size": list(size), "original": [h, w],
                         **{k: min(st[k] for st in steps) for k in steps[0]}}
        rows.append(row)
    mp = rows[0]["full"]["original"][0] * rows[0]["full"]["original"][1] / 1e6
    summary = {}
    for mode in ("full", "fast"):
        s = np.array([r[mode]["s"] for r in rows])
        summary[mode] = {"median_s": float(np.median(s)), "mean_s": float(s.mean()),
                         "ms_per_megapixel": float(np.median(s)) * 1e3 / mp,
                         "median_jpeg_s": float(np.median([r[mode]["jpeg_s"] for r in rows])),
                         "median_views_s": float(np.median([r[mode]["views_s"] for r in rows])),
                         **{f"median_{k}": float(np.median([r[mode][k] for r in rows]))
                            for k in ("to_rgb_s", "network_view_s", "crf_view_s")},
                         "median_peak_mib": float(np.median([r[mode]["peak_bytes"] for r in rows])) / 2**20,
                         "max_peak_mib": float(max(r[mode]["peak_bytes"] for r in rows)) / 2**20,
                         "decoded_size": rows[0][mode]["decoded_size"]}
    summary["speedup"] = summary["full"]["median_s"] / summary["fast"]["median_s"]
    return {"megapixels": mp, "images": rows, "summary": summary}


# --- 2. effect on the masks ----------------------------------------------------------------------------------

def views(blobs: list[bytes], fast: bool):
    from pipeline.decode import decode_image

    out = [decode_image(b, fast=fast) for b in blobs]
    return (np.stack([o[0] for o in out]), np.stack([o[1] for o in out]), [(o[2], o[3]) for o in out])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def mask_effect(model, groups: dict[str, list[bytes]], label: str) -> dict:
    from scosparc_core.image import to_original_size

    out = {"groups": {}}
    all_iou = []
    for group, blobs in groups.items():
        full, fast = views(blobs, False), views(blobs, True)
        net_same = bool(np.array_equal(full[0], fast[0]) and np.array_equal(full[1], fast[1]))
        entry = {"images": len(blobs), "pixels_identical": net_same,
                 "net_mean_abs_diff": float(np.abs(full[0].astype(np.int16) - fast[0]).mean()),
                 "net_max_abs_diff": int(np.abs(full[0].astype(np.int16) - fast[0]).max()),
                 "crf_view_mean_abs_diff": float(np.abs(full[1].astype(np.int16) - fast[1]).mean())}
        if net_same:  # the same pixels through the same model: the same masks, nothing to run
            ious = [1.0] * len(blobs)
            entry.update(threshold_full=None, threshold_fast=None, model_run=False)
        else:
            t0 = time.perf_counter()
            (r_full,) = model.engine.run([full[0]], [full[1]], crf="coca")
            (r_fast,) = model.engine.run([fast[0]], [fast[1]], crf="coca")
            ious = []
            for i, (h, w) in enumerate(full[2]):
                a = to_original_size(r_full.final[i], h, w) >= 128
                b = to_original_size(r_fast.final[i], h, w) >= 128
                ious.append(iou(a, b))
            entry.update(threshold_full=r_full.threshold, threshold_fast=r_fast.threshold, model_run=True,
                         identical_masks=int(sum(np.array_equal(x, y) for x, y in zip(r_full.final, r_fast.final))),
                         fallback_full=int(r_full.fallback.sum()), fallback_fast=int(r_fast.fallback.sum()),
                         model_s=time.perf_counter() - t0)
        entry.update(mean_iou=float(np.mean(ious)), min_iou=float(np.min(ious)), ious=ious)
        out["groups"][group] = entry
        all_iou += ious
        print(f"  {label:10} {group:6} {len(blobs):3} images  pixels identical {str(net_same):5}  network view "
              f"|diff| mean {entry['net_mean_abs_diff']:.2f} max {entry['net_max_abs_diff']:3}  IoU mean "
              f"{entry['mean_iou']:.4f} min {entry['min_iou']:.4f}"
              + (f"  tau {entry['threshold_full']:.4f} / {entry['threshold_fast']:.4f}" if entry["model_run"] else ""),
              flush=True)
    out.update(mean_iou=float(np.mean(all_iou)), min_iou=float(np.min(all_iou)), images=len(all_iou))
    return out


def realphoto_groups(megapixels: float | None) -> dict[str, list[bytes]]:
    """The real photos' JPEG bytes as they are, or upscaled to ``megapixels`` (bicubic, quality 95)."""
    from PIL import Image

    groups = {}
    for folder in sorted(p for p in REALPHOTOS.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.jpg"))
        if megapixels is None:
            groups[folder.name] = [f.read_bytes() for f in files]
        else:
            groups[folder.name] = [jpeg(upscale(np.asarray(Image.open(f).convert("RGB")), megapixels), 95)
                                   for f in files]
    return groups


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="12 MP JPEGs in the decode-cost group")
    ap.add_argument("--repeat", type=int, default=3, help="decodes per image and mode (the best counts)")
    ap.add_argument("--megapixels", type=float, default=12.0, help="size the real photos are upscaled to")
    ap.add_argument("--tiny", action="store_true", help="the tiny ViT instead of ViT-B/8 for the masks")
    ap.add_argument("--skip-masks", action="store_true")
    ap.add_argument("--out", help="JSON path or folder (default benchmarks/results/decode.json)")
    a = ap.parse_args(argv)
    import torch

    result: dict = {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "torch_threads": torch.get_num_threads()}
    result["code"] = code_version()  # before the work: a tree changed meanwhile is not what ran
    t0 = time.perf_counter()
    blobs = twelve_mp_group(a.images)
    print(f"{a.images} JPEGs of 4000x3000 ({np.mean([len(b) for b in blobs]) / 2**20:.1f} MiB each) made in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    cost = decode_cost(blobs, a.repeat)
    result["decode"] = cost
    s = cost["summary"]
    print(f"\ndecode_image on {cost['megapixels']:.0f} MP JPEGs (median of {a.images} images, best of {a.repeat}):")
    print(f"{'mode':5} {'decoded at':>11} {'s/image':>8} {'ms/MP':>6} {'JPEG s':>7} {'views s':>8} {'peak MiB':>9} "
          f"{'max MiB':>8}")
    for mode in ("full", "fast"):
        m = s[mode]
        print(f"{mode:5} {'x'.join(map(str, m['decoded_size'])):>11} {m['median_s']:8.3f} {m['ms_per_megapixel']:6.1f} "
              f"{m['median_jpeg_s']:7.3f} {m['median_views_s']:8.3f} {m['median_peak_mib']:9.0f} {m['max_peak_mib']:8.0f}")
    print(f"fast decode: {s['speedup']:.1f}x faster; the views' steps (median s): "
          + "; ".join(f"{mode} to_rgb {s[mode]['median_to_rgb_s']:.3f}, network view {s[mode]['median_network_view_s']:.3f}, "
                      f"CRF view {s[mode]['median_crf_view_s']:.3f}" for mode in ("full", "fast")), flush=True)

    if not a.skip_masks:
        import warnings

        from scosparc_core import SCoSPARC

        kwargs = dict(backbone_name="vit_base_patch8_224", embed_dim=96, depth=2, num_heads=3) if a.tiny else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = SCoSPARC.from_checkpoints(random_init=True, **kwargs)
        result["model"] = "tiny ViT (embed 96, depth 2, 3 heads)" if a.tiny else "ViT-B/8"
        print(f"\nfinal masks, full vs fast decode ({result['model']}, random weights, CRF coca):", flush=True)
        result["masks"] = {"native": mask_effect(model, realphoto_groups(None), "native"),
                           f"{a.megapixels:g}MP": mask_effect(model, realphoto_groups(a.megapixels),
                                                              f"{a.megapixels:g} MP")}
        for name, m in result["masks"].items():
            print(f"  {name:10} all    {m['images']:3} images  IoU mean {m['mean_iou']:.4f} min {m['min_iou']:.4f}")
    result["load_after"] = os.getloadavg()
    write_result(result, a.out, "decode.json")
    return result


if __name__ == "__main__":
    main()
