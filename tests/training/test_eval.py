"""``d2l-fast eval`` (spec §6): three methods on the same samples, metrics recomputable from the per-sample JSONL,
all outputs written; bad input refused before any model call."""

import csv
import json
import math
import re

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("rouge_score")

from d2l_fast import D2LModel  # noqa: E402
from d2l_fast.cli import main  # noqa: E402
from d2l_fast.training.evaluate import (  # noqa: E402
    EVAL_FILES,
    Sample,
    build_samples,
    evaluate,
    score,
    summarize,
)
from d2l_fast.training.gen_data import OutputExistsError  # noqa: E402
from d2l_fast.training.generators import generate_facts, generate_niah, write_records  # noqa: E402
from d2l_fast.training.metrics import exact_match, qa_f1, rouge_l  # noqa: E402

from .._tiny import tiny_model, tiny_tokenizer  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    base, tok = tiny_model("llama"), tiny_tokenizer("llama")
    return D2LModel.from_base(base, tok, seed=1, latent_size=32, n_latent_queries=8, num_blocks=2, n_heads=4,
                              head_dim=16, n_kv_heads=2, init_scaler_B=1.0, max_chunk_len=128)


@pytest.fixture(scope="module")
def records(model):
    return (generate_facts(2, split="test", seed=0, max_facts=4)
            + generate_niah(model.tokenizer, bins=[(32, 128), (128, 256)], n_per_bin=2, seed=0))


def _recompute(row):
    if row["task"] == "niah":
        digits = re.findall(r"\d+", row["prediction"])
        return {"niah_em": float(bool(digits) and digits[0] in row["answers"]),
                "rougeL": max(rouge_l(row["prediction"], a) for a in row["answers"])}
    f, p, r = qa_f1(row["prediction"], row["answers"])
    return {"qa_f1": f, "qa_precision": p, "qa_recall": r,
            "exact_match": exact_match(row["prediction"], row["answers"]),
            "rougeL": max(rouge_l(row["prediction"], a) for a in row["answers"])}


