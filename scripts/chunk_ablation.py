"""Do a long document's other chunks drown the chunk that holds the needle? Each long NIAH record (more than
``--min-tokens`` tokens, exactly one chunk holding the gold number) of an evaluation's ``records.jsonl`` is answered
three ways from one pass of the encoder and hypernetwork: every chunk's adapter at scale 1 (what ``internalize``
does), only the needle chunk's (the other chunks' scalers 0) and the other chunks at half scale. A reader whose
chunks stay quiet when they hold nothing scores the same on all three.

    python scripts/chunk_ablation.py --checkpoint checkpoints/reading14-step1800 \
        --records runs/dev_r14/records.jsonl --out runs/chunk_ablation_r14.json

Greedy answers with the bundled model card's prompt layout, ``--max-chunk-len`` tokens per chunk (default 256).
Writes one JSON: per-record answers and the counts (exact, "does not say").
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("all", "needle_only", "others_half")


def _scalers(variant: str, n: int, hit: int) -> list[float]:
    other = {"all": 1.0, "needle_only": 0.0, "others_half": 0.5}[variant]
    return [1.0 if i == hit else other for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder, or 'smollm2-135m' for the bundled one")
    ap.add_argument("--records", required=True, help="records.jsonl of a train_reading.py --eval-only run")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--min-tokens", type=int, default=512)
    ap.add_argument("--max-chunk-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.min_tokens < 0 or a.max_chunk_len < 1 or a.threads < 1:
        raise SystemExit("--min-tokens must be ≥ 0, --max-chunk-len and --threads ≥ 1")
    torch.set_num_threads(a.threads)

    from d2l_fast.training.reading_run import load_reader

    model, layout = load_reader(a.checkpoint, a.max_chunk_len)
    recs = [json.loads(line) for line in pathlib.Path(a.records).read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r["task"] == "niah" and r["meta"]["n_tokens"] > a.min_tokens]
    rows, exact, refused = [], dict.fromkeys(VARIANTS, 0), dict.fromkeys(VARIANTS, 0)
    for r in recs:
        question, gold = r["qas"][0]["question"], r["qas"][0]["answers"][0]
        packed = model.pack([r["context"]], max_chunk_len=a.max_chunk_len)
        hits = [i for i, c in enumerate(packed.chunks) if gold in model.tokenizer.decode(c)]
        if len(hits) != 1:  # the number split across two chunks: no single needle chunk to keep
            continue
        n, answers = len(packed.chunks), {}
        with torch.no_grad():
            loras = model.chunk_loras(packed)  # once: the variants differ only in how the chunks are merged
        for v in VARIANTS:
            adapter = model.merge(loras, packed.n_chunks, scalers=torch.tensor(_scalers(v, n, hits[0])))
            answers[v] = model.generate_text([question], adapter, max_new_tokens=12, **layout)[0]
            exact[v] += answers[v].strip() == gold
            refused[v] += "does not say" in answers[v].lower()
        rows.append({"id": r["id"], "n_tokens": r["meta"]["n_tokens"], "n_chunks": n, "needle_chunk": hits[0],
                     "gold": gold, "answers": answers})
        print(n, hits[0], gold, answers, flush=True)
    report = {"checkpoint": a.checkpoint, "records": a.records, "n": len(rows), "exact": exact,
              "does_not_say": refused, "rows": rows}
    pathlib.Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("n", "exact", "does_not_say")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
