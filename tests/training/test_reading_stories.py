"""Everyday-prose filler (d2l_fast.training.reading_stories): deterministic, clean sentences that never reproduce
the old generator's filler (the bundled model's test reads it as unseen prose), train split only, and off by
default so every generator draws exactly what it drew before."""

import re

import pytest

from d2l_fast.training import reading as R
from d2l_fast.training.generators import FILLER_BLOCK
from d2l_fast.training.reading_sources import _FILLER_BANNED, _SENTENCE_RE
from d2l_fast.training.reading_stories import N_STORIES, STORY_SENTENCES, story, story_sources


def words(text):
    return len(re.findall(r"\w+|[^\w\s]", text))


def five_grams(s):
    w = re.findall(r"[a-z]+", s.lower())
    return {tuple(w[i:i + 5]) for i in range(len(w) - 4)}


def test_stories_are_deterministic_clean_and_distinct():
    src = story_sources()
    assert len(src) == N_STORIES and len({name for name, _ in src}) == N_STORIES
    assert story("train/3") == story("train/3") == src[3][1] and story("train/3") != story("train/4")
    legacy = set().union(*(five_grams(s) for s in FILLER_BLOCK))
    for _, sents in src:
        assert len(sents) == STORY_SENTENCES == len(set(sents))
        for s in sents:
            assert _SENTENCE_RE.fullmatch(s) and not re.search(r"\d", s), s
            assert not {w.strip(",.").lower() for w in s.split()} & _FILLER_BANNED, s
            assert s not in FILLER_BLOCK and not five_grams(s) & legacy, s


@pytest.mark.parametrize("bad, match", [(("",), "name"), (("x", 0), "n_sentences"), (("x", True), "n_sentences"),
                                        ((3,), "name")])
def test_story_refuses_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        story(*bad)


def test_story_filler_is_off_by_default_and_train_only():
    kw = dict(split="train", n_per_bin=6, seed=2)
    assert R.generate_niah_docs(words, **kw) == R.generate_niah_docs(words, **kw, story_filler=False)
    rich = R.generate_niah_docs(words, **kw, story_filler=True)
    srcs = [s for r in rich for s in r["meta"]["sources"]]
    assert any(s.startswith("story:") for s in srcs) and any(not s.startswith("story:") for s in srcs)
    for r in rich:  # the needle and its answers are as valid as with corpus filler
        assert all(qa["answers"][0] in r["context"] for qa in r["qas"] if qa["qa_kind"] == "needle")
    for split in ("dev", "test"):
        with pytest.raises(ValueError, match="training extra"):
            R.generate_niah_docs(words, split=split, n_per_bin=1, story_filler=True)
    with pytest.raises(ValueError, match="stories must be a bool"):
        R.generate_niah_docs(words, split="train", n_per_bin=1, story_filler=1)


def test_the_mix_passes_story_filler_to_every_filler_generator():
    kw = dict(split="train", seed=4, n_niah_per_bin=4, niah_bins=((32, 128), (128, 256)), n_long_per_bin=3,
              long_bins=((512, 800),), n_nohijack=6)
    plain, rich = R.generate_reading(words, **kw), R.generate_reading(words, **kw, story_filler=True)
    assert [r["id"] for r in plain] == [r["id"] for r in rich]
    story_kinds = {r["meta"]["kind"] for r in rich if any(s.startswith("story:") for s in r["meta"].get("sources", []))}
    assert {"niah", "long", "nohijack"} <= story_kinds
    assert not any(s.startswith("story:") for r in plain for s in r["meta"].get("sources", []))
    copy = R.generate_copy_docs(words, n_per_bin=6, seed=1, story_filler=True)
    assert any(s.startswith("story:") for r in copy for s in r["meta"]["sources"])
