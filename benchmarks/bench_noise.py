"""How far the masks move when the numbers before them move a little: the CPU's view of GPU precision.

    .venv/bin/python benchmarks/bench_noise.py [--photos tests/realphotos] [--out DIR]

A GPU's float32 sums in another order than the CPU, so its tokens differ from the reference's by rounding; where
a number sits next to a threshold, a mask pixel flips. This script measures that on the CPU, on the real photos,
with the random ViT-B/8 and head of ``bench_precision.py``:

- the distance between the reference's float32 tokens and float64 tokens rounded to float32 (what the
  ``float64`` precision gives), and the masks of those tokens against the reference's;
- the masks when the reference tokens get relative noise of size delta (x (1 + delta * N(0, 1)), per element),
  and when the stage-1 maps do (the float32 steps after the backbone).

Masks are compared after the CRF (pydensecrf) and without it, as in ``bench_precision.py``. Reading: a GPU
precision whose tokens stay within the deltas that flip nothing keeps the masks; float64 on a GPU rounds to the
same float32 tokens as float64 on the CPU except where the two differ in the last of ~16 digits.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_precision import binary_masks, iou, photo_arguments, photos  # noqa: E402
from results_file import write_result  # noqa: E402


@contextlib.contextmanager
def noisy_maps(delta: float, seed: int):
    """Stage-1 maps x (1 + delta * N(0, 1)) inside the engine while open (the maps are an inner step of it)."""
    import scosparc_core.engine as engine_module

    exact, gen = engine_module.stage1_map, torch.Generator().manual_seed(seed)

    def stage1_map(weights, grid):
        maps = exact(weights, grid)
        noise = 1 + delta * torch.randn(maps.shape, generator=gen, dtype=torch.float64)
        return (maps.double() * noise).to(maps.dtype)

    engine_module.stage1_map = stage1_map
    try:
        yield
    finally:
        engine_module.stage1_map = exact


def masks(engine, tokens: dict, groups: dict) -> dict:
    """bench_precision.binary_masks of each group's tokens (the CRF: pydensecrf)."""
    return binary_masks({g: engine.run_on_tokens([t], [groups[g][1]], crf="coca", crf_backend="pydensecrf")[0]
                         for g, t in tokens.items()})


def compare(got: dict, ref: dict) -> dict:
    out = {}
    for crf in ("coca", "none"):
        scores = np.concatenate([iou(got[crf][g], ref[crf][g]) for g in ref[crf]])
        out[crf] = {"mean_iou": float(scores.mean()), "min_iou": float(scores.min()),
                    "pixels_differ": int(sum((got[crf][g] != ref[crf][g]).sum() for g in ref[crf]))}
    return out


def token_distance(a: dict, b: dict) -> dict:
    """Per-token relative distance |a - b| / |b| (median, max) and the share of equal elements."""
    x = torch.cat(list(a.values())).double()
    y = torch.cat(list(b.values())).double()
    rel = (x - y).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-30)
    return {"per_token_median": float(rel.median()), "per_token_max": float(rel.max()),
            "equal_elements": float((x == y).double().mean())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    photo_arguments(ap)
    ap.add_argument("--token-deltas", nargs="*", type=float, default=[1e-7, 1e-6, 1e-5, 1e-4])
    ap.add_argument("--map-deltas", nargs="*", type=float, default=[1e-7, 1e-6])
    ap.add_argument("--seeds", type=int, default=2, help="noise draws per delta")
    ap.add_argument("--no-float64", action="store_true", help="skip the float64 tokens (the slow part)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from bench_engine import make_engine
    kwargs, groups, n = photos(a)
    t0 = time.perf_counter()
    engine = make_engine("cpu", "float32", 32, kwargs)
    with torch.inference_mode():
        tokens = {g: engine._tokens([px]) for g, (px, _) in groups.items()}
    ref = masks(engine, tokens, groups)
    print(f"CPU float32 reference on {n} photos in {time.perf_counter() - t0:.0f}s", flush=True)
    result = {"photos": n, "tiny": a.tiny, "rows": []}

    def record(what: str, delta: float | None, seed: int | None, found: dict, extra: dict | None = None):
        row = {"perturbed": what, "delta": delta, "seed": seed, **compare(found, ref), **(extra or {})}
        result["rows"].append(row)
        print(f"{what:>8} delta {delta if delta is not None else '-':>7} seed {seed if seed is not None else '-'}: "
              f"pixels differ with CRF {row['coca']['pixels_differ']:4d} (min IoU {row['coca']['min_iou']:.4f}), "
              f"without {row['none']['pixels_differ']:4d} (min IoU {row['none']['min_iou']:.4f})", flush=True)

    if not a.no_float64:
        wide = make_engine("cpu", "float64", 32, kwargs)
        with torch.inference_mode():
            tokens64 = {g: wide._tokens([px]) for g, (px, _) in groups.items()}
        del wide
        distance = token_distance(tokens, tokens64)
        print(f"float32 tokens vs float64 rounded: per-token relative distance median "
              f"{distance['per_token_median']:.2e}, max {distance['per_token_max']:.2e}", flush=True)
        record("float64", None, None, masks(engine, tokens64, groups), {"token_distance": distance})
    for delta in a.token_deltas:
        for seed in range(a.seeds):
            gen = torch.Generator().manual_seed(1000 + seed)
            # in float64, rounded once: in float32 a third of the factors 1 + 1e-7 x N would round to 1
            noisy = {g: (t.double() * (1 + delta * torch.randn(t.shape, generator=gen, dtype=torch.float64))).float()
                     for g, t in tokens.items()}
            record("tokens", delta, seed, masks(engine, noisy, groups))
    for delta in a.map_deltas:
        for seed in range(a.seeds):
            with noisy_maps(delta, seed):
                record("maps", delta, seed, masks(engine, tokens, groups))
    write_result(result, a.out, "precision-noise-cpu.json")
    return result


if __name__ == "__main__":
    main()
