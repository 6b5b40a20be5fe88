"""Segmented multi-LoRA: ``out[t] += scale * (x[t] @ A[rs:rs+rl].T) @ B[rs:rs+rl]`` per segment.

Public API: :func:`segmented_lora` (autograd), :func:`segmented_lora_` (in-place, inference),
:class:`SegmentMeta` (per-batch metadata), :func:`segmented_lora_ref` (executable spec).
"""

from .function import BACKENDS, SegmentedLoRAFunction, segmented_lora, segmented_lora_
from .meta import AdapterGroup, SegmentMeta
from .reference import segmented_lora_ref

__all__ = [
    "segmented_lora",
    "segmented_lora_",
    "SegmentedLoRAFunction",
    "SegmentMeta",
    "AdapterGroup",
    "segmented_lora_ref",
    "BACKENDS",
]
