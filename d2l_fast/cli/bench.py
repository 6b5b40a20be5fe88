"""``d2l-fast bench [pytest args]``: the benchmark suite of the source tree, from any folder."""

from __future__ import annotations

import sys

from ._common import CLIError, benchmarks_dir

NAME = "bench"


def add_parser(sub):
    b = sub.add_parser(NAME, help="run the benchmark suite from any folder: d2l-fast bench [pytest args]",
                       add_help=False)
    b.set_defaults(fn=run, pytest_args=[])
    return b


def run(args) -> int:
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
