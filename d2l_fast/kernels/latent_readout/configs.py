"""Cost model (absorbed vs plain) and deterministic kernel / CPU configs for the latent readout.

Everything here is a pure function of the problem shape: no autotuning, no device queries beyond the
SM count of an already-chosen CUDA device (see README.md, "Choosing the form").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._common import interpreting

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
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    n_splits: int
    split_len: int
    num_warps: int = 4
    num_stages: int = 2


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pick_config(
    n_seg: int, n_groups: int, n_rows: int, dim: int, max_seqlen: int, dtype: torch.dtype, device: torch.device
) -> KernelConfig:
    """Tile sizes and the flash-decoding split for `_readout_fwd_kernel`.

    The grid is (n_seg, n_groups * cdiv(n_rows, BLOCK_M), n_splits). When the first two axes alone
    cannot fill the GPU (few, long segments) the key axis is split into `n_splits` pieces of
    `split_len` tokens (a multiple of BLOCK_N) and merged by `_readout_combine_kernel` with a LSE
    weighting. Under the interpreter one small, GPU-legal config with few loop iterations is used.
    """
    BLOCK_D = max(16, _next_pow2(dim))
    max_seqlen = max(1, int(max_seqlen))
    if interpreting() or device.type != "cuda":
        BLOCK_M = min(64, max(16, _next_pow2(n_rows)))
        BLOCK_N = min(128, max(16, _next_pow2(max_seqlen)))
        # long segments: at most 4 splits so the combine path is exercised without many programs
        n_splits = min(4, _cdiv(max_seqlen, BLOCK_N * 4)) if max_seqlen > 4 * BLOCK_N else 1
        split_len = _cdiv(_cdiv(max_seqlen, n_splits), BLOCK_N) * BLOCK_N
        n_splits = _cdiv(max_seqlen, split_len)
        return KernelConfig(BLOCK_M, BLOCK_N, BLOCK_D, n_splits, split_len, num_warps=4, num_stages=1)
    # accumulator [BLOCK_M, BLOCK_D] fp32 lives in registers: keep BLOCK_M * BLOCK_D <= 16K
    BLOCK_M = 32 if BLOCK_D >= 512 else 64
    BLOCK_M = min(BLOCK_M, max(16, _next_pow2(n_rows)))
    elem = torch.finfo(dtype).bits // 8
    BLOCK_N = 32 if BLOCK_D * elem >= 1024 else 64
    num_warps = 8 if BLOCK_M * BLOCK_D >= 16384 else 4
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    base = n_seg * n_groups * _cdiv(n_rows, BLOCK_M)
    target = 4 * n_sm
    n_splits = 1
    if base < target:
        # each split keeps at least 4 key tiles so the combine stays cheap
        n_splits = max(1, min(_cdiv(target, max(base, 1)), _cdiv(max_seqlen, 4 * BLOCK_N)))
    split_len = _cdiv(_cdiv(max_seqlen, n_splits), BLOCK_N) * BLOCK_N
    n_splits = _cdiv(max_seqlen, split_len)
    return KernelConfig(BLOCK_M, BLOCK_N, BLOCK_D, n_splits, split_len, num_warps=num_warps, num_stages=2)


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
