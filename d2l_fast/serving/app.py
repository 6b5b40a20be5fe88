"""The OpenAI-compatible document server (FastAPI): documents in, adapters stored, completions batched.

    app = create_app(model, ServerSettings(store="adapters/", adapter_memory_mb=512))
    uvicorn.run(app, host="127.0.0.1", port=8000)        # or: d2l-fast serve --checkpoint ... --store ...

Endpoints: ``POST/GET /v1/documents``, ``GET/DELETE /v1/documents/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (OpenAI schema; extra body fields ``documents``, ``document``, ``context_scaling``,
``bias_scaling``; ``stream`` as server-sent events), ``GET /v1/models``, ``GET /health``. Every error is a JSON
body in OpenAI's format with a 4xx/5xx status. ``GET /`` is the web demo (one self-contained page, no external
assets): paste or upload a document, internalize it, chat with it (streamed), compare with the base model.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import math
import pathlib
import time
import uuid
from dataclasses import dataclass
from importlib import resources

import torch

from ..adapters import AdapterBatch
from .engine import DecodeEngine, GenRequest, InternalizeBatcher
from .errors import APIError, bad_request, not_found
from .store import ID_RE, DocumentStore, new_document_id

logger = logging.getLogger(__name__)

_MISSING = object()


@dataclass
class ServerSettings:
    """Limits and options of the server (the ``d2l-fast serve`` flags of the same names)."""

    model_name: str | None = None  # the id in /v1/models and responses (default: d2l-<base model name>)
    adapter_memory_mb: float = 1024.0  # in-memory adapter budget (LRU beyond it)
    store: str | None = None  # folder: one safetensors file per document, reloaded on restart
    max_batch: int = 16  # rows decoded together
    max_queue: int = 256  # requests running + waiting; more → 429
    max_document_tokens: int = 32768  # templated tokens per document; more → 413
    max_documents_per_request: int = 64
    max_new_tokens: int = 1024  # upper bound of max_tokens; more → 400
    default_max_tokens: int = 256  # when a request gives none
    max_body_bytes: int = 8 << 20  # request body; more → 413
    api_key: str | None = None  # require "Authorization: Bearer <key>" on /v1/*
    batch_window_ms: float = 5.0  # documents posted within this window are internalized in one call

    def __post_init__(self):
        for k in ("max_batch", "max_queue", "max_document_tokens", "max_documents_per_request", "max_new_tokens",
                  "default_max_tokens", "max_body_bytes"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ServerSettings.{k} must be a positive int, got {v!r}")
        for k in ("adapter_memory_mb", "batch_window_ms"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"ServerSettings.{k} must be a non-negative number, got {v!r}")


# ---------------------------------------------------------------------------------------------- validation
def _typename(v) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                     list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _field(body: dict, name: str, kind: str, default=_MISSING, *, lo=None, hi=None):
    """``body[name]`` checked to be of ``kind`` (str, int, number, bool, object) and within [lo, hi]."""
    if name not in body or body[name] is None:
        if default is _MISSING:
            raise bad_request(f"missing required field {name!r}", name)
        return default
    v = body[name]
    ok = {"str": isinstance(v, str), "bool": isinstance(v, bool), "object": isinstance(v, dict),
          "int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool)}[kind]
    if not ok:
        want = {"str": "a string", "int": "an integer", "number": "a number", "bool": "a boolean",
                "object": "an object"}[kind]
        raise bad_request(f"{name!r} must be {want}, got {_typename(v)} {json.dumps(v)[:60]}", name)
    if kind == "number":
        if not math.isfinite(v):
            raise bad_request(f"{name!r} must be a finite number, got {v}", name)
        v = float(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if lo is not None and hi is not None else (f">= {lo}" if lo is not None
                                                                                 else f"<= {hi}")
        raise bad_request(f"{name!r} must be {rng}, got {v}", name)
    return v


def _str_list(body: dict, name: str, *, max_len: int, allow_str: bool = False) -> list[str] | None:
    if name not in body or body[name] is None:
        return None
    v = body[name]
    if allow_str and isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad_request(f"{name!r} must be an array of strings{' or a string' if allow_str else ''}, got "
                          f"{_typename(v)} {json.dumps(v)[:60]}", name)
    if len(v) > max_len:
        raise bad_request(f"{name!r} has {len(v)} entries, at most {max_len} are allowed", name)
    return v


def _message_text(content, k: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise bad_request(f"messages[{k}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) "
                                  f"are supported", "messages")
            parts.append(p["text"])
        return "".join(parts)
    raise bad_request(f"messages[{k}].content must be a string or an array of text parts, got "
                      f"{_typename(content)}", "messages")


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---------------------------------------------------------------------------------------------- the server
class DocumentServer:
    """Model + document store + the two workers; the FastAPI routes call into this."""

    def __init__(self, model, settings: ServerSettings | None = None):
        from .. import D2LModel

        if not isinstance(model, D2LModel):
            raise TypeError(f"model must be a D2LModel, got {type(model).__name__}")
        if model.tokenizer is None:
            raise model.tokenizer_required("serving")
        self.model = model
        self.settings = settings = settings or ServerSettings()
        name = pathlib.Path(str(model.spec.base_model_name_or_path)).name or "model"
        self.model_name = settings.model_name or f"d2l-{name}"
        self.created = int(time.time())
        self.has_bias = model.hypernet.bias_lora() is not None
        self.store = DocumentStore(model.spec, model.model_id, memory_bytes=int(settings.adapter_memory_mb * 2**20),
                                   folder=settings.store)
        self.batcher = InternalizeBatcher(model, window_s=settings.batch_window_ms / 1000.0)
        self.engine = DecodeEngine(model, max_batch=settings.max_batch, max_queue=settings.max_queue)
        self.context_window = int(getattr(model.base_model.config, "max_position_embeddings", 0) or 0)

    def start(self) -> None:
        self.batcher.start()
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        self.batcher.stop()

    # ------------------------------------------------------------------ documents
    def _count(self, texts: list[str]) -> list[tuple[int, int]]:
        """(templated tokens, chunks) per document; validates the texts and the token limit."""
        for i, t in enumerate(texts):
            if not t.strip():
                raise bad_request(f"document #{i} is empty or whitespace-only; expected non-empty text", "text")
        try:
            packed = self.model.pack(texts)
        except (ValueError, TypeError) as e:
            raise bad_request(f"cannot tokenize the document(s): {e}", "text") from e
        tokens = [0] * len(texts)
        for c, n in zip(packed.chunk_to_doc, packed.lengths):
            tokens[c] += n
        lim = self.settings.max_document_tokens
        for i, n in enumerate(tokens):
            if n > lim:
                raise APIError(413, f"document #{i} has {n} tokens, more than this server's limit of {lim} "
                                    "(--max-document-tokens)", param="text", code="document_too_large")
        return list(zip(tokens, packed.n_chunks))

    async def _internalize(self, texts: list[str]) -> tuple[list[tuple[int, int]], list[tuple[AdapterBatch, float]]]:
        counts = await asyncio.to_thread(self._count, texts)
        futs = self.batcher.submit(texts)
        results = []
        for f in futs:
            try:
                results.append(await asyncio.wrap_future(f))
            except ValueError as e:
                raise bad_request(f"cannot internalize the document: {e}", "text") from e
        return counts, results

    async def create_documents(self, body: dict) -> dict:
        has_text, has_texts = body.get("text") is not None, body.get("texts") is not None
        if has_text == has_texts:
            raise bad_request("give exactly one of 'text' (one document) or 'texts' (an array of documents)", "text")
        if has_text:
            texts = [_field(body, "text", "str")]
        else:
            texts = _str_list(body, "texts", max_len=self.settings.max_documents_per_request)
            if not texts:
                raise bad_request("'texts' must hold at least one document", "texts")
        names = _str_list(body, "names", max_len=len(texts))
        name = _field(body, "name", "str", None)
        if names is not None and len(names) != len(texts):
            raise bad_request(f"{len(names)} names for {len(texts)} texts", "names")
        if names is None:
            names = [name if len(texts) == 1 else (f"{name} #{i}" if name else None) for i in range(len(texts))]
        counts, results = await self._internalize(texts)
        docs = []
        for nm, (tokens, chunks), (ad, dt) in zip(names, counts, results):
            doc_id = new_document_id()
            info = {"object": "document", "name": nm, "tokens": tokens, "chunks": chunks, "rank": ad.ranks[0],
                    "has_bias": self.has_bias, "created": int(time.time()), "internalize_ms": round(dt * 1e3, 3),
                    "batch_size": len(texts)}
            docs.append(await asyncio.to_thread(self.store.add, doc_id, ad, info))
        return docs[0] if has_text else {"object": "list", "data": docs}

    # ------------------------------------------------------------------ adapters of a request
    def _scaled(self, ad: AdapterBatch, n_chunks: int, c: float, b: float) -> AdapterBatch:
        """``internalize(..., scalers=c, bias_scaler=b)`` of a document, from its adapter made with 1 and 1."""
        if c == 1.0 and b == 1.0:
            return ad
        rank = ad.ranks[0]
        r = rank // (n_chunks + (1 if self.has_bias else 0))
        cut = n_chunks * r
        A, B = {}, {}
        for m in ad.A:
            a, bb = ad.A[m].clone(), ad.B[m].clone()
            a[:, :cut] = a[:, :cut] * torch.tensor(c, dtype=torch.float32).to(a.dtype)
            if self.has_bias:
                a[:, cut:] = b * a[:, cut:]
                bb[:, cut:] = b * bb[:, cut:]
            A[m], B[m] = a, bb
        return AdapterBatch(A, B, list(ad.rank_offsets), ad.alpha, ad.model_id, ad.names)

    async def request_adapter(self, body: dict) -> AdapterBatch | None:
        ids = _str_list(body, "documents", max_len=self.settings.max_documents_per_request, allow_str=True)
        text = _field(body, "document", "str", None)
        c = _field(body, "context_scaling", "number", 1.0, lo=-100.0, hi=100.0)
        b = _field(body, "bias_scaling", "number", 1.0, lo=-100.0, hi=100.0)
        parts = []
        for doc_id in ids or []:
            if not ID_RE.match(doc_id):
                raise not_found(f"document {doc_id!r} not found", "documents", "document_not_found")
            info, ad = await asyncio.to_thread(self.store.get, doc_id)
            parts.append(self._scaled(ad, info["chunks"], c, b))
        if text is not None:
            (counts,), ((ad, _),) = await self._internalize([text])
            parts.append(self._scaled(ad, counts[1], c, b))
        if not parts:  # the base model (context_scaling / bias_scaling have nothing to scale)
            return None
        if len(parts) == 1:
            return parts[0]
        return AdapterBatch.concat(parts).compose(list(range(len(parts))))

    # ------------------------------------------------------------------ completions
    def _sampling(self, body: dict, prompt_len: int) -> dict:
        n = _field(body, "n", "int", 1)
        if n != 1:
            raise bad_request(f"only n=1 is supported, got n={n}", "n")
        if body.get("logprobs") not in (None, False) or body.get("best_of") not in (None, 1):
            raise bad_request("logprobs and best_of are not supported by this server", "logprobs")
        mt = _field(body, "max_completion_tokens", "int", None, lo=1)
        mt = _field(body, "max_tokens", "int", mt, lo=1)
        lim = self.settings.max_new_tokens
        if mt is not None and mt > lim:
            raise bad_request(f"max_tokens={mt} is more than this server's limit of {lim} (--max-new-tokens)",
                              "max_tokens")
        if mt is None:
            mt = self.settings.default_max_tokens
            if self.context_window:
                mt = max(1, min(mt, self.context_window - prompt_len))
        if self.context_window and prompt_len + mt > self.context_window:
            raise APIError(400, f"the prompt has {prompt_len} tokens and max_tokens is {mt}: {prompt_len + mt} is "
                                f"more than the model's context window of {self.context_window} tokens",
                           param="messages", code="context_length_exceeded")
        stop = _str_list(body, "stop", max_len=4, allow_str=True) or []
        if any(s == "" for s in stop):
            raise bad_request("stop strings must be non-empty", "stop")
        return dict(max_new_tokens=mt, stop=stop,
                    temperature=_field(body, "temperature", "number", 0.0, lo=0.0, hi=2.0),
                    top_p=_field(body, "top_p", "number", 1.0, lo=1e-6, hi=1.0),
                    seed=_field(body, "seed", "int", None, lo=-(2**63), hi=2**63 - 1))

    def _check_model(self, body: dict) -> None:
        name = _field(body, "model", "str")
        if name != self.model_name:
            raise not_found(f"the model {name!r} does not exist; this server serves {self.model_name!r}", "model",
                            "model_not_found")

    def chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad_request(f"'messages' must be a non-empty array of messages, got {_typename(msgs)}", "messages")
        conv = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise bad_request(f"messages[{k}] must be an object, got {_typename(m)}", "messages")
            role = m.get("role")
            if role not in _ROLES:
                raise bad_request(f"messages[{k}].role must be one of {sorted(_ROLES)}, got {role!r}", "messages")
            conv.append({"role": _ROLES[role], "content": _message_text(m.get("content"), k)})
        tok = self.model.tokenizer
        try:
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - template errors (e.g. roles a template refuses) are the client's
            raise bad_request(f"the model's chat template refuses these messages: {e}", "messages") from e
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def completion_prompt(self, body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str) or not p:
            raise bad_request(f"'prompt' must be a non-empty string, got {_typename(p)}", "prompt")
        if body.get("suffix") is not None or body.get("echo"):
            raise bad_request("suffix and echo are not supported by this server", "suffix")
        return list(self.model.tokenizer(p)["input_ids"])

    async def prepare(self, body: dict, kind: str) -> tuple[GenRequest, bool, dict, asyncio.Queue]:
        self._check_model(body)
        stream = _field(body, "stream", "bool", False)
        opts = _field(body, "stream_options", "object", {})
        prompt = self.chat_prompt(body) if kind == "chat" else self.completion_prompt(body)
        params = self._sampling(body, len(prompt))
        adapter = await self.request_adapter(body)
        loop, q = asyncio.get_running_loop(), asyncio.Queue()

        def sink(kind_, payload):
            try:
                loop.call_soon_threadsafe(q.put_nowait, (kind_, payload))
            except RuntimeError:  # the event loop is gone: nobody listens any more
                req.cancelled = True

        req = GenRequest(prompt_ids=prompt, adapter=adapter, sink=sink, **params)
        self.engine.submit(req)
        return req, stream, opts, q


# ---------------------------------------------------------------------------------------------- HTTP layer
def _usage(req: GenRequest) -> dict:
    p, c = len(req.prompt_ids), len(req.out_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def create_app(model, settings: ServerSettings | None = None, **overrides):
    """The FastAPI app serving ``model`` (a :class:`~d2l_fast.D2LModel` with a tokenizer).

    ``settings`` / ``overrides``: :class:`ServerSettings` fields. The workers start with the app (lifespan) and
    stop with it; ``app.state.d2l`` is the :class:`DocumentServer`.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

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
        logger.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").to_json(), status_code=500)

    def check_auth(request: Request) -> None:
        key = settings.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key (expected the header 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        check_auth(request)
        limit = settings.max_body_bytes
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
        try:
            body = json.loads(b"".join(data))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad_request(f"the request body must be a JSON object, got {_typename(body)}")
        return body

    @app.get("/", include_in_schema=False)
    async def index():
        page = resources.files("d2l_fast.serving").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "documents": len(srv.store), "in_flight": srv.engine.in_flight}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": srv.created,
                                            "owned_by": "d2l_fast"}]}

    @app.post("/v1/documents")
    async def create_documents(request: Request):
        return await srv.create_documents(await read_json(request))

    @app.get("/v1/documents")
    async def list_documents(request: Request):
        check_auth(request)
        return {"object": "list", "data": srv.store.list()}

    @app.get("/v1/documents/{doc_id}")
    async def get_document(doc_id: str, request: Request):
        check_auth(request)
        return srv.store.info(doc_id)

    @app.delete("/v1/documents/{doc_id}")
    async def delete_document(doc_id: str, request: Request):
        check_auth(request)
        await asyncio.to_thread(srv.store.delete, doc_id)
        return {"id": doc_id, "object": "document.deleted", "deleted": True}

    async def complete(request: Request, kind: str):
        body = await read_json(request)
        req, stream, opts, q = await srv.prepare(body, kind)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def choice(text, finish, *, delta: bool, first: bool = False):
            if kind == "chat":
                if delta:
                    d = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                    return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
                return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if not stream:
            try:
                while True:
                    ev, payload = await q.get()
                    if ev == "error":
                        raise payload
                    if ev == "done":
                        return {"id": rid, "object": obj, "created": created, "model": srv.model_name,
                                "choices": [choice(req.text, req.finish_reason, delta=False)], "usage": _usage(req),
                                "system_fingerprint": None}
            finally:
                req.cancelled = True  # finished already, or the client went away: the row leaves the batch

        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        include_usage = bool(opts.get("include_usage"))

        def sse(choices, usage=None):
            d = {"id": rid, "object": chunk_obj, "created": created, "model": srv.model_name, "choices": choices,
                 "system_fingerprint": None}
            if include_usage:
                d["usage"] = usage
            return f"data: {json.dumps(d)}\n\n"

        async def events():
            try:
                if kind == "chat":
                    yield sse([choice("", None, delta=True, first=True)])
                while True:
                    ev, payload = await q.get()
                    if ev == "delta":
                        yield sse([choice(payload, None, delta=True)])
                    elif ev == "done":
                        yield sse([choice("", req.finish_reason, delta=True)])
                        if include_usage:
                            yield sse([], _usage(req))
                        break
                    else:
                        yield f"data: {json.dumps(payload.to_json())}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                req.cancelled = True  # a client that disconnects mid-stream: its row is dropped at the next step

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "completion")

    return app


__all__ = ["DocumentServer", "ServerSettings", "create_app"]
