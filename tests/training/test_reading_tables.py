"""Reading-model tables (issue 16): sample answers stratified over the record kinds of a real (tiny) evaluation;
report rows side by side with the verdict, the script's outputs and the plot, on synthetic reports."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("rouge_score")

from d2l_fast import D2LModel  # noqa: E402
from d2l_fast.training import reading as R  # noqa: E402
from d2l_fast.training.evaluate import evaluate  # noqa: E402
from d2l_fast.training.generators import write_records  # noqa: E402
from d2l_fast.training.reading_run import reading_report  # noqa: E402
from d2l_fast.training.reading_tables import (  # noqa: E402
    compare_markdown,
    compare_reports,
    load_eval_dir,
    noise_margin,
    pick_samples,
    plot_comparison,
    report_rows,
    samples_markdown,
    snippet,
)

from .._tiny import tiny_model, tiny_tokenizer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """A real evaluation (tiny random model, all four methods) of a small dev-split reading mix."""
    base, tok = tiny_model("llama"), tiny_tokenizer("llama")
    model = D2LModel.from_base(base, tok, seed=1, latent_size=32, n_latent_queries=8, num_blocks=2, n_heads=4,
                               head_dim=16, n_kv_heads=2, init_scaler_B=1.0, max_chunk_len=128)
    recs = R.generate_reading(tok, split="dev", seed=1, n_facts=3, n_numbers=3, n_niah_per_bin=2,
                              niah_bins=((32, 128), (128, 256)), n_long_per_bin=1, long_bins=((256, 400),),
                              n_nohijack=4)
    out = tmp_path_factory.mktemp("ev") / "eval"
    evaluate(model, recs, out, methods=["base", "in_context", "in_context_fewshot", "d2l"], max_new_tokens=3,
             plot=False)
    write_records(recs, out / "records.jsonl")
    return out


def test_samples_are_stratified_and_rendered(eval_dir):
    records, rows = load_eval_dir(eval_dir)
    samples = pick_samples(records, rows, 10, seed=3)
    assert len(samples) == 10 and samples == pick_samples(records, rows, 10, seed=3)
    kinds = [s["kind"] for s in samples]
    assert set(kinds) == {"facts", "numbers", "needle", "long", "no-hijack"}
    assert all(kinds.count(k) == 2 for k in set(kinds))
    nohijack = [s["qa_kind"] for s in samples if s["kind"] == "no-hijack"]
    assert len(set(nohijack)) == 2  # no-hijack rows cycle through their question kinds
    pred = {(r["sample_id"], r["method"]): r["prediction"] for r in rows}
    for s in samples:
        assert set(s["predictions"]) == {"base", "in_context", "in_context_fewshot", "d2l"}
        assert all(pred[(s["sample_id"], m)] == p for m, p in s["predictions"].items())
    md = samples_markdown(samples).splitlines()
    assert md[0] == ("| kind | document (snippet) | question | gold | D2L | base | in-prompt | in-prompt few-shot |")
    assert len(md) == 12 and all(line.count(" | ") == 7 for line in md[2:])
    assert len(pick_samples(records, rows, 1000)) == len({r["sample_id"] for r in rows})  # all there is
    with pytest.raises(ValueError, match="positive int"):
        pick_samples(records, rows, 0)
    with pytest.raises(ValueError, match="samples.jsonl"):
        load_eval_dir(eval_dir.parent)


def test_snippet_centres_on_the_answer():
    doc = "Filler words here. " * 30 + "The code is 4821. " + "More filler text. " * 30
    s = snippet(doc, "4821", width=60)
    assert "4821" in s and s.startswith("…") and s.endswith("…") and len(s) <= 62
    assert snippet("Short doc.", "x") == "Short doc."
    assert snippet(doc, "The document does not say.", width=40).startswith("Filler")


def _report(scale: float, blind: float = 0.1) -> dict:
    d2l = {"facts/f1/all": 0.5, "facts/f1/spouse": 0.4, "numbers/exact/all": 0.6, "numbers/exact/digits=3": 0.5,
           "numbers/exact/code": 0.3, "niah/by_bin/32-128": 0.9, "niah/by_bin/1024-2048": 0.4,
           "niah/exact/all": 0.7, "niah/exact/integer": 0.7, "long/by_bin/512-1024": 0.3, "long/f1/all": 0.3,
           "long/f1/spouse": 0.1, "nohijack/general/accuracy": 0.8, "nohijack/absent/facts": 0.5,
           "nohijack/chitchat/f1_vs_base": 0.4}
    rep = {"d2l": {k: {"n": 10, "mean": min(1.0, v * scale)} for k, v in d2l.items()},
           "blind_floor_f1": {"spouse": blind}}
    rep["base"] = {k: {"n": 10, "mean": 0.05} for k in d2l}
    rep["in_context"] = {k: {"n": 10, "mean": 0.6} for k in d2l}
    return rep


def test_report_rows_order_and_labels():
    rows = report_rows(_report(1.0))
    assert [r["section"] for r in rows] == ["facts"] * 2 + ["numbers"] * 3 + ["niah"] * 3 + ["long"] * 2 + \
        ["nohijack"] * 3  # long/f1/spouse and niah/exact/integer are left out
    niah = [r["label"] for r in rows if r["section"] == "niah"]
    assert niah == ["recall: all", "32-128 tokens", "1024-2048 tokens"]
    assert [r["floor"] for r in rows if r["section"] == "facts"] == [None, 0.1]
    with pytest.raises(ValueError, match="'d2l' entry"):
        report_rows({"blind_floor_f1": {}})


def test_compare_verdict_table_and_plot(tmp_path):
    shipped, better, mixed = _report(0.5), _report(1.5), _report(1.5)
    mixed["d2l"]["niah/by_bin/32-128"]["mean"] = 0.1
    both_full = _report(1.0)
    both_full["d2l"]["niah/by_bin/32-128"]["mean"] = 1.0
    full_ref = _report(0.5)
    full_ref["d2l"]["niah/by_bin/32-128"]["mean"] = 1.0
    cmp = compare_reports([("shipped", shipped), ("new", better)])
    assert cmp["verdict"] == {"beats_every_row": True, "compared": 13, "not_better": [], "headline_rows": 6,
                              "headline_not_better": [], "worse_beyond_noise": [], "ships": True}
    assert cmp["baselines"] == ["base", "in_context"]
    bad = compare_reports([("shipped", shipped), ("mid", better), ("new", mixed)])
    assert not bad["verdict"]["beats_every_row"] and bad["verdict"]["not_better"] == ["niah: 32-128 tokens"]
    assert compare_reports([("a", full_ref), ("b", both_full)])["verdict"]["beats_every_row"]  # 1.0 vs 1.0 ties ok
    md = compare_markdown(bad)
    lines = md.splitlines()
    assert lines[0] == "| row | n | D2L: shipped | D2L: mid | D2L: new | base | in-prompt | blind floor |"
    assert "| facts F1: spouse | 10 | 0.200 | 0.600 | 0.600 | 0.050 | 0.600 | 0.100 |" in lines
    assert "| NIAH 32-128 tokens | 10 | 45 % | 100 % | 10 % | 5 % | 60 % |  |" in lines
    assert lines[-3].startswith("verdict: new does NOT beat shipped on every row: not higher on 1 of 13 rows")
    # 0.45 -> 0.10 at n = 10 is within the margin (0.39 at p = 0.275), but a headline row is not higher
    assert lines[-1] == "headline: new does NOT replace shipped: not higher on headline rows: niah: 32-128 tokens"
    # breakdown rows tied at 0 and a small dip within the margin do not block a checkpoint that is higher on every
    # headline row; a large dip on a breakdown row does
    tied = _report(1.5)
    tied["d2l"]["facts/f1/spouse"]["mean"] = shipped["d2l"]["facts/f1/spouse"]["mean"] - 0.05
    tied["d2l"]["numbers/exact/code"]["mean"] = shipped["d2l"]["numbers/exact/code"]["mean"]
    v = compare_reports([("shipped", shipped), ("new", tied)])["verdict"]
    assert not v["beats_every_row"] and v["ships"] and len(v["not_better"]) == 2
    tied["d2l"]["facts/f1/spouse"]["mean"] = 0.0  # 0.2 -> 0.0 at n = 10: within the margin (0.26 at p = 0.1)
    assert compare_reports([("shipped", shipped), ("new", tied)])["verdict"]["ships"]
    for k in tied["d2l"]:
        tied["d2l"][k]["n"] = 400
    shipped400 = {m: {k: {**x, "n": 400} for k, x in rows.items()} if m != "blind_floor_f1" else rows
                  for m, rows in shipped.items()}
    v = compare_reports([("shipped", shipped400), ("new", tied)])["verdict"]
    assert not v["ships"] and v["worse_beyond_noise"] == ["facts: F1: spouse"]
    assert noise_margin(0.5, 0.5, 100) == pytest.approx(1.96 * math.sqrt(0.005))
    plot_comparison(bad, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="two or more"):
        compare_reports([("only", shipped)])


def test_script_reports_and_samples(eval_dir, tmp_path):
    script = ROOT / "scripts" / "reading_table.py"
    if not script.exists():
        pytest.skip("the scripts ship with the source tree only")
    records, rows = load_eval_dir(eval_dir)
    real = reading_report(records, rows)  # a real report of the tiny evaluation beside a synthetic one
    (tmp_path / "a.json").write_text(json.dumps(real))
    (tmp_path / "b.json").write_text(json.dumps(_report(1.0)))
    run = lambda *args: subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,  # noqa
                                       cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    p = run("reports", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--labels", "tiny,synthetic",
            "-o", str(tmp_path / "t.md"), "--plot", str(tmp_path / "t.png"), "--json", str(tmp_path / "t.json"))
    assert p.returncode in (0, 2), p.stderr
    assert (tmp_path / "t.md").read_text().startswith("| row | n | D2L: tiny | D2L: synthetic |")
    assert (tmp_path / "t.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((tmp_path / "t.json").read_text())["labels"] == ["tiny", "synthetic"]
    p = run("samples", str(eval_dir), "--n", "5", "-o", str(tmp_path / "s.md"))
    assert p.returncode == 0, p.stderr
    assert len((tmp_path / "s.md").read_text().splitlines()) == 7
    p = run("reports", str(tmp_path / "a.json"), "--labels", "x,y")
    assert p.returncode == 1 and "labels" in p.stderr


def test_ship_script_reading_card(tmp_path):
    """``ship_pretrained.py --reading-eval``: refuses a checkpoint that does not beat the shipped one on every row
    (nothing written), else writes a loadable checkpoint whose card carries the reading rows, prompt layout and
    chunk length, and whose README holds the side-by-side table."""
    script = ROOT / "scripts" / "ship_pretrained.py"
    shipped = ROOT / "d2l_fast" / "data" / "pretrained" / "smollm2-135m"
    if not script.exists() or not (shipped / "hypernet.safetensors").is_file():
        pytest.skip("needs the source tree's scripts and the bundled checkpoint")
    from d2l_fast.model_card import prompt_layout, read_model_card

    (tmp_path / "new").mkdir()
    (tmp_path / "old.json").write_text(json.dumps(_report(0.5)))
    dest = tmp_path / "out" / "reader"
    args = ["--checkpoint", str(shipped), "--previous-report", str(tmp_path / "old.json"), "--steps", "3 steps",
            "--training-command", "python scripts/train_reading.py ...", "--max-chunk-len", "256",
            "--reads", "facts and numbers in short prose documents", "--dest", str(dest), "--name", "reader",
            "--reading-eval", str(tmp_path / "new")]
    run = lambda: subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,  # noqa
                                 cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    (tmp_path / "new" / "reading_report.json").write_text(json.dumps(_report(0.5)))  # ties everywhere
    p = run()
    assert p.returncode != 0 and "not shipped" in p.stderr and not dest.exists(), (p.stdout, p.stderr)
    other = _report(1.2)
    other["d2l"]["facts/f1/all"]["n"] = 11  # evaluated on other data: refused
    (tmp_path / "new" / "reading_report.json").write_text(json.dumps(other))
    p = run()
    assert p.returncode != 0 and "different data" in p.stderr and not dest.exists(), (p.stdout, p.stderr)
    rep = _report(1.2)
    del rep["base"]  # the baselines come from the previous report (the same data)
    (tmp_path / "new" / "reading_report.json").write_text(json.dumps(rep))
    p = run()
    assert p.returncode == 0, p.stderr
    card = read_model_card(dest)
    assert card["heldout"]["kind"] == "reading" and card["heldout"]["verdict"]["beats_every_row"]
    assert card["heldout"]["methods"]["d2l"]["facts/f1/all"]["mean"] == pytest.approx(0.6)
    assert card["heldout"]["methods"]["base"]["facts/f1/all"]["mean"] == pytest.approx(0.05)
    assert card["training_data"] == "reading" and card["max_chunk_len"] == 256
    assert "{question}" in prompt_layout(card)["instruction"]
    text = (dest / "README.md").read_text()
    assert "| row | n | D2L: shipped before | D2L: this checkpoint |" in text and "beats" in text
    from d2l_fast.checkpoint import load_checkpoint

    a, b = load_checkpoint(str(shipped)), load_checkpoint(str(dest))  # the same weights, float16 round trip
    assert a.state_dict.keys() == b.state_dict.keys()
    # without --previous-report the bar is the report in the card of the checkpoint at --dest (the one just shipped)
    args = [x for i, x in enumerate(args) if x != "--previous-report" and args[i - 1] != "--previous-report"]
    shipped_card = (dest / "model_card.json").read_text()
    p = run()  # the same report again: ties, refused, the shipped folder untouched
    assert p.returncode != 0 and "not shipped" in p.stderr, (p.stdout, p.stderr)
    assert (dest / "model_card.json").read_text() == shipped_card
    (tmp_path / "new" / "reading_report.json").write_text(json.dumps(_report(1.3)))
    p = run()
    assert p.returncode == 0, p.stderr
    assert read_model_card(dest)["heldout"]["methods"]["d2l"]["facts/f1/all"]["mean"] == pytest.approx(0.65)
    args[args.index("--dest") + 1] = str(tmp_path / "empty")
    p = run()
    assert p.returncode != 0 and "no shipped model card" in p.stderr, (p.stdout, p.stderr)
