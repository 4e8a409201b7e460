"""The group engine against the backbone alone, on the same groups, per number format (CUDA when present).

    .venv/bin/python benchmarks/bench_engine.py [--device cuda] [--groups 40] [--group-size 25]
        [--precisions float16 bfloat16] [--crf none coca] [--out DIR]

ViT-B/8 with random weights (timing does not depend on them), synthetic groups decoded once. Prints, per format:
the backbone-only rate (the engine's own micro-batching, forward only), the engine's rate (backbone, stage 1,
threshold, prototype, region filter, and the CRF when asked) called as the stage-1 actor calls it (batches of
groups, two threads), their ratio, and the engine's time per image outside the backbone forward split by step.
Writes JSON (benchmarks/results/engine-<device>.json by default).
"""
from __future__ import annotations

import argparse
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from results_file import write_result  # noqa: E402
VIT_B8_GFLOP = 156.0


def synthetic_groups(groups: int, size: int) -> tuple[list, list]:
    from pipeline.sample import synthetic_image
    from scosparc_core.image import crf_image, network_pixels

    pixels, rgbs = [], []
    for g in range(groups):
        kind = ("horse", "disc")[g % 2]
        images = [synthetic_image(kind, i, seed=g)[0] for i in range(size)]
        pixels.append(np.stack([network_pixels(im) for im in images]))
        rgbs.append(np.stack([crf_image(im) for im in images]))
    return pixels, rgbs


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_engine(device: str, precision: str, micro_batch: int, backbone_kwargs: dict, crf_workers: int = 0):
    from scosparc_core import SCoSPARC

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SCoSPARC.from_checkpoints(random_init=True, device=device, dtype=precision, micro_batch=micro_batch,
                                         crf_workers=crf_workers, **backbone_kwargs).engine


def backbone_rate(engine, pixels: list, repeat: int) -> float:
    engine._tokens(pixels[:2])  # warm-up
    _sync(engine.device)
    n = sum(len(p) for p in pixels)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(repeat):
            engine._tokens(pixels)
    _sync(engine.device)
    return n * repeat / (time.perf_counter() - t0)


def engine_rate(engine, pixels: list, rgbs: list, crf: str, per_call: int, threads: int, repeat: int) -> float:
    calls = [(pixels[i:i + per_call], rgbs[i:i + per_call]) for i in range(0, len(pixels), per_call)] * repeat
    engine.run(pixels[:1], rgbs[:1], crf=crf)  # warm-up
    n = sum(len(p) for call in calls for p in call[0])
    lock, queue = threading.Lock(), list(calls)

    def work():
        while True:
            with lock:
                if not queue:
                    return
                px, rg = queue.pop()
            engine.run(px, rg, crf=crf)

    t0 = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    _sync(engine.device)
    return n / (time.perf_counter() - t0)


def split(engine, pixels: list, rgbs: list, crf: str, per_call: int) -> dict:
    """Seconds per image by step, the device synchronised at each step (so slower than the pipelined rate)."""
    engine.profile = True
    totals: dict = {}
    n = 0
    try:
        for i in range(0, len(pixels), per_call):
            for r in engine.run(pixels[i:i + per_call], rgbs[i:i + per_call], crf=crf)[:1]:
                for k, v in r.timings.items():
                    totals[k] = totals.get(k, 0.0) + v
            n += sum(len(p) for p in pixels[i:i + per_call])
    finally:
        engine.profile = False
    return {k: v / n for k, v in totals.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--groups", type=int, default=40)
    ap.add_argument("--group-size", type=int, default=25)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--precisions", nargs="+", default=None)
    ap.add_argument("--crf", nargs="+", default=["none", "coca"])
    ap.add_argument("--threads", type=int, default=None, help="concurrent engine calls (default: 2 on CUDA, 1 on CPU)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny ViT (quick checks of this script)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from scosparc_core.engine import default_micro_batch
    from scosparc_core.precision import resolve

    cuda = torch.device(a.device).type == "cuda"
    precisions = a.precisions or (["float32", "float64", "tf32", "float16", "bfloat16"] if cuda else ["float32"])
    threads = a.threads or (2 if cuda else 1)
    repeat = a.repeat or (3 if cuda else 1)
    kwargs = dict(embed_dim=96, depth=2, num_heads=3) if a.tiny else {}
    pixels, rgbs = synthetic_groups(a.groups, a.group_size)
    result = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
              "torch": torch.__version__, "groups": a.groups, "group_size": a.group_size,
              "threads": threads, "tiny": a.tiny, "rows": []}
    print(f"\nengine vs backbone, {'tiny ViT' if a.tiny else 'ViT-B/8'}, {a.groups} groups x {a.group_size} images, "
          f"{threads} thread(s), {result['device']}; micro-batch and groups per call: the stage-1 actor's per format")
    print(f"{'format':>9} {'crf':>5} {'micro':>5} {'calls':>5} {'backbone img/s':>15} {'engine img/s':>13} {'ratio':>6}"
          "   split outside the backbone (ms/img)")
    for precision in precisions:
        # the stage-1 actor's micro-batch for this format (float64 on CUDA: half), and its groups per call
        own = a.micro_batch or default_micro_batch(a.device, resolve(precision, a.device))
        calls = max(1, round(2 * own / a.group_size))
        engine = make_engine(a.device, precision, own, kwargs)
        bb = backbone_rate(engine, pixels, repeat)
        for crf in a.crf:
            rate = engine_rate(engine, pixels, rgbs, crf, calls, threads, repeat)
            steps = split(engine, pixels, rgbs, crf, calls)
            row = {"precision": precision, "crf": crf, "micro_batch": own, "groups_per_call": calls,
                   "backbone_images_per_s": bb, "engine_images_per_s": rate,
                   "ratio": rate / bb, "split_s_per_image": steps,
                   "backbone_tflops": bb * VIT_B8_GFLOP / 1e3 if not a.tiny else None}
            result["rows"].append(row)
            outside = ", ".join(f"{k} {1e3 * v:.3f}" for k, v in steps.items() if k != "backbone")
            print(f"{precision:>9} {crf:>5} {own:>5} {calls:>5} {bb:>15.1f} {rate:>13.1f} {rate / bb:>6.2f}   "
                  f"{outside}", flush=True)
        del engine
        if cuda:
            torch.cuda.empty_cache()
    write_result(result, a.out, f"engine-{'cuda' if cuda else 'cpu'}.json")
    return result


if __name__ == "__main__":
    main()
