"""Evaluation metrics of spec §6: QA F1 (with precision and recall), exact match, ROUGE-L and the length bins.

Normalisation (the reference's, in this order):

1. unicode clean-up: hidden characters (soft hyphen, zero-width and bidi marks, BOM, …) removed, trailing spaces
   of each line removed, NBSP → space, en/em dashes → ``-``, curly double quotes and guillemets → ``"``, curly
   apostrophes → ``'``, ``…`` → ``...``;
2. lower-case;
3. every ASCII punctuation character → a space — except the backslash, which the reference's regular expression
   character class escapes away and so keeps (reproduced here on purpose);
4. the words ``a``, ``an``, ``the`` removed; whitespace collapsed.

Words are then split on hyphens and whitespace. F1 is the bag-of-words F1 (0 when nothing is shared, also for two
empty strings), maximised over the gold answers (the first gold reaching the maximum supplies precision and
recall); corpus scores are means over samples. ROUGE-L is ``rouge_score``'s ``rougeL`` F-measure with Porter
stemming (``pip install rouge-score``; imported only when used).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_HIDDEN = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]")
_TRAILING_WS = re.compile(r"[ \t\x0b\f]+$", re.MULTILINE)
_REPLACE = [
    (re.compile("\u00a0"), " "),
    (re.compile("[\u2014\u2013]+"), "-"),
    (re.compile("[\u201c\u201d\u00ab\u00bb\u201e]"), '"'),
    (re.compile("[\u2018\u2019\u02bc]"), "'"),
    (re.compile("\u2026"), "..."),
]
_PUNCT = re.compile("[" + re.escape(string.punctuation.replace("\\", "")) + "]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SPLIT = re.compile(r"[-\s]")

# Context-length bins of the reference (token counts), tested as start ≤ n < end like the reference does — so a
# length equal to a bin's stated end (127, 255, …) is outside that bin, as in the reference's reports.
LENGTH_BINS: list[tuple[int, float]] = [
    (0, 127), (128, 255), (256, 511),
    (0, 511), (512, 1023), (1024, 2047), (2048, 4095), (4096, 8191), (0, 8191), (8192, 16383), (16384, 32767),
    (32768, float("inf")),
]


def _check_text(x, what: str) -> str:
    if not isinstance(x, str):
        raise TypeError(f"{what} must be a str, got {type(x).__name__}")
    return x


def _check_answers(answers, what: str = "answers") -> list[str]:
    if isinstance(answers, str):
        return [answers]
    if not isinstance(answers, Sequence) or len(answers) == 0:
        raise ValueError(f"{what} must be a str or a non-empty list of str, got {answers!r}")
    return [_check_text(a, f"{what}[{i}]") for i, a in enumerate(answers)]


def humanize(text: str) -> str:
    """Step 1 of the normalisation: unicode clean-up (see the module docstring)."""
    text = _TRAILING_WS.sub("", _HIDDEN.sub("", _check_text(text, "text")))
    for pat, rep in _REPLACE:
        text = pat.sub(rep, text)
    return text


def normalize_answer(text: str) -> str:
    """The reference's answer normalisation (module docstring): ``"The  Eiffel–Tower!"`` → ``"eiffel tower"``."""
    text = _PUNCT.sub(" ", humanize(text).lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_words(text: str) -> list[str]:
    """Normalised words of ``text``, split on hyphens and whitespace."""
    return [w for w in _SPLIT.split(normalize_answer(text)) if w]


def _f1(pred: list[str], gold: list[str]) -> tuple[float, float, float]:
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    p, r = same / len(pred), same / len(gold)
    return 2 * p * r / (p + r), p, r


def qa_f1(prediction: str, answers) -> tuple[float, float, float]:
    """``(f1, precision, recall)`` of one prediction against one or more gold answers (best F1 over the golds)."""
    pred = answer_words(_check_text(prediction, "prediction"))
    best = (0.0, 0.0, 0.0)
    for a in _check_answers(answers):
        score = _f1(pred, answer_words(a))
        if score[0] > best[0]:
            best = score
    return best


def exact_match(prediction: str, answers) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0."""
    pred = normalize_answer(_check_text(prediction, "prediction"))
    return float(any(pred == normalize_answer(a) for a in _check_answers(answers)))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure with Porter stemming (``rouge_score``), as the reference reports for PwC and NIAH."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError("ROUGE-L needs the rouge-score package: pip install rouge-score") from e
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(scorer.score(_check_text(reference, "reference"), _check_text(prediction, "prediction"))["rougeL"]
                 .fmeasure)


def _pairs(predictions, answers_list, what: str) -> list[tuple[str, list[str]]]:
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise TypeError(f"predictions must be a list of str, got {type(predictions).__name__}")
    if isinstance(answers_list, str) or not isinstance(answers_list, Sequence) or len(answers_list) != len(predictions):
        n = len(answers_list) if isinstance(answers_list, Sequence) and not isinstance(answers_list, str) else "?"
        raise ValueError(f"{what}: one gold entry per prediction expected, got {len(predictions)} predictions and {n}")
    return [(_check_text(p, f"predictions[{i}]"), _check_answers(a, f"answers[{i}]"))
            for i, (p, a) in enumerate(zip(predictions, answers_list))]


def compute_qa_f1(predictions: Sequence[str], answers_list: Sequence) -> tuple[dict[str, float], dict[str, list]]:
    """Corpus QA F1: ``({"qa_f1_score", "qa_precision", "qa_recall"}: means, same keys: per-sample lists)``.
    The means of an empty corpus are NaN."""
    per = {"qa_f1_score": [], "qa_precision": [], "qa_recall": []}
    for p, a in _pairs(predictions, answers_list, "compute_qa_f1"):
        f, pr, rc = qa_f1(p, a)
        per["qa_f1_score"].append(f)
        per["qa_precision"].append(pr)
        per["qa_recall"].append(rc)
    return {k: (sum(v) / len(v) if v else float("nan")) for k, v in per.items()}, per


def compute_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> tuple[dict[str, float], dict[str, list]]:
    """Corpus ROUGE-L: ``({"rougeL.f1": mean}, {"rougeL.f1": per-sample})`` against one reference per sample."""
    pairs = _pairs(predictions, references, "compute_rouge_l")
    if any(len(a) != 1 for _, a in pairs):
        raise ValueError("compute_rouge_l takes exactly one reference string per prediction")
    per = [rouge_l(p, a[0]) for p, a in pairs]
    return {"rougeL.f1": sum(per) / len(per) if per else float("nan")}, {"rougeL.f1": per}


def length_bins(n_tokens: int) -> list[tuple[int, float]]:
    """All :data:`LENGTH_BINS` a context of ``n_tokens`` tokens is reported in (start ≤ n < end)."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int ≥ 0, got {n_tokens!r}")
    return [(s, e) for s, e in LENGTH_BINS if s <= n_tokens < e]


__all__ = ["LENGTH_BINS", "answer_words", "compute_qa_f1", "compute_rouge_l", "exact_match", "humanize",
           "length_bins", "normalize_answer", "qa_f1", "rouge_l"]
