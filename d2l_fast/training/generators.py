"""Offline data generators (spec §5.2): needle-in-a-haystack contexts binned by token length, and a synthetic
corpus of invented entities with facts, questions and gold answers whose held-out splits share neither entities
nor phrasings with training.

Both write the same JSONL record (one document per line) that ``d2l-fast gen-data`` and ``d2l-fast eval`` read::

    {"id": "niah-32-128-00003", "task": "niah", "context": "...",
     "qas": [{"question": "What is the special magic number?", "answers": ["4821"]}],
     "meta": {"n_tokens": 97, "bin": [32, 128], "depth": 0.41, ...}}

``task`` is ``"niah"`` or ``"qa"``; ``answers`` lists the accepted gold strings (optional for teacher generation).
:func:`read_records` validates a whole file before anything heavy runs.

NIAH (:func:`generate_niah`): a context is the filler block repeated sentence by sentence, with the needle
``The special magic number is NNNN.`` inserted between two sentences at a depth drawn uniformly within a decile,
the deciles visited in a shuffled order per group of ten examples (so depths cover [0, 1] evenly even for small
sets). Its length — the tokenizer's ids of the context text, without chat template or special tokens — falls in
``[lo, hi)`` of its bin (filler sentences are added or removed until it does).

Facts (:func:`generate_facts`): each document is about one invented person whose name is two generated words
(syllables of an invented inventory, so not English words; checked against every word the corpus itself uses)
and holds 3–8 facts from :data:`ATTRIBUTES` (birth year, city, colour, profession, pet, instrument, sport,
language). Every attribute has several fact phrasings and several question phrasings; the last
:data:`HELD_OUT_TEMPLATES` of each pool are used only by the held-out splits. A name belongs to exactly one split
by a fixed hash of the name (``crc32``), so different seeds never move an entity between splits.
Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import io
import json
import pathlib
import random
import re
import zlib
from collections.abc import Callable, Iterable, Sequence

from ..safe_io import open_regular

NEEDLE = "The special magic number is {number}."
NIAH_QUESTION = "What is the special magic number?"
#: bins the reference trains NIAH on (token counts, [lo, hi)); longer bins are for evaluation.
NIAH_TRAIN_BINS: tuple[tuple[int, int], ...] = ((32, 128), (128, 256))
NIAH_EVAL_BINS: tuple[tuple[int, int], ...] = ((32, 128), (128, 256), (256, 512), (512, 1024), (1024, 2048),
                                               (2048, 4096))

FILLER_BLOCK: tuple[str, ...] = (
    "The river runs past the old stone bridge.",
    "A light wind moves through the tall grass.",
    "Clouds drift slowly over the quiet hills.",
    "The market opens early on most mornings.",
    "Birds gather on the roof of the barn.",
    "The road bends twice before it reaches the village.",
    "Rain falls softly on the wooden fence.",
    "A small boat rests at the edge of the lake.",
)

TASKS = ("niah", "qa")


# ---------------------------------------------------------------------------------------------------- NIAH


def _length_fn(tokenizer) -> Callable[[str], int]:
    if callable(tokenizer) and hasattr(tokenizer, "convert_ids_to_tokens"):
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"tokenizer must be a Hugging Face tokenizer or a callable text → token count, got "
                    f"{type(tokenizer).__name__}")


def _check_bins(bins) -> list[tuple[int, int]]:
    out = []
    for b in bins:
        if (not isinstance(b, (tuple, list)) or len(b) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in b) or not 0 <= b[0] < b[1]):
            raise ValueError(f"each bin must be a pair of ints (lo, hi) with 0 ≤ lo < hi, got {b!r}")
        out.append((int(b[0]), int(b[1])))
    if not out:
        raise ValueError("expected at least one length bin")
    return out


def _check_count(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} must be a positive int, got {n!r}")
    return n


def _niah_text(fillers: list[str], needle: str, slot: int) -> str:
    return " ".join(fillers[:slot] + [needle] + fillers[slot:])


def generate_niah(tokenizer, *, bins: Sequence[tuple[int, int]] = NIAH_TRAIN_BINS, n_per_bin: int = 100,
                  seed: int = 0, filler: Sequence[str] = FILLER_BLOCK, id_prefix: str = "niah") -> list[dict]:
    """Needle-in-a-haystack records, ``n_per_bin`` per length bin (see the module docstring).

    Args:
        tokenizer: the model's tokenizer (lengths are its ids of the context text, no special tokens), or a
            callable ``text → token count``.
        bins: ``[lo, hi)`` token-length bins.
        n_per_bin: examples per bin.
        seed: everything (numbers, depths, lengths, filler offsets) is a function of the seed.
        filler: the filler block's sentences (must not mention the needle or contain digits).

    Raises:
        ValueError: a bin too short for the needle, or too narrow to hit with whole filler sentences.
    """
    count = _length_fn(tokenizer)
    bins = _check_bins(bins)
    _check_count(n_per_bin, "n_per_bin")
    filler = [str(s).strip() for s in filler]
    if not filler or any(not s for s in filler):
        raise ValueError("filler must be a non-empty list of non-empty sentences")
    if any(re.search(r"\d", s) or "magic number" in s.lower() for s in filler):
        raise ValueError("filler sentences must not contain digits or mention the magic number")
    rng = random.Random(f"niah/{seed}")
    per_sentence = max(1.0, sum(count(" " + s) for s in filler) / len(filler))
    records = []
    for lo, hi in bins:
        deciles: list[int] = []
        for i in range(n_per_bin):
            if not deciles:
                deciles = list(range(10))
                rng.shuffle(deciles)
            depth = (deciles.pop() + rng.random()) / 10
            number = str(rng.randint(1000, 9999))
            needle = NEEDLE.format(number=number)
            target = rng.randint(lo, hi - 1)
            offset = rng.randrange(len(filler))
            n_fill = max(0, round((target - count(needle)) / per_sentence))
            text, n_tok, seen = None, None, set()
            while True:
                fillers = [filler[(offset + j) % len(filler)] for j in range(n_fill)]
                slot = round(depth * n_fill)
                text = _niah_text(fillers, needle, slot)
                n_tok = count(text)
                if lo <= n_tok < hi:
                    break
                seen.add(n_fill)
                step = -1 if n_tok >= hi else 1
                if n_fill + step < 0 or n_fill + step in seen:
                    raise ValueError(f"cannot build a context of {lo}–{hi - 1} tokens from whole filler sentences "
                                     f"(the needle alone is {count(needle)} tokens, a filler sentence "
                                     f"~{per_sentence:.0f}); widen the bin")
                n_fill += step
            records.append({
                "id": f"{id_prefix}-{lo}-{hi}-{i:05d}",
                "task": "niah",
                "context": text,
                "qas": [{"question": NIAH_QUESTION, "answers": [number]}],
                "meta": {"n_tokens": n_tok, "bin": [lo, hi], "depth": round(depth, 6),
                         "needle_char_depth": round(text.index(needle) / max(1, len(text) - len(needle)), 6)},
            })
    return records


# ---------------------------------------------------------------------------------------------------- facts

#: attribute → values and phrasing pools. ``{name}`` is the entity, ``{value}`` the value, ``{a_value}`` the
#: value with its indefinite article. The last HELD_OUT_TEMPLATES entries of each pool are held out.
ATTRIBUTES: dict[str, dict] = {
    "birth_year": {
        "values": [str(y) for y in range(1921, 2001)],
        "facts": [
            "{name} was born in {value}.",
            "The year {name} was born was {value}.",
            "{name} came into the world in {value}.",
            "Records show that {name} was born in the year {value}.",
            "{name}'s birth took place in {value}.",
            "In {value}, {name} was born.",
        ],
        "questions": [
            "In what year was {name} born?",
            "When was {name} born?",
            "What is the birth year of {name}?",
            "Which year did {name} come into the world?",
            "What year was {name} born in?",
            "In which year did {name}'s birth take place?",
        ],
    },
    "city": {
        "values": ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Krakow", "Montreal", "Adelaide", "Porto",
                   "Tbilisi", "Quito", "Hanoi", "Dublin", "Seville", "Bergen", "Cusco", "Tunis", "Riga"],
        "facts": [
            "{name} lives in {value}.",
            "{name} has made a home in the city of {value}.",
            "These days {name} resides in {value}.",
            "The city where {name} lives is {value}.",
            "{name} settled down in {value}.",
            "Home for {name} is the city of {value}.",
        ],
        "questions": [
            "Where does {name} live?",
            "In which city does {name} live?",
            "What city is home to {name}?",
            "Which city does {name} reside in?",
            "What is the home city of {name}?",
            "Where has {name} settled down?",
        ],
    },
    "colour": {
        "values": ["red", "blue", "green", "yellow", "purple", "orange", "teal", "crimson", "silver", "amber",
                   "violet", "turquoise"],
        "facts": [
            "The favourite colour of {name} is {value}.",
            "{name} likes the colour {value} more than any other.",
            "{name}'s favourite colour is {value}.",
            "Of all colours, {name} prefers {value}.",
            "{name} always picks {value} as a favourite colour.",
            "If asked, {name} names {value} as the best colour.",
        ],
        "questions": [
            "What is the favourite colour of {name}?",
            "Which colour does {name} like best?",
            "What is {name}'s favourite colour?",
            "Which colour does {name} prefer?",
            "What colour does {name} consider the best?",
            "Name the favourite colour of {name}.",
        ],
    },
    "profession": {
        "values": ["baker", "architect", "nurse", "pilot", "carpenter", "lawyer", "engineer", "farmer",
                   "librarian", "chemist", "electrician", "journalist", "veterinarian", "translator"],
        "facts": [
            "{name} works as {a_value}.",
            "By profession, {name} is {a_value}.",
            "{name} earns a living as {a_value}.",
            "The job of {name} is that of {a_value}.",
            "{name} has a career as {a_value}.",
            "For work, {name} is employed as {a_value}.",
        ],
        "questions": [
            "What does {name} do for a living?",
            "What is the profession of {name}?",
            "What is {name}'s job?",
            "Which profession does {name} have?",
            "What does {name} work as?",
            "What kind of work is {name} employed in?",
        ],
    },
    "pet": {
        "values": ["dog", "cat", "parrot", "rabbit", "tortoise", "hamster", "goldfish", "ferret", "canary",
                   "iguana", "horse", "goat"],
        "facts": [
            "{name} has a pet {value}.",
            "{name} keeps {a_value} as a pet.",
            "The pet of {name} is {a_value}.",
            "At home, {name} looks after a pet {value}.",
            "{name} owns {a_value}.",
            "A pet {value} lives with {name}.",
        ],
        "questions": [
            "What pet does {name} have?",
            "What kind of pet does {name} keep?",
            "What animal is {name}'s pet?",
            "Which animal does {name} look after at home?",
            "What animal does {name} own?",
            "Which pet lives with {name}?",
        ],
    },
    "instrument": {
        "values": ["piano", "violin", "cello", "flute", "trumpet", "guitar", "harp", "drums", "clarinet",
                   "accordion", "banjo", "oboe"],
        "facts": [
            "{name} plays the {value}.",
            "The instrument {name} plays is the {value}.",
            "{name} practises the {value} every evening.",
            "In the local band, {name} plays the {value}.",
            "{name} learned to play the {value} as a child.",
            "Music for {name} means playing the {value}.",
        ],
        "questions": [
            "What instrument does {name} play?",
            "Which instrument does {name} play?",
            "What does {name} practise every evening?",
            "Which instrument does {name} play in the band?",
            "What instrument did {name} learn as a child?",
            "Which musical instrument is {name} known for?",
        ],
    },
    "sport": {
        "values": ["tennis", "rowing", "fencing", "cycling", "volleyball", "archery", "climbing", "swimming",
                   "badminton", "judo", "sailing", "handball"],
        "facts": [
            "{name}'s favourite sport is {value}.",
            "On weekends, {name} plays {value}.",
            "The sport {name} enjoys most is {value}.",
            "{name} trains in {value} twice a week.",
            "{name} is a keen fan of {value}.",
            "{name} spends free time on {value}.",
        ],
        "questions": [
            "What is {name}'s favourite sport?",
            "Which sport does {name} enjoy most?",
            "What sport does {name} play on weekends?",
            "Which sport does {name} train in?",
            "What sport is {name} a fan of?",
            "Which sport fills the free time of {name}?",
        ],
    },
    "language": {
        "values": ["Portuguese", "Finnish", "Swahili", "Korean", "Greek", "Hungarian", "Tagalog", "Dutch",
                   "Icelandic", "Turkish", "Polish", "Welsh"],
        "facts": [
            "{name} speaks {value} fluently.",
            "The language {name} speaks at home is {value}.",
            "{name}'s first language is {value}.",
            "{name} grew up speaking {value}.",
            "{name} talks with family in {value}.",
            "Besides English, {name} speaks {value}.",
        ],
        "questions": [
            "What language does {name} speak?",
            "Which language does {name} speak at home?",
            "What is {name}'s first language?",
            "Which language did {name} grow up speaking?",
            "In what language does {name} talk with family?",
            "Besides English, which language does {name} speak?",
        ],
    },
}
HELD_OUT_TEMPLATES = 2
SPLITS = ("train", "validation", "test")
HELD_OUT_SPLITS = ("validation", "test")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
           "st", "th", "sh", "zh", "kv")
_NUCLEI = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "ia", "uo")
_CODAS = ("", "", "n", "r", "l", "s", "th", "x", "m", "nd")


def template_pools(split: str) -> dict[str, dict[str, list[tuple[int, str]]]]:
    """``{attribute: {"facts": [(index, template)], "questions": [...]}}`` a split may use: all but the last
    :data:`HELD_OUT_TEMPLATES` of each pool for ``"train"``, those last ones for the held-out splits."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = {}
    for attr, d in ATTRIBUTES.items():
        out[attr] = {}
        for kind in ("facts", "questions"):
            pool = list(enumerate(d[kind]))
            out[attr][kind] = pool[:-HELD_OUT_TEMPLATES] if split == "train" else pool[-HELD_OUT_TEMPLATES:]
    return out


