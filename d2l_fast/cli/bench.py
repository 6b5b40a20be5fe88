"""``d2l-fast bench [pytest args]``: the benchmark suite of the source tree, from any folder."""

from __future__ import annotations

import sys

from ._common import CLIError, benchmarks_dir

NAME = "bench"

USAGE = """usage: d2l-fast bench [pytest args]

Run d2l_fast's benchmark suite (benchmarks/ of the source tree) from any folder, with pytest-benchmark
(--benchmark-only is added). Every argument is passed to pytest unchanged.

examples:
  d2l-fast bench                              the whole suite
  d2l-fast bench -k segmented                 only the benchmarks whose name matches
  d2l-fast bench --collect-only -q            list the benchmarks without running them
  d2l-fast bench --benchmark-json out.json    save the timings as JSON

needs: a source checkout (pip install -e .[dev]) and pytest-benchmark (pip install 'd2l_fast[bench]').
"""


def add_parser(sub):
    b = sub.add_parser(NAME, help="run the benchmark suite from any folder: d2l-fast bench [pytest args]",
                       add_help=False)
    b.set_defaults(fn=run, pytest_args=[])
    return b


def run(args) -> int:
    import importlib.util
    import subprocess

    wants_help = any(a in ("-h", "--help") for a in args.pytest_args)
    if wants_help:  # d2l-fast's own usage first; pytest's options (which all work here) after it
        print(USAGE, flush=True)
    bdir = benchmarks_dir()
    if not bdir.is_dir():
        raise CLIError(f"no benchmark suite at {str(bdir)!r}: the benchmarks ship with the source tree, not the "
                       "wheel; run d2l-fast from a source checkout (pip install -e .[dev])")
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise CLIError("the benchmarks need pytest-benchmark: pip install 'd2l_fast[bench]'")
    if wants_help:
        print("pytest's own options (all accepted by d2l-fast bench):\n", flush=True)
    cmd = [sys.executable, "-m", "pytest", str(bdir), "--benchmark-only", *args.pytest_args]
    return subprocess.call(cmd)
