"""Public functionals and ``torch.library`` custom ops of the fused MLP LoRA (inference only).

The math lives in :func:`_shrink` / :func:`_expand_` (Triton launchers or the torch path); the custom ops
``d2l_fast::gated_lora_shrink`` (returns ``h`` and the fp32 partials) and ``d2l_fast::gated_lora_expand_`` (in
place on ``y``) call them, with fake implementations, so ``torch.compile`` keeps each call as one node. The public
functions call the ops while compiling and the same plain functions in eager mode (as segmented_lora does: the op's
dispatch layers cost tens of microseconds per call on the host). No autograd: training keeps the unfused path
(``act(gate) * up`` then :func:`~d2l_fast.kernels.segmented_lora.segmented_lora`).
"""

from __future__ import annotations

import torch

from ..segmented_lora.function import _layout, _meta_of
from ..segmented_lora.meta import SegmentMeta
from . import torch_impl
from .launch import (
    gated_lora_expand_fwd,
    gated_lora_shrink_fwd,
    partial_count,
    validate_expand,
    validate_shrink,
)

__all__ = ["BACKENDS", "gated_lora_shrink", "gated_lora_expand_", "fused_mlp_lora"]

BACKENDS = ("auto", "triton", "torch")


def _resolve_backend(backend: str, t: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if t.is_cuda else "torch"
    return backend


def _no_grad_inputs(what: str, *ts: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts):
        raise ValueError(f"{what} is inference-only (no autograd): expected inputs that do not require grad (or "
                         "torch.no_grad()), got one that requires grad; train through act(gate) * up and "
                         "segmented_lora instead")  # fmt: skip


def _flat(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape [..., d] with at least 2 dims, got {tuple(t.shape)}")
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


# ------------------------------------------------------------------------------------------ the math
def _shrink(gate2, up2, A, meta: SegmentMeta, scale: float, activation: str, backend: str):
    if backend == "triton":
        return gated_lora_shrink_fwd(gate2, up2, A, meta, scale, activation)
    validate_shrink(gate2, up2, A, meta, activation)
    return torch_impl.gated_lora_shrink_torch(gate2, up2, A, meta, scale, activation)


def _expand_(y2, s, B, meta: SegmentMeta, backend: str):
    if backend == "triton":
        return gated_lora_expand_fwd(y2, s, B, meta)
    validate_expand(y2, s, B, meta)
    return torch_impl.gated_lora_expand_torch_(y2, s, B, meta)


# ------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("d2l_fast::gated_lora_shrink", mutates_args=())
def _shrink_op(gate: torch.Tensor, up: torch.Tensor, A: torch.Tensor, cu_seqlens: list[int], rank_start: list[int],
               rank_len: list[int], scale: float, activation: str,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    with torch.no_grad():
        meta = _meta_of(cu_seqlens, rank_start, rank_len, gate.device)
        h, s = _shrink(gate, up, A, meta, scale, activation, backend)
    return h, s.contiguous()


@_shrink_op.register_fake
def _(gate, up, A, cu_seqlens, rank_start, rank_len, scale, activation, backend):
    T = cu_seqlens[-1]
    max_rank = max(rank_len, default=0)
    lens = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    has_runs = any(n > 0 and r > 0 for n, r in zip(lens, rank_len))
    n = 1 if backend == "torch" else partial_count(T, max(lens, default=0), max_rank, has_runs, gate.shape[1],
                                                   gate.device)  # fmt: skip
    return gate.new_empty(gate.shape), gate.new_empty(n, T, max_rank, dtype=torch.float32)


@torch.library.custom_op("d2l_fast::gated_lora_expand_", mutates_args=("y",))
def _expand_op(y: torch.Tensor, s: torch.Tensor, B: torch.Tensor, cu_seqlens: list[int], rank_start: list[int],
               rank_len: list[int], backend: str) -> None:  # fmt: skip
    with torch.no_grad():
        _expand_(y, s, B, _meta_of(cu_seqlens, rank_start, rank_len, y.device), backend)


@_expand_op.register_fake
def _(y, s, B, cu_seqlens, rank_start, rank_len, backend):
    return None


# ------------------------------------------------------------------------------------------ public functionals
def gated_lora_shrink(gate: torch.Tensor, up: torch.Tensor, A: torch.Tensor, meta: SegmentMeta, scale: float = 1.0,
                      *, activation: str = "silu", backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Gated activation with down_proj's LoRA shrink fused in: ``(h, s)``.

    ``h = act(gate) * up`` (what ``down_proj`` reads, in gate's dtype, gate's leading shape) and ``s``, fp32
    ``[n_splits, T, max_rank]`` partials whose sum over dim 0 is ``scale * h[t] @ A[rs:rs+rl].T`` for every token
    ``t`` of a segment with an adapter (other rows / rank columns are never read: pass ``s`` to
    :func:`gated_lora_expand_` as is). gate and up are read once; h is written once.

    Args:
        gate, up: ``[..., d_ff]`` outputs of gate_proj and up_proj (any strides, one dtype: fp32, fp16 or bf16).
        A: ``[R_total, d_ff]`` ragged adapters of down_proj (``lora_A`` rows concatenated), gate's dtype.
        meta: the batch's :class:`~d2l_fast.kernels.segmented_lora.SegmentMeta` (``meta.n_tokens == T``).
        scale: LoRA scaling. activation: ``"silu"`` (Llama, Qwen, Mistral) or ``"gelu_tanh"`` (Gemma).
        backend: ``"auto"`` (CUDA: Triton, CPU: torch), ``"triton"`` (CPU tensors under ``TRITON_INTERPRET=1``),
            ``"torch"``.
    """
    backend = _resolve_backend(backend, gate)
    _no_grad_inputs("gated_lora_shrink", gate, up, A)
    lead = gate.shape[:-1] if isinstance(gate, torch.Tensor) else None
    g2, u2 = _flat(gate, "gate"), _flat(up, "up")
    if torch.compiler.is_compiling():
        validate_shrink(g2, u2, A, meta, activation)
        h, s = torch.ops.d2l_fast.gated_lora_shrink(g2, u2, A, *_layout(meta), float(scale), activation, backend)
    else:
        with torch.no_grad():
            h, s = _shrink(g2, u2, A, meta, float(scale), activation, backend)
    return h.view(*lead, h.shape[-1]), s


def gated_lora_expand_(y: torch.Tensor, s: torch.Tensor, B: torch.Tensor, meta: SegmentMeta, *,
                       backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """``y[t] += (Σ_i s[i, t, :rl]) @ B[rs:rs+rl]`` in place for every token with an adapter; returns ``y``.

    ``y`` is down_proj's output ``[..., d_model]`` (viewable as ``[T, d_model]``), ``s`` the partials of
    :func:`gated_lora_shrink` of the same batch, ``B [R_total, d_model]`` rank-major in y's dtype. The Triton path
    reads and writes each adapted row of ``y`` once (segmented_lora's expand kernel). Validation errors leave ``y``
    unchanged."""
    backend = _resolve_backend(backend, y) if isinstance(y, torch.Tensor) else backend
    _no_grad_inputs("gated_lora_expand_", y, B)
    _flat(y, "y")  # type and rank checks
    try:
        y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
    except RuntimeError as e:
        raise ValueError(f"y must be viewable as [T, d_model], got strides {y.stride()}") from e
    if torch.compiler.is_compiling():
        validate_expand(y2, s, B, meta)
        torch.ops.d2l_fast.gated_lora_expand_(y2, s, B, *_layout(meta), backend)
    else:
        with torch.no_grad():
            _expand_(y2, s, B, meta, backend)
    return y


def fused_mlp_lora(gate: torch.Tensor, up: torch.Tensor, down, A: torch.Tensor, B: torch.Tensor, meta: SegmentMeta,
                   scale: float = 1.0, *, activation: str = "silu", backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """The tail of a gated MLP with LoRA on down_proj: ``down(act(gate) * up) + scale * LoRA(act(gate) * up)``.

    ``down`` is the bare down_proj (a callable ``[..., d_ff] -> [..., d_model]``, e.g. ``F.linear`` with its weight);
    the shrink is fused into the activation (:func:`gated_lora_shrink`) and the expand is added into down's output
    in place (:func:`gated_lora_expand_`)."""
    if not callable(down):
        raise TypeError(f"down must be a callable (down_proj without LoRA), got {type(down).__name__}")
    h, s = gated_lora_shrink(gate, up, A, meta, scale, activation=activation, backend=backend)
    y = down(h)
    return gated_lora_expand_(y, s, B, meta, backend=backend)
