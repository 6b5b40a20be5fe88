"""Ahead-of-time compile report of every Triton kernel variant, for a CUDA architecture, without a GPU.

``d2l-fast compile-report [--arch sm_90] [--quick] [--json PATH]``

How the configs are found: the real host launchers (``segmented_lora_fwd`` / ``segmented_lora_bwd`` and the
public ``latent_readout``) run on ``meta`` tensors of the real shapes (so no memory is used and no math is
done) while ``fn[grid](...)`` of every Triton kernel is intercepted: instead of launching, the call is turned
into the exact compile signature Triton's own launcher would build (its binder and argument packer, with the
target backend), so the report always follows what ``pick_config`` selects today. Launchers that ask for the
device get a stand-in CUDA device of the target (``--sms`` SMs). Each distinct signature is then compiled
with ``triton.compile`` for the target and read back:

* shared memory (``metadata.shared``; the H100 limit is 227 KB per block),
* registers and spill bytes (``cuobjdump -res-usage``: ``REG``, ``STACK``; local loads/stores ``LDL``/``STL``
  counted in the SASS),
* the instruction the dots lower to (TTGIR ``warp_group_dot`` = wgmma, ``nvidia_mma`` ``versionMajor = 2`` =
  mma.sync, a ``tt.dot`` with neither = FMA; kernels without ``tl.dot`` are marked ``none (no dot)``),
* an analytic count of the global bytes each kernel moves (L2 requests: every tile a program loads or stores,
  masked-off rows and ranks excluded, no credit for cache hits) against the minimum for the op (every operand
  read once, every output written once); the op total over its kernels is checked against 1.5x.

Exit status: 0 when every bf16 / fp16 / tf32 config compiles with no spill, no FMA fallback for ``tl.dot``
and at most 227 KB of shared memory; 1 otherwise (fp32-``ieee`` configs are reported, never failing);
3 when Triton cannot compile for CUDA on this machine.

This module is the command (``add_arguments``, ``run_cli``, ``main``); :mod:`.capture` finds and compiles the
configs, :mod:`.report` counts bytes, checks and renders; :mod:`.shapes` holds the model shapes. The names of
those modules stay importable from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

from .capture import (  # noqa: F401  (re-exported: importable from this module as before the split)
    DECODE_ROWS,
    DTYPES,
    MODELS,
    PREFILL_DOCS,
    PREFILL_LEN,
    RANKS,
    READOUT_CONFIGS,
    SMALL_PREFILL_LEN,
    SMALL_PREFILL_ROWS,
    SMEM_LIMIT,
    Launch,
    Scenario,
    _target,
    build_scenarios,
    capture,
    compile_all,
    compile_one,
)
from .report import (  # noqa: F401  (re-exported, as above)
    RATIO_LIMIT,
    Report,
    _check,
    _gating,
    assemble,
    format_ops,
    format_table,
    kernel_bytes,
    op_min_bytes,
    run_report,
)
from .shapes import MODEL_SHAPES

__all__ = ["MODELS", "RANKS", "READOUT_CONFIGS", "DTYPES", "run_report", "main"]

EXIT_TOOLCHAIN = 3


def _toolchain_ok() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.compiler import make_backend

        make_backend(_target("sm_90"))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
        return "triton's bundled ptxas is missing"
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sm_90", help="CUDA architecture to compile for (default sm_90: H100/H200)")
    p.add_argument("--sms", type=int, default=132, help="SM count launchers see for the target (default 132)")
    p.add_argument("--quick", action="store_true",
                   help="a small subset: Gemma-2-2b, bf16, rank 16, forward only, one readout")
    p.add_argument("--json", metavar="PATH", help="also write every row and op total as JSON")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")


def _needs_clean_process() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    mod = sys.modules.get("d2l_fast.kernels.segmented_lora.kernel")
    return mod is not None and type(getattr(mod, "_lora_fused_fwd_kernel", None)).__name__ != "JITFunction"


def run_cli(args) -> int:
    """Entry point of ``d2l-fast compile-report``: prints the tables, writes JSON, returns the exit status."""
    if args.jobs < 1 or args.sms < 1:
        raise SystemExit(f"--jobs and --sms must be >= 1, got {args.jobs} and {args.sms}")
    _target(args.arch)  # validates --arch before any work
    if _needs_clean_process():
        # the kernels must be imported as compiled (not interpreted) functions: rerun in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = [sys.executable, "-m", "d2l_fast.profiling.compile_report", "--arch", args.arch, "--sms", str(args.sms),
                "--jobs", str(args.jobs)] + (["--quick"] if args.quick else []) + (
            ["--json", args.json] if args.json else [])
        print("compile-report: TRITON_INTERPRET is set here; running in a clean subprocess", file=sys.stderr)
        return subprocess.call(argv, env=env)
    problem = _toolchain_ok()
    if problem:
        print(f"compile-report: triton cannot compile for CUDA here ({problem})", file=sys.stderr)
        return EXIT_TOOLCHAIN
    own_cache = "TRITON_CACHE_DIR" not in os.environ
    with tempfile.TemporaryDirectory(prefix="d2l-compile-report-") as cache:
        if own_cache:
            os.environ["TRITON_CACHE_DIR"] = cache
        try:
            rep = run_report(args.arch, args.quick, args.jobs, args.sms)
        finally:
            if own_cache:
                os.environ.pop("TRITON_CACHE_DIR", None)
    print(f"compile report for {rep.arch} (triton {_triton_version()}): {len(rep.rows)} launches, "
          f"{rep.n_compiled} distinct kernels compiled in {rep.seconds} s")
    legend = ", ".join(f"{m.tag} {m.name}" for m in MODEL_SHAPES.values())
    print(f"models: {legend} (down_proj: d_in = intermediate); "
          f"op shapes are segments x tokens, one adapter per segment (decode: {DECODE_ROWS} distinct adapters); "
          "readout * = the form mode='auto' picks")
    print("bytes/min: global bytes this kernel loads + stores (L2 requests, no credit for cache reuse) / minimum "
          "bytes of its whole op (operands read once, outputs written once)\n")
    print(format_table(rep))
    print("\nop bytes (sum over the op's kernels) / minimum; ! = over 1.5x\n")
    print(format_ops(rep))
    notes = sorted({r["note"] for r in rep.rows if r["note"]})
    for n in notes:
        print(f"note: {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(rep) | {"triton": _triton_version()}, f, indent=1, default=str)
    if rep.failures:
        print(f"\n{len(rep.failures)} gating (bf16 / fp16 / tf32) launches FAIL:")
        for msg in sorted(set(rep.failures)):
            print(f"  {msg}")
        return 1
    print("\nall bf16 / fp16 / tf32 configs: no spills, tensor-core MMA for every tl.dot, shared memory <= 227 KB")
    return 0


def _triton_version() -> str:
    import triton

    return triton.__version__


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="d2l-fast compile-report", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
