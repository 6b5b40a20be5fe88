"""``d2l-fast`` command line: one module per command (``d2l_fast.cli.<command>``, each with ``add_parser(sub)``
and ``run(args)``).

User errors (missing or unreadable files, bad UTF-8, a missing output folder, a bad checkpoint, a base model
that is neither a local folder nor reachable on the Hub) end with one ``d2l-fast <cmd>: error: ...`` line on
stderr and exit status 1; ``--traceback`` shows the Python traceback instead. Files are checked before any
model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from . import (
    ask,
    bench,
    compile_report,
    convert,
    demo,
    eval,
    export_peft,
    gen_data,
    info,
    internalize,
    profile,
    serve,
    train,
    view,
)
from ._common import USER_ERRORS, CLIError, benchmarks_dir, hf_progress_bars

COMMANDS = (demo, ask, profile, info, convert, internalize, bench, export_peft, serve, compile_report, gen_data,
            eval, train, view)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2l-fast", description="Fast Doc-to-LoRA", allow_abbrev=False)
    from .. import __version__

    p.add_argument("--version", action="version", version=f"d2l-fast {__version__}")
    p.add_argument("--traceback", action="store_true", help="show the Python traceback of an error")
    p.add_argument("--progress", action="store_true", help="show transformers' progress bars (off by default)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    # everything after "bench" goes to pytest unchanged (argparse would claim -k, -q, --co, ...)
    k = 0
    while k < len(argv) and argv[k] in ("--traceback", "--progress"):
        k += 1
    if k < len(argv) and argv[k] == bench.NAME:
        args = p.parse_args(argv[: k + 1])
        args.fn, args.pytest_args = bench.run, argv[k + 1 :]
        return args
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with hf_progress_bars(args.progress) if getattr(args, "loads_models", False) else contextlib.nullcontext():
            return args.fn(args)
    except USER_ERRORS as e:
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


__all__ = ["CLIError", "benchmarks_dir", "build_parser", "main"]
