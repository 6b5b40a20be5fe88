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


class Launcher:
    """Launches one ``@triton.jit`` kernel, reusing the compiled binary of an earlier launch with the same
    arguments apart from tensor addresses (same dtypes, 16-byte alignment, int values, constexprs, warps, stages
    and device) and float values (never specialized).

    Triton's own launch path re-binds and re-specializes every argument and builds a cache key string on every
    call (tens of microseconds of host time for a ~20-argument kernel, as much as the kernel itself at decode).
    The first launch of each such key goes through Triton (compiling if needed) and returns the compiled
    kernel; later launches call it directly with every argument in parameter order. The key is finer than
    Triton's specialization (exact ints rather than their divisibility), so a reused binary is always the one
    Triton would pick. Under the interpreter, with ``D2L_FAST_LAUNCH=0``, or if a direct call ever fails
    (another Triton version), every launch takes Triton's normal path.
    """

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict = {}
        self._names = None
        self._layout = None  # (tensor positions, int positions) of the call site's arguments
        self.enabled = os.environ.get("D2L_FAST_LAUNCH", "1") not in ("0", "")

    def _key(self, args, constexprs, num_warps, num_stages):
        layout = self._layout
        if layout is None or len(layout[2]) != len(args):
            kinds = tuple("t" if isinstance(a, torch.Tensor) else ("f" if isinstance(a, float) else "o") for a in args)
            tpos = tuple(i for i, k in enumerate(kinds) if k == "t")
            opos = tuple(i for i, k in enumerate(kinds) if k == "o")
            layout = self._layout = (tpos, opos, kinds)
        tpos, opos, kinds = layout
        try:
            tensors = tuple((args[i].dtype, args[i].data_ptr() & 15, args[i].get_device()) for i in tpos)
        except AttributeError:  # a call site changed argument kinds: recompute the layout next time
            self._layout = None
            return None
        return (tensors, tuple(args[i] for i in opos), tuple(constexprs.values()), num_warps, num_stages)

    def __call__(self, grid, args: tuple, constexprs: dict, num_warps: int = 4, num_stages: int = 2):
        if not self.enabled or interpreting():
            return self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        key = self._key(args, constexprs, num_warps, num_stages)
        ck = self._compiled.get(key) if key is not None else None
        if ck is not None:
            try:
                g3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
                return ck[g3](*args, *constexprs.values())
            except Exception:  # noqa: BLE001
                # Triton's own path decides: if it raises too, the arguments were bad (re-raised below, the fast
                # path stays on); if it works, this Triton's compiled-kernel API differs: fall back for good
                out = self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
                self.enabled = False
                self._compiled.clear()
                return out
        ck = self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if key is not None and self.enabled and ck is not None and hasattr(ck, "__getitem__"):
            names = list(getattr(self.fn, "arg_names", ()))
            if names[len(args):] == list(constexprs):  # constexprs given in parameter order, after the others
                self._compiled[key] = ck
        return ck
