"""Forward/backward math, the ``torch.library`` custom ops and the public functional of the latent readout.

The same layering as ``segmented_lora/function.py``: :func:`_latent_readout_fwd` and :func:`_latent_readout_bwd`
hold the math; the custom ops ``d2l_fast::latent_readout`` (differentiable, via ``register_autograd``) and
``d2l_fast::latent_readout_backward`` and the eager :class:`LatentReadoutFunction` call them.
:func:`latent_readout` validates its inputs, then calls the op while ``torch.compile`` traces it (one graph node,
no break) and the autograd Function otherwise (the op's Python dispatch layers are pure overhead in eager mode;
the numbers are in ``segmented_lora/function.py``'s docstring).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .configs import ReadoutProblem, choose_mode, interpreting, pick_cpu_chunk
from .launch import SUPPORTED_DTYPES, latent_readout_triton_fwd
from .torch_impl import (
    _GROUP_ELEMS,
    compute_rstd,
    make_chunk_plan,
    readout_absorbed_torch,
    readout_plain_torch,
    readout_torch,
    segment_groups,
)

__all__ = ["LatentReadoutFunction", "latent_readout", "resolve_mode"]

_MODES = ("auto", "absorbed", "plain")
_BACKENDS = ("auto", "torch", "triton")


def _latent_readout_fwd(q, context, cu_seqlens, k_weight, v_weight, norm_weight, rstd_in, max_seqlen: int,
                        n_kv_heads: int, eps: float, scale: float, mode: str, backend: str) -> torch.Tensor:
    """The readout ``[n_seg, n_q, H, hd]`` in q's dtype, on ``backend`` in the (resolved) ``mode``; no autograd."""
    if backend == "triton":
        # without rstd_in the statistic is computed on the device (inside the absorbed kernel; one pass otherwise)
        out = latent_readout_triton_fwd(
            q, context, cu_seqlens, max_seqlen, k_weight, v_weight, norm_weight, rstd_in,
            n_kv_heads=n_kv_heads, scale=scale, mode=mode, eps=eps,
        )  # fmt: skip
    else:
        rstd = rstd_in if rstd_in is not None else compute_rstd(context, eps)
        cu_cpu = cu_seqlens.to("cpu", torch.int64)
        out = readout_torch(
            q, context, cu_cpu, k_weight, v_weight, norm_weight, rstd,
            n_kv_heads=n_kv_heads, scale=scale, mode=mode,
        )  # fmt: skip
    return out.to(q.dtype)


