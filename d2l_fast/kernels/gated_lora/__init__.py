"""Gated MLP activation with down_proj's segmented LoRA fused in (prefill, inference).

``h = act(gate) * up`` and the LoRA shrink ``scale * h @ A_s.T`` per segment in one pass over gate/up
(:func:`gated_lora_shrink`), the expand added into down_proj's output in place (:func:`gated_lora_expand_`);
:func:`fused_mlp_lora` chains them around a bare down_proj. :func:`gated_lora_ref` is the executable spec.
"""

from .function import BACKENDS, fused_mlp_lora, gated_lora_expand_, gated_lora_shrink
from .launch import ACTIVATIONS
from .reference import activation_ref, gated_lora_ref

__all__ = ["ACTIVATIONS", "BACKENDS", "activation_ref", "fused_mlp_lora", "gated_lora_expand_", "gated_lora_ref",
           "gated_lora_shrink"]
