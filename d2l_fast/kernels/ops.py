"""The kernels as ``torch.library`` custom operators, so ``torch.compile`` traces through them.

Without registration, dynamo stops at the autograd Functions and Python metadata objects of the kernels
(a graph break per LoRA layer). Here each op has a schema of tensors, ints, floats and strings only, a fake
(meta) implementation that gives output shapes without running anything, and a registered autograd formula,
so compiled graphs keep the ops as single nodes (``backend="eager"``, ``"aot_eager"`` and inductor) and CUDA
graphs can capture them.

Ops (namespace ``d2l_fast``):

* ``segmented_lora(x, A, B, cu_seqlens, rank_start, rank_len, scale, backend) -> delta`` (autograd: dx, dA, dB)
* ``segmented_lora_(out!, x, A, B, cu_seqlens, rank_start, rank_len, scale, backend)`` (in place, no autograd)
* ``latent_readout(q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, norm_weight, ctx_rstd?, n_kv_heads,
  eps, softmax_scale, mode, backend) -> out`` (autograd: q, ctx, weights, ctx_rstd)

The segment layout travels as host int lists (``SegmentMeta``'s ``*_host`` tuples): a compiled graph
specialises on them, which suits decode (one layout per batch of rows) and avoids any device-to-host sync.
The metadata object is rebuilt from them at most once per layout (small LRU cache).

Python entry points mirroring the functional API: :func:`segmented_lora_op`, :func:`segmented_lora_op_`,
:func:`latent_readout_op`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from types import SimpleNamespace

import torch

from .latent_readout.function import LatentReadoutFunction, resolve_mode
from .segmented_lora.function import SegmentedLoRAFunction, _add_, _flatten, _resolve_backend
from .segmented_lora.launch import validate_inputs
from .segmented_lora.meta import SegmentMeta

__all__ = ["segmented_lora_op", "segmented_lora_op_", "latent_readout_op"]

_META_CACHE: OrderedDict = OrderedDict()
_META_CACHE_SIZE = 64


def _meta(cu_seqlens: list[int], rank_start: list[int], rank_len: list[int], device: torch.device) -> SegmentMeta:
    key = (tuple(cu_seqlens), tuple(rank_start), tuple(rank_len), str(device))
    meta = _META_CACHE.get(key)
    if meta is None:
        lens = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
        meta = SegmentMeta.from_rank_ranges(lens, rank_start, rank_len, device)
        _META_CACHE[key] = meta
        if len(_META_CACHE) > _META_CACHE_SIZE:
            _META_CACHE.popitem(last=False)
    else:
        _META_CACHE.move_to_end(key)
    return meta


def _layout(meta: SegmentMeta) -> tuple[list[int], list[int], list[int]]:
    if not isinstance(meta, SegmentMeta):
        raise TypeError(f"meta must be a SegmentMeta, got {type(meta).__name__}")
    return list(meta.cu_seqlens_host), list(meta.rank_start_host), list(meta.rank_len_host)


# ------------------------------------------------------------------------------------------ segmented LoRA
@torch.library.custom_op("d2l_fast::segmented_lora", mutates_args=())
def _segmented_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, cu_seqlens: list[int], rank_start: list[int],
                    rank_len: list[int], scale: float, backend: str) -> torch.Tensor:  # fmt: skip
    meta = _meta(cu_seqlens, rank_start, rank_len, x.device)
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        _add_(out, x, A, B, meta, scale, backend)
    return out


@_segmented_lora.register_fake
def _(x, A, B, cu_seqlens, rank_start, rank_len, scale, backend):
    return x.new_empty(x.shape[0], B.shape[1])


@torch.library.custom_op("d2l_fast::segmented_lora_backward", mutates_args=())
def _segmented_lora_backward(dy: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, cu_seqlens: list[int],
                             rank_start: list[int], rank_len: list[int], scale: float, backend: str,
                             needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    meta = _meta(cu_seqlens, rank_start, rank_len, x.device)
    ctx = SimpleNamespace(saved_tensors=(x, A, B), needs_input_grad=(*needs, False, False, False), meta=meta,
                          scale=scale, backend=backend)  # fmt: skip
    grads = SegmentedLoRAFunction.backward(ctx, dy)[:3]
    # an op returns tensors only: an empty tensor stands for "not needed"
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, (x, A, B)))


@_segmented_lora_backward.register_fake
def _(dy, x, A, B, cu_seqlens, rank_start, rank_len, scale, backend, needs):
    return tuple(t.new_empty(t.shape) if n else t.new_empty(0) for t, n in zip((x, A, B), needs))


def _seg_setup_context(ctx, inputs, output):
    x, A, B, cu, rs, rl, scale, backend = inputs
    ctx.save_for_backward(x, A, B)
    ctx.layout = (cu, rs, rl, scale, backend)


def _seg_backward(ctx, dy):
    x, A, B = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    if not any(needs):
        return None, None, None, None, None, None, None, None
    dx, dA, dB = torch.ops.d2l_fast.segmented_lora_backward(dy.contiguous(), x, A, B, *ctx.layout, needs)
    return (dx if needs[0] else None, dA if needs[1] else None, dB if needs[2] else None,
            None, None, None, None, None)  # fmt: skip


torch.library.register_autograd("d2l_fast::segmented_lora", _seg_backward, setup_context=_seg_setup_context)


@torch.library.custom_op("d2l_fast::segmented_lora_", mutates_args=("out",))
def _segmented_lora_inplace(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                            cu_seqlens: list[int], rank_start: list[int], rank_len: list[int], scale: float,
                            backend: str) -> None:  # fmt: skip
    meta = _meta(cu_seqlens, rank_start, rank_len, x.device)
    with torch.no_grad():
        _add_(out, x, A, B, meta, scale, backend)


@_segmented_lora_inplace.register_fake
def _(out, x, A, B, cu_seqlens, rank_start, rank_len, scale, backend):
    return None


def segmented_lora_op(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, meta: SegmentMeta, scale: float = 1.0, *,
                      backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """:func:`~d2l_fast.kernels.segmented_lora.segmented_lora` as the custom op ``d2l_fast::segmented_lora``
    (same arguments, same result, differentiable; ``torch.compile`` keeps it as one node)."""
    backend = _resolve_backend(backend, x)
    lead = x.shape[:-1]
    x2 = _flatten(x, "x")
    validate_inputs(x2, A, B, meta)
    delta = torch.ops.d2l_fast.segmented_lora(x2, A, B, *_layout(meta), float(scale), backend)
    return delta.reshape(*lead, B.shape[1])


def segmented_lora_op_(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, meta: SegmentMeta,
                       scale: float = 1.0, *, backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """:func:`~d2l_fast.kernels.segmented_lora.segmented_lora_` (in place) as ``d2l_fast::segmented_lora_``."""
    backend = _resolve_backend(backend, x)
    x2 = _flatten(x, "x")
    if not isinstance(out, torch.Tensor) or tuple(out.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(f"out must be a tensor with leading shape {tuple(x.shape[:-1])} like x, got "
                         f"{tuple(getattr(out, 'shape', ()))}")  # fmt: skip
    out2 = out if out.dim() == 2 else out.view(-1, out.shape[-1])
    validate_inputs(x2, A, B, meta, out2)
    torch.ops.d2l_fast.segmented_lora_(out2, x2, A, B, *_layout(meta), float(scale), backend)
    return out


# ------------------------------------------------------------------------------------------ latent readout
_READOUT_GRAD_SLOTS = (0, 1, 3, 4, 5, 6)  # q, ctx, k_weight, v_weight, norm_weight, ctx_rstd in the Function's inputs


@torch.library.custom_op("d2l_fast::latent_readout", mutates_args=())
def _latent_readout(q: torch.Tensor, ctx: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                    k_weight: torch.Tensor, v_weight: torch.Tensor, norm_weight: torch.Tensor,
                    ctx_rstd: torch.Tensor | None, n_kv_heads: int, eps: float, softmax_scale: float, mode: str,
                    backend: str) -> torch.Tensor:  # fmt: skip
    meta = (max_seqlen, n_kv_heads, eps, softmax_scale, mode, backend)
    fctx = SimpleNamespace(save_for_backward=lambda *t: None)
    with torch.no_grad():
        return LatentReadoutFunction.forward(fctx, q, ctx, cu_seqlens, k_weight, v_weight, norm_weight, ctx_rstd, meta)


@_latent_readout.register_fake
def _(q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, norm_weight, ctx_rstd, n_kv_heads, eps, softmax_scale,
      mode, backend):  # fmt: skip
    return q.new_empty(q.shape)


@torch.library.custom_op("d2l_fast::latent_readout_backward", mutates_args=())
def _latent_readout_backward(grad: torch.Tensor, q: torch.Tensor, ctx: torch.Tensor, cu_seqlens: torch.Tensor,
                             max_seqlen: int, k_weight: torch.Tensor, v_weight: torch.Tensor,
                             norm_weight: torch.Tensor, ctx_rstd: torch.Tensor | None, n_kv_heads: int, eps: float,
                             softmax_scale: float, mode: str, backend: str,
                             needs: list[bool]) -> list[torch.Tensor]:  # fmt: skip
    flags = [False] * 8
    for slot, n in zip(_READOUT_GRAD_SLOTS, needs):
        flags[slot] = n
    fctx = SimpleNamespace(saved_tensors=(q, ctx, cu_seqlens, k_weight, v_weight, norm_weight, ctx_rstd),
                           meta=(max_seqlen, n_kv_heads, eps, softmax_scale, mode, backend),
                           needs_input_grad=tuple(flags))  # fmt: skip
    grads = LatentReadoutFunction.backward(fctx, grad)
    ins = (q, ctx, cu_seqlens, k_weight, v_weight, norm_weight, ctx_rstd)
    out = []
    for slot in _READOUT_GRAD_SLOTS:
        g, t = grads[slot], ins[slot]
        out.append(g if g is not None else (t if t is not None else q).new_empty(0))
    return out


@_latent_readout_backward.register_fake
def _(grad, q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, norm_weight, ctx_rstd, n_kv_heads, eps,
      softmax_scale, mode, backend, needs):  # fmt: skip
    ins = (q, ctx, cu_seqlens, k_weight, v_weight, norm_weight, ctx_rstd)
    out = []
    for slot, n in zip(_READOUT_GRAD_SLOTS, needs):
        t = ins[slot]
        out.append(t.new_empty(t.shape) if (n and t is not None) else q.new_empty(0))
    return out


def _readout_setup_context(ctx, inputs, output):
    q, c, cu, max_seqlen, wk, wv, w, rstd, n_kv, eps, scale, mode, backend = inputs
    ctx.save_for_backward(q, c, cu, wk, wv, w, rstd)
    ctx.args = (max_seqlen, n_kv, eps, scale, mode, backend)
    ctx.has_rstd = rstd is not None


def _readout_backward(ctx, grad):
    q, c, cu, wk, wv, w, rstd = ctx.saved_tensors
    ni = ctx.needs_input_grad
    needs = [bool(ni[0]), bool(ni[1]), bool(ni[4]), bool(ni[5]), bool(ni[6]), bool(ni[7]) and ctx.has_rstd]
    if not any(needs):
        return (None,) * 13
    max_seqlen, n_kv, eps, scale, mode, backend = ctx.args
    gq, gc, gwk, gwv, gw, gr = torch.ops.d2l_fast.latent_readout_backward(
        grad.contiguous(), q, c, cu, max_seqlen, wk, wv, w, rstd, n_kv, eps, scale, mode, backend, needs
    )
    pick = [g if n else None for g, n in zip((gq, gc, gwk, gwv, gw, gr), needs)]
    return (pick[0], pick[1], None, None, pick[2], pick[3], pick[4], pick[5], None, None, None, None, None)


torch.library.register_autograd("d2l_fast::latent_readout", _readout_backward, setup_context=_readout_setup_context)


def latent_readout_op(q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, ctx_norm_weight, *, n_kv_heads: int,
                      eps: float = 1e-6, softmax_scale: float | None = None, mode: str = "auto",
                      backend: str = "auto", ctx_rstd=None) -> torch.Tensor:  # fmt: skip
    """:func:`~d2l_fast.kernels.latent_readout.latent_readout` as the custom op ``d2l_fast::latent_readout``
    (same arguments and result, differentiable; ``torch.compile`` keeps it as one node)."""
    from .latent_readout.function import _validate

    _validate(q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, ctx_norm_weight, n_kv_heads, ctx_rstd, mode, backend)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    mode = resolve_mode(mode, q, ctx, n_kv_heads)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.d2l_fast.latent_readout(q, ctx, cu_seqlens, int(max_seqlen), k_weight, v_weight, ctx_norm_weight,
                                             ctx_rstd, int(n_kv_heads), float(eps), scale, mode, backend)
