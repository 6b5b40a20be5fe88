"""``d2l-fast serve``: the OpenAI-compatible document server (see :mod:`d2l_fast.serving`).

The server's own flags are generated from :class:`~d2l_fast.serving.settings.ServerSettings` (one per field, with
its help and default); the flags here choose the model and where to listen."""

from __future__ import annotations

import logging
import os
import pathlib

from ..serving.settings import ServerSettings
from ._common import (
    CLIError,
    check_base_model,
    check_output_parent,
    load_checkpoint,
    load_model,
    non_negative_int,
    positive_int,
)
from ._flags import add_dataclass_flags, dataclass_kwargs

NAME = "serve"

POSITIVE = ("max_batch", "max_queue", "max_document_tokens", "max_documents_per_request", "max_new_tokens",
            "default_max_tokens", "max_body_bytes")


def add_parser(sub):
    sv = sub.add_parser(NAME, help="OpenAI-compatible document server: documents → adapters, batched chat")
    sv.add_argument("--checkpoint", help="trained D2L checkpoint: a bundled name, the reference's "
                    "pytorch_model.bin or a pickle-free folder (default: the bundled smollm2-135m)")
    sv.add_argument("--base-model", help="local HF folder (default: the one the checkpoint names); with --untrained "
                    "also 'smollm2-135m'")
    sv.add_argument("--subfolder", help="the checkpoint's subfolder (hub layout)")
    sv.add_argument("--untrained", action="store_true", help="no checkpoint: a seeded random hypernetwork (demo)")
    sv.add_argument("--seed", type=int, default=0, help="--untrained: hypernetwork seed (default: 0)")
    sv.add_argument("--init-scale", type=float, default=2.0, help="--untrained: std of the random scaler_B "
                    "(default: 2.0)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    sv.add_argument("--max-chunk-len", type=positive_int, default=None,
                    help="templated tokens per document chunk (default: the model's)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="log level of uvicorn and of d2l_fast's own lines (request log, internalize) "
                    "(default: info)")
    add_dataclass_flags(sv, ServerSettings, types={**{k: positive_int for k in POSITIVE},
                                                   "encode_slice_tokens": non_negative_int})
    sv.add_argument("--max-body-mb", type=float, default=None,
                    help="the request body limit in MiB (overrides --max-body-bytes; kept for older scripts)")
    sv.set_defaults(fn=run, loads_models=True)
    return sv


def settings_from_args(args) -> ServerSettings:
    """The :class:`ServerSettings` of the parsed flags (``--api-key`` defaults to ``$D2L_API_KEY``)."""
    kw = dataclass_kwargs(args, ServerSettings)
    if kw["api_key"] is None:
        kw["api_key"] = os.environ.get("D2L_API_KEY") or None
    if getattr(args, "max_body_mb", None) is not None:
        if not args.max_body_mb > 0:
            raise CLIError(f"--max-body-mb must be a positive number, got {args.max_body_mb}")
        kw["max_body_bytes"] = int(args.max_body_mb * 2**20)
    return ServerSettings(**kw)


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise CLIError(f"the server needs FastAPI and uvicorn ({e}): pip install 'd2l_fast[serve]'") from None
    from ..serving import create_app, serve

    if args.store is not None:
        store = pathlib.Path(args.store)
        if store.exists() and not store.is_dir():
            raise CLIError(f"--store {args.store!r} is a file; expected a folder (created if missing)")
        check_output_parent(store)
    settings = settings_from_args(args)
    logging.getLogger("d2l_fast").setLevel(args.log_level.upper())
    _check_port(args.host, args.port)  # a busy port: one line now, not after the model has loaded
    model = _model(args)
    app = create_app(model, settings)
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        logging.getLogger(__name__).warning("serving on %s without --api-key: anyone who reaches it can use it",
                                            args.host)
    url = f"http://{args.host}:{args.port}"
    print(f"d2l-fast serve: {app.state.d2l.model_name} on {url} — web page {url}/ , OpenAI base_url {url}/v1 , "
          f"metrics {url}/metrics", flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise CLIError(f"--host {host!r} cannot be resolved: {e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e} (is another server running there? "
                           "choose another --port)") from None


def _model(args):
    if args.checkpoint is None and not args.untrained:
        args.checkpoint = "smollm2-135m"  # as ask: the bundled checkpoint
    if args.checkpoint is None:
        if args.base_model is None:
            raise CLIError("give --checkpoint (a trained D2L checkpoint), or --untrained with --base-model for a "
                           "demo with a seeded random hypernetwork")
        return _untrained_model(args)
    if args.untrained:
        raise CLIError("--untrained and --checkpoint exclude each other")
    from ..zoo import get_entry, pretrained, pretrained_names

    if args.checkpoint in pretrained_names() and args.subfolder is None:  # a bundled name: its base + tokenizer
        get_entry(args.checkpoint)  # not shipped in this build: a clear error before anything is read
        if args.base_model is not None:
            check_base_model(args.base_model, False)
        return pretrained(args.checkpoint, base_model=args.base_model, max_chunk_len=args.max_chunk_len)
    return load_model(args, load_checkpoint(args.checkpoint, subfolder=args.subfolder))


def _untrained_model(args):
    from ..model import D2LModel

    if args.base_model == "smollm2-135m":
        from ..demo import load_smollm2

        base, tok = load_smollm2()
    else:
        from ..hf import load_base_model
        from ..packing import get_tokenizer

        check_base_model(args.base_model, False)
        base = load_base_model(str(pathlib.Path(args.base_model).expanduser()))
        tok = get_tokenizer(str(pathlib.Path(args.base_model).expanduser()))
    logging.getLogger(__name__).warning("serving an UNTRAINED hypernetwork (seed %d, init scale %s): its adapters "
                                        "are random", args.seed, args.init_scale)
    return D2LModel.from_base(base, tok, seed=args.seed, init_scaler_B=args.init_scale,
                              max_chunk_len=args.max_chunk_len)
