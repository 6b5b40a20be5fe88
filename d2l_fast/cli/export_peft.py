"""``d2l-fast export-peft``: adapters.safetensors → PEFT LoRA folders (PEFT, vLLM, SGLang, LoRAX)."""

from __future__ import annotations

from ._common import load_checkpoint

NAME = "export-peft"


def add_parser(sub):
    e = sub.add_parser(NAME, help="adapters.safetensors → PEFT LoRA folders (PEFT, vLLM, SGLang, LoRAX)")
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
    e.set_defaults(fn=run, loads_models=True)
    return e


def run(args) -> int:
    import torch

    from ..adapters import AdapterBatch
    from ..export import export_peft

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
