"""The fused MLP LoRA with torch ops (any device; what runs on the CPU): the activation as one elementwise pass, the
shrink per run of one adapter; the same ``(h, s)`` contract as the Triton path (``s``: one fp32 partial slice)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..segmented_lora.meta import SegmentMeta

__all__ = ["gated_act", "gated_lora_shrink_torch", "gated_lora_expand_torch_"]


def gated_act(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` exactly as HF's MLPs compute it (``F.silu`` / ``F.gelu(approximate="tanh")`` in the
    input's dtype, then the product)."""
    if activation == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


def gated_lora_shrink_torch(gate, up, A, meta: SegmentMeta, scale: float, activation: str):
    """``(h, s)`` with ``s [1, T, max_rank]`` fp32: ``s[0, t, :rl] = scale * h[t] @ A[rs:rs+rl].T`` per run; rows
    without an adapter hold zeros."""
    h = gated_act(gate, up, activation)
    s = torch.zeros(1, gate.shape[0], meta.max_rank, dtype=torch.float32, device=gate.device)
    if meta.runs:
        hf = h if h.dtype == torch.float32 else h.float()
        Af = A if A.dtype == torch.float32 else A.float()
        for t0, t1, rs, rl in meta.runs:
            s[0, t0:t1, :rl] = hf[t0:t1] @ Af[rs : rs + rl].t()
        if scale != 1.0:
            s.mul_(scale)
    return h, s


def gated_lora_expand_torch_(y, s, B, meta: SegmentMeta) -> torch.Tensor:
    """``y[t] += (Σ_i s[i, t, :rl]) @ B[rs:rs+rl]`` per run (fp32 math, one add into y per run)."""
    if not meta.runs:
        return y
    ssum = s[0] if s.shape[0] == 1 else s.sum(0)
    Bf = B if B.dtype == torch.float32 else B.float()
    for t0, t1, rs, rl in meta.runs:
        if y.dtype == torch.float32:
            y[t0:t1].addmm_(ssum[t0:t1, :rl], Bf[rs : rs + rl])
        else:
            y[t0:t1] += (ssum[t0:t1, :rl] @ Bf[rs : rs + rl]).to(y.dtype)
    return y