def _check_outputs(out, methods, n_samples):
    assert sorted(p.name for p in out.iterdir()) == sorted(EVAL_FILES)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == n_samples * len(methods)
    for m in methods:  # the same samples for every method
        assert [r["sample_id"] for r in rows if r["method"] == m] == [r["sample_id"] for r in rows
                                                                      if r["method"] == methods[0]]
    summary = json.loads((out / "summary.json").read_text())
    # summary metrics = recomputation from the per-sample predictions
    for r in rows:
        for k, v in _recompute(r).items():
            assert r[k] == pytest.approx(v)
    for m in methods:
        for task in {r["task"] for r in rows}:
            sel = [r for r in rows if r["method"] == m and r["task"] == task]
            groups = {"all": sel} | {b: [r for r in sel if r["bin"] == b] for b in {r["bin"] for r in sel}}
            got = summary["scores"][m][task]
            assert set(got) == set(groups)
            for b, g in groups.items():
                assert got[b]["n"] == len(g)
                for k in _recompute(g[0]):
                    assert got[b][k] == pytest.approx(sum(_recompute(r)[k] for r in g) / len(g))
        cost = summary["cost"][m]
        assert cost["generate_s"] > 0 and cost["memory_kind"]
        assert ("internalize_s" in cost) == (m == "d2l")
    with open(out / "summary.csv") as fh:
        table = list(csv.DictReader(fh))
    assert {(t["method"], t["task"], t["bin"]) for t in table} == {
        (m, task, b) for m in methods for task, bins in summary["scores"][m].items() for b in bins}
    for t in table:
        lead = "niah_em" if t["task"] == "niah" else "qa_f1"
        assert float(t[lead]) == pytest.approx(summary["scores"][t["method"]][t["task"]][t["bin"]][lead], rel=1e-5)
    png = (out / "scores_vs_length.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    from PIL import Image

    with Image.open(out / "scores_vs_length.png") as im:
        im.verify()
        assert im.size[0] > 400 and im.size[1] > 200
    return rows, summary


def test_evaluate_three_methods(model, records, tmp_path):
    out = tmp_path / "ev"
    summary = evaluate(model, records, out, max_new_tokens=6, batch_size=4)
    n = sum(len(r["qas"]) for r in records)
    rows, _ = _check_outputs(out, ["base", "in_context", "d2l"], n)
    assert summary["n_samples"] == n
    # NIAH rows are binned by the generator's bins, QA rows by the templated context length
    assert {r["bin"] for r in rows if r["task"] == "niah"} == {"32-128", "128-256"}
    # the document changes the in-context and d2l answers (random adapters: d2l ≠ base)
    by = {(r["method"], r["sample_id"]): r["prediction"] for r in rows}
    ids = {r["sample_id"] for r in rows}
    assert any(by[("d2l", i)] != by[("base", i)] for i in ids)
    assert any(by[("in_context", i)] != by[("base", i)] for i in ids)


def test_d2l_answers_equal_direct_generation(model, records, tmp_path):
    """The d2l method's answers are the model's own internalize + generate_text with the eval prompt."""
    evaluate(model, records[:1], tmp_path / "one", methods=["d2l"], max_new_tokens=5, plot=False)
    rows = [json.loads(x) for x in (tmp_path / "one" / "samples.jsonl").read_text().splitlines()]
    ad = model.internalize([records[0]["context"]])
    from d2l_fast.training.evaluate import EVAL_INSTRUCTION
    from d2l_fast.training.gen_data import stop_token_ids

    for j, qa in enumerate(records[0]["qas"]):
        want = model.generate_text([EVAL_INSTRUCTION.format(question=qa["question"])], ad, adapter_index=[0],
                                   max_new_tokens=5, system="", eos_token_id=stop_token_ids(model.base_model,
                                                                                            model.tokenizer))
        assert rows[j]["prediction"] == want[0]


def test_score_and_summarize_by_hand():
    s_n = Sample("n/0", "n", "niah", "ctx", "What is the special magic number?", ["4821"], 60, (32, 128))
    s_q = Sample("q/0", "q", "qa", "ctx", "Where?", ["New Lisbon", "Lisbon"], 20, (0, 127))
    assert score(s_n, "4821")["niah_em"] == 1.0
    assert score(s_n, "The number is 4821.")["niah_em"] == 1.0
    assert score(s_n, "48210")["niah_em"] == 0.0 and score(s_n, "1234 or 4821")["niah_em"] == 0.0
    q = score(s_q, "the city of Lisbon")
    # "the city of lisbon" → words [city, of, lisbon]; vs "lisbon": p = 1/3, r = 1 → F1 = 0.5;
    # vs "new lisbon": p = 1/3, r = 1/2 → F1 = 0.4 → best 0.5
    assert q["qa_f1"] == pytest.approx(0.5) and q["exact_match"] == 0.0
    rows = [{"method": "base", "task": "qa", "bin": "0-127", "qa_f1": 1.0, "qa_precision": 1.0, "qa_recall": 1.0,
             "exact_match": 1.0, "rougeL": 1.0},
            {"method": "base", "task": "qa", "bin": "128-255", "qa_f1": 0.0, "qa_precision": 0.0, "qa_recall": 0.0,
             "exact_match": 0.0, "rougeL": 0.5}]
    s = summarize(rows)["base"]["qa"]
    assert list(s) == ["all", "0-127", "128-255"]
    assert s["all"]["qa_f1"] == 0.5 and s["all"]["rougeL"] == 0.75 and s["128-255"]["n"] == 1


def test_bad_input_refused_before_compute(model, records, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        evaluate(model, records, out)
    assert (out / "summary.json").read_text() == "{}"
    with pytest.raises(ValueError, match="methods"):
        evaluate(model, records, tmp_path / "y", methods=["oracle"])
    with pytest.raises(ValueError, match="D2LModel"):
        evaluate(model.base_model, records, tmp_path / "y", tokenizer=model.tokenizer)
    with pytest.raises(ValueError, match="answers"):
        evaluate(model, [{"context": "c", "qas": [{"question": "q?"}]}], tmp_path / "y")
    with pytest.raises(ValueError, match="no records"):
        evaluate(model, [], tmp_path / "y")
    assert not (tmp_path / "y").exists()
    # overwrite replaces a previous eval output
    evaluate(model, records[:1], out, methods=["base"], max_new_tokens=2, overwrite=True)
    assert json.loads((out / "summary.json").read_text())["methods"] == ["base"]


def test_base_model_only(model, records, tmp_path):
    samples = build_samples(records, model.tokenizer, max_samples=3)
    assert len(samples) == 3 and samples == build_samples(records, model.tokenizer, max_samples=3)
    summary = evaluate(model.base_model, records, tmp_path / "b", tokenizer=model.tokenizer,
                       methods=["base", "in_context"], max_new_tokens=4, max_samples=3)
    assert summary["n_samples"] == 3 and set(summary["scores"]) == {"base", "in_context"}
    assert all(not math.isnan(v["all"]["rougeL"]) for m in summary["scores"].values() for v in m.values())


def test_cli_eval(model, records, tmp_path, capsys):
    model.base_model.save_pretrained(tmp_path / "base")
    model.tokenizer.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "ckpt")
    data = write_records(records, tmp_path / "data.jsonl")
    args = ["eval", str(data), "-o", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "ckpt"),
            "--base-model", str(tmp_path / "base"), "--max-new-tokens", "4", "--max-chunk-len", "128"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "niah (niah_em)" in printed and "qa (qa_f1)" in printed
    _check_outputs(tmp_path / "out", ["base", "in_context", "d2l"], sum(len(r["qas"]) for r in records))
    # the CLI's d2l answers equal the in-process model's (same checkpoint)
    with torch.no_grad():
        evaluate(model, records, tmp_path / "api", max_new_tokens=4, max_chunk_len=128, plot=False)
    cli_rows = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    api_rows = (tmp_path / "api" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(r)["prediction"] for r in cli_rows] == [json.loads(r)["prediction"] for r in api_rows]
    # bad inputs: a one-line error, raised before any model is loaded (the base model path does not exist)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"context": "c", "qas": [{"question": "q?", "answers": []}]}\n')
    nobase = ["--checkpoint", str(tmp_path / "ckpt"), "--base-model", str(tmp_path / "no-such-model")]
    for f, out, msg in (("empty.jsonl", "n1", "no records"), ("bad.jsonl", "n2", "bad.jsonl:1: qas[0].answers"),
                        ("data.jsonl", "out", "--overwrite")):
        rc = main(["eval", str(tmp_path / f), "-o", str(tmp_path / out), *nobase])
        assert rc == 1 and msg in capsys.readouterr().err
    rc = main(["eval", str(data), "-o", str(tmp_path / "n3"), "--methods", "d2l"])
    assert rc == 1 and "needs --checkpoint" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("n1", "n2", "n3"))


