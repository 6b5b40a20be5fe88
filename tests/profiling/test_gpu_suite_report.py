"""scripts/gpu_suite.py's ``train`` section and scripts/bench_report.py's tables (issue 18, items 5 and 6), on the CPU.

Covered here: the train-step benchmark (benchmarks/e2e/bench_train_step.py) on a tiny random Gemma-2, and the suite's
command line without CUDA. Also the report of a gpu_suite.json written by the suite's own ``Suite`` with every
section in it. Its train and decode rows are run here on the CPU. The other rows come from the committed runs: the
H100 runs (lora, readout, e2e, profile) and the CPU internalize run. The mlp rows have no CPU path and no committed
run, so they are built here.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("pyarrow")

from benchmarks.e2e import bench_train_step as bts  # noqa: E402
from d2l_fast.profiling.shapes import MODEL_SHAPES  # noqa: E402
from tests._scripts import load_script  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
GiB = 2**30


@pytest.fixture(scope="module")
def tiny_run():
    """One run of the train section's code on a tiny Gemma-2 (CPU, fp32), with parameter snapshots around it."""
    d2l = bts.tiny_d2l(seed=0)
    hyper0 = {k: p.detach().clone() for k, p in d2l.hypernet.named_parameters()}
    base0 = {k: p.detach().clone() for k, p in d2l.base_model.named_parameters()}
    rows = list(bts.train_rows(d2l, pack=bts.TINY_PACK, reps=1))
    return types.SimpleNamespace(d2l=d2l, hyper0=hyper0, base0=base0, rows=rows)


# ------------------------------------------------------------------------------------------ the train step
def test_tiny_train_step_rows(tiny_run):
    d2l, rows, pack = tiny_run.d2l, {r["variant"]: r for r in tiny_run.rows}, bts.TINY_PACK
    assert set(rows) == set(bts.VARIANTS)
    # Liger needs CUDA: on the CPU the comparison run is skipped, saying why
    assert rows["ce_no_liger"]["status"].startswith("skipped: Liger not available")
    cfg = d2l.base_model.config
    for v in ("distill", "ce"):
        r = rows[v]
        assert r["section"] == "train" and r["device"] == "cpu" and r["dtype"] == "fp32"
        assert r["contexts"] == pack["n_ctx"] and r["qa_tokens"] == pack["n_ctx"] * pack["qa_len"]
        assert r["tokens"] == pack["n_ctx"] * (pack["ctx_len"] + pack["qa_len"]) == r["ctx_tokens"] + r["qa_tokens"]
        assert r["loss_finite"] and math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["loss"] > 0
        assert r["loss"] == pytest.approx(r["task_loss"] + 0.1 * r["l1"], rel=1e-5)  # gen_lora_l1_reg_coef 0.1
        assert r["param_change"] > 0
        for k in ("step_ms", "first_step_ms", "tokens_per_s"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), k
        assert len(r["step_ms_all"]) == 1
        assert r["peak_mem_GiB"] is None and r["mem_before_GiB"] is None  # CUDA only
        # the reference's per-token copies (spec §1.8) from the model's own widths: fp32 here, one chunk + bias
        R = 2 * d2l.spec.lora_r
        per_layer = r["qa_tokens"] * R * (cfg.intermediate_size + cfg.hidden_size) * 4
        assert r["ref_R"] == R and r["ref_layers"] == cfg.num_hidden_layers
        assert r["ref_copy_GiB"] == pytest.approx(per_layer * cfg.num_hidden_layers / GiB, rel=1e-12)
        assert r["loss_path"] == "torch_chunked" and r["liger_calls"] == 0 and r["liger_reason"]
    assert "hard targets" in rows["distill"]["liger_reason"]
    assert rows["ce"]["liger_reason"] == bts.liger_unavailable(torch.device("cpu"))
    assert rows["distill"]["objective"] == "distill" and rows["ce"]["average"] == "token"
    assert rows["distill"]["loss"] != rows["ce"]["loss"]


def test_tiny_train_step_updates_only_the_hypernetwork(tiny_run):
    d2l = tiny_run.d2l
    moved = [k for k, p in d2l.hypernet.named_parameters() if not torch.equal(p.detach(), tiny_run.hyper0[k])]
    assert "head.weight" in moved and len(moved) > len(tiny_run.hyper0) // 2
    assert all(torch.equal(p.detach(), tiny_run.base0[k]) for k, p in d2l.base_model.named_parameters())
    assert all(torch.isfinite(p).all() for p in d2l.hypernet.parameters())


