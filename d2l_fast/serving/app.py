"""The OpenAI-compatible document server (FastAPI): documents in, adapters stored, completions batched.

    app = create_app(model, ServerSettings(store="adapters/", adapter_memory_mb=512))
    uvicorn.run(app, host="127.0.0.1", port=8000)        # or: d2l-fast serve --checkpoint ... --store ...

Endpoints: ``POST/GET /v1/documents``, ``GET/DELETE /v1/documents/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (OpenAI schema; extra body fields ``documents``, ``document``, ``context_scaling``,
``bias_scaling``; ``stream`` as server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus), ``GET /version``, ``GET /v1/documents/{id}/progress``. Every error is a JSON
body in OpenAI's format with a 4xx/5xx status. ``GET /`` is the web demo (one self-contained page, no external
assets): paste or upload a document, internalize it, chat with it (streamed), compare with the base model.

The pieces: :mod:`~d2l_fast.serving.settings` (limits), :mod:`~d2l_fast.serving.validation` (request bodies),
:mod:`~d2l_fast.serving.server` (:class:`DocumentServer`), :mod:`~d2l_fast.serving.routes` (the router).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid

from .errors import APIError, bad_request
from .server import DocumentServer
from .settings import ServerSettings

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("d2l_fast.serving.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def request_id_of(headers) -> str:
    """The client's ``X-Request-ID`` when it is a sane token (≤ 128 URL-safe characters), else a new one."""
    got = headers.get("x-request-id")
    return got if got and _REQUEST_ID.match(got) else uuid.uuid4().hex


def _install_request_middleware(app) -> None:
    """Every response carries ``X-Request-ID`` (the client's or a new one); every request is one structured log line
    (``d2l_fast.serving.access`` at INFO: request_id, method, path, route, status, duration_ms, client) and a sample
    of the request metrics (by route template, not raw path)."""

    @app.middleware("http")
    async def _requests(request, call_next):
        rid = request_id_of(request.headers)
        request.state.request_id = rid
        request.state.t0 = t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers["X-Request-ID"] = rid
            return response
        finally:
            dt = time.perf_counter() - t0
            route = getattr(request.scope.get("route"), "path", None) or "unmatched"
            srv = app.state.d2l
            if srv.metrics is not None:
                srv.metrics.observe_request(route, request.method, status, dt)
            client = request.client.host if request.client else "-"
            access_logger.info("request_id=%s method=%s path=%s route=%s status=%d duration_ms=%.1f client=%s", rid,
                               request.method, request.url.path, route, status, dt * 1e3, client)


def _install_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.to_json(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return JSONResponse(APIError(e.status_code, str(e.detail)).to_json(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(bad_request(f"invalid request: {e.errors()[:3]}").to_json(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request, e):
        logger.exception("unhandled error (request_id=%s)", getattr(request.state, "request_id", "-"))
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").to_json(), status_code=500)


def create_app(model, settings: ServerSettings | None = None, **overrides):
    """The FastAPI app serving ``model`` (a :class:`~d2l_fast.D2LModel` with a tokenizer).

    ``settings`` / ``overrides``: :class:`ServerSettings` fields. The workers start with the app (lifespan) and
    stop with it; ``app.state.d2l`` is the :class:`DocumentServer`.
    """
    from fastapi import FastAPI

    from .routes import router

    if settings is None:
        settings = ServerSettings(**overrides)
    elif overrides:
        raise TypeError("give either settings= or keyword overrides, not both")
    srv = DocumentServer(model, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv.start()
        try:
            yield
        finally:
            await asyncio.to_thread(srv.stop)

    app = FastAPI(title="d2l_fast document server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.d2l = srv
    _install_error_handlers(app)
    _install_request_middleware(app)
    app.include_router(router)
    if settings.data_dir is not None:
        from .viewer import DataViewer
        from .viewer import router as viewer_router

        app.state.viewer = DataViewer(settings.data_dir)
        app.include_router(viewer_router)
    return app


__all__ = ["DocumentServer", "ServerSettings", "create_app", "request_id_of"]
