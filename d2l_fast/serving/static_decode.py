"""Static decoding for :class:`~d2l_fast.serving.engine.DecodeEngine`: fixed-shape steps, CUDA graphs on CUDA.

The dynamic engine path grows an HF ``DynamicCache`` by one column per step (a ``torch.cat`` of every layer's K/V
and of the mask), concatenates every layer's K/V again when rows join, and builds a new adapter binding (segment
metadata, launch plans) per step: host-bound, and not capturable. :class:`StaticDecoder` instead keeps

* a **slot KV cache**: per layer one preallocated ``[max_batch, kv_heads, L, head_dim]`` buffer, one row (slot) per
  request, ``L`` a power-of-two length bucket. All rows share one write column ``col``: a joining row's prefill
  K/V is copied right-aligned to end at ``col`` (the left-padding idea of the dynamic path), so every row's tokens
  are the contiguous columns ``[col - n_row, col)``. When ``col`` reaches ``L`` the columns that are padding in
  every row are dropped by one in-place shift (compaction) or, if that frees less than half, the buffers move to
  the next bucket;
* a **static additive mask** ``[max_batch, 1, 1, L]`` (0 = attend, dtype minimum = masked; a sliding-window layer
  gets the same mask with the columns older than its window masked, computed on the device from ``col``);
* an **adapter slot bank**: one :class:`~d2l_fast.AdapterBatch` with one rank-``R`` slot per batch row (an adapter
  of rank ``r < R`` is zero-padded, a row without adapter holds zeros, which add exactly 0), bound once per batch
  bucket through :meth:`D2LModel.bind` — so the segmented LoRA op reads fixed buffers through a fixed
  ``SegmentMeta`` and nothing is rebuilt per step;
* **batch buckets** (1, 2, 4, …, ``max_batch``): a step runs the smallest bucket holding every occupied slot;
  free slots inside it are inert pad rows (rows never mix in a decoder). Rows leaving a bucket that could shrink
  are moved down into the free slots.

A step is ``mask[:, col] = 0`` → forward of ``n`` rows at positions ``pos`` writing K/V at ``col`` → ``pos += 1``,
``col += 1``: all device ops on fixed buffers. On CUDA one ``torch.cuda.CUDAGraph`` per (bucket, length, with or
without LoRA) is captured (after a warm-up on a side stream) and replayed; on CPU the same step runs eagerly. The
host work per step is writing the rows' last tokens into a buffer.

Supported: HF decoders whose prefill cache is made of plain ``DynamicLayer`` (full attention) and/or
``DynamicSlidingWindowLayer`` (one window size) layers, with the ``eager`` or ``sdpa`` attention implementation
(they take a prepared 4-D additive mask; models mixing both layer kinds must also accept a per-layer-type mask
dict, as Gemma-2 / Qwen3 do). Anything else (flash-attention, flex, other cache layers) makes
:func:`static_unsupported` give the reason and the engine keeps its dynamic path.
"""

from __future__ import annotations

import inspect
import logging

import torch

from ..adapters import AdapterBatch
from ..concurrency import model_lock
from ..hf import decoder_of
from ..patching import patch_model

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_LENGTH = 64  # the smallest length bucket (a power of two)
RANK_MULTIPLE = 8  # the bank's slot rank is rounded up to this
MAX_HEADROOM = 1024  # columns reserved beyond the prompts for new tokens when the buffers are (re)allocated


def batch_bucket(n: int, max_batch: int) -> int:
    """The smallest batch bucket holding ``n`` rows (``max_batch`` itself is the last bucket)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_batch:
        raise ValueError(f"n must be an int in [1, max_batch={max_batch}], got {n!r}")
    return next((b for b in BATCH_BUCKETS if n <= b < max_batch), max_batch)


def length_bucket(n: int) -> int:
    """The smallest power of two >= max(n, MIN_LENGTH)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    return max(MIN_LENGTH, 1 << max(0, n - 1).bit_length())


