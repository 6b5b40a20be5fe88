"""Helpers of the reading-model run (``scripts/train_reading.py``): the evaluation prompt layout for training
records, the base model's own answers to chit-chat questions (cached), chunking a generated dataset for the chunk
stage, and the per-kind breakdown of an evaluation (:func:`reading_report`)."""

from __future__ import annotations

import json
import pathlib
import re
from collections import defaultdict
from collections.abc import Sequence

from .metrics import qa_f1
from .reading_pools import NOT_STATED


def eval_layout(records: Sequence[dict], instruction: str) -> list[dict]:
    """Copies of ``records`` whose questions are rendered with ``instruction`` (a ``{question}`` template), so the
    student sequences of :func:`~.gen_data.generate_data` ask the way ``d2l-fast eval`` does."""
    if not isinstance(instruction, str) or "{question}" not in instruction:
        raise ValueError(f"instruction must be a string with a {{question}} placeholder, got {instruction!r}")
    return [dict(r, qas=[dict(q, question=instruction.format(question=q["question"])) for q in r["qas"]])
            for r in records]


def base_model_answers(model, tokenizer, questions: Sequence[str], *, instruction: str, cache=None,
                       max_new_tokens: int = 48, system: str | None = "") -> dict[str, str]:
    """The base model's greedy answer to each question without any document (prompt: ``instruction`` in the
    evaluation layout), read from / added to the JSON file ``cache``; answers that do not stop are left out."""
    from ..packing import tokenize_prompt
    from .gen_data import teacher_generate

    if isinstance(questions, str) or not all(isinstance(q, str) and q.strip() for q in questions):
        raise ValueError("questions must be a list of non-empty strings")
    path = pathlib.Path(cache) if cache is not None else None
    known = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    todo = [q for q in dict.fromkeys(questions) if q not in known]
    if todo:
        prompts = [tokenize_prompt(tokenizer, instruction.format(question=q), system) for q in todo]
        for q, res in zip(todo, teacher_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, top_k=1)):
            if res is not None:
                text = tokenizer.decode(res[0], skip_special_tokens=True).strip()
                if text:
                    known[q] = text
        if path is not None:
            path.write_text(json.dumps(known, indent=1, ensure_ascii=False) + "\n")
    return {q: known[q] for q in questions if q in known}


def fewshot_examples(seed: int = 0) -> list[tuple[str, str, str]]:
    """Three worked ``(document, question, answer)`` examples for the few-shot in-prompt baseline, all from the
    TRAIN split (its phrasings, entities and number pool — never dev or test): a short fact document with a
    question about one of its facts (the longest answer), a fact document with a question it does not answer
    (:data:`~.reading_pools.NOT_STATED`), and a document with two numbers and a question naming one of them."""
    from .reading import generate_fact_docs, generate_number_docs

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    by_len = lambda r: (len(r["context"]), r["id"])  # noqa: E731
    facts = sorted(generate_fact_docs(20, split="train", seed=seed, min_facts=2, max_facts=3, max_distractors=0,
                                      absent_prob=1.0, general_prob=0.0), key=by_len)
    nums = sorted(generate_number_docs(20, split="train", seed=seed, max_numbers=2, absent_prob=0.0,
                                       general_prob=0.0), key=by_len)
    fact_doc = next(r for r in facts if sum(q["qa_kind"] == "fact" for q in r["qas"]) >= 2)
    fact_qa = max((q for q in fact_doc["qas"] if q["qa_kind"] == "fact"), key=lambda q: len(q["answers"][0]))
    absent_doc = next(r for r in facts if r is not fact_doc and any(q["qa_kind"] == "absent" for q in r["qas"]))
    absent_qa = next(q for q in absent_doc["qas"] if q["qa_kind"] == "absent")
    # locker_code's phrasings name different things (a badge, a seat): not an example to teach with
    num_doc = next(r for r in nums if len(r["qas"]) >= 2 and r["qas"][-1]["attribute"] != "locker_code")
    num_qa = num_doc["qas"][-1]
    return [(r["context"], q["question"], q["answers"][0])
            for r, q in ((fact_doc, fact_qa), (absent_doc, absent_qa), (num_doc, num_qa))]


