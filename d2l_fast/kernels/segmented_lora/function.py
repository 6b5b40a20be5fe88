"""Forward/backward math, the ``torch.library`` custom ops and the public functionals of the segmented multi-LoRA op.

One implementation, two dispatch modes:

* the math lives in plain functions: :func:`_add_` (``out += delta``), :func:`_segmented_lora_fwd` and
  :func:`_segmented_lora_bwd`;
* the custom ops ``d2l_fast::segmented_lora`` (differentiable, via ``torch.library.register_autograd``),
  ``d2l_fast::segmented_lora_backward`` and ``d2l_fast::segmented_lora_`` (in place) call them. Their schemas hold
  tensors, ints, floats and strings only (the segment layout travels as the ``SegmentMeta``'s ``*_host`` int
  lists), each has a fake implementation, so ``torch.compile`` keeps every call as one node (``backend="eager"``,
  ``"aot_eager"``, inductor) and CUDA graphs can capture it;
* :class:`SegmentedLoRAFunction` (eager autograd) calls the same two functions.

The public :func:`segmented_lora` / :func:`segmented_lora_` validate their inputs, then call the custom op while
``torch.compile`` traces them (``torch.compiler.is_compiling()``) and the plain functions directly otherwise. Why
not the op in eager mode too: a ``custom_op`` call runs three Python layers of dispatch (autograd wrapper,
ADInplaceOrView, backend), which on a decode-shaped CPU call (8 rows, d=576, rank 8, torch backend, 1 thread,
medians of 7×1000 calls on a shared 2-core box) measured 122 -> 281 µs for the in-place variant, 173 -> 227 µs
for ``segmented_lora`` under no_grad and 174 -> 334 µs with x requiring grad; a decode step calls it for
every LoRA'd projection of every layer. Both modes run the same functions on the same inputs, so their results
are identical; ``tests/kernels/test_ops.py`` checks the op (``torch.library.opcheck``), the compiled public
functions (``fullgraph=True``) and the eager ones against the reference.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from . import torch_impl
from .launch import segmented_lora_bwd, segmented_lora_fwd, validate_inputs
from .meta import SegmentMeta
from .reference import segmented_lora_ref

__all__ = ["SegmentedLoRAFunction", "segmented_lora", "segmented_lora_", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch", "reference")


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    return backend


def _flatten(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [..., d] with at least 2 dims, got {tuple(x.shape)}")
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


# ------------------------------------------------------------------------------------------ the math
def _add_(out2, x2, A, B, meta, scale, backend):
    """``out2 += scale * segmented_lora(x2, A, B)`` on ``backend`` (no autograd); returns ``out2``."""
    if backend == "triton":
        segmented_lora_fwd(out2, x2, A, B, meta, scale)
    elif backend == "torch":
        validate_inputs(x2, A, B, meta, out2)
        torch_impl.segmented_lora_cpu_(out2, x2, A, B, meta, scale)
    else:
        validate_inputs(x2, A, B, meta, out2)
        out2.add_(
            segmented_lora_ref(x2, A, B, meta.cu_seqlens, meta.seg_rank_start, meta.seg_rank_len, scale, upcast=False)
        )
    return out2


def _segmented_lora_fwd(x2, A, B, meta: SegmentMeta, scale: float, backend: str) -> torch.Tensor:
    """``delta [T, d_out]`` of ``x2 [T, d_in]`` (a fresh tensor in x's dtype)."""
    delta = torch.zeros(x2.shape[0], B.shape[1], dtype=x2.dtype, device=x2.device)
    return _add_(delta, x2, A, B, meta, scale, backend)


def _segmented_lora_bwd(dy, x2, A, B, meta: SegmentMeta, scale: float, backend: str, needs):
    """``(dx, dA, dB)`` given ``dy = d loss / d delta``; an entry is None where ``needs`` says False.

    Recomputes the shrink ``x @ A.T`` (the forward saves only x, A, B)."""
    needs = tuple(bool(n) for n in needs)
    # grads of .sum() etc. arrive expanded (stride 0); kernels and index ops want real rows
    dy = dy.contiguous()
    if backend == "triton":
        return segmented_lora_bwd(dy, x2, A, B, meta, scale, needs)
    return torch_impl.segmented_lora_cpu_bwd(dy, x2, A, B, meta, scale, needs)


class SegmentedLoRAFunction(torch.autograd.Function):
    """``delta = segmented_lora(x, A, B)`` for eager autograd; backward recomputes the shrink (saves only x, A, B)."""

    @staticmethod
    def forward(ctx, x, A, B, meta, scale, backend):
        ctx.save_for_backward(x, A, B)
        ctx.meta, ctx.scale, ctx.backend = meta, scale, backend
        return _segmented_lora_fwd(x, A, B, meta, scale, backend)

    @staticmethod
    def backward(ctx, dy):
        x, A, B = ctx.saved_tensors
        dx, dA, dB = _segmented_lora_bwd(dy, x, A, B, ctx.meta, ctx.scale, ctx.backend, ctx.needs_input_grad[:3])
        return dx, dA, dB, None, None, None


# ------------------------------------------------------------------------------------------ custom ops
_META_CACHE: OrderedDict = OrderedDict()
_META_CACHE_SIZE = 64


def _meta_of(cu_seqlens: list[int], rank_start: list[int], rank_len: list[int], device: torch.device) -> SegmentMeta:
    """The SegmentMeta of a layout given as host int lists (the ops' schema), rebuilt at most once per layout."""
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
    return list(meta.cu_seqlens_host), list(meta.rank_start_host), list(meta.rank_len_host)


@torch.library.custom_op("d2l_fast::segmented_lora", mutates_args=())
def _segmented_lora_op(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, cu_seqlens: list[int],
                       rank_start: list[int], rank_len: list[int], scale: float,
                       backend: str) -> torch.Tensor:  # fmt: skip
    with torch.no_grad():
        return _segmented_lora_fwd(x, A, B, _meta_of(cu_seqlens, rank_start, rank_len, x.device), scale, backend)


@_segmented_lora_op.register_fake
def _(x, A, B, cu_seqlens, rank_start, rank_len, scale, backend):
    return x.new_empty(x.shape[0], B.shape[1])


@torch.library.custom_op("d2l_fast::segmented_lora_backward", mutates_args=())
def _segmented_lora_backward_op(dy: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                                cu_seqlens: list[int], rank_start: list[int], rank_len: list[int], scale: float,
                                backend: str,
                                needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    meta = _meta_of(cu_seqlens, rank_start, rank_len, x.device)
    grads = _segmented_lora_bwd(dy, x, A, B, meta, scale, backend, needs)
    # an op returns tensors only: an empty tensor stands for "not needed"
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, (x, A, B)))