def _layer_windows(cache) -> list[int | None] | str:
    """Per cache layer: None (full attention) or its sliding window; a str saying why the cache is unsupported."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    out = []
    for k, layer in enumerate(getattr(cache, "layers", None) or []):
        if type(layer) is DynamicLayer:
            out.append(None)
        elif type(layer) is DynamicSlidingWindowLayer:
            out.append(int(layer.sliding_window))
        else:
            return f"cache layer {k} is a {type(layer).__name__} (only DynamicLayer / DynamicSlidingWindowLayer)"
    return out or "the prefill cache has no layers"


def static_unsupported(model, cache) -> str | None:
    """Why static decoding cannot run ``model`` (a D2LModel) given its prefill ``cache``; None when it can."""
    base = model.base_model
    dec = decoder_of(base)
    with model_lock(dec).shared():  # an encoder pass switches the attention implementation while it holds the lock
        impl = getattr(base.config, "_attn_implementation", None)
    if impl not in ("eager", "sdpa"):
        return f"attention implementation {impl!r} (static decoding needs 'eager' or 'sdpa': a 4-D additive mask)"
    windows = _layer_windows(cache)
    if isinstance(windows, str):
        return windows
    if len(windows) != len(dec.layers):
        return f"the cache has {len(windows)} layers for {len(dec.layers)} decoder layers"
    if len({w for w in windows if w is not None}) > 1:
        return "layers with different sliding windows"
    if any(w is None for w in windows) and any(w is not None for w in windows):
        types = getattr(dec.config, "layer_types", None)
        ok = isinstance(types, (list, tuple)) and len(types) == len(windows) and all(
            t == ("full_attention" if w is None else "sliding_attention") for t, w in zip(types, windows))
        try:
            takes_dict = "causal_mask_mapping" in inspect.getsource(type(dec).forward)
        except (OSError, TypeError):
            takes_dict = False
        if not (ok and takes_dict):
            return "full and sliding-window layers, but the decoder does not take a per-layer-type mask dict"
    return None


class _SlotCache:
    """What the attention layers write into: ``update`` puts the step's K/V at column ``col`` of ``n`` slot rows."""

    is_compileable = False

    def __init__(self, views: list[tuple[torch.Tensor, torch.Tensor]], col: torch.Tensor, host_col: int):
        self.views, self.col, self.host_col = views, col, host_col

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.views[layer_idx]
        k.index_copy_(2, self.col, key_states)
        v.index_copy_(2, self.col, value_states)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only read when no position_ids are given (we give them)
        return self.host_col

    def __len__(self) -> int:
        return len(self.views)


