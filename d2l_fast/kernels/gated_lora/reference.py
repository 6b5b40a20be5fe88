"""Executable spec of the fused MLP LoRA: the gated activation, then segmented LoRA on its output, one segment at a
time, in fp64 (or fp32)."""

from __future__ import annotations

import math

import torch

from ..segmented_lora.reference import segmented_lora_ref

__all__ = ["activation_ref", "gated_lora_ref"]


def activation_ref(g: torch.Tensor, activation: str) -> torch.Tensor:
    """``silu(g)`` or GELU with the tanh approximation (Gemma's ``gelu_pytorch_tanh``), written out."""
    if activation == "silu":
        return g * torch.sigmoid(g)
    if activation == "gelu_tanh":
        return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g.pow(3))))
    raise ValueError(f"activation must be 'silu' or 'gelu_tanh', got {activation!r}")


def gated_lora_ref(gate, up, A, B, cu_seqlens, seg_rank_start, seg_rank_len, scale=1.0, activation="silu",
                   upcast=True):  # fmt: skip
    """``(h, delta)``: ``h = act(gate) * up`` rounded to gate's dtype (what down_proj reads), and the LoRA delta of
    down_proj ``delta[t] = scale * (h[t] @ A[rs:rs+rl].T) @ B[rs:rs+rl]`` per segment, in gate's dtype.

    Args:
        gate, up: ``[T, d_ff]`` (the outputs of gate_proj and up_proj).
        A: ``[R_total, d_ff]``; B: ``[R_total, d_model]`` (rank-major); the segment layout as in segmented_lora_ref.
        upcast: compute in fp64 (``True``) or fp32 (``False``).
    """
    compute = torch.float64 if upcast else torch.float32
    h = (activation_ref(gate.to(compute), activation) * up.to(compute)).to(gate.dtype)
    delta = segmented_lora_ref(h, A, B, cu_seqlens, seg_rank_start, seg_rank_len, scale, upcast=upcast)
    return h, delta
