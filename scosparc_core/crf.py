"""Dense CRF on the stage-2 mask (pydensecrf semantics, as the paper code calls it).

Two backends compute the same CRF: ``dense_crf`` calls pydensecrf (the reference and the CPU default) on one
image; ``dense_crf_torch`` runs pydensecrf's mean field batched in torch on any device (see
``scosparc_core.permutohedral``). Neither pydensecrf nor torch is imported until used, so CPU workers that only
need one of them load without the other.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from .permutohedral import PermutohedralLattice


@dataclass(frozen=True)
class CRFParams:
    gaussian_sxy: float = 10
    gaussian_compat: float = 10
    bilateral_sxy: float = 10
    bilateral_srgb: float = 3
    bilateral_compat: float = 10
    gt_prob: float = 0.995
    iterations: int = 10

    def __post_init__(self):
        # Checked here so that both backends refuse the same values: pydensecrf asserts 0 < gt_prob < 1 where the
        # torch port would return all background; the widths divide the features.
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not (_real(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"CRFParams.{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("gaussian_compat", "bilateral_compat"):
            if not _real(getattr(self, name)):
                raise ValueError(f"CRFParams.{name} must be a finite number, got {getattr(self, name)!r}")
        if not (_real(self.gt_prob) and 0 < self.gt_prob < 1):
            raise ValueError(f"CRFParams.gt_prob must be in (0, 1), got {self.gt_prob!r}")
        if not (isinstance(self.iterations, (int, np.integer)) and not isinstance(self.iterations, bool)
                and self.iterations >= 0):
            raise ValueError(f"CRFParams.iterations must be an integer >= 0, got {self.iterations!r}")


def _real(value) -> bool:
    """A finite int or float (numpy's too), not a bool."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and math.isfinite(value))


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
    q = np.array(_densecrf(rgb, labels, params).inference(params.iterations)).reshape(2, h, w)
    return np.argmax(q, axis=0).astype(np.uint8)


def dense_crf_q(rgb: np.ndarray, labels: np.ndarray, params: CRFParams) -> np.ndarray:
    """pydensecrf's Q after each mean-field step, (iterations+1, 2, H, W) float32, set up as ``dense_crf`` sets it
    up: the reference the torch port is checked against."""
    h, w = labels.shape
    crf = _densecrf(rgb, labels, params)
    q, tmp1, tmp2 = crf.startInference()
    out = [np.array(q).reshape(2, h, w)]
    for _ in range(params.iterations):
        crf.stepInference(q, tmp1, tmp2)
        out.append(np.array(q).reshape(2, h, w))
    return np.stack(out).astype(np.float32)


def _densecrf(rgb: np.ndarray, labels: np.ndarray, params: CRFParams):
    """The paper code's pydensecrf model: unary from the 0/1 labels, a Gaussian and a bilateral kernel."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    h, w = labels.shape
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(unary_from_labels(labels.astype(np.int64).ravel(), 2, params.gt_prob, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat, kernel=dcrf.DIAG_KERNEL,
                            normalization=dcrf.NORMALIZE_SYMMETRIC)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             # a writable copy: pydensecrf rejects read-only buffers
                             rgbim=np.array(rgb, dtype=np.uint8, order="C"), compat=params.bilateral_compat,
                             kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    return crf


def unary_energies(gt_prob: float) -> tuple[float, float]:
    """(energy of the given label, energy of the other label), float32, as ``unary_from_labels`` makes them."""
    return float(np.float32(-np.log(gt_prob))), float(np.float32(-np.log(1.0 - gt_prob)))


@dataclass(frozen=True)
class _Kernel:
    """One pairwise kernel: its lattice and its symmetric normalisation s = 1/sqrt(filter(1) + 1e-20), (P, 1)."""

    lattice: PermutohedralLattice
    s: torch.Tensor

    @classmethod
    def build(cls, features: torch.Tensor, groups: int = 1) -> _Kernel:
        import torch

        from .permutohedral import build_lattice

        lattice = build_lattice(features, groups)
        norm = lattice.filter(torch.ones(lattice.num_points, 1, device=lattice.device))
        s = (1.0 / torch.sqrt(norm.double() + 1e-20)).float()  # in double, as the C++ does
        return cls(lattice, s)


@functools.lru_cache(maxsize=8)
def _gaussian_kernel(height: int, width: int, sxy: float, device: str) -> _Kernel:
    """The Gaussian kernel over (x/sxy, y/sxy): the same for every image of a size, so built once."""
    import torch

    return _Kernel.build(_positions(height, width, sxy, torch.device(device)))


def _positions(height: int, width: int, sxy: float, device: torch.device) -> torch.Tensor:
    """(H*W, 2) float32 (x/sxy, y/sxy) in row-major pixel order; true division (not x·(1/sxy)), as in the C++."""
    import torch

    s = torch.tensor(sxy, dtype=torch.float32, device=device)
    x = torch.arange(width, dtype=torch.float32, device=device) / s
    y = torch.arange(height, dtype=torch.float32, device=device) / s
    return torch.stack([x[None, :].expand(height, -1), y[:, None].expand(-1, width)], dim=-1).reshape(-1, 2)


def _bilateral_kernel(rgb: torch.Tensor, sxy: float, srgb: float) -> _Kernel:
    """The bilateral kernel over (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) of a batch: one lattice, one group per
    image, points image-major."""
    import torch

    batch, height, width, _ = rgb.shape
    n = height * width
    positions = _positions(height, width, sxy, rgb.device).expand(batch, n, 2)
    colours = rgb.reshape(batch, n, 3).float() / torch.tensor(srgb, dtype=torch.float32, device=rgb.device)
    return _Kernel.build(torch.cat([positions, colours], dim=2).reshape(batch * n, 5), groups=batch)


def _exp_normalize(t: torch.Tensor) -> torch.Tensor:
    """(..., 2) -> Q (..., 2) as expAndNormalize computes it: exp(t - max), divided by the sum of the two."""
    import torch

    delta = t[..., 1] - t[..., 0]
    e = _expf(-delta.abs())  # exp(min - max); exp(max - max) = 1
    big = 1.0 / (1.0 + e)
    small = e / (1.0 + e)
    ahead = (delta > 0)[..., None]
    return torch.where(ahead, torch.stack([small, big], dim=-1), torch.stack([big, small], dim=-1))


# glibc's expf (what Eigen's exp calls in pydensecrf): e^x = 2^(k/32)·2^(r/32), k = round(x·32/ln 2), a table
# of 2^(i/32) and a cubic in r, all in double, then rounded to float. Its results differ from a correctly
# rounded exp (and from torch.exp) in the last bit for ~1% of inputs, which mean field amplifies; with it the
# torch CRF reproduces pydensecrf's Q to the bit on the CPU. Valid for x in [-87, 0] (we never leave it).
_EXPF_N = 32
_EXPF_INV_LN2_N = float.fromhex("0x1.71547652b82fep+0") * _EXPF_N
_EXPF_POLY = (float.fromhex("0x1.c6af84b912394p-5") / _EXPF_N**3, float.fromhex("0x1.ebfce50fac4f3p-3") / _EXPF_N**2,
              float.fromhex("0x1.62e42ff0c52d6p-1") / _EXPF_N)


@functools.lru_cache(maxsize=8)
def _expf_table(device: str) -> torch.Tensor:
    """The bits of 2^(i/32), i < 32, correctly rounded to double, as int64."""
    import torch
    from decimal import Decimal, localcontext

    with localcontext() as ctx:
        ctx.prec = 60
        values = [float(Decimal(2) ** (Decimal(i) / _EXPF_N)) for i in range(_EXPF_N)]
    return torch.tensor(values, dtype=torch.float64, device=device).view(torch.int64)


def _expf(x: torch.Tensor) -> torch.Tensor:
    """float32 x (<= 0, > -87) -> float32 exp(x), bit for bit glibc's expf."""
    import torch

    z = x.double() * _EXPF_INV_LN2_N
    kd = torch.round(z)  # ties to even, like the C's z + 0x1.8p52
    r = z - kd
    k = kd.long()
    i = torch.remainder(k, _EXPF_N)
    scale = (_expf_table(str(x.device))[i] + (k - i) * (1 << (52 - 5))).view(torch.float64)  # 2^(k/32)
    c0, c1, c2 = _EXPF_POLY
    y = (r * c0 + c1) * (r * r) + (r * c2 + 1.0)
    return (y * scale).float()


def crf_mean_field(rgb: torch.Tensor, labels: torch.Tensor, params: CRFParams,
                   iterations: int | None = None) -> Iterator[torch.Tensor]:
    """Yields Q (B, 2, H, W) float32 before the first mean-field iteration and after each one.

    Inputs as for ``dense_crf_torch``. Q after k iterations is pydensecrf's after ``stepInference`` k times.
    """
    batch, height, width = labels.shape
    for q in _mean_field(rgb, labels, params, iterations):
        yield q.transpose(1, 2).reshape(batch, 2, height, width)


def dense_crf_torch(rgb: torch.Tensor, labels: torch.Tensor, params: CRFParams,
                    iterations: int | None = None) -> torch.Tensor:
    """A batch of images at once: rgb (B, H, W, 3) uint8 and 0/1 labels (B, H, W) uint8/bool, on any device
    -> the CRF's argmax labels (B, H, W) uint8 0/1 on the labels' device: ``dense_crf`` for a whole batch.

    pydensecrf's mean field, step by step in float32 (``scosparc_core.permutohedral`` holds the lattice): the
    unary of ``unary_from_labels(labels, 2, gt_prob, zero_unsure=False)``; the Gaussian kernel on
    (x/sxy, y/sxy) and the bilateral one on (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb), each with symmetric
    normalisation s·K(s·Q) and Potts compatibility; ``iterations`` (default ``params.iterations``) steps;
    argmax, ties to label 0. Every operation is the C++'s, in its order and precision (glibc's expf
    included), so Q is pydensecrf's to the bit: measured on CPU and on CUDA (H200, 206 images).

    On CUDA with Triton, the lattice steps and the mean-field step run as fused kernels (same arithmetic).
    The Gaussian lattice depends only on (H, W, sxy, device) and is built once; the bilateral lattice is built
    per call, one for the whole batch. CUDA memory at 224x224, measured for batches of 64-512: peak ~23 MB
    per image over what is allocated before the call (a batch of 256: ~6 GB), of which the bilateral lattice
    holds ~12 MB per image during the iterations. (Speed: benchmarks/bench_crf.py.)
    """
    import torch

    batch, height, width = labels.shape
    q = None
    for q in _mean_field(rgb, labels, params, iterations):
        pass
    # Eigen's maxCoeff keeps the first maximum: label 1 only when strictly larger.
    return (q[..., 1] > q[..., 0]).to(torch.uint8).view(batch, height, width)


def _mean_field(rgb: torch.Tensor, labels: torch.Tensor, params: CRFParams,
                iterations: int | None) -> Iterator[torch.Tensor]:
    """Yields Q (B, H*W, 2) float32 before the first iteration and after each one."""
    import torch

    from .permutohedral import _use_triton

    if labels.dim() != 3 or tuple(rgb.shape) != (*labels.shape, 3) or rgb.dtype != torch.uint8:
        raise ValueError(f"expected rgb (B, H, W, 3) uint8 and labels (B, H, W), got {tuple(rgb.shape)} "
                         f"{rgb.dtype} and {tuple(labels.shape)}")
    iterations = params.iterations if iterations is None else iterations
    device = labels.device
    batch, height, width = labels.shape
    n = height * width
    if batch == 0:  # e.g. every image of a group fell back to its stage-1 map
        for _ in range(iterations + 1):
            yield torch.zeros(0, n, 2, device=device)
        return

    gauss = _gaussian_kernel(height, width, float(params.gaussian_sxy), str(device))
    bilateral = _bilateral_kernel(rgb.to(device), float(params.bilateral_sxy), float(params.bilateral_srgb))
    s_gauss = gauss.s[:, 0]  # (N,), the same for every image
    s_bilateral = bilateral.s.view(batch, n)
    w_gauss = float(np.float32(params.gaussian_compat))
    w_bilateral = float(np.float32(params.bilateral_compat))

    # -U from unary_from_labels: the given label's energy on its channel.
    given, other = unary_energies(params.gt_prob)
    fg = labels.reshape(batch, n).bool()
    minus_u = torch.where(fg[:, :, None] == torch.tensor([False, True], device=device), -given, -other)
    q = _exp_normalize(minus_u)  # (B, N, 2)
    values_gauss, values_bilateral = _kernel_inputs(q, s_gauss, s_bilateral)
    yield q
    fused = _use_triton(q)
    for _ in range(iterations):
        # Each kernel's message s·K(s·Q), then Potts: tmp1 = -U - (-w_g·gauss) - (-w_b·bilateral), in that order.
        filtered_gauss = gauss.lattice.filter(values_gauss)
        filtered_bilateral = bilateral.lattice.filter(values_bilateral)
        if fused:
            q, values_gauss, values_bilateral = _fused_step(filtered_gauss, filtered_bilateral, s_gauss,
                                                            s_bilateral, fg, given, other, w_gauss, w_bilateral)
        else:
            m_gauss = filtered_gauss.view(n, batch, 2).transpose(0, 1) * s_gauss[None, :, None]
            m_bilateral = filtered_bilateral.view(batch, n, 2) * s_bilateral[:, :, None]
            q = _exp_normalize(minus_u - m_gauss * -w_gauss - m_bilateral * -w_bilateral)
            values_gauss, values_bilateral = _kernel_inputs(q, s_gauss, s_bilateral)
        yield q


def _kernel_inputs(q: torch.Tensor, s_gauss: torch.Tensor, s_bilateral: torch.Tensor):
    """Q (B, N, 2) -> s·Q for each kernel, in its layout: (N, B·2) for the Gaussian lattice (one per size, the
    images as channels), (B·N, 2) for the bilateral one."""
    batch, n, _ = q.shape
    values_gauss = (q * s_gauss[None, :, None]).transpose(0, 1).reshape(n, batch * 2)
    return values_gauss, (q * s_bilateral[:, :, None]).view(batch * n, 2)


def _fused_step(filtered_gauss, filtered_bilateral, s_gauss, s_bilateral, fg, given, other, w_gauss, w_bilateral):
    """One Triton kernel for everything between two filterings (the torch branch above, to the bit): the
    messages, Potts, expAndNormalize with glibc's expf, and the next inputs of both lattices."""
    import torch

    from .crf_kernels import mean_field_step_kernel, triton

    batch, n = s_bilateral.shape
    q = torch.empty(batch, n, 2, dtype=torch.float32, device=fg.device)
    values_gauss = torch.empty(n, batch * 2, dtype=torch.float32, device=fg.device)
    values_bilateral = torch.empty(batch * n, 2, dtype=torch.float32, device=fg.device)
    block = 512
    mean_field_step_kernel[(triton.cdiv(batch * n, block),)](
        filtered_gauss, filtered_bilateral, s_gauss, s_bilateral, fg, q, values_gauss, values_bilateral,
        _expf_constants(str(fg.device)), _expf_table(str(fg.device)), n, batch, -given, -other, -w_gauss,
        -w_bilateral, BLOCK=block, enable_fp_fusion=False)
    return q, values_gauss, values_bilateral


@functools.lru_cache(maxsize=8)
def _expf_constants(device: str) -> torch.Tensor:
    """glibc expf's double constants (a kernel argument: Triton would round literals to float32)."""
    import torch

    return torch.tensor([_EXPF_INV_LN2_N, *_EXPF_POLY, 1.0, float.fromhex("0x1.8p52")], dtype=torch.float64, device=device)

