"""The self-supervised training objective: L_co + 0.3 * L_sal (ground truth is never used)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SALIENCY_WEIGHT = 0.3


@dataclass
class LossParts:
    loss: torch.Tensor
    co: torch.Tensor
    sal: torch.Tensor


def training_loss(tokens: torch.Tensor, cls_attention: torch.Tensor, weights: torch.Tensor) -> LossParts:
    """tokens (N, P, C), CLS attention A (N, P) (the resampled 28x28 map, flattened), stage-1 weights w (N, P).

    f_i = mean_p(T_i w_i), b_i = mean_p(T_i (1 - w_i));
    L_co = mean_{i<j} dp / (dp + dn), dp = exp(1 - cos(f_i, f_j)), dn = exp(1 - (cos(f_i, b_i) + cos(f_j, b_j)));
    L_sal = 1 - mean_i mean_p(A_i w_i). A group of one image has no pair: L_co = 0 (reference: 0/0).
    """
    n = tokens.shape[0]
    fg = (tokens * weights[..., None]).mean(dim=1)
    bg = (tokens * (1 - weights)[..., None]).mean(dim=1)
    sal = 1 - (cls_attention.reshape(n, -1) * weights).mean(dim=1).mean()
    if n < 2:
        co = sal.new_zeros(())
    else:
        pair_cos = F.cosine_similarity(fg[:, None], fg[None], dim=-1, eps=1e-8)  # (N, N)
        self_cos = F.cosine_similarity(fg, bg, dim=-1, eps=1e-8)  # (N,)
        dp = torch.exp(1 - pair_cos)
        dn = torch.exp(1 - (self_cos[:, None] + self_cos[None]))
        i, j = torch.triu_indices(n, n, offset=1, device=tokens.device)
        co = (dp / (dp + dn))[i, j].mean()
    return LossParts(loss=co + SALIENCY_WEIGHT * sal, co=co, sal=sal)
