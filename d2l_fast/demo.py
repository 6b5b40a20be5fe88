"""The demo model and the demo/profile runs behind ``d2l-fast demo`` / ``d2l-fast profile``.

* SmolLM2 loading lives in :mod:`d2l_fast.smollm2`; ``load_smollm2``, ``smollm2_path``,
  ``default_smollm2_cache_dir``, ``SMOLLM2_GGUF`` and ``SMOLLM2_INSTALL_HINT`` stay importable from here.
* :func:`demo_docs`: the bundled demo documents (title, text, question, answer).
* :func:`run_demo`: batched internalize + generate on SmolLM2, timed: with the bundled pretrained
  hypernetwork (when this build ships it) on NIAH and held-out fact documents with gold answers
  (:func:`pretrained_demo_docs`), else with a seeded untrained one on :func:`demo_docs`.
* :func:`run_profile`: the same calls with an untrained hypernetwork under ``torch.profiler``.

transformers is imported lazily so that ``import d2l_fast.demo`` stays cheap.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources

import torch

from .smollm2 import (  # their home is d2l_fast.smollm2; kept importable from here
    SMOLLM2_GGUF,
    SMOLLM2_INSTALL_HINT,
    default_smollm2_cache_dir,
    load_smollm2,
    smollm2_path,
)

__all__ = [
    "DEMO_PRETRAINED",
    "TASK_LABELS",
    "UNTRAINED_MAX_CHUNK_LEN",
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL_HINT",
    "answer_is_correct",
    "default_smollm2_cache_dir",
    "demo_checkpoint",
    "demo_docs",
    "load_smollm2",
    "pretrained_demo_docs",
    "run_demo",
    "run_profile",
    "smollm2_path",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# demo and profile runs
# --------------------------------------------------------------------------------------------


def demo_docs() -> list[dict[str, str]]:
    """The bundled demo documents: dicts with ``title``, ``text``, ``question`` and ``answer``."""
    return json.loads(resources.files("d2l_fast").joinpath("data/demo_docs.json").read_text(encoding="utf-8"))


#: the pretrained hypernetwork ``d2l-fast demo`` uses when this build ships it
DEMO_PRETRAINED = "smollm2-135m"
#: seed of the demo's NIAH and fact documents (the fact documents are the generators' held-out "test" split)
DEMO_DATA_SEED = 2024


def pretrained_demo_docs(tokenizer, n_docs: int = 8, *, seed: int = DEMO_DATA_SEED) -> list[dict[str, str]]:
    """Documents with gold answers for a trained hypernetwork: the first ``ceil(n_docs / 2)`` needle-in-a-haystack
    contexts (32–256 tokens, :func:`~d2l_fast.training.generators.generate_niah`), then synthetic fact documents of
    the held-out ``"test"`` split (:func:`~d2l_fast.training.generators.generate_facts`: entities and phrasings
    never used for training), one question each. Dicts with ``title``, ``text``, ``question``, ``answer``,
    ``task`` (``"niah"`` / ``"qa"``); deterministic given ``seed``."""
    from .training.generators import NIAH_TRAIN_BINS, generate_facts, generate_niah

    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 1:
        raise ValueError(f"n_docs must be a positive int, got {n_docs!r}")
    n_niah = (n_docs + 1) // 2
    per_bin = -(-n_niah // len(NIAH_TRAIN_BINS))
    niah = generate_niah(tokenizer, bins=NIAH_TRAIN_BINS, n_per_bin=per_bin, seed=seed, id_prefix="demo-niah")
    by_bin = [niah[b * per_bin:(b + 1) * per_bin] for b in range(len(NIAH_TRAIN_BINS))]
    niah = [r for group in zip(*by_bin) for r in group][:n_niah]  # alternate the length bins
    facts = generate_facts(n_docs - n_niah, split="test", seed=seed) if n_docs > n_niah else []
    docs = []
    for r in niah + facts:
        qa = r["qas"][0]
        title = (f"needle, {r['meta']['n_tokens']} tokens" if r["task"] == "niah"
                 else f"facts about {r['meta']['entity']}")
        docs.append({"title": title, "text": r["context"], "question": qa["question"], "answer": qa["answers"][0],
                     "task": r["task"]})
    return docs


def answer_is_correct(task: str, prediction: str, gold: str) -> bool:
    """NIAH: the first run of digits in the answer is the number; facts: every word of the gold answer is in the
    answer (normalised as the metrics do, :func:`~d2l_fast.training.metrics.qa_f1` recall 1)."""
    import re

    from .training.metrics import qa_f1

    if task == "niah":
        digits = re.findall(r"\d+", prediction)
        return bool(digits) and digits[0] == gold
    return qa_f1(prediction, [gold])[2] == 1.0


def demo_checkpoint(checkpoint: str | None = None, *, untrained: bool = False) -> str | None:
    """What ``run_demo`` loads: ``None`` for the untrained hypernetwork (``untrained``, or no ``checkpoint`` given
    and :data:`DEMO_PRETRAINED` not shipped in this build), else the pretrained name or checkpoint path. A given
    ``checkpoint`` is checked here (unknown name, missing files: an error), before any model is loaded."""
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
#: what the demo calls each kind of document it shows
TASK_LABELS = {"niah": "needles (one 4-digit number)", "qa": "facts (held-out entities)"}


def run_demo(*, n_docs: int = 8, max_new_tokens: int = 24, max_chunk_len: int | None = None, seed: int = 0,
             init_scale: float = 2.0, threads: int = 0, checkpoint: str | None = None, untrained: bool = False) -> int:
    """SmolLM2-135M + a Doc-to-LoRA hypernetwork: internalize documents in one packed call, answer their questions
    in one batched generate (one adapter per row) and with the base model (no document); print stage timings.

    With a pretrained hypernetwork (``checkpoint``: a name or path; by default the bundled
    :data:`DEMO_PRETRAINED` when this build ships it) the documents are :func:`pretrained_demo_docs` (NIAH and
    held-out facts; at least one of each when ``n_docs >= 2``), each answer is shown next to the base model's and the
    gold one, with a tally per kind; the model card's chunk length (``max_chunk_len`` None) and prompt layout are
    used and what the card says it reads is printed. Otherwise (``untrained``, or nothing shipped):
    a seeded untrained hypernetwork on the bundled :func:`demo_docs`; ``seed`` / ``init_scale`` (std of the random
    ``scaler_B``, 0 = the reference init: every adapter is zero) apply to it only; it chunks at
    ``max_chunk_len`` (None: :data:`UNTRAINED_MAX_CHUNK_LEN`)."""
    from .model import D2LModel

    name = demo_checkpoint(checkpoint, untrained=untrained)
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    if name is not None:
        return _run_pretrained_demo(name, n_docs=n_docs, max_new_tokens=max_new_tokens, max_chunk_len=max_chunk_len)
    docs = demo_docs()[:n_docs]
    max_chunk_len = UNTRAINED_MAX_CHUNK_LEN if max_chunk_len is None else max_chunk_len
    t = {}
    t0 = time.perf_counter()
    base, tok = load_smollm2()
    t["load SmolLM2-135M-Instruct"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = D2LModel.from_base(base, tok, seed=seed, init_scaler_B=init_scale,
                               max_chunk_len=max_chunk_len)
    n_params = sum(p.numel() for p in model.hypernet.parameters())
    t["build hypernetwork"] = time.perf_counter() - t0
    why = ("no trained D2L checkpoint for SmolLM2 ships in this build" if not untrained
           else "--untrained was asked for")
    print(f"hypernetwork: {n_params / 1e6:.1f} M parameters, UNTRAINED (seeded random init, seed={seed}): "
          f"its adapters are random, so answers come from the base model's own knowledge; {why}.")
    t0 = time.perf_counter()
    packed = model.pack([d["text"] for d in docs])
    adapters = model.internalize([d["text"] for d in docs], names=[d["title"] for d in docs])
    t["internalize"] = time.perf_counter() - t0
    print(f"internalized {len(docs)} documents in ONE packed call: {packed.total_tokens} context tokens, "
          f"{len(packed.chunks)} chunks (max_chunk_len={max_chunk_len}), adapter ranks {adapters.ranks}")
    questions = [d["question"] for d in docs]
    t0 = time.perf_counter()
    answers = model.generate_text(questions, adapters, adapter_index=list(range(len(docs))),
                                  max_new_tokens=max_new_tokens)
    t["generate (batched, one adapter per row)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_answers = model.generate_text(questions, None, max_new_tokens=max_new_tokens)
    t["generate (same batch, base model)"] = time.perf_counter() - t0
    for d, a, b in zip(docs, answers, base_answers):
        print(f"\n[{d['title']}] Q: {d['question']}\n  with adapter: {a}\n  base model:   {b}\n"
              f"  reference answer: {d['answer']}")
    n_diff = sum(a != b for a, b in zip(answers, base_answers))
    print(f"\n{n_diff}/{len(docs)} answers differ from the base model's "
          f"(random adapters, init scale {init_scale})")
    print("\nstage timings (CPU threads: %d)" % torch.get_num_threads())
    for k, v in t.items():
        print(f"  {k:<42s} {v:7.2f} s")
    return 0


def _run_pretrained_demo(name: str, *, n_docs: int, max_new_tokens: int, max_chunk_len: int | None) -> int:
    from .answering import compare_answers, model_settings
    from .zoo import pretrained, read_model_card, resolve

    t = {}
    _, _, folder = resolve(name)
    card = read_model_card(folder)  # a bad card: an error before the model loads
    t0 = time.perf_counter()
    model = pretrained(name, max_chunk_len=max_chunk_len)  # None: the card's chunk length
    t["load SmolLM2 + pretrained hypernetwork"] = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.hypernet.parameters())
    steps = f", {card['steps']} training steps" if isinstance(card.get("steps"), int) else ""
    print(f"hypernetwork: {n_params / 1e6:.1f} M parameters, TRAINED ({name}{steps}; {folder})")
    settings = model_settings(model)
    if settings["reads"]:
        print(f"trained to read: {settings['reads']}")
    layout = settings["prompt_layout"]
    print(f"settings: chunks of at most {settings['max_chunk_len']} templated tokens; questions asked as "
          + (f"{layout['instruction']!r} (system {layout['system']!r})" if layout else "the bare question")
          + " — the checkpoint's own (model card)")
    docs = pretrained_demo_docs(model.tokenizer, n_docs)
    texts, questions = [d["text"] for d in docs], [d["question"] for d in docs]
    t0 = time.perf_counter()
    packed = model.pack(texts)
    adapters = model.internalize(texts, names=[d["title"] for d in docs])
    t["internalize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    answers = compare_answers(model, texts, questions, methods=("d2l",), adapters=adapters,
                              max_new_tokens=max_new_tokens, batch_size=len(docs))["d2l"]
    t["generate (batched, one adapter per row)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_answers = compare_answers(model, texts, questions, methods=("base",), max_new_tokens=max_new_tokens,
                                   batch_size=len(docs))["base"]
    t["generate (same batch, base model, no document)"] = time.perf_counter() - t0
    print(f"internalized {len(docs)} documents (needle-in-a-haystack and held-out facts) in ONE packed call: "
          f"{packed.total_tokens} context tokens, {len(packed.chunks)} chunks (max_chunk_len="
          f"{settings['max_chunk_len']}); the questions are asked WITHOUT the documents in the prompt")
    tally = {}
    for task, label in TASK_LABELS.items():
        rows = [(d, a, b) for d, a, b in zip(docs, answers, base_answers) if d["task"] == task]
        if rows:
            print(f"\n== {label} ==")
        for d, a, b in rows:
            ca, cb = answer_is_correct(task, a, d["answer"]), answer_is_correct(task, b, d["answer"])
            n, oa, ob = tally.get(task, (0, 0, 0))
            tally[task] = (n + 1, oa + ca, ob + cb)
            print(f"\n[{d['title']}] Q: {d['question']}\n  with adapter: {a}{'  ✓' if ca else ''}\n"
                  f"  base model:   {b}{'  ✓' if cb else ''}\n  gold answer:  {d['answer']}")
    print(f"\n{'correct':<32s} {'with adapter':>13s} {'base model (no document)':>25s}")
    for task, (n, oa, ob) in tally.items():
        print(f"{TASK_LABELS[task]:<32s} {f'{oa}/{n}':>13s} {f'{ob}/{n}':>25s}")
    print("\nstage timings (CPU threads: %d)" % torch.get_num_threads())
    for k, v in t.items():
        print(f"  {k:<48s} {v:7.2f} s")
    return 0


def run_profile(*, n_docs: int = 8, max_new_tokens: int = 8, max_chunk_len: int = 256, latent_size: int = 512,
                num_blocks: int = 9, rows: int = 15, threads: int = 0, trace: str | None = None) -> int:
    """torch.profiler over internalize + batched generate on SmolLM2; prints the top operators per stage
    (``rows`` per table) and, with ``trace``, writes chrome traces to ``<trace>.<stage>.json``."""
    from torch.profiler import ProfilerActivity, profile

    from .model import D2LModel

    if threads:
        torch.set_num_threads(threads)
    docs = demo_docs()[:n_docs]
    base, tok = load_smollm2()
    model = D2LModel.from_base(base, tok, seed=0, init_scaler_B=2.0, max_chunk_len=max_chunk_len,
                               latent_size=latent_size, num_blocks=num_blocks)
    texts = [d["text"] for d in docs]
    model.internalize(texts[:1])  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=False) as p1:
        adapters = model.internalize(texts)
    ids, mask = model.encode_prompts([d["question"] for d in docs])
    with profile(activities=acts) as p2:
        model.generate(ids, mask, adapters=adapters, max_new_tokens=max_new_tokens, do_sample=False)
    for name, p in (("internalize", p1), ("generate", p2)):
        print(f"\n== {name} ==")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
        if trace:
            path = f"{trace}.{name}.json"
            p.export_chrome_trace(path)
            print(f"chrome trace: {path}")
    return 0
