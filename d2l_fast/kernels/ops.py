"""Where the ``torch.library`` custom operators of the kernels live, and the old ``*_op`` names.

There is one path into each kernel: the public functionals :func:`~d2l_fast.kernels.segmented_lora.segmented_lora`,
:func:`~d2l_fast.kernels.segmented_lora.segmented_lora_` and :func:`~d2l_fast.kernels.latent_readout.latent_readout`.
They validate their inputs and call the registered op while ``torch.compile`` traces them, so a compiled graph keeps
each call as one node (``fullgraph=True`` works, ``backend="eager"``, ``"aot_eager"`` and inductor) and CUDA graphs
can capture it. In eager mode they skip the op's Python dispatch layers (measured: 122 -> 281 µs per decode-shaped
in-place CPU call, see ``segmented_lora/function.py``) and call the same forward/backward functions the op calls.

The ops (namespace ``d2l_fast``) are registered in the kernels' ``function.py`` modules, next to those functions:

* ``segmented_lora(x, A, B, cu_seqlens, rank_start, rank_len, scale, backend) -> delta`` (autograd: dx, dA, dB
  through ``segmented_lora_backward``)
* ``segmented_lora_(out!, x, A, B, cu_seqlens, rank_start, rank_len, scale, backend)`` (in place, no autograd)
* ``gated_lora_shrink(gate, up, A, cu_seqlens, rank_start, rank_len, scale, activation, backend) -> (h, s)`` and
  ``gated_lora_expand_(y!, s, B, cu_seqlens, rank_start, rank_len, backend)`` (the fused MLP LoRA, inference only)
* ``latent_readout(q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, norm_weight, ctx_rstd?, n_kv_heads,
  eps, softmax_scale, mode, backend) -> out`` (autograd: q, ctx, weights, ctx_rstd through
  ``latent_readout_backward``)

Their schemas hold tensors, ints, floats and strings only. The segment layout travels as host int lists
(``SegmentMeta``'s ``*_host`` tuples): a compiled graph specialises on them, which suits decode (one layout per
batch of rows) and avoids any device-to-host sync; the op rebuilds the metadata from them at most once per layout
(a small LRU cache).

``segmented_lora_op``, ``segmented_lora_op_`` and ``latent_readout_op`` are deprecated aliases of the public
functionals (they were a second entry point through the ops before the functionals dispatched to them).
"""

from __future__ import annotations

from .latent_readout.function import latent_readout
from .segmented_lora.function import segmented_lora, segmented_lora_

__all__ = ["segmented_lora_op", "segmented_lora_op_", "latent_readout_op"]

# deprecated aliases: call the public functionals
segmented_lora_op = segmented_lora
segmented_lora_op_ = segmented_lora_
latent_readout_op = latent_readout
