"""Spec §6 metrics on hand-computed examples (each expected value is worked out in the comment next to it)."""

import math

import pytest

from d2l_fast.training.metrics import (
    answer_words,
    compute_qa_f1,
    compute_rouge_l,
    exact_match,
    humanize,
    length_bins,
    normalize_answer,
    qa_f1,
    rouge_l,
)


@pytest.mark.parametrize("text,expected", [
    ("The  Eiffel\u2013Tower!", "eiffel tower"),              # en dash → '-' → space; 'the' dropped
    ("\u201cHello\u201d\u00a0World\u2026", "hello world"),    # curly quotes, NBSP, ellipsis → spaces
    ("co\u200boper\u00adate", "cooperate"),                   # zero-width space and soft hyphen removed
    ("An apple and the pear", "apple and pear"),              # articles dropped only as whole words
    ("Theater anatomy", "theater anatomy"),
    ("It\u2019s 4,821.", "it s 4 821"),                       # curly apostrophe → "'", every punctuation → space
    ("C:\\path", "c \\path"),                                 # the reference keeps the backslash
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_humanize_and_word_split():
    assert humanize("a\u2014b  \nc\t \nd") == "a-b\nc\nd"     # em dash; trailing spaces/tabs of each line removed
    assert answer_words("state-of-the-art") == ["state", "of", "art"]   # hyphens split; 'the' dropped
    assert answer_words("1990\u20132000") == ["1990", "2000"]


def test_qa_f1_hand_computed():
    # pred words [cat, sat]; gold 'a cat' → [cat]: P 1/2, R 1, F 2/3; gold 'cat sat down': P 1, R 2/3, F 0.8 → best
    assert qa_f1("the cat sat", ["a cat", "cat sat down"]) == pytest.approx((0.8, 1.0, 2 / 3))
    assert qa_f1("Paris", "paris.") == (1.0, 1.0, 1.0)
    assert qa_f1("London", ["Paris"]) == (0.0, 0.0, 0.0)
    assert qa_f1("", [""]) == (0.0, 0.0, 0.0)                  # the reference scores two empty strings 0
    # a repeated word counts once against one gold occurrence: P 1/3, R 1, F 0.5
    assert qa_f1("cat cat cat", "cat") == pytest.approx((0.5, 1 / 3, 1.0))
    # equal F1 for two golds: the first keeps precision/recall (P 1/2, R 1 vs P 1, R 1/2)
    assert qa_f1("red blue", ["red", "red blue green yellow"]) == pytest.approx((2 / 3, 0.5, 1.0))


def test_compute_qa_f1_means():
    means, per = compute_qa_f1(["the cat sat", "London"], [["a cat", "cat sat down"], ["London", "UK"]])
    assert per["qa_f1_score"] == pytest.approx([0.8, 1.0])
    assert means == pytest.approx({"qa_f1_score": 0.9, "qa_precision": 1.0, "qa_recall": (2 / 3 + 1) / 2})
    means, _ = compute_qa_f1([], [])
    assert math.isnan(means["qa_f1_score"])


def test_exact_match():
    assert exact_match("The answer.", "answer") == 1.0
    assert exact_match("4821", ["1234", "4821."]) == 1.0       # NIAH: the 4 digits, punctuation ignored
    assert exact_match("48 21", "4821") == 0.0
    assert exact_match("The special magic number is 4821.", "4821") == 0.0


def test_rouge_l_hand_computed():
    pytest.importorskip("rouge_score")
    # stemmed tokens: pred [the, cat, are, run], ref [a, cat, run]; LCS [cat, run] = 2 → P 1/2, R 2/3, F 4/7
    assert rouge_l("the cats are running", "a cat runs") == pytest.approx(4 / 7)
    assert rouge_l("4821", "4821") == 1.0
    assert rouge_l("1234", "4821") == 0.0
    means, per = compute_rouge_l(["the cats are running", "4821"], ["a cat runs", "4821"])
    assert per["rougeL.f1"] == pytest.approx([4 / 7, 1.0]) and means["rougeL.f1"] == pytest.approx((4 / 7 + 1) / 2)


def test_length_bins_follow_the_reference_half_open_test():
    assert length_bins(100) == [(0, 127), (0, 511), (0, 8191)]
    assert length_bins(127) == [(0, 511), (0, 8191)]           # start ≤ n < end: 127 misses the 0–127 bin
    assert length_bins(600) == [(512, 1023), (0, 8191)]
    assert length_bins(40000) == [(32768, float("inf"))]


def test_metric_input_errors():
    with pytest.raises(TypeError, match="prediction must be a str, got int"):
        qa_f1(5, "5")
    with pytest.raises(ValueError, match="non-empty list of str"):
        qa_f1("x", [])
    with pytest.raises(TypeError, match=r"answers\[1\] must be a str, got NoneType"):
        exact_match("x", ["x", None])
    with pytest.raises(ValueError, match="one gold entry per prediction expected, got 2 predictions and 1"):
        compute_qa_f1(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="predictions must be a list of str"):
        compute_qa_f1("ab", ["a", "b"])
    with pytest.raises(ValueError, match="exactly one reference"):
        compute_rouge_l(["a"], [["a", "b"]])
    with pytest.raises(ValueError, match="n_tokens must be an int ≥ 0, got -1"):
        length_bins(-1)