@_segmented_lora_backward_op.register_fake
def _(dy, x, A, B, cu_seqlens, rank_start, rank_len, scale, backend, needs):
    return tuple(t.new_empty(t.shape) if n else t.new_empty(0) for t, n in zip((x, A, B), needs))


def _op_setup_context(ctx, inputs, output):
    x, A, B, cu, rs, rl, scale, backend = inputs
    ctx.save_for_backward(x, A, B)
    ctx.layout = (cu, rs, rl, scale, backend)


def _op_backward(ctx, dy):
    x, A, B = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    if not any(needs):
        return (None,) * 8
    grads = torch.ops.d2l_fast.segmented_lora_backward(dy, x, A, B, *ctx.layout, needs)
    return (*(g if n else None for g, n in zip(grads, needs)), None, None, None, None, None)


torch.library.register_autograd("d2l_fast::segmented_lora", _op_backward, setup_context=_op_setup_context)


@torch.library.custom_op("d2l_fast::segmented_lora_", mutates_args=("out",))
def _segmented_lora_inplace_op(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                               cu_seqlens: list[int], rank_start: list[int], rank_len: list[int], scale: float,
                               backend: str) -> None:  # fmt: skip
    with torch.no_grad():
        _add_(out, x, A, B, _meta_of(cu_seqlens, rank_start, rank_len, x.device), scale, backend)


