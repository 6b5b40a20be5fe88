"""Does the reader carry a name's pieces in order? For the fact questions of an evaluation's records whose gold is
a multi-token invented word (``--attributes``, default cities and spouses), feed the gold answer teacher-forced and
count, per answer position, how often the greedy choice is the gold token (the prefix before it being gold). A
reader that retrieves the start of a name but not its continuation scores high at position 0 and low after; the
base model without the document is the floor (``--no-adapter``).

    python scripts/piece_accuracy.py --checkpoint runs/reading18/run/checkpoint-1200 \
        --records runs/tr_r18/records.jsonl --out runs/pieces_r18.json

The bundled model card's prompt layout, 256-token chunks (``--max-chunk-len``); positions past ``--max-pos`` are
pooled into the last one.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def piece_hits(model, adapters, question: str, answer_ids: list[int], *, adapter_index: int = 0,
               **layout) -> list[bool]:
    """Per answer position: is the greedy next token after ``question``'s prompt and the gold prefix the gold token?
    (``adapters`` None: the base model.)"""
    if not isinstance(question, str) or not answer_ids or not all(isinstance(t, int) for t in answer_ids):
        raise ValueError(f"expected a question string and a non-empty list of token ids, got {question!r}, "
                         f"{answer_ids!r}")
    from d2l_fast.training.reading_run import answer_logits

    logits = answer_logits(model, adapters, question, answer_ids, adapter_index=adapter_index, **layout)
    return [p == g for p, g in zip(logits.argmax(-1).tolist(), answer_ids)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder, or 'smollm2-135m' for the bundled one")
    ap.add_argument("--records", required=True, help="records.jsonl of a train_reading.py --eval-only run")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--attributes", default="birthplace,home_city,spouse")
    ap.add_argument("--max-pos", type=int, default=4)
    ap.add_argument("--max-chunk-len", type=int, default=256)
    ap.add_argument("--no-adapter", action="store_true", help="score the base model without the document")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    attrs = {x for x in a.attributes.split(",") if x}
    if not attrs or a.max_pos < 0 or a.max_chunk_len < 1 or a.threads < 1:
        raise SystemExit("--attributes must name one or more, --max-pos ≥ 0, --max-chunk-len and --threads ≥ 1")
    torch.set_num_threads(a.threads)

    from d2l_fast.training.reading_run import load_reader

    model, layout = load_reader(a.checkpoint, a.max_chunk_len)
    recs = [json.loads(line) for line in pathlib.Path(a.records).read_text().splitlines() if line.strip()]
    hits, n, exact, n_q = [0] * (a.max_pos + 1), [0] * (a.max_pos + 1), 0, 0
    for r in recs:
        qas = [qa for qa in r["qas"] if qa.get("qa_kind") == "fact" and qa.get("attribute") in attrs]
        if not qas:
            continue
        adapters = None if a.no_adapter else model.internalize([r["context"]], max_chunk_len=a.max_chunk_len)
        for qa in qas:
            gold = model.tokenizer(qa["answers"][0], add_special_tokens=False)["input_ids"]
            got = piece_hits(model, adapters, qa["question"], gold, **layout)
            for k, ok in enumerate(got):
                hits[min(k, a.max_pos)] += ok
                n[min(k, a.max_pos)] += 1
            exact += all(got)
            n_q += 1
    report = {"checkpoint": a.checkpoint, "records": a.records, "no_adapter": a.no_adapter,
              "attributes": sorted(attrs), "questions": n_q, "all_pieces_right": exact,
              "by_position": [{"position": k if k < a.max_pos else f"{k}+", "right": hits[k], "n": n[k]}
                              for k in range(a.max_pos + 1) if n[k]]}
    pathlib.Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