def test_few_shot_in_prompt_method(model, records, tmp_path):
    """in_context_fewshot: the in-prompt baseline after worked examples (default: three train-split ones); its
    answers are generate's on each few-shot prompt alone; bad examples are refused before any model call."""
    from d2l_fast.answering import question_prompt, stop_token_ids
    from d2l_fast.training.evaluate import EVAL_INSTRUCTION, EVAL_METHODS
    from d2l_fast.training.reading_run import fewshot_examples

    assert "in_context_fewshot" in EVAL_METHODS
    summary = evaluate(model, records, tmp_path / "fs", methods=["in_context", "in_context_fewshot"],
                       max_new_tokens=4, plot=False)
    assert summary["settings"]["fewshot"] == [list(e) for e in fewshot_examples()]
    rows = [json.loads(x) for x in (tmp_path / "fs" / "samples.jsonl").read_text().splitlines()]
    fs = [r for r in rows if r["method"] == "in_context_fewshot"]
    assert len(fs) == sum(len(r["qas"]) for r in records)
    rec, qa = records[0], records[0]["qas"][0]
    ids = torch.tensor([question_prompt(model.tokenizer, qa["question"], document=rec["context"],
                                        instruction=EVAL_INSTRUCTION, system="", examples=fewshot_examples())])
    stop = stop_token_ids(model.base_model, model.tokenizer)
    seq = model.base_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=4, eos_token_id=stop, pad_token_id=stop[0])
    assert fs[0]["prediction"] == model.tokenizer.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="fewshot"):
        evaluate(model, records, tmp_path / "bad", methods=["in_context_fewshot"], fewshot=[("doc", "q?")])
    assert not (tmp_path / "bad").exists()
