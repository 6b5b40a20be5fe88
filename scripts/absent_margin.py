"""How far is a reader from saying "The document does not say." when a number question asks about a number the
document does not hold? For every absent question of an evaluation's no-hijack needle documents (one number in the
document, a question about another one), the teacher-forced log-probability of the refusal minus that of the
document's number; as a control, the same difference the other way round for answered needle questions (NIAH
records up to ``--max-tokens`` tokens). Above 0 the reader prefers the right one of the two answers, so the mean margin
over checkpoints is the learning curve of a row whose accuracy sits at 0 until it crosses; the separation AUC
(absent over answered questions, ranked by the same score) says whether a checkpoint tells them apart or only
leans further towards refusing.

    python scripts/absent_margin.py --checkpoint checkpoints/reading14-step1800 \
        --records runs/dev_r14/records.jsonl --out runs/absent_margin_r14.json

The bundled model card's prompt layout, 256-token chunks (``--max-chunk-len``). Writes one JSON: per-question
margins and, per records file, their mean and how many are above 0.

``--fact-docs N`` adds the same measure for binding in prose: N dev-split fact documents (seed ``--fact-seed``), and
for each stated main attribute whose kind another attribute shares (birthplace and home city: both cities), the
absent partner's question ("Where does X live?" when only the birthplace is stated) scored refusal vs the stated
value, and the stated attribute's own question scored the other way round (section ``"facts"`` of the JSON).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFUSAL = "The document does not say."


def answer_logprobs(model, adapters, question: str, answers: list, *, adapter_index: int = 0, **layout) -> list[float]:
    """Teacher-forced sum of the log-probabilities of each answer's tokens (a string, or a list of token ids) after
    ``question``'s prompt (the model's prompt layout, or ``layout``) through adapter ``adapter_index`` of
    ``adapters`` (None: the base model)."""
    from d2l_fast.training.reading_run import answer_logits

    if not isinstance(question, str) or isinstance(answers, str) or not answers:
        raise ValueError(f"expected a question string and a non-empty list of answers, got {question!r}, {answers!r}")
    out = []
    for a in answers:
        a_ids = model.tokenizer(a, add_special_tokens=False)["input_ids"] if isinstance(a, str) else list(a)
        if not a_ids:
            raise ValueError(f"answer {a!r} is empty after tokenisation")
        lp = torch.log_softmax(answer_logits(model, adapters, question, a_ids, adapter_index=adapter_index, **layout),
                               -1)
        out.append(lp[torch.arange(len(a_ids)), torch.tensor(a_ids)].sum().item())
    return out


def separation_auc(absent: list[float], present: list[float]) -> float | None:
    """How well the refusal score (log P(refusal) - log P(number)) ranks absent questions above answered ones, free
    of the reader's overall lean to refuse: the fraction of (absent, answered) pairs ranked right (ties count half;
    0.5 = no discrimination). Takes the two kinds' margins as :func:`main` stores them (each > 0 when right)."""
    if not absent or not present:
        return None
    pairs = [(a > -p) + 0.5 * (a == -p) for a in absent for p in present]
    return round(sum(pairs) / len(pairs), 4)


def _questions(records: list[dict], max_tokens: int) -> list[tuple[str, dict, str, str]]:
    """``(kind, record, question, the document's number)``: absent questions of one-number no-hijack documents (ids
    ``…-nohijack-…``), and the first question of NIAH records up to ``max_tokens`` tokens."""
    qs = []
    for r in records:
        nums = re.findall(r"\d+", r["context"])
        if "-nohijack-" in r["id"] and len(nums) == 1:
            qs += [("absent", r, qa["question"], nums[0]) for qa in r["qas"]
                   if "does not say" in qa["answers"][0].lower()]
        elif r["task"] == "niah" and r["meta"]["n_tokens"] <= max_tokens:
            qs.append(("present", r, r["qas"][0]["question"], r["qas"][0]["answers"][0]))
    return qs


