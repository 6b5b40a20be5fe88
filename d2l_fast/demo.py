"""The demo's data: documents with questions and gold answers for ``d2l-fast demo`` / ``d2l-fast profile``.

* SmolLM2 loading lives in :mod:`d2l_fast.smollm2`; ``load_smollm2``, ``smollm2_path``,
  ``default_smollm2_cache_dir``, ``SMOLLM2_GGUF`` and ``SMOLLM2_INSTALL_HINT`` stay importable from here.
* :func:`demo_docs`: the bundled demo documents (title, text, question, answer), for an untrained hypernetwork.
* :func:`pretrained_demo_docs`: NIAH and held-out fact documents with gold answers, for a trained one;
  :func:`reading_demo_docs`: needle, fact and number documents of the reading data's held-out test split, for a
  checkpoint whose model card says it was trained on the reading data (:func:`trained_on_reading`);
  :func:`checkpoint_demo_docs` picks between the two by the model card.
* :func:`answer_is_correct`: how the demo marks an answer right; :func:`demo_checkpoint`: what the demo loads.

The runs that print (``run_demo``, ``run_profile``) are the command line's: :mod:`d2l_fast.cli.demo` and
:mod:`d2l_fast.cli.profile`. transformers is imported lazily so that ``import d2l_fast.demo`` stays cheap.
"""

from __future__ import annotations

import json
import logging
from importlib import resources

from .smollm2 import (  # their home is d2l_fast.smollm2; kept importable from here
    SMOLLM2_GGUF,
    SMOLLM2_INSTALL_HINT,
    default_smollm2_cache_dir,
    load_smollm2,
    smollm2_path,
)

__all__ = [
    "DEMO_PRETRAINED",
    "READING_DATA",
    "TASK_LABELS",
    "UNTRAINED_MAX_CHUNK_LEN",
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL_HINT",
    "answer_is_correct",
    "checkpoint_demo_docs",
    "default_smollm2_cache_dir",
    "demo_checkpoint",
    "demo_docs",
    "load_smollm2",
    "pretrained_demo_docs",
    "reading_demo_docs",
    "smollm2_path",
    "trained_on_reading",
]

logger = logging.getLogger(__name__)

#: the runs that moved to the command line: old name here → its home now
_MOVED = {"run_demo": "d2l_fast.cli.demo", "run_profile": "d2l_fast.cli.profile"}


def __getattr__(name: str):
    if name in _MOVED:  # the library does not print: the runs are the CLI's (importing them here would be a cycle)
        raise AttributeError(f"d2l_fast.demo.{name} moved to {_MOVED[name]}.{name} (the command line's run); "
                             f"import it from there")
    raise AttributeError(f"module 'd2l_fast.demo' has no attribute {name!r}")


def demo_docs() -> list[dict[str, str]]:
    """The bundled demo documents: dicts with ``title``, ``text``, ``question`` and ``answer``."""
    return json.loads(resources.files("d2l_fast").joinpath("data/demo_docs.json").read_text(encoding="utf-8"))


#: the pretrained hypernetwork ``d2l-fast demo`` uses when this build ships it
DEMO_PRETRAINED = "smollm2-135m"
#: seed of the demo's NIAH and fact documents (the fact documents are the generators' held-out "test" split)
DEMO_DATA_SEED = 2024
#: the model card's ``training_data`` of a checkpoint trained on :mod:`d2l_fast.training.reading`'s data
READING_DATA = "reading"


def _check_n_docs(n_docs) -> int:
    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 1:
        raise ValueError(f"n_docs must be a positive int, got {n_docs!r}")
    return n_docs


def _interleave_bins(records: list[dict], n_bins: int, per_bin: int, n: int) -> list[dict]:
    """The first ``n`` of ``records`` (``per_bin`` per length bin, bin by bin) taken alternately from each bin."""
    by_bin = [records[b * per_bin:(b + 1) * per_bin] for b in range(n_bins)]
    return [r for group in zip(*by_bin) for r in group][:n]


