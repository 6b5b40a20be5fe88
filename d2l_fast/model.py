"""The native Doc-to-LoRA model: internalise many documents in one packed call, serve many adapters per batch.

    model = D2LModel.from_checkpoint("trained_d2l/gemma_demo/checkpoint-80000/pytorch_model.bin")
    adapters = model.internalize(["doc one ...", "doc two ..."])          # AdapterBatch, one per doc
    texts = model.generate_text(["Q about doc two?", "Q about doc one?"], adapters, adapter_index=[1, 0])

The base LM is loaded once: the context encoder runs on the same weights (see :mod:`d2l_fast.encoder`).
The hypernetwork is kept in fp32 like the reference; adapters are cast to the base model's dtype once
per binding.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings

import torch
from torch import nn

from .adapters import AdapterBatch, BatchCache, as_index_list, merge_chunk_loras
from .checkpoint import CheckpointError, LoadedCheckpoint
from .config import D2LSpec
from .encoder import ContextEncoder
from .fingerprint import model_fingerprint  # its home is d2l_fast.fingerprint; kept importable here
from .hf import check_base_model
from .hypernet import HyperLoRA
from .model_card import check_instruction, prompt_layout
from .model_inputs import check_adapters_match, check_packed_ids, check_prompt_inputs, check_tensor_ids
from .model_loading import fresh_hypernet, load_checkpoint_parts
from .packing import PackedContexts, tokenize_prompt
from .patching import LoRABinding, patch_model

logger = logging.getLogger(__name__)

#: Upper bound of the default chunk length (tokens after chat templating): the context window of Gemma-2 and
#: SmolLM2 and the length the D2L evaluation scripts chunk at. The default is the smaller of this and the base
#: model's ``max_position_embeddings`` (Qwen3's is 262144: one 262k-token chunk is never a sensible default).
DEFAULT_MAX_CHUNK_LEN = 8192


class LongDocumentWarning(UserWarning):
    """A document is longer than the encoder's context window: it was chunked, or (chunking off) is encoded whole."""


def default_max_chunk_len(base_model) -> int:
    """``min(max_position_embeddings, DEFAULT_MAX_CHUNK_LEN)`` of ``base_model`` (the latter if it has none)."""
    mpe = getattr(getattr(base_model, "config", None), "max_position_embeddings", None)
    try:
        mpe = int(mpe)
    except (TypeError, ValueError):
        return DEFAULT_MAX_CHUNK_LEN
    return max(1, min(mpe, DEFAULT_MAX_CHUNK_LEN)) if mpe > 0 else DEFAULT_MAX_CHUNK_LEN