def fact_pairs(records: list[dict]) -> list[tuple[str, dict, str, str]]:
    """``(kind, record, question, lure)`` for :func:`main`'s ``--fact-docs``: in each fact record, for each main
    attribute whose value kind one absent attribute shares, that absent attribute's first question of the record's
    split about the main entity (``"absent"``, lure: the stated value) and the stated attribute's own question
    (``"present"``, lure: its gold answer, scored against the refusal)."""
    from d2l_fast.training.reading_pools import PERSON_ATTRIBUTES as ATTRS

    out = []
    for r in records:
        main = [qa for qa in r["qas"] if qa.get("qa_kind") == "fact" and qa.get("entity_role") == "main"]
        stated = {qa["attribute"] for qa in main}
        split, entity = r["meta"]["split"], r["meta"]["entity"]
        for qa in main:
            kind = ATTRS[qa["attribute"]]["value"]
            partners = [b for b in sorted(ATTRS) if b not in stated and ATTRS[b]["value"] == kind]
            if partners:
                q = ATTRS[partners[0]]["questions"][split][0].format(name=entity)
                out += [("absent", r, q, qa["answers"][0]), ("present", r, qa["question"], qa["answers"][0])]
    return out


def _score(model, layout, items, max_chunk_len: int) -> tuple[list[dict], dict]:
    rows = []
    for kind, r, q, lure in items:
        adapter = model.internalize([r["context"]], max_chunk_len=max_chunk_len)
        ref, val = answer_logprobs(model, adapter, q, [REFUSAL, lure], **layout)
        margin = ref - val if kind == "absent" else val - ref  # > 0: the greedy reader is right
        rows.append({"id": r["id"], "kind": kind, "question": q, "number": lure, "margin": round(margin, 4)})
    summary = {}
    for kind in ("absent", "present"):
        m = [x["margin"] for x in rows if x["kind"] == kind]
        summary[kind] = {"n": len(m), "mean_margin": round(sum(m) / len(m), 3) if m else None,
                         "right": sum(x > 0 for x in m)}
    summary["separation_auc"] = separation_auc([x["margin"] for x in rows if x["kind"] == "absent"],
                                               [x["margin"] for x in rows if x["kind"] == "present"])
    return rows, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder, or 'smollm2-135m' for the bundled one")
    ap.add_argument("--records", required=True, nargs="+", help="records.jsonl of train_reading.py --eval-only runs")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--max-tokens", type=int, default=256, help="longest NIAH record of the control (tokens)")
    ap.add_argument("--max-chunk-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fact-docs", type=int, default=0, help="also score this many dev fact documents' binding "
                    "pairs (0: off)")
    ap.add_argument("--fact-seed", type=int, default=11, help="seed of the --fact-docs documents")
    a = ap.parse_args(argv)
    if a.max_tokens < 1 or a.max_chunk_len < 1 or a.threads < 1 or a.fact_docs < 0:
        raise SystemExit("--max-tokens, --max-chunk-len and --threads must be ≥ 1, --fact-docs ≥ 0")
    torch.set_num_threads(a.threads)

    from d2l_fast.training.reading_run import load_reader

    model, layout = load_reader(a.checkpoint, a.max_chunk_len)
    report = {"checkpoint": a.checkpoint, "files": {}}
    for path in a.records:
        recs = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
        rows, summary = _score(model, layout, _questions(recs, a.max_tokens), a.max_chunk_len)
        report["files"][path] = {"summary": summary, "rows": rows}
        print(path, json.dumps(summary), flush=True)
    if a.fact_docs:
        from d2l_fast.training.reading import generate_fact_docs

        recs = generate_fact_docs(a.fact_docs, split="dev", seed=a.fact_seed, absent_prob=0.0, general_prob=0.0)
        rows, summary = _score(model, layout, fact_pairs(recs), a.max_chunk_len)
        report["facts"] = {"n_docs": a.fact_docs, "seed": a.fact_seed, "summary": summary, "rows": rows}
        print("facts", json.dumps(summary), flush=True)
    pathlib.Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
