"""``d2l-fast demo``: SmolLM2-135M + the bundled hypernetwork on the bundled documents.

:func:`run_demo` is the run behind the command (it prints); the documents, gold answers and the marking of answers
are :mod:`d2l_fast.demo`'s.
"""

from __future__ import annotations

import time

from ._common import positive_int

NAME = "demo"


def add_parser(sub):
    d = sub.add_parser(NAME, help="SmolLM2-135M + the bundled hypernet (untrained if not shipped): "
                       "batch-internalize needle and fact documents, batched answers beside the base model's and "
                       "the gold ones")
    d.add_argument("--n-docs", type=positive_int, default=8)
    d.add_argument("--max-new-tokens", type=positive_int, default=24)
    d.add_argument("--max-chunk-len", type=positive_int, default=None,
                   help="chat-templated tokens per document chunk (default: a trained checkpoint's model card; "
                   "256 for the untrained hypernetwork)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--init-scale", type=float, default=2.0,
                   help="std of the random scaler_B "
                        "(0 = the reference init: every adapter is zero, i.e. the base model)")
    d.add_argument("--threads", type=int, default=0)
    d.add_argument("--checkpoint", help="pretrained name or checkpoint folder (default: the bundled smollm2-135m "
                   "when this build ships it, else an untrained hypernetwork)")
    d.add_argument("--untrained", action="store_true", help="a seeded untrained hypernetwork on the bundled documents")
    d.set_defaults(fn=run, loads_models=True)
    return d


def run(args) -> int:
    return run_demo(n_docs=args.n_docs, max_new_tokens=args.max_new_tokens, max_chunk_len=args.max_chunk_len,
                    seed=args.seed, init_scale=args.init_scale, threads=args.threads, checkpoint=args.checkpoint,
                    untrained=args.untrained)


def _print_timings(t: dict, width: int) -> None:
    import torch

    print("\nstage timings (CPU threads: %d)" % torch.get_num_threads())
    for k, v in t.items():
        print(f"  {k:<{width}s} {v:7.2f} s")


def run_demo(*, n_docs: int = 8, max_new_tokens: int = 24, max_chunk_len: int | None = None, seed: int = 0,
             init_scale: float = 2.0, threads: int = 0, checkpoint: str | None = None, untrained: bool = False) -> int:
    """SmolLM2-135M + a Doc-to-LoRA hypernetwork: internalize documents in one packed call, answer their questions
    in one batched generate (one adapter per row) and with the base model (no document); print stage timings.

    With a pretrained hypernetwork (``checkpoint``: a name or path; by default the bundled
    :data:`~d2l_fast.demo.DEMO_PRETRAINED` when this build ships it) the documents are
    :func:`~d2l_fast.demo.checkpoint_demo_docs` (NIAH and held-out facts, at least one of each when
    ``n_docs >= 2``; for a checkpoint trained on the reading data, needles, facts and numbers of its held-out test
    split), each answer is shown next to the base model's and the gold one, with a tally per kind; the model card's
    chunk length (``max_chunk_len`` None) and prompt layout are used and what the card says it reads is printed.
    Otherwise (``untrained``, or nothing shipped): a seeded untrained hypernetwork on the bundled
    :func:`~d2l_fast.demo.demo_docs`; ``seed`` / ``init_scale`` (std of the random ``scaler_B``, 0 = the reference
    init: every adapter is zero) apply to it only; it chunks at ``max_chunk_len`` (None:
    :data:`~d2l_fast.demo.UNTRAINED_MAX_CHUNK_LEN`)."""
    import torch

    from ..demo import UNTRAINED_MAX_CHUNK_LEN, demo_checkpoint, demo_docs, load_smollm2
    from ..model import D2LModel

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
    _print_timings(t, 42)
    return 0


def _run_pretrained_demo(name: str, *, n_docs: int, max_new_tokens: int, max_chunk_len: int | None) -> int:
    from ..answering import compare_answers, model_settings
    from ..demo import checkpoint_demo_docs, trained_on_reading
    from ..zoo import pretrained, read_model_card, resolve

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
    docs = checkpoint_demo_docs(card, model.tokenizer, n_docs)
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
    what = ("needles, facts and numbers of the held-out test split" if trained_on_reading(card)
            else "needle-in-a-haystack and held-out facts")
    print(f"internalized {len(docs)} documents ({what}) in ONE packed call: "
          f"{packed.total_tokens} context tokens, {len(packed.chunks)} chunks (max_chunk_len="
          f"{settings['max_chunk_len']}); the questions are asked WITHOUT the documents in the prompt")
    _print_answers(docs, answers, base_answers)
    _print_timings(t, 48)
    return 0


def _print_answers(docs: list[dict], answers: list[str], base_answers: list[str]) -> None:
    """Each document's question with D2L's, the base model's and the gold answer (✓ where right), grouped by kind,
    then the tally per kind."""
    from ..demo import TASK_LABELS, answer_is_correct

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
