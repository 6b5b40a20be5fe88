"""``d2l-fast`` command line: demo, checkpoint info/convert, internalize, benchmarks.

User errors (missing or unreadable files, bad UTF-8, a missing output folder, a bad checkpoint, a base model
that is neither a local folder nor reachable on the Hub) end with one ``d2l-fast <cmd>: error: ...`` line on
stderr and exit status 1; ``--traceback`` shows the Python traceback instead. Files are checked before any
model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import sys
import time
from importlib import resources


class CLIError(Exception):
    """A user error: reported as one line, exit status 1."""


def _demo(args) -> int:
    import torch

    from . import D2LModel
    from .zoo import load_smollm2

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    docs = json.loads(resources.files("d2l_fast").joinpath("data/demo_docs.json").read_text())[: args.n_docs]
    t = {}
    t0 = time.perf_counter()
    base, tok = load_smollm2()
    t["load SmolLM2-135M-Instruct"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = D2LModel.from_base(base, tok, seed=args.seed, init_scaler_B=args.init_scale,
                               max_chunk_len=args.max_chunk_len)
    n_params = sum(p.numel() for p in model.hypernet.parameters())
    t["build hypernetwork"] = time.perf_counter() - t0
    print(f"hypernetwork: {n_params / 1e6:.1f} M parameters, UNTRAINED (seeded random init, seed={args.seed}): "
          "its adapters are random, so answers come from the base model's own knowledge; "
          "no trained D2L checkpoint for SmolLM2 ships yet.")
    t0 = time.perf_counter()
    packed = model.pack([d["text"] for d in docs])
    adapters = model.internalize([d["text"] for d in docs], names=[d["title"] for d in docs])
    t["internalize"] = time.perf_counter() - t0
    print(f"internalized {len(docs)} documents in ONE packed call: {packed.total_tokens} context tokens, "
          f"{len(packed.chunks)} chunks (max_chunk_len={args.max_chunk_len}), adapter ranks {adapters.ranks}")
    questions = [d["question"] for d in docs]
    t0 = time.perf_counter()
    answers = model.generate_text(questions, adapters, adapter_index=list(range(len(docs))),
                                  max_new_tokens=args.max_new_tokens)
    t["generate (batched, one adapter per row)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_answers = model.generate_text(questions, None, max_new_tokens=args.max_new_tokens)
    t["generate (same batch, base model)"] = time.perf_counter() - t0
    for d, a, b in zip(docs, answers, base_answers):
        print(f"\n[{d['title']}] Q: {d['question']}\n  with adapter: {a}\n  base model:   {b}\n"
              f"  reference answer: {d['answer']}")
    n_diff = sum(a != b for a, b in zip(answers, base_answers))
    print(f"\n{n_diff}/{len(docs)} answers differ from the base model's "
          f"(random adapters, init scale {args.init_scale})")
    print("\nstage timings (CPU threads: %d)" % torch.get_num_threads())
    for k, v in t.items():
        print(f"  {k:<42s} {v:7.2f} s")
    return 0


def _profile(args) -> int:
    """torch.profiler over internalize + batched generate on SmolLM2; prints the top operators per stage."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from . import D2LModel
    from .zoo import load_smollm2

    if args.threads:
        torch.set_num_threads(args.threads)
    docs = json.loads(resources.files("d2l_fast").joinpath("data/demo_docs.json").read_text())[: args.n_docs]
    base, tok = load_smollm2()
    model = D2LModel.from_base(base, tok, seed=0, init_scaler_B=2.0, max_chunk_len=args.max_chunk_len,
                               latent_size=args.latent_size, num_blocks=args.num_blocks)
    texts = [d["text"] for d in docs]
    model.internalize(texts[:1])  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=False) as p1:
        adapters = model.internalize(texts)
    ids, mask = model.encode_prompts([d["question"] for d in docs])
    with profile(activities=acts) as p2:
        model.generate(ids, mask, adapters=adapters, max_new_tokens=args.max_new_tokens, do_sample=False)
    for name, p in (("internalize", p1), ("generate", p2)):
        print(f"\n== {name} ==")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if args.trace:
            path = f"{args.trace}.{name}.json"
            p.export_chrome_trace(path)
            print(f"chrome trace: {path}")
    return 0


