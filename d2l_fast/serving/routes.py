"""The HTTP routes (a FastAPI ``APIRouter``): each handler reaches the :class:`DocumentServer` through
``request.app.state.d2l``; the completion and server-sent-event paths are plain functions."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

from .engine import GenRequest
from .errors import APIError
from .server import DocumentServer
from .validation import parse_json_body

router = APIRouter()


def server_of(request: Request) -> DocumentServer:
    return request.app.state.d2l


def check_auth(request: Request) -> DocumentServer:
    """The server, once the request carries the API key (when one is set); 401 otherwise."""
    srv = server_of(request)
    key = srv.settings.api_key
    if key is None:
        return srv
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key (expected the header 'Authorization: Bearer <key>')",
                       code="invalid_api_key")
    return srv


async def read_json(request: Request) -> tuple[DocumentServer, dict]:
    """(server, body): the API key checked, then the body read up to ``max_body_bytes`` and parsed."""
    srv = check_auth(request)
    limit = srv.settings.max_body_bytes
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise APIError(413, f"request body of {cl} bytes is larger than the limit of {limit} bytes",
                       code="body_too_large")
    data, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise APIError(413, f"request body is larger than the limit of {limit} bytes", code="body_too_large")
        data.append(chunk)
    return srv, parse_json_body(b"".join(data))


def usage(reqs: list[GenRequest]) -> dict:
    p, c = sum(len(r.prompt_ids) for r in reqs), sum(len(r.out_ids) for r in reqs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def choice(kind: str, text: str, finish, *, delta: bool, first: bool = False, index: int = 0) -> dict:
    """One entry of ``choices`` of a chat or text completion (a streamed delta or the whole message)."""
    if kind == "chat":
        if delta:
            d = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


class _Timing:
    """Arrival and first-text times of one completion (per prompt), for the metrics."""

    def __init__(self, srv: DocumentServer, kind: str, t0: float):
        self.srv, self.kind, self.t0, self.first = srv, kind, t0, {}

    def seen(self, i: int, ev: str) -> None:
        if ev == "delta" and i not in self.first:
            self.first[i] = time.perf_counter()

    def done(self, i: int, req: GenRequest) -> None:
        if self.srv.metrics is not None:
            self.srv.metrics.observe_completion(self.kind, req, self.t0, self.first.get(i))


async def complete_json(srv: DocumentServer, reqs: list[GenRequest], q: asyncio.Queue, kind: str, rid: str,
                        created: int, timing: _Timing | None = None, model: str | None = None) -> dict:
    """The whole completion as one JSON response, once the engine is done with every prompt of the request."""
    try:
        left = len(reqs)
        while left:
            i, ev, payload = await q.get()
            if timing is not None:
                timing.seen(i, ev)
            if ev == "error":
                raise payload
            if ev == "done":
                left -= 1
                if timing is not None:
                    timing.done(i, reqs[i])
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": model or srv.model_name, "system_fingerprint": None, "usage": usage(reqs),
                "choices": [choice(kind, r.text, r.finish_reason, delta=False, index=i) for i, r in enumerate(reqs)]}
    finally:
        for r in reqs:
            r.cancelled = True  # finished already, or the client went away: the rows leave the batch


async def sse_events(srv: DocumentServer, reqs: list[GenRequest], q: asyncio.Queue, kind: str, rid: str,
                     created: int, include_usage: bool, timing: _Timing | None = None, model: str | None = None):
    """The completion as server-sent events (OpenAI's chunk objects, then ``data: [DONE]``); several prompts
    interleave, each chunk naming its ``index``."""
    chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def sse(choices, use=None):
        d = {"id": rid, "object": chunk_obj, "created": created, "model": model or srv.model_name, "choices": choices,
             "system_fingerprint": None}
        if include_usage:
            d["usage"] = use
        return f"data: {json.dumps(d)}\n\n"

    try:
        if kind == "chat":
            yield sse([choice(kind, "", None, delta=True, first=True)])
        left = len(reqs)
        while left:
            i, ev, payload = await q.get()
            if timing is not None:
                timing.seen(i, ev)
            if ev == "delta":
                yield sse([choice(kind, payload, None, delta=True, index=i)])
            elif ev == "done":
                left -= 1
                if timing is not None:
                    timing.done(i, reqs[i])
                yield sse([choice(kind, "", reqs[i].finish_reason, delta=True, index=i)])
            else:
                yield f"data: {json.dumps(payload.to_json())}\n\n"
                break
        else:
            if include_usage:
                yield sse([], usage(reqs))
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:
            r.cancelled = True  # a client that disconnects mid-stream: its rows are dropped at the next step


async def complete(request: Request, kind: str):
    t0 = getattr(request.state, "t0", None) or time.perf_counter()
    srv, body = await read_json(request)
    reqs, stream, opts, q, model = await srv.prepare(body, kind)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    timing = _Timing(srv, kind, t0)
    if not stream:
        return await complete_json(srv, reqs, q, kind, rid, created, timing, model)
    events = sse_events(srv, reqs, q, kind, rid, created, bool(opts.get("include_usage")), timing, model)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/", include_in_schema=False)
async def index():
    page = resources.files("d2l_fast.serving").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


@router.get("/health")
async def health(request: Request):
    srv = server_of(request)
    return {"status": "ok", "documents": len(srv.store), "in_flight": srv.engine.in_flight, **srv.engine.decode_path}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    srv = server_of(request)
    if srv.metrics is None:
        raise APIError(503, "metrics need prometheus_client: pip install 'd2l_fast[serve]'", code="unavailable")
    data, ctype = srv.metrics.render()
    return Response(data, media_type=ctype)


@router.get("/version")
async def version(request: Request):
    import torch
    import transformers

    from .. import __version__

    srv = server_of(request)
    return {"version": __version__, "d2l_fast": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "model": srv.model_name,
            "base_model": str(srv.model.spec.base_model_name_or_path), "model_id": srv.model.model_id,
            "device": str(srv.model.device)}


@router.get("/v1/models")
async def models(request: Request):
    """The served model (no ``parent``), every stored document and every loaded adapter (``parent``: the base)."""
    return {"object": "list", "data": check_auth(request).model_cards()}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    return check_auth(request).model_card(model_id)


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request):
    srv, body = await read_json(request)
    return PlainTextResponse(await srv.load_lora(body))


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request):
    srv, body = await read_json(request)
    return PlainTextResponse(srv.unload_lora(body))


@router.post("/v1/documents")
async def create_documents(request: Request):
    srv, body = await read_json(request)
    out, status = await srv.create_documents(body)
    return JSONResponse(out, status_code=status)


@router.get("/v1/documents")
async def list_documents(request: Request):
    return {"object": "list", "data": check_auth(request).store.list()}


@router.get("/v1/documents/{doc_id}")
async def get_document(doc_id: str, request: Request):
    srv = check_auth(request)
    p = srv.uploads.get(doc_id)
    if doc_id not in srv.store and p is not None and p.finished is None:  # still uploading: its progress
        return p.to_json()
    return srv.store.info(doc_id)


@router.get("/v1/documents/{doc_id}/progress")
async def document_progress(doc_id: str, request: Request):
    return check_auth(request).upload_progress(doc_id)


@router.delete("/v1/documents/{doc_id}")
async def delete_document(doc_id: str, request: Request):
    return await asyncio.to_thread(check_auth(request).delete_document, doc_id)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await complete(request, "chat")


@router.post("/v1/completions")
async def completions(request: Request):
    return await complete(request, "completion")


__all__ = ["check_auth", "complete", "read_json", "router", "server_of"]
