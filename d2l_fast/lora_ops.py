"""The segmented multi-LoRA op used by the patched Linears.

Re-exports :mod:`d2l_fast.kernels.segmented_lora` (Triton on CUDA, grouped torch on CPU). Until that
package is importable this module provides a minimal per-segment torch version with the same API.
"""

from __future__ import annotations

try:  # pragma: no cover - exercised once the kernel package lands
    from .kernels.segmented_lora import SegmentMeta, segmented_lora, segmented_lora_  # noqa: F401
except Exception:  # minimal fallback (kernel package absent or still in development)
    from dataclasses import dataclass

    import torch

    @dataclass(frozen=True)
    class SegmentMeta:
        bounds: list
        rank_ranges: list
        n_tokens: int

        @classmethod
        def from_lengths(cls, seq_lens, seg_adapter, adapter_rank_offsets, device=None):
            b, s = [], 0
            for n in seq_lens:
                b.append((s, s + n))
                s += n
            rr = [(adapter_rank_offsets[a], adapter_rank_offsets[a + 1]) if a >= 0 else (0, 0) for a in seg_adapter]
            return cls(b, rr, s)

        @classmethod
        def uniform(cls, n_rows, seq_len, row_adapter, adapter_rank_offsets, device=None):
            return cls.from_lengths([seq_len] * n_rows, row_adapter, adapter_rank_offsets, device)

    def segmented_lora(x, A, B, meta, scale=1.0):
        parts = []
        for (a, b), (rs, re) in zip(meta.bounds, meta.rank_ranges):
            if re > rs:
                parts.append(scale * ((x[a:b] @ A[rs:re].t()) @ B[rs:re]))
            else:
                parts.append(x.new_zeros(b - a, B.shape[1]))
        return torch.cat(parts) if parts else x.new_zeros(0, B.shape[1])

    def segmented_lora_(out, x, A, B, meta, scale=1.0):
        for (a, b), (rs, re) in zip(meta.bounds, meta.rank_ranges):
            if re > rs and b > a:
                out[a:b].addmm_(x[a:b] @ A[rs:re].t(), B[rs:re], alpha=scale)
        return out