def test_reference_estimate_matches_spec_1_8():
    """The §1.8 table: Gemma-2-2b down_proj, bf16: 4096 tokens at R 16 → 1.41 GiB per layer, 36.6 GiB for 26 layers;
    the chunk stage (1024 tokens, 8 chunks → R 72) → 1.58 / 41.1 GiB."""
    s = MODEL_SHAPES["gemma-2-2b"]
    spec = types.SimpleNamespace(lora_r=8, target_modules=("down_proj",), d_in={"down_proj": s.intermediate},
                                 d_out={"down_proj": s.hidden}, layer_indices=tuple(range(26)))
    main = bts.reference_copy_estimate(spec, 4096, 1, 2)
    assert main["ref_R"] == 16 and round(main["ref_copy_GiB_per_layer"], 2) == 1.41
    assert round(main["ref_copy_GiB"], 1) == 36.6
    chunk = bts.reference_copy_estimate(spec, 1024, 8, 2)
    assert chunk["ref_R"] == 72 and round(chunk["ref_copy_GiB_per_layer"], 2) == 1.58
    assert round(chunk["ref_copy_GiB"], 1) == 41.1
    with pytest.raises(ValueError, match="bytes_per_el 2 or 4, got 4096, 1, 3"):
        bts.reference_copy_estimate(spec, 4096, 1, 3)


def test_bad_inputs_are_refused(tmp_path, tiny_run):
    with pytest.raises(ValueError, match="n_ctx must be a positive int, got 0"):
        bts.write_pack(tmp_path / "p.parquet", n_ctx=0, ctx_len=4, qa_len=4, answer_len=2, topk=2, vocab=16)
    with pytest.raises(ValueError, match="answer_len < qa_len.*answer_len 4, qa_len 4"):
        bts.write_pack(tmp_path / "p.parquet", n_ctx=1, ctx_len=4, qa_len=4, answer_len=4, topk=2, vocab=16)
    with pytest.raises(ValueError, match=r"variants must be a non-empty selection of .*got \['sft'\]"):
        next(bts.train_rows(tiny_run.d2l, variants=("sft",)))
    with pytest.raises(ValueError, match="pack must have the keys"):
        next(bts.train_rows(tiny_run.d2l, pack={"n_ctx": 2}))
    with pytest.raises(ValueError, match="reps must be a positive int, got 0"):
        next(bts.train_rows(tiny_run.d2l, reps=0))


