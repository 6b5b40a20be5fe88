"""Spec §5.2 generators: NIAH binned by the tokenizer's length, synthetic facts with disjoint held-out splits."""

import json
import re

import pytest

from d2l_fast.training.generators import (
    ATTRIBUTES,
    FILLER_BLOCK,
    HELD_OUT_TEMPLATES,
    NIAH_QUESTION,
    entity_split,
    generate_facts,
    generate_niah,
    invent_names,
    read_records,
    template_pools,
    write_records,
)

from .._tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("qwen3")


def _count(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_niah_bins_needle_and_determinism(tok):
    bins = [(32, 128), (128, 256), (256, 512), (512, 1024)]
    recs = generate_niah(tok, bins=bins, n_per_bin=40, seed=3)
    assert len(recs) == 4 * 40 and len({r["id"] for r in recs}) == len(recs)
    assert recs == generate_niah(tok, bins=bins, n_per_bin=40, seed=3)  # deterministic by seed
    other = generate_niah(tok, bins=bins, n_per_bin=40, seed=4)
    assert [r["context"] for r in other] != [r["context"] for r in recs]
    for r in recs:
        lo, hi = r["meta"]["bin"]
        n = _count(tok, r["context"])  # measured with the model's tokenizer
        assert lo <= n < hi and n == r["meta"]["n_tokens"]
        (qa,) = r["qas"]
        assert qa["question"] == NIAH_QUESTION and re.fullmatch(r"[1-9]\d{3}", qa["answers"][0])
        assert r["context"].count("special magic number") == 1  # the needle exactly once
        assert f"The special magic number is {qa['answers'][0]}." in r["context"]
        assert re.findall(r"\d+", r["context"]) == [qa["answers"][0]]  # no other digits in the haystack
        rest = r["context"].replace(f"The special magic number is {qa['answers'][0]}.", "")
        assert {s.strip() + "." for s in rest.split(".") if s.strip()} <= set(FILLER_BLOCK)
    # numbers vary
    assert len({r["qas"][0]["answers"][0] for r in recs}) > 100


def test_niah_depth_uniform(tok):
    recs = generate_niah(tok, bins=[(256, 512)], n_per_bin=200, seed=0)
    drawn = [r["meta"]["depth"] for r in recs]
    actual = [r["meta"]["needle_char_depth"] for r in recs]
    # stratified: every group of ten examples visits every decile once
    for g in range(0, 200, 10):
        assert sorted(int(d * 10) for d in drawn[g : g + 10]) == list(range(10))
    # the needle really sits there (sentence granularity), and its position covers the deciles evenly
    assert max(abs(a - d) for a, d in zip(actual, drawn)) < 0.1
    hist = [sum(int(min(a, 0.999) * 10) == k for a in actual) for k in range(10)]
    assert min(hist) >= 10 and max(hist) <= 30, hist


def test_niah_bad_bins(tok):
    with pytest.raises(ValueError, match="widen the bin"):
        generate_niah(tok, bins=[(2, 4)], n_per_bin=1)
    with pytest.raises(ValueError, match="lo < hi"):
        generate_niah(tok, bins=[(64, 32)], n_per_bin=1)
    with pytest.raises(ValueError, match="n_per_bin"):
        generate_niah(tok, n_per_bin=0)
    with pytest.raises(ValueError, match="digits"):
        generate_niah(tok, filler=["There are 3 cats."])


def test_facts_deterministic_and_well_formed():
    a = generate_facts(50, split="train", seed=1)
    assert a == generate_facts(50, split="train", seed=1)
    assert a != generate_facts(50, split="train", seed=2)
    for r in a:
        assert r["task"] == "qa" and 3 <= len(r["qas"]) <= 8
        name = r["meta"]["entity"]
        assert len({qa["attribute"] for qa in r["qas"]}) == len(r["qas"])  # one fact per attribute
        for qa in r["qas"]:
            (value,) = qa["answers"]
            assert value in ATTRIBUTES[qa["attribute"]]["values"]
            assert name in qa["question"] and value not in qa["question"]
            assert re.search(r"\b" + re.escape(value) + r"\b", r["context"])  # the document states the answer
    lens = [len(r["qas"]) for r in a]
    assert min(lens) == 3 and max(lens) == 8
    # several phrasings are used per fact and per question
    assert len({qa["fact_template"] for r in a for qa in r["qas"]}) > len(ATTRIBUTES) * 2
    assert len({qa["question_template"] for r in a for qa in r["qas"]}) > len(ATTRIBUTES) * 2


def test_held_out_unseen_entities_and_templates():
    train = generate_facts(200, split="train", seed=0) + generate_facts(200, split="train", seed=7)
    held = {s: generate_facts(100, split=s, seed=0) for s in ("validation", "test")}
    ents = {s: {r["meta"]["entity"] for r in rs} for s, rs in [("train", train), *held.items()]}
    assert not ents["train"] & ents["validation"] and not ents["train"] & ents["test"]
    assert not ents["validation"] & ents["test"]
    assert all(entity_split(n) == s for s, ns in ents.items() for n in ns)
    for kind in ("fact_template", "question_template"):
        used = {s: {qa[kind] for r in rs for qa in r["qas"]} for s, rs in [("train", train), *held.items()]}
        assert not used["train"] & (used["validation"] | used["test"]), kind
        assert len(used["test"]) > len(ATTRIBUTES)  # the held-out pools are used
    # held-out phrasings (with the name removed) never occur in training documents or questions
    train_text = " ".join(r["context"] + " " + " ".join(q["question"] for q in r["qas"]) for r in train)
    for pool_split in ("train", "test"):
        pools = template_pools(pool_split)
        for attr, p in pools.items():
            n = len(ATTRIBUTES[attr]["facts"])
            assert len(p["facts"]) == (n - HELD_OUT_TEMPLATES if pool_split == "train" else HELD_OUT_TEMPLATES)
    for r in held["test"]:
        for qa in r["qas"]:
            stripped = qa["question"].replace(r["meta"]["entity"], "")
            assert stripped not in train_text.replace(r["meta"]["entity"], "")


def test_invented_names():
    names = invent_names(300, split="test", seed=5)
    assert len(set(names)) == 300 and names == invent_names(300, split="test", seed=5)
    words = {w.lower() for d in ATTRIBUTES.values() for t in d["facts"] + d["questions"] + d["values"]
             for w in re.findall(r"[A-Za-z]+", t)}
    for n in names:
        first, last = n.split()
        assert first.istitle() and last.istitle() and first.lower() not in words and last.lower() not in words
    with pytest.raises(ValueError, match="split"):
        invent_names(3, split="dev")


def test_jsonl_round_trip_and_errors(tmp_path, tok):
    recs = generate_facts(3, seed=0) + generate_niah(tok, bins=[(32, 128)], n_per_bin=2)
    write_records(recs, tmp_path / "r.jsonl")
    assert read_records(tmp_path / "r.jsonl", need_answers=True) == json.loads(json.dumps(recs))
    cases = {
        "empty": ("\n\n", "no records"),
        "notjson": ('{"context": "x"\n', ":1: not valid JSON"),
        "noctx": ('{"qas": [{"question": "q?"}]}\n', ":1: 'context'"),
        "noqas": ('{"context": "x", "qas": []}\n', "'qas'"),
        "badq": ('{"context": "x", "qas": [{"question": ""}]}\n', "qas[0].question"),
        "badtask": ('{"context": "x", "task": "mcq", "qas": [{"question": "q"}]}\n', "'task'"),
        "dup": ('{"id": 1, "context": "x", "qas": [{"question": "q"}]}\n' * 2, "more than once"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
        with pytest.raises(ValueError, match=re.escape(msg)):
            read_records(tmp_path / f"{name}.jsonl")
    (tmp_path / "noans.jsonl").write_text('{"context": "x", "qas": [{"question": "q"}]}\n')
    assert read_records(tmp_path / "noans.jsonl")[0]["task"] == "qa"
    with pytest.raises(ValueError, match="answers"):
        read_records(tmp_path / "noans.jsonl", need_answers=True)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"context": "caf\xe9", "qas": [{"question": "q"}]}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        read_records(tmp_path / "latin1.jsonl")
    with pytest.raises(ValueError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
