"""CoSOD metrics per image, from pysodmetrics, in a form that aggregates exactly.

pysodmetrics accumulates per-image values and curves and averages them at the end. ``image_metrics`` returns
those per-image values (one ``step`` of each pysodmetrics evaluator); ``aggregate`` averages any number of
them into the dataset figures pysodmetrics would report for the same images, whatever order they arrive in.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import cv2
import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Fmeasure announces its future removal on import of the package
    from py_sod_metrics import MAE, Emeasure, Fmeasure, Smeasure, WeightedFmeasure

CURVE_POINTS = 256  # pysodmetrics' thresholds 0..255
SCALARS = ("mae", "sm", "wfm", "adp_fm", "adp_em")
CURVES = ("precision", "recall", "fm_curve", "em_curve")


def gt_to_mask(gt: np.ndarray, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Any ground-truth array (gray, RGB, RGBA, palette indices already expanded) -> (H, W) uint8 0/255.

    >128 is object (DESIGN.md §2). With a target size that differs, nearest-neighbour resize keeps it binary.
    """
    gt = np.asarray(gt)
    if gt.ndim == 3:
        gt = gt[:, :, :3].max(axis=2) if gt.shape[2] >= 3 else gt[:, :, 0]
    if gt.dtype == bool:
        gt = gt.astype(np.uint8) * 255
    elif gt.dtype != np.uint8:  # 16-bit masks: 0..65535
        gt = (gt.astype(np.float64) * (255.0 / 65535.0 if gt.max(initial=0) > 255 else 1.0)).astype(np.uint8)
    mask = np.where(gt > 128, 255, 0).astype(np.uint8)
    if height is not None and width is not None and mask.shape != (height, width):
        mask = cv2.resize(mask, (int(width), int(height)), interpolation=cv2.INTER_NEAREST)
    return mask


def image_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    """pred (H, W) uint8 map and gt (H', W') uint8 0/255 mask -> per-image scalars and 256-point curves.

    A prediction of another size is resized to the ground truth's (bilinear), as CoSOD evaluation tools do.
    """
    if pred.shape != gt.shape:
        pred = cv2.resize(pred, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_LINEAR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm, em, sm, wfm, mae = Fmeasure(), Emeasure(), Smeasure(), WeightedFmeasure(), MAE()
    for metric in (fm, em, sm, wfm, mae):
        metric.step(pred=pred, gt=gt)
    return {
        "mae": float(mae.maes[0]),
        "sm": float(sm.sms[0]),
        "wfm": float(wfm.weighted_fms[0]),
        "adp_fm": float(fm.adaptive_fms[0]),
        "adp_em": float(em.adaptive_ems[0]),
        "precision": np.asarray(fm.precisions[0], np.float64),
        "recall": np.asarray(fm.recalls[0], np.float64),
        "fm_curve": np.asarray(fm.changeable_fms[0], np.float64),
        "em_curve": np.asarray(em.changeable_ems[0], np.float64),
    }


def _exact_mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")


def aggregate(rows: Iterable[Mapping]) -> dict:
    """Per-image metric rows -> dataset metrics: max/mean/adaptive F, S, max/mean/adaptive E, MAE, weighted F,
    and the mean curves. Sums are exact (fsum), so any split of the rows across workers gives the same numbers."""
    rows = list(rows)
    out: dict = {"images": len(rows)}
    for key in SCALARS:
        out[key] = _exact_mean(r[key] for r in rows)
    for key in CURVES:
        if not rows:  # nothing to average (a run without ground truth): NaN, not an error
            out[key] = np.full(CURVE_POINTS, np.nan)
            continue
        stacked = np.array([np.asarray(r[key], np.float64) for r in rows]).reshape(len(rows), -1)
        out[key] = np.array([_exact_mean(col) for col in stacked.T])
    out["max_fm"] = float(np.max(out["fm_curve"]))
    out["mean_fm"] = float(np.mean(out["fm_curve"]))
    out["max_em"] = float(np.max(out["em_curve"]))
    out["mean_em"] = float(np.mean(out["em_curve"]))
    return out
