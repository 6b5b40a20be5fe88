"""``d2l-fast info CHECKPOINT``: a checkpoint's config and parameter count as JSON."""

from __future__ import annotations

import json

from ._common import load_checkpoint

NAME = "info"


def add_parser(sub):
    i = sub.add_parser(NAME, help="print a checkpoint's config")
    i.add_argument("checkpoint", help="a checkpoint folder, a pytorch_model.bin, or a Hub id (with --subfolder)")
    i.add_argument("--subfolder")
    i.set_defaults(fn=run)
    return i


def run(args) -> int:
    ck = load_checkpoint(args.checkpoint, subfolder=args.subfolder)
    n = sum(v.numel() for v in ck.state_dict.values())
    print(json.dumps({"source": ck.source, "parameters": n, "spec": ck.spec.to_dict()}, indent=1))
    return 0
