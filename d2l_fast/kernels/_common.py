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


def _arg_key(a):
    """What Triton specializes a launch argument on: dtype and 16-byte alignment of tensors; ints equal to 1,
    divisible by 16 and fitting int32; other values as they are."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return (a == 1, a % 16 == 0, -(2**31) <= a < 2**31)
    if isinstance(a, float):
        return float
    return a


class Launcher:
    """Launches one ``@triton.jit`` kernel, reusing the compiled binary of an earlier launch with the same
    specialization (argument dtypes, alignment, int properties, constexprs, warps, stages, device).

    Triton's own launch path re-binds and re-specializes every argument and builds a cache key string on every
    call (tens of microseconds of host time for a ~20-argument kernel, more than the kernel itself at decode).
    The first launch of each specialization goes through Triton (compiling if needed) and returns the compiled
    kernel; later launches call it directly with every argument in parameter order. Under the interpreter,
    with ``D2L_FAST_LAUNCH=0``, or if the direct call ever fails (another Triton version), every launch takes
    Triton's normal path.
    """

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict = {}
        self._names = None
        self.enabled = os.environ.get("D2L_FAST_LAUNCH", "1") not in ("0", "")

    def __call__(self, grid, args: tuple, constexprs: dict, num_warps: int = 4, num_stages: int = 2):
        if not self.enabled or interpreting():
            return self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        key = (tuple(_arg_key(a) for a in args), tuple(constexprs.items()), num_warps, num_stages,
               args[0].device.index if isinstance(args[0], torch.Tensor) else None)
        ck = self._compiled.get(key)
        if ck is not None:
            try:
                g3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
                return ck[g3](*args, *(constexprs[n] for n in self._names[len(args):]))
            except Exception:  # noqa: BLE001  (an unexpected Triton API: fall back for good)
                self.enabled = False
                self._compiled.clear()
        ck = self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if self.enabled and ck is not None and hasattr(ck, "__getitem__") and hasattr(self.fn, "arg_names"):
            names = list(self.fn.arg_names)
            if len(names) == len(args) + len(constexprs) and all(n in constexprs for n in names[len(args):]):
                self._names = names
                self._compiled[key] = ck
        return ck
