"""``d2l-fast gen-data`` (spec §5.2): teacher answers with the document in the prompt, stored in the reference's
parquet schema, read back by ``iter_parquet``, log-probs equal to a direct forward's."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")

from d2l_fast.cli import main  # noqa: E402
from d2l_fast.packing import tokenize_context, tokenize_prompt  # noqa: E402
from d2l_fast.training.data import iter_parquet  # noqa: E402
from d2l_fast.training.gen_data import (  # noqa: E402
    OutputExistsError,
    generate_data,
    gold_answer_ids,
    stop_token_ids,
    teacher_prompt_text,
)
from d2l_fast.training.generators import generate_facts, generate_niah, write_records  # noqa: E402

from .._tiny import tiny_model, tiny_tokenizer  # noqa: E402

STOP_LIKE = 73  # a token the random tiny llama generates now and then: the stop token is made to win there


@pytest.fixture(scope="module")
def pair():
    """A tiny random llama whose end-of-turn token's output row is 1.2 × that of a token it often generates, so
    some answers stop (kept) and some do not within the budget (dropped) — a real model, deterministic weights."""
    tok = tiny_tokenizer("llama")
    m = tiny_model("llama")
    (stop,) = stop_token_ids(m, tok)
    with torch.no_grad():
        m.lm_head.weight[stop] = 1.2 * m.lm_head.weight[STOP_LIKE]
    return m, tok


@pytest.fixture(scope="module")
def records(pair):
    return generate_facts(3, seed=0) + generate_niah(pair[1], bins=[(32, 128)], n_per_bin=2)


def test_round_trip_teacher_logprobs(pair, records, tmp_path):
    m, tok = pair
    stats = generate_data(m, tok, records, tmp_path / "out", max_new_tokens=10, batch_size=4)
    assert stats["kept"] > 0 and stats["dropped_no_stop"] > 0  # both paths happen
    n_q = sum(len(r["qas"]) for r in records)
    assert stats["questions"] == n_q and stats["kept"] + stats["dropped_no_stop"] == n_q
    assert json.loads((tmp_path / "out" / "gen_data.json").read_text()) == stats
    got = list(iter_parquet(tmp_path / "out", vocab_size=512))
    assert sum(len(ex.qas) for ex in got) == stats["kept"]
    stop = set(stop_token_ids(m, tok))
    by_ctx = {tuple(tokenize_context(tok, r["context"])): r for r in records}
    checked = 0
    for ex in got:
        rec = by_ctx[tuple(ex.ctx_chunks[0])]  # ctx_ids are the templated context
        questions = {tuple(tokenize_prompt(tok, qa["question"])): qa["question"] for qa in rec["qas"]}
        for qa in ex.qas:
            prompt, answer = qa.input_ids[: qa.start], qa.input_ids[qa.start : qa.end]
            assert qa.end == len(qa.input_ids) and answer[-1] in stop and not stop & set(answer[:-1])
            q = questions[tuple(prompt)]  # the student sequence = [user: question] + generation header + answer
            assert rec["context"] not in tok.decode(qa.input_ids)
            teacher = list(tok(teacher_prompt_text(tok, rec["context"], q), add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logits = m(torch.tensor([teacher + answer])).logits[0].float()
            lp = torch.log_softmax(logits[len(teacher) - 1 : len(teacher) - 1 + len(answer)], -1)
            assert lp.argmax(-1).tolist() == answer  # greedy
            vals, idx = lp.topk(16, dim=-1)
            assert qa.logprobs_vals.shape == (len(answer), 16) and qa.logprobs_indices.shape == (len(answer), 16)
            np.testing.assert_allclose(qa.logprobs_vals, vals.half().float().numpy(), atol=2e-3, rtol=0)
            # indices agree wherever the teacher's ranking is not a near-tie
            gap = (vals[:, :-1] - vals[:, 1:]).numpy() > 1e-4
            same = qa.logprobs_indices == idx.numpy()
            assert same[:, 0].all() and same[:, 1:][gap & np.roll(gap, 1, axis=1)].all()
            checked += 1
    assert checked == stats["kept"]


def test_gold_mode_cross_entropy_data(pair, records, tmp_path):
    m, tok = pair
    stats = generate_data(m, tok, records, tmp_path / "gold", gold=True)
    assert stats["kept"] == stats["questions"] and stats["mode"] == "gold"
    with pytest.raises(Exception, match="missing column"):
        list(iter_parquet(tmp_path / "gold"))  # no teacher columns written
    got = list(iter_parquet(tmp_path / "gold", teacher=False))
    flat = [(r, qa) for r in records for qa in r["qas"]]
    assert len(got) == len(records) and sum(len(ex.qas) for ex in got) == len(flat)
    qs = [q for ex in got for q in ex.qas]
    for q, (_, qa) in zip(qs, flat):
        ans = q.input_ids[q.start : q.end]
        assert ans == gold_answer_ids(tok, qa["question"], qa["answers"][0])
        assert tok.decode(ans, skip_special_tokens=True) == qa["answers"][0]
        assert tok.decode(ans[-1:]) == "<|eot_id|>"  # the template's end of turn closes the answer
        assert q.logprobs_vals is None


def test_student_system_message(pair, records, tmp_path):
    """``system=""``: the stored student prompt is the evaluation layout (empty system message), not the template's
    default; the answer span is unchanged."""
    m, tok = pair
    generate_data(m, tok, records[:1], tmp_path / "sys", gold=True, system="")
    generate_data(m, tok, records[:1], tmp_path / "dflt", gold=True)
    (q_sys,), (q_dflt,) = ([q for ex in iter_parquet(tmp_path / d, teacher=False) for q in ex.qas][:1]
                           for d in ("sys", "dflt"))
    question = records[0]["qas"][0]["question"]
    assert q_sys.input_ids[: q_sys.start] == tokenize_prompt(tok, question, system="")
    assert q_dflt.input_ids[: q_dflt.start] == tokenize_prompt(tok, question)
    assert q_sys.input_ids[: q_sys.start] != q_dflt.input_ids[: q_dflt.start]
    assert q_sys.input_ids[q_sys.start : q_sys.end] == q_dflt.input_ids[q_dflt.start : q_dflt.end]
    with pytest.raises(ValueError, match="system must be a string"):
        generate_data(m, tok, records[:1], tmp_path / "bad", gold=True, system=3)


def test_shuffle_seed_mixes_grouped_records(pair, tmp_path):
    """Records grouped by kind (facts, then NIAH) come out in one seeded order: the same rows, interleaved, the same
    order for the same seed; the default keeps the records' order."""
    m, tok = pair
    recs = generate_facts(6, seed=3) + generate_niah(tok, bins=[(32, 128)], n_per_bin=6, seed=3)
    stats = generate_data(m, tok, recs, tmp_path / "a", gold=True, shuffle_seed=7, rows_per_file=5)
    generate_data(m, tok, recs, tmp_path / "b", gold=True, shuffle_seed=7)
    generate_data(m, tok, recs, tmp_path / "plain", gold=True)
    ctx = {d: [tuple(ex.ctx_chunks[0]) for ex in iter_parquet(tmp_path / d, teacher=False)]
           for d in ("a", "b", "plain")}
    want = [tuple(tokenize_context(tok, r["context"])) for r in recs]
    assert ctx["plain"] == want and stats["shuffle_seed"] == 7 and len(stats["files"]) == 3
    assert ctx["a"] == ctx["b"] != want and sorted(ctx["a"]) == sorted(want)
    kinds = ["niah" if c in set(want[6:]) else "qa" for c in ctx["a"]]
    assert "niah" in kinds[:6] and "qa" in kinds[6:]  # no longer all facts first
    with pytest.raises(ValueError, match="shuffle_seed must be an int"):
        generate_data(m, tok, recs, tmp_path / "bad", gold=True, shuffle_seed="7")
    assert not (tmp_path / "bad").exists()