def entity_split(name: str) -> str:
    """The split an entity name belongs to, fixed by the name alone: crc32 mod 10 = 0 → test, 1 → validation,
    otherwise train."""
    h = zlib.crc32(name.encode("utf-8")) % 10
    return "test" if h == 0 else "validation" if h == 1 else "train"


def _corpus_words() -> set[str]:
    words = set()
    texts = list(FILLER_BLOCK) + [NEEDLE, NIAH_QUESTION]
    for d in ATTRIBUTES.values():
        texts += d["facts"] + d["questions"] + d["values"]
    for t in texts:
        words.update(w.lower() for w in re.findall(r"[A-Za-z]+", t))
    return words


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_NUCLEI) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def invent_names(n: int, *, split: str = "train", seed: int = 0) -> list[str]:
    """``n`` distinct invented two-word names of ``split`` (see :func:`entity_split`), deterministic by seed."""
    _check_count(n, "n")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"names/{split}/{seed}")
    banned = _corpus_words()
    names: list[str] = []
    seen = set()
    for _ in range(2000 * n + 10000):
        first, last = _word(rng, rng.choice((2, 3))), _word(rng, rng.choice((2, 3)))
        name = f"{first} {last}"
        if first.lower() in banned or last.lower() in banned or first == last or name in seen:
            continue
        if entity_split(name) != split:
            continue
        seen.add(name)
        names.append(name)
        if len(names) == n:
            return names
    raise RuntimeError(f"could not invent {n} distinct names")  # pragma: no cover - the name space is huge


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def generate_facts(n_docs: int, *, split: str = "train", seed: int = 0, min_facts: int = 3,
                   max_facts: int = 8) -> list[dict]:
    """``n_docs`` synthetic fact documents of ``split`` (module docstring), one QA per fact.

    Each QA holds ``question``, ``answers`` (the value), ``attribute``, ``fact_template`` and ``question_template``
    (``"<attribute>/<index>"`` in the pools of :data:`ATTRIBUTES`); ``meta`` holds ``entity`` and ``split``.
    """
    _check_count(n_docs, "n_docs")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for v, what in ((min_facts, "min_facts"), (max_facts, "max_facts")):
        _check_count(v, what)
    if not min_facts <= max_facts <= len(ATTRIBUTES):
        raise ValueError(f"need 1 ≤ min_facts ≤ max_facts ≤ {len(ATTRIBUTES)}, got {min_facts}, {max_facts}")
    rng = random.Random(f"facts/{split}/{seed}")
    pools = template_pools(split)
    names = invent_names(n_docs, split=split, seed=seed)
    records = []
    for i, name in enumerate(names):
        attrs = rng.sample(sorted(ATTRIBUTES), rng.randint(min_facts, max_facts))
        sentences, qas = [], []
        for attr in attrs:
            value = rng.choice(ATTRIBUTES[attr]["values"])
            fi, ftext = rng.choice(pools[attr]["facts"])
            qi, qtext = rng.choice(pools[attr]["questions"])
            s = ftext.format(name=name, value=value, a_value=_article(value))
            sentences.append(s[0].upper() + s[1:])
            qas.append({"question": qtext.format(name=name), "answers": [value], "attribute": attr,
                        "fact_template": f"{attr}/{fi}", "question_template": f"{attr}/{qi}"})
        records.append({"id": f"facts-{split}-{seed}-{i:05d}", "task": "qa", "context": " ".join(sentences),
                        "qas": qas, "meta": {"entity": name, "split": split}})
    return records


