"""Host launchers: validate, allocate, pick a config, launch. No autograd here.

Triton is optional: it (and the kernel module) is imported when a kernel is launched, never at import time.
"""
from __future__ import annotations

import contextlib

import torch

from .._common import Launcher, cdiv, input_precision
from .configs import KernelConfig, interpreting, pick_config

__all__ = ["readout_attend_fwd", "ctx_rstd_fwd", "latent_readout_triton_fwd", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
# tok_scale modes of _readout_split_kernel
_TS_NONE, _TS_GIVEN, _TS_COMPUTE = 0, 1, 2
_LAUNCHERS: dict = {}


def _launch(name: str, grid, args: tuple, constexprs: dict, num_warps: int, num_stages: int = 1):
    if name not in _LAUNCHERS:
        from . import kernel as K

        _LAUNCHERS[name] = Launcher(getattr(K, name))
    return _LAUNCHERS[name](grid, args, constexprs, num_warps=num_warps, num_stages=num_stages)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def ctx_rstd_fwd(ctx: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 [T] ``1 / sqrt(mean(ctx^2, -1) + eps)`` in one pass over ``ctx`` [T, D] (Triton; no fp32 copy)."""
    if not isinstance(ctx, torch.Tensor) or ctx.dim() != 2:
        raise ValueError(f"ctx must be a 2-D tensor [T, D], got {getattr(ctx, 'shape', type(ctx).__name__)}")
    T, D = ctx.shape
    out = torch.empty(T, device=ctx.device, dtype=torch.float32)
    if T == 0:
        return out
    block_t, block_d = 16, min(256, max(16, 1 << max(0, D - 1).bit_length()))
    with _device(ctx):
        _launch("_ctx_rstd_kernel", (cdiv(T, block_t),), (ctx, out, T, D, float(eps), *ctx.stride()),
                dict(BLOCK_T=block_t, BLOCK_D=block_d), num_warps=4)
    return out


def readout_attend_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    tok_scale: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    sm_scale: float,
    *,
    eps: float | None = None,
    cfg: KernelConfig | None = None,
) -> torch.Tensor:
    """Varlen attention of per-segment query rows over a key stream shared by each group (Triton).

    Args:
        q: [G, n_seg, R, dk] query rows (same dtype as k); all R rows of a group share its keys and values.
        k: [G, T, dk] keys (any strides; a token-major [T, G * dk] buffer viewed per group works).
        v: [G, T, dv] values or None to reuse k (absorbed form, dv = dk).
        tok_scale: optional fp32 [T] factor on each token's key and value (the context rstd). With ``v is None``
            and ``tok_scale is None``, ``eps`` given: the factor is computed in the kernel from the key rows
            (``1 / sqrt(mean(k^2) + eps)``, the keys being the raw context).
        cu_seqlens: int32 [n_seg + 1] on the same device; max_seqlen: python int.
        cfg: a config to use instead of :func:`pick_config`'s (tests).
    Returns:
        fp32 [G, n_seg, R, dv], zeros for empty segments.
    """
    G, n_seg, R, dk = q.shape
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    v_arg = k if v is None else _last_dim_contiguous(v)
    dv = v_arg.shape[-1]
    if tok_scale is not None:
        ts_mode, ts_arg = _TS_GIVEN, tok_scale
    elif v is None and eps is not None:
        ts_mode, ts_arg = _TS_COMPUTE, cu_seqlens  # never read
    else:
        ts_mode, ts_arg = _TS_NONE, cu_seqlens
    if cfg is None:
        cfg = pick_config(n_seg, G, R, dk, max_seqlen, q.dtype, q.device, dim_v=dv, shared_kv=v is None,
                          rstd_in_kernel=ts_mode == _TS_COMPUTE)
    if ts_mode == _TS_COMPUTE and cfg.BLOCK_DK < dk:
        raise ValueError(f"the in-kernel rstd needs BLOCK_DK >= dk ({dk}), got {cfg.BLOCK_DK}")
    out = torch.empty(G, n_seg, R, dv, device=q.device, dtype=torch.float32)
    if n_seg == 0 or R == 0:
        return out
    n_m, n_dv = cdiv(R, cfg.BLOCK_M), cdiv(dv, cfg.BLOCK_DV)
    split = cfg.n_splits > 1
    if split:
        part = torch.empty(cfg.n_splits, n_seg * G, R, dv, device=q.device, dtype=torch.float32)
        lse = torch.empty(cfg.n_splits, n_seg * G, R, device=q.device, dtype=torch.float32)
    else:
        part = lse = out  # never touched when SPLIT is False
    sp = (part.stride(0), part.stride(1), part.stride(2)) if split else (0, 0, 0)
    sl = (lse.stride(0), lse.stride(1)) if split else (0, 0)
    args = (q, k, v_arg, ts_arg, out, part, lse, cu_seqlens, R, dk, G, n_dv, cfg.split_len, sm_scale * _LOG2E,
            float(eps if eps is not None else 0.0), *q.stride(), *k.stride(), *v_arg.stride(),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3), *sp, *sl, dv)
    constexprs = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_DK=cfg.BLOCK_DK, BLOCK_DV=cfg.BLOCK_DV,
                      TOK_SCALE=ts_mode, SHARED_KV=v is None, SPLIT=split,
                      INPUT_PRECISION=input_precision(q.dtype))
    with _device(q):
        _launch("_readout_split_kernel", (n_m * n_dv, cfg.n_splits, n_seg * G), args, constexprs,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if split:
            mm, md = cfg.MERGE_M, min(cfg.MERGE_D, max(16, 1 << max(0, dv - 1).bit_length()))
            margs = (part, lse, out, cu_seqlens, R, G, cdiv(dv, md), cfg.split_len, *sp, *sl,
                     out.stride(0), out.stride(1), out.stride(2), out.stride(3), dv)
            _launch("_readout_merge_kernel", (cdiv(R, mm) * cdiv(dv, md), n_seg * G), margs,
                    dict(BLOCK_M=mm, BLOCK_D=md), num_warps=4)
    return out


def latent_readout_triton_fwd(q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, w, rstd, *, n_kv_heads, scale, mode,
                              eps=1e-6, cfg=None):  # fmt: skip
    """Forward of the readout on the Triton path; fp32 result [n_seg, n_q, H, hd]. ``rstd`` may be None: it is then
    computed on the device (in the attention kernel for the absorbed form, by ``_ctx_rstd_kernel`` for the plain).

    absorbed: the query fold (q~ = diag(w) W_k,h^T q) and the output fold (W_v,h diag(w) u) are torch batched
    matmuls; the kernel streams the raw context once per row tile with the rstd applied per token.
    plain: one GEMM projects the raw context with diag(w) folded into the weights (K'/V' = C (W diag w)^T, token-major
    [T, 2 * n_kv * hd]); the kernel attends the n_q * H / n_kv rows of each KV head with the rstd as the per-token
    factor (K = rstd * K'). fp16 keeps the normalized context instead (the raw projection could overflow fp16).
    """
    from .torch_impl import _absorb_output, _absorb_queries

    if not (q.is_cuda or interpreting()):
        raise RuntimeError("the Triton backend needs CUDA tensors or TRITON_INTERPRET=1")
    n_seg, n_q, H, hd = q.shape
    T, D = ctx.shape
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    if mode == "absorbed":
        qt = _absorb_queries(q, k_weight, w, n_kv_heads, 1.0).to(ctx.dtype)  # [1, n_seg, R, D]
        u = readout_attend_fwd(qt, ctx.unsqueeze(0), None, rstd, cu, max_seqlen, scale, eps=eps, cfg=cfg)
        return _absorb_output(u, v_weight, w, n_kv_heads, q.shape)
    w_kv = torch.cat([k_weight, v_weight], 0).float()
    if ctx.dtype == torch.float16:
        r = rstd if rstd is not None else ctx_rstd_fwd(ctx, eps)
        c, ts = (ctx.float() * r[:, None]).to(ctx.dtype), None
    else:
        c, ts = ctx, (rstd if rstd is not None else ctx_rstd_fwd(ctx, eps))
    kv = torch.matmul(c, (w_kv * w.float()).to(ctx.dtype).t())  # [T, 2 * n_kv * hd] token-major
    kv3 = kv.view(T, 2 * n_kv_heads, hd).transpose(0, 1)  # [2 * n_kv, T, hd] view
    grp = H // n_kv_heads
    qg = q.reshape(n_seg, n_q, n_kv_heads, grp, hd).permute(2, 0, 1, 3, 4).reshape(n_kv_heads, n_seg, n_q * grp, hd)
    u = readout_attend_fwd(qg.to(ctx.dtype), kv3[:n_kv_heads], kv3[n_kv_heads:], ts, cu, max_seqlen, scale, cfg=cfg)
    return u.view(n_kv_heads, n_seg, n_q, grp, hd).permute(1, 2, 0, 3, 4).reshape(n_seg, n_q, H, hd)
