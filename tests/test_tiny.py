"""The test fixtures of tests/_tiny.py: tiny random models and tokenizers with arch-style chat templates."""

import json

import pytest
import torch

from d2l_fast.packing import compact_chat_template

from . import _tiny
from ._tiny import TINY_ARCHS, TINY_VOCAB_SIZE, tiny_model, tiny_pair, tiny_tokenizer

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
    hits = _tiny._tiny_tokenizer_json.cache_info().hits
    again = tiny_tokenizer("gemma2")
    assert _tiny._tiny_tokenizer_json.cache_info().hits == hits + 1, "the trained tokenizer is cached in-process"
    assert again is not tok and again.get_vocab() == tok.get_vocab()


def test_tiny_gemma2_template_is_the_reference_template(golden_dir):
    cfg = json.loads((golden_dir / "tiny-gemma2" / "tokenizer_config.json").read_text())
    # the reference deletes runs of four spaces and newlines from the template source
    assert compact_chat_template(cfg["chat_template"]) == tiny_tokenizer("gemma2").chat_template
