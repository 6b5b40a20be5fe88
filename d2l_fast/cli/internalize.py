"""``d2l-fast internalize CHECKPOINT DOC...``: documents (UTF-8 text files) → adapters.safetensors."""

from __future__ import annotations

import os
import pathlib
import time

from ._common import CLIError, check_output_parent, load_checkpoint, load_model, positive_int, read_documents

NAME = "internalize"


def add_parser(sub):
    n = sub.add_parser(NAME, help="documents (UTF-8 text files) → adapters.safetensors")
    n.add_argument("checkpoint")
    n.add_argument("documents", nargs="+")
    n.add_argument("-o", "--output", default="adapters.safetensors")
    n.add_argument("--base-model", help="local folder or Hub id (default: the one the checkpoint names)")
    n.add_argument("--subfolder")
    n.add_argument("--max-chunk-len", type=positive_int, default=None)
    n.add_argument("--docs-per-call", type=positive_int, default=None)
    n.set_defaults(fn=run, loads_models=True)
    return n


def run(args) -> int:
    out = pathlib.Path(args.output)
    if out.is_dir():
        raise CLIError(f"output {args.output!r} is a folder; expected a file name such as adapters.safetensors")
    check_output_parent(out)
    texts = read_documents(args.documents)
    ckpt = load_checkpoint(args.checkpoint, subfolder=args.subfolder)
    model = load_model(args, ckpt)
    t0 = time.perf_counter()
    adapters = model.internalize(texts, names=[os.path.basename(p) for p in args.documents],
                                 docs_per_call=args.docs_per_call)
    adapters.save(out)
    print(f"internalized {len(texts)} documents in {time.perf_counter() - t0:.2f} s → {out} (ranks {adapters.ranks})")
    return 0
