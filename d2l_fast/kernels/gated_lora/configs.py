"""Deterministic launch configurations of the gated-activation + LoRA-shrink kernel and of the expand.

Pure functions of the problem sizes and the device kind (no autotune), like ``segmented_lora/configs.py``. Every
block dim used by ``tl.dot`` is >= 16 (GPU requirement), even at rank 8 (the rank dim is masked).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._common import interpreting
from ..segmented_lora.configs import KernelConfig

__all__ = ["ShrinkConfig", "pick_shrink_config", "pick_expand_config", "MAX_FUSED_RANK", "SPLIT_CAP"]

#: the largest adapter rank the fused kernel holds in one accumulator (``BLOCK_R``); a batch with a larger rank
#: computes act(gate)·up in the same kernel without the shrink, then shrinks with segmented_lora's kernel
MAX_FUSED_RANK = 128
#: at most this many K slices: the expand re-reads every slice's fp32 partials once per output block
SPLIT_CAP = 4


@dataclass(frozen=True)
class ShrinkConfig:
    BLOCK_M: int  # tokens per tile (tiles never straddle a run of one adapter)
    BLOCK_K: int  # intermediate columns per loop step
    BLOCK_R: int  # rank columns of the accumulator (>= the batch's max rank)
    SPLIT_K: int  # slices of the intermediate dim, one program each (fp32 partials summed by the expand)
    num_warps: int = 4
    num_stages: int = 2


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _block_m(max_seqlen: int, interpret: bool) -> int:
    if interpret:
        return _pow2_at_least(max_seqlen, 16, 64)
    return 16 if max_seqlen <= 16 else (32 if max_seqlen <= 32 else 64)


def pick_shrink_config(n_tokens: int, max_seqlen: int, max_rank: int, d_ff: int, interpret: bool | None = None,
                       n_sms: int = 132) -> ShrinkConfig:  # fmt: skip
    """Blocks of the fused kernel for ``n_tokens`` rows of width ``d_ff`` (the MLP's intermediate size).

    GPU rules: ``BLOCK_M`` 16/32/64 by the longest segment (a tile holds one run of one adapter), ``BLOCK_K`` 32,
    ``BLOCK_R`` the next power of two >= the max rank (16..128), 8 warps and 3 stages at 64-row tiles (sm_90
    compile: 100 registers, 40 KB shared memory, so two programs fit per SM; ``BLOCK_K`` 64 needs 139 registers,
    one program per SM); the intermediate dim is split into ``SPLIT_K`` slices until row tiles x slices reach ~4
    programs per SM (the kernel is bandwidth-bound: it streams gate and up once and writes h once), at most
    :data:`SPLIT_CAP` slices and >= 4 ``BLOCK_K`` steps per slice.
    Under the interpreter: large blocks and 2 slices whenever ``d_ff`` allows (so split-K is exercised).
    """
    if interpret is None:
        interpret = interpreting()
    bm = _block_m(max_seqlen, interpret)
    br = _pow2_at_least(max_rank, 16, MAX_FUSED_RANK)
    if interpret:
        bk = _pow2_at_least(-(-d_ff // 4), 16, 128)  # >= 2 K steps per slice when d_ff allows
        return ShrinkConfig(bm, bk, br, 2 if d_ff > 2 * bk else 1, num_warps=4)
    bk = 32
    row_tiles = max(1, -(-n_tokens // bm))
    max_split = max(1, d_ff // (4 * bk))
    split = min(SPLIT_CAP, max_split, max(1, -(-4 * n_sms // row_tiles)))
    warps = 8 if bm * br >= 4096 else 4
    return ShrinkConfig(bm, bk, br, split, num_warps=warps, num_stages=3)


def pick_expand_config(n_tokens: int, max_seqlen: int, max_rank: int, d_model: int, interpret: bool | None = None,
                       n_sms: int = 132) -> KernelConfig:  # fmt: skip
    """Config of segmented_lora's ``_lora_expand_kernel`` (``y += (Σ_s partials_s) · B``, one read and one write of
    y): ``BLOCK_M`` as the shrink's, ``BLOCK_R`` 16 (the kernel loops over rank blocks; at 64-row tiles x 128
    columns, 8 warps, sm_90: 106 registers, two programs per SM, where ``BLOCK_R`` 32 needs 130 and 64 needs 213),
    ``BLOCK_N`` 128 (narrower when the grid would not cover the SMs twice)."""
    if interpret is None:
        interpret = interpreting()
    bm = _block_m(max_seqlen, interpret)
    if interpret:
        return KernelConfig("two_pass", bm, _pow2_at_least(d_model, 16, 128), 16,
                            _pow2_at_least(max_rank, 16, 128))  # fmt: skip
    br = 16
    bn = 128
    row_tiles = max(1, -(-n_tokens // bm))
    while bn > 32 and row_tiles * -(-d_model // bn) < 2 * n_sms:
        bn //= 2
    warps = 8 if bm * bn >= 8192 else 4
    return KernelConfig("two_pass", bm, bn, 64, br, num_warps=warps)
