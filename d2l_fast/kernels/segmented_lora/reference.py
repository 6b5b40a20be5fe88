"""Executable spec of the segmented multi-LoRA op: a plain loop over segments.

It never materialises per-token weight copies; each segment multiplies its contiguous token slice by
its adapter's rank slice of ``A`` and ``B``.
"""

from __future__ import annotations

import torch

__all__ = ["segmented_lora_ref"]


def segmented_lora_ref(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_rank_start: torch.Tensor,
    seg_rank_len: torch.Tensor,
    scale: float = 1.0,
    upcast: bool = True,
) -> torch.Tensor:
    """``delta[t] = scale * (x[t] @ A[rs:rs+rl].T) @ B[rs:rs+rl]`` for every token ``t`` of segment ``s``.

    Args:
        x: ``[T, d_in]``.
        A: ``[R_total, d_in]`` ragged adapters (concatenated along rank).
        B: ``[R_total, d_out]`` (rank-major).
        cu_seqlens: ``[S + 1]`` int segment boundaries (any device; read on the host).
        seg_rank_start, seg_rank_len: ``[S]`` rank range per segment, ``rank_len == 0``: no adapter.
        scale: LoRA scaling.
        upcast: compute in fp64 (``True``) or fp32 (``False``).

    Returns:
        ``delta`` of shape ``[T, d_out]`` in ``x.dtype``; differentiable w.r.t. ``x``, ``A`` and ``B``.
    """
    compute = torch.float64 if upcast else torch.float32
    cu = [int(v) for v in cu_seqlens.tolist()]
    starts = [int(v) for v in seg_rank_start.tolist()]
    lens = [int(v) for v in seg_rank_len.tolist()]
    xc, Ac, Bc = x.to(compute), A.to(compute), B.to(compute)
    pieces = []
    for s in range(len(lens)):
        t0, t1, rs, rl = cu[s], cu[s + 1], starts[s], lens[s]
        if t1 == t0:
            continue
        if rl == 0:
            pieces.append(xc.new_zeros(t1 - t0, B.shape[1]))
            continue
        h = xc[t0:t1] @ Ac[rs : rs + rl].T
        pieces.append(scale * (h @ Bc[rs : rs + rl]))
    if not pieces:
        return x.new_zeros(x.shape[0], B.shape[1])
    return torch.cat(pieces, 0).to(x.dtype)
