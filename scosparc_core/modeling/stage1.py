"""Stage-1 head: scores every patch by how well it corresponds to the patches of the other images."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STAGE1_CENTER = 0.65  # sigmoid((r - 0.65) / 0.15) on the min-max normalised correspondence
STAGE1_TEMPERATURE = 0.15


def minmax_per_image(rep: torch.Tensor) -> torch.Tensor:
    """(N, P) -> (N, P) scaled to [0, 1] per row. A constant row has no range: it maps to 0 (reference: NaN)."""
    lo = rep.min(dim=1, keepdim=True).values
    span = rep.max(dim=1, keepdim=True).values - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (rep - lo) / safe, torch.zeros_like(rep))


def stage1_weights_from_rep(rep: torch.Tensor) -> torch.Tensor:
    """rep (N, P), each image's patch scores -> stage-1 weights (N, P) in (0, 1): min-max per image, then a
    sigmoid around the paper's centre and temperature."""
    return torch.sigmoid((minmax_per_image(rep) - STAGE1_CENTER) / STAGE1_TEMPERATURE)


class Stage1Head(nn.Module):
    """Three 1x1 convolutions C->C (``conv``, ``query_transform``, ``key_transform``), as in the paper code.

    Stored as ``nn.Conv2d`` so its state_dict keys and shapes are the official checkpoint's
    (``encoder_attn.`` prefix aside); applied as linear maps over the token axis.
    """

    def __init__(self, dim: int = 768):
        super().__init__()
        self.dim = dim
        self.scale = 1.0 / math.sqrt(dim)
        self.conv = nn.Conv2d(dim, dim, kernel_size=1)
        self.query_transform = nn.Conv2d(dim, dim, kernel_size=1)
        self.key_transform = nn.Conv2d(dim, dim, kernel_size=1)

    def _linear(self, layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight.view(self.dim, self.dim), layer.bias)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C): x = conv(T) + T."""
        return self._linear(self.conv, tokens) + tokens

    def key_sums(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, P, C) -> K_i (N, C), the sum of each image's P keys (``keys_from_token_sums``)."""
        return self.keys_from_token_sums(tokens.sum(dim=1), tokens.shape[1])

    def keys_from_token_sums(self, token_sums: torch.Tensor, p: int) -> torch.Tensor:
        """Per-image token sums (N, C) over P patches -> K_i (N, C).

        K_i = W_k (sum_p x_p) + P b_k needs only the per-image token sums, so no key is ever materialised. An
        image's token sum does not depend on the images summed beside it, but a row of a linear map does (BLAS
        picks its kernel by the row count; one row takes the gemv path): whoever sums a group in micro-batches
        applies this once to the whole group's sums, so K_i is the same however the group was cut.
        """
        # sum_p (conv(T_p) + T_p) = conv(sum T) + (P-1) b_c: the bias P-1 more times
        x_sums = self.embed(token_sums) + (p - 1) * self.conv.bias
        return self._linear(self.key_transform, x_sums) + (p - 1) * self.key_transform.bias

    def weights(self, tokens: torch.Tensor, key_sums: torch.Tensor, total: torch.Tensor, group_size: int,
                chunk: int = 64) -> torch.Tensor:
        """Stage-1 weights (n, P) of n images of a group of ``group_size``, given their key sums (n, C) and the
        group's total key sum (C,) or (1, C). Images can come in any slices of the group (big groups stream)."""
        n, p, _ = tokens.shape
        if group_size > 1:
            others, denom = total.reshape(1, -1) - key_sums, (group_size - 1) * p
        else:
            others, denom = key_sums, p
        reps = []
        for start in range(0, n, max(1, chunk)):
            q = self._linear(self.query_transform, self.embed(tokens[start : start + chunk]))
            # a product and a row sum, not a batched matmul: an image's rep then does not depend on how many
            # images share its chunk (a batched matmul over one image takes BLAS's gemv path, other roundings)
            rep = (q * others[start : start + chunk, None, :]).sum(dim=-1)
            reps.append(rep * (self.scale / denom))
        return stage1_weights_from_rep(torch.cat(reps)) if reps else tokens.new_zeros((0, p))

    def forward(self, tokens: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """tokens (N, P, C) -> stage-1 weights w (N, P) in (0, 1), in O(N) time and memory.

        rep_i = scale * q_i . (K - K_i) / ((N - 1) P), with K_i the sum of image i's keys and K the group's.
        The paper forms the full (NP x NP) similarity matrix and averages it; the average is linear, so this
        gives the same numbers. Images are processed ``chunk`` at a time to bound memory.

        N = 1 (undefined in the paper code: 0/0): the image corresponds with itself, rep = scale * q . K / P.
        """
        n, p, _ = tokens.shape
        if n == 0:
            return tokens.new_zeros((0, p))
        key_sums = self.key_sums(tokens)
        return self.weights(tokens, key_sums, key_sums.sum(dim=0), n, chunk)


def full_matrix_stage1(head: Stage1Head, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (N, P, C) -> stage-1 weights (N, P), by the paper code's formulation, (NP x NP) similarity matrix
    and all: for tests and benchmarks only."""
    n, p, c = tokens.shape
    x = head.embed(tokens)
    q = head._linear(head.query_transform, x).reshape(n * p, c)
    k = head._linear(head.key_transform, x).reshape(n * p, c)
    sim = (q @ k.T * head.scale).view(n, p, n * p)
    reps = []
    for i in range(n):
        own = sim[i][:, i * p : (i + 1) * p].sum(dim=1)
        reps.append((sim[i].mean(dim=1) * n * p - own) / ((n - 1) * p))
    return stage1_weights_from_rep(torch.stack(reps))