def _latent_readout_bwd(grad_out, q, context, cu_seqlens, k_weight, v_weight, norm_weight, rstd_in, n_kv_heads: int,
                        eps: float, scale: float, mode: str, want: _ReadoutGrads) -> _ReadoutGrads:
    """Gradients of the readout w.r.t. the inputs ``want`` names (bools; the others come back None).

    Recomputes the forward with the differentiable torch implementation (`torch_impl.py`, same form, fp32) one
    segment group at a time under `enable_grad` and calls `torch.autograd.grad`; ``want.rstd`` only counts when
    the caller passed ``rstd_in``."""
    fn = readout_absorbed_torch if mode == "absorbed" else readout_plain_torch
    n_seg, n_q, H, hd = q.shape
    cu_cpu = cu_seqlens.to("cpu", torch.int64)
    cu = cu_cpu.tolist()
    rows = n_q * H if mode == "absorbed" else n_q * (H // n_kv_heads)
    width = context.shape[1] if mode == "absorbed" else 2 * n_kv_heads * hd
    chunk = pick_cpu_chunk(cu_cpu[1:] - cu_cpu[:-1], rows)
    grad_out = grad_out.float()

    inputs = _ReadoutGrads(q, context, k_weight, v_weight, norm_weight, rstd_in)
    want = want._replace(rstd=rstd_in is not None and bool(want.rstd))
    acc = _ReadoutGrads(*(torch.zeros(x.shape, dtype=torch.float32, device=x.device) if w else None
                          for x, w in zip(inputs, want)))
    wanted = [name for name in _ReadoutGrads._fields if getattr(want, name)]
    wk_l = k_weight.detach().requires_grad_(bool(want.k_weight))
    wv_l = v_weight.detach().requires_grad_(bool(want.v_weight))
    w_l = norm_weight.detach().requires_grad_(bool(want.norm_weight))
    for s0, s1 in segment_groups(cu, max(1, _GROUP_ELEMS // max(width, 1))):
        t0, t1 = cu[s0], cu[s1]
        with torch.enable_grad():
            q_g = q[s0:s1].detach().requires_grad_(bool(want.q))
            c_g = context[t0:t1].detach().requires_grad_(bool(want.context))
            r_g = rstd_in[t0:t1].detach().requires_grad_(want.rstd) if rstd_in is not None \
                else compute_rstd(c_g, eps)
            plan = make_chunk_plan(cu_cpu[s0 : s1 + 1] - t0, chunk, context.device)
            out = fn(q_g, c_g, plan, wk_l, wv_l, w_l, r_g, n_kv_heads=n_kv_heads, scale=scale)
            if not wanted or not out.requires_grad:
                continue
            leaves = _ReadoutGrads(q_g, c_g, wk_l, wv_l, w_l, r_g if rstd_in is not None else None)
            grads = torch.autograd.grad(out, [getattr(leaves, name) for name in wanted], grad_out[s0:s1],
                                        allow_unused=True)
        for name, g in zip(wanted, grads):
            if g is None:
                continue
            full, rows = getattr(acc, name), getattr(_GRAD_ROWS, name)
            if rows == "segments":
                full[s0:s1] += g
            elif rows == "tokens":
                full[t0:t1] += g
            else:  # weights: summed over the segment groups in a fixed order
                full += g
    return _ReadoutGrads(*(None if g is None else g.to(x.dtype) for g, x in zip(acc, inputs)))


class LatentReadoutFunction(torch.autograd.Function):
    """Fused latent cross-attention readout with a recompute backward (eager autograd).

    Forward (:func:`_latent_readout_fwd`) runs the chosen form (absorbed or plain) on the chosen backend and saves
    only the inputs. Backward (:func:`_latent_readout_bwd`) recomputes the forward with the differentiable torch
    implementation (`torch_impl.py`, same form, fp32) one segment group at a time and calls `torch.autograd.grad`
    for q, ctx, k_weight, v_weight, ctx_norm_weight (and ctx_rstd when the caller passed it).
    Why recompute in torch: it is exact for both forms, costs one extra forward, stores nothing
    but the inputs, and keeps this version free of hand-written backward kernels.
    Determinism: dq of a segment sums its key chunks with `_SegmentSum` (a sequential index_add on
    CPU; on CUDA one write per segment per step, so no order-dependent atomics), and the weight
    gradients are summed over segment groups in a fixed Python order. No atomics are used.
    """

    @staticmethod
    def forward(ctx, q, context, cu_seqlens, k_weight, v_weight, norm_weight, rstd_in, meta):
        # backward recomputes from the inputs: only they are saved
        ctx.save_for_backward(q, context, cu_seqlens, k_weight, v_weight, norm_weight, rstd_in)
        ctx.meta = meta
        return _latent_readout_fwd(q, context, cu_seqlens, k_weight, v_weight, norm_weight, rstd_in, *meta)

    @staticmethod
    def backward(ctx, grad_out):
        q, context, cu_seqlens, k_weight, v_weight, norm_weight, rstd_in = ctx.saved_tensors
        max_seqlen, n_kv_heads, eps, scale, mode, backend = ctx.meta
        # the forward's inputs are (q, context, cu_seqlens, k_weight, v_weight, norm_weight, rstd_in, meta)
        n = ctx.needs_input_grad
        want = _ReadoutGrads(q=n[0], context=n[1], k_weight=n[3], v_weight=n[4], norm_weight=n[5], rstd=n[6])
        g = _latent_readout_bwd(grad_out, q, context, cu_seqlens, k_weight, v_weight, norm_weight, rstd_in,
                                n_kv_heads, eps, scale, mode, want)
        return g.q, g.context, None, g.k_weight, g.v_weight, g.norm_weight, g.rstd, None


class _ReadoutGrads(NamedTuple):
    """One value per differentiable input of the readout (the backward's inputs, wants, leaves and gradients)."""

    q: Any
    context: Any
    k_weight: Any
    v_weight: Any
    norm_weight: Any
    rstd: Any


# the part of an input's full gradient that one segment group's gradient fills: the group's segments (rows of q),
# its tokens (rows of context / rstd), or all of it (weights, shared by every group)
_GRAD_ROWS = _ReadoutGrads(q="segments", context="tokens", k_weight="all", v_weight="all", norm_weight="all",
                           rstd="tokens")


def resolve_mode(mode: str, q: torch.Tensor, ctx: torch.Tensor, n_kv_heads: int) -> str:
    """"auto" -> the form with fewer MACs (configs.readout_macs); explicit modes pass through."""
    if mode != "auto":
        return mode
    n_seg, n_q, H, hd = q.shape
    T, D = ctx.shape
    return choose_mode(ReadoutProblem(n_seg, n_q, H, n_kv_heads, hd, D, T, 0))


# ------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("d2l_fast::latent_readout", mutates_args=())
def _latent_readout_op(q: torch.Tensor, ctx: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       k_weight: torch.Tensor, v_weight: torch.Tensor, norm_weight: torch.Tensor,
                       ctx_rstd: torch.Tensor | None, n_kv_heads: int, eps: float, softmax_scale: float, mode: str,
                       backend: str) -> torch.Tensor:  # fmt: skip
    with torch.no_grad():
        return _latent_readout_fwd(q, ctx, cu_seqlens, k_weight, v_weight, norm_weight, ctx_rstd, max_seqlen,
                                   n_kv_heads, eps, softmax_scale, mode, backend)  # fmt: skip


@_latent_readout_op.register_fake
def _(q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, norm_weight, ctx_rstd, n_kv_heads, eps, softmax_scale,
      mode, backend):  # fmt: skip
    return q.new_empty(q.shape)


@torch.library.custom_op("d2l_fast::latent_readout_backward", mutates_args=())
def _latent_readout_backward_op(grad: torch.Tensor, q: torch.Tensor, ctx: torch.Tensor, cu_seqlens: torch.Tensor,
                                k_weight: torch.Tensor, v_weight: torch.Tensor, norm_weight: torch.Tensor,
                                ctx_rstd: torch.Tensor | None, n_kv_heads: int, eps: float, softmax_scale: float,
                                mode: str, needs: list[bool]) -> list[torch.Tensor]:  # fmt: skip
    # the dispatcher runs an op's implementation with autograd dispatch excluded; the recompute backward needs it, or
    # every gradient would silently be zero. Removing a per-backend key from a DispatchKeySet clears its
    # functionality bit, so this re-enables autograd for every backend (CUDA included); ADInplaceOrView is
    # re-enabled too (excluded when the op runs below it) so in-place ops bump version counters and views are
    # tracked. tests/kernels/test_readout_split.py calls this op under _AutoDispatchBelowADInplaceOrView.
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradCPU)
    exclude = exclude.remove(torch._C.DispatchKey.ADInplaceOrView)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        grads = _latent_readout_bwd(grad, q, ctx, cu_seqlens, k_weight, v_weight, norm_weight, ctx_rstd, n_kv_heads,
                                    eps, softmax_scale, mode, _ReadoutGrads(*needs))  # fmt: skip
    # an op returns tensors only: an empty tensor stands for "not needed"
    return [g if g is not None else q.new_empty(0) for g in grads]


@_latent_readout_backward_op.register_fake
def _(grad, q, ctx, cu_seqlens, k_weight, v_weight, norm_weight, ctx_rstd, n_kv_heads, eps, softmax_scale, mode,
      needs):  # fmt: skip
    ins = _ReadoutGrads(q, ctx, k_weight, v_weight, norm_weight, ctx_rstd)
    return [t.new_empty(t.shape) if (n and t is not None) else q.new_empty(0) for t, n in zip(ins, needs)]


def _op_setup_context(ctx, inputs, output):
    q, c, cu, max_seqlen, wk, wv, w, rstd, n_kv, eps, scale, mode, backend = inputs
    ctx.save_for_backward(q, c, cu, wk, wv, w, rstd)
    ctx.args = (n_kv, eps, scale, mode)
    ctx.has_rstd = rstd is not None


def _op_backward(ctx, grad):
    q, c, cu, wk, wv, w, rstd = ctx.saved_tensors
    n = ctx.needs_input_grad  # the op's inputs: q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, norm_weight, rstd
    needs = [bool(n[0]), bool(n[1]), bool(n[4]), bool(n[5]), bool(n[6]), bool(n[7]) and ctx.has_rstd]
    if not any(needs):
        return (None,) * 13
    g = torch.ops.d2l_fast.latent_readout_backward(grad.contiguous(), q, c, cu, wk, wv, w, rstd, *ctx.args, needs)
    g = _ReadoutGrads(*(gi if ni else None for gi, ni in zip(g, needs)))
    return (g.q, g.context, None, None, g.k_weight, g.v_weight, g.norm_weight, g.rstd, None, None, None, None, None)


torch.library.register_autograd("d2l_fast::latent_readout", _op_backward, setup_context=_op_setup_context)


# ------------------------------------------------------------------------------------------ public functional
def _check(cond: bool, msg: str, exc=ValueError):
    if not cond:
        raise exc(msg)


def _validate(
    q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, norm_weight, n_kv_heads, ctx_rstd, mode, backend
):
    _check(isinstance(q, torch.Tensor) and q.dim() == 4, f"q must be [n_seg, n_q, H, hd], got {_shape(q)}")
    _check(isinstance(ctx, torch.Tensor) and ctx.dim() == 2, f"ctx must be [T_total, D], got {_shape(ctx)}")
    n_seg, n_q, H, hd = q.shape
    T, D = ctx.shape
    _check(q.dtype in SUPPORTED_DTYPES, f"q dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}", TypeError)
    _check(ctx.dtype == q.dtype, f"ctx dtype must equal q dtype {q.dtype}, got {ctx.dtype}", TypeError)
    for name, w in (("k_weight", k_weight), ("v_weight", v_weight), ("ctx_norm_weight", norm_weight)):
        _check(
            w.dtype in SUPPORTED_DTYPES, f"{name} dtype must be one of {SUPPORTED_DTYPES}, got {w.dtype}", TypeError
        )
        _check(w.device == ctx.device, f"{name} must be on {ctx.device}, got {w.device}")
    _check(q.device == ctx.device, f"q must be on ctx's device {ctx.device}, got {q.device}")
    _check(
        isinstance(n_kv_heads, int) and n_kv_heads > 0 and H % n_kv_heads == 0,
        f"n_kv_heads must be a positive divisor of H={H}, got {n_kv_heads}",
    )
    kv_shape = (n_kv_heads * hd, D)
    _check(tuple(k_weight.shape) == kv_shape, f"k_weight must have shape {kv_shape}, got {tuple(k_weight.shape)}")
    _check(tuple(v_weight.shape) == kv_shape, f"v_weight must have shape {kv_shape}, got {tuple(v_weight.shape)}")
    _check(
        tuple(norm_weight.shape) == (D,), f"ctx_norm_weight must have shape {(D,)}, got {tuple(norm_weight.shape)}"
    )
    _check(
        isinstance(cu_seqlens, torch.Tensor)
        and cu_seqlens.dtype == torch.int32
        and tuple(cu_seqlens.shape) == (n_seg + 1,),
        f"cu_seqlens must be int32 of shape {(n_seg + 1,)}, got {getattr(cu_seqlens, 'dtype', type(cu_seqlens))} "
        f"{_shape(cu_seqlens)}",
    )
    _check(cu_seqlens.device == ctx.device, f"cu_seqlens must be on {ctx.device}, got {cu_seqlens.device}")
    _check(
        isinstance(max_seqlen, int) and max_seqlen >= 0, f"max_seqlen must be a non-negative int, got {max_seqlen!r}"
    )
    if ctx_rstd is not None:
        _check(
            ctx_rstd.dtype == torch.float32 and tuple(ctx_rstd.shape) == (T,) and ctx_rstd.device == ctx.device,
            f"ctx_rstd must be float32 of shape {(T,)} on {ctx.device}, got {ctx_rstd.dtype} {tuple(ctx_rstd.shape)} "
            f"on {ctx_rstd.device}",
        )
    _check(mode in _MODES, f"mode must be one of {_MODES}, got {mode!r}")
    _check(backend in _BACKENDS, f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "triton":
        msg = f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1, got {q.device}"
        _check(q.is_cuda or interpreting(), msg)


def _shape(x):
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def latent_readout(
    q: torch.Tensor,
    ctx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    ctx_norm_weight: torch.Tensor,
    *,
    n_kv_heads: int,
    eps: float = 1e-6,
    softmax_scale: float | None = None,
    mode: str = "auto",
    backend: str = "auto",
    ctx_rstd: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Perceiver cross-attention readout over a packed, variable-length context.

    For every segment s (tokens cu_seqlens[s]:cu_seqlens[s+1] of ctx) and query head h:

        c_t = w * (C_t / sqrt(mean(C_t^2) + eps))                (RMSNorm, statistics in fp32)
        K_t = c_t @ k_weight.T,  V_t = c_t @ v_weight.T          (n_kv_heads heads of hd)
        out[s, i, h] = softmax_t(q[s, i, h] . K_t[h // (H // n_kv_heads)] * scale) @ V_t[...]

    non-causal, no positional encoding; an empty segment gives zeros. The caller applies o_proj.

    Args:
        q: [n_seg, n_q, H, hd] projected latent queries (one set per segment). fp32, fp16 or bf16.
        ctx: [T_total, D] packed context (same dtype as q); may be a non-contiguous view.
        cu_seqlens: int32 [n_seg + 1], non-decreasing, cu_seqlens[0] == 0; empty segments allowed.
        max_seqlen: python int, the longest segment (sizes the Triton split-K; no device sync).
        k_weight, v_weight: [n_kv_heads * hd, D] (nn.Linear layout).
        ctx_norm_weight: [D] RMSNorm weight of the context.
        n_kv_heads: number of KV heads (GQA); H must be a multiple of it.
        eps: RMSNorm epsilon.
        softmax_scale: defaults to 1 / sqrt(hd).
        mode: "absorbed" (fold w, W_k into the queries and W_v into the output; K/V never exist),
            "plain" (project K/V once, then attend), or "auto" (fewer MACs by `configs.readout_macs`).
        backend: "torch" (CPU fast path; on CUDA it reads cu_seqlens on the host), "triton"
            (CUDA, or CPU tensors under TRITON_INTERPRET=1), "auto" (triton on CUDA, torch otherwise).
        ctx_rstd: optional fp32 [T_total] precomputed 1/sqrt(mean(C^2)+eps). The context is shared by all
            Perceiver blocks (only w differs), so compute it once with `compute_rstd(ctx, eps)`;
            gradients flow into it when it requires grad.

    Returns:
        [n_seg, n_q, H, hd] in q's dtype.

    Example (two documents of 3 and 5 tokens, 8 latents, 16 heads of 128, 4 KV heads, D=512):
        >>> cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        >>> out = latent_readout(q, ctx, cu, 5, wk, wv, w_ctx, n_kv_heads=4)  # q [2, 8, 16, 128], ctx [8, 512]

    Precision: the softmax, its statistics and all accumulations are fp32. In fp16/bf16 the absorbed
    form applies rstd in fp32 and never rounds the normalized context to the input dtype, while the
    reference (and the plain form) round x/rms to the input dtype before multiplying by w.
    """
    _validate(q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, ctx_norm_weight, n_kv_heads, ctx_rstd, mode, backend)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    mode = resolve_mode(mode, q, ctx, n_kv_heads)
    hd = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(hd)
    if torch.compiler.is_compiling():
        return torch.ops.d2l_fast.latent_readout(q, ctx, cu_seqlens, int(max_seqlen), k_weight, v_weight,
                                                 ctx_norm_weight, ctx_rstd, n_kv_heads, float(eps), scale, mode,
                                                 backend)  # fmt: skip
    meta = (int(max_seqlen), n_kv_heads, float(eps), scale, mode, backend)
    return LatentReadoutFunction.apply(q, ctx, cu_seqlens, k_weight, v_weight, ctx_norm_weight, ctx_rstd, meta)
