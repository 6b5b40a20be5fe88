"""``d2l-fast compile-report``: every Triton kernel compiled for a GPU arch (no GPU needed)."""

from __future__ import annotations

NAME = "compile-report"


def add_parser(sub):
    from ..profiling.compile_report import add_arguments

    cr = sub.add_parser(NAME, help="compile every Triton kernel for a GPU arch (no GPU needed): "
                        "shared memory, registers, spills, MMA instruction")
    add_arguments(cr)
    cr.set_defaults(fn=run)
    return cr


def run(args) -> int:
    from ..profiling.compile_report import run_cli

    return run_cli(args)
