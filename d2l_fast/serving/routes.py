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
from fastapi.responses import HTMLResponse, StreamingResponse

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


def usage(req: GenRequest) -> dict:
    p, c = len(req.prompt_ids), len(req.out_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def choice(kind: str, text: str, finish, *, delta: bool, first: bool = False) -> dict:
    """One entry of ``choices`` of a chat or text completion (a streamed delta or the whole message)."""
    if kind == "chat":
        if delta:
            d = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


async def complete_json(srv: DocumentServer, req: GenRequest, q: asyncio.Queue, kind: str, rid: str,
                        created: int) -> dict:
    """The whole completion as one JSON response, once the engine is done with the request."""
    try:
        while True:
            ev, payload = await q.get()
            if ev == "error":
                raise payload
            if ev == "done":
                return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                        "created": created, "model": srv.model_name,
                        "choices": [choice(kind, req.text, req.finish_reason, delta=False)], "usage": usage(req),
                        "system_fingerprint": None}
    finally:
        req.cancelled = True  # finished already, or the client went away: the row leaves the batch


async def sse_events(srv: DocumentServer, req: GenRequest, q: asyncio.Queue, kind: str, rid: str, created: int,
                     include_usage: bool):
    """The completion as server-sent events (OpenAI's chunk objects, then ``data: [DONE]``)."""
    chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def sse(choices, use=None):
        d = {"id": rid, "object": chunk_obj, "created": created, "model": srv.model_name, "choices": choices,
             "system_fingerprint": None}
        if include_usage:
            d["usage"] = use
        return f"data: {json.dumps(d)}\n\n"

    try:
        if kind == "chat":
            yield sse([choice(kind, "", None, delta=True, first=True)])
        while True:
            ev, payload = await q.get()
            if ev == "delta":
                yield sse([choice(kind, payload, None, delta=True)])
            elif ev == "done":
                yield sse([choice(kind, "", req.finish_reason, delta=True)])
                if include_usage:
                    yield sse([], usage(req))
                break
            else:
                yield f"data: {json.dumps(payload.to_json())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        req.cancelled = True  # a client that disconnects mid-stream: its row is dropped at the next step


async def complete(request: Request, kind: str):
    srv, body = await read_json(request)
    req, stream, opts, q = await srv.prepare(body, kind)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if not stream:
        return await complete_json(srv, req, q, kind, rid, created)
    events = sse_events(srv, req, q, kind, rid, created, bool(opts.get("include_usage")))
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/", include_in_schema=False)
async def index():
    page = resources.files("d2l_fast.serving").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


@router.get("/health")
async def health(request: Request):
    srv = server_of(request)
    return {"status": "ok", "documents": len(srv.store), "in_flight": srv.engine.in_flight}


@router.get("/v1/models")
async def models(request: Request):
    srv = check_auth(request)
    return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": srv.created,
                                        "owned_by": "d2l_fast", **srv.checkpoint_settings}]}


@router.post("/v1/documents")
async def create_documents(request: Request):
    srv, body = await read_json(request)
    return await srv.create_documents(body)


@router.get("/v1/documents")
async def list_documents(request: Request):
    return {"object": "list", "data": check_auth(request).store.list()}


@router.get("/v1/documents/{doc_id}")
async def get_document(doc_id: str, request: Request):
    return check_auth(request).store.info(doc_id)


@router.delete("/v1/documents/{doc_id}")
async def delete_document(doc_id: str, request: Request):
    await asyncio.to_thread(check_auth(request).store.delete, doc_id)
    return {"id": doc_id, "object": "document.deleted", "deleted": True}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await complete(request, "chat")


@router.post("/v1/completions")
async def completions(request: Request):
    return await complete(request, "completion")


__all__ = ["check_auth", "complete", "read_json", "router", "server_of"]
