"""Host launchers: validate, allocate, pick a config, launch. No autograd here.

Triton is optional: it (and the kernel module) is imported when a kernel is launched, never at import time.
"""
from __future__ import annotations

import contextlib

import torch

from .._common import input_precision
from .configs import interpreting, pick_config

__all__ = ["readout_attend_fwd", "latent_readout_triton_fwd", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def readout_attend_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    tok_scale: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    sm_scale: float,
) -> torch.Tensor:
    """Varlen attention of per-segment query rows over a shared key stream (Triton).

    Args:
        q: [G, n_seg, R, d] query rows (same dtype as k).
        k: [G, T, d] keys; v: [G, T, d] values or None to reuse k (absorbed form).
        tok_scale: optional fp32 [T] factor on each token's key and value (the context rstd).
        cu_seqlens: int32 [n_seg + 1] on the same device; max_seqlen: python int.
    Returns:
        fp32 [G, n_seg, R, d], zeros for empty segments.
    """
    from .kernel import _readout_combine_kernel, _readout_fwd_kernel

    G, n_seg, R, d = q.shape
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    v_arg = k if v is None else _last_dim_contiguous(v)
    ts_arg = tok_scale if tok_scale is not None else cu_seqlens  # never read when HAS_TOK_SCALE is False
    cfg = pick_config(n_seg, G, R, d, max_seqlen, q.dtype, q.device)
    n_row_tiles = -(-R // cfg.BLOCK_M)
    out = torch.empty(G, n_seg, R, d, device=q.device, dtype=torch.float32)
    if n_seg == 0:
        return out
    split = cfg.n_splits > 1
    o_part = torch.empty(cfg.n_splits, G, n_seg, R, d, device=q.device, dtype=torch.float32) if split else out[None]
    lse = torch.empty(cfg.n_splits, G, n_seg, R, device=q.device, dtype=torch.float32)
    precision = input_precision(q.dtype)
    grid = (n_seg, G * n_row_tiles, cfg.n_splits)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _readout_fwd_kernel[grid](
            q, k, v_arg, ts_arg, o_part, lse,
            cu_seqlens,
            R, d, n_row_tiles, cfg.split_len, sm_scale * _LOG2E,
            *q.stride(), *k.stride(), *v_arg.stride(), *o_part.stride(), *lse.stride(),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D,
            HAS_TOK_SCALE=tok_scale is not None, SHARED_KV=v is None, INPUT_PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if split:
            _readout_combine_kernel[(n_seg, G * n_row_tiles)](
                o_part, lse, out,
                R, d, n_row_tiles, cfg.n_splits,
                *o_part.stride(), *lse.stride(), *out.stride(),
                BLOCK_M=cfg.BLOCK_M, BLOCK_D=cfg.BLOCK_D,
                num_warps=cfg.num_warps,
            )  # fmt: skip
    return out


def latent_readout_triton_fwd(q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, w, rstd, *, n_kv_heads, scale, mode):
    """Forward of the readout on the Triton path; fp32 result [n_seg, n_q, H, hd].

    absorbed: the query fold (q~ = diag(w) W_k,h^T q) and the output fold (W_v,h diag(w) u) are torch
    batched matmuls; the kernel streams the raw context once with the rstd applied per token.
    plain: K/V projections are one torch GEMM (group-major layout); the kernel runs the GQA attention.
    """
    from .torch_impl import _absorb_output, _absorb_queries

    if not (q.is_cuda or interpreting()):
        raise RuntimeError("the Triton backend needs CUDA tensors or TRITON_INTERPRET=1")
    n_seg, n_q, H, hd = q.shape
    T, D = ctx.shape
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    if mode == "absorbed":
        qt = _absorb_queries(q, k_weight, w, n_kv_heads, 1.0).to(ctx.dtype)  # [1, n_seg, R, D]
        u = readout_attend_fwd(qt, ctx.unsqueeze(0), None, rstd, cu, max_seqlen, scale)
        return _absorb_output(u, v_weight, w, n_kv_heads, q.shape)
    c = ctx.float() * rstd[:, None]
    c = c.to(ctx.dtype) * w.to(ctx.dtype)
    w_kv = torch.cat([k_weight, v_weight], 0).to(ctx.dtype).view(2 * n_kv_heads, hd, D)
    kv = torch.matmul(c.unsqueeze(0), w_kv.transpose(1, 2))  # [2 * n_kv, T, hd]
    grp = H // n_kv_heads
    qg = q.reshape(n_seg, n_q, n_kv_heads, grp, hd).permute(2, 0, 1, 3, 4).reshape(n_kv_heads, n_seg, n_q * grp, hd)
    u = readout_attend_fwd(qg.to(ctx.dtype), kv[:n_kv_heads], kv[n_kv_heads:], None, cu, max_seqlen, scale)
    return u.view(n_kv_heads, n_seg, n_q, grp, hd).permute(1, 2, 0, 3, 4).reshape(n_seg, n_q, H, hd)

