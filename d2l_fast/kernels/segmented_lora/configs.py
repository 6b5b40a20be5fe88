"""Deterministic launch configurations for the segmented LoRA Triton kernels.

``pick_config`` is a pure function of the problem sizes and the device kind: no import-time autotune,
no first-call tuning stall, the same choice on every run. All block dims used by ``tl.dot`` are >= 16
(GPU requirement), even when the rank is 8 (the rank dim is masked).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["KernelConfig", "pick_config", "interpreting"]


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class KernelConfig:
    variant: str  # "fused" | "two_pass" | "decode"
    BLOCK_M: int  # tokens per tile (fused / two_pass / wgrad)
    BLOCK_N: int  # output features per program
    BLOCK_K: int  # input-feature step of the shrink loop
    BLOCK_R: int  # rank step
    num_warps: int = 4
    num_stages: int = 2


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def pick_config(
    n_tokens: int,
    max_seqlen: int,
    max_rank: int,
    d_in: int,
    d_out: int,
    interpret: bool | None = None,
) -> KernelConfig:
    """Choose the kernel variant and its block sizes.

    Rules (GPU):
      * ``max_seqlen == 1`` (decode, one row per segment): the ``decode`` GEMV kernel (no tensor cores
        needed, no row padding to 16);
      * otherwise ``fused`` (shrink recomputed per output tile, one launch, no h buffer) when the output
        has at most 2 ``BLOCK_N`` tiles or the batch is small (<= 256 tokens), else ``two_pass``
        (shrink kernel writes an fp32 ``h[T, max_rank]``, expand kernel reads it), which avoids
        recomputing the shrink ``cdiv(d_out, BLOCK_N)`` times.
    Under the interpreter: the same variants with large blocks (the interpreter pays per program and per
    loop iteration, not per element).
    """
    if interpret is None:
        interpret = interpreting()
    block_r = _pow2_at_least(max_rank, 16, 128 if interpret else 64)
    if interpret:
        block_m = _pow2_at_least(max_seqlen, 16, 64)
        block_n = _pow2_at_least(d_out, 16, 128)
        block_k = _pow2_at_least(d_in, 16, 128)
    else:
        block_m = 16 if max_seqlen <= 16 else (32 if max_seqlen <= 32 else 64)
        block_n = 128
        block_k = 64
    if max_seqlen <= 1:
        return KernelConfig(
            "decode",
            BLOCK_M=16,
            BLOCK_N=_pow2_at_least(d_out, 16, 128 if interpret else 256),
            BLOCK_K=_pow2_at_least(d_in, 16, 128 if interpret else 256),
            BLOCK_R=_pow2_at_least(max_rank, 16, 128 if interpret else 32),
            num_warps=4,
        )
    n_out_tiles = -(-d_out // block_n)
    variant = "fused" if (n_out_tiles <= 2 or n_tokens <= 256) else "two_pass"
    # a 64x128 fp32 accumulator plus the h tile needs 8 warps to stay in registers
    num_warps = 8 if (not interpret and block_m * block_n >= 8192) else 4
    return KernelConfig(
        variant, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=num_warps
    )
