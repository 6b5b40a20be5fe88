"""scripts/filler_swap.py's swap: the needle sentence stays at its sentence position, every other sentence is
replaced by a run of the given sources' sentences, and the document keeps its sentence count."""

import random

from d2l_fast.training.generators import FILLER_BLOCK, NIAH_TRAIN_BINS, generate_niah
from d2l_fast.training.reading_sources import filler_sources
from tests._scripts import load_script


def _swap():
    return load_script("filler_swap").swap_filler


def test_swap_keeps_the_needle_and_its_position_and_replaces_every_other_sentence():
    swap = _swap()
    docs = generate_niah(lambda t: len(t.split()), bins=NIAH_TRAIN_BINS, n_per_bin=4, seed=3)
    sources = filler_sources("dev")
    pool = {s.rstrip(".") for _, sents in sources for s in sents}
    for d in docs:
        gold = d["qas"][0]["answers"][0]
        before = [s.rstrip(".") for s in d["context"].split(". ") if s]
        after = [s.rstrip(".") for s in swap(d["context"], gold, sources, random.Random(1)).split(". ") if s]
        k = next(i for i, s in enumerate(before) if gold in s)
        assert len(after) == len(before) and after[k] == before[k]
        others = after[:k] + after[k + 1:]
        assert all(s in pool for s in others) and not set(others) & {s.rstrip(".") for s in FILLER_BLOCK}