def _info(args) -> int:
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(args.checkpoint, subfolder=args.subfolder)
    n = sum(v.numel() for v in ck.state_dict.values())
    print(json.dumps({"source": ck.source, "parameters": n, "spec": ck.spec.to_dict()}, indent=1))
    return 0


def _convert(args) -> int:
    from .checkpoint import load_checkpoint, save_checkpoint

    out = pathlib.Path(args.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"output {str(out)!r} exists and is not a folder")
    _check_output_parent(out)
    ck = load_checkpoint(args.checkpoint, subfolder=args.subfolder)
    out = save_checkpoint(ck, out)
    print(f"wrote {out} (d2l_config.json + hypernet.safetensors)")
    return 0


def _check_output_parent(out: pathlib.Path) -> None:
    parent = out.absolute().parent
    if not parent.is_dir():
        raise CLIError(f"output folder {str(parent)!r} does not exist (create it first)")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"output folder {str(parent)!r} is not writable")


def _read_documents(paths) -> list[str]:
    """Every document as text, checked before anything heavy runs: exists, is a file, UTF-8, not blank."""
    texts = []
    for p in paths:
        path = pathlib.Path(p)
        if not path.exists():
            raise CLIError(f"document {p!r} not found")
        if not path.is_file():
            raise CLIError(f"document {p!r} is not a file")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise CLIError(f"document {p!r} cannot be read: {e.strerror or e}") from e
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CLIError(f"document {p!r} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset "
                           f"{e.start}); convert it to UTF-8 first") from e
        if not text.strip():
            raise CLIError(f"document {p!r} is empty or whitespace-only")
        texts.append(text)
    return texts


