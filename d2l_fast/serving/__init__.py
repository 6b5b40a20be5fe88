"""OpenAI-compatible document server: ``d2l-fast serve`` (needs the ``serve`` extra: FastAPI + uvicorn).

See :mod:`d2l_fast.serving.app` for the endpoints, :mod:`d2l_fast.serving.engine` for batched decoding and
:mod:`d2l_fast.serving.store` for the adapter store.
"""

from .app import DocumentServer, ServerSettings, create_app
from .engine import DecodeEngine, GenRequest, InternalizeBatcher  # noqa: F401 (internals, kept importable here)
from .errors import APIError
from .runner import BackgroundServer, serve
from .store import DocumentStore

__all__ = ["APIError", "BackgroundServer", "DocumentServer", "DocumentStore", "ServerSettings", "create_app", "serve"]
