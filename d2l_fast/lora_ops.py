"""The segmented multi-LoRA op used by the patched Linears (re-exported from :mod:`d2l_fast.kernels.segmented_lora`)."""

from .kernels.segmented_lora import SegmentMeta, segmented_lora, segmented_lora_

__all__ = ["SegmentMeta", "segmented_lora", "segmented_lora_"]