@_segmented_lora_inplace_op.register_fake
def _(out, x, A, B, cu_seqlens, rank_start, rank_len, scale, backend):
    return None


# ------------------------------------------------------------------------------------------ public functionals


def segmented_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    meta: SegmentMeta,
    scale: float = 1.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Segmented multi-LoRA delta: ``delta[t] = scale * (x[t] @ A[rs:rs+rl].T) @ B[rs:rs+rl]``.

    Token ``t`` of segment ``s`` uses the rank rows ``[rs, rs + rl)`` given by ``meta`` (``rl == 0``:
    no adapter, delta 0). Differentiable w.r.t. ``x``, ``A`` and ``B``.

    Args:
        x: ``[T, d_in]`` or ``[..., d_in]`` (flattened to ``T`` rows); any strides.
        A: ``[R_total, d_in]`` ragged adapters, concatenated along the rank axis.
        B: ``[R_total, d_out]`` rank-major (PEFT's ``lora_B.weight`` transposed).
        meta: :class:`SegmentMeta` of the batch (``meta.n_tokens == T``).
        scale: LoRA scaling (``alpha / r`` in PEFT terms; one scale per call).
        backend: ``"auto"`` (CUDA: Triton, CPU: torch path), ``"triton"`` (also runs under
            ``TRITON_INTERPRET=1`` on CPU tensors), ``"torch"`` (torch_impl.py), ``"reference"``.

    x, A and B must share one dtype (fp32, fp16 or bf16); accumulation is fp32.

    Returns:
        ``delta`` with shape ``[..., d_out]`` and ``x``'s dtype.

    Example::

        offs = [0, 8, 24]                       # adapter 0: rank 8, adapter 1: rank 16
        meta = SegmentMeta.from_lengths([4, 6], [1, 0], offs, device=x.device)
        y = base(x) + segmented_lora(x, A, B, meta, scale=2.0)    # x: [10, d_in]
    """
    backend = _resolve_backend(backend, x)
    lead = x.shape[:-1]
    x2 = _flatten(x, "x")
    validate_inputs(x2, A, B, meta)
    if torch.compiler.is_compiling():
        delta = torch.ops.d2l_fast.segmented_lora(x2, A, B, *_layout(meta), float(scale), backend)
    else:
        delta = SegmentedLoRAFunction.apply(x2, A, B, meta, float(scale), backend)
    return delta.reshape(*lead, B.shape[1])


def segmented_lora_(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    meta: SegmentMeta,
    scale: float = 1.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """In-place inference variant: ``out += segmented_lora(x, A, B, meta, scale)``; returns ``out``.

    ``out`` is typically the base layer's output ``[..., d_out]`` (same leading shape as ``x``; it must be
    viewable as ``[T, d_out]``). No autograd. On validation errors ``out`` is left unchanged.

    Example (HF decode, x: [B, 1, d_in], one adapter per row)::

        meta = SegmentMeta.uniform(B, 1, row_adapter, offs, device=x.device)   # once per step
        y = base(x); segmented_lora_(y, x, A, B_rank_major, meta, scale)        # every layer
    """
    backend = _resolve_backend(backend, x)
    x2 = _flatten(x, "x")
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(f"out must have leading shape {tuple(x.shape[:-1])} like x, got {tuple(out.shape)}")
    try:
        out2 = out if out.dim() == 2 else out.view(-1, out.shape[-1])
    except RuntimeError as e:
        raise ValueError(f"out must be viewable as [T, d_out], got strides {out.stride()}") from e
    if torch.compiler.is_compiling():
        validate_inputs(x2, A, B, meta, out2)
        torch.ops.d2l_fast.segmented_lora_(out2, x2, A, B, *_layout(meta), float(scale), backend)
    elif torch.is_grad_enabled():  # no autograd here (a decorator would cost microseconds on every decode call)
        with torch.no_grad():
            _add_(out2, x2, A, B, meta, float(scale), backend)
    else:
        _add_(out2, x2, A, B, meta, float(scale), backend)
    return out
