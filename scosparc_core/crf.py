"""Dense CRF on the stage-2 mask (pydensecrf semantics, as the paper code calls it)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels


@dataclass(frozen=True)
class CRFParams:
    gaussian_sxy: float = 10
    gaussian_compat: float = 10
    bilateral_sxy: float = 10
    bilateral_srgb: float = 3
    bilateral_compat: float = 10
    gt_prob: float = 0.995
    iterations: int = 10


# The paper's per-dataset settings, as presets; "none" skips the CRF.
CRF_PRESETS: dict[str, CRFParams | None] = {
    "coca": CRFParams(),
    "cosal2015": CRFParams(gaussian_sxy=20),
    "cosod3k": CRFParams(),
    "none": None,
}


def crf_params(preset: str | CRFParams | None) -> CRFParams | None:
    if preset is None or isinstance(preset, CRFParams):
        return preset
    try:
        return CRF_PRESETS[preset.lower()]
    except KeyError:
        raise ValueError(f"unknown CRF preset {preset!r}; choose one of {sorted(CRF_PRESETS)}") from None


def dense_crf(rgb: np.ndarray, labels: np.ndarray, params: CRFParams) -> np.ndarray:
    """rgb (H, W, 3) uint8 and a 0/1 label map (H, W) -> the CRF's argmax labels (H, W) uint8 0/1.

    The result is returned as labels: the paper code min-max normalises it, which turns an all-foreground
    result into 0/0 (an empty mask); here all-foreground stays all-foreground.
    """
    h, w = labels.shape
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(unary_from_labels(labels.astype(np.int64).ravel(), 2, params.gt_prob, zero_unsure=False))
    crf.addPairwiseGaussian(
        sxy=params.gaussian_sxy,
        compat=params.gaussian_compat,
        kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NORMALIZE_SYMMETRIC,
    )
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.array(rgb, dtype=np.uint8, order="C"),  # a writable copy: pydensecrf rejects read-only buffers
        compat=params.bilateral_compat,
        kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NORMALIZE_SYMMETRIC,
    )
    q = np.array(crf.inference(params.iterations)).reshape(2, h, w)
    return np.argmax(q, axis=0).astype(np.uint8)


@dataclass
class Stage2Image:
    """The region filter's result for one image. mask: (224, 224) float32.

    0/1, except when the stage-1 mask has no region: then, as in the paper code, it is the continuous stage-1
    map and ``fallback`` is True (the CRF needs labels, so it is skipped for that image).
    """

    mask: np.ndarray
    regions_found: int
    regions_kept: int
    fallback: bool


def crf_refine(stage2: Stage2Image, crf_rgb: np.ndarray, crf: str | CRFParams | None = "coca") -> np.ndarray:
    """The final (224, 224) float32 mask: the dense CRF on the stage-2 labels (skipped for a fallback map)."""
    params = crf_params(crf)
    if params is None or stage2.fallback:
        return stage2.mask
    return dense_crf(crf_rgb, stage2.mask.astype(np.uint8), params).astype(np.float32)