def test_bad_input_before_compute(pair, records, tmp_path):
    m, tok = pair
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not empty"):
        generate_data(m, tok, records, out)
    with pytest.raises(OutputExistsError, match="did not write"):
        generate_data(m, tok, records, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="answers"):
        generate_data(m, tok, [{"context": "c", "qas": [{"question": "q?"}]}], tmp_path / "g", gold=True)
    with pytest.raises(ValueError, match="no records"):
        generate_data(m, tok, [], tmp_path / "g")
    assert not (tmp_path / "g").exists()
    # overwrite replaces a previous output of this tool
    generate_data(m, tok, records[:1], tmp_path / "g", gold=True)
    generate_data(m, tok, records[1:], tmp_path / "g", gold=True, overwrite=True)
    assert len(list(iter_parquet(tmp_path / "g", teacher=False))) == len(records) - 1


def test_cli(pair, records, tmp_path, capsys):
    m, tok = pair
    m.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = write_records(records, tmp_path / "data.jsonl")
    rc = main(["gen-data", str(data), "-o", str(tmp_path / "cli"), "--base-model", str(tmp_path / "base"),
               "--max-new-tokens", "10", "--batch-size", "4", "--shuffle-seed", "3"])
    assert rc == 0, capsys.readouterr().err
    stats = json.loads((tmp_path / "cli" / "gen_data.json").read_text())
    assert stats["kept"] > 0 and stats["shuffle_seed"] == 3
    # bad inputs: one-line errors, nothing written
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "qas": []}\n')
    (tmp_path / "notjson.jsonl").write_text('{"context": "a",\n')
    for f, msg in (("empty.jsonl", "no records"), ("bad.jsonl", "bad.jsonl:1: 'qas'"),
                   ("notjson.jsonl", "notjson.jsonl:1: not valid JSON"), ("missing.jsonl", "no such file")):
        rc = main(["gen-data", str(tmp_path / f), "-o", str(tmp_path / "x"), "--base-model", str(tmp_path / "base")])
        assert rc == 1 and msg in capsys.readouterr().err
    rc = main(["gen-data", str(data), "-o", str(tmp_path / "cli"), "--base-model", str(tmp_path / "base")])
    assert rc == 1 and "--overwrite" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
