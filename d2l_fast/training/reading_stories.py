"""Everyday-prose filler for the reading data's train split: short invented stories about people in a town.

Why: the corpus filler (:mod:`.reading_sources`: docstrings, licences, copyright files) is technical prose, and the
only narrative prose in the train mix is the fact documents'. A reader trained on that mix learns the style as a
cue: a needle in narrative filler reads as an unanswered fact question ("The document does not say.") — run 11
answers 32 of 32 old-generator needles with corpus filler around them and 18 of 32 (12 refusals) with the old
generator's own landscape sentences (docs/training-reading.md, session 9). Stories put needles into narrative
prose during training, so the style stops being a cue.

The sentences are drawn from word pools by a seeded generator (each story from its own name), hold no digits and
none of the needle words, and none of them is a sentence of :data:`~.generators.FILLER_BLOCK` (the old
generator's filler, which the bundled model's test reads as unseen prose). Train split only: the evaluation splits
keep their sources, so their documents — and every result measured on them — stay as they were.
"""

from __future__ import annotations

import functools
import random

#: how many stories the train split gets, and sentences per story
N_STORIES, STORY_SENTENCES = 240, 40

_PEOPLE = ["the baker", "my aunt", "the new teacher", "a tall stranger", "the twins", "our neighbour", "the nurse",
           "the shopkeeper", "the little boy", "his sister", "the farmer", "a group of students", "the bus driver",
           "the librarian", "my grandfather", "the young doctor", "the postman", "her cousin", "the mayor",
           "the painter", "an old friend", "the cook", "the gardener", "the waiter", "two tourists", "the tailor"]
_THINGS = ["a basket of pears", "the kitchen table", "an old umbrella", "a loaf of bread", "the garden gate",
           "a pair of boots", "the broken chair", "a jar of honey", "the red bicycle", "a bunch of flowers",
           "the heavy suitcase", "a box of letters", "the blue teapot", "a warm blanket", "the shop window",
           "a bag of potatoes", "the front door", "a small painting", "the wooden ladder", "a plate of biscuits",
           "the winter coat", "a tin of paint", "the photo album", "a cup of tea", "the long scarf"]
_PLACES = ["the bakery", "the harbour", "the station", "the library", "the park", "the corner shop", "the school",
           "the post office", "the old church", "the market square", "the town hall", "the hospital", "the beach",
           "the cinema", "the swimming pool", "the garden centre", "the museum", "the football ground",
           "the bookshop", "the village pub", "the dentist", "the bus stop", "the playground", "the hotel lobby"]
_WHEN = ["early in the morning", "after lunch", "before dinner", "on a cold afternoon", "late in the evening",
         "during the holidays", "while it was raining", "just after sunrise", "at the weekend", "on Monday",
         "the next day", "a week later", "on the way home", "before the shops closed", "after the concert"]
_CARRY = ["carried", "painted", "repaired", "washed", "bought", "found", "borrowed", "wrapped", "dropped",
          "polished", "sold", "cleaned", "forgot", "moved", "checked"]
_GO = ["walked to", "hurried past", "waited outside", "sat down near", "drove to", "stopped at", "looked around",
       "went back to", "cycled to", "arrived at"]
_FEEL = ["happy", "tired", "a little nervous", "proud", "surprised", "cold", "hungry", "calm", "curious", "sleepy"]
_THEN = ["smiled", "laughed quietly", "went home early", "sat down for a while", "made some tea", "called a friend",
         "read the newspaper", "closed the curtains", "opened a window", "started to sing"]
_LOOKS = ["crowded", "quiet", "warm", "noisy", "almost empty", "full of people", "freezing", "bright and clean",
          "dark and damp", "busier than usual"]
_SAID = ["we should leave soon", "nobody had seen it before", "everything would be fine", "the soup was ready",
         "the weather would change", "the door was stuck again", "it was time for a break", "the cake smelled good"]

_FORMS = (
    lambda r, p: f"{_cap(r.choice(_PEOPLE))} {r.choice(_CARRY)} {r.choice(_THINGS)} {r.choice(_WHEN)}.",
    lambda r, p: f"{_cap(r.choice(_WHEN))}, {p} {r.choice(_GO)} {r.choice(_PLACES)}.",
    lambda r, p: f"{_cap(r.choice(_PLACES))} was {r.choice(_LOOKS)} {r.choice(_WHEN)}.",
    lambda r, p: f"{_cap(p)} felt {r.choice(_FEEL)} and {r.choice(_THEN)}.",
    lambda r, p: f"{_cap(r.choice(_PEOPLE))} said that {r.choice(_SAID)}.",
    lambda r, p: f"{_cap(p)} {r.choice(_GO)} {r.choice(_PLACES)} with {r.choice(_THINGS)}.",
    lambda r, p: f"When {r.choice(_PEOPLE)} {r.choice(_THEN)}, {p} {r.choice(_CARRY)} {r.choice(_THINGS)}.",
    lambda r, p: f"Nobody at {r.choice(_PLACES)} noticed {r.choice(_THINGS)}.",
)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def story(name: str, n_sentences: int = STORY_SENTENCES) -> tuple[str, ...]:
    """The sentences of the story called ``name`` (the same name, the same story), distinct within a story."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if isinstance(n_sentences, bool) or not isinstance(n_sentences, int) or not 1 <= n_sentences <= 200:
        raise ValueError(f"n_sentences must be an int in [1, 200], got {n_sentences!r}")
    rng = random.Random(f"reading/story/{name}")
    hero = rng.choice(_PEOPLE)
    out: dict[str, None] = {}
    while len(out) < n_sentences:
        out[rng.choice(_FORMS)(rng, hero)] = None
    return tuple(out)


@functools.lru_cache(maxsize=1)
def story_sources() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``((source name, sentences), ...)``: the train split's :data:`N_STORIES` stories."""
    return tuple((f"story:{k:03d}", story(f"train/{k}")) for k in range(N_STORIES))


__all__ = ["N_STORIES", "STORY_SENTENCES", "story", "story_sources"]
