"""Context encoders (spec §1.3), sharing the base model's weights instead of loading a second copy.

The reference loads an independent copy of the LM and truncates its layer list. We run the base
model's own decoder and stop it early with hooks: forward pre-hooks record the residual stream
entering each layer, a forward hook on the last kept layer applies the final norm and aborts the
forward. No weights are duplicated and the remaining layers never run. LoRA patches on the base model
are inactive while encoding (no adapter is bound), as in the reference's separate encoder copy.

Chunks are encoded without padding waste: packed back to back into rows of a token budget, each chunk
attending to itself only (:mod:`d2l_fast.varlen`), or, where transformers cannot take that attention, sorted
by length and run in right-padded micro-batches of similar length (padded positions are dropped). The valid
tokens are scattered into one packed buffer: outputs are padding-free and layer-major.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
from torch import nn

from .concurrency import guard_forward, model_lock
from .hf import decoder_of

logger = logging.getLogger(__name__)


class _Stop(Exception):
    pass


_observers = threading.local()


@contextlib.contextmanager
def observe_encoding(fn):
    """Within the block, this thread's encoder passes report their progress to ``fn(event, a, b)``.

    Events: ``("row", i, j)`` before a packed row of chunks i..j-1 starts, ``("layer", l, n)`` before decoder layer
    l of the n the row runs (the points where the pass yields to queued forwards), ``("chunks", done, total)``
    after a row. ``fn`` may raise to abandon the pass (e.g. a cancelled upload); the lock is released as usual.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    old = getattr(_observers, "fn", None)
    _observers.fn = fn
    try:
        yield
    finally:
        _observers.fn = old


