"""Drop-in paths a reference user takes: from_state_dict inputs, base_model_kwargs, get_head_bias, tokenizer-less
base folders, the chat templates of the published models (from any working directory), own-format reloads."""

import json
import re
import shutil

import pytest
import torch

import d2l_fast
from d2l_fast import D2LModel, ModulatedPretrainedModel, get_tokenizer, load_checkpoint
from d2l_fast.checkpoint import save_reference_checkpoint
from d2l_fast.packing import PACKAGED_TEMPLATES, context_affixes, render_context, tokenize_context, tokenize_prompt

from ._tiny import tiny_tokenizer

BASE_FILES = ("config.json", "generation_config.json", "model.safetensors")


@pytest.fixture(scope="module")
def ckpt_path(golden_dir):
    return golden_dir / "pytorch_model.bin"


@pytest.fixture(scope="module")
def bare_base(golden_dir, tmp_path_factory):
    """The golden base folder without any tokenizer file."""
    d = tmp_path_factory.mktemp("bare") / "tiny-gemma2"
    d.mkdir()
    for f in BASE_FILES:
        (d / f).symlink_to(golden_dir / "tiny-gemma2" / f)
    return d


def _same_hypernet(a, b):
    sa, sb = a.hypernet.state_dict(), b.hypernet.state_dict()
    assert set(sa) == set(sb)
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_from_state_dict_accepts_loaded_checkpoint_path_and_dict(ckpt_path, bare_base):
    kw = dict(train=False, use_sequence_packing=False, base_model=bare_base)
    loaded = ModulatedPretrainedModel.from_state_dict(load_checkpoint(ckpt_path), **kw)
    by_path = ModulatedPretrainedModel.from_state_dict(ckpt_path, **kw)
    by_str = ModulatedPretrainedModel.from_state_dict(str(ckpt_path), **kw)
    sd = load_checkpoint(ckpt_path).to_reference_state_dict()
    by_dict = ModulatedPretrainedModel.from_state_dict(sd, **kw)
    assert _same_hypernet(loaded, by_path) and _same_hypernet(loaded, by_str) and _same_hypernet(loaded, by_dict)
    assert not loaded.training
    with pytest.raises(TypeError, match="state dict, a LoadedCheckpoint or a path"):
        ModulatedPretrainedModel.from_state_dict(42, **kw)


def test_base_model_kwargs_dtype(ckpt_path, bare_base):
    ck = load_checkpoint(ckpt_path)
    for key in ("dtype", "torch_dtype"):
        m = ModulatedPretrainedModel.from_state_dict(ck, train=False, base_model=bare_base,
                                                     base_model_kwargs={key: torch.bfloat16})
        assert m.d2l.base_dtype == torch.bfloat16
        assert m.hypernet.head.weight.dtype == torch.float32  # the hypernetwork stays fp32, as in the reference
    with pytest.raises(ValueError, match="conflicts with dtype"):
        D2LModel.from_checkpoint(ck, base_model=bare_base, dtype=torch.float32,
                                 base_model_kwargs={"dtype": torch.bfloat16})


def test_get_head_bias_is_the_bias_lora(ckpt_path, bare_base):
    m = ModulatedPretrainedModel.from_state_dict(load_checkpoint(ckpt_path), train=False, base_model=bare_base)
    bias = m.hypernet.get_head_bias()
    assert set(bias) == {"down_proj"}
    assert bias["down_proj"]["A"] is m.hypernet.bias_A["down_proj"]
    assert bias["down_proj"]["B"] is m.hypernet.bias_B["down_proj"]
    assert tuple(bias["down_proj"]["A"].shape) == (4, 8, 256) and tuple(bias["down_proj"]["B"].shape) == (4, 8, 64)