# ---------------------------------------------------------------------------------------------------- JSONL


def validate_record(rec, where: str = "record", *, need_answers: bool = False) -> dict:
    """Check one JSONL record (module docstring); returns it. Raises ValueError naming ``where``."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    ctx = rec.get("context")
    if not isinstance(ctx, str) or not ctx.strip():
        raise ValueError(f"{where}: 'context' must be non-empty text, got {ctx!r:.60}")
    task = rec.get("task", "qa")
    if task not in TASKS:
        raise ValueError(f"{where}: 'task' must be one of {TASKS}, got {task!r}")
    qas = rec.get("qas")
    if not isinstance(qas, list) or not qas:
        raise ValueError(f"{where}: 'qas' must be a non-empty list of {{'question', 'answers'}} objects, got "
                         f"{qas!r:.60}")
    for j, qa in enumerate(qas):
        if not isinstance(qa, dict):
            raise ValueError(f"{where}: qas[{j}] must be an object, got {type(qa).__name__}")
        q = qa.get("question")
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{where}: qas[{j}].question must be non-empty text, got {q!r:.60}")
        ans = qa.get("answers")
        if ans is None and not need_answers:
            continue
        if (not isinstance(ans, list) or not ans or not all(isinstance(a, str) and a.strip() for a in ans)):
            raise ValueError(f"{where}: qas[{j}].answers must be a non-empty list of non-empty strings, got "
                             f"{ans!r:.60}")
    if "id" in rec and not isinstance(rec["id"], (str, int)):
        raise ValueError(f"{where}: 'id' must be a string or int, got {type(rec['id']).__name__}")
    return rec


def read_records(path, *, need_answers: bool = False) -> list[dict]:
    """Read and validate a whole JSONL file of records; every problem names the file and line.

    Raises:
        ValueError: missing or empty file, a line that is not JSON, or a record that does not follow the format.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    records = []
    with io.TextIOWrapper(open_regular(p, what="data file"), encoding="utf-8") as fh:
        try:
            for ln, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{ln}: not valid JSON ({e.msg} at column {e.colno})") from None
                validate_record(rec, f"{p}:{ln}", need_answers=need_answers)
                rec.setdefault("id", f"{p.stem}-{ln}")
                rec.setdefault("task", "qa")
                records.append(rec)
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not records:
        raise ValueError(f"{p}: holds no records (empty file)")
    ids = [str(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{p}: record id {dup!r} appears more than once")
    return records


def write_records(records: Iterable[dict], path) -> pathlib.Path:
    """Write records as JSONL (UTF-8, one per line); each is validated first."""
    records = [validate_record(r, f"record #{i}") for i, r in enumerate(records)]
    p = pathlib.Path(path)
    with open(p, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p


__all__ = ["ATTRIBUTES", "FILLER_BLOCK", "HELD_OUT_SPLITS", "HELD_OUT_TEMPLATES", "NEEDLE", "NIAH_EVAL_BINS",
           "NIAH_QUESTION", "NIAH_TRAIN_BINS", "SPLITS", "entity_split", "generate_facts", "generate_niah",
           "invent_names", "read_records", "template_pools", "validate_record", "write_records"]
