""":class:`DocumentServer`: the model, the document store and the two workers behind the HTTP routes.

A posted document is tokenized once (its templated ids are counted, then internalized). A request's adapter is
built with at most one copy of adapter data: a stored document's adapter is used as it is; several documents,
or ``context_scaling`` / ``bias_scaling`` other than 1, cost one concatenation (scaled in place) or one scaled
copy (:meth:`~d2l_fast.AdapterBatch.rescaled`).
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time

from .. import packing
from ..adapters import AdapterBatch
from ..answering import layout_messages, model_settings
from .engine import DecodeEngine, GenRequest, InternalizeBatcher
from .errors import APIError, bad_request, not_found
from .heap import HeapTrimmer
from .metrics import ServerMetrics
from .metrics import available as metrics_available
from .models import LoadedAdapter, RuntimeAdapters, model_card
from .settings import ServerSettings
from .store import ID_RE, DocumentStore, new_document_id
from .uploads import UploadCancelled, UploadProgress, UploadRegistry
from .validation import ROLES, check_supported, completion_prompts, field_value, message_text, str_list, typename

logger = logging.getLogger(__name__)


class DocumentServer:
    """Model + document store + the two workers; the FastAPI routes call into this."""

    def __init__(self, model, settings: ServerSettings | None = None):
        from ..model import D2LModel

        if not isinstance(model, D2LModel):
            raise TypeError(f"model must be a D2LModel, got {type(model).__name__}")
        if settings is not None and not isinstance(settings, ServerSettings):
            raise TypeError(f"settings must be a ServerSettings, got {type(settings).__name__}")
        if model.tokenizer is None:
            raise model.tokenizer_required("serving")
        self.model = model
        self.settings = settings = settings or ServerSettings()
        name = pathlib.Path(str(model.spec.base_model_name_or_path)).name or "model"
        self.model_name = settings.model_name or f"d2l-{name}"
        self.created = int(time.time())
        self.has_bias = model.hypernet.bias_lora() is not None
        self.bias_rows = model.spec.lora_r if self.has_bias else 0  # rows at the end of every document's adapter
        self.store = DocumentStore(model.spec, model.model_id, memory_bytes=int(settings.adapter_memory_mb * 2**20),
                                   folder=settings.store)
        self.heap = HeapTrimmer()  # freed tensors back to the OS when the workers go idle (glibc)
        self.batcher = InternalizeBatcher(model, window_s=settings.batch_window_ms / 1000.0,
                                          slice_tokens=settings.encode_slice_tokens or None, heap=self.heap)
        static = {"off": False, "on": True, "auto": "auto"}[settings.static_decode]
        self.engine = DecodeEngine(model, max_batch=settings.max_batch, max_queue=settings.max_queue, heap=self.heap,
                                   static=static)
        self.context_window = int(getattr(model.base_model.config, "max_position_embeddings", 0) or 0)
        self.uploads = UploadRegistry()
        self.loras = RuntimeAdapters(int(settings.adapter_memory_mb * 2**20))  # POST /v1/load_lora_adapter
        self.metrics = ServerMetrics(self) if metrics_available() else None
        self._tasks: set = set()  # background uploads ("async": true)
        self.checkpoint_settings = model_settings(model)  # chunk length, prompt layout, what it reads: /v1/models

    def start(self) -> None:
        self.batcher.start()
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        self.batcher.stop()

    # ------------------------------------------------------------------ documents
    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """Each document's templated ids (what internalize reads) and its (templated tokens, chunks); validates
        the texts and the token limit."""
        for i, t in enumerate(texts):
            if not t.strip():
                raise bad_request(f"document #{i} is empty or whitespace-only; expected non-empty text", "text")
        try:
            ids = [packing.tokenize_context(self.model.tokenizer, t) for t in texts]
            packed = self.model.pack(ids)
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
        return ids, list(zip(tokens, packed.n_chunks))

    async def internalize(self, texts: list[str], progress: list[UploadProgress] | None = None,
                          tokenized=None) -> tuple[list[tuple[int, int]], list[tuple[AdapterBatch, float]]]:
        """(tokens, chunks) and (adapter, seconds) per document; the documents are tokenized once (``tokenized``:
        :meth:`tokenize` 's result when the caller has it)."""
        ids, counts = tokenized if tokenized is not None else await asyncio.to_thread(self.tokenize, texts)
        futs = self.batcher.submit(ids, progress)
        results = []
        for f in futs:
            try:
                results.append(await asyncio.wrap_future(f))
            except UploadCancelled as e:
                raise APIError(409, f"the upload was cancelled: {e}", code="upload_cancelled") from e
            except ValueError as e:
                raise bad_request(f"cannot internalize the document: {e}", "text") from e
        for (tokens, _), (_, dt) in zip(counts, results):
            self.on_internalized(tokens, dt)
        return counts, results

    def on_internalized(self, tokens: int, seconds: float) -> None:
        """Called once per internalized document."""
        logger.info("internalized a document of %d tokens in %.3f s", tokens, seconds)
        if self.metrics is not None:
            self.metrics.observe_internalized(tokens, seconds)

    def _posted_texts(self, body: dict) -> tuple[list[str], list, bool]:
        has_text, has_texts = body.get("text") is not None, body.get("texts") is not None
        if has_text == has_texts:
            raise bad_request("give exactly one of 'text' (one document) or 'texts' (an array of documents)", "text")
        if has_text:
            texts = [field_value(body, "text", "str")]
        else:
            texts = str_list(body, "texts", max_len=self.settings.max_documents_per_request)
            if not texts:
                raise bad_request("'texts' must hold at least one document", "texts")
        names = str_list(body, "names", max_len=len(texts))
        name = field_value(body, "name", "str", None)
        if names is not None and len(names) != len(texts):
            raise bad_request(f"{len(names)} names for {len(texts)} texts", "names")
        if names is None:
            names = [name if len(texts) == 1 else (f"{name} #{i}" if name else None) for i in range(len(texts))]
        return texts, names, has_text

    async def create_documents(self, body: dict) -> tuple[dict, int]:
        """(response, HTTP status): the stored documents (200), or with ``"async": true`` their progress records
        at once (202) while the upload goes on (``GET /v1/documents/{id}/progress``)."""
        texts, names, one = self._posted_texts(body)
        background = field_value(body, "async", "bool", False)
        tokenized = await asyncio.to_thread(self.tokenize, texts)
        doc_ids = [new_document_id() for _ in texts]
        progress = [self.uploads.add(UploadProgress(d, chunks_total=c, tokens=t))
                    for d, (t, c) in zip(doc_ids, tokenized[1])]
        if background:
            task = asyncio.get_running_loop().create_task(self._upload(texts, names, doc_ids, progress, tokenized))
            self._tasks.add(task)
            task.add_done_callback(self._upload_done)
            out = [p.to_json() for p in progress]
            return (out[0] if one else {"object": "list", "data": out}), 202
        docs = await self._upload(texts, names, doc_ids, progress, tokenized)
        return (docs[0] if one else {"object": "list", "data": docs}), 200

    def _upload_done(self, task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the progress records hold the error

    async def _upload(self, texts, names, doc_ids, progress, tokenized) -> list[dict]:
        try:
            counts, results = await self.internalize(texts, progress, tokenized)
            docs = []
            for doc_id, nm, p, (tokens, chunks), (ad, dt) in zip(doc_ids, names, progress, counts, results):
                if p.cancelled:
                    continue
                info = {"object": "document", "name": nm, "tokens": tokens, "chunks": chunks, "rank": ad.ranks[0],
                        "has_bias": self.has_bias, "created": int(time.time()), "internalize_ms": round(dt * 1e3, 3),
                        "batch_size": len(texts)}
                docs.append(await asyncio.to_thread(self.store.add, doc_id, ad, info))
                p.finish("ready")
        except Exception as e:
            msg = e.message if isinstance(e, APIError) else f"{type(e).__name__}: {e}"
            for p in progress:
                if p.finished is None:
                    p.finish("cancelled" if p.cancelled else "failed", msg)
            if not isinstance(e, APIError):
                logger.exception("upload of %s failed", doc_ids)
            raise
        return docs

    def upload_progress(self, doc_id: str) -> dict:
        p = self.uploads.get(doc_id)
        if p is not None and (p.status != "ready" or doc_id in self.store):
            return p.to_json()
        info = self.store.info(doc_id)  # 404 for an unknown id
        return {"id": doc_id, "object": "document.progress", "status": "ready", "chunks_done": info.get("chunks"),
                "chunks_total": info.get("chunks"), "tokens": info.get("tokens"), "fraction": 1.0,
                "elapsed_ms": None, "encode_ms": info.get("internalize_ms"), "error": None}

    def delete_document(self, doc_id: str) -> dict:
        """Delete a stored document, or cancel an upload still in progress (it is then never stored)."""
        p = self.uploads.get(doc_id)
        if p is not None and p.finished is None:
            p.cancelled = True
            p.finish("cancelled", "cancelled by DELETE")
            return {"id": doc_id, "object": "document.deleted", "deleted": True, "cancelled": True}
        self.store.delete(doc_id)
        return {"id": doc_id, "object": "document.deleted", "deleted": True}

    # ------------------------------------------------------------------ adapters of a request
    def combine(self, parts: list[AdapterBatch], context: float, bias: float, *,
                owned: bool = False) -> AdapterBatch | None:
        """One adapter applying every part (documents' adapters, each made with scalers 1 and 1), scaled.

        At most one copy: one part unscaled is returned as it is; one part scaled is one scaled copy (or scaled
        in place when ``owned``: nobody else holds it); several parts are concatenated once and scaled in place.
        """
        if not parts:  # the base model (context_scaling / bias_scaling have nothing to scale)
            return None
        bias = bias if self.has_bias else 1.0
        if len(parts) == 1:
            return parts[0].rescaled(context=context, bias=bias, bias_rows=self.bias_rows, inplace=owned)
        cat = AdapterBatch.concat(parts).rescaled(context=context, bias=bias, bias_rows=self.bias_rows, inplace=True)
        return AdapterBatch(cat.A, cat.B, [0, cat.rank_offsets[-1]], cat.alpha, cat.model_id)  # rows as one adapter

    async def request_adapter(self, body: dict, model: str | None = None) -> AdapterBatch | None:
        """The adapter of a request: the model's (a document id or a loaded adapter's name as ``model``) first,
        then ``documents`` in order, then the inline ``document``; ``model=<doc id>`` is ``documents=[<doc id>]``."""
        ids = str_list(body, "documents", max_len=self.settings.max_documents_per_request, allow_str=True)
        text = field_value(body, "document", "str", None)
        c = field_value(body, "context_scaling", "number", 1.0, lo=-100.0, hi=100.0)
        b = field_value(body, "bias_scaling", "number", 1.0, lo=-100.0, hi=100.0)
        parts = []
        if model is not None and model != self.model_name:
            if model in (ids or []):
                raise bad_request(f"{model!r} is both the model and one of 'documents'; name it once (the model's "
                                  "adapter is composed with the listed documents)", "documents")
            loaded = self.loras.get(model)
            if loaded is not None:
                parts.append(loaded.adapter)
            else:
                parts.append((await asyncio.to_thread(self.store.get, model))[1])
        for doc_id in ids or []:
            if not ID_RE.match(doc_id):
                raise not_found(f"document {doc_id!r} not found", "documents", "document_not_found")
            parts.append((await asyncio.to_thread(self.store.get, doc_id))[1])
        if text is not None:
            _, ((ad, _),) = await self.internalize([text])
            parts.append(ad)
        return self.combine(parts, c, b, owned=text is not None and len(parts) == 1)

    # ------------------------------------------------------------------ completions
    def sampling(self, body: dict, prompt_len: int) -> dict:
        n = field_value(body, "n", "int", 1)
        if n != 1:
            raise bad_request(f"only n=1 is supported, got n={n}", "n")
        if body.get("logprobs") not in (None, False) or body.get("best_of") not in (None, 1):
            raise bad_request("logprobs and best_of are not supported by this server", "logprobs")
        mt = field_value(body, "max_completion_tokens", "int", None, lo=1)
        mt = field_value(body, "max_tokens", "int", mt, lo=1)
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
        stop = str_list(body, "stop", max_len=4, allow_str=True) or []
        if any(s == "" for s in stop):
            raise bad_request("stop strings must be non-empty", "stop")
        return dict(max_new_tokens=mt, stop=stop,
                    temperature=field_value(body, "temperature", "number", 0.0, lo=0.0, hi=2.0),
                    top_p=field_value(body, "top_p", "number", 1.0, lo=1e-6, hi=1.0),
                    seed=field_value(body, "seed", "int", None, lo=-(2**63), hi=2**63 - 1),
                    presence_penalty=field_value(body, "presence_penalty", "number", 0.0, lo=-2.0, hi=2.0),
                    frequency_penalty=field_value(body, "frequency_penalty", "number", 0.0, lo=-2.0, hi=2.0))

    def check_model(self, body: dict) -> str:
        """The request's ``model``: the served model, a stored document's id or a loaded adapter's name (404
        otherwise)."""
        name = field_value(body, "model", "str")
        if name != self.model_name and name not in self.store and self.loras.get(name) is None:
            raise not_found(f"the model {name!r} does not exist; this server serves {self.model_name!r}, its stored "
                            "documents (by id) and the adapters loaded at run time (GET /v1/models lists them)",
                            "model", "model_not_found")
        return name

    # ------------------------------------------------------------------ models (documents and adapters as models)
    def model_cards(self) -> list[dict]:
        """``GET /v1/models``: the served model, then every stored document, then every loaded adapter."""
        base = self.model_name
        cards = [model_card(base, self.created, parent=None, root=str(self.model.spec.base_model_name_or_path),
                            max_model_len=self.context_window, **self.checkpoint_settings)]
        cards += [model_card(i["id"], i.get("created", self.created), parent=base, root=i["id"],
                             max_model_len=self.context_window, name=i.get("name"))
                  for i in self.store.list()]
        cards += [model_card(a.name, a.created, parent=base, root=a.path, max_model_len=self.context_window)
                  for a in self.loras.list()]
        return cards

    def model_card(self, model_id: str) -> dict:
        """``GET /v1/models/{id}``; 404 (OpenAI's shape) for an unknown id."""
        if model_id == self.model_name:
            return self.model_cards()[0]
        loaded = self.loras.get(model_id)
        if loaded is not None:
            return model_card(loaded.name, loaded.created, parent=self.model_name, root=loaded.path,
                              max_model_len=self.context_window)
        if ID_RE.match(model_id) and model_id in self.store:
            i = self.store.info(model_id)
            return model_card(model_id, i.get("created", self.created), parent=self.model_name, root=model_id,
                              max_model_len=self.context_window, name=i.get("name"))
        raise not_found(f"the model {model_id!r} does not exist", "model", "model_not_found")

    def _runtime_lora_body(self, body: dict, fields: set) -> None:
        if not self.settings.allow_runtime_lora_loading:
            raise APIError(403, "runtime LoRA loading is off on this server; start it with "
                                "--allow-runtime-lora-loading to load and unload adapters at run time",
                           code="runtime_lora_loading_disabled")
        extra = sorted(k for k, v in body.items() if k not in fields and v is not None)
        if extra:
            raise bad_request(f"the parameter {extra[0]!r} is not supported here; supported: {sorted(fields)}",
                              extra[0])

    async def load_lora(self, body: dict) -> str:
        """``POST /v1/load_lora_adapter`` (vLLM's API): load the PEFT folder ``lora_path`` as the model
        ``lora_name``; every problem with the folder is a 400 naming it."""
        from ..peft_import import PeftFormatError, load_peft_adapter

        self._runtime_lora_body(body, {"lora_name", "lora_path", "load_inplace"})
        name = self.loras.check_name(body.get("lora_name"), self.model_name)
        path = body.get("lora_path")
        if not isinstance(path, str) or not path:
            raise bad_request(f"'lora_path' must be a non-empty string (a PEFT adapter folder on the server), got "
                              f"{path!r:.80}", "lora_path")
        replace = field_value(body, "load_inplace", "bool", False)
        if not replace and self.loras.get(name) is not None:
            raise bad_request(f"the lora adapter {name!r} has already been loaded", "lora_name")
        folder = pathlib.Path(path).expanduser()
        try:  # a weights file larger than the room left: 413 before anything is read
            size = (folder / "adapter_model.safetensors").stat().st_size
        except (OSError, ValueError):
            size = 0  # missing or unreadable: the loader names the problem
        self.loras.check_room(size, name)
        try:
            ad = await asyncio.to_thread(load_peft_adapter, folder, self.model, name=name,
                                         max_bytes=max(self.loras.memory_bytes, 1))
        except (PeftFormatError, OSError, ValueError, TypeError) as e:
            raise bad_request(f"cannot load the LoRA adapter from 'lora_path' {path!r}: {e}", "lora_path") from e
        ad = ad.to(device=self.model.device, dtype=self.model.hypernet.head.weight.dtype)
        self.loras.add(LoadedAdapter(name, path, ad), replace=replace)
        logger.info("loaded LoRA adapter %r (rank %d) from %s", name, ad.ranks[0], path)
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_lora(self, body: dict) -> str:
        """``POST /v1/unload_lora_adapter`` (vLLM's API); 404 for a name that is not loaded."""
        self._runtime_lora_body(body, {"lora_name", "lora_int_id"})
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"'lora_name' must be a non-empty string, got {name!r:.80}", "lora_name")
        self.loras.remove(name)
        logger.info("unloaded LoRA adapter %r", name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad_request(f"'messages' must be a non-empty array of messages, got {typename(msgs)}", "messages")
        conv = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise bad_request(f"messages[{k}] must be an object, got {typename(m)}", "messages")
            role = m.get("role")
            if role not in ROLES:
                raise bad_request(f"messages[{k}].role must be one of {sorted(ROLES)}, got {role!r}", "messages")
            conv.append({"role": ROLES[role], "content": message_text(m.get("content"), k)})
        if field_value(body, "trained_prompt", "bool", self.settings.trained_prompt):
            conv = layout_messages(conv, self.model.prompt_layout)
        tok = self.model.tokenizer
        try:
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - template errors (e.g. roles a template refuses) are the client's
            raise bad_request(f"the model's chat template refuses these messages: {e}", "messages") from e
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def completion_prompts(self, body: dict) -> list[list[int]]:
        if body.get("suffix") is not None or body.get("echo"):
            raise bad_request("suffix and echo are not supported by this server", "suffix")
        return completion_prompts(body, self.model.tokenizer, self.model.vocab_size, self.settings.max_batch)

    async def prepare(self, body: dict, kind: str) -> tuple[list[GenRequest], bool, dict, asyncio.Queue, str]:
        """Validate a completion request, build its adapter and queue it: (requests — one per prompt —, stream?,
        stream_options, the queue their events arrive on as ``(prompt index, event, payload)``, the model name
        the response carries)."""
        if kind not in ("chat", "completion"):
            raise ValueError(f"kind must be 'chat' or 'completion', got {kind!r}")
        check_supported(body, kind)
        model = self.check_model(body)
        stream = field_value(body, "stream", "bool", False)
        opts = field_value(body, "stream_options", "object", {})
        prompts = [self.chat_prompt(body)] if kind == "chat" else self.completion_prompts(body)
        params = self.sampling(body, max(len(p) for p in prompts))
        adapter = await self.request_adapter(body, model)
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        reqs: list[GenRequest] = []

        def sink_of(i):
            def sink(kind_, payload):
                try:
                    loop.call_soon_threadsafe(q.put_nowait, (i, kind_, payload))
                except RuntimeError:  # the event loop is gone: nobody listens any more
                    reqs[i].cancelled = True

            return sink

        reqs.extend(GenRequest(prompt_ids=p, adapter=adapter, sink=sink_of(i), **params) for i, p in enumerate(prompts))
        if len(reqs) > 1 and self.engine.in_flight + len(reqs) > self.settings.max_queue:
            raise APIError(429, f"too many requests in flight (limit {self.settings.max_queue}); retry later",
                           code="queue_full")
        try:
            for r in reqs:
                self.engine.submit(r)
        except APIError:
            for r in reqs:
                r.cancelled = True
            raise
        return reqs, stream, opts, q, model


__all__ = ["DocumentServer"]
