"""d2l_fast.profiling.shapes: the one definition of the model shapes that the benchmarks, the GPU suite and the
compile report share, and the segmented-LoRA benchmark batches built from it."""

import ast
import pathlib

import pytest

from d2l_fast.profiling import capture, compile_report, shapes

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_model_shapes_feed_the_compile_report_and_the_benchmark_labels():
    assert compile_report.MODELS == {m.name: (m.hidden, m.intermediate) for m in shapes.MODEL_SHAPES.values()}
    assert shapes.LORA_SHAPES["gemma2-2b-down"] == (9216, 2304)  # down_proj: d_in = intermediate, d_out = hidden
    for m in shapes.MODEL_SHAPES.values():
        assert shapes.LORA_SHAPES[m.lora_label] == (m.intermediate, m.hidden) == m.down_proj
    assert len({m.tag for m in shapes.MODEL_SHAPES.values()}) == len(shapes.MODEL_SHAPES)
    main = [c for c in capture.READOUT_CONFIGS if c[0].startswith("main")][0]
    r = shapes.READOUT_MAIN
    assert main[1:6] == (r.n_q, r.n_heads, r.head_dim, r.n_kv_heads, r.d_model)
    assert (compile_report.PREFILL_DOCS, compile_report.PREFILL_LEN) == (shapes.PREFILL_DOCS, shapes.PREFILL_TOKENS)


def test_lora_cases_are_well_formed_and_reproducible():
    cases = shapes.lora_cases(long_decode=True)
    assert len(cases) == 5 * len(shapes.LORA_SHAPES)
    assert cases == shapes.lora_cases(long_decode=True)  # seeded: every caller gets the same batches
    for c in cases:
        assert len(c.seq_lens) == len(c.seg_adapter) and all(0 <= a < len(c.ranks) for a in c.seg_adapter)
        assert (c.d_in, c.d_out) == shapes.LORA_SHAPES[c.shape] and c.name.endswith("/" + c.shape)
    pre = [c for c in cases if c.kind == "prefill"]
    assert all(c.name.startswith("prefill16x256/") and c.seq_lens == (256,) * 16 for c in pre)
    assert all(set(c.ranks) <= set(shapes.PREFILL_RANKS) for c in pre)
    shared = [c for c in cases if c.kind == "decode-shared"]
    assert all(sorted(set(c.seg_adapter)) == [0, 1, 2, 3] for c in shared)
    cpu = shapes.lora_cases(["smollm2-down"], prefill_tokens={"smollm2-down": 32})
    assert [c.name for c in cpu] == ["prefill/smollm2-down", "decode64-distinct/smollm2-down",
                                     "decode64-shared4/smollm2-down"]
    assert cpu[0].seq_lens == (32,) * 16 and cpu[0].ranks == pre[0].ranks


def test_lora_cases_refuse_unknown_shapes_and_missing_token_counts():
    with pytest.raises(ValueError, match=r"unknown shape label\(s\) \['llama-down'\]"):
        shapes.lora_cases(["llama-down"])
    with pytest.raises(ValueError, match="prefill_tokens must give a positive int for every shape"):
        shapes.lora_cases(prefill_tokens={"smollm2-down": 32})
    with pytest.raises(ValueError, match="prefill_tokens"):
        shapes.lora_cases(["smollm2-down"], prefill_tokens={"smollm2-down": 0})


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_benchmarks_and_gpu_suite_take_their_shapes_from_the_package():
    for rel in ("benchmarks/ops/bench_segmented_lora.py", "benchmarks/ops/bench_latent_readout.py",
                "scripts/gpu_suite.py"):
        path = ROOT / rel
        if not path.exists():
            pytest.skip("the benchmarks and scripts ship with the source tree only")
        assert "d2l_fast.profiling.shapes" in _imports(path), rel
    assert not (ROOT / "benchmarks" / "shapes.py").exists()


def test_benchmark_suites_import_only_the_package_and_their_shared_module():
    bench = ROOT / "benchmarks"
    if not bench.is_dir():
        pytest.skip("the benchmarks ship with the source tree only")
    for path in bench.rglob("*.py"):
        src = path.read_text()
        assert "sys.path.insert" not in src and "sys.path.append" not in src, path
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: only the shared module
                assert node.module == "_common" and node.level == 2, (path, node.module)
                assert all(not a.name.startswith("_") for a in node.names), path
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("bench_", "benchmarks", "shapes")), (path, node.module)


def test_mlp_batch_ranks_and_activations():
    ranks = shapes.mlp_seg_ranks(16)
    assert len(ranks) == 16 and min(ranks) == 8 and max(ranks) == 72 and set(ranks) == set(shapes.MLP_RANKS)
    assert shapes.mlp_activation("gemma-2-2b") == "gelu_tanh"
    assert {shapes.mlp_activation(m) for m in ("qwen3-4b", "mistral-7b", "smollm2-135m")} == {"silu"}
    with pytest.raises(ValueError, match="unknown model"):
        shapes.mlp_activation("gpt2")
    with pytest.raises(ValueError, match="n_docs must be an int >= 0"):
        shapes.mlp_seg_ranks(-1)
