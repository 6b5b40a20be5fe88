"""``d2l-fast compile-report --quick``: the real launchers' configs compiled for sm_90 on this CPU machine."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from d2l_fast.profiling import compile_report as cr
from d2l_fast.profiling.shapes import mlp_seg_ranks

ROOT = pathlib.Path(__file__).resolve().parents[2]
MMA = {"wgmma", "mma.sync", "FMA", "none (no dot)"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_report") / "report.json"
    # conftest set TRITON_INTERPRET=1: the command must rerun itself in a clean process
    assert os.environ.get("TRITON_INTERPRET") == "1"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "d2l_fast.cli", "compile-report", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    if proc.returncode == cr.EXIT_TOOLCHAIN:
        pytest.skip(f"triton cannot compile for CUDA here: {proc.stderr.strip()}")
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_quick_report_compiles_clean_bf16_configs(quick_report):
    proc, data = quick_report
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "clean subprocess" in proc.stderr
    assert data["arch"] == "sm_90" and not data["failures"]
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"prefill-fwd", "decode-fwd", "mlp-prefill", "readout"}
    for r in rows:
        assert r["error"] is None, r
        assert r["dtype"] == "bf16" and r["model"] in ("gemma-2-2b", "main 16x256")
        assert 0 < r["regs"] <= 255 and r["spill"] == 0 and r["ldl"] == 0 and r["stl"] == 0
        assert isinstance(r["shared"], int) and r["shared"] <= cr.SMEM_LIMIT
        assert r["mma"] in MMA and r["mma"] != "FMA"
        assert r["num_warps"] in (1, 2, 4, 8, 16) and r["num_stages"] >= 1
        assert r["blocks"] and all(isinstance(v, int) and v >= 16 for v in r["blocks"].values())
        assert r["kernel_bytes"] > 0 and r["bytes_ratio"] == round(r["kernel_bytes"] / r["op_min_bytes"], 2)
    # the tl.dot kernels run on tensor cores
    assert any(r["mma"] in ("wgmma", "mma.sync") for r in rows if r["op"] == "prefill-fwd")
    assert any(r["mma"] in ("wgmma", "mma.sync") for r in rows if r["kernel"] == "readout_split")


def test_quick_report_byte_minimum_and_table(quick_report):
    proc, data = quick_report
    assert data is not None, proc.stdout + proc.stderr
    hidden, inter = cr.MODELS["gemma-2-2b"]
    T, r = cr.PREFILL_DOCS * cr.PREFILL_LEN, 16
    prefill = [o for o in data["ops"] if o["op"] == "prefill-fwd" and o["shape"] == "16x256"]
    assert len(prefill) == 1
    # x once, every adapter's A and B once, out read and written once (bf16)
    assert prefill[0]["min_bytes"] == 2 * (T * inter + cr.PREFILL_DOCS * r * (inter + hidden) + 2 * T * hidden)
    decode = [o for o in data["ops"] if o["op"] == "decode-fwd"][0]
    assert decode["min_bytes"] == 2 * (cr.DECODE_ROWS * (inter + r * (inter + hidden) + 2 * hidden))
    assert all(o["ratio"] > 0 for o in data["ops"])
    # the fused MLP LoRA: gate + up read and h written once, adapters once, y read and written once; <= 1.5x that
    mlp = [o for o in data["ops"] if o["op"] == "mlp-prefill"]
    assert len(mlp) == 1 and mlp[0]["kernels"] == ["gated_act_shrink", "lora_expand"]
    ranks = sum(mlp_seg_ranks(cr.PREFILL_DOCS))
    assert mlp[0]["min_bytes"] == 2 * (3 * T * inter + ranks * (inter + hidden) + 2 * T * hidden)
    assert mlp[0]["ratio"] <= cr.RATIO_LIMIT
    lines = proc.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("kernel "))
    for col in ("smem", "regs", "spill", "LDL/STL", "mma", "bytes/min", "status"):
        assert col in lines[header]
    table = lines[header + 2 : lines.index("", header)]
    assert len(table) == len(data["rows"]) >= 6  # one line per compiled config (2 kernels per two-pass op)
    assert all(ln.split()[-1] == "ok" for ln in table)


@pytest.mark.interpreter
def test_refuses_interpreted_kernels_in_process():
    # this process runs under TRITON_INTERPRET=1 (conftest): capturing here would record interpreter configs
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cr.capture(cr.build_scenarios(quick=True))


def test_bad_arch_is_rejected():
    with pytest.raises(ValueError, match="sm_90"):
        cr.main(["--arch", "gfx942", "--quick"])


def test_gate_rules():
    clean = dict(stack=0, ldl=0, stl=0, local=0, mma="wgmma", shared=1024)
    assert cr._check(clean) == [] and cr._check(dict(clean, mma="none (no dot)")) == []
    assert cr._check(dict(clean, stack=8, ldl=2))[0].startswith("spills")
    assert cr._check(dict(clean, mma="FMA")) == ["tl.dot lowered to FMA"]
    assert cr._check(dict(clean, shared=cr.SMEM_LIMIT + 1))[0].startswith("shared memory")
    assert cr._check({"error": "CompilationError: x"}) == ["compile failed: CompilationError: x"]
    # bf16 / fp16 / tf32 gate the exit status (with the dot-free fp32 kernels of a tf32 run); fp32-ieee never does
    assert cr._gating("bf16", "bf16") and cr._gating("fp16", "fp16") and cr._gating("fp32-tf32", "fp32-tf32")
    assert cr._gating("fp32", "fp32-tf32")
    assert not cr._gating("fp32-ieee", "fp32-ieee") and not cr._gating("fp32-ieee", "fp32-tf32")
    assert not cr._gating("fp32", "fp32-ieee")
