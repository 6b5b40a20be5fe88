"""The server's two workers: packed internalization of queued documents, and continuous batched decoding.

:class:`InternalizeBatcher` collects the documents posted within ``window_s`` (several requests, several
documents each) and internalizes them in ONE :meth:`D2LModel.internalize` call. If that packed call fails, each
document is retried alone, so only the document at fault fails.

:class:`DecodeEngine` decodes every running request in one batched forward per step, each row with its own
adapter (one :class:`~d2l_fast.AdapterBatch` holding the rows' adapters, ``adapter_index`` = row → adapter,
-1 = base model; the segmented LoRA op applies them in the same forward). The KV cache is a transformers
``DynamicCache`` over a left-padded batch. Continuous batching: at every step boundary, waiting requests are
prefilled (one batched forward of their own) and their cache rows are merged into the running batch (left
padding to the longer history); a finished or cancelled row leaves the batch at once (its cache rows are
dropped), so neither joining nor leaving waits for the other rows. Models whose cache is not made of plain
``DynamicLayer`` s (sliding-window layers, e.g. Gemma-2) cannot merge caches: new requests then join when the
batch has drained (per-batch mode). Greedy decoding gives the tokens of :meth:`D2LModel.generate` for the same
prompt and adapter; sampling uses one ``torch.Generator`` per request (``seed``), so a seeded request does not
depend on what else is in the batch. The rows' adapter batch is built when rows join (one concatenation per
admission), not at every step: a leaving row only gives up its slot.

``static=True`` (or ``"auto"``: on CUDA models only) decodes with fixed-shape steps instead
(:mod:`d2l_fast.serving.static_decode`): a preallocated slot KV cache, a static mask, an adapter slot bank and batch
buckets, each step a CUDA graph replay on CUDA (``cuda_graphs``) or the same step run eagerly on CPU. Prefill stays
as above; rows join any running batch (sliding-window models included). Models it does not support (see
:func:`~d2l_fast.serving.static_decode.static_unsupported`) keep the dynamic path, and so does an engine whose
static step once failed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..adapters import AdapterBatch
from ..answering import left_pad
from ..encoder import encode_in_slices, observe_encoding
from .errors import APIError
from .heap import HeapTrimmer
from .sampling import penalty_offsets, sample_token, stop_holdback
from .static_decode import StaticDecoder, static_unsupported
from .uploads import GroupProgress, UploadCancelled, UploadProgress

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- internalize
@dataclass
class _DocJob:
    text: str
    future: concurrent.futures.Future
    progress: UploadProgress | None = None


class InternalizeBatcher:
    """A queue of documents drained by one thread: every ``window_s`` batch is one packed internalize call.

    ``submit(texts)`` returns one future per text; each resolves to ``(adapter, seconds)`` (a length-1
    :class:`AdapterBatch`; the wall time of the packed call it was part of) or raises the error of that document.
    ``progress`` (one :class:`~d2l_fast.serving.uploads.UploadProgress` per text) is updated while the encoder
    reads the documents; a cancelled one is dropped before its call, and a call whose documents are all
    cancelled is abandoned at the next slice (its futures raise :class:`UploadCancelled`). ``call_sizes``: the
    documents of each of the latest ``keep_calls`` calls (statistics; bounded, a server runs for months).
    """

    def __init__(self, model, *, window_s: float = 0.005, max_docs: int = 64, max_tokens: int = 1 << 16,
                 slice_tokens: int | None = None, keep_calls: int = 256, heap: HeapTrimmer | None = None):
        if isinstance(keep_calls, bool) or not isinstance(keep_calls, int) or keep_calls < 1:
            raise ValueError(f"keep_calls must be a positive int, got {keep_calls!r}")
        self.model = model
        self.heap = heap  # trims the C heap when idle (None: never)
        self.slice_tokens = slice_tokens  # encoder windows of at most this many tokens (None: whole packed rows)
        self.window_s = float(window_s)
        self.max_docs = int(max_docs)
        self.max_tokens = int(max_tokens)
        self._q: queue.Queue[_DocJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._count_lock = threading.Lock()
        self.calls = 0  # packed internalize calls made (tests check that concurrent posts share calls)
        self.call_sizes: collections.deque[int] = collections.deque(maxlen=keep_calls)  # docs per call, latest
        self.pending = 0  # documents submitted and not yet finished

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="d2l-internalize", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, texts: list[str], progress: list[UploadProgress] | None = None) -> list[concurrent.futures.Future]:
        if self._thread is None:
            raise APIError(503, "the server is shutting down", code="unavailable")
        if progress is not None and len(progress) != len(texts):
            raise ValueError(f"{len(progress)} progress records for {len(texts)} documents")
        jobs = [_DocJob(t, concurrent.futures.Future(), None if progress is None else progress[k])
                for k, t in enumerate(texts)]
        with self._count_lock:
            self.pending += len(jobs)
        for j in jobs:
            j.future.add_done_callback(self._done)
            self._q.put(j)
        return [j.future for j in jobs]

    def _done(self, _future) -> None:
        with self._count_lock:
            self.pending -= 1

    def _run(self) -> None:
        while True:
            try:
                first = self._q.get(timeout=self.heap.idle() if self.heap is not None else None)
            except queue.Empty:
                continue
            if first is None:
                return
            group, deadline, stop = [first], time.monotonic() + self.window_s, False
            while len(group) < self.max_docs:
                try:
                    j = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if j is None:
                    stop = True
                    break
                group.append(j)
            self._process(group)
            if self.heap is not None:
                self.heap.note_work()
            if stop:
                return

    def _internalize(self, group: list[_DocJob]) -> AdapterBatch:
        with observe_encoding(GroupProgress([j.progress for j in group])), encode_in_slices(self.slice_tokens):
            return self.model.internalize([j.text for j in group])

    def _process(self, group: list[_DocJob]) -> None:
        group = [j for j in group if j.future.set_running_or_notify_cancel()]
        for j in [j for j in group if j.progress is not None and j.progress.cancelled]:
            j.future.set_exception(UploadCancelled("the upload was cancelled"))
        group = [j for j in group if not j.future.done()]
        if not group:
            return
        t0 = time.perf_counter()
        try:
            ad = self._internalize(group)
        except Exception as e:  # one bad document must not fail the others: retry each alone
            if len(group) == 1 or isinstance(e, UploadCancelled):
                for j in group:
                    j.future.set_exception(e)
                return
            logger.info("packed internalize of %d documents failed (%s); retrying one by one", len(group), e)
            for j in group:
                t1 = time.perf_counter()
                try:
                    one = self._internalize([j])
                except Exception as e1:  # noqa: BLE001 - the error goes to that document's request
                    j.future.set_exception(e1)
                else:
                    self.calls += 1
                    self.call_sizes.append(1)
                    j.future.set_result((one, time.perf_counter() - t1))
            return
        dt = time.perf_counter() - t0
        self.calls += 1
        self.call_sizes.append(len(group))
        for k, j in enumerate(group):
            j.future.set_result((ad.select([k]), dt))


# ---------------------------------------------------------------------------------------------- decoding
@dataclass
class GenRequest:
    """One completion: prompt ids, its adapter (None: base model) and sampling settings.

    ``sink(kind, payload)`` is called from the engine thread: ``("delta", text)`` for streamed text,
    ``("done", GenRequest)`` once, or ``("error", APIError)`` once. Set ``cancelled`` to drop the row.
    """

    prompt_ids: list[int]
    adapter: AdapterBatch | None
    max_new_tokens: int
    sink: object
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0  # OpenAI's: logit -= presence · [token generated] + frequency · its count
    frequency_penalty: float = 0.0
    cancelled: bool = False
    # filled by the engine
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _emitted: int = 0
    _gen: torch.Generator | None = None


class DecodeEngine:
    """Continuous batched decoding in one thread (see the module docstring)."""

    def __init__(self, model, *, max_batch: int = 16, max_queue: int = 256, heap: HeapTrimmer | None = None,
                 static: bool | str = False, cuda_graphs: bool | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        if not (isinstance(static, bool) or static == "auto") or not isinstance(cuda_graphs, (bool, type(None))):
            raise ValueError(f"static must be False/True/'auto' and cuda_graphs None/True/False, got {static!r}, "
                             f"{cuda_graphs!r}")
        on_cuda = model.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs a CUDA model, this one is on {model.device}")
        self.static = static is True or (static == "auto" and on_cuda)  # static decoding wanted
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.model = model
        self.heap = heap  # trims the C heap when the batch has drained (None: never)
        self.tokenizer = model.tokenizer
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        gc = model.base_model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (next(iter(self.eos_ids)) if self.eos_ids else 0))
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._cv = threading.Condition()
        self._waiting: list[GenRequest] = []
        self._running = False
        self._thread: threading.Thread | None = None
        # batch state (engine thread only)
        self._rows: list[GenRequest] = []
        self._admitting: list[GenRequest] = []  # taken from the queue, being prefilled
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._ad: AdapterBatch | None = None  # the running rows' adapters (and maybe of rows that left: _join_adapters)
        self._slots: list[int] = []  # row i uses adapter _slots[i] of _ad (-1: base model)
        self._can_merge: bool | None = None
        self._static: StaticDecoder | None = None  # the static decode state (static mode, once the model is checked)
        self.static_off: str | None = None  # why static decoding is not used (None: wanted and usable, or not wanted)
        self._row_slots: list[int] = []  # static mode: row i sits in slot _row_slots[i]
        # statistics
        self.steps = 0
        self.max_rows_seen = 0
        self.joins_mid_batch = 0
        self.cancelled_rows = 0  # rows dropped because their client went away

    @property
    def decode_path(self) -> dict:
        """How steps are decoded (``/health``): ``{"decode": "static" | "dynamic", "cuda_graphs": bool,
        "static_off": why static decoding is not used, or None}``; static is wanted until the first batch shows the
        model cannot take it."""
        static = self.static and self.static_off is None
        return {"decode": "static" if static else "dynamic", "cuda_graphs": bool(static and self.cuda_graphs),
                "static_off": self.static_off}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cv:
            if self._thread is not None:
                return
            self._running = True
            self._thread = threading.Thread(target=self._run, name="d2l-decode", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        err = APIError(503, "the server is shutting down", code="unavailable")
        for r in self._waiting + self._admitting + self._rows:
            r.sink("error", err)
        self._waiting, self._rows = [], []

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if not self._running:
                raise APIError(503, "the server is shutting down", code="unavailable")
            if self.in_flight >= self.max_queue:
                raise APIError(429, f"too many requests in flight (limit {self.max_queue}); retry later",
                               code="queue_full")
            if req.seed is not None:
                req._gen = torch.Generator(device=self.model.device)
                req._gen.manual_seed(int(req.seed))
            self._waiting.append(req)
            self._cv.notify_all()

    @property
    def in_flight(self) -> int:
        return len(self._waiting) + len(self._admitting) + len(self._rows)

    # ------------------------------------------------------------------ main loop
    def _run(self) -> None:
        while True:
            with self._cv:
                while self._running and not self._waiting and not self._rows:
                    self._cv.wait(self.heap.idle() if self.heap is not None else None)
                if not self._running:
                    return
                room = self.max_batch - len(self._rows)
                new = []
                if room > 0 and (not self._rows or self._can_merge):
                    new, self._waiting = self._waiting[:room], self._waiting[room:]
                    self._admitting = new = [r for r in new if not r.cancelled]
            try:
                if new:
                    self._admit(new)
                if self._rows:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed batched forward fails its rows, never the server
                logger.exception("decode step failed")
                if self._static is not None:  # the dynamic path from now on
                    self._static.release(self._static.occupied)
                    self._static, self.static_off, self._can_merge = None, f"a static step failed: {e}", None
                err = APIError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_failed")
                for r in {id(r): r for r in self._rows + self._admitting}.values():
                    if r.finish_reason is None:
                        r.sink("error", err)
                self._reset_batch()
            finally:
                self._admitting = []

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask, self._ad, self._slots = [], None, None, None, []
        if self._static is not None:
            self._static.release(self._static.occupied)  # the buffers (and CUDA graphs) stay for the next batch
        self._row_slots = []
        if self.heap is not None:
            self.heap.note_work()

    # ------------------------------------------------------------------ prefill / merge
    def _adapters_for(self, rows: list[GenRequest]) -> tuple[AdapterBatch | None, list[int]]:
        """The rows' adapters as one batch (an adapter object shared by rows appears once) and row → adapter."""
        parts, index, seen = [], [], {}
        for r in rows:
            if r.adapter is None:
                index.append(-1)
                continue
            if len(r.adapter) != 1:
                raise ValueError(f"a request carries one adapter (an AdapterBatch of length 1), got {len(r.adapter)}")
            if id(r.adapter) not in seen:
                seen[id(r.adapter)] = len(parts)
                parts.append(r.adapter)
            index.append(seen[id(r.adapter)])
        if not parts:
            return None, index
        return (parts[0] if len(parts) == 1 else AdapterBatch.concat(parts)), index

    def _join_adapters(self, ad: AdapterBatch | None, index: list[int]) -> None:
        """Append joining rows' adapters to the running batch's (one concatenation per admission, not per step).

        Rows that leave only drop their slot, so a step binds the same batch as the step before (no copy, and its
        NaN check stays cached). Adapters of rows that left are dropped once the batch holds more than
        2 · max_batch adapters.
        """
        if ad is None:
            self._slots = self._slots + index
            return
        if self._ad is None:
            self._ad, off = ad, 0
        else:
            off = len(self._ad)
            self._ad = AdapterBatch.concat([self._ad, ad])
        self._slots = self._slots + [i + off if i >= 0 else -1 for i in index]
        if len(self._ad) > 2 * self.max_batch:
            self._compact_adapters()

    def _compact_adapters(self) -> None:
        used = sorted({i for i in self._slots if i >= 0})
        if not used:
            self._ad = None
            return
        new = {old: k for k, old in enumerate(used)}
        self._ad = self._ad.select(used)
        self._slots = [new[i] if i >= 0 else -1 for i in self._slots]

    def _prefill(self, rows: list[GenRequest], adapters: AdapterBatch | None, index: list[int]):
        from transformers import DynamicCache

        ids, mask = left_pad([r.prompt_ids for r in rows], self.pad_id, self.model.device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.model.base_model.config)
        logits = self._forward(adapters, index, ids, mask, pos, cache, logits_to_keep=1)
        return logits, cache, mask

    def _forward(self, adapters, index, ids, mask, pos, cache, **kwargs) -> torch.Tensor:
        """One batched forward of the base model, row i with adapter ``index[i]`` of ``adapters`` (-1: none);
        last-position logits."""
        kwargs[self._cache_kw] = cache  # updated in place
        with torch.no_grad(), self.model.bind(adapters, index if adapters is not None else None):
            out = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                        **kwargs)
        return out.logits[:, -1, :]

    def _admit(self, new: list[GenRequest]) -> None:
        try:
            adapters, index = self._adapters_for(new)
            logits, cache, mask = self._prefill(new, adapters, index)
        except Exception as e:  # noqa: BLE001
            if len(new) == 1:
                logger.warning("prefill failed: %s", e)
                new[0].sink("error", APIError(500, f"generation failed: {type(e).__name__}: {e}",
                                              code="generation_failed"))
                return
            for r in new:  # find the request at fault; the others go on
                self._admit([r])
            return
        if self.static and self._static is None and self.static_off is None:
            self._start_static(cache)
        if self._static is not None:
            self._admit_static(new, logits, cache, mask)
            return
        if self._can_merge is None:
            from transformers.cache_utils import DynamicLayer

            self._can_merge = all(type(layer) is DynamicLayer for layer in cache.layers)
        if self._rows:
            self._merge(cache, mask)
            self.joins_mid_batch += len(new)
        else:
            self._cache, self._mask = cache, mask
        self._rows = self._rows + new
        self._join_adapters(adapters, index)
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        self._advance(new, logits, first_row=len(self._rows) - len(new))

    def _start_static(self, cache) -> None:
        reason = static_unsupported(self.model, cache)
        if reason is None:
            try:
                self._static = StaticDecoder(self.model, cache, max_batch=self.max_batch, cache_kw=self._cache_kw,
                                             pad_id=self.pad_id, graphs=self.cuda_graphs)
                self._can_merge = True  # rows join any running batch
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: the dynamic path still works
                reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            self.static_off = reason
            logger.info("static decoding is off for this model (%s); decoding with the dynamic cache", reason)

    def _admit_static(self, new: list[GenRequest], logits, cache, mask) -> None:
        try:
            slots = self._static.admit(new, cache, mask)
        except Exception as e:  # noqa: BLE001 - these rows fail, the running ones go on
            logger.warning("static admission failed: %s", e)
            err = APIError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_failed")
            for r in new:
                r.sink("error", err)
            return
        if self._rows:
            self.joins_mid_batch += len(new)
        self._rows, self._row_slots = self._rows + new, self._row_slots + slots
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        self._advance(new, logits, first_row=len(self._rows) - len(new))

    def _merge(self, cache, mask) -> None:
        """Append the rows of (cache, mask) to the running batch, left-padding the shorter history."""
        t_old, t_new = self._mask.shape[1], mask.shape[1]
        t = max(t_old, t_new)

        def lpad(x, k, dim):
            if k == 0:
                return x
            shape = list(x.shape)
            shape[dim] = k
            return torch.cat([x.new_zeros(shape), x], dim)

        for old, add in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([lpad(old.keys, t - t_old, 2), lpad(add.keys, t - t_new, 2)], 0)
            old.values = torch.cat([lpad(old.values, t - t_old, 2), lpad(add.values, t - t_new, 2)], 0)
        self._mask = torch.cat([lpad(self._mask, t - t_old, 1), lpad(mask, t - t_new, 1)], 0)

    # ------------------------------------------------------------------ decode
    def _step(self) -> None:
        rows = self._rows
        if self._static is not None:
            logits = self._static.step(self._row_slots, [r.out_ids[-1] for r in rows])
            self.steps += 1
            self._advance(rows, logits, first_row=0)
            return
        last = torch.tensor([[r.out_ids[-1]] for r in rows], dtype=torch.long, device=self.model.device)
        pos = self._mask.sum(-1, keepdim=True)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], 1)
        logits = self._forward(self._ad, self._slots, last, self._mask, pos, self._cache)
        self.steps += 1
        self._advance(rows, logits, first_row=0)

    def _advance(self, rows: list[GenRequest], logits: torch.Tensor, *, first_row: int) -> None:
        """Pick each row's next token, stream its text, and drop the rows that finished (from the whole batch)."""
        toks = self._pick(rows, logits)
        done = []
        for k, (r, t) in enumerate(zip(rows, toks)):
            if r.cancelled:
                done.append(first_row + k)
                self.cancelled_rows += 1
                continue
            r.out_ids.append(t)
            if t in self.eos_ids:
                self._finish(r, "stop", eos=True)
            elif self._update_text(r):
                self._finish(r, "stop")
            elif len(r.out_ids) >= r.max_new_tokens:
                self._finish(r, "length")
            if r.finish_reason is not None:
                done.append(first_row + k)
        self._drop_rows(done)

    def _pick(self, rows: list[GenRequest], logits: torch.Tensor) -> list[int]:
        logits = logits.float()
        for i, r in enumerate(rows):
            if (r.presence_penalty or r.frequency_penalty) and r.out_ids:
                logits[i] -= penalty_offsets(r, logits.shape[-1], logits.device)
        toks = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            if r.temperature > 0 and not r.cancelled:
                toks[i] = sample_token(logits[i], r.temperature, r.top_p, r._gen)
        return toks

    def _update_text(self, r: GenRequest) -> bool:
        """Decode the row's text, stream the part that is safe to send; True when a stop string appeared."""
        text = self.tokenizer.decode(r.out_ids, skip_special_tokens=True)
        hit = -1
        for s in r.stop:
            k = text.find(s, max(0, r._emitted - len(s)))
            if k >= 0 and (hit < 0 or k < hit):
                hit = k
        if hit >= 0:
            r.text = text[:hit]
            return True
        r.text = text
        safe = len(text) - stop_holdback(text, r.stop)
        while safe > r._emitted and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for the rest
            safe -= 1
        if safe > r._emitted:
            r.sink("delta", text[r._emitted:safe])
            r._emitted = safe
        return False

    def _finish(self, r: GenRequest, reason: str, *, eos: bool = False) -> None:
        if eos:
            r.text = self.tokenizer.decode(r.out_ids[:-1], skip_special_tokens=True)
        r.finish_reason = reason
        if len(r.text) > r._emitted:
            r.sink("delta", r.text[r._emitted:])
            r._emitted = len(r.text)
        r.sink("done", r)

    def _drop_rows(self, done: list[int]) -> None:
        if not done:
            return
        gone = set(done)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._reset_batch()
            return
        self._rows = [self._rows[i] for i in keep]
        if self._static is not None:
            moves = self._static.release([self._row_slots[i] for i in done])
            self._row_slots = [moves.get(s, s) for s in (self._row_slots[i] for i in keep)]
            return
        self._slots = [self._slots[i] for i in keep]  # the adapters stay bound (see _join_adapters)
        idx = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        self._cache.batch_select_indices(idx)
        self._mask = self._mask.index_select(0, idx)
        lead = int((self._mask.cumsum(1) == 0).sum(1).min())  # columns that are padding in every remaining row
        if lead and self._can_merge:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self._mask = self._mask[:, lead:]


__all__ = ["DecodeEngine", "GenRequest", "InternalizeBatcher"]
