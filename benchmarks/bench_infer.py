"""The whole inference job in steady state against the backbone alone, on the same device, model and images.

    .venv/bin/python benchmarks/bench_infer.py [--groups 200] [--per-group 25] [--crf none coca] [--device cuda]

Writes ``groups x per-group`` synthetic JPEGs (no ground truth: metrics are a separate, optional cost), measures
the backbone-only rate in this process (the engine's micro-batching, forward only), then runs ``jobs/infer.py``'s
driver once per CRF setting on a fresh local Ray and takes its steady-state rate from the job's own progress
history (images done between 20% and 90% of the run: no start-up, no tail). ViT-B/8 with random weights.
Writes JSON (benchmarks/results/infer-<device>.json by default).
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_file import write_result  # noqa: E402


def _write(args) -> None:
    root, group, i = args
    from PIL import Image

    from pipeline.sample import synthetic_image

    kind = ("horse", "disc")[group % 2]
    rgb, _ = synthetic_image(kind, i, seed=group)
    folder = Path(root) / "image" / f"g{group:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    (folder / f"{i:04d}.jpg").write_bytes(buf.getvalue())


def write_data(root: Path, groups: int, per_group: int) -> None:
    jobs = [(str(root), g, i) for g in range(groups) for i in range(per_group)]
    with multiprocessing.get_context("fork").Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(_write, jobs, chunksize=64)


def steady_rate(history: list, total: int, lo: float = 0.2, hi: float = 0.9) -> float | None:
    """Images per second between the first progress points past lo and hi of the run."""
    points = [(t, n) for t, n in history]
    a = next(((t, n) for t, n in points if n >= lo * total), None)
    b = next(((t, n) for t, n in points if n >= hi * total), None)
    if a is None or b is None or b[0] <= a[0]:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--groups", type=int, default=200)
    ap.add_argument("--per-group", type=int, default=25)
    ap.add_argument("--crf", nargs="+", default=["none", "coca"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny ViT (quick checks of this script)")
    ap.add_argument("--work", default=None, help="folder for the images and runs (default: a temporary one)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from bench_engine import backbone_rate, make_engine

    from pipeline.infer import InferConfig, run_inference
    from scosparc_core.engine import default_micro_batch
    from scosparc_core.image import network_pixels
    from scosparc_core.precision import resolve

    cuda = a.device == "cuda"
    precision = resolve(a.dtype, a.device)
    mb = a.micro_batch or default_micro_batch(a.device, precision)
    kwargs = dict(embed_dim=96, depth=2, num_heads=3) if a.tiny else {}
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-infer-"))
    data = work / "data"
    total = a.groups * a.per_group
    t0 = time.perf_counter()
    if not (data / "image").exists():
        write_data(data, a.groups, a.per_group)
    print(f"{total} images in {a.groups} groups written in {time.perf_counter() - t0:.0f}s", flush=True)

    from PIL import Image

    files = sorted((data / "image").rglob("*.jpg"))[: max(2 * mb, 64)]
    pixels = [np.stack([network_pixels(np.asarray(Image.open(f).convert("RGB"))) for f in files])]
    engine = make_engine(a.device, precision, mb, kwargs)
    backbone = backbone_rate(engine, pixels, 5 if cuda else 1)
    del engine
    if cuda:
        torch.cuda.empty_cache()
    print(f"backbone alone: {backbone:.1f} img/s ({precision}, micro-batch {mb})", flush=True)

    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "precision": precision, "micro_batch": mb, "images": total, "groups": a.groups, "tiny": a.tiny,
              "backbone_images_per_s": backbone, "runs": []}
    for crf in a.crf:
        cfg = InferConfig(input=str(data), output=str(work / f"run-{crf}"), random_init=True, crf=crf,
                          dtype=precision, micro_batch=mb, progress_interval=1.0, overwrite=True,
                          device=a.device, backbone_name="vit_base_patch8_224" if a.tiny else InferConfig.backbone_name,
                          backbone_kwargs=kwargs)
        t0 = time.perf_counter()
        manifest = run_inference(cfg)
        command = time.perf_counter() - t0
        steady = steady_rate(manifest["progress"], total)
        run = {"crf": crf, "command_s": command, "dataset_s": manifest["dataset_seconds"],
               "whole_run_images_per_s": total / manifest["dataset_seconds"], "steady_images_per_s": steady,
               "steady_ratio_to_backbone": steady / backbone if steady else None,
               "rows": manifest["output"]["rows"], "errors": manifest["output"]["errors"],
               "plan": manifest["plan"], "progress": manifest["progress"]}
        result["runs"].append(run)
        print(f"job --crf {crf}: steady {steady or float('nan'):.1f} img/s = "
              f"{100 * (run['steady_ratio_to_backbone'] or float('nan')):.0f}% of the backbone; whole execution "
              f"{run['whole_run_images_per_s']:.1f} img/s ({run['dataset_s']:.1f}s), command {command:.1f}s, "
              f"rows {run['rows']} errors {run['errors']}", flush=True)
    write_result(result, a.out, f"infer-{'cuda' if cuda else 'cpu'}.json")
    return result


if __name__ == "__main__":
    main()
