"""Data for the reading model (issue 16): prose fact documents, numbers of every shape, NIAH with varied needles
and real prose filler, long documents for the chunk stage, and questions the document does not answer.

Records follow :mod:`.generators`' JSONL format (``id``, ``task``, ``context``, ``qas``, ``meta``), so
:func:`~d2l_fast.training.gen_data.generate_data` and :func:`~d2l_fast.training.evaluate.evaluate` take them. Every
QA also carries ``qa_kind`` (``fact``, ``number``, ``needle``, ``general``, ``chitchat``, ``absent``) and, where
they apply, ``attribute``, ``entity_role`` (``main`` / ``distractor``), ``number_kind`` (``integer``, ``year``,
``amount``, ``code``), ``digits`` (digit count of the answer), ``question_template`` and ``fact_template``
(``"<attribute>/<split>/<index>"``); ``meta`` holds ``kind`` (``facts``, ``numbers``, ``niah``, ``long``,
``nohijack``), ``split`` and, for length-binned records, ``bin`` and ``n_tokens``.

Splits ``train`` / ``dev`` / ``test`` share nothing that matters to a reader:

* phrasings — every predicate, question, frame, opener, needle and general question is written out per split
  (:mod:`.reading_pools`);
* entities — invented words (people, cities, organisations, schools) belong to the split ``crc32(word) mod 10``
  picks (0 test, 1 dev, else train), so no invented word appears in two splits;
* numbers — every number string of two or more digits belongs to the split of its crc32 the same way (the ten
  one-digit numbers are shared: there are too few to split);
* filler — prose sentences from sources found offline: Python standard-library docstrings, the licence texts in
  ``/usr/share/common-licenses`` and package ``copyright`` files under ``/usr/share/doc``; each source file belongs
  to the split of its name's crc32, and a sentence found in two splits' sources is dropped from both.

Real-word values (professions, instruments, objects) are shared by the splits. Answers are always present verbatim
in their documents, except ``general``, ``chitchat`` and ``absent`` questions (gold: a fixed short answer, the base
model's own answer, or :data:`~.reading_pools.NOT_STATED`). Everything is a function of ``(split, seed)``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from . import reading_pools as P
from .reading_pools_train import COPY_NEEDLES_TRAIN, GENERAL_TRAIN_MORE
from .reading_sources import SPLITS, _check_split, _Filler, _fit, _length_fn, filler_sources, split_of
from .reading_values import _Names, make_number, n_digits

KINDS = ("facts", "numbers", "niah", "long", "nohijack")  # the evaluation mix; "copy" is train-only
NIAH_TRAIN_BINS = ((32, 128), (128, 256))
NIAH_EVAL_BINS = ((32, 128), (128, 256), (256, 512), (512, 1024), (1024, 2048))
LONG_BINS = ((512, 1024), (1024, 2048))


def _check_count(n, what: str, lo: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < lo:
        raise ValueError(f"{what} must be an int ≥ {lo}, got {n!r}")
    return n


def _check_prob(p, what: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"{what} must be a probability in [0, 1], got {p!r}")
    return float(p)


# ---------------------------------------------------------------------------------------------------- facts


def _fix_articles(s: str) -> str:
    """"a" → "an" before a vowel sound ("an accordion", but "a used car", "a uniform", "a European")."""
    return re.sub(r"\ba (?!(?i:us|uni|eu|one))(?=[aeiouAEIOU])", "an ", s)


def _hard_absent(absent: list[str], facts: list, pool: dict) -> list[str]:
    """The absent attributes of the main entity (``facts[0]``) a reader that does not bind a question to its
    entity and attribute would answer from the document: ones a distractor holds, ones whose value is of the kind
    of a stated main attribute (birthplace beside home city: both cities; a year beside a year) and a person (a
    spouse: most documents name other people — distractors, a letter's writer or reader)."""
    main_kinds = {pool[a].get("value", pool[a].get("kind")) for a, _, _ in facts[0][1]}
    held = {a for _, items in facts[1:] for a, _, _ in items}
    return [a for a in absent if a in held or pool[a].get("value", pool[a].get("kind")) in main_kinds | {"person"}]


def _fact_parts(rng: random.Random, names: _Names, split: str, *, min_facts: int, max_facts: int,
                max_distractors: int, absent_prob: float, general_prob: float, numbers: bool,
                hard_absent: float = 0.0):
    """Sentences (unordered), frame and QAs of one fact (``numbers=False``) or number document. ``hard_absent``:
    the probability that an absent question asks one of :func:`_hard_absent`'s attributes where there is one (0
    draws nothing more)."""
    names.reset()
    pool = P.NUMBER_ATTRIBUTES if numbers else P.PERSON_ATTRIBUTES
    etype = rng.choice(("org", "person")) if numbers else "person"
    attrs_all = sorted(a for a, d in pool.items() if not numbers or d["entity"] == etype)
    main = names.value(etype)
    n_dis = rng.randint(0, max_distractors)
    entities = [(main, "main")] + [(names.value(etype), "distractor") for _ in range(n_dis)]
    k_main = rng.randint(min_facts, min(max_facts, len(attrs_all)))
    facts, qas = [], []  # facts: (entity, [(attr, pred index, value)])
    used_values = set()
    budget = max_facts  # numbers: at most max_facts numbers in the whole document
    for e, role in entities:
        k = k_main if role == "main" else rng.randint(1, min(3, len(attrs_all)))
        k = min(k, budget) if numbers else k
        if k < 1:
            break
        budget -= k
        attrs = rng.sample(attrs_all, k)
        items = []
        for a in attrs:
            d = pool[a]
            for _ in range(100):
                v = (make_number(rng, d["kind"], split, d.get("digits", (1, 8))) if numbers
                     else names.value(d["value"]))
                if v not in used_values and not any(v in u or u in v for u in used_values):
                    break
            used_values.add(v)
            pi = rng.randrange(len(d["preds"][split]))
            items.append((a, pi, v))
            if role == "main" or rng.random() < 0.5:
                qi = rng.randrange(len(d["questions"][split]))
                if numbers:  # a number attribute's phrasings name different things (a win, an inheritance):
                    qi = pi  # ask about the one the sentence states (RNG order kept)
                ans = v[4:] if v.startswith("the ") else v
                qa = {"question": d["questions"][split][qi].format(name=e), "answers": [ans],
                      "qa_kind": "number" if numbers else "fact", "attribute": a, "entity_role": role,
                      "question_template": f"{a}/{split}/{qi}", "fact_template": f"{a}/{split}/{pi}"}
                if numbers:
                    qa.update(number_kind=d["kind"], digits=n_digits(v))
                qas.append(qa)
        facts.append((e, items))
    absent = [a for a in attrs_all if a not in {it[0] for it in facts[0][1]}]
    if absent and rng.random() < absent_prob:
        hard = _hard_absent(absent, facts, pool) if hard_absent and rng.random() < hard_absent else []
        a = rng.choice(hard or absent)
        qi = rng.randrange(len(pool[a]["questions"][split]))
        qas.append({"question": pool[a]["questions"][split][qi].format(name=main), "answers": [P.NOT_STATED],
                    "qa_kind": "absent", "attribute": a, "entity_role": "main",
                    "question_template": f"{a}/{split}/{qi}", **({"hard_negative": True} if hard else {})})
    if rng.random() < general_prob:
        q, ans = rng.choice(P.GENERAL_QUESTIONS[split])
        qas.append({"question": q, "answers": [ans], "qa_kind": "general"})
    sentences = []
    for e, items in facts:
        rng.shuffle(items)
        i = 0
        while i < len(items):
            g = items[i : i + rng.choice((1, 1, 2, 2, 3))]
            i += len(g)
            preds = [pool[a]["preds"][split][pi].format(value=v) for a, pi, v in g]
            body = preds[0] if len(preds) == 1 else ", ".join(preds[:-1]) + " and " + preds[-1]
            sentences.append((e, body))
    rng.shuffle(sentences)
    out, mentioned = [], set()
    for e, body in sentences:
        subj = e if e not in mentioned or rng.random() < 0.5 or numbers else e.split()[-1]
        mentioned.add(e)
        opener = rng.choice(P.OPENERS[split])
        s = _fix_articles(f"{opener}{subj} {body}.")
        out.append(s[0].upper() + s[1:])
    frame_name, intro, outro = rng.choice(P.FRAMES[split])
    fmt = {"name": main, "reader": names.value("person").split()[0], "writer": names.value("person")}
    meta = {"entity": main, "entity_type": etype, "distractors": [e for e, r in entities[1:]], "frame": frame_name,
            "n_numbers" if numbers else "n_facts": sum(len(it) for _, it in facts)}
    return out, intro.format(**fmt), outro.format(**fmt), qas, meta


def _join(intro: str, body: list[str], outro: str) -> str:
    parts = [p for p in (intro, " ".join(body), outro) if p]
    return "\n\n".join(parts)


def _docs(n_docs, split, seed, kind, **kw) -> list[dict]:
    _check_count(n_docs, "n_docs")
    _check_split(split)
    rng = random.Random(f"reading/{kind}/{split}/{seed}")
    names = _Names(rng, split)
    out = []
    for i in range(n_docs):
        sents, intro, outro, qas, meta = _fact_parts(rng, names, split, numbers=kind == "numbers", **kw)
        out.append({"id": f"reading-{split}-{kind}-{seed}-{i:05d}", "task": "qa", "context": _join(intro, sents, outro),
                    "qas": qas, "meta": {"kind": kind, "split": split, "seed": seed, **meta}})
    return out


def generate_fact_docs(n_docs: int, *, split: str = "train", seed: int = 0, min_facts: int = 3, max_facts: int = 6,
                       max_distractors: int = 2, absent_prob: float = 0.25, general_prob: float = 0.25,
                       hard_absent: float = 0.0) -> list[dict]:
    """Prose documents about an invented person (a document frame, 1–3 facts per sentence, sentence order and
    subject wording random) with up to ``max_distractors`` other people holding 1–3 facts each; one QA per fact
    of the main person and about half of the distractors' facts, an ``absent`` question with ``absent_prob`` and
    a ``general`` one with ``general_prob``. ``hard_absent`` (training): the probability that the absent question
    asks an attribute a distractor holds or one of the kind of a stated one (another city, another person), where
    there is one; 0 draws exactly the documents it always drew."""
    _check_count(min_facts, "min_facts")
    _check_count(max_facts, "max_facts")
    if min_facts > max_facts or max_facts > len(P.PERSON_ATTRIBUTES):
        raise ValueError(f"need 1 ≤ min_facts ≤ max_facts ≤ {len(P.PERSON_ATTRIBUTES)}, got {min_facts}, {max_facts}")
    _check_count(max_distractors, "max_distractors", 0)
    return _docs(n_docs, split, seed, "facts", min_facts=min_facts, max_facts=max_facts,
                 max_distractors=max_distractors,
                 absent_prob=_check_prob(absent_prob, "absent_prob"),
                 general_prob=_check_prob(general_prob, "general_prob"),
                 hard_absent=_check_prob(hard_absent, "hard_absent"))


def generate_number_docs(n_docs: int, *, split: str = "train", seed: int = 0, max_numbers: int = 4,
                         absent_prob: float = 0.15, general_prob: float = 0.1, hard_absent: float = 0.0) -> list[dict]:
    """Documents holding 1–``max_numbers`` numbers (integers of 1–8 digits, years, amounts, codes) about an
    invented organisation or person (sometimes a second one of the same kind); every question names its number
    by entity and attribute; the gold answer is the number string exactly as written. ``hard_absent``: as
    :func:`generate_fact_docs`' (a number the other entity holds, or one of the kind of a stated number)."""
    _check_count(max_numbers, "max_numbers")
    if max_numbers > 5:
        raise ValueError(f"max_numbers must be at most 5 (numeric attributes per entity kind), got {max_numbers}")
    return _docs(n_docs, split, seed, "numbers", min_facts=1, max_facts=max_numbers, max_distractors=1,
                 absent_prob=_check_prob(absent_prob, "absent_prob"),
                 general_prob=_check_prob(general_prob, "general_prob"),
                 hard_absent=_check_prob(hard_absent, "hard_absent"))


# ---------------------------------------------------------------------------------------------------- NIAH, long


def _check_bins(bins) -> list[tuple[int, int]]:
    out = []
    for b in bins:
        if (not isinstance(b, (tuple, list)) or len(b) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in b) or not 0 < b[0] < b[1]):
            raise ValueError(f"each bin must be a pair of ints (lo, hi) with 0 < lo < hi, got {b!r}")
        out.append((int(b[0]), int(b[1])))
    if not out:
        raise ValueError("expected at least one length bin")
    return out


