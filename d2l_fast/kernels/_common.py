"""Small helpers shared by the kernel packages: interpreter detection, the fp32 input-precision rule, and
the device facts that launch configurations depend on. No Triton import here (Triton is optional)."""

from __future__ import annotations

import functools
import os
import warnings

import torch

__all__ = ["interpreting", "cdiv", "input_precision", "sm_count"]


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32 (``torch.backends.cuda.matmul.allow_tf32 = True``,
    ``torch.set_float32_matmul_precision("high")`` or ``fp32_precision = "tf32"``)."""
    if torch.get_float32_matmul_precision() != "highest":
        return True
    if getattr(torch.backends.cuda.matmul, "fp32_precision", None) == "tf32":
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some torch versions deprecate allow_tf32 in favour of fp32_precision
        return bool(torch.backends.cuda.matmul.allow_tf32)


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype``: fp32 uses TF32 tensor cores when torch allows
    TF32 for its own matmuls, else exact ``ieee`` FMA; fp16/bf16 ignore it."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached); 132 (an H100) for CPU tensors, e.g. under the interpreter."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
