"""Stage-1 map and the confidence-adaptive threshold (one per group)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .image import INPUT_SIZE

TH0 = 0.505  # tau = TH0 + ALPHA_C * ((1 - c) - BM_BAR)
ALPHA_C = 1.0
BM_BAR = 0.48
CONFIDENCE_FLOOR = 0.15  # values below this do not count towards an image's confidence


def stage1_map(weights: torch.Tensor, grid: tuple[int, int], size: int = INPUT_SIZE) -> torch.Tensor:
    """Stage-1 weights (N, h*w) -> stage-1 map S (N, size, size): bilinear, align_corners=True."""
    n = weights.shape[0]
    w = weights.reshape(n, 1, *grid)
    return F.interpolate(w, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def image_confidences(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """S (N, 224, 224) -> conf_i (N,) float32 on S's device: S resampled to the patch grid, values < 0.15
    zeroed, conf_i = sum / count(>= 0.15). An image with no value >= 0.15 has confidence 0 (reference: NaN)."""
    small = F.interpolate(maps[:, None], size=grid, mode="bilinear", align_corners=True)[:, 0]
    small = small.reshape(maps.shape[0], -1)
    keep = small >= CONFIDENCE_FLOOR
    total = torch.where(keep, small, torch.zeros_like(small)).sum(dim=1)
    count = keep.sum(dim=1)
    conf = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return conf.float()


def adaptive_threshold(confidences) -> tuple[float, float]:
    """Per-image confidences (N,) (array or tensor, any device) -> (group confidence c, threshold tau), in float32 as
    the paper code computes them. An empty group has no confidence; both come back NaN.
    """
    if isinstance(confidences, torch.Tensor):
        confidences = confidences.detach().cpu().numpy()
    if len(confidences) == 0:
        return float("nan"), float("nan")
    total = np.float32(0)
    for conf in np.asarray(confidences, dtype=np.float32):  # sequential float32 sum, like the reference
        total = np.float32(total + conf)
    c = np.float32(total / np.float32(len(confidences)))
    tau = np.float32(np.float32(TH0) + np.float32(ALPHA_C) * ((np.float32(1) - c) - np.float32(BM_BAR)))
    return float(c), float(tau)
