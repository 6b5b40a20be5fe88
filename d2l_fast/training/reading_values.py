"""Values of one reading-data split (issue 16): invented words (people, cities, organisations, schools) and number
strings (integers, years, amounts, codes), each belonging to the split ``crc32(value) mod 10`` picks
(:func:`~.reading_sources.split_of`), so no invented word or number of two or more digits appears in two splits."""

from __future__ import annotations

import functools
import random
import re

from . import reading_pools as P
from .reading_sources import SPLITS, _check_split, split_of

_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "bl", "dr",
           "gl", "kr", "pr", "sk", "st", "tr", "ch", "sh")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "io", "oa", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k", "nt", "rd", "ck")


@functools.lru_cache(maxsize=1)
def _common_words() -> frozenset[str]:
    texts = [P.NOT_STATED, *P.PROFESSIONS, *P.INSTRUMENTS, *P.OBJECTS, *P.ORG_SUFFIXES, *P.SCHOOL_FORMS]
    for pool in (P.PERSON_ATTRIBUTES, P.NUMBER_ATTRIBUTES):
        for d in pool.values():
            texts += [t for s in SPLITS for t in d["preds"][s] + d["questions"][s]]
    for s in SPLITS:
        texts += [t for f in P.FRAMES[s] for t in f[1:]] + P.OPENERS[s] + P.CHITCHAT_QUESTIONS[s]
        texts += [t for st, qs in P.NEEDLES[s] for t in st + qs] + [t for qa in P.GENERAL_QUESTIONS[s] for t in qa]
    return frozenset(w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t))


class _Names:
    """Invented words of one split, never repeated within one document (``reset`` per document)."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split, self.used = rng, split, set()

    def reset(self):
        self.used = set()

    def word(self) -> str:
        for _ in range(10000):
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_NUCLEI) for _ in range(self.rng.choice((2, 2, 3))))
            w = (w + self.rng.choice(_CODAS)).capitalize()
            if w not in self.used and w.lower() not in _common_words() and split_of(w) == self.split:
                self.used.add(w)
                return w
        raise RuntimeError("could not invent a new word")  # pragma: no cover - the word space is huge

    def value(self, kind: str) -> str:
        if kind == "person":
            return f"{self.word()} {self.word()}"
        if kind == "city":
            return self.word()
        if kind == "org":
            return f"{self.word()} {self.rng.choice(P.ORG_SUFFIXES)}"
        if kind == "school":
            return self.rng.choice(P.SCHOOL_FORMS).format(w=self.word())
        pool = {"profession": P.PROFESSIONS, "instrument": P.INSTRUMENTS, "object": P.OBJECTS}[kind]
        return self.rng.choice(pool)


# ---------------------------------------------------------------------------------------------------- numbers


def make_number(rng: random.Random, kind: str, split: str, digits: tuple[int, int] = (1, 8)) -> str:
    """A number string of ``kind`` (``integer`` with a digit count drawn from ``digits``, ``year``, ``amount``
    such as ``$4,250`` / ``€12.50`` / ``3.5 million``, ``code`` such as ``AX-4471``) from ``split``'s pool."""
    _check_split(split)
    for _ in range(10000):
        if kind == "integer":
            d = rng.randint(*digits)
            s = str(rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1))
        elif kind == "year":
            s = str(rng.randint(1600, 2029))
        elif kind == "amount":
            form = rng.randrange(4)
            cur = rng.choice(P.CURRENCIES)
            if form == 0:
                s = f"{cur}{rng.randint(10, 9_999_999):,}"
            elif form == 1:
                s = f"{cur}{rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
            elif form == 2:
                s = f"{rng.randint(1, 99)}.{rng.randint(1, 9)} million {rng.choice(('dollars', 'euros', 'pounds'))}"
            else:
                s = f"{rng.randint(100, 99_999):,} {rng.choice(('dollars', 'euros', 'pounds'))}"
        elif kind == "code":
            up = "ABCDEFGHJKLMNPQRSTUVWXYZ"
            form = rng.randrange(3)
            if form == 0:
                s = f"{rng.choice(up)}{rng.choice(up)}-{rng.randint(100, 99999)}"
            elif form == 1:
                s = f"{rng.choice(up)}{rng.randint(1, 9)}-{rng.randint(10, 999)}{rng.choice(up)}"
            else:
                s = f"{rng.choice(up)}{rng.choice(up)}{rng.choice(up)}{rng.randint(10, 9999)}"
        else:
            raise ValueError(f"number kind must be integer, year, amount or code, got {kind!r}")
        if len(s) == 1 or split_of(s) == split:
            return s
    raise RuntimeError(f"no {kind} number of split {split}")  # pragma: no cover


def n_digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


__all__ = ["make_number", "n_digits"]
