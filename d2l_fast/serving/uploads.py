"""Progress of document uploads: how many of a document's chunks the encoder has read, while it reads them.

An :class:`UploadProgress` is made per posted document (queued → encoding → ready | failed | cancelled) and
updated from the internalize worker through :func:`d2l_fast.encoder.observe_encoding`: the encoder reports each
packed row it starts, each decoder layer of the row (the points where it yields to running decode steps) and the
chunks it has finished. A document's chunks are a contiguous range of the packed call it is part of, so its
``chunks_done`` is the call's progress clipped to that range (``fraction`` counts the layers of a row too).
:class:`UploadRegistry` keeps the uploads a client can ask about (``GET /v1/documents/{id}/progress``).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field


class UploadCancelled(Exception):
    """Every document of a packed internalize call was cancelled: the encoder pass is abandoned."""


@dataclass
class UploadProgress:
    """One document's upload: ``chunks_total`` chunks, ``chunks_done`` read by the encoder so far."""

    doc_id: str
    chunks_total: int
    tokens: int = 0
    status: str = "queued"  # queued | encoding | hypernetwork | ready | failed | cancelled
    chunks_done: int = 0
    fraction: float = 0.0
    error: str | None = None
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    cancelled: bool = False

    def to_json(self) -> dict:
        end = self.finished if self.finished is not None else time.monotonic()
        return {"id": self.doc_id, "object": "document.progress", "status": self.status,
                "chunks_done": self.chunks_done, "chunks_total": self.chunks_total, "tokens": self.tokens,
                "fraction": round(self.fraction, 4), "elapsed_ms": round((end - self.created) * 1e3, 1),
                "encode_ms": None if self.started is None else round((end - self.started) * 1e3, 1),
                "error": self.error}

    def finish(self, status: str, error: str | None = None) -> None:
        self.status, self.error, self.finished = status, error, time.monotonic()
        if status == "ready":
            self.chunks_done, self.fraction = self.chunks_total, 1.0


class GroupProgress:
    """The encoder observer of one packed internalize call over ``jobs`` (their progress objects, in order)."""

    def __init__(self, progress: list[UploadProgress | None]):
        self.progress = progress
        self.offsets = [0]
        for p in progress:
            self.offsets.append(self.offsets[-1] + (p.chunks_total if p is not None else 0))
        self.row = (0, 0)
        self.done = 0.0  # chunks of the call done, fractional within a row
        self.known = all(p is not None for p in progress)

    def __call__(self, event: str, a: int, b: int) -> None:
        if event == "row":
            self.row = (a, b)
            self._set(float(a), "encoding")
        elif event == "layer":
            i, j = self.row
            self._set(i + (j - i) * a / max(1, b), "encoding")
        elif event == "chunks":
            self._set(float(a), "encoding" if a < b else "hypernetwork")
        if self.progress and all(p is not None and p.cancelled for p in self.progress):
            raise UploadCancelled("every document of this internalize call was cancelled")

    def _set(self, done: float, status: str) -> None:
        self.done = done
        if not self.known:
            return
        now = time.monotonic()
        for p, c0 in zip(self.progress, self.offsets):
            if p.finished is not None:
                continue
            if p.started is None:
                p.started = now
            mine = min(max(done - c0, 0.0), float(p.chunks_total))
            p.chunks_done, p.fraction = int(mine), mine / max(1, p.chunks_total)
            p.status = "hypernetwork" if mine >= p.chunks_total else status


class UploadRegistry:
    """Uploads in progress and the last ``keep`` finished ones, by document id (thread-safe)."""

    def __init__(self, keep: int = 256):
        self.keep = int(keep)
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[str, UploadProgress] = collections.OrderedDict()

    def add(self, p: UploadProgress) -> UploadProgress:
        with self._lock:
            self._items[p.doc_id] = p
            while len(self._items) > self.keep:
                oldest = next(iter(self._items))
                if self._items[oldest].finished is None:
                    break
                self._items.popitem(last=False)
        return p

    def get(self, doc_id: str) -> UploadProgress | None:
        with self._lock:
            return self._items.get(doc_id)

    def active(self) -> int:
        with self._lock:
            return sum(1 for p in self._items.values() if p.finished is None)


__all__ = ["GroupProgress", "UploadCancelled", "UploadProgress", "UploadRegistry"]