@contextlib.contextmanager
def encode_in_slices(n: int | None):
    """Within the block, this thread's varlen encoder passes run each packed row in windows of at most ``n``
    tokens (None: whole rows), as chunked prefill does.

    Each window is a pass of its own through the kept decoder layers, its keys and values kept for the windows
    after it (:class:`d2l_fast.varlen.RowCache`): a query attends to the same keys as in a whole-row pass, so the
    chunking, the features and the adapters are those of the unsliced pass up to fp rounding (tests check it within
    ``tests/_numerics.SLICED``). The lock is released between windows and yielded between layers, so one slice
    of an encoder pass (the exclusive hold other forwards can wait for) is one decoder layer over at most ``n``
    tokens. The padded fallback (no varlen attention) runs whole micro-batches.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    old = getattr(_observers, "slice_tokens", None)
    _observers.slice_tokens = n
    try:
        yield
    finally:
        _observers.slice_tokens = old


def _attention_switch(switched):
    """(pause, resume) for a yield of an encoder pass: put each config's attention implementation back, and
    switch it again."""
    now: list = []

    def pause():
        now[:] = [c._attn_implementation for c, _ in switched]
        for c, before in switched:
            c._attn_implementation = before

    def resume():
        for (c, _), impl in zip(switched, now):
            c._attn_implementation = impl

    return pause, resume


#: attention scores a varlen encoder pass may hold at once, per token of ``token_budget`` (a 8192-token budget
#: allows 2^24 scores: 64 MiB in fp32); longer chunks are attended in query blocks (:mod:`d2l_fast.varlen`)
SCORES_PER_BUDGET_TOKEN = 2048


class ContextEncoder(nn.Module):
    """Produces context features for the hypernetwork from the (shared) base LM.

    ``encoder_type``:
      * ``per_layer_activations``: K+1 feature maps (embedding output, residual entering layers 1..K-1,
        final norm of layer K-1's output), K = n_layers-1 or ``last_layer``-1.
      * ``early_exit``: final norm of layer ``layer_idx``-1's output.
      * ``embed_only``: the embedding output.
    """

    def __init__(self, model: nn.Module, encoder_type: str, *, layer_idx: int | None = None,
                 last_layer: int | None = None):
        super().__init__()
        self._model = [model]  # not registered: weights belong to the base model
        dec = decoder_of(model)
        n = len(dec.layers)
        if encoder_type == "per_layer_activations":
            k = (n - 1) if last_layer is None else (last_layer - 1)
        elif encoder_type == "early_exit":
            k = layer_idx if layer_idx is not None else max(1, n // 4)
        elif encoder_type == "embed_only":
            k = 0
        else:
            raise ValueError(f"unknown encoder type {encoder_type!r}")
        if not 0 <= k <= n:
            raise ValueError(f"encoder would keep {k} layers but the model has {n}")
        self.encoder_type, self.n_kept = encoder_type, k
        self.attention = "auto"
        # encoder passes hook the decoder and switch its attention: they run alone (see d2l_fast.concurrency)
        guard_forward(dec)

    @property
    def model(self):
        return self._model[0]

    @property
    def attention(self) -> str:
        """The attention backend of packed encoder passes (one of :data:`d2l_fast.varlen.BACKENDS`; ``auto``: the
        fused kernel that fits on CUDA — FlexAttention where the model soft-caps logits, flash-attn varlen where
        it does not and is installed — and the blocked per-chunk path elsewhere)."""
        return self._attention

    @attention.setter
    def attention(self, name: str) -> None:
        from .varlen import BACKENDS

        if name not in BACKENDS:
            raise ValueError(f"attention must be one of {BACKENDS}, got {name!r}")
        self._attention = name

    @property
    def _lock(self):
        return model_lock(decoder_of(self.model))

    @property
    def n_features(self) -> int:
        return self.n_kept + 1 if self.encoder_type == "per_layer_activations" else 1

    def _run(self, input_ids, attention_mask=None, position_ids=None, sink=None, switched=(),
             window=(0, 1)) -> list[torch.Tensor]:
        """Run the truncated decoder; feature maps are returned, or handed to ``sink(j, hs)`` as they appear.

        The pass holds the model's lock exclusively and yields it between two layers to the forwards queued
        meanwhile (:meth:`~d2l_fast.concurrency.ModelLock.yield_to_readers`): ``switched`` holds (config, its
        attention implementation before this pass) pairs, put back while other forwards run. The hooks act on
        this thread's forward only. ``window`` (w, n): this pass is window w of the n of its row (progress).
        """
        dec = decoder_of(self.model)
        k, kind = self.n_kept, self.encoder_type
        capture = _Capture(sink)
        handles = []
        me = threading.get_ident()
        lock = self._lock
        pause, resume = _attention_switch(switched)
        observer = getattr(_observers, "fn", None)

        def yield_hook(j):
            def hook(mod, args, kwargs):
                if threading.get_ident() == me:
                    if observer is not None:
                        observer("layer", window[0] * k + j, window[1] * k)
                    lock.yield_to_readers(pause, resume)

            return hook

        def pre_hook(mod, args, kwargs):
            if threading.get_ident() != me:
                return
            capture.emit(args[0] if args else kwargs["hidden_states"])
            if kind == "embed_only":
                raise _Stop

        def post_hook(mod, args, kwargs, out):
            if threading.get_ident() != me:
                return
            hs = out[0] if isinstance(out, (tuple, list)) else out
            capture.emit(dec.norm(hs))
            raise _Stop

        # hooks on shared layers and a switched config: other forwards wait between layers
        with lock.exclusive(f"encoder pass of {input_ids.shape[-1]} tokens"):
            try:
                for j in range(1, k):  # a slice: one decoder layer of this row
                    handles.append(dec.layers[j].register_forward_pre_hook(yield_hook(j), with_kwargs=True))
                if kind == "per_layer_activations":
                    for j in range(k):
                        handles.append(dec.layers[j].register_forward_pre_hook(pre_hook, with_kwargs=True))
                if kind == "embed_only" or k == 0:
                    handles.append(dec.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
                    if kind != "embed_only":
                        raise ValueError("an encoder with 0 layers only makes sense as embed_only")
                else:
                    handles.append(dec.layers[k - 1].register_forward_hook(post_hook, with_kwargs=True))
                with contextlib.suppress(_Stop):
                    dec(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
        if capture.count != self.n_features:
            raise RuntimeError(f"context encoder captured {capture.count} feature maps, expected {self.n_features}")
        return capture.maps

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """Reference-shaped output: [B, K+1, T, H] (per_layer_activations) or [B, T, H]."""
        states = self._run(input_ids, attention_mask, position_ids)
        if self.encoder_type == "per_layer_activations":
            return torch.stack(states, 1)
        return states[0]

    @torch.no_grad()
    def encode_packed(self, chunks: list[list[int]], *, token_budget: int = 8192, dtype=None, transform=None,
                      varlen: bool | None = None, max_pad_ratio: float = 1.25, attention: str | None = None
                      ) -> torch.Tensor:
        """Encode chunks of ids into one packed buffer [n_features, Σ len, H'] (no padding in the output).

        ``varlen`` (default: whenever transformers accepts the custom attention): chunks run back to back
        in packed rows of at most ``token_budget`` tokens (a longer chunk runs alone), each chunk attending to
        itself only (:mod:`d2l_fast.varlen`) — no padding anywhere — with at most
        ``SCORES_PER_BUDGET_TOKEN · token_budget`` attention scores held at once. Otherwise chunks run
        longest-first in padded micro-batches of similar lengths (padding ≤ ``max_pad_ratio`` per row),
        dropped from the output. ``attention``: the varlen pass's attention backend (None: :attr:`attention`;
        see :data:`d2l_fast.varlen.BACKENDS`).
        With ``transform`` (e.g. the hypernetwork's modality projection, ``[n, H] -> [n, H']``) every
        feature map is transformed on its valid tokens as soon as the encoder produces it, so the
        [n_features, T, H] stack is never held: peak memory is one layer's hidden states plus the output.
        """
        from . import varlen as _varlen

        lens = [len(c) for c in chunks]
        if not lens or any(n == 0 for n in lens):
            raise ValueError(f"every chunk needs at least one token, got lengths {lens}")
        attention = self.attention if attention is None else attention
        if attention not in _varlen.BACKENDS:
            raise ValueError(f"attention must be one of {_varlen.BACKENDS}, got {attention!r}")
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        out = _PackedOutput(self.n_features, offsets[-1], dtype, transform)
        use_varlen = _varlen.register() if varlen is None else (varlen and _varlen.register())
        if use_varlen:
            self._encode_varlen(chunks, offsets, token_budget, out, attention)
        else:
            self._encode_padded(chunks, offsets, token_budget, max_pad_ratio, out)
        return out.buffer

    def _encode_pass(self, out: _PackedOutput, dest, input_ids, attention_mask=None, position_ids=None, valid=None,
                     switched=(), window=(0, 1)):
        """One truncated forward whose feature maps (their ``valid`` positions, all if None) go to rows ``dest``."""
        self._run(input_ids, attention_mask, position_ids, sink=out.sink(dest, valid), switched=switched,
                  window=window)

    def _encode_varlen(self, chunks, offsets, token_budget: int, out: _PackedOutput, attention: str = "auto") -> None:
        """Consecutive chunks packed into rows of at most ``token_budget`` tokens, each chunk attending to itself;
        a row longer than :func:`encode_in_slices` ' n runs in windows of n tokens."""
        from . import varlen as _varlen

        dev = next(self.model.parameters()).device
        lens = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
        max_scores = SCORES_PER_BUDGET_TOKEN * token_budget
        observer = getattr(_observers, "fn", None)
        n_slice = getattr(_observers, "slice_tokens", None)
        for i, j in _budget_rows(lens, token_budget):
            ids = torch.tensor([t for c in chunks[i:j] for t in c], dtype=torch.long, device=dev).unsqueeze(0)
            pos = torch.cat([torch.arange(m) for m in lens[i:j]]).unsqueeze(0).to(dev)
            dest = torch.arange(offsets[i], offsets[j], device=dev)
            wins = _windows(offsets[j] - offsets[i], n_slice)
            cache = _varlen.RowCache(offsets[j] - offsets[i]) if len(wins) > 1 else None
            if observer is not None:
                observer("row", i, j)
            for w, (a, b) in enumerate(wins):  # the lock is released between windows
                with self._lock.exclusive(f"encoder row of chunks {i}..{j - 1}, tokens {a}..{b - 1}"):
                    cfgs = _varlen._configs(self.model)
                    switched = list(zip(cfgs, [c._attn_implementation for c in cfgs]))
                    win = None if cache is None else cache.window(a, b)
                    with _varlen.packed_attention(self.model, lens[i:j], dev, max_scores, window=win,
                                                  backend=attention):
                        self._encode_pass(out, dest[a:b], ids[:, a:b], position_ids=pos[:, a:b], switched=switched,
                                          window=(w, len(wins)))
            if observer is not None:
                observer("chunks", j, len(lens))

    def _encode_padded(self, chunks, offsets, token_budget: int, max_pad_ratio: float, out: _PackedOutput) -> None:
        """Right-padded micro-batches of similar lengths (longest first); padded positions are dropped."""
        dev = next(self.model.parameters()).device
        lens = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
        observer, done = getattr(_observers, "fn", None), 0
        for idx in _padded_batches(lens, token_budget, max_pad_ratio):
            longest = lens[idx[0]]
            ids = torch.zeros(len(idx), longest, dtype=torch.long)
            mask = torch.zeros(len(idx), longest, dtype=torch.bool)
            for row, ci in enumerate(idx):
                ids[row, : lens[ci]] = torch.as_tensor(chunks[ci], dtype=torch.long)
                mask[row, : lens[ci]] = True
            dest = torch.cat([torch.arange(offsets[ci], offsets[ci + 1]) for ci in idx]).to(dev)
            ids, mask = ids.to(dev), mask.to(dev)
            if observer is not None:
                observer("row", done, done + len(idx))
            if len(idx) == 1:  # a single row has no padding: no mask
                self._encode_pass(out, dest, ids)
            else:
                self._encode_pass(out, dest, ids, attention_mask=mask.long(), valid=mask)
            done += len(idx)
            if observer is not None:
                observer("chunks", done, len(lens))


