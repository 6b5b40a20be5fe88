"""Documents and adapters as models, the way vLLM lists LoRA adapters: model cards for ``GET /v1/models``, and
the adapters loaded at run time from PEFT folders (``POST /v1/load_lora_adapter``, vLLM's runtime LoRA API).

Every stored document is a model whose id is the document id; every loaded adapter is a model whose id is its
``lora_name``. Their cards name the base model as ``parent`` (the served model has none), ``root`` is where the
weights come from (the base model's path; the folder a runtime adapter was loaded from; the document id for a
document, which has no folder of its own). Loaded adapters stay in memory (pinned, not persisted, like vLLM's
runtime adapters) and count against the adapter memory budget of the server.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

from ..adapters import AdapterBatch
from .errors import APIError, bad_request, not_found
from .store import ID_RE, adapter_nbytes

#: allowed ``lora_name`` s: 1-128 characters, no spaces; names shaped like document ids are reserved
LORA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+@-]{0,127}$")


def model_card(model_id: str, created: int, *, parent: str | None, root: str | None,
               max_model_len: int | None = None, **extra) -> dict:
    """One entry of ``GET /v1/models`` (OpenAI's model object with vLLM's ``root`` / ``parent`` / ``max_model_len``)."""
    card = {"id": model_id, "object": "model", "created": int(created), "owned_by": "d2l_fast", "root": root,
            "parent": parent}
    if max_model_len:
        card["max_model_len"] = int(max_model_len)
    card.update(extra)
    return card


@dataclass
class LoadedAdapter:
    """An adapter loaded at run time from a PEFT folder: one adapter (rank ``adapter.ranks[0]``)."""

    name: str
    path: str
    adapter: AdapterBatch
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def nbytes(self) -> int:
        return adapter_nbytes(self.adapter)


class RuntimeAdapters:
    """The adapters loaded at run time, by name (thread-safe), within ``memory_bytes`` together."""

    def __init__(self, memory_bytes: int):
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 0:
            raise ValueError(f"memory_bytes must be a non-negative int, got {memory_bytes!r}")
        self.memory_bytes = memory_bytes
        self._lock = threading.Lock()
        self._items: dict[str, LoadedAdapter] = {}

    @staticmethod
    def check_name(name, reserved: str) -> str:
        """``name`` if it can name a runtime adapter: a 400 naming ``lora_name`` otherwise."""
        if not isinstance(name, str) or not name:
            raise bad_request(f"'lora_name' must be a non-empty string, got {name!r:.80}", "lora_name")
        if not LORA_NAME_RE.match(name):
            raise bad_request(f"'lora_name' {name!r:.80} is not allowed: expected 1-128 characters from "
                              "[A-Za-z0-9._:/+@-], starting with a letter or digit", "lora_name")
        if ID_RE.match(name):
            raise bad_request(f"'lora_name' {name!r} looks like a document id (doc-<24 hex digits>); those names are "
                              "reserved for stored documents", "lora_name")
        if name == reserved:
            raise bad_request(f"'lora_name' {name!r} is the base model's name", "lora_name")
        return name

    def add(self, item: LoadedAdapter, *, replace: bool = False) -> None:
        with self._lock:
            if item.name in self._items and not replace:
                raise bad_request(f"the lora adapter {item.name!r} has already been loaded (unload it first, or "
                                  "pass \"load_inplace\": true)", "lora_name")
            self._check_room(item.nbytes, item.name)
            self._items[item.name] = item

    def check_room(self, nbytes: int, name: str | None = None) -> None:
        """A 413 unless ``nbytes`` more fit the budget (the adapter named ``name``, if loaded, being replaced)."""
        with self._lock:
            self._check_room(nbytes, name)

    def _check_room(self, nbytes: int, name: str | None) -> None:
        old = self._items.get(name) if name is not None else None
        used = sum(a.nbytes for a in self._items.values()) - (old.nbytes if old is not None else 0)
        if used + nbytes > self.memory_bytes:
            raise APIError(413, f"the adapter needs {nbytes} bytes; with the {used} bytes of the adapters loaded "
                                f"already that is more than this server's adapter memory budget of "
                                f"{self.memory_bytes} bytes (--adapter-memory-mb)", param="lora_path",
                           code="adapter_too_large")

    def remove(self, name: str) -> LoadedAdapter:
        with self._lock:
            item = self._items.pop(name, None)
        if item is None:
            raise not_found(f"the lora adapter {name!r} cannot be found", "lora_name", "model_not_found")
        return item

    def get(self, name: str) -> LoadedAdapter | None:
        with self._lock:
            return self._items.get(name)

    def list(self) -> list[LoadedAdapter]:
        with self._lock:
            return list(self._items.values())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


__all__ = ["LORA_NAME_RE", "LoadedAdapter", "RuntimeAdapters", "model_card"]
