"""scripts/absent_margin.py: teacher-forced answer log-probabilities equal the greedy decoder's own, through the
named adapter, and the questions it scores are the right ones."""

import pytest
import torch

from tests._numerics import BATCHED_LOGITS
from tests._scripts import load_script
from tests._tiny import tiny_reader


@pytest.fixture(scope="module")
def tiny_d2l():
    m = tiny_reader(seed=1)
    return m, m.internalize(["The fox watched the boats.", "Rain fell on the quiet town all night."])


@pytest.mark.parametrize("index", [0, 1, None])
def test_answer_logprob_equals_the_greedy_decoders_scores(tiny_d2l, index):
    mod = load_script("absent_margin")
    m, ad = tiny_d2l
    adapters = None if index is None else ad
    ids, mask = m.encode_prompts(["Who watched the boats?"])
    out = m.generate(ids, mask, adapters=adapters, adapter_index=None if index is None else torch.tensor([index]),
                     max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    gen = out.sequences[0, ids.shape[1]:].tolist()
    want = sum(torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, gen))
    got = mod.answer_logprobs(m, adapters, "Who watched the boats?", [gen], adapter_index=index or 0)
    assert got[0] == pytest.approx(want, abs=BATCHED_LOGITS["atol"] * len(gen))
    ids_of = m.tokenizer("the boats", add_special_tokens=False)["input_ids"]
    as_text, as_ids = mod.answer_logprobs(m, adapters, "Who watched the boats?", ["the boats", ids_of],
                                          adapter_index=index or 0)
    assert as_text == as_ids  # a string answer is scored as its tokens: the same forward on the same ids


def test_answer_logprob_follows_the_adapter_index_and_checks_its_input(tiny_d2l):
    mod = load_script("absent_margin")
    m, ad = tiny_d2l
    q, answers = "Where did the rain fall?", ["On the town.", "The document does not say."]
    by_index = [mod.answer_logprobs(m, ad, q, answers, adapter_index=i) for i in (0, 1)]
    assert by_index[0] != by_index[1] and by_index[0] != mod.answer_logprobs(m, None, q, answers)
    assert all(x < 0 for x in by_index[0] + by_index[1])
    with pytest.raises(ValueError, match="non-empty list of answers"):
        mod.answer_logprobs(m, ad, q, "On the town.")
    with pytest.raises(ValueError, match="empty after tokenisation"):
        mod.answer_logprobs(m, ad, q, [""])


def test_questions_picks_absent_questions_of_one_number_documents_and_short_needles():
    mod = load_script("absent_margin")
    refuse = ["The document does not say."]
    records = [
        {"id": "reading-dev-nohijack-1-00000", "task": "qa", "context": "The code is 4471. Rain fell.",
         "qas": [{"question": "What is the ferry gate?", "answers": refuse},
                 {"question": "What is the capital of France?", "answers": ["Paris"]}]},
        {"id": "reading-dev-nohijack-1-00001", "task": "qa", "context": "Codes 12 and 34.",
         "qas": [{"question": "What is the ferry gate?", "answers": refuse}]},
        {"id": "reading-dev-facts-1-00000", "task": "qa", "context": "Ann was born in 1974.",
         "qas": [{"question": "Where does Ann live?", "answers": refuse}]},
        {"id": "reading-dev-niah-1-00000", "task": "niah", "context": "x 55 y", "meta": {"n_tokens": 100},
         "qas": [{"question": "Which number?", "answers": ["55"]}]},
        {"id": "reading-dev-niah-1-00001", "task": "niah", "context": "x 66 y", "meta": {"n_tokens": 900},
         "qas": [{"question": "Which number?", "answers": ["66"]}]},
    ]
    got = [(k, r["id"], q, n) for k, r, q, n in mod._questions(records, max_tokens=256)]
    assert got == [("absent", "reading-dev-nohijack-1-00000", "What is the ferry gate?", "4471"),
                   ("present", "reading-dev-niah-1-00000", "Which number?", "55")]


def test_separation_auc_ranks_absent_above_answered_and_ignores_a_shared_lean():
    auc = load_script("absent_margin").separation_auc
    # margins as stored: absent = ref - num, answered = num - ref; a lean to refuse adds c to one, -c to the other
    assert auc([1.0, 2.0], [1.0, 0.5]) == 1.0 and auc([-1.0], [1.0]) == 0.5 and auc([-3.0], [2.0]) == 0.0
    for c in (-2.0, 0.5, 3.0):
        assert auc([1.0 + c, -0.5 + c], [0.2 - c, 0.9 - c]) == auc([1.0, -0.5], [0.2, 0.9]) == 0.75
    assert auc([], [1.0]) is None and auc([1.0], []) is None


def test_fact_pairs_ask_the_unstated_partner_of_a_stated_city():
    from d2l_fast.training.reading import generate_fact_docs
    from d2l_fast.training.reading_pools import PERSON_ATTRIBUTES as ATTRS

    pairs = load_script("absent_margin").fact_pairs
    recs = generate_fact_docs(40, split="dev", seed=11, absent_prob=0.0, general_prob=0.0)
    items = pairs(recs)
    assert items and len(items) % 2 == 0 and {k for k, *_ in items} == {"absent", "present"}
    for (k1, r1, q_absent, lure), (k2, r2, q_present, gold) in zip(items[::2], items[1::2]):
        assert (k1, k2) == ("absent", "present") and r1 is r2 and lure == gold and lure in r1["context"]
        main = {qa["attribute"]: qa for qa in r1["qas"] if qa.get("entity_role") == "main"}
        stated = next(a for a, qa in main.items() if qa["question"] == q_present)
        asked = [b for b in ATTRS if ATTRS[b]["questions"]["dev"][0].format(name=r1["meta"]["entity"]) == q_absent]
        assert len(asked) == 1 and asked[0] not in main and ATTRS[asked[0]]["value"] == ATTRS[stated]["value"]
    # a document stating both cities (or neither) has no pair
    both = [r for r in recs if {"birthplace", "home_city"} <= {qa["attribute"] for qa in r["qas"]
                                                               if qa.get("entity_role") == "main"}]
    assert both and not pairs(both)