def _windows(n: int, n_slice: int | None) -> list[tuple[int, int]]:
    """``[(a, b), ...]``: the token windows of a row of ``n`` tokens, at most ``n_slice`` each (None: the whole row)."""
    if n_slice is None or n <= n_slice:
        return [(0, n)]
    return [(a, min(n, a + n_slice)) for a in range(0, n, n_slice)]


def _budget_rows(lens: list[int], token_budget: int) -> list[tuple[int, int]]:
    """``[(i, j), ...]``: chunks ``i..j-1`` share one packed row of at most ``token_budget`` tokens (consecutive
    chunks; a chunk longer than the budget gets a row of its own)."""
    rows, i = [], 0
    while i < len(lens):
        j, n = i + 1, lens[i]
        while j < len(lens) and n + lens[j] <= token_budget:
            n += lens[j]
            j += 1
        rows.append((i, j))
        i = j
    return rows


def _padded_batches(lens: list[int], token_budget: int, max_pad_ratio: float) -> list[list[int]]:
    """Chunk indices grouped longest-first into padded micro-batches: at most ``token_budget // longest`` rows (at
    least one), each row at least ``longest / max_pad_ratio`` tokens long."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    batches, i = [], 0
    while i < len(order):
        longest = lens[order[i]]
        cap = max(1, token_budget // max(1, longest))
        nb = 1
        while nb < cap and i + nb < len(order) and lens[order[i + nb]] * max_pad_ratio >= longest:
            nb += 1
        batches.append(order[i : i + nb])
        i += nb
    return batches


class _Capture:
    """The feature maps of one truncated forward: kept in ``maps``, or handed to ``sink(j, hs)`` as they appear."""

    def __init__(self, sink=None):
        self.sink = sink
        self.maps: list[torch.Tensor] = []
        self.count = 0

    def emit(self, hs: torch.Tensor) -> None:
        if self.sink is None:
            self.maps.append(hs)
        else:
            self.sink(self.count, hs)
        self.count += 1


class _PackedOutput:
    """The packed buffer ``[n_features, n_tokens, H']`` that encoder passes write their valid tokens into.

    Allocated at the first write, with the width and dtype of ``transform``'s output (of the hidden states cast
    to ``dtype`` without a transform).
    """

    def __init__(self, n_features: int, n_tokens: int, dtype=None, transform=None):
        self.n_features, self.n_tokens = n_features, n_tokens
        self.dtype, self.transform = dtype, transform
        self.buffer: torch.Tensor | None = None

    def sink(self, dest: torch.Tensor, valid: torch.Tensor | None):
        """``sink(j, hs)`` writing the ``valid`` positions (all if None) of feature map j, hs ``[rows, S, H]``, to
        the packed rows ``dest`` (row-major order of the valid positions)."""

        def write(j: int, hs: torch.Tensor) -> None:
            x = hs.reshape(-1, hs.shape[-1]) if valid is None else hs[valid]
            if self.dtype is not None:
                x = x.to(self.dtype)
            y = self.transform(x) if self.transform is not None else x
            if self.buffer is None:
                self.buffer = y.new_empty(self.n_features, self.n_tokens, y.shape[-1])
            self.buffer[j].index_copy_(0, dest, y)

        return write


__all__ = ["ContextEncoder", "encode_in_slices", "observe_encoding"]