def _absent_needle_question(rng: random.Random, split: str, gi: int) -> dict:
    """The unanswered question of a document holding a needle of group ``gi``: a question of another group, or,
    where that group is generic (:data:`~.reading_pools.GENERIC_NEEDLES`: any planted number answers it), one of
    :data:`~.reading_pools.ABSENT_NEEDLE_QUESTIONS`. The draws from ``rng`` are the same either way, so the other
    questions and documents of a generator do not depend on which groups are generic."""
    g = rng.choice([g for g in range(len(P.NEEDLES[split])) if g != gi])
    q = rng.randrange(len(P.NEEDLES[split][g][1]))
    if g in P.GENERIC_NEEDLES[split]:
        k = q % len(P.ABSENT_NEEDLE_QUESTIONS[split])
        return {"question": P.ABSENT_NEEDLE_QUESTIONS[split][k], "answers": [P.NOT_STATED], "qa_kind": "absent",
                "attribute": "unnamed", "question_template": f"unnamed/{split}/{k}"}
    return {"question": P.NEEDLES[split][g][1][q], "answers": [P.NOT_STATED], "qa_kind": "absent",
            "attribute": f"needle{g}", "question_template": f"needle{g}/{split}/{q}"}


def generate_niah_docs(tokenizer, *, split: str = "train", bins: Sequence[tuple[int, int]] = NIAH_TRAIN_BINS,
                       n_per_bin: int = 100, seed: int = 0, digits: tuple[int, int] = (3, 7), n_questions: int = 1,
                       absent_prob: float = 0.0, story_filler: bool = False) -> list[dict]:
    """Needle-in-a-haystack records (``task="niah"``): prose filler of ``split``'s sources with one needle of
    ``split``'s phrasings (a ``digits``-digit number of ``split``'s pool) at a depth drawn within a decile
    (deciles shuffled per ten records), ``lo ≤`` tokens ``< hi`` of its bin (``tokenizer``: the model's tokenizer or
    a callable text → token count).

    Training extras (the defaults draw nothing more, so evaluation data does not change): up to ``n_questions``
    different wordings of the needle's question, with ``absent_prob`` a question about another needle group
    whose gold is :data:`~.reading_pools.NOT_STATED` (the model must tell which thing the document names), and with
    ``story_filler`` (train split only) some filler from :mod:`.reading_stories`' everyday prose."""
    count = _length_fn(tokenizer)
    _check_split(split)
    bins = _check_bins(bins)
    _check_count(n_per_bin, "n_per_bin")
    _check_count(n_questions, "n_questions")
    absent_prob = _check_prob(absent_prob, "absent_prob")
    if not (isinstance(digits, tuple) and len(digits) == 2 and 1 <= digits[0] <= digits[1] <= 8):
        raise ValueError(f"digits must be a (lo, hi) tuple with 1 ≤ lo ≤ hi ≤ 8, got {digits!r}")
    rng = random.Random(f"reading/niah/{split}/{seed}")
    filler = _Filler(rng, split, count, story_filler)
    out = []
    for lo, hi in bins:
        deciles: list[int] = []
        for i in range(n_per_bin):
            if not deciles:
                deciles = list(range(10))
                rng.shuffle(deciles)
            depth = (deciles.pop() + rng.random()) / 10
            gi = rng.randrange(len(P.NEEDLES[split]))
            statements, questions = P.NEEDLES[split][gi]
            si, qi = rng.randrange(len(statements)), rng.randrange(len(questions))
            number = make_number(rng, "integer", split, digits)
            needle = statements[si].format(n=number)

            def build(fill, needle=needle, depth=depth):
                k = round(depth * len(fill))
                return " ".join(fill[:k] + [needle] + fill[k:])

            text, n_tok, sources = _fit(build, filler, count, lo, hi, count(needle))
            qis = [qi]
            if n_questions > 1:
                rest = [q for q in range(len(questions)) if q != qi]
                qis += rng.sample(rest, min(n_questions - 1, len(rest)))
            qas = [{"question": questions[q], "answers": [number], "qa_kind": "needle", "attribute": f"needle{gi}",
                    "number_kind": "integer", "digits": len(number), "question_template": f"needle{gi}/{split}/{q}",
                    "fact_template": f"needle{gi}/{split}/{si}"} for q in qis]
            if absent_prob and len(P.NEEDLES[split]) > 1 and rng.random() < absent_prob:
                qas.append(_absent_needle_question(rng, split, gi))
            out.append({"id": f"reading-{split}-niah-{seed}-{lo}-{hi}-{i:05d}", "task": "niah", "context": text,
                        "qas": qas,
                        "meta": {"kind": "niah", "split": split, "seed": seed, "bin": [lo, hi], "n_tokens": n_tok,
                                 "depth": round(depth, 6), "sources": sources}})
    return out