class StaticDecoder:
    """The static decode state of one :class:`DecodeEngine` (see the module docstring); engine thread only.

    ``admit(rows, cache, mask)`` places prefilled rows into free slots; ``step(slots, tokens)`` runs one decode step
    of the occupied slots and returns the logits of ``slots`` (in that order); ``release(slots)`` frees slots.
    """

    def __init__(self, model, cache, *, max_batch: int, cache_kw: str, pad_id: int, graphs: bool):
        windows = _layer_windows(cache)
        if isinstance(windows, str):
            raise ValueError(f"static decoding cannot use this cache: {windows}")
        if graphs and cache.layers[0].keys.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        self.model, self.base = model, model.base_model
        self.max_batch, self.cache_kw, self.pad_id, self.graphs = int(max_batch), cache_kw, int(pad_id), bool(graphs)
        self.windows = windows
        self.window = next((w for w in windows if w is not None), None)
        self.mixed = any(w is None for w in windows) and self.window is not None
        first = cache.layers[0].keys
        self.dtype, self.device = first.dtype, first.device
        self.kv_shapes = [(layer.keys.shape[1], layer.keys.shape[3], layer.keys.dtype) for layer in cache.layers]
        self.neg = torch.finfo(self.dtype).min
        self._ctx = patch_model(self.base, model.spec.target_modules)  # the model's LoRA context (already patched)
        self.L, self.col = 0, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask = self.col_t = self.cols = self.neg_t = None
        B = self.max_batch
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        self.tok = torch.full((B, 1), self.pad_id, dtype=torch.long, device=self.device)
        self._tok_host = torch.full((B,), self.pad_id, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.rows: list[object | None] = [None] * B  # slot -> request (None: free)
        self.n_tok = [0] * B  # real tokens a slot holds (its columns are [col - n_tok, col))
        self.has_adapter = [False] * B
        self.bank: AdapterBatch | None = None
        self.rank = 0
        self._bindings: dict[int, object] = {}
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._views: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._sel: dict[tuple[int, ...], torch.Tensor] = {}
        # statistics
        self.compactions = self.growths = self.moves = self.captures = 0

    # ------------------------------------------------------------------ slots
    @property
    def occupied(self) -> list[int]:
        return [s for s, r in enumerate(self.rows) if r is not None]

    def free_slots(self) -> int:
        return sum(r is None for r in self.rows)

    def admit(self, rows: list, cache, mask: torch.Tensor) -> list[int]:
        """Copy the prefilled ``rows`` (their left-padded prefill ``cache`` and 2-D ``mask``) into free slots."""
        if len(rows) != mask.shape[0] or len(rows) > self.free_slots():
            raise ValueError(f"{len(rows)} rows for a mask of {mask.shape[0]} rows and {self.free_slots()} free slots")
        if len(cache.layers) != len(self.kv_shapes):
            raise ValueError(f"a prefill cache of {len(cache.layers)} layers for {len(self.kv_shapes)}")
        for r in rows:  # before anything is written: a bad adapter fails only these rows
            if r.adapter is not None and len(r.adapter) != 1:
                raise ValueError(f"a request carries one adapter (an AdapterBatch of length 1), got {len(r.adapter)}")
        lens = [int(n) for n in mask.sum(1).tolist()]
        headroom = min(max(int(r.max_new_tokens) for r in rows), MAX_HEADROOM)
        self._make_room(max(lens), headroom)
        slots = [s for s, r in enumerate(self.rows) if r is None][: len(rows)]
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        c = self.col
        with torch.no_grad():
            for li, layer in enumerate(cache.layers):
                m = min(max(lens), layer.keys.shape[2])
                for buf, src in ((self.keys[li], layer.keys), (self.values[li], layer.values)):
                    buf.index_fill_(0, idx, 0)  # no stale value of an earlier row (0 · NaN would leak through)
                    if m:
                        buf[:, :, c - m:c].index_copy_(0, idx, src[:, :, -m:].to(buf.dtype))
            rows_mask = torch.full((len(rows), 1, 1, self.L), self.neg, dtype=self.dtype)
            for i, n in enumerate(lens):
                rows_mask[i, 0, 0, c - n:c] = 0
            self.mask.index_copy_(0, idx, rows_mask.to(self.device))
            self.pos.index_copy_(0, idx, torch.tensor(lens, dtype=torch.long).view(-1, 1).to(self.device))
            for s, r in zip(slots, rows):
                self._put_adapter(s, r.adapter)
        for s, r, n in zip(slots, rows, lens):
            self.rows[s], self.n_tok[s] = r, n
        return slots

    def release(self, slots: list[int]) -> dict[int, int]:
        """Free ``slots``; returns the moves ``{old slot: new slot}`` made so the batch fits a smaller bucket."""
        for s in slots:
            self.rows[s], self.n_tok[s] = None, 0
        occ = self.occupied
        if not occ:
            self.col = 0  # the next admission places its rows from the left again (buffers and graphs stay)
            return {}
        moves: dict[int, int] = {}
        target = batch_bucket(len(occ), self.max_batch)
        if batch_bucket(occ[-1] + 1, self.max_batch) > target:
            holes = [s for s in range(target) if self.rows[s] is None]
            for src, dst in zip([s for s in occ if s >= target], holes):
                self._move(src, dst)
                moves[src] = dst
        return moves

    def _move(self, src: int, dst: int) -> None:
        with torch.no_grad():
            for buf in (*self.keys, *self.values, self.mask, self.pos):
                buf[dst].copy_(buf[src])
            if self.bank is not None:
                R = self.rank
                for t in (*self.bank.A.values(), *self.bank.B.values()):
                    t[:, dst * R:(dst + 1) * R].copy_(t[:, src * R:(src + 1) * R])
        self.rows[dst], self.n_tok[dst], self.has_adapter[dst] = self.rows[src], self.n_tok[src], self.has_adapter[src]
        self.rows[src], self.n_tok[src] = None, 0
        self.moves += 1

    # ------------------------------------------------------------------ columns
    def _make_room(self, col_min: int, headroom: int) -> None:
        """Make ``col >= col_min`` and ``col < L`` (a shift and/or the next length bucket), rows kept."""
        if self.L and col_min <= self.col < self.L:
            return
        held = max((self.n_tok[s] for s in self.occupied), default=0)
        c2 = max(col_min, held)
        L2 = self.L if c2 < self.L else length_bucket(c2 + 1 + headroom)
        self._relayout(c2, L2)

    def _room_for_step(self) -> None:
        held = max((self.n_tok[s] for s in self.occupied), default=0)
        if held <= self.L // 2:
            self._relayout(held, self.L)
        else:
            self._relayout(held, length_bucket(2 * self.L))

    def _relayout(self, c2: int, L2: int) -> None:
        """Move every row's columns ``[col - held, col)`` to end at ``c2`` in buffers of length ``L2``."""
        held = max((self.n_tok[s] for s in self.occupied), default=0)
        if not (held <= c2 < L2):
            raise ValueError(f"cannot place {held} columns to end at {c2} in {L2}")
        a, b = self.col - held, c2 - held
        with torch.no_grad():
            if L2 != self.L:
                self._allocate(L2, keep=(a, b, held))
            elif held and a != b:
                self.compactions += b < a
                for buf in (*self.keys, *self.values):
                    part = buf[:, :, a:a + held].clone()
                    buf.zero_()
                    buf[:, :, b:b + held] = part
                part = self.mask[..., a:a + held].clone()
                self.mask.fill_(self.neg)
                self.mask[..., b:b + held] = part
            self.col = c2
            self.col_t.fill_(c2)

    def _allocate(self, L2: int, keep: tuple[int, int, int]) -> None:
        a, b, held = keep
        B = self.max_batch
        keys = [torch.zeros(B, h, L2, d, dtype=dt, device=self.device) for h, d, dt in self.kv_shapes]
        values = [torch.zeros(B, h, L2, d, dtype=dt, device=self.device) for h, d, dt in self.kv_shapes]
        mask = torch.full((B, 1, 1, L2), self.neg, dtype=self.dtype, device=self.device)
        if held and self.L:
            for new, old in zip(keys + values, self.keys + self.values):
                new[:, :, b:b + held] = old[:, :, a:a + held]
            mask[..., b:b + held] = self.mask[..., a:a + held]
        self.keys, self.values, self.mask, self.L = keys, values, mask, L2
        self.col_t = torch.zeros(1, dtype=torch.long, device=self.device)
        self.cols = torch.arange(L2, device=self.device)
        self.neg_t = torch.tensor(self.neg, dtype=self.dtype, device=self.device)
        self._graphs.clear()  # they captured the old buffers
        self._views.clear()
        self.growths += bool(held)

    # ------------------------------------------------------------------ adapters
    def _put_adapter(self, slot: int, ad: AdapterBatch | None) -> None:
        if ad is None:
            if self.bank is not None and self.has_adapter[slot]:
                R = self.rank
                for t in (*self.bank.A.values(), *self.bank.B.values()):
                    t[:, slot * R:(slot + 1) * R].zero_()
            self.has_adapter[slot] = False
            return
        r = ad.ranks[0]
        if self.bank is None or r > self.rank or ad.modules != self.bank.modules:
            self._grow_bank(ad, r)
        R, bank = self.rank, self.bank
        scale = float(ad.alpha) / float(bank.alpha)  # one alpha per bank: another alpha is folded into B
        for m in bank.modules:
            for t, src, k in ((bank.A[m], ad.A[m], 1.0), (bank.B[m], ad.B[m], scale)):
                dst = t[:, slot * R:(slot + 1) * R]
                dst[:, :r].copy_(src if k == 1.0 else src * k)
                dst[:, r:].zero_()
        self.has_adapter[slot] = True

    def _grow_bank(self, ad: AdapterBatch, r: int) -> None:
        """A bank whose slots hold rank ``max(r, current)`` (rounded up), the old slots copied over."""
        R2 = -(-max(r, self.rank) // RANK_MULTIPLE) * RANK_MULTIPLE
        old, R = self.bank, self.rank
        if old is not None and old.modules != ad.modules:
            raise ValueError(f"adapters for modules {ad.modules}, the running rows use {old.modules}")
        B = self.max_batch

        def alloc(t):
            return torch.zeros(t.shape[0], B * R2, t.shape[2], dtype=self.model.base_dtype, device=self.device)

        A, Bm = {m: alloc(t) for m, t in ad.A.items()}, {m: alloc(t) for m, t in ad.B.items()}
        if old is not None:
            for new, prev in ((A, old.A), (Bm, old.B)):
                for m in new:
                    for s in range(B):
                        new[m][:, s * R2:s * R2 + R] = prev[m][:, s * R:(s + 1) * R]
        alpha = old.alpha if old is not None else ad.alpha
        self.bank = AdapterBatch(A, Bm, [s * R2 for s in range(B + 1)], alpha, ad.model_id)
        self.rank = R2
        self._bindings.clear()
        self._graphs = {k: v for k, v in self._graphs.items() if not k[1]}  # the LoRA graphs read the old bank

    def _binding(self, n: int):
        b = self._bindings.get(n)
        if b is None:
            with self.model.bind(self.bank, list(range(n))) as b:  # checks the bank once (finite, shapes)
                pass
            if b.adapters is not self.bank:
                raise RuntimeError("the model copied the adapter bank when binding it; static decoding needs it bound "
                                   "in place")
            self._bindings[n] = b
        return b

    # ------------------------------------------------------------------ steps
    def step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One decode step: ``tokens[i]`` is the last token of slot ``slots[i]``; returns their logits [len, V]."""
        if len(slots) != len(tokens) or not slots or any(self.rows[s] is None for s in slots):
            raise ValueError(f"step needs occupied slots and one token each, got {slots} / {len(tokens)} tokens")
        if self.col >= self.L:
            self._room_for_step()
        n = batch_bucket(max(self.occupied) + 1, self.max_batch)
        host = self._tok_host
        host.fill_(self.pad_id)
        host[slots] = torch.tensor(tokens, dtype=torch.long)
        self.tok[:n, 0].copy_(host[:n], non_blocking=True)
        lora = any(self.has_adapter[s] for s in self.occupied)
        if self.graphs:
            hit = self._graphs.get((n, lora))
            if hit is None:
                hit = self._capture(n, lora)
            hit[0].replay()
            logits = hit[1]
        else:
            logits = self._forward(n, lora)
        self.col += 1
        for s in self.occupied:
            self.n_tok[s] += 1
        key = tuple(slots)
        sel = self._sel.get(key)
        if sel is None:
            if len(self._sel) > 64:
                self._sel.clear()
            sel = self._sel[key] = torch.tensor(slots, dtype=torch.long, device=self.device)
        return logits.index_select(0, sel)

    def _masks(self, n: int):
        full = self.mask[:n]
        if self.window is None:
            return full
        band = torch.where((self.cols > self.col_t - self.window).view(1, 1, 1, -1), full, self.neg_t)
        return {"full_attention": full, "sliding_attention": band} if self.mixed else band

    def _forward(self, n: int, lora: bool) -> torch.Tensor:
        """The fixed-shape step of the first ``n`` slots (what a CUDA graph captures)."""
        views = self._views.get(n)
        if views is None:
            views = self._views[n] = [(k[:n], v[:n]) for k, v in zip(self.keys, self.values)]
        with torch.no_grad(), self._ctx.bound(self._binding(n) if lora else None):
            self.mask[:n].index_fill_(3, self.col_t, 0.0)
            kw = {self.cache_kw: _SlotCache(views, self.col_t, self.col)}
            out = self.base(input_ids=self.tok[:n], attention_mask=self._masks(n), position_ids=self.pos[:n],
                            use_cache=True, **kw)
            self.pos[:n].add_(1)
            self.col_t.add_(1)
        return out.logits[:, -1, :]

    def _capture(self, n: int, lora: bool):
        """Warm up (side stream) and capture the step of bucket ``n`` as a CUDA graph; the state is left unchanged."""
        saved = (self.col_t.clone(), self.pos.clone(), self.mask.clone())

        def restore():
            for dst, src in zip((self.col_t, self.pos, self.mask), saved):
                dst.copy_(src)

        # an encoder pass elsewhere would switch the attention implementation and hook the layers: hold it off
        with model_lock(decoder_of(self.base)).exclusive("cuda graph capture"):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # first call: lazy tile tables, kernel compiles; second: steady state
                    self._forward(n, lora)
                    restore()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                logits = self._forward(n, lora)
        restore()  # capturing records the kernels without running them; the state is as before
        self._graphs[(n, lora)] = (graph, logits)
        self.captures += 1
        return graph, logits


__all__ = ["BATCH_BUCKETS", "StaticDecoder", "batch_bucket", "length_bucket", "static_unsupported"]