def test_tokenizer_less_base_folder(ckpt_path, bare_base, golden_dir):
    """Built without a tokenizer: id-level calls work; text calls name what is missing and how to pass it."""
    m = ModulatedPretrainedModel.from_state_dict(load_checkpoint(ckpt_path), train=False, base_model=bare_base)
    assert m.tokenizer is None
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    loras, _ = m.generate_weights(ids, torch.ones_like(ids))
    assert loras["down_proj"]["A"].shape == (1, 4, 8, 256)
    out = m.generate(ctx_ids=ids, ctx_attn_mask=torch.ones_like(ids), n_ctx_chunks=[1], input_ids=ids[:, :3],
                     max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)
    with pytest.raises(ValueError, match=r"internalize\(text\) needs a tokenizer.*no tokenizer files.*tokenizer="):
        m.internalize("some text")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        m.d2l.generate_text(["a question?"])
    # the native API: id documents work, text documents give the same advice
    assert len(m.d2l.internalize([[2, 40, 41, 42]])) == 1
    with pytest.raises(ValueError, match="needs a tokenizer.*get_tokenizer"):
        m.d2l.internalize(["text"])
    # the tokenizer can be given afterwards
    m.d2l.tokenizer = get_tokenizer(golden_dir / "tiny-gemma2", compact_chat_template_=True)
    assert m.internalize("some text")["down_proj"]["A"].shape == (1, 4, 8, 256)


def test_get_tokenizer_refuses_folder_without_tokenizer_files(bare_base):
    # transformers would otherwise build an empty tokenizer from config.json alone
    with pytest.raises(ValueError, match="holds no tokenizer files"):
        get_tokenizer(bare_base)


# ------------------------------------------------------------------ chat templates of the published models
# Stand-ins for each model's stock template, written for these tests from the models' documented formats:
# Gemma-2 rejects a system role; Mistral-7B-Instruct-v0.2 alternates user/assistant only; Qwen3 is ChatML.
STOCK = {
    "gemma2": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for m in messages %}{% set r = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + r + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "qwen3": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}{% endfor %}"
    ),
}

# spec §1.2: the context token strings with the reference's compacted templates
SPEC_CONTEXT = {
    "google/gemma-2-2b-it": ("gemma2", "<bos><start_of_turn>user\n\n\n{doc}<end_of_turn>\n<start_of_turn>model\n"),
    "Qwen/Qwen3-4B-Instruct-2507": (
        "qwen3", "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{doc}<|im_end|>\n<|im_start|>assistant\n"),
    "mistralai/Mistral-7B-Instruct-v0.2": ("mistral", "<s> [INST] \n\n{doc} [/INST] "),
}


@pytest.fixture(scope="module")
def hub_like(tmp_path_factory):
    """Local folders named like the published models, each with a tiny tokenizer of the same special tokens
    and a stand-in for the model's stock template."""
    root = tmp_path_factory.mktemp("hub")
    for name, (arch, _) in SPEC_CONTEXT.items():
        tok = tiny_tokenizer(arch)
        tok.chat_template = STOCK[arch]
        tok.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("name", sorted(SPEC_CONTEXT))