def generate_copy_docs(tokenizer, *, split: str = "train", bins: Sequence[tuple[int, int]] = NIAH_TRAIN_BINS,
                       n_per_bin: int = 100, seed: int = 0, max_needles: int = 3,
                       absent_prob: float = 0.3, story_filler: bool = False) -> list[dict]:
    """Copy needles (train split only, ``meta.kind`` ``copy``): prose filler with 1 to ``max_needles`` statements of
    different :data:`~.reading_pools_train.COPY_NEEDLES_TRAIN` groups whose values are invented words, invented
    names or letter-digit codes, one question per needle and, with ``absent_prob``, a question about a group the
    document does not hold (gold :data:`~.reading_pools.NOT_STATED`). The answers are rare-token strings the
    reader can only copy, the skill the fact documents' names and the number documents' codes need.
    ``story_filler``: some filler from :mod:`.reading_stories`' everyday prose."""
    groups = COPY_NEEDLES_TRAIN
    count = _length_fn(tokenizer)
    if split != "train":
        raise ValueError(f"copy needles are a training task: split must be 'train', got {split!r}")
    bins = _check_bins(bins)
    _check_count(n_per_bin, "n_per_bin")
    _check_count(max_needles, "max_needles")
    if max_needles >= len(groups):
        raise ValueError(f"max_needles must be below the {len(groups)} copy-needle groups, got {max_needles}")
    absent_prob = _check_prob(absent_prob, "absent_prob")
    rng = random.Random(f"reading/copy/{split}/{seed}")
    names, filler, out = _Names(rng, split), _Filler(rng, split, count, story_filler), []
    for lo, hi in bins:
        for i in range(n_per_bin):
            names.reset()
            picked = rng.sample(range(len(groups)), rng.randint(1, max_needles) + 1)
            absent, picked = picked[-1], picked[:-1]
            needles, qas = [], []
            for gi in picked:
                kind, statements, questions = groups[gi]
                value = make_number(rng, "code", split) if kind == "code" else names.value(
                    "person" if kind == "person" else "city")
                si, qi = rng.randrange(len(statements)), rng.randrange(len(questions))
                needles.append(statements[si].format(w=value))
                qas.append({"question": questions[qi], "answers": [value], "qa_kind": "copy", "attribute": f"copy{gi}",
                            "value_kind": kind, "question_template": f"copy{gi}/{split}/{qi}",
                            "fact_template": f"copy{gi}/{split}/{si}"})
            if rng.random() < absent_prob:
                qi = rng.randrange(len(groups[absent][2]))
                qas.append({"question": groups[absent][2][qi], "answers": [P.NOT_STATED], "qa_kind": "absent",
                            "attribute": f"copy{absent}", "question_template": f"copy{absent}/{split}/{qi}"})
            slots = sorted(rng.random() for _ in needles)

            def build(fill, needles=needles, slots=slots):
                body = list(fill)
                for k, (needle, at) in enumerate(zip(needles, slots)):
                    body.insert(round(at * len(fill)) + k, needle)
                return " ".join(body)

            text, n_tok, sources = _fit(build, filler, count, lo, hi, sum(count(n) for n in needles))
            out.append({"id": f"reading-{split}-copy-{seed}-{lo}-{hi}-{i:05d}", "task": "qa", "context": text,
                        "qas": qas, "meta": {"kind": "copy", "split": split, "seed": seed, "bin": [lo, hi],
                                             "n_tokens": n_tok, "sources": sources}})
    return out


