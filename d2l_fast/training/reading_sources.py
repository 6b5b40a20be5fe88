"""Where the reading data's splits come from (:mod:`.reading`): the split of an invented word, number string or
filler source (``crc32 mod 10``), and the filler prose — sentences of the Python standard library's docstrings,
``/usr/share/common-licenses`` and ``/usr/share/doc/*/copyright``, each source file in the split of its name's crc32,
sentences found in two splits' sources dropped — with the runs of sentences that fill a document to a token
length; on request the train split's runs also come from :mod:`.reading_stories`' everyday prose."""

from __future__ import annotations

import functools
import pathlib
import random
import re
import sysconfig
import zlib
from collections.abc import Callable

from .generators import _length_fn  # noqa: F401 - text → token count, shared with the NIAH generator
from .reading_stories import story_sources

SPLITS = ("train", "dev", "test")

_FILLER_BANNED = {"number", "numbers", "code", "codes", "password", "combination", "magic", "secret", "lucky",
                  "tracking", "hidden", "access", "locker", "wifi", "parcel", "document", "say"}
_SENTENCE_RE = re.compile(r"[A-Z][A-Za-z ,;'()-]+\.")


def split_of(text: str) -> str:
    """The split an invented word, a number string or a filler source belongs to (crc32 mod 10: 0 → test,
    1 → dev, otherwise train)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected a non-empty string, got {text!r}")
    h = zlib.crc32(text.lower().encode("utf-8")) % 10
    return "test" if h == 0 else "dev" if h == 1 else "train"


def _check_split(split) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split




def _source_files() -> list[tuple[str, pathlib.Path]]:
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo")
    files = sorted(lib.glob("*.py")) + sorted(p for p in lib.glob("*/*.py") if p.parent.name not in skip)
    out = [(f"stdlib:{p.relative_to(lib).with_suffix('').as_posix().replace('/', '.')}", p) for p in files]
    lic = pathlib.Path("/usr/share/common-licenses")
    if lic.is_dir():
        out += [(f"licence:{p.name}", p) for p in sorted(lic.iterdir()) if p.is_file()]
    doc = pathlib.Path("/usr/share/doc")
    if doc.is_dir():
        out += [(f"copyright:{p.parent.name}", p) for p in sorted(doc.glob("*/copyright")) if p.is_file()]
    return out


def _sentences(text: str, python: bool) -> list[str]:
    if python:
        text = " ".join(m.group(1) for m in re.finditer(r'"""(.*?)"""', text, re.S))
    text = re.sub(r"\s+", " ", text)
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = s.strip()
        words = s.split()
        if (6 <= len(words) <= 35 and _SENTENCE_RE.fullmatch(s) and s.count("(") == s.count(")")
                and not any(w.strip(",;().'").lower() in _FILLER_BANNED for w in words)):
            out.append(s)
    return out


@functools.lru_cache(maxsize=1)
def _all_filler() -> dict[str, tuple[tuple[str, tuple[str, ...]], ...]]:
    by_split: dict[str, list] = {s: [] for s in SPLITS}
    owner: dict[str, set] = {}
    for name, path in _source_files():
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        sents = list(dict.fromkeys(_sentences(text, name.startswith("stdlib:"))))
        split = split_of(name)
        for s in sents:
            owner.setdefault(s, set()).add(split)
        by_split[split].append((name, sents))
    out = {}
    for split, docs in by_split.items():
        seen, keep = set(), []
        for name, sents in docs:
            sents = tuple(s for s in sents if len(owner[s]) == 1 and s not in seen)
            seen.update(sents)
            if len(sents) >= 3:
                keep.append((name, sents))
        out[split] = tuple(keep)
    return out


def filler_sources(split: str) -> list[tuple[str, tuple[str, ...]]]:
    """``[(source name, sentences)]`` of ``split`` (module docstring); the sentences hold no digits and none of
    the needle words."""
    docs = _all_filler()[_check_split(split)]
    if not docs:
        raise RuntimeError(f"no filler prose found for split {split!r} (looked in the Python standard library, "
                           "/usr/share/common-licenses and /usr/share/doc/*/copyright)")
    return list(docs)


#: with ``stories`` on, the share of filler runs drawn from :mod:`.reading_stories` instead of the corpus sources
STORY_SHARE = 0.4


class _Filler:
    """Runs of consecutive filler sentences (a random source, a random start, continuing in another source).
    ``stories`` (train split only): a :data:`STORY_SHARE` of the runs come from the everyday-prose stories of
    :mod:`.reading_stories`; off, the draws are exactly those made without stories."""

    def __init__(self, rng: random.Random, split: str, count: Callable[[str], int], stories: bool = False):
        if not isinstance(stories, bool):
            raise ValueError(f"stories must be a bool, got {stories!r}")
        if stories and split != "train":
            raise ValueError(f"story filler is a training extra: split must be 'train', got {split!r} (the "
                             "evaluation splits keep their sources so their documents stay comparable)")
        self.rng, self.docs, self.count, self.cache = rng, filler_sources(split), count, {}
        self.stories = story_sources() if stories else ()

    def tokens(self, s: str) -> int:
        if s not in self.cache:
            self.cache[s] = self.count(" " + s)
        return self.cache[s]

    def run(self, n_tokens: int) -> tuple[list[str], list[str]]:
        """Sentences of about ``n_tokens`` tokens in all, and the sources they came from."""
        out, names, total = [], [], 0
        while total < n_tokens:
            pool = self.stories if self.stories and self.rng.random() < STORY_SHARE else self.docs
            name, sents = self.rng.choice(pool)
            names.append(name)
            for s in sents[self.rng.randrange(len(sents)):]:
                if total >= n_tokens:
                    break
                out.append(s)
                total += self.tokens(s)
        return out, names


def _fit(build: Callable[[list[str]], str], filler: _Filler, count, lo: int, hi: int, fixed_tokens: int):
    """Text from ``build(fillers)`` with ``lo ≤ count(text) < hi``; fillers are added or dropped at the end."""
    rng = filler.rng
    for _ in range(20):
        target = rng.randint(lo, hi - 1)
        sents, names = filler.run(max(0, target - fixed_tokens) + 200)
        est, k = fixed_tokens, 0
        while k < len(sents) and est + filler.tokens(sents[k]) <= target:
            est += filler.tokens(sents[k])
            k += 1
        seen = set()
        while k not in seen and 0 <= k <= len(sents):
            seen.add(k)
            text = build(sents[:k])
            n = count(text)
            if lo <= n < hi:
                return text, n, sorted(set(names))
            k += -1 if n >= hi else 1
    raise ValueError(f"cannot build a document of {lo}–{hi - 1} tokens from whole filler sentences; widen the bin")


__all__ = ["SPLITS", "filler_sources", "split_of"]