def _looks_like_path(name: str) -> bool:
    """True for names that can only mean a local folder (a Hub id is ``name`` or ``org/name``)."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name)
            or (os.sep != "/" and os.sep in name))


def _check_base_model(name: str, from_checkpoint: bool) -> None:
    where = "the checkpoint's base model" if from_checkpoint else "--base-model"
    path = pathlib.Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"{where} {name!r} is a file; expected a model folder (with config.json) or a Hub id")
        if not (path / "config.json").is_file():
            raise CLIError(f"{where} folder {str(path.absolute())!r} has no config.json (not a transformers model)")
        return
    if _looks_like_path(name):
        raise CLIError(f"{where} {name!r} is not a local folder ({str(path.absolute())!r} does not exist)")


def _load_model(args, ckpt):
    from . import D2LModel

    from_ckpt = args.base_model is None
    name = ckpt.spec.base_model_name_or_path if from_ckpt else args.base_model
    _check_base_model(name, from_ckpt)
    local = pathlib.Path(name).expanduser().is_dir()
    try:
        return D2LModel.from_checkpoint(ckpt, base_model=str(pathlib.Path(name).expanduser()) if local else name,
                                        max_chunk_len=args.max_chunk_len)
    except OSError as e:
        if local:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (f" The checkpoint names {name!r}; pass --base-model with the base model's folder."
                if from_ckpt else " Pass --base-model with the base model's folder.")
        raise CLIError(f"base model {name!r} is not a local folder (no {str(pathlib.Path(name).absolute())!r}) and "
                       f"could not be loaded from the Hugging Face Hub: {first}{hint}") from e


def _internalize(args) -> int:
    from .checkpoint import load_checkpoint

    out = pathlib.Path(args.output)
    if out.is_dir():
        raise CLIError(f"output {args.output!r} is a folder; expected a file name such as adapters.safetensors")
    _check_output_parent(out)
    texts = _read_documents(args.documents)
    ckpt = load_checkpoint(args.checkpoint, subfolder=args.subfolder)
    model = _load_model(args, ckpt)
    t0 = time.perf_counter()
    adapters = model.internalize(texts, names=[os.path.basename(p) for p in args.documents],
                                 docs_per_call=args.docs_per_call)
    adapters.save(out)
    print(f"internalized {len(texts)} documents in {time.perf_counter() - t0:.2f} s → {out} (ranks {adapters.ranks})")
    return 0


def benchmarks_dir() -> pathlib.Path:
    """The benchmark suite of the source tree this package runs from."""
    return pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _export_peft(args) -> int:
    import torch

    from . import AdapterBatch
    from .checkpoint import load_checkpoint
    from .export import export_peft

    ck = load_checkpoint(args.checkpoint, subfolder=args.subfolder)
    adapters = AdapterBatch.load(args.adapters, spec=ck.spec)
    indices = args.index if args.index is not None else list(range(len(adapters)))
    dtype = None if args.dtype == "same" else getattr(torch, args.dtype)
    out = export_peft(ck, adapters, indices, args.out, dtype=dtype, names=args.names, overwrite=args.overwrite,
                      compose=args.compose, max_rank=args.max_rank, base_model=args.base_model)
    ranks = [sum(adapters.ranks[i] for i in indices)] if args.compose else [adapters.ranks[i] for i in indices]
    for path, r in zip(out, ranks):
        print(f"{path}  (rank {r})")
    print(f"wrote {len(out)} PEFT folder(s); vLLM: --enable-lora --max-lora-rank >= {max(ranks)} "
          f"--lora-modules NAME={out[0]}")
    return 0


def _serve(args) -> int:
    """``d2l-fast serve``: the OpenAI-compatible document server (see :mod:`d2l_fast.serving`)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise CLIError(f"the server needs FastAPI and uvicorn ({e}): pip install 'd2l_fast[serve]'") from None
    from .serving import ServerSettings, create_app, serve

    if args.store is not None:
        store = pathlib.Path(args.store)
        if store.exists() and not store.is_dir():
            raise CLIError(f"--store {args.store!r} is a file; expected a folder (created if missing)")
        _check_output_parent(store)
    api_key = args.api_key if args.api_key is not None else os.environ.get("D2L_API_KEY") or None
    settings = ServerSettings(model_name=args.served_model_name, adapter_memory_mb=args.adapter_memory_mb,
                              store=args.store, max_batch=args.max_batch, max_queue=args.max_queue,
                              max_document_tokens=args.max_document_tokens, max_new_tokens=args.max_new_tokens,
                              max_body_bytes=int(args.max_body_mb * 2**20), api_key=api_key)
    if args.checkpoint is None:
        if not args.untrained or args.base_model is None:
            raise CLIError("give --checkpoint (a trained D2L checkpoint), or --untrained with --base-model for a "
                           "demo with a seeded random hypernetwork")
        model = _untrained_model(args)
    else:
        if args.untrained:
            raise CLIError("--untrained and --checkpoint exclude each other")
        from .checkpoint import load_checkpoint

        model = _load_model(args, load_checkpoint(args.checkpoint, subfolder=args.subfolder))
    app = create_app(model, settings)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logging.getLogger(__name__).warning("serving on %s without --api-key: anyone who reaches it can use it",
                                            args.host)
    print(f"d2l-fast serve: {app.state.d2l.model_name} on http://{args.host}:{args.port} "
          f"(OpenAI base_url http://{args.host}:{args.port}/v1)", flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _untrained_model(args):
    from . import D2LModel

    if args.base_model == "smollm2-135m":
        from .zoo import load_smollm2

        base, tok = load_smollm2()
    else:
        from .model import _load_base_model
        from .packing import get_tokenizer

        _check_base_model(args.base_model, False)
        base = _load_base_model(str(pathlib.Path(args.base_model).expanduser()))
        tok = get_tokenizer(str(pathlib.Path(args.base_model).expanduser()))
    logging.getLogger(__name__).warning("serving an UNTRAINED hypernetwork (seed %d, init scale %s): its adapters "
                                        "are random", args.seed, args.init_scale)
    return D2LModel.from_base(base, tok, seed=args.seed, init_scaler_B=args.init_scale,
                              max_chunk_len=args.max_chunk_len)


def _bench(args) -> int:
    import importlib.util
    import subprocess

    bdir = benchmarks_dir()
    if not bdir.is_dir():
        raise CLIError(f"no benchmark suite at {str(bdir)!r}: the benchmarks ship with the source tree, not the "
                       "wheel; run d2l-fast from a source checkout (pip install -e .[dev])")
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise CLIError("the benchmarks need pytest-benchmark: pip install 'd2l_fast[bench]'")
    cmd = [sys.executable, "-m", "pytest", str(bdir), "--benchmark-only", *args.pytest_args]
    return subprocess.call(cmd)


def _compile_report_args(p) -> None:
    from .profiling.compile_report import add_arguments

    add_arguments(p)


def _compile_report(args) -> int:
    from .profiling.compile_report import run_cli

    return run_cli(args)


@contextlib.contextmanager
def _hf_progress_bars(show: bool):
    """transformers / huggingface_hub progress bars off unless ``show`` (the previous state is restored)."""
    if show:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


# errors a user can cause with arguments or files; anything else is a bug and keeps its traceback
_USER_ERRORS = (CLIError, ValueError, OSError)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="d2l-fast", description="Fast Doc-to-LoRA", allow_abbrev=False)
    p.add_argument("--traceback", action="store_true", help="show the Python traceback of an error")
    p.add_argument("--progress", action="store_true", help="show transformers' progress bars (off by default)")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo",
                       help="SmolLM2-135M + untrained hypernet: batch-internalize bundled docs, batched answers")
    d.add_argument("--n-docs", type=_positive_int, default=8)
    d.add_argument("--max-new-tokens", type=_positive_int, default=24)
    d.add_argument("--max-chunk-len", type=_positive_int, default=256)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--init-scale", type=float, default=2.0,
                   help="std of the random scaler_B "
                        "(0 = the reference init: every adapter is zero, i.e. the base model)")
    d.add_argument("--threads", type=int, default=0)
    d.set_defaults(fn=_demo, loads_models=True)
    pr = sub.add_parser("profile", help="torch.profiler breakdown of internalize + batched generate on SmolLM2")
    pr.add_argument("--n-docs", type=_positive_int, default=8)
    pr.add_argument("--max-new-tokens", type=_positive_int, default=8)
    pr.add_argument("--max-chunk-len", type=_positive_int, default=256)
    pr.add_argument("--latent-size", type=_positive_int, default=512)
    pr.add_argument("--num-blocks", type=_positive_int, default=9)
    pr.add_argument("--rows", type=_positive_int, default=15)
    pr.add_argument("--threads", type=int, default=0)
    pr.add_argument("--trace", help="also write chrome traces to TRACE.<stage>.json")
    pr.set_defaults(fn=_profile, loads_models=True)
    i = sub.add_parser("info", help="print a checkpoint's config")
    i.add_argument("checkpoint")
    i.add_argument("--subfolder")
    i.set_defaults(fn=_info)
    c = sub.add_parser("convert", help="reference pytorch_model.bin → pickle-free safetensors folder")
    c.add_argument("checkpoint")
    c.add_argument("output")
    c.add_argument("--subfolder")
    c.set_defaults(fn=_convert)
    n = sub.add_parser("internalize", help="documents (UTF-8 text files) → adapters.safetensors")
    n.add_argument("checkpoint")
    n.add_argument("documents", nargs="+")
    n.add_argument("-o", "--output", default="adapters.safetensors")
    n.add_argument("--base-model", help="local folder or Hub id (default: the one the checkpoint names)")
    n.add_argument("--subfolder")
    n.add_argument("--max-chunk-len", type=_positive_int, default=None)
    n.add_argument("--docs-per-call", type=_positive_int, default=None)
    n.set_defaults(fn=_internalize, loads_models=True)
    sub.add_parser("bench", help="run the benchmark suite from any folder: d2l-fast bench [pytest args]",
                   add_help=False).set_defaults(fn=_bench, pytest_args=[])
    e = sub.add_parser("export-peft", help="adapters.safetensors → PEFT LoRA folders (PEFT, vLLM, SGLang, LoRAX)")
    e.add_argument("--checkpoint", required=True, help="the D2L checkpoint that made the adapters")
    e.add_argument("--adapters", required=True, help="file written by `d2l-fast internalize` / AdapterBatch.save")
    e.add_argument("--out", required=True, help="output directory: one folder per document under it (the folder "
                   "itself with --compose)")
    e.add_argument("--index", type=int, nargs="+", help="documents to export (default: all)")
    e.add_argument("--names", nargs="+", help="folder names, one per --index (default: the documents' names)")
    e.add_argument("--compose", action="store_true", help="merge the documents into one adapter (ranks concatenated)")
    e.add_argument("--max-rank", type=int, help="refuse adapters above this rank (vLLM's --max-lora-rank)")
    e.add_argument("--dtype", choices=["same", "float32", "float16", "bfloat16"], default="same")
    e.add_argument("--base-model", help="local HF model folder for the module paths (default: the checkpoint's base)")
    e.add_argument("--subfolder")
    e.add_argument("--overwrite", action="store_true", help="replace existing PEFT folders")
    e.set_defaults(fn=_export_peft, loads_models=True)
    sv = sub.add_parser("serve", help="OpenAI-compatible document server: documents → adapters, batched chat")
    sv.add_argument("--checkpoint", help="trained D2L checkpoint: reference pytorch_model.bin or pickle-free folder")
    sv.add_argument("--base-model", help="local HF folder (default: the one the checkpoint names); with --untrained "
                    "also 'smollm2-135m'")
    sv.add_argument("--subfolder")
    sv.add_argument("--untrained", action="store_true", help="no checkpoint: a seeded random hypernetwork (demo)")
    sv.add_argument("--seed", type=int, default=0, help="--untrained: hypernetwork seed")
    sv.add_argument("--init-scale", type=float, default=2.0, help="--untrained: std of the random scaler_B")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--served-model-name", help="model id in /v1/models (default d2l-<base model name>)")
    sv.add_argument("--store", help="folder: one safetensors file per document, reloaded on restart")
    sv.add_argument("--adapter-memory-mb", type=float, default=1024.0, help="in-memory adapter budget (LRU)")
    sv.add_argument("--max-batch", type=_positive_int, default=16, help="rows decoded together")
    sv.add_argument("--max-queue", type=_positive_int, default=256, help="requests in flight before 429")
    sv.add_argument("--max-document-tokens", type=_positive_int, default=32768)
    sv.add_argument("--max-new-tokens", type=_positive_int, default=1024, help="upper bound of max_tokens")
    sv.add_argument("--max-body-mb", type=float, default=8.0, help="request body limit (413 beyond)")
    sv.add_argument("--max-chunk-len", type=_positive_int, default=None)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $D2L_API_KEY if set)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(fn=_serve, loads_models=True)
    cr = sub.add_parser("compile-report", help="compile every Triton kernel for a GPU arch (no GPU needed): "
                        "shared memory, registers, spills, MMA instruction")
    _compile_report_args(cr)
    cr.set_defaults(fn=_compile_report)
    # everything after "bench" goes to pytest unchanged (argparse would claim -k, -q, --co, ...)
    k = 0
    while k < len(argv) and argv[k] in ("--traceback", "--progress"):
        k += 1
    if k < len(argv) and argv[k] == "bench":
        args = p.parse_args(argv[: k + 1])
        args.fn, args.pytest_args = _bench, argv[k + 1 :]
    else:
        args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _hf_progress_bars(args.progress) if getattr(args, "loads_models", False) else contextlib.nullcontext():
            return args.fn(args)
    except _USER_ERRORS as e:
        if args.traceback:
            raise
        msg = str(e)
        if isinstance(e, OSError) and e.filename and e.strerror:
            msg = f"{e.filename}: {e.strerror}"
        print(f"d2l-fast {args.cmd}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"d2l-fast {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