def test_tiny_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = ROOT / "benchmarks" / "e2e" / "bench_train_step.py"
    out = tmp_path / "rows.json"
    p = subprocess.run([sys.executable, str(script), "--tiny", "--variants", "ce", "--reps", "1", "--json", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["ce"] and rows[0]["loss_finite"] and rows[0]["param_change"] > 0
    assert "variant=ce" in p.stdout
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 2 and "--only env,train" in p.stderr and "--tiny" in p.stderr


# ------------------------------------------------------------------------------------------ the suite's command line
def test_gpu_suite_lists_train_and_needs_cuda(capsys):
    gs = load_script("gpu_suite")
    assert gs.SECTIONS[-1] == "train" and {"internalize", "decode", "train"} <= set(gs.SECTIONS)
    with pytest.raises(SystemExit) as e:
        gs.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "  train " in help_text and "bench_train_step.py" in help_text and "decode,train" in help_text
    with pytest.raises(SystemExit) as e:
        gs.main(["--only", "train,bogus"])
    assert e.value.code == 2 and "unknown section(s) ['bogus']" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("with CUDA, --only train runs the section (the GPU script's job)")
    assert gs.main(["--only", "train", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "bench_train_step.py --tiny" in err


# ------------------------------------------------------------------------------------------ the report
def _mlp_rows():
    """The rows bench_fused_mlp.suite_rows yields (it has no CPU path); times in µs."""
    rows = []
    for case, base, fused, unfused in (("mlp16x256/gemma-2-2b", 400.0, 430.0, 520.0),
                                       ("mlp16x256/qwen3-4b", 500.0, 560.0, 640.0)):
        for prov, us in (("base", base), ("fused", fused), ("unfused", unfused), ("act_only", 20.0),
                         ("gated_shrink_only", 31.0)):
            rows.append(dict(section="mlp", case=case, provider=prov, us=us, rel_err=None, graph_us=None))
        rows.append(dict(section="mlp_summary", case=case, fused_vs_bare=fused / base, unfused_vs_bare=unfused / base,
                         target_met=fused <= 1.10 * base, gated_shrink_vs_act=31.0 / 20.0))
    return rows


def test_report_renders_every_section(tiny_run, tmp_path, capsys):
    from benchmarks.serving.bench_static_decode import decode_rows
    from tests._tiny import tiny_tokenizer

    for f in ("gpu_suite_h100_run2.json", "gpu_suite_h100_run4.json", "encoder_attention_cpu.json"):
        if not (RESULTS / f).exists():
            pytest.skip("the committed results ship with the source tree only")
    gs, br = load_script("gpu_suite"), load_script("bench_report")
    run2, run4 = (json.loads((RESULTS / f).read_text()) for f in ("gpu_suite_h100_run2.json",
                                                                   "gpu_suite_h100_run4.json"))
    internalize = [r for r in json.loads((RESULTS / "encoder_attention_cpu.json").read_text())
                   if r["section"] != "env"]
    decode = [dict(section="decode", **r) for r in decode_rows(tiny_run.d2l, n_rows=2, new=2, prompt_len=3,
                                                               tokenizer=tiny_tokenizer("gemma2"))]
    by_section = {
        "lora": [r for r in run4["rows"] if r["section"].startswith("lora")],
        "mlp": _mlp_rows(),
        "readout": [r for r in run2["rows"] if r["section"] == "readout"],
        "internalize": internalize,
        "e2e": [r for r in run4["rows"] if r["section"] in ("e2e", "profile")],
        "decode": decode,
        "train": tiny_run.rows,
    }
    S = gs.Suite(str(tmp_path), budget_s=1e6)
    S.data["env"] = run4["env"]
    S.data["tests"] = run4["tests"]
    for name in gs.SECTIONS:
        if name in by_section:
            S.section(name, lambda rows=by_section[name]: [S.row(**r) for r in rows])
    S.section("env", lambda: 1 / 0)  # a failing section shows up in the status table
    S.row(section="later_section", what="a section the report has no table for", value=1.5)
    S.save()
    capsys.readouterr()
    br.main([str(tmp_path / "gpu_suite.json")])
    md = capsys.readouterr().out
    assert "| env | error: ZeroDivisionError: division by zero |" in md and "sections with errors: 1" in md
    for name in by_section:
        assert f"| {name} | ok |" in md, name
    assert "| prefill16x256/gemma2-2b-down |" in md  # lora
    assert "| mlp16x256/gemma-2-2b | 400.0 | 430.0 (1.075) | 520.0 (1.300) | 1.55 | met |" in md
    assert "| mlp16x256/qwen3-4b | 500.0 | 560.0 (1.120) |" in md and "| not met |" in md
    assert "| main-26x2000 | d2l_fast_auto |" in md  # readout
    summary = next(r for r in internalize if r["section"] == "internalize_summary")
    assert f"| 1doc_2k | {summary['n_tokens']} | {summary['today_vs_bare']:.2f} |" in md
    flex = {r["step"]: r for r in internalize if r.get("attention") == "flex"}
    assert f"| 1doc_2k | flex | {flex['bare']['ms']:.2f} | {flex['encode']['ms']:.2f} |" in md
    assert "- internalize agreement_1doc_2k: " in md
    assert "| generate_ratio | d2l_vs_base_tokens_per_s 0.8111 |" in md  # e2e
    assert "| **internalize_1doc_2k** | all (8225 kernels) |" in md  # profile
    for r in (r for r in decode if "tokens_per_s" in r):
        assert f"| {r['mode']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.2f} |" in md
    assert any(f"| static_eager | {r['speedup_vs_dynamic']:.2f} |" in md for r in decode if "speedup_vs_dynamic" in r)
    for r in (r for r in tiny_run.rows if "status" not in r):
        assert (f"| {r['variant']} | {r['objective']} / {r['average']} | {r['ctx_tokens']} + {r['qa_tokens']} "
                f"({r['contexts']}) | {r['step_ms']:.1f} ({r['first_step_ms']:.0f}) | {r['tokens_per_s']:.0f} | "
                f"– (–) | torch_chunked | {r['ref_R']}: ") in md
        assert f"- `{r['variant']}`: no Liger: {r['liger_reason']}" in md
    assert "| ce_no_liger | skipped: Liger not available" in md
    assert "| later_section | result |" in md and "what a section the report has no table for, value 1.5" in md