def pretrained_demo_docs(tokenizer, n_docs: int = 8, *, seed: int = DEMO_DATA_SEED) -> list[dict[str, str]]:
    """Documents with gold answers for a trained hypernetwork: the first ``ceil(n_docs / 2)`` needle-in-a-haystack
    contexts (32–256 tokens, :func:`~d2l_fast.training.generators.generate_niah`), then synthetic fact documents of
    the held-out ``"test"`` split (:func:`~d2l_fast.training.generators.generate_facts`: entities and phrasings
    never used for training), one question each. Dicts with ``title``, ``text``, ``question``, ``answer``,
    ``task`` (``"niah"`` / ``"qa"``); deterministic given ``seed``."""
    from .training.generators import NIAH_TRAIN_BINS, generate_facts, generate_niah

    _check_n_docs(n_docs)
    n_niah = (n_docs + 1) // 2
    per_bin = -(-n_niah // len(NIAH_TRAIN_BINS))
    niah = generate_niah(tokenizer, bins=NIAH_TRAIN_BINS, n_per_bin=per_bin, seed=seed, id_prefix="demo-niah")
    niah = _interleave_bins(niah, len(NIAH_TRAIN_BINS), per_bin, n_niah)
    facts = generate_facts(n_docs - n_niah, split="test", seed=seed) if n_docs > n_niah else []
    docs = []
    for r in niah + facts:
        qa = r["qas"][0]
        title = (f"needle, {r['meta']['n_tokens']} tokens" if r["task"] == "niah"
                 else f"facts about {r['meta']['entity']}")
        docs.append({"title": title, "text": r["context"], "question": qa["question"], "answer": qa["answers"][0],
                     "task": r["task"]})
    return docs


def reading_demo_docs(tokenizer, n_docs: int = 9, *, seed: int = DEMO_DATA_SEED) -> list[dict[str, str]]:
    """Documents with gold answers for a checkpoint trained on the reading data, all of the held-out ``"test"``
    split of :mod:`d2l_fast.training.reading` (entities, phrasings, numbers and filler prose never used for
    training): ``ceil(n_docs / 3)`` needle-in-a-haystack contexts (32–256 tokens, alternating the two length bins,
    :func:`~d2l_fast.training.reading.generate_niah_docs`), then about half the rest prose fact documents
    (:func:`~d2l_fast.training.reading.generate_fact_docs`), then number documents
    (:func:`~d2l_fast.training.reading.generate_number_docs`). One question each: the needle's, or a question about
    the document's main entity (the i-th document of a kind asks its i-th such question, so that the attributes
    vary). Dicts with ``title``, ``text``, ``question``, ``answer`` and ``task`` (``"needle"`` / ``"fact"`` /
    ``"number"``); deterministic given ``seed``."""
    from .training.reading import NIAH_TRAIN_BINS, generate_fact_docs, generate_niah_docs, generate_number_docs

    _check_n_docs(n_docs)
    n_needle = (n_docs + 2) // 3
    n_fact = (n_docs - n_needle + 1) // 2
    n_number = n_docs - n_needle - n_fact
    per_bin = -(-n_needle // len(NIAH_TRAIN_BINS))
    needles = generate_niah_docs(tokenizer, split="test", bins=NIAH_TRAIN_BINS, n_per_bin=per_bin, seed=seed)
    records = _interleave_bins(needles, len(NIAH_TRAIN_BINS), per_bin, n_needle)
    records += generate_fact_docs(n_fact, split="test", seed=seed) if n_fact else []
    records += generate_number_docs(n_number, split="test", seed=seed) if n_number else []
    docs, seen = [], {}
    for r in records:
        kind = "needle" if r["task"] == "niah" else "fact" if r["meta"]["kind"] == "facts" else "number"
        i = seen[kind] = seen.get(kind, -1) + 1
        qas = [qa for qa in r["qas"] if qa.get("qa_kind") == kind and qa.get("entity_role", "main") == "main"]
        qa = qas[i % len(qas)]
        title = (f"needle, {r['meta']['n_tokens']} tokens" if kind == "needle"
                 else f"{'facts' if kind == 'fact' else 'numbers'} about {r['meta']['entity']}")
        docs.append({"title": title, "text": r["context"], "question": qa["question"], "answer": qa["answers"][0],
                     "task": kind})
    return docs


def trained_on_reading(card: dict) -> bool:
    """Whether a model card (:func:`~d2l_fast.model_card.read_model_card`) says its checkpoint was trained on the
    reading data: ``"training_data": "reading"`` (:data:`READING_DATA`)."""
    if not isinstance(card, dict):
        raise TypeError(f"card must be a model card dict, got {type(card).__name__}")
    return card.get("training_data") == READING_DATA


def checkpoint_demo_docs(card: dict, tokenizer, n_docs: int = 8, *, seed: int = DEMO_DATA_SEED) -> list[dict]:
    """The demo documents for a trained checkpoint with model card ``card``: :func:`reading_demo_docs` when it was
    trained on the reading data (:func:`trained_on_reading`), else :func:`pretrained_demo_docs`."""
    make = reading_demo_docs if trained_on_reading(card) else pretrained_demo_docs
    return make(tokenizer, n_docs, seed=seed)


#: what the demo calls each kind of document it shows (``task`` of the demo documents), in the order it shows them
TASK_LABELS = {"niah": "needles (one 4-digit number)", "qa": "facts (held-out entities)",
               "needle": "needles (held-out phrasings)", "fact": "facts (held-out people)",
               "number": "numbers (1-8 digits, codes)"}


def answer_is_correct(task: str, prediction: str, gold: str) -> bool:
    """``niah``: the first run of digits in the answer is the number; ``needle``: the answer contains the gold one
    and ``number``: the answer is the gold string (both as :func:`~d2l_fast.training.reading_run.reading_report`
    scores them); ``qa`` / ``fact``: every word of the gold answer is in the answer (normalised as the metrics do,
    :func:`~d2l_fast.training.metrics.qa_f1` recall 1)."""
    import re

    from .training.metrics import qa_f1
    from .training.reading_run import answer_matches

    if task not in TASK_LABELS:
        raise ValueError(f"task must be one of {sorted(TASK_LABELS)}, got {task!r}")
    if not isinstance(prediction, str) or not isinstance(gold, str):
        raise TypeError(f"prediction and gold must be strings, got {type(prediction).__name__} and "
                        f"{type(gold).__name__}")
    if task == "niah":
        digits = re.findall(r"\d+", prediction)
        return bool(digits) and digits[0] == gold
    if task in ("needle", "number"):
        return answer_matches(task, prediction, gold)
    return qa_f1(prediction, [gold])[2] == 1.0


def demo_checkpoint(checkpoint: str | None = None, *, untrained: bool = False) -> str | None:
    """What ``d2l-fast demo`` loads: ``None`` for the untrained hypernetwork (``untrained``, or no ``checkpoint``
    given and :data:`DEMO_PRETRAINED` not shipped in this build), else the pretrained name or checkpoint path. A
    given ``checkpoint`` is checked here (unknown name, missing files: an error), before any model is loaded."""
    from .zoo import get_entry, resolve

    if untrained:
        if checkpoint is not None:
            raise ValueError("untrained and a checkpoint exclude each other")
        return None
    if checkpoint is None:
        try:
            get_entry(DEMO_PRETRAINED)
        except FileNotFoundError:
            return None
        return DEMO_PRETRAINED
    resolve(checkpoint)
    return checkpoint


#: the untrained demo's chunk length (a pretrained checkpoint uses its model card's)
UNTRAINED_MAX_CHUNK_LEN = 256
