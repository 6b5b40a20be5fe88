"""scripts/piece_accuracy.py: teacher-forced greedy hits per answer position, through the named adapter."""

import pytest
import torch

from tests._scripts import load_script
from tests._tiny import tiny_reader


@pytest.fixture(scope="module")
def tiny_d2l():
    m = tiny_reader(seed=3)
    return m, m.internalize(["Mira was born in Quelport.", "The lighthouse keeper plays the oboe."])


@pytest.mark.parametrize("index", [0, 1, None])
def test_own_greedy_answer_is_right_at_every_position_and_a_changed_token_is_not(tiny_d2l, index):
    hits = load_script("piece_accuracy").piece_hits
    m, ad = tiny_d2l
    adapters = None if index is None else ad
    q = "Where was Mira born?"
    ids, mask = m.encode_prompts([q])
    out = m.generate(ids, mask, adapters=adapters, adapter_index=None if index is None else torch.tensor([index]),
                     max_new_tokens=5, do_sample=False)
    gen = out[0, ids.shape[1]:].tolist()
    assert hits(m, adapters, q, gen, adapter_index=index or 0) == [True] * len(gen)
    wrong = list(gen)
    wrong[2] = (wrong[2] + 1) % m.vocab_size  # not the greedy choice at position 2; positions 0-1 unchanged
    got = hits(m, adapters, q, wrong, adapter_index=index or 0)
    assert got[:3] == [True, True, False]


def test_piece_hits_checks_its_input(tiny_d2l):
    hits = load_script("piece_accuracy").piece_hits
    m, ad = tiny_d2l
    with pytest.raises(ValueError, match="non-empty list of token ids"):
        hits(m, ad, "Where?", [])
    with pytest.raises(ValueError, match="non-empty list of token ids"):
        hits(m, ad, "Where?", "Quelport")
