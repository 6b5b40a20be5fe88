"""Autograd function and public functionals of the segmented multi-LoRA op."""

from __future__ import annotations

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


def _add_(out2, x2, A, B, meta, scale, backend):
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


class SegmentedLoRAFunction(torch.autograd.Function):
    """``delta = segmented_lora(x, A, B)``; backward recomputes the shrink (saves only x, A, B)."""

    @staticmethod
    def forward(ctx, x, A, B, meta, scale, backend):
        delta = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
        _add_(delta, x, A, B, meta, scale, backend)
        ctx.save_for_backward(x, A, B)
        ctx.meta, ctx.scale, ctx.backend = meta, scale, backend
        return delta

    @staticmethod
    def backward(ctx, dy):
        x, A, B = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        # grads of .sum() etc. arrive expanded (stride 0); kernels and index ops want real rows
        dy = dy.contiguous()
        if ctx.backend == "triton":
            dx, dA, dB = segmented_lora_bwd(dy, x, A, B, ctx.meta, ctx.scale, needs)
        else:
            dx, dA, dB = torch_impl.segmented_lora_cpu_bwd(dy, x, A, B, ctx.meta, ctx.scale, needs)
        return dx, dA, dB, None, None, None


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
    if torch.is_grad_enabled():  # no autograd here (a decorator would cost microseconds on every decode call)
        with torch.no_grad():
            _add_(out2, x2, A, B, meta, float(scale), backend)
    else:
        _add_(out2, x2, A, B, meta, float(scale), backend)
    return out
