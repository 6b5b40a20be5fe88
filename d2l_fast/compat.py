"""Drop-in names of the reference (``ctx_to_lora``): ``ModulatedPretrainedModel``, ``combine_lora``, ``get_tokenizer``.

A thin front door over :class:`d2l_fast.model.D2LModel` (one code path). Same names, arguments and
semantics as spec §4, with these deliberate differences (documented in README):

* runs on CPU (and any device), no flash-attn needed; the context encoder shares the base weights;
* ``from_state_dict(..., base_model=...)`` may point at a local folder or an already-loaded model;
* ``generate(ctx_ids=...)`` always applies the given contexts, also after ``reset()``;
* ``forward`` accepts ``position_ids`` in padded mode (the reference crashes there);
* ``internalize`` runs without autograd and re-uses the tokenizer; it chunks documents longer than the
  encoder's context window by default (``max_chunk_len=0``: never);
* ``internalize(text)`` keeps control-token text in the document (``<start_of_turn>``, ``<|im_start|>``, ...)
  plain; ``split_special_tokens=False`` gives the reference's tokenization.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from .adapters import as_index_list, merge_chunk_loras
from .checkpoint import LoadedCheckpoint, load_checkpoint, split_reference_state_dict
from .model import D2LModel
from .packing import PackedContexts, get_tokenizer, tokenize_context

logger = logging.getLogger(__name__)


def combine_lora(generated_loras: dict, n_ctx_chunks, lora_bias: dict | None = None, scalers=None, bias_scaler=None,
                 *, alpha: float = 1.0) -> dict:
    """The reference's ``combine_lora``: per-chunk LoRAs → padded
    {m: {A: [G, L, R_max, d_in], B: [G, L, R_max, d_out]}}.

    Group g holds its chunks' rows, then β·bias rows, then zero rows up to R_max = (max n + 1)·r.
    The native API keeps the ragged :class:`AdapterBatch` instead (see :func:`merge_chunk_loras`).
    """
    n = n_ctx_chunks.tolist() if isinstance(n_ctx_chunks, torch.Tensor) else list(n_ctx_chunks)
    batch = merge_chunk_loras(generated_loras, [int(x) for x in n], bias=lora_bias, alpha=alpha, model_id="",
                              scalers=scalers, bias_scaler=bias_scaler)
    r = next(iter(generated_loras.values()))["A"].shape[2]
    rmax = (max(n) + (1 if lora_bias is not None else 0)) * r
    out = {}
    for m in batch.modules:
        a, b = batch.to_padded(m)
        if a.shape[2] < rmax:  # the reference pads to the largest chunk count even without a bias
            pad = rmax - a.shape[2]
            a = torch.nn.functional.pad(a, (0, 0, 0, pad))
            b = torch.nn.functional.pad(b, (0, 0, 0, pad))
        out[m] = {"A": a, "B": b}
    return out


class ModulatedPretrainedModel(nn.Module):
    """Reference-compatible façade: ``from_state_dict`` → ``internalize``/``generate_weights`` → ``generate``."""

    def __init__(self, d2l: D2LModel, use_sequence_packing: bool = True):
        super().__init__()
        self.d2l = d2l
        self.use_sequence_packing = use_sequence_packing
        self.generated_loras: dict | None = None
        self._generated_n_chunks: list[int] | None = None
        self.iterative_mode = False

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_state_dict(cls, state_dict, train: bool = True, base_model_kwargs: dict | None = None,
                        use_flash_attn: bool = True, *, base_model=None, tokenizer=None,
                        use_sequence_packing: bool = True, user_defined_scaling: float = 1.0,
                        max_chunk_len: int | None = None, **kwargs):
        """Like the reference, but ``state_dict`` is not mutated, and ``base_model`` may be a folder or a loaded model.

        ``state_dict``: the reference's dict (e.g. ``torch.load`` of its ``pytorch_model.bin``), what
        :func:`d2l_fast.load_checkpoint` returns, or a checkpoint path. ``base_model_kwargs`` go to
        ``from_pretrained`` (``dtype``/``torch_dtype`` and ``device`` included). Without a tokenizer (a base
        folder with no tokenizer files) the id-level calls work and text calls explain what to pass.

        ``use_flash_attn`` is accepted for compatibility; attention is chosen per device (no flash-attn needed).
        ``train`` is accepted for compatibility (the hypernetwork is trainable either way; call ``.train()``).
        """
        if isinstance(state_dict, LoadedCheckpoint):
            ckpt = state_dict
        elif isinstance(state_dict, (str, bytes)) or hasattr(state_dict, "__fspath__"):
            ckpt = load_checkpoint(os.fsdecode(state_dict))
        elif isinstance(state_dict, dict):
            ckpt = split_reference_state_dict(state_dict)
        else:
            raise TypeError(f"from_state_dict expects a state dict, a LoadedCheckpoint or a path, got "
                            f"{type(state_dict).__name__}")
        d2l = D2LModel.from_checkpoint(ckpt, base_model=base_model, tokenizer=tokenizer,
                                       base_model_kwargs=base_model_kwargs, user_defined_scaling=user_defined_scaling,
                                       max_chunk_len=max_chunk_len, **kwargs)
        model = cls(d2l, use_sequence_packing=use_sequence_packing)
        return model.train(train)

    # ---------------------------------------------------------------- delegation
    @property
    def base_model(self):
        return self.d2l.base_model

    @property
    def hypernet(self):
        return self.d2l.hypernet

    @property
    def tokenizer(self):
        return self.d2l.tokenizer

    @property
    def config(self):
        return self.d2l.base_model.config

    @property
    def generation_config(self):
        return self.d2l.base_model.generation_config

    @property
    def vocab_size(self):
        return self.d2l.base_model.config.vocab_size

    @property
    def device(self):
        return self.d2l.device

    def get_input_embeddings(self):
        return self.d2l.base_model.get_input_embeddings()

    def enable_iterative_mode(self, flag: bool = True):
        """Accepted for compatibility: the packed path already bounds memory (see ``D2LModel.internalize``)."""
        self.iterative_mode = bool(flag)

    def state_dict(self, *args, **kwargs):
        """The reference's checkpoint dict: hypernetwork tensors + the three metadata entries."""
        return self.d2l.state_dict_for_checkpoint().to_reference_state_dict()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        ckpt = split_reference_state_dict(state_dict)
        if ckpt.spec != self.d2l.spec:
            raise ValueError("checkpoint config differs from this model's; build a new model with from_state_dict")
        return self.d2l.hypernet.load_state_dict(ckpt.state_dict, strict=strict, assign=assign)

    # ---------------------------------------------------------------- reference API
    def _packed(self, ctx_ids, ctx_attn_mask, ctx_position_ids, n_ctx_chunks=None) -> PackedContexts:
        if ctx_attn_mask is None and ctx_position_ids is None:
            raise ValueError("ctx_attn_mask or ctx_position_ids is required with ctx_ids")
        return PackedContexts.from_padded(ctx_ids, ctx_attn_mask, ctx_position_ids, n_ctx_chunks)

    def generate_weights(self, ctx_ids, ctx_attn_mask=None, ctx_position_ids=None):
        """Per-chunk LoRAs {m: {A: [C, L, r, d_in], B: [C, L, r, d_out]}} and None (reference return shape)."""
        packed = self._packed(ctx_ids, ctx_attn_mask, ctx_position_ids)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.training):
            return self.d2l.chunk_loras(packed), None

    def combine_lora(self, generated_loras, n_ctx_chunks, lora_bias=None, scalers=None, bias_scaler=None):
        return combine_lora(generated_loras, n_ctx_chunks, lora_bias, scalers, bias_scaler)

    @torch.no_grad()
    def internalize(self, text: str, *, max_chunk_len: int | None = None, split_special_tokens: bool = True):
        """Tokenise with the chat wrapper and store this document's (uncombined) LoRA for later ``generate`` calls.

        ``split_special_tokens=False``: the reference's tokenization, where text such as ``<start_of_turn>`` in the
        document becomes a real control token (a document can then open or close chat turns).
        """
        if not isinstance(text, str):
            raise TypeError(f"internalize expects a str, got {type(text).__name__}")
        if self.tokenizer is None:
            raise self.d2l.tokenizer_required("internalize(text)")
        packed = self.d2l.pack([text], max_chunk_len=max_chunk_len, split_special_tokens=split_special_tokens)
        loras = self.d2l.chunk_loras(packed)
        self.generated_loras, self._generated_n_chunks = loras, packed.n_chunks
        return loras

    def reset(self):
        """Forget the internalised document; the base model runs without adapters."""
        self.generated_loras, self._generated_n_chunks = None, None

    def _row_adapter(self, n_groups: int, n_queries, n_rows: int):
        if n_queries is None:
            if n_rows != n_groups:
                raise ValueError(f"{n_rows} prompt rows for {n_groups} contexts: pass n_queries (rows per context)")
            return list(range(n_groups))
        nq = as_index_list(n_queries, "n_queries")
        if len(nq) != n_groups or sum(nq) != n_rows:
            raise ValueError(f"n_queries={nq} must have one entry per context ({n_groups}) summing to the rows "
                             f"({n_rows})")
        return [g for g, k in enumerate(nq) for _ in range(k)]

    def _adapters_for(self, ctx_ids, ctx_attn_mask, ctx_position_ids, n_ctx_chunks, scalers, bias_scaler):
        if ctx_ids is not None:
            if n_ctx_chunks is None:
                raise ValueError("n_ctx_chunks is required with explicit ctx_ids")
            packed = self._packed(ctx_ids, ctx_attn_mask, ctx_position_ids, n_ctx_chunks)
            loras, n_chunks = self.d2l.chunk_loras(packed), packed.n_chunks
        elif self.generated_loras is not None:
            loras, n_chunks = self.generated_loras, self._generated_n_chunks
        else:
            return None
        return self.d2l.merge(loras, n_chunks, scalers=scalers, bias_scaler=bias_scaler)

    @torch.inference_mode()
    def generate(self, ctx_ids=None, ctx_attn_mask=None, ctx_position_ids=None, n_ctx_chunks=None, n_queries=None,
                 scalers=None, bias_scaler=None, *args, **kwargs):
        """Reference ``generate``: contexts (or the internalised document) → LoRAs → HF generate."""
        if args:
            raise TypeError("pass generate inputs as keywords (input_ids=..., attention_mask=...)")
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate needs input_ids as a keyword argument")
        attention_mask = kwargs.pop("attention_mask", None)
        adapters = self._adapters_for(ctx_ids, ctx_attn_mask, ctx_position_ids, n_ctx_chunks, scalers, bias_scaler)
        if adapters is None:
            logger.info("generating without a context: base model only")
            return self.d2l.generate(input_ids, attention_mask, **kwargs)
        rows = self._row_adapter(len(adapters), n_queries, input_ids.shape[0])
        return self.d2l.generate(input_ids, attention_mask, adapters=adapters, adapter_index=rows, **kwargs)

    def forward(self, ctx_ids=None, ctx_attn_mask=None, ctx_position_ids=None, n_ctx_chunks=None, n_queries=None,
                return_generated_lora: bool = False, **base_kwargs):
        """Reference ``forward``: contexts → per-chunk LoRAs → combine → base forward (padded or packed input)."""
        if ctx_ids is None:
            raise ValueError("forward needs ctx_ids")
        packed = self._packed(ctx_ids, ctx_attn_mask, ctx_position_ids, n_ctx_chunks)
        loras = self.d2l.chunk_loras(packed)
        adapters = self.d2l.merge(loras, packed.n_chunks)
        input_ids = base_kwargs.pop("input_ids")
        attention_mask = base_kwargs.pop("attention_mask", None)
        pos = base_kwargs.get("position_ids")
        G = len(adapters)
        for k in ("logprobs_vals", "logprobs_indices", "labels_teacher"):  # teacher tensors: not for the base model
            base_kwargs.pop(k, None)
        if self.use_sequence_packing and pos is not None and input_ids.shape[0] == 1:
            starts = (pos[0] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
            seg_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
            seg_adapter = self._row_adapter(G, n_queries, len(seg_lens))
            base_kwargs.setdefault("use_cache", False)
            out = self.d2l.forward(input_ids, attention_mask, adapters=adapters, seg_lens=seg_lens,
                                   seg_adapter=seg_adapter, **base_kwargs)
        else:
            rows = self._row_adapter(G, n_queries, input_ids.shape[0])
            out = self.d2l.forward(input_ids, attention_mask, adapters=adapters, adapter_index=rows, **base_kwargs)
        if return_generated_lora:
            return out, (combine_lora(loras, packed.n_chunks, self.d2l.hypernet.bias_lora()), None)
        return out


__all__ = ["ModulatedPretrainedModel", "combine_lora", "get_tokenizer", "tokenize_context"]
