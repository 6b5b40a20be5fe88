"""The checks :class:`~d2l_fast.model.D2LModel` makes on what it is given, before any compute: token ids inside
the vocabulary (documents and prompts), prompt tensors and their adapter indices, and adapters made by this model.

Each raises a ValueError (TypeError for a wrong type) saying what was expected and what was given.
"""

from __future__ import annotations

import torch

from .adapters import AdapterBatch, as_index_list
from .packing import PackedContexts


def check_token_range(lo: int, hi: int, vocab_size: int, where: str) -> None:
    """Token ids from ``lo`` to ``hi`` must lie in ``0 .. vocab_size - 1``."""
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{where}: token id {bad} is outside the vocabulary (size {vocab_size}: ids "
                         f"0..{vocab_size - 1})")


def check_packed_ids(packed: PackedContexts, vocab_size: int) -> None:
    """Every chunk's ids inside the vocabulary; the error names the document and chunk."""
    for c, chunk in enumerate(packed.chunks):
        lo, hi = min(chunk), max(chunk)
        if lo < 0 or hi >= vocab_size:
            check_token_range(lo, hi, vocab_size, f"document #{packed.chunk_to_doc[c]} (chunk {c})")


def check_tensor_ids(input_ids, vocab_size: int, where: str = "input_ids") -> None:
    """A non-empty id tensor's ids inside the vocabulary."""
    if isinstance(input_ids, torch.Tensor) and input_ids.numel():
        lo, hi = torch.aminmax(input_ids)
        check_token_range(int(lo), int(hi), vocab_size, where)


def check_adapters_match(adapters, model_id: str, spec) -> None:
    """``adapters`` is an :class:`AdapterBatch` made by the model ``model_id`` and fits ``spec`` (modules, layers,
    feature sizes): a mismatch is an error here, not in a kernel."""
    if not isinstance(adapters, AdapterBatch):
        raise TypeError(f"adapters must be an AdapterBatch, got {type(adapters).__name__}")
    if adapters.model_id != model_id:
        raise ValueError(f"these adapters were made by another model ({adapters.model_id!r}); this model is "
                         f"{model_id!r}")
    if adapters.modules != list(spec.target_modules) or adapters.num_layers != spec.num_layers:
        raise ValueError(f"adapter modules/layers {adapters.modules}/{adapters.num_layers} do not match "
                         f"{list(spec.target_modules)}/{spec.num_layers}")
    adapters.check_fits(spec)


def check_prompt_inputs(input_ids, attention_mask, adapters, adapter_index, *, device, vocab_size: int) -> None:
    """Padded prompts: an integer ``[batch, seq]`` tensor on ``device`` with ids in the vocabulary, a mask of the
    same shape, and one adapter index per row when adapters are given (none naming an adapter when not)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [batch, seq], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.device != device:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    check_tensor_ids(input_ids, vocab_size)
    if adapters is None and adapter_index is not None:
        used = [i for i in as_index_list(adapter_index) if i >= 0]
        if used:
            raise ValueError(f"adapter_index names adapters {used[:8]} but no adapters were given (adapters=None); "
                             "pass the AdapterBatch, or -1 / adapter_index=None for the base model")
    if adapters is not None:
        n_rows = input_ids.shape[0]
        idx = list(range(len(adapters))) if adapter_index is None else as_index_list(adapter_index)
        if len(idx) != n_rows:
            raise ValueError(f"{n_rows} prompt rows but {len(idx)} adapter indices "
                             f"({'one per adapter' if adapter_index is None else 'adapter_index'}); "
                             "give one per row")


__all__ = ["check_adapters_match", "check_packed_ids", "check_prompt_inputs", "check_tensor_ids",
           "check_token_range"]
