"""Does the filler's style decide whether a reader answers a needle? The old generator's needles
(``d2l_fast.training.generators.generate_niah``: "The special magic number is N." in its eight landscape sentences,
the bundled model's own test) are answered three ways through one checkpoint: in their own filler, and with the
same needle sentence at the same sentence position in corpus filler of the reading data's train and dev splits
(``reading_sources.filler_sources``). A reader that learned what a needle is, not what its filler looks like,
scores the same on all three.

    python scripts/filler_swap.py --checkpoint checkpoints/reading14-step1800 --out runs/filler_swap_r14.json

Greedy answers with the bundled model card's prompt layout, 256-token chunks. Writes one JSON: counts (exact,
"does not say") per filler and every answer.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def swap_filler(context: str, gold: str, sources, rng: random.Random) -> str:
    """``context`` with every sentence but the one holding ``gold`` replaced by a run of ``sources``' sentences."""
    sents = [s.rstrip(".") for s in context.split(". ") if s]
    k = next(i for i, s in enumerate(sents) if gold in s)
    name, pool = rng.choice(sources)
    n = len(sents) - 1
    start = rng.randrange(max(1, len(pool) - n))
    fill = [s.rstrip(".") for s in pool[start:start + n]]
    while len(fill) < n:
        fill += fill
    fill = fill[:n]
    return ". ".join(fill[:k] + [sents[k]] + fill[k:]) + "."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder, or 'smollm2-135m' for the bundled one")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--n-per-bin", type=int, default=16, help="needles per bin (32–128, 128–256 tokens)")
    ap.add_argument("--seed", type=int, default=2026, help="the old generator's seed (the bundled test's: 2026)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.n_per_bin < 1:
        ap.error(f"--n-per-bin must be at least 1, got {a.n_per_bin}")
    torch.set_num_threads(a.threads)

    from d2l_fast.answering import compare_answers
    from d2l_fast.training.generators import NIAH_TRAIN_BINS, generate_niah
    from d2l_fast.training.reading_run import load_reader
    from d2l_fast.training.reading_sources import filler_sources

    model, layout = load_reader(a.checkpoint, 256)
    docs = generate_niah(model.tokenizer, bins=NIAH_TRAIN_BINS, n_per_bin=a.n_per_bin, seed=a.seed)
    golds = [d["qas"][0]["answers"][0] for d in docs]
    questions = [d["qas"][0]["question"] for d in docs]
    variants = {"own filler": [d["context"] for d in docs]}
    for split in ("train", "dev"):
        rng, sources = random.Random(0), filler_sources(split)
        variants[f"{split} corpus filler"] = [swap_filler(d["context"], g, sources, rng) for d, g in zip(docs, golds)]
    result = {"checkpoint": a.checkpoint, "n": len(docs), "counts": {}, "answers": {}}
    for name, contexts in variants.items():
        got = compare_answers(model, contexts, questions, methods=("d2l",), max_new_tokens=8, **layout)["d2l"]
        exact = sum(x.strip() == g for x, g in zip(got, golds))
        refused = sum("does not say" in x for x in got)
        result["counts"][name] = {"exact": exact, "does_not_say": refused}
        result["answers"][name] = [{"gold": g, "answer": x, "context": c} for g, x, c in zip(golds, got, contexts)]
        print(f"{name}: {exact}/{len(docs)} exact, {refused} 'does not say'", flush=True)
    pathlib.Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
