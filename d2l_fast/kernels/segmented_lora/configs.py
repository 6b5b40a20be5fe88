"""Deterministic launch configurations for the segmented LoRA Triton kernels.

``pick_config`` is a pure function of the problem sizes and the device kind: no import-time autotune,
no first-call tuning stall, the same choice on every run. All block dims used by ``tl.dot`` are >= 16
(GPU requirement), even when the rank is 8 (the rank dim is masked).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._common import interpreting

__all__ = ["KernelConfig", "pick_config", "interpreting"]


@dataclass(frozen=True)
class KernelConfig:
    variant: str  # "fused" | "two_pass" | "decode"
    BLOCK_M: int  # tokens per tile (fused / two_pass / wgrad)
    BLOCK_N: int  # output features per program
    BLOCK_K: int  # input-feature step of the shrink loop
    BLOCK_R: int  # rank step
    num_warps: int = 4
    num_stages: int = 2
    SPLIT_K: int = 1  # decode: slices of d_in whose partial shrinks the expand kernel sums (fixed order)


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
    n_sms: int = 132,
) -> KernelConfig:
    """Choose the kernel variant and its block sizes.

    Rules (GPU; ``n_sms`` is the device's multiprocessor count, 132 on an H100):
      * ``max_seqlen == 1`` (decode, one row per segment): the ``decode`` pair of GEMV kernels (no tensor
        cores needed, no row padding to 16). The shrink reads each row's ``A`` exactly once, split over
        ``d_in`` into ``SPLIT_K`` slices so that rows x rank blocks x slices fills ~4 programs per SM; the
        expand sums the slices and reads ``B`` once per row, with ``BLOCK_N`` shrunk until the grid has
        ~2 programs per SM (few rows, e.g. one long document);
      * otherwise ``fused`` (shrink recomputed per output tile, one launch, no h buffer) when the rank is
        <= 64 and the output has at most 2 ``BLOCK_N`` tiles or the batch is small (<= 128 tokens), else
        ``two_pass`` (shrink kernel writes fp32 ``h[SPLIT_K, T, max_rank]`` partials, expand kernel sums and
        reads them), which avoids recomputing the shrink ``cdiv(d_out, BLOCK_N)`` times; its shrink is split
        over ``d_in`` (``SPLIT_K``) until the grid has ~2 programs per SM.
    Under the interpreter: the same variants with large blocks (the interpreter pays per program and per
    loop iteration, not per element).
    """
    if interpret is None:
        interpret = interpreting()
    block_r = _pow2_at_least(max_rank, 16, 128 if interpret else 64)
    if interpret:
        block_m = _pow2_at_least(max_seqlen, 16, 64)
        block_n = _pow2_at_least(d_out, 16, 128)
        block_k = _pow2_at_least(-(-d_in // 2), 16, 128)  # >= 2 K steps: multi-step loops and split-K are tested
    else:
        block_m = 16 if max_seqlen <= 16 else (32 if max_seqlen <= 32 else 64)
        block_n = 128
        block_k = 64
    if max_seqlen <= 1:
        if interpret:  # big blocks, but still >= 2 K slices when d_in > 64 so the split path is exercised
            bk = _pow2_at_least(-(-d_in // 2), 16, 64)
            bn, br = _pow2_at_least(d_out, 16, 128), _pow2_at_least(max_rank, 16, 128)
        else:
            bk, br = _pow2_at_least(d_in, 16, 256), (16 if max_rank <= 16 else 32)
            bn = 256
            while bn > 32 and n_tokens * -(-d_out // bn) < 2 * n_sms:
                bn //= 2
        programs = max(1, n_tokens) * max(1, -(-max_rank // br))
        max_splits = max(1, -(-d_in // (bk if interpret else 2 * bk)))
        splits = min(max_splits, max(1, -(-4 * n_sms // programs))) if not interpret else max_splits
        per_split = -(-d_in // splits)
        k_per_split = -(-per_split // bk) * bk
        return KernelConfig(
            "decode", BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, num_warps=4,
            SPLIT_K=max(1, -(-d_in // k_per_split)),
        )
    n_out_tiles = -(-d_out // block_n)
    # fused recomputes the shrink for every output tile: worth one launch less only when that recompute is
    # small (few output tiles, or few tokens) and the rank is small (a rank-1032 shrink is as big as the expand)
    fused = max_rank <= 64 and (n_out_tiles <= 2 or n_tokens <= 128)
    if not fused and not interpret:
        # few row tiles (e.g. 8 beams of one long document: 1 tile) leave the expand grid at cdiv(d_out, 128)
        # programs, each streaming its slice of a large B: narrower output blocks until the grid covers the SMs
        row_tiles = max(1, -(-n_tokens // block_m))
        while block_n > 32 and row_tiles * -(-d_out // block_n) < n_sms:
            block_n //= 2
    # a 64x128 fp32 accumulator plus the h tile needs 8 warps to stay in registers
    num_warps = 8 if (not interpret and block_m * block_n >= 8192) else 4
    split = 1
    if not fused:
        # split-K for the shrink when row tiles x rank blocks alone cannot fill the GPU (e.g. 16 x 256 tokens in
        # 64-row tiles = 64 programs for 132 SMs, with d_in / BLOCK_K = 144 serial steps each); each slice keeps
        # >= 4 K steps, and the expand sums the fp32 partials in a fixed order (deterministic)
        programs = max(1, -(-n_tokens // block_m)) * max(1, -(-max_rank // block_r))
        max_split = max(1, d_in // (4 * block_k))
        split = 1 if interpret else min(max_split, max(1, -(-2 * n_sms // programs)))
        if interpret and d_in > block_k:
            split = 2  # exercise the split path in the interpreter tests
    return KernelConfig(
        "fused" if fused else "two_pass", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        num_warps=num_warps, SPLIT_K=split,
    )