class D2LModel(nn.Module):
    """Base causal LM + Doc-to-LoRA hypernetwork, with a batched, padding-free API.

    ``max_chunk_len``: documents longer than this (templated ids) are split into chunks (spec §2). ``None``
    (default): :func:`default_max_chunk_len` — the base model's ``max_position_embeddings``, at most
    :data:`DEFAULT_MAX_CHUNK_LEN` (8192) — minus the chat affixes that re-wrap every chunk, so that no chunk
    exceeds the context window; a document chunked by this default triggers a :class:`LongDocumentWarning`
    (the reference's ``internalize`` never chunks). ``0`` or a negative value
    turns chunking off (the reference's behaviour); a chunk longer than ``max_position_embeddings`` then
    also warns. ``encode_token_budget``: tokens per packed encoder row; it also bounds the attention scores
    the encoder holds at once (``2048 · encode_token_budget`` elements), so the encoder's working memory does
    not grow with the square of a long chunk.

    ``compact_adapters`` (attribute, default True): on a CPU model, :meth:`bind` copies the adapters the rows
    use, in row order, out of a larger or reordered :class:`AdapterBatch` into a compact one (cast to the base
    dtype) once per call, so that every decode step reads them contiguously (see :meth:`bind`). False keeps
    the adapters where they are (each step then reads them scattered). GPU models never compact (the Triton
    decode kernels read each row's adapter in place).
    """

    def __init__(self, base_model: nn.Module, hypernet: HyperLoRA, tokenizer=None, *, user_defined_scaling: float = 1.0,
                 max_chunk_len: int | None = None, encode_token_budget: int = 8192):
        super().__init__()
        spec = hypernet.spec
        self.spec = spec
        self.base_model = base_model
        self.hypernet = hypernet
        self.tokenizer = tokenizer
        self._tokenizer_note: str | None = None  # why no tokenizer could be loaded (see tokenizer_required)
        self.user_defined_scaling = float(user_defined_scaling)
        if max_chunk_len is not None and (isinstance(max_chunk_len, bool) or not isinstance(max_chunk_len, int)):
            raise TypeError(f"max_chunk_len must be an int or None, got {max_chunk_len!r}")
        if isinstance(encode_token_budget, bool) or not isinstance(encode_token_budget, int) or encode_token_budget < 1:
            raise ValueError(f"encode_token_budget must be a positive int, got {encode_token_budget!r}")
        self._default_chunking = max_chunk_len is None
        self._affix_len: int | None = None
        self.max_chunk_len = default_max_chunk_len(base_model) if max_chunk_len is None else max_chunk_len
        self.encode_token_budget = encode_token_budget
        check_base_model(base_model, spec)
        base_model.requires_grad_(False)  # only the hypernetwork trains (as in the reference)
        if spec.quantize_ctx_encoder:
            logger.warning("this checkpoint was trained on a 4-bit NF4 context encoder; d2l_fast encodes with the "
                           "base model's own weights (%s), a small shift in the features the hypernetwork sees",
                           next(base_model.parameters()).dtype)
        self.ctx_encoder = ContextEncoder(base_model, spec.encoder_type, layer_idx=spec.encoder_layer_idx,
                                          last_layer=spec.encoder_last_layer)
        if spec.layer_to_layer and self.ctx_encoder.n_features != spec.num_layers:
            raise CheckpointError(f"layer-to-layer hypernet expects {spec.num_layers} feature maps but the encoder "
                                  f"produces {self.ctx_encoder.n_features}")
        if spec.copy_modules:
            self._copy_values()  # the copy head reads the output embedding: refuse a model without a fitting one
        self._lora_ctx = patch_model(base_model, spec.target_modules)
        self._layer_map = {b: i for i, b in enumerate(spec.layer_indices)}
        self.model_id = model_fingerprint(spec, hypernet)
        # copies reused across binds of the same batch (each decode step), dropped with the batch they came from
        self._cast_cache = BatchCache()  # key: (device, dtype); value: the cast batch
        self._compact_cache = BatchCache()  # key: (the batch's tensor versions, used); value: the compact batch
        self.compact_adapters = True
        #: the checkpoint's model card (:mod:`d2l_fast.model_card`) and its prompt layout ``{"system",
        #: "instruction"}`` for text questions (None: the bare question, no system turn); set by from_checkpoint
        self.model_card: dict = {}
        self.prompt_layout: dict | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(cls, checkpoint, base_model=None, tokenizer=None, *, subfolder=None, dtype=None, device=None,
                        base_model_kwargs: dict | None = None, hypernet_dtype=torch.float32, strict_base_name=False,
                        **kwargs) -> "D2LModel":
        """Build from a checkpoint (path, hub id, reference state dict or :class:`LoadedCheckpoint`).

        ``base_model``: None (load the hub id stored in the checkpoint), a local folder / hub id, or an
        already-loaded HF causal LM. ``tokenizer``: None (load from the same place), a path, or a tokenizer.
        A checkpoint folder's ``model_card.json`` gives the defaults: its ``max_chunk_len`` (unless given) and
        its prompt layout for text questions (:attr:`prompt_layout`; see :mod:`d2l_fast.model_card`).
        """
        parts = load_checkpoint_parts(checkpoint, base_model, tokenizer, subfolder=subfolder, dtype=dtype,
                                      device=device, base_model_kwargs=base_model_kwargs,
                                      hypernet_dtype=hypernet_dtype, strict_base_name=strict_base_name)
        card = parts.card  # its model card's settings are this model's defaults
        if kwargs.get("max_chunk_len") is None and card.get("max_chunk_len") is not None:
            kwargs["max_chunk_len"] = card["max_chunk_len"]
        out = cls(parts.base_model, parts.hypernet, parts.tokenizer, **kwargs)
        out._tokenizer_note = parts.tokenizer_note
        out.model_card, out.prompt_layout = card, (prompt_layout(card) if card else None)
        return out

    @classmethod
    def from_base(cls, base_model, tokenizer=None, *, seed: int = 0, spec: D2LSpec | None = None,
                  hypernet_dtype=torch.float32, init_scaler_B: float | None = None, **spec_kwargs) -> "D2LModel":
        """A fresh (untrained) hypernetwork for ``base_model``; the reference's init unless ``init_scaler_B`` is set.

        With the reference init (scaler_B = 0) every adapter is zero and the model equals the base model;
        ``init_scaler_B`` gives the generated part a visible random effect (useful for demos and tests).
        """
        ctor_kwargs = {k: spec_kwargs.pop(k) for k in ("user_defined_scaling", "max_chunk_len", "encode_token_budget")
                       if k in spec_kwargs}
        hypernet = fresh_hypernet(base_model, seed=seed, spec=spec, hypernet_dtype=hypernet_dtype,
                                  init_scaler_B=init_scaler_B, **spec_kwargs)
        return cls(base_model, hypernet, tokenizer, **ctor_kwargs)

    def state_dict_for_checkpoint(self) -> LoadedCheckpoint:
        return LoadedCheckpoint(spec=self.spec, state_dict={k: v.detach().cpu().float()
                                                            for k, v in self.hypernet.state_dict().items()})

    def save_pretrained(self, folder, *, dtype: torch.dtype | None = None):
        """Pickle-free hypernetwork checkpoint (``d2l_config.json`` + ``hypernet.safetensors``), float32 unless
        ``dtype`` (e.g. ``torch.float16``, half the size; loading up-casts it to the hypernetwork's dtype)."""
        from .checkpoint import save_checkpoint

        return save_checkpoint(self.state_dict_for_checkpoint(), folder, dtype=dtype)

    # ----------------------------------------------------------------- properties
    @property
    def device(self):
        return next(self.base_model.parameters()).device

    @property
    def base_dtype(self):
        return next(self.base_model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        """Rows of the base model's input embedding: valid token ids are ``0 .. vocab_size - 1``."""
        return int(self.base_model.get_input_embeddings().weight.shape[0])

    # ----------------------------------------------------------------- context → LoRA
    def _copy_values(self) -> torch.Tensor:
        """The copy head's value table: the base model's output embedding weight [vocab, hidden]."""
        head = self.base_model.get_output_embeddings()
        w = getattr(head, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise CheckpointError(f"this hypernetwork has a copy head, which reads the base model's output embedding, "
                                  f"and {type(self.base_model).__name__} has none")
        for m in self.spec.copy_modules:
            if w.shape[1] != self.spec.d_out[m]:
                raise CheckpointError(f"copy module {m!r} writes d_out={self.spec.d_out[m]} features, the output "
                                      f"embedding has {w.shape[1]}")
        return w

    def chunk_loras(self, packed: PackedContexts, *, intermediates: dict | None = None) -> dict:
        """Per-chunk LoRAs {m: {A: [C, L, r, d_in], B: [C, L, r, d_out]}} from packed contexts (one packed pass)."""
        spec = self.spec
        check_packed_ids(packed, self.vocab_size)
        hdt = self.hypernet.head.weight.dtype
        # inference streams each encoder layer through the modality projection as it is produced (the
        # [L, T, H] feature stack is never held); training / intermediates keep the plain path for autograd
        stream = intermediates is None and not torch.is_grad_enabled()
        proj = self.hypernet.perceiver.modality_projection
        with self._lora_ctx.bound(None):
            feats = self.ctx_encoder.encode_packed(packed.chunks, token_budget=self.encode_token_budget, dtype=hdt,
                                                   transform=proj if stream else None)
        n_f, T, H = feats.shape
        C = len(packed.chunks)
        cu_c = packed.cu_seqlens()
        if spec.layer_to_layer:
            # segments (layer, chunk), layer-major: layer f's chunks start at f*T + cu_c[c]
            cu = (torch.arange(n_f)[:, None] * T + cu_c[None, :-1]).flatten()
            cu = torch.cat([cu, torch.tensor([n_f * T])]).to(torch.int32)
            x = feats.reshape(n_f * T, H)
        else:
            cu, x = cu_c, feats[0]
        if intermediates is not None:
            intermediates["features"] = feats
        copy_kw = {}
        if spec.copy_modules:
            copy_kw = {"token_ids": packed.input_ids(feats.device)[0], "value_table": self._copy_values().detach()}
        loras = self.hypernet(x, cu.to(feats.device), packed.max_seqlen, C, intermediates, projected=stream,
                              **copy_kw)
        u = self.user_defined_scaling
        if u != 1.0:
            loras = {m: {"A": d["A"] * u, "B": d["B"] * u} for m, d in loras.items()}
        return loras

    def merge(self, chunk_loras: dict, n_chunks, *, scalers=None, bias_scaler=None, names=None) -> AdapterBatch:
        return merge_chunk_loras(chunk_loras, list(n_chunks), bias=self.hypernet.bias_lora(),
                                 alpha=self.spec.lora_alpha, model_id=self.model_id, scalers=scalers,
                                 bias_scaler=bias_scaler, names=names)

    def tokenizer_required(self, what: str) -> ValueError:
        """The error for a text call on a model built without a tokenizer: what is missing and how to pass one."""
        note = self._tokenizer_note
        return ValueError(f"{what} needs a tokenizer, and this model has none"
                          f"{f' ({note})' if note else ''}: pass tokenizer=<folder, hub id or tokenizer> to "
                          "from_checkpoint / from_state_dict, or set model.tokenizer = d2l_fast.get_tokenizer(path); "
                          "id-level calls (templated token ids) work without one")

    def pack(self, documents, *, max_chunk_len: int | None = None, split_special_tokens: bool = True) -> PackedContexts:
        """``split_special_tokens``: control-token text in a text document stays plain text (True, the default)
        or becomes control tokens as in the reference (False); see :func:`d2l_fast.packing.tokenize_context`."""
        if self.tokenizer is None and any(isinstance(d, str) for d in documents):
            raise self.tokenizer_required("internalizing text documents")
        by_default = max_chunk_len is None and self._default_chunking
        mcl = self.max_chunk_len if max_chunk_len is None else max_chunk_len
        if by_default:  # re-wrapped chunks grow by the chat affixes: keep them inside the context window
            mcl = max(1, mcl - self._chunk_affix_len())
        packed = PackedContexts.from_documents(self.tokenizer, documents, max_chunk_len=mcl,
                                               model_name=self.spec.base_model_name_or_path,
                                               split_special_tokens=split_special_tokens)
        self._warn_long(packed, mcl, by_default=by_default)
        return packed

    def _chunk_affix_len(self) -> int:
        if self._affix_len is None:
            from .packing import context_affixes

            try:
                pre, suf = context_affixes(self.tokenizer, self.spec.base_model_name_or_path)
                self._affix_len = len(pre) + len(suf)
            except (AttributeError, TypeError, ValueError):  # no tokenizer / template: chunks may exceed by the affixes
                self._affix_len = 0
        return self._affix_len

    def _warn_long(self, packed: PackedContexts, mcl, *, by_default: bool) -> None:
        window = getattr(self.base_model.config, "max_position_embeddings", None)
        lens = packed.lengths
        if by_default:
            split = [d for d, n in enumerate(packed.n_chunks) if n > 1]
            if split:
                warnings.warn(f"{len(split)} document(s) (#{', #'.join(map(str, split[:5]))}) exceed the default "
                              f"chunk length {mcl} (the encoder's context window less the chat affixes) and were "
                              f"split into chunks; pass max_chunk_len= (the CLI flag --max-chunk-len) to choose, or "
                              f"max_chunk_len=0 to encode whole (reference behaviour)",
                              LongDocumentWarning, stacklevel=4)
        if isinstance(window, int) and window > 0:
            over = sorted({packed.chunk_to_doc[c] for c, n in enumerate(lens) if n > window})
            if over:
                warnings.warn(f"document(s) #{', #'.join(map(str, over[:5]))} have a chunk of {max(lens)} tokens, "
                              f"beyond the base model's max_position_embeddings={window}: features past the context "
                              f"window are unreliable; chunk with max_chunk_len<={window} (CLI: --max-chunk-len)",
                              LongDocumentWarning,
                              stacklevel=4)

    @torch.no_grad()
    def internalize(self, documents, *, max_chunk_len: int | None = None, scalers=None, bias_scaler=None,
                    names=None, docs_per_call: int | None = None, progress: bool | None = None,
                    split_special_tokens: bool = True) -> AdapterBatch:
        """Documents (text, or chat-templated id lists) → one adapter each, in ONE packed padding-free pass.

        Long documents are chunked on templated ids (``max_chunk_len``; default: the model's, see the class
        docstring); a document of n chunks gets rank
        (n+1)·r. ``docs_per_call`` bounds memory for very large lists (several packed calls, tqdm progress).
        Nothing is stored on the model: the returned :class:`AdapterBatch` is the state.
        ``split_special_tokens`` (default True): text such as ``<start_of_turn>`` in a document stays plain text
        instead of becoming a control token; False gives the reference's tokenization.
        """
        if isinstance(documents, (str, torch.Tensor)):
            raise TypeError("internalize expects a list of documents; wrap a single document in a list")
        documents = list(documents)
        if docs_per_call is not None and (isinstance(docs_per_call, bool) or not isinstance(docs_per_call, int)
                                          or docs_per_call < 1):
            raise ValueError(f"docs_per_call must be None or a positive int (documents per packed call), got "
                             f"{docs_per_call!r}")
        # validates everything before any compute
        packed = self.pack(documents, max_chunk_len=max_chunk_len, split_special_tokens=split_special_tokens)
        if names is not None and len(names) != len(documents):
            raise ValueError(f"{len(names)} names for {len(documents)} documents")
        if scalers is not None:
            n_sc = len(torch.as_tensor(scalers).flatten())
            if n_sc not in (1, len(packed.chunks)):
                raise ValueError(f"scalers must have 1 or {len(packed.chunks)} (one per chunk) entries, got {n_sc}")
        check_packed_ids(packed, self.vocab_size)
        if docs_per_call is None or docs_per_call >= len(documents):
            out = self.merge(self.chunk_loras(packed), packed.n_chunks, scalers=scalers, bias_scaler=bias_scaler,
                             names=names)
            out.check_finite(where=" (made by internalize from the document of that index)")
            return out
        from tqdm.auto import tqdm

        parts, c0 = [], 0
        show = progress if progress is not None else len(documents) > docs_per_call
        for d0 in tqdm(range(0, len(documents), docs_per_call), disable=not show, desc="internalize", unit="batch"):
            d1 = min(d0 + docs_per_call, len(documents))
            ncs = packed.n_chunks[d0:d1]
            sub = PackedContexts(chunks=packed.chunks[c0 : c0 + sum(ncs)], n_chunks=ncs)
            sc = None
            if scalers is not None:
                sc_all = torch.as_tensor(scalers).flatten()
                sc = sc_all if sc_all.numel() == 1 else sc_all[c0 : c0 + sum(ncs)]
            parts.append(self.merge(self.chunk_loras(sub), ncs, scalers=sc, bias_scaler=bias_scaler,
                                    names=None if names is None else names[d0:d1]))
            c0 += sum(ncs)
        out = AdapterBatch.concat(parts)
        out.check_finite(where=" (made by internalize from the document of that index)")
        return out

    # ----------------------------------------------------------------- binding adapters
    def _prepare_adapters(self, adapters: AdapterBatch) -> AdapterBatch:
        check_adapters_match(adapters, self.model_id, self.spec)
        dev, dt = self.device, self.base_dtype
        if adapters.device == dev and adapters.dtype == dt:
            return adapters
        cached = self._cast_cache.get(adapters)
        if cached is not None and cached[0] == (dev, dt):
            return cached[1]
        out = adapters.to(dev, dt)
        self._cast_cache.put(adapters, (dev, dt), out)
        return out

    @contextlib.contextmanager
    def bind(self, adapters: AdapterBatch | None, adapter_index=None, *, seg_lens=None, seg_adapter=None,
             rows_per_index: int = 1):
        """Within the block, the base model applies adapter ``adapter_index[i]`` (-1 = none) to batch row i.

        For a packed single-row input give ``seg_lens`` (tokens per segment) and ``seg_adapter`` instead.
        ``adapter_index=None`` means row i uses adapter i. ``adapter_index`` needs one entry per row; with
        ``rows_per_index=k`` a batch of exactly ``k·len(adapter_index)`` rows is also accepted, rows
        ``i·k .. i·k+k-1`` using ``adapter_index[i]`` (HF ``generate`` expands every prompt row k times for
        ``num_return_sequences`` / ``num_beams``). Indices must be integers; adapters holding NaN or infinite
        values are refused here (only those some row uses).

        On a CPU model with :attr:`compact_adapters` set, when the adapters the rows use are not already one
        contiguous block in row order (e.g. 128 rows picking 128 of 2,000 resident adapters), or are a strict
        subset of a batch that needs a cast to the base dtype, they are copied once here into a compact batch
        (first use order; each adapter once however many rows use it) and the rows are renumbered to it: every
        forward in the block then reads them contiguously, and only they are cast (a bf16-resident batch is
        never cast whole to fp32). The caller's batch is not modified; the results are those of the uncompacted
        batch up to fp32 summation order.
        """
        if adapters is None:
            with self._lora_ctx.bound(None):
                yield None
            return
        if seg_lens is None and adapter_index is None:
            adapter_index = list(range(len(adapters)))
        used = self._compaction(adapters, adapter_index, seg_lens, seg_adapter, rows_per_index)
        if used is None:
            ad = self._prepare_adapters(adapters)
            binding = LoRABinding(ad, self._layer_map, row_adapter=adapter_index if seg_lens is None else None,
                                  seg_lens=seg_lens, seg_adapter=seg_adapter, rows_per_index=rows_per_index)
            ad.check_finite(binding.used_adapters, where=" (bound for this call)")
        else:
            cast = (adapters.device, adapters.dtype) != (self.device, self.base_dtype)
            ad = self._compacted(adapters, used)
            where = " (bound for this call" + (f", cast to {self.base_dtype})" if cast else ")")
            if not math.isfinite(ad.alpha):
                ad.check_finite(where=where)  # raises: a non-finite alpha
            # NaN/inf: select() carries the caller's cached verdict over unless a narrowing cast could overflow, so
            # this scans the used adapters only when nothing is known yet
            known = ad.known_nonfinite()
            bad = [used[k] for k in (known if known is not None else ad.nonfinite())]
            if bad:
                raise adapters.nonfinite_error(bad, where=where)
            new = {k: i for i, k in enumerate(used)}
            renumber = lambda ids: [new[i] if i >= 0 else -1 for i in as_index_list(ids)]  # noqa: E731
            binding = LoRABinding(ad, self._layer_map,
                                  row_adapter=renumber(adapter_index) if seg_lens is None else None,
                                  seg_lens=seg_lens, seg_adapter=None if seg_lens is None else renumber(seg_adapter),
                                  rows_per_index=rows_per_index)
        with self._lora_ctx.bound(binding):
            yield binding

    def _compacted(self, adapters: AdapterBatch, used: list[int]) -> AdapterBatch:
        """``adapters.select(used)`` on this model's device and dtype, reused while the same batch (unmodified) binds
        the same adapters again — e.g. every decode step of one set of rows."""
        versions = adapters.tensor_versions()
        c = self._compact_cache.get(adapters)
        if versions is not None and c is not None and c[0][1] == used and len(c[0][0]) == len(versions) and all(
                a is b and va == vb for (a, va), (b, vb) in zip(c[0][0], versions)):
            return c[1]
        ad = adapters.select(used, device=self.device, dtype=self.base_dtype)
        if versions is None:
            self._compact_cache.clear()
        else:
            self._compact_cache.put(adapters, (versions, list(used)), ad)
        return ad

    def _compaction(self, adapters, adapter_index, seg_lens, seg_adapter, rows_per_index) -> list[int] | None:
        """The adapters (first-use order) to copy into a compact batch for this binding, or None (bind in place).

        Validates the adapters and the indices first (by building the binding the caller asked for)."""
        if not isinstance(adapters, AdapterBatch):
            raise TypeError(f"adapters must be an AdapterBatch, got {type(adapters).__name__}")
        if not self.compact_adapters or self.device.type != "cpu":
            return None
        check_adapters_match(adapters, self.model_id, self.spec)
        probe = LoRABinding(adapters, self._layer_map, row_adapter=adapter_index if seg_lens is None else None,
                            seg_lens=seg_lens, seg_adapter=seg_adapter, rows_per_index=rows_per_index)
        if torch.is_grad_enabled() and any(t.requires_grad for d in (adapters.A, adapters.B) for t in d.values()):
            return None  # training: the binding must use the caller's tensors
        ids = probe.seg_adapter if probe.seg_lens is not None else probe.row_adapter
        used = list(dict.fromkeys(i for i in ids if i >= 0))
        if not used:
            return None
        in_place = all(b == a + 1 for a, b in zip(used[:-1], used[1:]))  # one contiguous block in row order
        needs_cast = (adapters.device, adapters.dtype) != (self.device, self.base_dtype)
        if in_place and not (needs_cast and len(used) < len(adapters)):
            return None
        return used

    def forward(self, input_ids=None, attention_mask=None, *, adapters: AdapterBatch | None = None, adapter_index=None,
                seg_lens=None, seg_adapter=None, **kwargs):
        """Base-model forward with per-row (padded) or per-segment (packed, ``seg_lens``) adapters."""
        if seg_lens is None:
            check_prompt_inputs(input_ids, attention_mask, adapters, adapter_index, device=self.device,
                                vocab_size=self.vocab_size)
        else:
            check_tensor_ids(input_ids, self.vocab_size)
        with self.bind(adapters, adapter_index, seg_lens=seg_lens, seg_adapter=seg_adapter):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, adapters: AdapterBatch | None = None, adapter_index=None,
                 **kwargs):
        """HF ``generate`` where row i uses adapter ``adapter_index[i]`` (-1: base model) — one batched call."""
        check_prompt_inputs(input_ids, attention_mask, adapters, adapter_index, device=self.device,
                            vocab_size=self.vocab_size)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.setdefault("pad_token_id",
                          getattr(self.tokenizer, "pad_token_id", None) or self.base_model.config.pad_token_id)
        gc = kwargs.get("generation_config") or self.base_model.generation_config
        k = max(int(kwargs.get("num_beams", None) or getattr(gc, "num_beams", 1) or 1),
                int(kwargs.get("num_return_sequences", None) or getattr(gc, "num_return_sequences", 1) or 1))
        with self.bind(adapters, adapter_index, rows_per_index=k):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def encode_prompts(self, prompts: list[str], *, system: str | None = None, instruction: str | None = None):
        """Left-padded ``(ids, mask)`` of questions as chat turns: ``instruction.format(question=...)`` after
        ``system``. Neither given: the model's :attr:`prompt_layout` (its checkpoint's model card), else the bare
        question with no system turn; pass ``instruction="{question}"`` for fully formatted prompts."""
        if system is None and instruction is None and self.prompt_layout:
            system, instruction = self.prompt_layout["system"], self.prompt_layout["instruction"]
        if instruction is not None:
            check_instruction(instruction)
        if self.tokenizer is None:
            raise self.tokenizer_required("encoding text prompts")
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings; wrap a single prompt in a list")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("expected at least one prompt, got an empty list")
        rows = [tokenize_prompt(self.tokenizer, p if instruction is None or not isinstance(p, str)
                                else instruction.format(question=p.strip()), system) for p in prompts]
        n = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, n - len(r):] = torch.tensor(r)
            mask[i, n - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    def generate_text(self, prompts: list[str], adapters: AdapterBatch | None = None, adapter_index=None, *,
                      max_new_tokens: int = 64, system: str | None = None, instruction: str | None = None,
                      **kwargs) -> list[str]:
        """Questions (text) → answers (text), row i with adapter ``adapter_index[i]``; greedy by default. The prompt
        layout (``system`` / ``instruction``, default: the checkpoint's) is :meth:`encode_prompts`'."""
        ids, mask = self.encode_prompts(prompts, system=system, instruction=instruction)
        kwargs.setdefault("do_sample", False)
        out = self.generate(ids, mask, adapters=adapters, adapter_index=adapter_index, max_new_tokens=max_new_tokens,
                            **kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


__all__ = ["DEFAULT_MAX_CHUNK_LEN", "D2LModel", "LongDocumentWarning", "default_max_chunk_len", "model_fingerprint"]
