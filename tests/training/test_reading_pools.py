"""Phrasing pools of the reading-model data (:mod:`d2l_fast.training.reading_pools`): the train pools are large and
follow the placeholder rules, share no run of four words with the dev/test pools, the needle groups cannot answer
each other's questions, and the train pools' words do not change the held-out data."""

import re
from collections import Counter

import pytest

from d2l_fast.training import reading as R
from d2l_fast.training import reading_pools as P
from d2l_fast.training import reading_pools_train as T
from d2l_fast.training import reading_values as V

HELD_OUT = ("dev", "test")
ATTRIBUTE_POOLS = {"PERSON_ATTRIBUTES": P.PERSON_ATTRIBUTES, "NUMBER_ATTRIBUTES": P.NUMBER_ATTRIBUTES}


def texts(pool: str, split: str) -> list[str]:
    """Every text of one pool and split (predicates and questions, frame intros and outros, needles, ...)."""
    p = getattr(P, pool)
    if pool in ATTRIBUTE_POOLS:
        return [t for d in p.values() for key in ("preds", "questions") for t in d[key][split]]
    if pool == "FRAMES":
        return [t for f in p[split] for t in f[1:]]
    if pool == "NEEDLES":
        return [t for st, qs in p[split] for t in st + qs]
    if pool == "GENERAL_QUESTIONS":
        return [t for qa in p[split] for t in qa]
    return list(p[split])


def words(text):  # a cheap token counter: the generators accept any callable text → count
    return len(text.split())


POOLS = (*ATTRIBUTE_POOLS, "OPENERS", "FRAMES", "NEEDLES", "GENERAL_QUESTIONS", "CHITCHAT_QUESTIONS")


def four_grams(text: str) -> set[tuple[str, ...]]:
    """Runs of four lowercased words, placeholders dropped (the words around one become neighbours)."""
    w = re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text.lower()))
    return {tuple(w[i : i + 4]) for i in range(len(w) - 3)}


def test_four_gram_helper():
    assert four_grams("Where was {name} born in the end?") == {("where", "was", "born", "in"),
                                                               ("was", "born", "in", "the"),
                                                               ("born", "in", "the", "end")}
    assert four_grams("{value} is it") == set()


@pytest.mark.parametrize("pool", POOLS)
def test_train_shares_no_four_words_with_dev_or_test(pool):
    held = {}
    for s in HELD_OUT:
        for t in texts(pool, s):
            for g in four_grams(t):
                held.setdefault(g, t)
    clashes = [(t, " ".join(g), held[g]) for t in texts(pool, "train") for g in four_grams(t) if g in held]
    assert not clashes, clashes


def test_train_needles_avoid_held_out_things():
    train = " ".join(texts("NEEDLES", "train")).lower()
    for thing in ("side door", "hidden", "blue locker", "wifi", "password", "guest", "access code"):
        assert thing not in train, thing


def test_attribute_pool_sizes_and_placeholders():
    for name, pool in ATTRIBUTE_POOLS.items():
        for a, d in pool.items():
            preds, qs = d["preds"]["train"], d["questions"]["train"]
            assert len(preds) >= 10 and len(qs) >= 8, (a, len(preds), len(qs))
            assert len(set(preds)) == len(preds) and len(set(qs)) == len(qs), a
            if name == "NUMBER_ATTRIBUTES":  # a number document asks the question paired with the stated phrasing
                assert len(qs) == len(preds), a
            for s in R.SPLITS:
                for t in d["preds"][s]:
                    assert t.count("{value}") == 1 and "{name}" not in t and t[0].islower(), (a, s, t)
                for t in d["questions"][s]:
                    assert t.count("{name}") == 1 and "{value}" not in t and t[-1] in "?.", (a, s, t)
    assert set(T.PERSON_TRAIN) == set(P.PERSON_ATTRIBUTES) and set(T.NUMBER_TRAIN) == set(P.NUMBER_ATTRIBUTES)


def test_number_questions_name_their_attribute():
    """Documents hold several numbers: a train question never fits another attribute of the same entity kind
    word for word (each names its own thing), and stays within its attribute's pairing."""
    by_kind = {}
    for a, d in P.NUMBER_ATTRIBUTES.items():
        by_kind.setdefault(d["entity"], []).append(a)
    for attrs in by_kind.values():
        qs = [q for a in attrs for q in P.NUMBER_ATTRIBUTES[a]["questions"]["train"]]
        assert len(set(qs)) == len(qs)
    assert all(T.NUMBER_TRAIN[a]["preds"][i] == p and T.NUMBER_TRAIN[a]["questions"][i] == q
               for a, pairs in T.NUMBER_TRAIN_PAIRS.items() for i, (p, q) in enumerate(pairs))