def chunk_dataset(src, dst, tokenizer, max_chunk_len: int, *, model_name: str | None = None) -> dict:
    """Copy the parquet dataset ``src`` (written by :func:`~.gen_data.generate_data`) to ``dst`` with every
    ``ctx_ids`` longer than ``max_chunk_len`` split into chat-wrapped chunks exactly as ``internalize`` splits it
    (:func:`~d2l_fast.packing.split_ids` with the model's context affixes), stored as ``list<list<int>>`` — the
    trainer encodes each chunk and merges the chunks' LoRAs per context (the reference's chunk stage)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..packing import context_affixes, split_ids

    if isinstance(max_chunk_len, bool) or not isinstance(max_chunk_len, int) or max_chunk_len < 1:
        raise ValueError(f"max_chunk_len must be a positive int, got {max_chunk_len!r}")
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    files = sorted(src.glob("part-*.parquet"))
    if not files:
        raise ValueError(f"{src}: holds no part-*.parquet files")
    dst.mkdir(parents=True, exist_ok=True)
    pre, suf = context_affixes(tokenizer, model_name)
    n_rows = n_split = n_chunks = 0
    for f in files:
        t = pq.read_table(f)
        chunks = [split_ids(ids, max_chunk_len, pre, suf) for ids in t.column("ctx_ids").to_pylist()]
        n_rows += len(chunks)
        n_split += sum(len(c) > 1 for c in chunks)
        n_chunks += sum(len(c) for c in chunks)
        col = pa.array(chunks, type=pa.list_(pa.list_(pa.int32())))
        t = t.set_column(t.schema.get_field_index("ctx_ids"), "ctx_ids", col)
        pq.write_table(t, dst / f.name)
    stats = {"max_chunk_len": max_chunk_len, "rows": n_rows, "rows_split": n_split, "chunks": n_chunks}
    (dst / "chunks.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip("\"'`").rstrip(".").strip()).lower()


def _contains(pred: str, gold: str) -> bool:
    return _norm(gold) in _norm(pred) if _norm(gold) else False


def answer_matches(kind: str, prediction: str, gold: str) -> bool:
    """How :func:`reading_report` marks a ``number`` or ``copy`` answer (the prediction, stripped of quotes and a
    final full stop, is the gold string, case-insensitive) and a ``needle`` / ``general`` one (it contains the gold
    string)."""
    if kind not in ("number", "copy", "needle", "general"):
        raise ValueError(f"kind must be 'number', 'copy', 'needle' or 'general', got {kind!r}")
    return _norm(prediction) == _norm(gold) if kind in ("number", "copy") else _contains(prediction, gold)


def qa_index(records: Sequence[dict]) -> dict[str, tuple[dict, dict]]:
    """``{"<record id>/<j>": (record, qa)}`` — the sample ids ``d2l-fast eval`` writes."""
    return {f"{r['id']}/{j}": (r, qa) for r in records for j, qa in enumerate(r["qas"])}


def blind_floor(qas: Sequence[dict]) -> float:
    """The best mean F1 one constant answer (any of the gold answers) earns on ``qas``: what answering without
    reading the document can reach by format and prior alone."""
    golds = sorted({qa["answers"][0] for qa in qas})
    if not golds:
        return float("nan")
    return max(sum(qa_f1(g, qa["answers"])[0] for qa in qas) / len(qas) for g in golds)


def reading_report(records: Sequence[dict], rows: Sequence[dict]) -> dict:
    """Per method: fact F1 per attribute (with :func:`blind_floor`), number exact recall (the prediction, stripped
    of quotes and a final full stop, equals the gold string) by number kind and digit count, needle recall (gold
    contained) by length bin, long-document F1 by bin, and no-hijack scores: ``general`` (gold contained),
    ``absent`` (answers :data:`~.reading_pools.NOT_STATED`) and ``chitchat`` (F1 against the base answer); copy
    needles (train split only): exact recall by value kind and F1.
    ``rows`` are ``samples.jsonl`` rows of :func:`~.evaluate.evaluate` on ``records``."""
    index = qa_index(records)
    acc: dict = defaultdict(lambda: defaultdict(list))
    fact_qas: dict = defaultdict(list)
    for r in records:
        for qa in r["qas"]:
            if qa.get("qa_kind") == "fact" and r["meta"].get("kind") == "facts":
                fact_qas[qa["attribute"]].append(qa)
    for row in rows:
        if row["sample_id"] not in index:
            raise ValueError(f"sample {row['sample_id']!r} is not a question of the given records")
        rec, qa = index[row["sample_id"]]
        m, pred, gold, kind = row["method"], row["prediction"], qa["answers"][0], qa.get("qa_kind", "fact")
        rkind = rec["meta"].get("kind", "?")
        a = acc[m]
        f1 = qa_f1(pred, qa["answers"])[0]
        if kind == "fact":
            a[f"{rkind}/f1/{qa['attribute']}"].append(f1)
            a[f"{rkind}/f1/all"].append(f1)
        elif kind in ("number", "needle"):
            ok = float(answer_matches(kind, pred, gold))
            a[f"{rkind}/exact/all"].append(ok)
            a[f"{rkind}/exact/{qa.get('number_kind')}"].append(ok)
            a[f"{rkind}/exact/digits={qa.get('digits')}"].append(ok)
        elif kind == "copy":  # copy needles (train split only): exact string, by value kind
            ok = float(answer_matches("copy", pred, gold))
            a["copy/exact/all"].append(ok)
            a[f"copy/exact/{qa.get('value_kind')}"].append(ok)
            a["copy/f1/all"].append(f1)
        elif kind == "general":
            a["nohijack/general/accuracy"].append(float(answer_matches(kind, pred, gold)))
        elif kind == "absent":
            a[f"nohijack/absent/{rkind}"].append(float(_norm(pred) == _norm(NOT_STATED)))
        elif kind == "chitchat":
            a["nohijack/chitchat/f1_vs_base"].append(f1)
        if "bin" in rec["meta"] and kind in ("fact", "number", "needle", "copy"):
            lo, hi = rec["meta"]["bin"]
            a[f"{rkind}/by_bin/{lo}-{hi}"].append(f1 if kind == "fact" else float(_contains(pred, gold)))
    out = {m: {k: {"n": len(v), "mean": sum(v) / len(v)} for k, v in sorted(d.items())} for m, d in acc.items()}
    out["blind_floor_f1"] = {a: blind_floor(q) for a, q in sorted(fact_qas.items())}
    return out


def answer_logits(model, adapters, question: str, answer_ids: Sequence[int], *, adapter_index: int = 0,
                  **layout):
    """Teacher-forced next-token logits [len(answer_ids), vocab] (float) at each answer position: ``question`` in
    the model's prompt layout (or ``layout``), then ``answer_ids``, through adapter ``adapter_index`` of
    ``adapters`` (None: the base model) — the reading diagnostics' one forward."""
    import torch

    answer_ids = list(answer_ids)
    if not answer_ids:
        raise ValueError("expected a non-empty list of answer token ids")
    ids, _ = model.encode_prompts([question], **layout)
    full = torch.cat([ids, torch.tensor([answer_ids], device=ids.device)], 1)
    index = None if adapters is None else torch.tensor([adapter_index], device=ids.device)
    with torch.no_grad():
        logits = model(full, torch.ones_like(full), adapters=adapters, adapter_index=index).logits
    return logits[0, ids.shape[1] - 1:-1].float()


def load_reader(checkpoint, max_chunk_len: int = 256):
    """``(model, layout)`` for the reading diagnostics: ``checkpoint`` (a run's checkpoint folder or a bundled name)
    on SmolLM2-135M-Instruct chunking at ``max_chunk_len``, and the bundled ``smollm2-135m`` card's prompt layout
    (``{"system", "instruction"}``) — the layout every reading run trains with; a run's checkpoint carries no card."""
    from .. import zoo

    if isinstance(max_chunk_len, bool) or not isinstance(max_chunk_len, int) or max_chunk_len < 1:
        raise ValueError(f"max_chunk_len must be an int ≥ 1, got {max_chunk_len!r}")
    model = zoo.pretrained(checkpoint, base_model="smollm2-135m", max_chunk_len=max_chunk_len)
    return model, zoo.prompt_layout(zoo.read_model_card(zoo.BUNDLED["smollm2-135m"].folder))


__all__ = ["NOT_STATED", "answer_matches", "base_model_answers", "blind_floor", "chunk_dataset", "eval_layout",
           "answer_logits", "fewshot_examples", "load_reader", "qa_index", "reading_report"]
