"""The reference's self-generated QA data (spec §5.2), streamed from parquet, and greedy packing (spec §5.3).

One parquet row is one context with its QA sequences (the layout Sakana's released ``self_gen`` files use):

=====================  ==============================================  =============================================
column                 type                                            meaning
=====================  ==============================================  =============================================
``ctx_ids``            ``list<int>`` (or ``list<list<int>>`` chunks)   templated context token ids
``input_ids``          ``list<list<int>>``                             the student QA sequences (no document)
``response_start_end`` ``list<list<int>>`` (pairs)                     answer span ``[start, end)`` per sequence
``logprobs_vals``      ``list<list<list<float>>>`` (fp16 as written)   teacher top-k log-probs ``[end − start, K]``
``logprobs_indices``   ``list<list<list<int>>>`` (int32)               teacher top-k token ids ``[end − start, K]``
=====================  ==============================================  =============================================

Row ``j`` of a sequence's teacher arrays belongs to answer token ``start + j`` (the distribution it was sampled
from). :func:`iter_parquet` streams rows with ``pyarrow`` (``iter_batches``; the whole file is never loaded) and
validates each one, naming the file and row of any problem. :func:`greedy_pack` groups consecutive examples under
an input-token and a context-token budget exactly as the reference's packing does; :func:`collate` turns one
pack into the flat, padding-free tensors :func:`~d2l_fast.training.losses.qa_loss` takes.

For training, :func:`check_data` checks every file up front, :func:`stream_packs` packs a stream of examples
holding only a window of them, and :class:`PackStream` turns that into the endless, seeded, resumable sequence of
packs the :class:`~d2l_fast.training.trainer.Trainer` consumes.
"""

from __future__ import annotations

import os
import pathlib
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..safe_io import check_regular_file

if TYPE_CHECKING:
    from .config import TrainConfig

COLUMNS = ("ctx_ids", "input_ids", "response_start_end", "logprobs_vals", "logprobs_indices")
TEACHER_COLUMNS = ("logprobs_vals", "logprobs_indices")
IGNORE_INDEX = -100


class DataError(ValueError):
    """A data file or row that does not follow the schema; the message names the file and row."""


@dataclass(frozen=True)
class QA:
    """One QA sequence: ``input_ids`` (S ints), answer span ``[start, end)`` with ``1 ≤ start ≤ end ≤ S``, and the
    teacher's ``logprobs_vals`` ``[end − start, K]`` float32 / ``logprobs_indices`` ``[end − start, K]`` int64
    (None for cross-entropy data)."""

    input_ids: list[int]
    start: int
    end: int
    logprobs_vals: np.ndarray | None = None
    logprobs_indices: np.ndarray | None = None

    @property
    def n_answer_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ContextExample:
    """One context (as chunks of token ids; an unchunked context is one chunk) and its QA sequences.
    ``source`` is ``"<file>:<row>"`` for error messages and logs."""

    ctx_chunks: list[list[int]]
    qas: list[QA]
    source: str = ""

    @property
    def n_ctx_tokens(self) -> int:
        return sum(len(c) for c in self.ctx_chunks)

    @property
    def n_input_tokens(self) -> int:
        return sum(len(q.input_ids) for q in self.qas)


def _int_list(v, what: str) -> list[int]:
    if not isinstance(v, (list, tuple, np.ndarray)):
        raise ValueError(f"{what} must be a list of token ids, got {type(v).__name__}")
    out = []
    for x in v:
        if isinstance(x, (bool, float)) or not isinstance(x, (int, np.integer)) or x < 0:
            raise ValueError(f"{what} must hold token ids ≥ 0, got {x!r}")
        out.append(int(x))
    return out


