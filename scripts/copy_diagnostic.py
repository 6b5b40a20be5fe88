"""Does a reading checkpoint copy words it has not memorised? Copy-needle documents (train pools,
``generate_copy_docs``) are asked twice: with their invented values, and with the same documents whose word and name
values are swapped for ordinary real ones ("Lisbon", "Maria Lopez"); codes stay. A reader that copies scores on
both; one that picks from the value sets it was trained on (digits, instruments, professions) scores on neither.

    python scripts/copy_diagnostic.py --checkpoint d2l_fast/data/pretrained/smollm2-135m --out runs/copydiag

Writes ``OUT/samples.jsonl`` (``d2l-fast eval``'s rows), ``OUT/records.jsonl`` and ``OUT/copy_report.json`` (the
``copy/*`` rows of ``reading_report``: exact recall per value kind, ``real_word`` / ``real_person`` for the swapped
values) and prints the report.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

import torch

REAL_WORDS = ["Aurora", "Lisbon", "Mercury", "Buttercup", "Oslo", "Thunder", "Madrid", "Sparrow", "Vienna", "Orion",
              "Biscuit", "Harmony", "Dublin", "Falcon", "Juniper", "Atlas", "Clover", "Zurich", "Marble", "Phoenix"]
REAL_PEOPLE = ["Maria Lopez", "John Carter", "Anna Berg", "Peter Walsh", "Laura Chen", "David Brown", "Sofia Rossi",
               "Thomas Green", "Emma Fischer", "James Moore", "Olivia King", "Lucas Silva"]


def with_real_values(records: list[dict], seed: int = 0) -> list[dict]:
    """Copies of copy-needle ``records`` whose ``word`` / ``person`` values are replaced, in the context and the gold
    answer, by real ones not already in the document (``value_kind`` becomes ``real_word`` / ``real_person``)."""
    rng = random.Random(seed)
    out = []
    for r in records:
        r2 = json.loads(json.dumps(r))
        r2["id"] = r["id"].replace("-copy-", "-copyreal-")
        for qa in r2["qas"]:
            if qa.get("qa_kind") != "copy" or qa["value_kind"] not in ("word", "person"):
                continue
            pool = REAL_PEOPLE if qa["value_kind"] == "person" else REAL_WORDS
            new = rng.choice([v for v in pool if v not in r2["context"]])
            r2["context"] = r2["context"].replace(qa["answers"][0], new)
            qa["answers"], qa["value_kind"] = [new], "real_" + qa["value_kind"]
        out.append(r2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-per-bin", type=int, default=15, help="documents per bin (32–128, 128–256 tokens)")
    ap.add_argument("--seed", type=int, default=100, help="data seed (100: the train-split evaluation seed)")
    ap.add_argument("--chunk-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.n_per_bin < 1:
        ap.error(f"--n-per-bin must be ≥ 1, got {a.n_per_bin}")
    torch.set_num_threads(a.threads)
    from d2l_fast import D2LModel
    from d2l_fast.demo import load_smollm2
    from d2l_fast.training.evaluate import evaluate
    from d2l_fast.training.generators import write_records
    from d2l_fast.training.reading import generate_copy_docs
    from d2l_fast.training.reading_run import reading_report
    from d2l_fast.training.reading_tables import load_eval_dir

    base, tok = load_smollm2()
    model = D2LModel.from_checkpoint(a.checkpoint, base_model=base, tokenizer=tok)
    recs = generate_copy_docs(tok, bins=((32, 128), (128, 256)), n_per_bin=a.n_per_bin, seed=a.seed, max_needles=2,
                              absent_prob=0.0)
    recs += with_real_values(recs)
    out = pathlib.Path(a.out)
    evaluate(model, recs, out, methods=["d2l"], max_new_tokens=16, overwrite=True, max_chunk_len=a.chunk_len)
    _, rows = load_eval_dir(out, recs)
    report = {k: v for k, v in reading_report(recs, rows)["d2l"].items() if k.startswith("copy/")}
    write_records(recs, out / "records.jsonl")
    (out / "copy_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