def generate_long_docs(tokenizer, *, split: str = "train", bins: Sequence[tuple[int, int]] = LONG_BINS,
                       n_per_bin: int = 50, seed: int = 0, story_filler: bool = False) -> list[dict]:
    """Long documents for the chunk stage: a fact document (:func:`generate_fact_docs`, sometimes with numbers)
    whose sentences are spread at random depths through prose filler, ``lo ≤`` tokens ``< hi`` of its bin, so its
    facts fall into different chunks. ``story_filler`` (train split only): some filler from
    :mod:`.reading_stories`' everyday prose."""
    count = _length_fn(tokenizer)
    _check_split(split)
    bins = _check_bins(bins)
    _check_count(n_per_bin, "n_per_bin")
    rng = random.Random(f"reading/long/{split}/{seed}")
    names = _Names(rng, split)
    filler = _Filler(rng, split, count, story_filler)
    out = []
    for lo, hi in bins:
        for i in range(n_per_bin):
            numbers = rng.random() < 0.3
            sents, intro, outro, qas, meta = _fact_parts(
                rng, names, split, min_facts=2 if numbers else 4, max_facts=4 if numbers else 8, max_distractors=1,
                absent_prob=0.2, general_prob=0.0, numbers=numbers)
            slots = sorted(rng.random() for _ in sents)

            def build(fill, sents=sents, slots=slots, intro=intro, outro=outro):
                body, j = [], 0
                for k, f in enumerate(fill + [None]):
                    while j < len(sents) and (slots[j] * len(fill) <= k or f is None):
                        body.append(sents[j])
                        j += 1
                    if f is not None:
                        body.append(f)
                return _join(intro, body, outro)

            fixed = count(_join(intro, sents, outro))
            text, n_tok, sources = _fit(build, filler, count, lo, hi, fixed)
            out.append({"id": f"reading-{split}-long-{seed}-{lo}-{hi}-{i:05d}", "task": "qa", "context": text,
                        "qas": qas, "meta": {"kind": "long", "split": split, "seed": seed, "bin": [lo, hi],
                                             "n_tokens": n_tok, "sources": sources, **meta}})
    return out


