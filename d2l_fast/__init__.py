"""d2l_fast: fast, checkpoint-compatible Doc-to-LoRA.

Native API: :class:`D2LModel` (``internalize`` many documents in one packed pass → :class:`AdapterBatch`;
``generate`` with a different adapter per row). Drop-in API: ``ModulatedPretrainedModel``,
``combine_lora``, ``get_tokenizer`` with the reference's names and semantics. :func:`pretrained` loads a
hypernetwork bundled in the package (``d2l_fast.zoo``) on its base model, ready to use.
"""

import logging

from .adapters import AdapterBatch, merge_chunk_loras
from .answering import compare_answers
from .checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, save_checkpoint
from .compat import ModulatedPretrainedModel, combine_lora
from .config import D2LSpec
from .export import export_peft
from .hf import spec_for_model
from .kernels.latent_readout import latent_readout
from .kernels.segmented_lora import SegmentMeta, segmented_lora, segmented_lora_
from .model import D2LModel
from .packing import PackedContexts, get_tokenizer, tokenize_context, tokenize_prompt
from .peft_import import load_peft_adapter
from .zoo import pretrained

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "AdapterBatch",
    "CheckpointError",
    "D2LModel",
    "D2LSpec",
    "LoadedCheckpoint",
    "ModulatedPretrainedModel",
    "PackedContexts",
    "SegmentMeta",
    "combine_lora",
    "compare_answers",
    "export_peft",
    "get_tokenizer",
    "latent_readout",
    "load_peft_adapter",
    "load_checkpoint",
    "merge_chunk_loras",
    "pretrained",
    "save_checkpoint",
    "segmented_lora",
    "segmented_lora_",
    "spec_for_model",
    "tokenize_context",
    "tokenize_prompt",
]