def _teacher_array(v, rows: int, what: str, dtype) -> np.ndarray:
    if not isinstance(v, (list, tuple, np.ndarray)):
        raise ValueError(f"{what} must be a [{rows}, K] array (one row per answer token), got {type(v).__name__}")
    try:
        arr = np.asarray([list(r) for r in v] if len(v) else np.zeros((0, 0)), dtype=dtype)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a [{rows}, K] array (one row per answer token), got a ragged or "
                         "non-numeric nesting") from None
    if arr.ndim != 2 or arr.shape[0] != rows or (rows and arr.shape[1] < 1):
        raise ValueError(f"{what} must be [{rows}, K] (one row per answer token), got shape {arr.shape}")
    return arr


def parse_row(row: dict, *, teacher: bool = True, vocab_size: int | None = None, source: str = "") -> ContextExample:
    """Validate one row (a dict of the :data:`COLUMNS`) and build a :class:`ContextExample`.

    Raises:
        DataError: naming ``source`` and what was expected vs found.
    """
    try:
        for c in (COLUMNS if teacher else COLUMNS[:3]):
            if c not in row:
                raise ValueError(f"missing column {c!r}")
            if row[c] is None:
                raise ValueError(f"column {c!r} is null")
        ctx = row["ctx_ids"]
        if not isinstance(ctx, (list, tuple, np.ndarray)) or len(ctx) == 0:
            raise ValueError("ctx_ids must be a non-empty list of token ids (or of chunks)")
        if isinstance(ctx[0], (list, tuple, np.ndarray)):
            chunks = [_int_list(c, f"ctx_ids chunk {i}") for i, c in enumerate(ctx)]
            if any(len(c) == 0 for c in chunks):
                raise ValueError("ctx_ids has an empty chunk")
        else:
            chunks = [_int_list(ctx, "ctx_ids")]
        inputs, spans = row["input_ids"], row["response_start_end"]
        n = len(inputs)
        lens = {"input_ids": n, "response_start_end": len(spans)}
        if teacher:
            lens.update({c: len(row[c]) for c in TEACHER_COLUMNS})
        if len(set(lens.values())) != 1:
            raise ValueError(f"columns hold different numbers of QA sequences: {lens}")
        if n == 0:
            raise ValueError("the context has no QA sequences")
        qas = []
        for j in range(n):
            ids = _int_list(inputs[j], f"input_ids[{j}]")
            span = spans[j]
            if span is None or len(span) != 2:
                raise ValueError(f"response_start_end[{j}] must be a [start, end] pair, got {span!r}")
            start, end = (int(x) for x in span)
            if not 1 <= start <= end <= len(ids):
                raise ValueError(f"response_start_end[{j}] = [{start}, {end}] is out of range for a sequence of "
                                 f"{len(ids)} tokens (need 1 ≤ start ≤ end ≤ {len(ids)})")
            if vocab_size is not None and ids and max(ids) >= vocab_size:
                raise ValueError(f"input_ids[{j}] holds token id {max(ids)} ≥ vocab size {vocab_size}")
            vals = idx = None
            if teacher:
                vals = _teacher_array(row["logprobs_vals"][j], end - start, f"logprobs_vals[{j}]", np.float32)
                idx = _teacher_array(row["logprobs_indices"][j], end - start, f"logprobs_indices[{j}]", np.int64)
                if vals.shape != idx.shape:
                    raise ValueError(f"logprobs_vals[{j}] {vals.shape} and logprobs_indices[{j}] {idx.shape} differ")
                if idx.size and (idx.min() < 0 or (vocab_size is not None and idx.max() >= vocab_size)):
                    raise ValueError(f"logprobs_indices[{j}] must be token ids in [0, {vocab_size or 'V'}), got "
                                     f"range [{idx.min()}, {idx.max()}]")
                if np.isnan(vals).any() or (vals > 1e-3).any():
                    raise ValueError(f"logprobs_vals[{j}] must be log-probabilities ≤ 0 (−inf allowed), got "
                                     f"max {np.nanmax(vals) if not np.isnan(vals).all() else 'nan'}"
                                     f"{' and NaN' if np.isnan(vals).any() else ''}")
            qas.append(QA(ids, start, end, vals, idx))
        if teacher:
            ks = {q.logprobs_vals.shape[1] for q in qas if q.n_answer_tokens}
            if len(ks) > 1:
                raise ValueError(f"the QA sequences have different top-k widths {sorted(ks)}")
            k = ks.pop() if ks else 0
            qas = [q if q.n_answer_tokens else QA(q.input_ids, q.start, q.end, np.zeros((0, k), np.float32),
                                                  np.zeros((0, k), np.int64)) for q in qas]
    except ValueError as e:
        raise DataError(f"{source or 'row'}: {e}") from None
    return ContextExample(chunks, qas, source)


