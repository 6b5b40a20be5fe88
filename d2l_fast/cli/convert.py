"""``d2l-fast convert CHECKPOINT OUTPUT``: the reference's pytorch_model.bin → a pickle-free safetensors folder."""

from __future__ import annotations

import pathlib

from ._common import CLIError, check_output_parent, load_checkpoint

NAME = "convert"


def add_parser(sub):
    c = sub.add_parser(NAME, help="reference pytorch_model.bin → pickle-free safetensors folder")
    c.add_argument("checkpoint")
    c.add_argument("output")
    c.add_argument("--subfolder")
    c.set_defaults(fn=run)
    return c


def run(args) -> int:
    from ..checkpoint import save_checkpoint

    out = pathlib.Path(args.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"output {str(out)!r} exists and is not a folder")
    check_output_parent(out)
    ck = load_checkpoint(args.checkpoint, subfolder=args.subfolder)
    out = save_checkpoint(ck, out)
    print(f"wrote {out} (d2l_config.json + hypernet.safetensors)")
    return 0
