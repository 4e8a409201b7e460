"""The number format the backbone runs in, per device.

float32 on the CPU is the paper code's arithmetic and the reference. On CUDA, ``auto`` is meant to be the fastest
format whose masks stay at mean IoU >= 0.995 and min IoU >= 0.98 against CPU float32 on real photos; measured on
an H200 (README, "Precision on GPUs"; ``benchmarks/bench_precision.py``), no reduced format came near, so it is
float32 (whose own min IoU there, 0.976, comes from CUDA's other summation order). Only the backbone changes format: the stage-1 head, the
threshold, the region filter and the CRF run in float32 - except that TF32 is torch's process-wide matmul
setting, so with ``tf32`` another thread's stage-1 matmuls may use it while a backbone forward runs.

``float64`` goes the other way: the backbone's weights and arithmetic in float64, its tokens rounded to float32.
Its masks differ from CPU float32 only by that reference's own rounding, not by a second one: on the CPU its masks
equal float32's on all 79 real photos (``bench_precision.py --device cpu --formats float64``). On a GPU neither
its masks nor its speed are measured yet; the speed depends on the card's float64 units (H100/H200: about their
float32 rate; most other cards: a small fraction), so it is an explicit choice until measured.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "float32", "tf32", "float16", "bfloat16", "float64")
# Measured on an H200 (README, "Precision on GPUs"): no reduced format kept min IoU >= 0.98 on the real photos
# (float16: mean 0.996, min 0.927; bfloat16: 0.936 / 0.50), so CUDA defaults to float32; float16 is the
# explicit choice for throughput (7.5x the float32 rate there).
AUTO = {"cpu": "float32", "cuda": "float32"}
_AUTOCAST = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def backbone_dtype(precision: str) -> torch.dtype:
    """The dtype of the backbone's weights for a resolved precision name: float64 for ``float64``, else float32
    (the reduced formats are autocast over float32 weights)."""
    return torch.float64 if precision == "float64" else torch.float32


def resolve(precision: str | torch.dtype, device: str | torch.device) -> str:
    """``auto`` (or a name, or a torch dtype) on ``device`` -> the concrete format's name.

    A resolved name is what a run records: a GPU run resumed on a CPU must not silently mix formats.
    """
    if isinstance(precision, torch.dtype):
        precision = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                     torch.float64: "float64"}[precision]
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "auto":
        return AUTO.get(kind, "float32")
    if precision == "tf32" and kind != "cuda":
        return "float32"  # TF32 is a tensor-core format; elsewhere it is plain float32
    return precision


@contextlib.contextmanager
def backbone_precision(precision: str, device: str | torch.device):
    """Runs the enclosed backbone forward in ``precision`` (a resolved name) on ``device``."""
    kind = torch.device(device).type
    if precision in _AUTOCAST:
        with torch.autocast(device_type=kind, dtype=_AUTOCAST[precision]):
            yield
    elif precision == "tf32" and kind == "cuda":
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
    elif precision == "float32" and kind == "cuda":
        # float32 means float32: cuDNN would run the patch-embedding convolution in TF32 by default
        before = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = before
    else:
        yield
