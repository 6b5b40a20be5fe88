"""Cost model (absorbed vs plain) and deterministic kernel / CPU configs for the latent readout.

Everything here is a pure function of the problem shape: no autotuning, no device queries beyond the
SM count of an already-chosen CUDA device (see README.md, "Choosing the form").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._common import interpreting, sm_count

__all__ = [
    "ReadoutProblem",
    "KernelConfig",
    "readout_macs",
    "choose_mode",
    "pick_config",
    "pick_cpu_chunk",
    "interpreting",
]


@dataclass(frozen=True)
class ReadoutProblem:
    """Shape summary of one latent cross-attention call (one Perceiver block)."""

    n_seg: int
    n_q: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    total_tokens: int
    max_seqlen: int


def readout_macs(p: ReadoutProblem) -> dict[str, int]:
    """Multiply-accumulates of the two equivalent forms (excluding the caller's Q/O projections).

    absorbed: fold w_ctx and W_k into the queries (q~ = diag(w) W_k,h^T q, once per segment and row),
      then per context token one D-wide score and one D-wide weighted sum for each of the n_q*H rows,
      then fold W_v and w_ctx into the output (once per segment and row):
        n_seg*n_q*H*hd*D  +  T * 2*n_q*H*D  +  n_seg*n_q*H*D*hd
    plain: project K and V for every context token, then GQA attention in the head dim:
        T * 2*D*n_kv*hd  +  T * 2*n_q*H*hd
    With n_q=8, H=16, hd=128, D=512, n_kv=4 the per-token ratio is 556K/131K = 4.2x in favour of
    absorption; the break-even is n_q* = D*n_kv*hd / (H*(D-hd)) = 42.7 latents (NIAH uses 208: plain).
    """
    rows = p.n_q * p.n_heads
    fold = p.n_seg * rows * p.head_dim * p.d_model
    absorbed = 2 * fold + p.total_tokens * 2 * rows * p.d_model
    plain = p.total_tokens * (2 * p.d_model * p.n_kv_heads * p.head_dim + 2 * rows * p.head_dim)
    return {"absorbed": absorbed, "plain": plain}


def choose_mode(p: ReadoutProblem) -> str:
    """"absorbed" when its MAC count is lower than the plain form's, else "plain"."""
    macs = readout_macs(p)
    return "absorbed" if macs["absorbed"] <= macs["plain"] else "plain"


@dataclass(frozen=True)
class KernelConfig:
    """Launch configuration of ``_readout_split_kernel`` (and the merge when ``n_splits > 1``).

    grid = (cdiv(rows, BLOCK_M) * cdiv(dim_v, BLOCK_DV), n_splits, n_seg * groups); ``BLOCK_DK`` covers the whole
    key width (scores need all of it), ``BLOCK_DV < BLOCK_DK`` is the D split of the output columns."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_DK: int
    BLOCK_DV: int
    n_splits: int
    split_len: int
    num_warps: int = 4
    num_stages: int = 2
    MERGE_M: int = 32  # merge kernel tile: rows x columns
    MERGE_D: int = 128

    @property
    def BLOCK_D(self) -> int:  # the pre-rewrite name of the key width block (kept for callers and tests)
        return self.BLOCK_DK


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# cost model of pick_config (microseconds, H100-like): achievable bf16 MMA rate of one SM, HBM bandwidth, and the
# launch + tail of the merge kernel; only the ranking of candidate configs matters
_SM_FLOPS = 4.0e12
_HBM_BYTES = 2.5e12
_MERGE_US = 3.0


def _split_candidates(max_seqlen: int, block_n: int) -> list[int]:
    tiles = _cdiv(max_seqlen, block_n)
    return sorted({n for n in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64) if n <= tiles} | {1})


def _cost_us(*, n_prog, n_sm, tiles, bm, bn, dk, bdv, share, elem, shared_kv, n_splits, out_elems) -> float:
    """Estimated time: waves of programs (one per SM) x (tile steps + fixed work) + the merge.

    A tile step is the larger of its MMA time (scores at full key width + weighted sum over the program's output
    columns) and its key/value bytes over the SM's share of HBM bandwidth (``share`` programs read the same keys
    at once: the row tiles and column blocks of one split). Fixed work: the query tile load and the fp32
    output/partial store. The merge writes and reads every partial once."""
    per_sm_bw = _HBM_BYTES / n_sm
    step_flops = 2.0 * bm * bn * (dk + bdv)
    step_bytes = bn * (dk + (0 if shared_kv else bdv)) * elem / share
    step_us = max(step_flops / _SM_FLOPS, step_bytes / per_sm_bw) * 1e6
    fixed_us = (bm * bdv * 4 + bm * dk * elem) / per_sm_bw * 1e6
    run = _cdiv(n_prog, n_sm) * (tiles * step_us + fixed_us)
    merge = (2 * n_splits * out_elems * 4) / _HBM_BYTES * 1e6 + _MERGE_US if n_splits > 1 else 0.0
    return run + merge


def pick_config(
    n_seg: int, n_groups: int, n_rows: int, dim: int, max_seqlen: int, dtype: torch.dtype, device: torch.device,
    dim_v: int | None = None, shared_kv: bool = False, rstd_in_kernel: bool = False,
) -> KernelConfig:
    """Tiles, context splits and output-column (D) splits for ``_readout_split_kernel``.

    GPU rules (from the sm_90 compile, README.md "Triton path"): the row tile holds as many rows of a group as the
    accumulator allows (``BLOCK_M * BLOCK_DV`` fp32 <= 32K over 8 warps: 64 rows at D = 512, 128 rows at
    hd = 128); ``BLOCK_N`` 64, or 32 at D = 512 with the rstd computed in the kernel (64 spills there). Then
    ``(n_splits, n_dv)`` minimise :func:`_cost_us`; a D split (``n_dv`` > 1, only while the row tiles alone do not
    fill the SMs) recomputes the scores per column block. The grid is sized by the host int ``max_seqlen`` (no
    device sync). Under the interpreter: small tiles and up to 4 splits so the merge path is exercised.
    """
    dim_v = dim if dim_v is None else dim_v
    BLOCK_DK = max(16, _next_pow2(dim))
    BLOCK_DV_full = max(16, _next_pow2(dim_v))
    max_seqlen = max(1, int(max_seqlen))
    if interpreting() or device.type != "cuda":
        BLOCK_M = min(64, max(16, _next_pow2(n_rows)))
        BLOCK_N = min(128, max(16, _next_pow2(max_seqlen)))
        n_splits = min(4, _cdiv(max_seqlen, BLOCK_N * 4)) if max_seqlen > 4 * BLOCK_N else 1
        split_len = _cdiv(_cdiv(max_seqlen, n_splits), BLOCK_N) * BLOCK_N
        n_splits = _cdiv(max_seqlen, split_len)
        return KernelConfig(BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DV_full, n_splits, split_len, num_warps=4,
                            num_stages=1)
    wide = BLOCK_DK >= 512
    elem = torch.finfo(dtype).bits // 8
    # fp32 operands double the query / key tiles in shared memory: half the rows at full width (sm_90: 64 rows x
    # 512 fp32 with 32 keys per step needs 256 KB of shared memory)
    BLOCK_M = max(16, min(128, _next_pow2(n_rows), 32768 // BLOCK_DV_full, 32 if wide and elem > 2 else 128))
    n_sm = sm_count(device)
    row_tiles = _cdiv(n_rows, BLOCK_M)
    base = n_seg * n_groups * row_tiles
    best = None
    for n_dv in (1, 2, 4):
        block_dv = BLOCK_DV_full // n_dv
        if block_dv < 64 or (n_dv > 1 and base >= n_sm):
            continue
        block_n = 32 if wide and elem > 2 else _block_n(BLOCK_DK, full=n_dv == 1, rstd_in_kernel=rstd_in_kernel)
        for n_splits in _split_candidates(max_seqlen, block_n):
            split_len = _cdiv(_cdiv(max_seqlen, n_splits), block_n) * block_n
            n_spl = _cdiv(max_seqlen, split_len)
            c = _cost_us(n_prog=base * n_dv * n_spl, n_sm=n_sm, tiles=split_len // block_n, bm=BLOCK_M, bn=block_n,
                         dk=BLOCK_DK, bdv=block_dv, share=row_tiles * n_dv, elem=elem, shared_kv=shared_kv,
                         n_splits=n_spl, out_elems=n_seg * n_groups * n_rows * dim_v)
            if best is None or c < best[0] - 1e-9:
                best = (c, block_n, block_dv, n_spl, split_len)
    _, block_n, block_dv, n_splits, split_len = best
    num_warps = 8 if BLOCK_M * max(block_dv, 64) >= 8192 or wide else 4
    # wide (D >= 512) tiles: 2 stages at full width; a D split keeps a second (value) tile in shared memory: 1 stage
    stages = (2 if block_dv == BLOCK_DV_full else 1) if wide else 3
    if elem > 2:  # fp32 tiles take twice the shared memory (sm_90: 256 KB at the 16-bit stages)
        stages = 1 if wide else 2
    return KernelConfig(BLOCK_M, block_n, BLOCK_DK, block_dv, n_splits, split_len, num_warps=num_warps,
                        num_stages=stages)


def _block_n(block_dk: int, full: bool, rstd_in_kernel: bool) -> int:
    """Keys per step. sm_90 compiles (triton 3.7, 8 warps, 64 rows, D = 512, bf16; registers / spill bytes): full
    width, rstd given, 64 keys, 2 stages: 255 / 0; rstd in the kernel: 64 keys spill (568 B), 32 keys: 255 / 0;
    D split (256 or 128 columns, 1 stage), 64 keys: 194-254 / 0 either way, while 32 keys with the in-kernel rstd
    spill at 128 columns (48 B)."""
    if block_dk > 512:
        return 32
    if block_dk == 512 and full and rstd_in_kernel:
        return 32
    return 64


# cost of one extra chunk (query gather, partial-state write and merge), in "padded key tokens";
# measured on 2 CPU cores (104 ragged Gemma segments: chunk 256 beats 128 and 512)
_CPU_CHUNK_OVERHEAD_TOKENS = 64
_CPU_CHUNK_CANDIDATES = (16, 32, 64, 128, 256, 512, 1024, 2048)
# a segment this long or shorter may be one chunk (no merge); equal lengths then need no gather at all
_CPU_MAX_CHUNK = 4096


def pick_cpu_chunk(lengths: torch.Tensor, n_rows: int) -> int:
    """Key-chunk length for the CPU path: minimise padded tokens + overhead * number of chunks.

    The CPU path cuts every segment into chunks of `chunk` tokens (the last one padded), attends all
    chunks of all segments with batched matmuls and merges the chunk partials per segment with an LSE
    weighting (flash-decoding on the CPU). `lengths` is a CPU int64 tensor of segment lengths.
    """
    nonzero = lengths[lengths > 0]
    if nonzero.numel() == 0:
        return 16
    max_len = int(nonzero.max())
    cands = list(_CPU_CHUNK_CANDIDATES)
    if max_len <= _CPU_MAX_CHUNK:
        cands.append(max_len)
    overhead = _CPU_CHUNK_OVERHEAD_TOKENS * max(1, n_rows // 128)
    best, best_cost = None, None
    for c in sorted(set(cands)):
        n_chunks = (nonzero + c - 1) // c
        cost = int(n_chunks.sum()) * (c + overhead)
        if best_cost is None or cost < best_cost:
            best, best_cost = c, cost
    return best