def test_packaged_template_renders_spec_strings_from_any_cwd(name, hub_like, tmp_path, monkeypatch):
    arch, expected = SPEC_CONTEXT[name]
    # a working directory that is not the reference's repo, with a decoy template of the same file name
    (tmp_path / "chat_templates").mkdir()
    (tmp_path / "chat_templates" / f"{name.split('/')[-1]}.jinja").write_text("{{ 'decoy' }}")
    monkeypatch.chdir(tmp_path)
    doc = "  The keeper wrote the date on a slate.\nA fox watched the boats.  "
    stock = get_tokenizer(hub_like / name, chat_template=STOCK[arch])
    for tok in (get_tokenizer(hub_like / name), get_tokenizer(hub_like / name, model_name=name)):
        assert render_context(tok, doc) == expected.format(doc=doc.strip())
        ids = tokenize_context(tok, doc)
        assert ids == tok(expected.format(doc=doc.strip()), add_special_tokens=False)["input_ids"]
        # the wrapper's special tokens are single ids, as with the real tokenizer
        first = {"gemma2": ["<bos>", "<start_of_turn>"], "qwen3": ["<|im_start|>"], "mistral": ["<s>"]}[arch]
        assert ids[: len(first)] == tok.convert_tokens_to_ids(first)
        pre, suf = context_affixes(tok)
        assert ids[: len(pre)] == pre and ids[len(ids) - len(suf):] == suf
        # against the stock template: a plain user turn (and a multi-turn chat) render as the stock one does,
        # except Mistral, whose reference template puts a space after <s> and after [/INST] (spec §1.2)
        chat = [{"role": "user", "content": "Where is the fox?"}, {"role": "assistant", "content": "Under the mill."},
                {"role": "user", "content": "When?"}]
        for msgs in (chat[:1], chat):
            ours = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            theirs = stock.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            if arch == "mistral":
                squeeze = lambda x: re.sub(r" ?(\[/?INST\]) ?", r"\1", x)  # noqa: E731
                assert squeeze(ours) == squeeze(theirs)
            else:
                assert ours == theirs
        if arch != "mistral":
            assert tokenize_prompt(tok, "Where is the fox?") == tokenize_prompt(stock, "Where is the fox?")
    # the context wrapper: the stock Gemma-2 / Mistral-v0.2 templates cannot render it (system role), Qwen's agrees
    if arch == "qwen3":
        assert render_context(stock, doc) == expected.format(doc=doc.strip())
    else:
        with pytest.raises(Exception, match="System role|alternate"):
            render_context(stock, doc)


def test_packaged_templates_are_package_data():
    import importlib.resources as res

    folder = res.files("d2l_fast").joinpath("data/chat_templates")
    assert sorted(p.name for p in folder.iterdir()) == sorted(PACKAGED_TEMPLATES.values())
    assert d2l_fast.packing.packaged_chat_template("some/other-model") is None
    assert d2l_fast.packing.packaged_chat_template("/models/gemma-2-2b-it") is not None


def test_model_named_like_published_gets_its_template(golden_dir, tmp_path, monkeypatch):
    """D2LModel picks the template by the checkpoint's base-model name even when the base is a local folder."""
    ck = load_checkpoint(golden_dir / "pytorch_model.bin")
    spec = ck.spec.__class__(**{**ck.spec.__dict__, "base_model_name_or_path": "google/gemma-2-2b-it"})
    ck = d2l_fast.LoadedCheckpoint(spec=spec, state_dict=ck.state_dict)
    base = tmp_path / "local-gemma"
    shutil.copytree(golden_dir / "tiny-gemma2", base, symlinks=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["chat_template"] = STOCK["gemma2"]
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    m = D2LModel.from_checkpoint(ck, base_model=base)
    assert render_context(m.tokenizer, "doc") == SPEC_CONTEXT["google/gemma-2-2b-it"][1].format(doc="doc")
    assert len(m.internalize(["a short document"])) == 1


# ------------------------------------------------------------------ the reference layout written by d2l_fast
def test_load_what_d2l_fast_writes_in_reference_layout(ckpt_path, bare_base, tmp_path):
    ck = load_checkpoint(ckpt_path)
    save_reference_checkpoint(ck, tmp_path / "ref.bin")
    m = ModulatedPretrainedModel.from_state_dict(ck, train=False, base_model=bare_base)
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")  # the reference's own save pattern
    for path in (tmp_path / "ref.bin", tmp_path / "pytorch_model.bin", tmp_path):
        again = load_checkpoint(path)
        assert again.spec == ck.spec
        assert set(again.state_dict) == set(ck.state_dict)
        assert all(torch.equal(again.state_dict[k], v) for k, v in ck.state_dict.items())
    m2 = ModulatedPretrainedModel.from_state_dict(tmp_path / "pytorch_model.bin", train=False, base_model=bare_base)
    assert _same_hypernet(m, m2)
