"""Document adapters of the server: an LRU memory budget over optional on-disk persistence.

Every document has an info record (id, name, token and chunk counts, rank, ...) and one adapter (an
:class:`~d2l_fast.AdapterBatch` of length 1). In memory, adapters are kept up to ``memory_bytes``; the least
recently used ones are dropped beyond it. With a ``folder`` each document is two files, written atomically
(temporary file + ``os.replace``): ``<id>.safetensors`` (:meth:`AdapterBatch.save`) and ``<id>.json`` (the info
record, written second: it is the commit point). A dropped adapter is reloaded from its file on its next use, and
a new store on the same folder (a restarted server) finds every committed document. Without a folder a dropped
document is gone (its id then answers 404).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import re
import threading
import uuid

from ..adapters import AdapterBatch
from ..checkpoint import CheckpointError
from ..safe_io import read_json
from .errors import APIError, not_found

logger = logging.getLogger(__name__)

ID_RE = re.compile(r"^doc-[0-9a-f]{24}$")
MAX_RECORD_BYTES = 1 << 20  # <id>.json


def new_document_id() -> str:
    return f"doc-{uuid.uuid4().hex[:24]}"


def adapter_nbytes(adapters: AdapterBatch) -> int:
    return sum(t.numel() * t.element_size() for d in (adapters.A, adapters.B) for t in d.values())


def _write_atomic(path: pathlib.Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class DocumentStore:
    """Thread-safe map document id → (info, adapter) with an LRU memory budget and optional persistence.

    ``spec`` / ``model_id``: the serving model's; files made by another model are skipped at start-up (logged).
    A single adapter larger than the whole budget is still stored (and persisted), then dropped from memory at
    once; it is read back from disk for every use (without a folder such a document is refused with 413).
    """

    def __init__(self, spec, model_id: str, *, memory_bytes: int, folder=None):
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 0:
            raise ValueError(f"memory_bytes must be a non-negative int, got {memory_bytes!r}")
        self.spec = spec
        self.model_id = model_id
        self.memory_bytes = memory_bytes
        self.folder = None if folder is None else pathlib.Path(folder)
        self._lock = threading.RLock()
        self._info: dict[str, dict] = {}
        self._resident: collections.OrderedDict[str, AdapterBatch] = collections.OrderedDict()
        self._resident_bytes = 0
        self.evictions = 0
        self.loads = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._scan()

    # ------------------------------------------------------------------ persistence
    def _paths(self, doc_id: str) -> tuple[pathlib.Path, pathlib.Path]:
        return self.folder / f"{doc_id}.safetensors", self.folder / f"{doc_id}.json"

    def _scan(self) -> None:
        for tmp in self.folder.glob(".*.tmp"):  # an interrupted write: never committed
            tmp.unlink(missing_ok=True)
        for meta in sorted(self.folder.glob("doc-*.json")):
            doc_id = meta.stem
            tensors = meta.with_suffix(".safetensors")
            try:
                info = read_json(meta, MAX_RECORD_BYTES, what="document record")
                if not ID_RE.match(doc_id) or not isinstance(info, dict) or info.get("id") != doc_id:
                    raise ValueError("the record does not name this document id")
            except (OSError, ValueError) as e:
                logger.warning("store: skipping %s: unreadable document record (%s)", meta, e)
                continue
            if info.get("model_id") != self.model_id:
                logger.warning("store: skipping %s: made by model %r, this server runs %r", doc_id,
                               info.get("model_id"), self.model_id)
                continue
            if not tensors.is_file():
                logger.warning("store: skipping %s: its adapter file %s is missing", doc_id, tensors.name)
                continue
            self._info[doc_id] = info
        for orphan in self.folder.glob("doc-*.safetensors"):  # adapter written, record not: an interrupted add
            if orphan.stem not in self._info and not orphan.with_suffix(".json").exists():
                orphan.unlink(missing_ok=True)
        if self._info:
            logger.info("store: %d document(s) found in %s", len(self._info), self.folder)

    # ------------------------------------------------------------------ memory budget
    def _touch(self, doc_id: str, adapter: AdapterBatch) -> None:
        if doc_id in self._resident:
            self._resident.move_to_end(doc_id)
            return
        self._resident[doc_id] = adapter
        self._resident_bytes += adapter_nbytes(adapter)
        self._evict()

    def _evict(self) -> None:
        while self._resident_bytes > self.memory_bytes and self._resident:
            doc_id, ad = self._resident.popitem(last=False)
            self._resident_bytes -= adapter_nbytes(ad)
            self.evictions += 1
            if self.folder is None:  # nowhere to reload it from: the document is gone
                self._info.pop(doc_id, None)
                logger.warning("store: document %s dropped (adapter memory budget %d bytes, no --store)", doc_id,
                               self.memory_bytes)

    # ------------------------------------------------------------------ public API
    def add(self, doc_id: str, adapter: AdapterBatch, info: dict) -> dict:
        """Store a new document (persisted first when there is a folder); returns its info record."""
        if not ID_RE.match(doc_id):
            raise ValueError(f"document ids look like doc-<24 hex digits>, got {doc_id!r}")
        if len(adapter) != 1:
            raise ValueError(f"a document has exactly one adapter, got a batch of {len(adapter)}")
        nbytes = adapter_nbytes(adapter)
        if self.folder is None and nbytes > self.memory_bytes:
            raise APIError(413, f"the document's adapter needs {nbytes} bytes, more than the whole adapter memory "
                                f"budget ({self.memory_bytes} bytes) of this server, which has no --store to keep it",
                           code="adapter_too_large")
        info = dict(info, id=doc_id, model_id=self.model_id, adapter_bytes=nbytes)
        if self.folder is not None:
            st, meta = self._paths(doc_id)
            single = AdapterBatch(adapter.A, adapter.B, adapter.rank_offsets, adapter.alpha, adapter.model_id,
                                  [doc_id])
            _write_atomic(st, single.save)
            _write_atomic(meta, lambda p: p.write_text(json.dumps(info, sort_keys=True)))
        with self._lock:
            self._info[doc_id] = info
            self._touch(doc_id, adapter)
        return dict(info, resident=self.is_resident(doc_id))

    def get(self, doc_id: str) -> tuple[dict, AdapterBatch]:
        """(info, adapter) of a document; reloads a dropped adapter from disk. Unknown id → 404."""
        with self._lock:
            info = self._info.get(doc_id)
            if info is None:
                raise not_found(f"document {doc_id!r} not found", param="documents", code="document_not_found")
            ad = self._resident.get(doc_id)
            if ad is not None:
                self._resident.move_to_end(doc_id)
                return dict(info), ad
            st, _ = self._paths(doc_id)
            try:
                ad = AdapterBatch.load(st, spec=self.spec)
            except (OSError, CheckpointError, ValueError) as e:
                raise APIError(500, f"document {doc_id!r}: its stored adapter cannot be read: {e}",
                               code="store_error") from e
            if ad.model_id != self.model_id or len(ad) != 1:
                raise APIError(500, f"document {doc_id!r}: its stored adapter belongs to another model "
                                    f"({ad.model_id!r})", code="store_error")
            self.loads += 1
            self._touch(doc_id, ad)
            return dict(info), ad

    def info(self, doc_id: str) -> dict:
        with self._lock:
            info = self._info.get(doc_id)
            if info is None:
                raise not_found(f"document {doc_id!r} not found", param="document_id", code="document_not_found")
            return dict(info, resident=doc_id in self._resident)

    def list(self) -> list[dict]:
        with self._lock:
            return [dict(i, resident=k in self._resident) for k, i in self._info.items()]

    def delete(self, doc_id: str) -> dict:
        with self._lock:
            info = self.info(doc_id)
            if self.folder is not None:
                st, meta = self._paths(doc_id)
                meta.unlink(missing_ok=True)  # the commit point first: a crash after it leaves an orphan, not a doc
                st.unlink(missing_ok=True)
            self._info.pop(doc_id, None)
            ad = self._resident.pop(doc_id, None)
            if ad is not None:
                self._resident_bytes -= adapter_nbytes(ad)
            return info

    def is_resident(self, doc_id: str) -> bool:
        with self._lock:
            return doc_id in self._resident

    @property
    def resident_count(self) -> int:
        return len(self._resident)

    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    def __contains__(self, doc_id) -> bool:
        with self._lock:
            return doc_id in self._info

    def __len__(self) -> int:
        return len(self._info)


__all__ = ["DocumentStore", "ID_RE", "adapter_nbytes", "new_document_id"]
