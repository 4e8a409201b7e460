"""Stage 2: the group prototype and the region filter that drops regions unlike it."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

KEEP_RATIO = 0.77  # keep regions scoring at least 77% of the image's best region


def group_prototype(tokens: torch.Tensor, weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """tokens (N, P, C), stage-1 weights (N, P) -> prototype P (C,).

    Per image, the mean token over patches with w >= tau; P is the mean of those over images. An image with
    no such patch has no foreground to describe and is left out (the reference would turn P into NaN). If no
    image has one, P is zeros: then no stage-1 mask has a region either, so P is never used.
    """
    fg = (weights >= threshold).to(tokens.dtype)  # (N, P)
    counts = fg.sum(dim=1)
    sums = torch.einsum("np,npc->nc", fg, tokens)
    has_fg = counts > 0
    if not bool(has_fg.any()):
        return tokens.new_zeros(tokens.shape[-1])
    return (sums[has_fg] / counts[has_fg, None]).mean(dim=0)


@dataclass
class RegionFilterResult:
    """mask: (224, 224) uint8 0/1 union of kept regions; scores: one int per region (trunc(100 cos))."""

    mask: np.ndarray
    scores: list[int]
    kept: int

    @property
    def found(self) -> int:
        return len(self.scores)


def region_filter(
    stage1_mask: np.ndarray,
    tokens: torch.Tensor | np.ndarray,
    prototype: torch.Tensor | np.ndarray,
    grid: tuple[int, int] = (28, 28),
    keep_ratio: float = KEEP_RATIO,
) -> RegionFilterResult | None:
    """One image's stage-1 mask (224, 224) bool, its tokens (P, C) and the group prototype (C,) -> kept regions.

    Regions are 8-connected components. Region k's mask is resized to the patch grid (OpenCV INTER_LINEAR on
    uint8 0/1), e_k = sum of tokens under it, s_k = trunc(100 cos(P, e_k)); regions with s_k / max s >= 0.77
    are kept. Returns None when the mask has no region (the caller falls back to the stage-1 map).

    Rules the paper code leaves undefined: a mask that is all foreground is one region (the reference finds
    none); when the best score is 0 the ratio is 0/0, so the regions scoring 0 are the ones kept.
    """
    binary = np.ascontiguousarray(stage1_mask, dtype=np.uint8)
    count, labels = cv2.connectedComponents(binary, connectivity=8)
    if count <= 1:
        return None
    tokens = torch.as_tensor(tokens, dtype=torch.float32)
    prototype = torch.as_tensor(prototype, dtype=torch.float32).to(tokens.device)
    small = np.stack(
        [cv2.resize((labels == k).astype(np.uint8), grid[::-1], interpolation=cv2.INTER_LINEAR) for k in range(1, count)]
    )
    region_masks = torch.from_numpy(small.reshape(count - 1, -1).astype(np.float32)).to(tokens.device)
    embeds = region_masks @ tokens  # (R, C)
    cos = F.cosine_similarity(prototype[None], embeds, dim=1, eps=1e-8).float().cpu().numpy()
    scores = [int(v) for v in cos * np.float32(100)]  # float32 product, truncated toward zero, as the reference
    best = max(scores)
    if best == 0:
        keep = [s == 0 for s in scores]
    else:
        keep = [s / best >= keep_ratio for s in scores]
    kept_labels = np.flatnonzero(np.array([False] + keep))
    mask = np.isin(labels, kept_labels).astype(np.uint8)
    return RegionFilterResult(mask=mask, scores=scores, kept=int(sum(keep)))
