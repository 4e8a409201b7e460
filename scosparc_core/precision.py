"""The number format the backbone runs in, per device.

float32 on the CPU is the paper code's arithmetic and the reference, and ``auto`` is float32 on CUDA too: on an
H100 and an H200 (README, "Precision on GPUs"; ``benchmarks/bench_precision.py``) no format came nearer CPU
float32's masks on real photos (mean IoU 0.9997; 3 pixels of 4 M differ before the CRF, one of which the CRF
grows to 6 on a photo whose mask has 244: min IoU 0.976). The reduced formats changed far more. ``float64`` (the
backbone's weights and arithmetic in float64, its tokens rounded to float32) differed in 1 pixel before the CRF,
the same one, and gave the same final masks as CUDA float32, at half its rate on an H100, so it is an explicit
choice only.
Only the backbone changes format: the stage-1 head, the threshold, the region filter and the CRF run in float32 -
except that TF32 is torch's process-wide matmul setting, so with ``tf32`` another thread's stage-1 matmuls may
use it while a backbone forward runs.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "float32", "tf32", "float16", "bfloat16", "float64")
AUTO = {"cpu": "float32", "cuda": "float32"}  # auto per device kind
_AUTOCAST = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def backbone_dtype(precision: str) -> torch.dtype:
    """The dtype of the backbone's weights for a resolved precision name: float64 for ``float64``, else float32
    (the reduced formats are autocast over float32 weights)."""
    return torch.float64 if precision == "float64" else torch.float32


def resolve(precision: str | torch.dtype, device: str | torch.device) -> str:
    """``auto`` (or a name, or a torch dtype) on ``device`` -> the concrete format's name. A resolved name is what
    a run records: a GPU run resumed on a CPU must not silently mix formats."""
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
