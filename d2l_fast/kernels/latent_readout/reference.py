"""Executable spec of the latent cross-attention readout (one Perceiver cross-attention layer).

Plain torch, one Python iteration per segment, the materialized way the D2L reference computes it:
RMS-normalize the context, project K and V for every token, attend per segment.
"""
from __future__ import annotations

import math

import torch

__all__ = ["latent_readout_ref", "rms_normalize_ref"]


def rms_normalize_ref(ctx: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`w * cast_back(x / sqrt(mean(x^2) + eps))`, statistics in fp32 (Idefics2 RMSNorm)."""
    x = ctx.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(ctx.dtype)


def latent_readout_ref(
    q: torch.Tensor,
    ctx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    ctx_norm_weight: torch.Tensor,
    *,
    n_kv_heads: int,
    eps: float = 1e-6,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference readout.

    Args:
        q: [n_seg, n_q, H, hd] projected latent queries, one set per segment.
        ctx: [T_total, D] packed context, split by `cu_seqlens`.
        cu_seqlens: int32 [n_seg + 1].
        k_weight, v_weight: [n_kv_heads * hd, D] (nn.Linear layout).
        ctx_norm_weight: [D] RMSNorm weight of the context.
        upcast: compute the projections and attention in fp64 (True) or fp32 (False).

    Returns:
        [n_seg, n_q, H, hd] in q's dtype; empty segments give zeros.
    """
    n_seg, n_q, H, hd = q.shape
    group = H // n_kv_heads
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(hd)
    acc = torch.float64 if upcast else torch.float32
    c = rms_normalize_ref(ctx, ctx_norm_weight, eps).to(acc)
    k = (c @ k_weight.to(acc).T).view(-1, n_kv_heads, hd)
    v = (c @ v_weight.to(acc).T).view(-1, n_kv_heads, hd)
    # the reference physically repeats the KV heads to H heads (repeat_kv)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = torch.zeros(n_seg, n_q, H, hd, dtype=acc, device=q.device)
    cu = cu_seqlens.tolist()
    for s in range(n_seg):
        a, b = cu[s], cu[s + 1]
        if b <= a:
            continue
        qs = q[s].to(acc).transpose(0, 1)  # [H, n_q, hd]
        ks = k[a:b].transpose(0, 1)  # [H, L, hd]
        vs = v[a:b].transpose(0, 1)
        p = torch.softmax((qs @ ks.transpose(1, 2)) * scale, dim=-1)
        out[s] = (p @ vs).transpose(0, 1)
    return out.to(q.dtype)