def test_needle_groups():
    groups = P.NEEDLES["train"]
    assert len(groups) >= 30
    first = ["The special magic number is {n}.", "The secret code is {n}.", "My lucky number happens to be {n}.",
             "The parcel was sent with tracking number {n}."]
    assert [g[0][0] for g in groups[:4]] == first  # the first groups stay where they were (needle0..needle3)
    for statements, questions in groups:
        assert 2 <= len(statements) <= 4 and 3 <= len(questions) <= 4, statements
        assert all(s.count("{n}") == 1 for s in statements) and not any("{" in q for q in questions)
    all_q = [q for _, qs in groups for q in qs]
    assert len(set(all_q)) == len(all_q)
    # a group's question names its thing: its content words meet its own statements more than any other group's
    stop = {"what", "which", "is", "the", "a", "of", "number", "in", "on", "to", "do", "does", "did", "was", "are",
            "we", "you", "our", "for", "at", "name", "how", "much", "many", "with", "by", "from", "this", "that",
            "should", "can", "be", "it", "its", "my", "your", "tell", "me", "s", "one", "will"}

    def content(t):
        return {w for w in re.findall(r"[a-z]+", t.lower()) if w not in stop}

    bags = [content(" ".join(st)) for st, _ in groups]
    for gi, (_, questions) in enumerate(groups):
        for q in questions:
            scores = [len(content(q) & b) for b in bags]
            assert scores[gi] >= 1 and scores[gi] > max(s for j, s in enumerate(scores) if j != gi), (q, scores)


def test_openers_and_frames():
    assert len(P.OPENERS["train"]) >= 12 and len(P.FRAMES["train"]) >= 10
    assert Counter(P.OPENERS["train"])[""] >= 3
    for o in P.OPENERS["train"]:
        assert o == "" or (o.endswith(" ") and o[0].isupper()), o
    names = [f[0] for f in P.FRAMES["train"]]
    assert len(set(names)) == len(names)
    for f in P.FRAMES["train"]:
        assert len(f) == 3
        for t in f[1:]:
            assert set(re.findall(r"\{(\w*)\}", t)) <= {"name", "reader", "writer"}, t
            t.format(name="N", reader="R", writer="W")


def test_no_digits_anywhere():
    for pool in POOLS:
        for s in R.SPLITS:
            assert not any(re.search(r"\d", t) for t in texts(pool, s)), pool


def test_train_pool_words_do_not_change_held_out_data(monkeypatch):
    """Invented names skip words of every pool (``reading_values._common_words``): the held-out data at the evaluation
    sizes (``scripts/train_reading.py``) must not depend on words that only the train pools use."""
    held = V._common_words()
    train_only = {w.lower() for pool in POOLS for t in texts(pool, "train") for w in re.findall(r"[A-Za-z]+", t)}
    train_only -= {w.lower() for pool in POOLS for s in HELD_OUT for t in texts(pool, s)
                   for w in re.findall(r"[A-Za-z]+", t)}
    assert train_only and train_only <= held
    sizes = {"n_facts": 60, "n_numbers": 60, "n_nohijack": 30}
    want = {s: R.generate_reading(words, split=s, seed=seed, **sizes) for s, seed in (("dev", 1), ("test", 2))}
    monkeypatch.setattr(V, "_common_words", lambda: held - train_only)
    for (s, seed), recs in zip((("dev", 1), ("test", 2)), want.values()):
        assert R.generate_reading(words, split=s, seed=seed, **sizes) == recs, s
    name = want["dev"][0]["meta"]["entity"].split()[0].lower()  # the comparison sees a word that names someone
    monkeypatch.setattr(V, "_common_words", lambda: held | {name})
    assert R.generate_reading(words, split="dev", seed=1, **sizes) != want["dev"]


def test_copy_needles_follow_the_rules_and_share_nothing_with_held_out_pools():
    groups = T.COPY_NEEDLES_TRAIN
    assert len(groups) >= 12 and {k for k, _, _ in groups} == {"word", "person", "code"}
    held = {g for pool in POOLS for s in HELD_OUT for t in texts(pool, s) for g in four_grams(t)}
    all_q = [q for _, _, qs in groups for q in qs]
    assert len(set(all_q)) == len(all_q)
    for _kind, statements, questions in groups:
        assert 2 <= len(statements) <= 4 and 3 <= len(questions) <= 4, statements
        assert all(s.count("{w}") == 1 for s in statements) and not any("{" in q for q in questions)
        for t in statements + questions:
            assert not re.search(r"\d", t), t
            assert not four_grams(t) & held, t
            low = t.lower()
            assert not any(thing in low for thing in ("side door", "hidden", "blue locker", "wifi", "password",
                                                      "guest", "access code")), t
