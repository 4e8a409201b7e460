"""The number format the backbone runs in, per device.

float32 on the CPU is the paper code's arithmetic and the reference. On CUDA, ``auto`` is meant to be the fastest
format whose masks stay at mean IoU >= 0.995 and min IoU >= 0.98 against CPU float32 on real photos. Measured on
an H100 and an H200 (README, "Precision on GPUs"; ``benchmarks/bench_precision.py``), no reduced format came near,
and float32 itself missed the min IoU (0.976: CUDA's other summation order flips a few pixels of a small mask).
Only the backbone changes format: the stage-1 head, the threshold, the region filter and the CRF run in float32 -
except that TF32 is torch's process-wide matmul setting, so with ``tf32`` another thread's stage-1 matmuls may
use it while a backbone forward runs.

``float64`` goes the other way: the backbone's weights and arithmetic in float64, its tokens rounded to float32.
Its masks differ from CPU float32 only by that reference's own rounding, not by a second one: on the CPU its masks
equal float32's on all 79 real photos, and GPU float64 rounds to the CPU's float64 tokens but, rarely, in their
last bit, far below the noise that flips a pixel (``benchmarks/bench_noise.py``). So
``auto`` picks it on CUDA cards whose float64 units run at about their float32 rate (``FAST_FLOAT64``); on the
others (most cards: 1/32 to 1/64 of float32) it stays float32. Its masks and speed on a GPU are still to be
measured (``benchmarks/gpu_check.sh``).
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable

import torch

PRECISIONS = ("auto", "float32", "tf32", "float16", "bfloat16", "float64")
# auto per device kind; on CUDA float64 instead where every card of the run has fast float64 (FAST_FLOAT64)
AUTO = {"cpu": "float32", "cuda": "float32"}
# Cards with float64 at about their float32 rate (TFLOP/s, float64 with tensor cores / float32: A100 19.5 / 19.5,
# H100 67 / 67, H200 67 / 67), as torch names them ("NVIDIA H100 80GB HBM3") or Ray's accelerator types ("H100",
# "A100-80G"). Not H20, GH200 or the B-series: unmeasured or slow float64.
FAST_FLOAT64 = re.compile(r"(?<![A-Za-z0-9])(A100|H100|H200)(?![0-9])")
_AUTOCAST = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def backbone_dtype(precision: str) -> torch.dtype:
    """The dtype of the backbone's weights for a resolved precision name: float64 for ``float64``, else float32
    (the reduced formats are autocast over float32 weights)."""
    return torch.float64 if precision == "float64" else torch.float32


def resolve(precision: str | torch.dtype, device: str | torch.device, accelerators: Iterable[str] | None = None
            ) -> str:
    """``auto`` (or a name, or a torch dtype) on ``device`` -> the concrete format's name.

    ``accelerators``: the names of the cards the backbone will run on (torch device names or Ray accelerator
    types); ``auto`` on CUDA is ``float64`` when there is at least one and all have fast float64
    (``FAST_FLOAT64``), else ``float32``. None: the card of ``device`` when this process sees CUDA, else none.
    A resolved name is what a run records: a GPU run resumed on a CPU must not silently mix formats.
    """
    if isinstance(precision, torch.dtype):
        precision = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                     torch.float64: "float64"}[precision]
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "auto":
        if kind != "cuda":
            return AUTO.get(kind, "float32")
        if accelerators is None:
            accelerators = [torch.cuda.get_device_name(device)] if torch.cuda.is_available() else []
        names = list(accelerators)
        return "float64" if names and all(FAST_FLOAT64.search(n) for n in names) else AUTO["cuda"]
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
