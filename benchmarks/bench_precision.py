"""Which number format keeps the paper's masks on a GPU: every format against CPU float32, on real photos.

    .venv/bin/python benchmarks/bench_precision.py [--photos tests/realphotos] [--out DIR]

The same random ViT-B/8 and head (seeded; the formats are compared with each other, not with ground truth) run
the engine on each group of real photos on the CPU in float32 (the reference, equal to the paper code) and on
CUDA in float32 (TF32 off), tf32, float16 and bfloat16 autocast, and float64. Masks are compared after the CRF
(pydensecrf on both sides, so only the backbone's format differs) and without it, as IoU of the binary masks at
224. The backbone's speed per format comes from the same run. float64 (the backbone in float64, tokens rounded to
float32) shows how far masks move when the only difference is the reference's own float32 rounding;
``--device cpu --formats float64`` measures that without a GPU. The script names the fastest format with mean
IoU >= 0.995 and min IoU >= 0.98 (float32 when none is) and what ``--dtype auto`` resolves to here
(``scosparc_core.precision.resolve``: float32).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from results_file import write_result  # noqa: E402
MEAN_IOU, MIN_IOU = 0.995, 0.98


def load_groups(root: Path, limit: int | None) -> dict:
    from PIL import Image

    from scosparc_core.image import crf_image, network_pixels, to_rgb

    groups = {}
    for folder in sorted((root / "image").iterdir()):
        files = sorted(folder.iterdir())[:limit]
        rgb = [to_rgb(Image.open(f)) for f in files]
        groups[folder.name] = (np.stack([network_pixels(x) for x in rgb]), np.stack([crf_image(x) for x in rgb]))
    return groups


def photo_arguments(ap: argparse.ArgumentParser) -> None:
    """The real photos and the model size, as this script and ``bench_noise.py`` take them."""
    ap.add_argument("--photos", default=str(ROOT / "tests" / "realphotos"))
    ap.add_argument("--limit", type=int, default=None, help="photos per group (quick checks)")
    ap.add_argument("--tiny", action="store_true", help="a tiny ViT (quick checks of this script)")


def photos(a) -> tuple[dict, dict, int]:
    """(the backbone's architecture overrides, group -> (network pixels, CRF colours), photos) for ``a``."""
    groups = load_groups(Path(a.photos), a.limit)
    return (dict(embed_dim=96, depth=2, num_heads=3) if a.tiny else {}), groups, sum(len(p) for p, _ in groups.values())


def binary_masks(results: dict) -> dict:
    """group -> GroupResult (CRF coca) => crf -> group -> binary masks (n, 224, 224), with the CRF and without."""
    out = {"coca": {}, "none": {}}
    for g, r in results.items():
        out["coca"][g] = r.final >= 128
        out["none"][g] = np.where(r.fallback[:, None, None], r.final >= 128, r.stage2 > 0)
    return out


def masks(engine, groups: dict) -> dict:
    """binary_masks of one run of ``engine`` on each group (the CRF: pydensecrf)."""
    return binary_masks({g: engine.run([px], [rgb], crf="coca", crf_backend="pydensecrf")[0]
                         for g, (px, rgb) in groups.items()})


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def worst(scores: dict, got: dict, ref: dict, k: int = 3) -> list[dict]:
    """The ``k`` photos of lowest IoU (``scores``: group -> per-photo IoU), with their mask sizes: a few pixels
    weigh much on a small mask."""
    rows = []
    for g, group_scores in scores.items():
        for i, score in enumerate(group_scores):
            rows.append({"iou": float(score), "group": g, "index": i, "reference_pixels": int(ref[g][i].sum()),
                         "pixels": int(got[g][i].sum()), "pixels_differ": int((got[g][i] != ref[g][i]).sum())})
    return sorted(rows, key=lambda r: r["iou"])[:k]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    photo_arguments(ap)
    ap.add_argument("--formats", nargs="+", default=["float32", "float64", "float16", "tf32", "bfloat16"],
                    help="measured in this order (the candidates for auto first)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="the device under test (cpu only to check this script)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from bench_engine import backbone_rate, make_engine

    kwargs, groups, n = photos(a)
    t0 = time.perf_counter()
    reference = make_engine("cpu", "float32", 32, kwargs, crf_workers=8)
    ref = masks(reference, groups)
    print(f"CPU float32 reference on {n} photos in {time.perf_counter() - t0:.0f}s", flush=True)
    del reference
    rows = []
    pixels = [p for p, _ in groups.values()]
    for fmt in a.formats:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = make_engine(a.device, fmt, 128 if a.device == "cuda" else 32, kwargs, crf_workers=8)
        row = {"format": fmt, "backbone_images_per_s": backbone_rate(engine, pixels, 3 if a.device == "cuda" else 1)}
        found = masks(engine, groups)
        for crf in ("coca", "none"):
            got = found[crf]
            by_group = {g: iou(got[g], ref[crf][g]) for g in groups}
            scores = np.concatenate(list(by_group.values()))
            pixels_differ = float(np.mean(np.concatenate([(got[g] != ref[crf][g]).ravel() for g in groups])))
            row[crf] = {"mean_iou": float(scores.mean()), "min_iou": float(scores.min()),
                        "pixels_differ": pixels_differ, "worst": worst(by_group, got, ref[crf])}
        row["keeps_masks"] = row["coca"]["mean_iou"] >= MEAN_IOU and row["coca"]["min_iou"] >= MIN_IOU
        rows.append(row)
        print(f"{fmt:>9}: backbone {row['backbone_images_per_s']:8.1f} img/s; with CRF mean IoU "
              f"{row['coca']['mean_iou']:.4f} min {row['coca']['min_iou']:.4f} ({100 * row['coca']['pixels_differ']:.3f}% "
              f"pixels differ); without CRF mean {row['none']['mean_iou']:.4f} min {row['none']['min_iou']:.4f}"
              f"{'  keeps the masks' if row['keeps_masks'] else ''}", flush=True)
        w = row["coca"]["worst"][0]
        print(f"{'':>11}lowest with CRF: {w['group']} #{w['index']}, {w['pixels_differ']} pixels differ of a mask of "
              f"{w['reference_pixels']} (here {w['pixels']})", flush=True)
        del engine
        if a.device == "cuda":
            torch.cuda.empty_cache()
        result = summary(rows, ref, n, a)  # after each format: a run cut short by a time limit keeps what it did
        write_result(result, a.out, "precision.json")
    print(f"fastest format that keeps the masks (mean IoU >= {MEAN_IOU}, min >= {MIN_IOU}): {result['auto_choice']}; "
          f"--dtype auto here: {result['auto_here']}"
          f"{'' if result['auto_here'] == result['auto_choice'] else '  (they differ)'}")
    return result


def summary(rows: list[dict], ref: dict, n: int, a) -> dict:
    """The result file's content for the formats measured so far."""
    from scosparc_core.precision import resolve

    keeping = [r for r in rows if r["keeps_masks"]]
    choice = max(keeping, key=lambda r: r["backbone_images_per_s"])["format"] if keeping else "float32"
    areas = np.concatenate([m.reshape(len(m), -1).sum(1) for m in ref["coca"].values()])
    return {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
            "photos": n, "tiny": a.tiny, "rows": rows, "auto_choice": choice, "auto_here": resolve("auto", a.device),
            "reference_crf_mask_pixels": {"min": int(areas.min()), "median": float(np.median(areas)),
                                          "under_500": int((areas < 500).sum())}}


if __name__ == "__main__":
    main()
