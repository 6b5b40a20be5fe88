"""``d2l-fast`` command line: demo, checkpoint info/convert, internalize, benchmarks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib import resources


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
    model = D2LModel.from_base(base, tok, seed=args.seed, init_scaler_B=args.init_scale, max_chunk_len=args.max_chunk_len)
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
    answers = model.generate_text(questions, adapters, adapter_index=list(range(len(docs))), max_new_tokens=args.max_new_tokens)
    t["generate (batched, one adapter per row)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_answers = model.generate_text(questions, None, max_new_tokens=args.max_new_tokens)
    t["generate (same batch, base model)"] = time.perf_counter() - t0
    for d, a, b in zip(docs, answers, base_answers):
        print(f"\n[{d['title']}] Q: {d['question']}\n  with adapter: {a}\n  base model:   {b}\n  reference answer: {d['answer']}")
    n_diff = sum(a != b for a, b in zip(answers, base_answers))
    print(f"\n{n_diff}/{len(docs)} answers differ from the base model's (random adapters, init scale {args.init_scale})")
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

    ck = load_checkpoint(args.checkpoint, subfolder=args.subfolder)
    out = save_checkpoint(ck, args.output)
    print(f"wrote {out} (d2l_config.json + hypernet.safetensors)")
    return 0


def _internalize(args) -> int:
    from . import D2LModel

    model = D2LModel.from_checkpoint(args.checkpoint, base_model=args.base_model, subfolder=args.subfolder,
                                     max_chunk_len=args.max_chunk_len)
    texts = [open(p, encoding="utf-8").read() for p in args.documents]
    t0 = time.perf_counter()
    adapters = model.internalize(texts, names=[os.path.basename(p) for p in args.documents], docs_per_call=args.docs_per_call)
    adapters.save(args.output)
    print(f"internalized {len(texts)} documents in {time.perf_counter() - t0:.2f} s → {args.output} (ranks {adapters.ranks})")
    return 0


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


def _bench(args) -> int:
    import subprocess

    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q", *args.pytest_args]
    return subprocess.call(cmd)


def _compile_report_args(p) -> None:
    from .profiling.compile_report import add_arguments

    add_arguments(p)


def _compile_report(args) -> int:
    from .profiling.compile_report import run_cli

    return run_cli(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="d2l-fast", description="Fast Doc-to-LoRA")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="SmolLM2-135M + untrained hypernet: batch-internalize bundled docs, batched answers")
    d.add_argument("--n-docs", type=int, default=8)
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.add_argument("--max-chunk-len", type=int, default=256)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--init-scale", type=float, default=2.0,
                   help="std of the random scaler_B (0 = the reference init: every adapter is zero, i.e. the base model)")
    d.add_argument("--threads", type=int, default=0)
    d.set_defaults(fn=_demo)
    pr = sub.add_parser("profile", help="torch.profiler breakdown of internalize + batched generate on SmolLM2")
    pr.add_argument("--n-docs", type=int, default=8)
    pr.add_argument("--max-new-tokens", type=int, default=8)
    pr.add_argument("--max-chunk-len", type=int, default=256)
    pr.add_argument("--latent-size", type=int, default=512)
    pr.add_argument("--num-blocks", type=int, default=9)
    pr.add_argument("--rows", type=int, default=15)
    pr.add_argument("--threads", type=int, default=0)
    pr.add_argument("--trace", help="also write chrome traces to TRACE.<stage>.json")
    pr.set_defaults(fn=_profile)
    i = sub.add_parser("info", help="print a checkpoint's config")
    i.add_argument("checkpoint")
    i.add_argument("--subfolder")
    i.set_defaults(fn=_info)
    c = sub.add_parser("convert", help="reference pytorch_model.bin → pickle-free safetensors folder")
    c.add_argument("checkpoint")
    c.add_argument("output")
    c.add_argument("--subfolder")
    c.set_defaults(fn=_convert)
    n = sub.add_parser("internalize", help="documents (text files) → adapters.safetensors")
    n.add_argument("checkpoint")
    n.add_argument("documents", nargs="+")
    n.add_argument("-o", "--output", default="adapters.safetensors")
    n.add_argument("--base-model")
    n.add_argument("--subfolder")
    n.add_argument("--max-chunk-len", type=int, default=None)
    n.add_argument("--docs-per-call", type=int, default=None)
    n.set_defaults(fn=_internalize)
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
    e.set_defaults(fn=_export_peft)
    b = sub.add_parser("bench", help="run the benchmark suite (pytest-benchmark)")
    b.add_argument("pytest_args", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_bench)
    cr = sub.add_parser("compile-report", help="compile every Triton kernel for a GPU arch (no GPU needed): "
                        "shared memory, registers, spills, MMA instruction")
    _compile_report_args(cr)
    cr.set_defaults(fn=_compile_report)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