def open_parquet(f, need, hint: str = ""):
    """``pyarrow.parquet.ParquetFile(f)`` holding the columns ``need``; a :class:`DataError` naming the file if it
    is unreadable or lacks a column (``hint`` is appended to that message)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("reading parquet data needs pyarrow: pip install 'd2l_fast[train]'") from e
    if isinstance(f, (str, os.PathLike)):
        check_regular_file(f, what="data file", error=DataError)  # no device or FIFO
    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise DataError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None
    names = set(pf.schema_arrow.names)
    missing = [c for c in need if c not in names]
    if missing:
        raise DataError(f"{f}: missing column(s) {missing}; expected {list(need)}{hint}, found {sorted(names)}")
    return pf


def iter_parquet(paths, *, teacher: bool = True, vocab_size: int | None = None,
                 batch_rows: int = 64) -> Iterator[ContextExample]:
    """Stream :class:`ContextExample` s from one or more parquet files of the reference's schema, in order.

    Args:
        paths: a file, a folder (its ``*.parquet`` files, sorted) or a list of them.
        teacher: require the teacher columns (context distillation); False reads cross-entropy data.
        vocab_size: if given, token ids and teacher indices must be below it.
        batch_rows: rows per ``iter_batches`` read (memory is O(batch_rows) rows).

    Raises:
        DataError: a missing file or column, an empty folder, or a malformed row (naming file and row index).
    """
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive int, got {batch_rows!r}")
    files = resolve_files(paths)
    need = COLUMNS if teacher else COLUMNS[:3]
    for f in files:
        pf = open_parquet(f, need)
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=list(need)):
            cols = {c: batch.column(c).to_pylist() for c in need}
            for i in range(batch.num_rows):
                yield parse_row({c: cols[c][i] for c in need}, teacher=teacher, vocab_size=vocab_size,
                                source=f"{f}:row {row}")
                row += 1


def resolve_files(paths) -> list[pathlib.Path]:
    """Parquet files named by ``paths`` (a file, a folder of ``*.parquet``, or a list of them), in order."""
    items = [paths] if isinstance(paths, (str, pathlib.Path)) else list(paths)
    if not items:
        raise DataError("no data files given")
    files = []
    for p in map(pathlib.Path, items):
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise DataError(f"{p}: folder holds no *.parquet files")
            files.extend(found)
        elif p.exists():
            check_regular_file(p, what="data file", error=DataError)  # no device or FIFO
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def split_qas(examples: Iterable[ContextExample], max_qas_per_sample: int = 1) -> Iterator[ContextExample]:
    """Regroup each context's QAs into examples of at most ``max_qas_per_sample`` QAs (the context repeated per
    example; the reference trains with 1). ``max_qas_per_sample = -1`` keeps all QAs of a context together."""
    if not isinstance(max_qas_per_sample, int) or (max_qas_per_sample < 1 and max_qas_per_sample != -1):
        raise ValueError(f"max_qas_per_sample must be a positive int or -1, got {max_qas_per_sample!r}")
    for ex in examples:
        m = len(ex.qas) if max_qas_per_sample == -1 else max_qas_per_sample
        for s in range(0, len(ex.qas), m):
            yield ContextExample(ex.ctx_chunks, ex.qas[s : s + m], ex.source)


def greedy_pack(inp_lens: Sequence[int], ctx_lens: Sequence[int], max_packed_inp_len: int, max_packed_ctx_len: int,
                *, max_packed_size: int = -1) -> tuple[list[tuple[int, int]], list[int]]:
    """Greedy sequential packing of spec §5.3 on example lengths.

    Consecutive examples ``[s, e)`` are grouped while their input tokens sum to ≤ ``max_packed_inp_len`` and their
    context tokens to ≤ ``max_packed_ctx_len`` (and at most ``max_packed_size`` examples, −1 = no limit). An
    example over either budget on its own is dropped and ends the current pack (packs are ranges of consecutive
    examples). Example: input lengths ``[3, 4, 9, 2]``, context ``[1, 1, 1, 1]``, budgets 8 / 8 → packs
    ``[(0, 2), (3, 4)]``, dropped ``[2]``.

    Returns:
        ``(packs, dropped)``: half-open index ranges, in order, and the indices of dropped examples.
    """
    inp = _as_lengths(inp_lens, "inp_lens")
    ctx = _as_lengths(ctx_lens, "ctx_lens")
    if len(inp) != len(ctx):
        raise ValueError(f"inp_lens and ctx_lens must have one entry per example, got {len(inp)} and {len(ctx)}")
    for name, v in (("max_packed_inp_len", max_packed_inp_len), ("max_packed_ctx_len", max_packed_ctx_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(max_packed_size, int) or (max_packed_size < 1 and max_packed_size != -1):
        raise ValueError(f"max_packed_size must be a positive int or -1, got {max_packed_size!r}")
    packs, dropped = [], []
    start, si, sc = None, 0, 0
    for i, (a, c) in enumerate(zip(inp, ctx)):
        if a > max_packed_inp_len or c > max_packed_ctx_len:
            if start is not None:
                packs.append((start, i))
                start = None
            dropped.append(i)
            continue
        full = max_packed_size != -1 and start is not None and i - start >= max_packed_size
        if start is not None and (full or si + a > max_packed_inp_len or sc + c > max_packed_ctx_len):
            packs.append((start, i))
            start = None
        if start is None:
            start, si, sc = i, 0, 0
        si += a
        sc += c
    if start is not None:
        packs.append((start, len(inp)))
    return packs, dropped


def _as_lengths(v, name) -> list[int]:
    out = []
    for x in v:
        if isinstance(x, (bool, float)) or not isinstance(x, (int, np.integer)) or x < 0:
            raise ValueError(f"{name} must hold ints ≥ 0, got {x!r}")
        out.append(int(x))
    return out


def pack_examples(examples: Sequence[ContextExample], max_packed_inp_len: int, max_packed_ctx_len: int, *,
                  max_packed_size: int = -1, ctx_len=None) -> tuple[list[list[ContextExample]], list[ContextExample]]:
    """:func:`greedy_pack` over examples; ``ctx_len(example)`` counts its context tokens over all chunks (default
    :attr:`ContextExample.n_ctx_tokens`; pass the chunked, affix-wrapped length when chunking later).

    Returns:
        ``(packs, dropped)``: lists of examples.
    """
    examples = list(examples)
    ctx_len = ctx_len or (lambda ex: ex.n_ctx_tokens)
    packs, dropped = greedy_pack([ex.n_input_tokens for ex in examples], [ctx_len(ex) for ex in examples],
                                 max_packed_inp_len, max_packed_ctx_len, max_packed_size=max_packed_size)
    return [examples[s:e] for s, e in packs], [examples[i] for i in dropped]


@dataclass(frozen=True)
class PackedQABatch:
    """One padding-free training row built from a pack of examples (G contexts, n_qa QA sequences, N answer tokens).

    * ``ctx_ids [Tc]`` long, ``ctx_cu_seqlens [C + 1]`` int32 over the C context chunks, ``n_ctx_chunks`` (G ints);
    * ``input_ids [T]`` long, ``labels [T]`` long (answer tokens, −100 elsewhere), ``position_ids [T]`` (restart
      per QA), ``qa_cu_seqlens [n_qa + 1]`` int32, ``n_queries`` (G ints, QAs per context);
    * ``logprobs_vals [N, K]`` float32 and ``logprobs_indices [N, K]`` long (None without teacher data).
    """

    ctx_ids: torch.Tensor
    ctx_cu_seqlens: torch.Tensor
    n_ctx_chunks: list[int]
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    qa_cu_seqlens: torch.Tensor
    n_queries: list[int]
    logprobs_vals: torch.Tensor | None = None
    logprobs_indices: torch.Tensor | None = None


def collate(pack: Sequence[ContextExample]) -> PackedQABatch:
    """Flatten one pack (from :func:`pack_examples`) into a :class:`PackedQABatch`."""
    pack = list(pack)
    if not pack:
        raise ValueError("cannot collate an empty pack")
    chunks = [c for ex in pack for c in ex.ctx_chunks]
    qas = [q for ex in pack for q in ex.qas]
    teacher = all(q.logprobs_vals is not None for q in qas)
    ids, labels, pos = [], [], []
    for q in qas:
        ids.extend(q.input_ids)
        lab = [IGNORE_INDEX] * len(q.input_ids)
        lab[q.start : q.end] = q.input_ids[q.start : q.end]
        labels.extend(lab)
        pos.extend(range(len(q.input_ids)))
    vals = idx = None
    if teacher:
        ks = {q.logprobs_vals.shape[1] for q in qas if q.n_answer_tokens}
        if len(ks) > 1:
            raise ValueError(f"the pack mixes teacher top-k widths {sorted(ks)}")
        k = ks.pop() if ks else 1
        vals = torch.from_numpy(np.concatenate([q.logprobs_vals.reshape(-1, k) for q in qas]).astype(np.float32))
        idx = torch.from_numpy(np.concatenate([q.logprobs_indices.reshape(-1, k) for q in qas]).astype(np.int64))
    return PackedQABatch(
        ctx_ids=torch.tensor([t for c in chunks for t in c], dtype=torch.long),
        ctx_cu_seqlens=torch.tensor(np.cumsum([0] + [len(c) for c in chunks]), dtype=torch.int32),
        n_ctx_chunks=[len(ex.ctx_chunks) for ex in pack],
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        qa_cu_seqlens=torch.tensor(np.cumsum([0] + [len(q.input_ids) for q in qas]), dtype=torch.int32),
        n_queries=[len(ex.qas) for ex in pack],
        logprobs_vals=vals,
        logprobs_indices=idx,
    )


# ---------------------------------------------------------------------- streaming packs over epochs
def check_data(paths, *, teacher: bool, vocab_size: int | None = None, rows_per_file: int = 8) -> list[pathlib.Path]:
    """Up-front check of every data file (before any model is loaded): readable parquet, the schema's columns, at
    least one row, and its first ``rows_per_file`` rows well-formed. Later rows are checked as they stream.

    Raises:
        DataError: naming the file (and row).
    """
    if isinstance(rows_per_file, bool) or not isinstance(rows_per_file, int) or rows_per_file < 1:
        raise ValueError(f"rows_per_file must be a positive int, got {rows_per_file!r}")
    files = resolve_files(paths)
    need = list(COLUMNS if teacher else COLUMNS[:3])
    hint = " (use_kl_loss=false reads cross-entropy data without the teacher columns)" if teacher else ""
    for f in files:
        pf = open_parquet(f, need, hint)
        if pf.metadata.num_rows == 0:
            raise DataError(f"{f}: the file holds no rows")
        batch = next(pf.iter_batches(batch_size=rows_per_file, columns=need))
        cols = {c: batch.column(c).to_pylist() for c in need}
        for i in range(batch.num_rows):
            parse_row({c: cols[c][i] for c in need}, teacher=teacher, vocab_size=vocab_size, source=f"{f}:row {i}")
    return files


def stream_packs(files, *, teacher: bool, vocab_size: int | None, max_qas_per_sample: int, max_packed_inp_len: int,
                 max_packed_ctx_len: int, window: int = 256, dropped: list | None = None) -> Iterator[list]:
    """Greedy packs (spec §5.3) of the examples streamed from ``files``, identical to
    :func:`~d2l_fast.training.data.pack_examples` over the whole stream, holding O(window) examples at a time.

    Examples over a budget on their own are skipped (appended to ``dropped`` when given).
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    examples = split_qas(iter_parquet(files, teacher=teacher, vocab_size=vocab_size), max_qas_per_sample)
    carry: list = []
    done = False
    while not done:
        buf = list(carry)
        while len(buf) < len(carry) + window:
            ex = next(examples, None)
            if ex is None:
                done = True
                break
            buf.append(ex)
        if not buf:
            return
        packs, drop = greedy_pack([e.n_input_tokens for e in buf], [e.n_ctx_tokens for e in buf], max_packed_inp_len,
                                  max_packed_ctx_len)
        if dropped is not None:
            dropped.extend(buf[i] for i in drop)
        # the last pack may still grow with the next examples unless a dropped example closed it
        open_last = not done and packs and packs[-1][1] == len(buf)
        for s, e in packs[:-1] if open_last else packs:
            yield buf[s:e]
        carry = buf[packs[-1][0]:] if open_last else []


