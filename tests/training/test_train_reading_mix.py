"""scripts/train_reading.py's training mix: the extras reach every generator they name (story filler, the long
needles' own absent probability), and off they leave the mix as it was."""

import re

import pytest

from tests._scripts import load_script


def words(text):
    return len(re.findall(r"\w+|[^\w\s]", text))


@pytest.fixture(scope="module")
def script():
    return load_script("train_reading")


def mix(script, *extra):
    a = script.build_parser().parse_args(["--out", "unused", "--n-facts", "0", "--n-numbers", "0",
                                          "--n-niah-per-bin", "3", "--n-niah-long-per-bin", "2", "--n-nohijack", "0",
                                          "--niah-absent", "1.0", *extra])
    return script._records(words, a, "train", None, training=True)


def kind(r):
    return "long" if r["meta"]["bin"][0] >= 256 else "short"


def test_niah_absent_long_sets_the_longer_needles_alone(script):
    plain, split = mix(script), mix(script, "--niah-absent-long", "0")

    def absent(recs, k):
        return [any(q["qa_kind"] == "absent" for q in r["qas"]) for r in recs if kind(r) == k]

    assert all(absent(plain, "short")) and all(absent(plain, "long"))
    assert all(absent(split, "short")) and split and not any(absent(split, "long"))
    assert len(plain) == len(split) and absent(split, "long")


def test_story_filler_reaches_the_training_mix(script):
    plain, rich = mix(script), mix(script, "--story-filler")
    story = [any(s.startswith("story:") for s in r["meta"]["sources"]) for r in rich]
    assert any(story) and not any(s.startswith("story:") for r in plain for s in r["meta"]["sources"])


def test_hard_and_fact_absent_reach_the_fact_number_and_no_hijack_documents(script):
    def recs(*extra):
        a = script.build_parser().parse_args(["--out", "unused", "--n-facts", "40", "--n-numbers", "40",
                                              "--n-niah-per-bin", "0", "--n-nohijack", "10", *extra])
        return script._records(words, a, "train", None, training=True)

    def absent(rs, what):
        return [q for r in rs if r["meta"]["kind"] == what for q in r["qas"] if q["qa_kind"] == "absent"]

    plain, rich = recs(), recs("--fact-absent", "1.0", "--hard-absent", "1.0")
    assert not any(q.get("hard_negative") for r in plain for q in r["qas"])
    assert len(absent(rich, "facts")) == 40 > len(absent(plain, "facts"))  # one per fact document
    for what in ("facts", "numbers", "nohijack"):
        assert any(q.get("hard_negative") for q in absent(rich, what)), what
    with pytest.raises(ValueError, match="hard_absent"):
        recs("--hard-absent", "1.5")