def generate_nohijack_docs(tokenizer, n_docs: int, *, split: str = "train", seed: int = 0,
                           base_answers: dict[str, str] | None = None, with_present: bool = False,
                           story_filler: bool = False, hard_absent: float = 0.0) -> list[dict]:
    """Documents whose questions they do not answer: fact documents (a question about an attribute they do not
    state, gold :data:`~.reading_pools.NOT_STATED`) and needle documents (a question about another needle), each
    with a general-knowledge question (fixed short answer) and, when ``base_answers`` maps a chit-chat question of
    :data:`~.reading_pools.CHITCHAT_QUESTIONS` to the base model's own answer, a chit-chat question.

    ``with_present`` (training): each document also keeps one question it does answer (the main person's fact or
    the needle's own question), so every "does not say" has an answered question of the same document beside it.
    Off (the default) draws exactly the documents and questions it always drew. ``story_filler``: the needle
    documents' filler as :func:`generate_niah_docs` draws it with ``story_filler``; ``hard_absent``: the fact
    documents' as :func:`generate_fact_docs` draws them."""
    _check_count(n_docs, "n_docs")
    _check_split(split)
    if not isinstance(with_present, bool):
        raise ValueError(f"with_present must be a bool, got {with_present!r}")
    if base_answers is not None and (not isinstance(base_answers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in base_answers.items())):
        raise ValueError("base_answers must map chit-chat questions to non-empty answer strings")
    rng = random.Random(f"reading/nohijack/{split}/{seed}")
    facts = generate_fact_docs(n_docs, split=split, seed=seed, absent_prob=1.0, general_prob=0.0,
                               hard_absent=hard_absent)
    needles = generate_niah_docs(tokenizer, split=split, bins=NIAH_TRAIN_BINS[:1] if n_docs < 2 else NIAH_TRAIN_BINS,
                                 n_per_bin=max(1, n_docs // 2), seed=seed, story_filler=story_filler)
    chit = [q for q in P.CHITCHAT_QUESTIONS[split] if base_answers and q in base_answers]
    out = []
    for i in range(n_docs):
        if i % 2 == 0:
            src = facts[i]
            qas = [qa for qa in src["qas"] if qa["qa_kind"] == "absent"]
            if with_present:
                qas.append(next(qa for qa in src["qas"] if qa["qa_kind"] == "fact" and qa["entity_role"] == "main"))
        else:
            src = needles[(i // 2) % len(needles)]
            qas = [_absent_needle_question(rng, split, int(src["qas"][0]["attribute"][len("needle"):]))]
            if with_present:
                qas.append(src["qas"][0])
        q, ans = rng.choice(P.GENERAL_QUESTIONS[split])
        qas.append({"question": q, "answers": [ans], "qa_kind": "general"})
        if chit:
            q = rng.choice(chit)
            qas.append({"question": q, "answers": [base_answers[q]], "qa_kind": "chitchat"})
        meta = {k: v for k, v in src["meta"].items() if k not in ("kind", "bin")}
        out.append({"id": f"reading-{split}-nohijack-{seed}-{i:05d}", "task": "qa", "context": src["context"],
                    "qas": qas, "meta": {**meta, "kind": "nohijack", "source_kind": src["meta"]["kind"]}})
    return out


def general_training_questions() -> list[str]:
    """The train split's general-knowledge questions: the fixed-answer list's and
    :data:`~.reading_pools_train.GENERAL_TRAIN_MORE` (for :func:`rebase_general`)."""
    return list(dict.fromkeys([q for q, _ in P.GENERAL_QUESTIONS["train"]] + list(GENERAL_TRAIN_MORE)))


def rebase_general(records: Sequence[dict], base_answers: dict[str, str], *, seed: int = 0) -> list[dict]:
    """Training records whose ``general`` questions ask one of ``base_answers``' questions (drawn per question
    from the record id and ``seed``) with the base model's own answer as gold (``gold_source: "base"``), so the
    adapter learns to leave questions the document has nothing to do with to the base model, not to recite a short
    answer list. Other questions and the input records are left as they are."""
    if isinstance(records, dict) or not all(isinstance(r, dict) and "qas" in r and "id" in r for r in records):
        raise ValueError("records must be a list of reading records (dicts with 'id' and 'qas')")
    if not isinstance(base_answers, dict) or not base_answers or not all(
            isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip() for k, v in base_answers.items()):
        got = f"{len(base_answers)} entries" if isinstance(base_answers, dict) else type(base_answers).__name__
        raise ValueError(f"base_answers must map at least one question to a non-empty answer string, got {got}")
    held = [r["id"] for r in records if r.get("meta", {}).get("split", "train") != "train"]
    if held:
        raise ValueError(f"rebase_general is for training records; got held-out record {held[0]!r}")
    pool = sorted(base_answers)
    out = []
    for r in records:
        if not any(qa.get("qa_kind") == "general" for qa in r["qas"]):
            out.append(r)
            continue
        qas = []
        for k, qa in enumerate(r["qas"]):
            if qa.get("qa_kind") == "general":
                q = pool[random.Random(f"reading/general/{seed}/{r['id']}/{k}").randrange(len(pool))]
                qa = {**qa, "question": q, "answers": [base_answers[q]], "gold_source": "base"}
            qas.append(qa)
        out.append({**r, "qas": qas})
    return out


def generate_reading(tokenizer, *, split: str = "train", seed: int = 0, n_facts: int = 0, n_numbers: int = 0,
                     n_niah_per_bin: int = 0, niah_bins: Sequence[tuple[int, int]] | None = None,
                     n_long_per_bin: int = 0, long_bins: Sequence[tuple[int, int]] = LONG_BINS, n_nohijack: int = 0,
                     base_answers: dict[str, str] | None = None, niah_questions: int = 1,
                     niah_absent_prob: float = 0.0, nohijack_present: bool = False,
                     story_filler: bool = False, fact_absent_prob: float | None = None,
                     hard_absent: float = 0.0) -> list[dict]:
    """The reading mix of one split: each part by its generator above (a count of 0 leaves it out). ``niah_bins``
    default: :data:`NIAH_TRAIN_BINS` for ``train``, :data:`NIAH_EVAL_BINS` otherwise; ``niah_questions`` and
    ``niah_absent_prob``: :func:`generate_niah_docs`' ``n_questions`` and ``absent_prob``; ``nohijack_present``:
    :func:`generate_nohijack_docs`' ``with_present``; ``story_filler``: every filler-using generator's (train only);
    ``fact_absent_prob``: the fact documents' ``absent_prob`` (None: its default); ``hard_absent``: the fact, number
    and no-hijack documents'."""
    _check_split(split)
    for v, what in ((n_facts, "n_facts"), (n_numbers, "n_numbers"), (n_niah_per_bin, "n_niah_per_bin"),
                    (n_long_per_bin, "n_long_per_bin"), (n_nohijack, "n_nohijack")):
        _check_count(v, what, 0)
    if niah_bins is None:
        niah_bins = NIAH_TRAIN_BINS if split == "train" else NIAH_EVAL_BINS
    recs = []
    fact_kw = {} if fact_absent_prob is None else {"absent_prob": fact_absent_prob}
    if n_facts:
        recs += generate_fact_docs(n_facts, split=split, seed=seed, hard_absent=hard_absent, **fact_kw)
    if n_numbers:
        recs += generate_number_docs(n_numbers, split=split, seed=seed, hard_absent=hard_absent)
    if n_niah_per_bin:
        recs += generate_niah_docs(tokenizer, split=split, bins=niah_bins, n_per_bin=n_niah_per_bin, seed=seed,
                                   n_questions=niah_questions, absent_prob=niah_absent_prob, story_filler=story_filler)
    if n_long_per_bin:
        recs += generate_long_docs(tokenizer, split=split, bins=long_bins, n_per_bin=n_long_per_bin, seed=seed,
                                   story_filler=story_filler)
    if n_nohijack:
        recs += generate_nohijack_docs(tokenizer, n_nohijack, split=split, seed=seed, base_answers=base_answers,
                                       with_present=nohijack_present, story_filler=story_filler,
                                       hard_absent=hard_absent)
    if not recs:
        raise ValueError("every count is 0: nothing to generate")
    return recs


__all__ = ["KINDS", "LONG_BINS", "NIAH_EVAL_BINS", "NIAH_TRAIN_BINS", "SPLITS", "filler_sources",
           "generate_copy_docs", "generate_fact_docs", "generate_long_docs", "generate_niah_docs",
           "generate_nohijack_docs", "generate_number_docs", "generate_reading", "general_training_questions",
           "make_number", "n_digits", "rebase_general", "split_of"]