class PackStream:
    """Endless, deterministic stream of packs over epochs: epoch ``k`` is the files in order, packed, then shuffled
    in buffers of ``shuffle_buffer`` packs with ``Random((seed, k))``. ``position = (epoch, packs taken in it)``
    fully determines what comes next, which is what a checkpoint stores."""

    def __init__(self, files, cfg: TrainConfig, vocab_size: int | None):
        self.files, self.cfg, self.vocab_size = files, cfg, vocab_size
        self.epoch, self.index = 0, 0
        self.dropped: list = []
        self._it: Iterator | None = None

    def _epoch_packs(self, epoch: int) -> Iterator[list]:
        c = self.cfg
        dropped = self.dropped if epoch == 0 else None
        packs = stream_packs(self.files, teacher=c.use_kl_loss, vocab_size=self.vocab_size,
                             max_qas_per_sample=c.max_qas_per_sample, max_packed_inp_len=c.max_packed_inp_len,
                             max_packed_ctx_len=c.max_packed_ctx_len, dropped=dropped)
        if c.shuffle_buffer <= 1:
            yield from packs
            return
        rng = random.Random(f"{c.seed}:{epoch}")
        while True:
            buf = [p for _, p in zip(range(c.shuffle_buffer), packs)]
            if not buf:
                return
            rng.shuffle(buf)
            yield from buf

    def seek(self, epoch: int, index: int) -> None:
        """Position the stream at pack ``index`` of ``epoch`` (re-reads and skips; no model compute)."""
        self.epoch, self.index = epoch, 0
        self._it = self._epoch_packs(epoch)
        for _ in range(index):
            if next(self._it, None) is None:
                raise DataError(f"cannot resume at pack {index} of epoch {epoch}: the data now has only "
                                f"{self.index} packs per epoch (did the data files change?)")
            self.index += 1

    def count_epoch(self) -> int:
        return sum(1 for _ in self._epoch_packs(0))

    def next(self) -> list:
        if self._it is None:
            self.seek(0, 0)
        while True:
            pack = next(self._it, None)
            if pack is not None:
                self.index += 1
                return pack
            if self.index == 0:
                raise DataError(f"no example of {[str(f) for f in self.files]} fits the packing budgets "
                                f"(max_packed_inp_len={self.cfg.max_packed_inp_len}, "
                                f"max_packed_ctx_len={self.cfg.max_packed_ctx_len})")
            self.seek(self.epoch + 1, 0)


__all__ = ["COLUMNS", "QA", "ContextExample", "DataError", "PackStream", "PackedQABatch", "check_data", "collate",
           "greedy_pack", "iter_parquet", "pack_examples", "parse_row", "resolve_files", "split_qas", "stream_packs"]
