"""Stage 2: the group prototype and the region filter that drops regions unlike it.

The filter is written for many images at once (the engine runs it on every image of a batch of groups): the
connected regions are labelled on the CPU (OpenCV), each region's patch-grid mask is found for all regions at
once, and only the region embeddings and their cosines touch the tokens, on the tokens' device.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

KEEP_RATIO = 0.77  # keep regions scoring at least 77% of the image's best region


def foreground_means(tokens: torch.Tensor, weights: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (n, P, C), stage-1 weights (n, P) -> each image's mean token over patches with w >= tau (n, C),
    and whether the image has such a patch (n,) bool."""
    fg = (weights >= threshold).to(tokens.dtype)  # (n, P)
    counts = fg.sum(dim=1)
    sums = torch.einsum("np,npc->nc", fg, tokens)
    has_fg = counts > 0
    return sums / torch.where(has_fg, counts, torch.ones_like(counts))[:, None], has_fg


def prototype_from_means(means: torch.Tensor, has_fg: torch.Tensor) -> torch.Tensor:
    """Per-image foreground means (N, C) -> the group prototype P (C,): their mean over images that have a
    foreground. An image with none is left out (the reference would turn P into NaN); if no image has one, P is
    zeros: then no stage-1 mask has a region either, so P is never used."""
    if not bool(has_fg.any()):
        return means.new_zeros(means.shape[-1])
    return means[has_fg].mean(dim=0)


def group_prototype(tokens: torch.Tensor, weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """tokens (N, P, C), stage-1 weights (N, P) -> prototype P (C,): the mean over images of each image's mean
    token over patches with w >= tau."""
    return prototype_from_means(*foreground_means(tokens, weights, threshold))


def label_regions(stage1_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stage-1 masks (n, H, W) bool or 0/1 -> region labels (n, H, W) int32 (0 = background, 1..k: the
    8-connected regions) and the region count k per image (n,)."""
    n = stage1_masks.shape[0]
    labels = np.zeros(stage1_masks.shape, np.int32)
    counts = np.zeros(n, np.int64)
    for i in range(n):
        binary = np.ascontiguousarray(stage1_masks[i], dtype=np.uint8)
        count, labels[i] = cv2.connectedComponents(binary, labels=None, connectivity=8, ltype=cv2.CV_32S)
        counts[i] = count - 1
    return labels, counts


def patch_masks(labels: np.ndarray, counts: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Region labels (n, H, W) and counts (n,) -> every region's mask on the patch grid, (sum(counts), h*w)
    float32 0/1, regions in image order then label order.

    A region's grid mask is its 0/1 mask at H x W resized to (h, w) with OpenCV INTER_LINEAR. For an even integer
    scale (224 -> 28: 8) OpenCV samples each patch between its four centre pixels with weights 1/4 and rounds,
    so a patch is in a region when at least two of those four pixels are; that is computed for all regions at
    once (tests check it against OpenCV). Other scales call OpenCV per region.
    """
    n, height, width = labels.shape
    gh, gw = grid
    total = int(counts.sum())
    out = np.zeros((total, gh * gw), np.float32)
    if total == 0:
        return out
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sy, sx = height // gh, width // gw
    if sy * gh == height and sx * gw == width and sy % 2 == 0 and sx % 2 == 0:
        cy, cx = sy // 2, sx // 2
        centres = np.stack(
            [labels[:, cy - 1 :: sy, cx - 1 :: sx], labels[:, cy - 1 :: sy, cx::sx],
             labels[:, cy::sy, cx - 1 :: sx], labels[:, cy::sy, cx::sx]], axis=-1,
        ).reshape(n, gh * gw, 4)
        s = np.sort(centres, axis=-1)
        # with four values, a label seen at least twice is s1 (when s0 == s1 or s1 == s2) or s2 (when s2 == s3)
        first = np.where((s[..., 0] == s[..., 1]) | (s[..., 1] == s[..., 2]), s[..., 1], 0)
        second = np.where((s[..., 2] == s[..., 3]) & (s[..., 2] != s[..., 1]), s[..., 2], 0)
        for found in (first, second):
            img, patch = np.nonzero(found)
            out[offsets[img] + found[img, patch] - 1, patch] = 1.0
        return out
    for i in range(n):
        for k in range(1, int(counts[i]) + 1):
            small = cv2.resize((labels[i] == k).astype(np.uint8), (gw, gh), interpolation=cv2.INTER_LINEAR)
            out[offsets[i] + k - 1] = small.reshape(-1)
    return out


def region_embeddings(region_masks: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One image's region grid masks (R, P) and tokens (P, C) -> e_k (R, C), the sum of tokens under region k."""
    return region_masks @ tokens


def prototype_cosines(prototype: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """The group prototype (C,) and one image's region embeddings (R, C) -> cos(P, e_k) (R,) (eps 1e-8, as the
    reference)."""
    return F.cosine_similarity(prototype[None], embeds, dim=1, eps=1e-8)


def keep_regions(cosines: np.ndarray, counts: np.ndarray, keep_ratio: float = KEEP_RATIO):
    """Cosines of all regions (sum(counts),) float32 -> (scores (R,) int64, keep (R,) bool, kept per image (n,)).

    s_k = trunc(100 cos) (a float32 product, truncated toward zero, as the reference); an image keeps its regions
    with s_k / max s >= 0.77. When the best score is 0 the ratio is 0/0 (undefined in the paper code): the
    regions scoring 0 are the ones kept.
    """
    scores = (np.asarray(cosines, np.float32) * np.float32(100)).astype(np.int64)
    keep = np.zeros(len(scores), bool)
    kept = np.zeros(len(counts), np.int64)
    start = 0
    for i, count in enumerate(counts):
        s = scores[start : start + count]
        if count:
            best = s.max()
            keep[start : start + count] = (s == 0) if best == 0 else (s / best >= keep_ratio)
            kept[i] = keep[start : start + count].sum()
        start += count
    return scores, keep, kept


def stage2_masks(labels: np.ndarray, counts: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Region labels (n, H, W), counts (n,) and the kept flags of all regions -> stage-2 masks (n, H, W) uint8
    0/1: the union of each image's kept regions."""
    # A lookup per image, into its slice of the output: one pass over the labels and no image-sized temporaries
    # (one lookup over all images, with int64 offsets added to the labels, was most of stage 2's CPU time).
    out = np.empty(labels.shape, np.uint8)
    start = 0
    for i, count in enumerate(counts):
        lut = np.zeros(int(count) + 1, np.uint8)
        lut[1:] = keep[start:start + count]
        np.take(lut, labels[i], out=out[i])
        start += count
    return out
