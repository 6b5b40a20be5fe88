"""``d2l-fast eval`` (spec §6): methods side by side on the same samples, with the reference's metrics.

Methods (all greedy, the same questions, the same prompt template, the same stop tokens):

* ``base`` — the base model without the document;
* ``in_context`` — the base model with the document in the prompt (document, a blank line, then the prompt:
  the upper bound), format-controlled: the same short-answer instruction as the other methods;
* ``in_context_fewshot`` — ``in_context`` after worked examples: earlier user/assistant turns of the conversation,
  each a document, a blank line and the prompt, answered with the gold answer (``fewshot``; default: the three
  train-split examples of :func:`~.reading_run.fewshot_examples` — a fact, a question the document does not
  answer, a number);
* ``d2l`` — the document internalized into an adapter by the hypernetwork; the prompt holds no document.

The prompt is the reference's evaluation layout: a chat of ``[system: "", user: prompt]`` with the generation
prompt, where prompt = :data:`EVAL_INSTRUCTION` (an "answer only" line, a blank line, ``Question: ...``).
``system=None`` drops the system message (the layout ``gen-data``'s student sequences use). The answer is the
generated text after the prompt, special tokens skipped, stripped.

Metrics per sample (:mod:`.metrics`): ``qa`` records get QA F1 (with precision and recall), exact match and
ROUGE-L (best over the gold answers); ``niah`` records get ``niah_em`` — 1 when the first run of digits in the
answer is exactly the 4-digit number — and ROUGE-L. Length bins: a NIAH record's own ``meta.bin`` (the
generator's token-length bin), otherwise the first of :data:`~.metrics.LENGTH_BINS` holding the templated context
length. Summary scores are plain means over samples.

Decoding (:func:`~d2l_fast.answering.greedy_answers`): at most ``batch_size`` prompts of similar length per batch
and at most ``max_batch_tokens`` (prompt + new) tokens; a row leaves its batch when it stops; without an adapter the
prompts' shared prefixes (the instruction, the few-shot examples, one document's several questions) are run once
and their KV cache is copied into the rows. The answers are those of ``generate`` on each prompt alone.

Cost per method: wall-clock seconds of ``internalize`` (d2l only) and of ``generate``, and peak memory of each:
on CUDA ``torch.cuda.max_memory_allocated`` above the allocation at the start; on CPU the peak resident set size
(``/proc/self/statm``, sampled every 2 ms by a thread) above the RSS at the start — it counts everything the
process allocates meanwhile, torch's buffers included.

Output folder: ``samples.jsonl`` (one line per sample and method), ``summary.json``, ``summary.csv`` (one row
per method × task × bin, bin ``all`` first) and ``scores_vs_length.png`` (score vs context length per method,
one panel per task; needs ``matplotlib``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..answering import EVAL_INSTRUCTION, METHODS, greedy_answers, question_prompt
from ..packing import tokenize_context
from .gen_data import check_output_dir, publish, staging_dir
from .generators import validate_record
from .metrics import exact_match, length_bins, qa_f1, rouge_l

EVAL_FILES = ("samples.jsonl", "summary.json", "summary.csv", "scores_vs_length.png")
#: the methods of ``d2l-fast eval``: :data:`~d2l_fast.answering.METHODS` and the few-shot in-prompt baseline.
EVAL_METHODS = (*METHODS, "in_context_fewshot")
#: per task: the score the plot and the CSV lead with, then the other metrics summarised.
TASK_METRICS = {"qa": ("qa_f1", "qa_precision", "qa_recall", "exact_match", "rougeL"), "niah": ("niah_em", "rougeL")}


@dataclass(frozen=True)
class Sample:
    """One question on one document."""

    sample_id: str
    record_id: str
    task: str
    context: str
    question: str
    answers: list[str]
    n_ctx_tokens: int
    bin: tuple[int, float]

    @property
    def bin_label(self) -> str:
        lo, hi = self.bin
        return f"{lo}-{'inf' if math.isinf(hi) else int(hi)}"


def build_samples(records: Sequence[dict], tokenizer, *, max_samples: int | None = None, seed: int = 42
                  ) -> list[Sample]:
    """Flatten records into samples (one per question); ``max_samples`` keeps a random subset (seeded, in the
    original order), as the reference's ``--max_test_samples_per_ds``."""
    out = []
    for i, r in enumerate(records):
        validate_record(r, f"record #{i}", need_answers=True)
        n_ctx = len(tokenize_context(tokenizer, r["context"]))
        meta_bin = (r.get("meta") or {}).get("bin")
        if meta_bin is not None:
            if not (isinstance(meta_bin, list) and len(meta_bin) == 2 and all(isinstance(x, int) for x in meta_bin)):
                raise ValueError(f"record #{i}: meta.bin must be [lo, hi] ints, got {meta_bin!r}")
            b = (meta_bin[0], meta_bin[1])
        else:
            b = length_bins(n_ctx)[0]
        rid = str(r.get("id", i))
        for j, qa in enumerate(r["qas"]):
            out.append(Sample(f"{rid}/{j}", rid, r.get("task", "qa"), r["context"], qa["question"],
                              list(qa["answers"]), n_ctx, b))
    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
        if max_samples < len(out):
            keep = sorted(random.Random(seed).sample(range(len(out)), max_samples))
            out = [out[k] for k in keep]
    return out


def score(sample: Sample, prediction: str) -> dict[str, float]:
    """The per-sample metrics of the sample's task (module docstring)."""
    rl = max(rouge_l(prediction, a) for a in sample.answers)
    if sample.task == "niah":
        digits = re.findall(r"\d+", prediction)
        return {"niah_em": float(bool(digits) and digits[0] in sample.answers), "rougeL": rl}
    f, p, r = qa_f1(prediction, sample.answers)
    return {"qa_f1": f, "qa_precision": p, "qa_recall": r, "exact_match": exact_match(prediction, sample.answers),
            "rougeL": rl}


class PeakMemory:
    """Peak memory above the level at entry, in MiB (``.peak_mb``); ``.kind`` says what was measured."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device, self.interval_s = device, interval_s
        self.peak_mb: float | None = None
        if device.type == "cuda":
            self.kind = "cuda max_memory_allocated"
        elif os.path.exists("/proc/self/statm"):
            self.kind = "cpu peak RSS (sampled /proc/self/statm)"
        else:  # pragma: no cover - non-Linux
            self.kind = "unavailable"

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind != "unavailable":
            self._start = self._peak = self._rss()
            self._stop = threading.Event()

            def poll():
                while not self._stop.wait(self.interval_s):
                    self._peak = max(self._peak, self._rss())

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        elif self.kind != "unavailable":
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())
            self.peak_mb = (self._peak - self._start) / 2**20
        return False


class _Runner:
    """Greedy batched generation for the three methods on a D2LModel (or, without d2l, a plain HF model)."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int, batch_size: int, max_batch_tokens: int | None,
                 system: str | None, instruction: str, max_chunk_len: int | None, fewshot):
        from ..model import D2LModel

        self.d2l = model if isinstance(model, D2LModel) else None
        self.base = model.base_model if self.d2l is not None else model
        self.tok = tokenizer
        self.max_new_tokens, self.batch_size, self.max_batch_tokens = max_new_tokens, batch_size, max_batch_tokens
        self.system, self.instruction, self.max_chunk_len = system, instruction, max_chunk_len
        self.fewshot = fewshot
        self.device = next(self.base.parameters()).device

    def prompt(self, s: Sample, method: str) -> list[int]:
        with_doc = method in ("in_context", "in_context_fewshot")
        return question_prompt(self.tok, s.question, document=s.context if with_doc else None,
                               instruction=self.instruction, system=self.system,
                               examples=self.fewshot if method == "in_context_fewshot" else None)

    def generate(self, prompts: list[list[int]], adapters=None, adapter_index=None) -> list[str]:
        return greedy_answers(self.d2l if self.d2l is not None else self.base, prompts, tokenizer=self.tok,
                              adapters=adapters, adapter_index=adapter_index, max_new_tokens=self.max_new_tokens,
                              batch_size=self.batch_size, max_batch_tokens=self.max_batch_tokens,
                              share_prefix=adapters is None)

    def run(self, method: str, samples: list[Sample]) -> tuple[list[str], dict]:
        cost = {}
        adapters = index = None
        if method == "d2l":
            docs = list(dict.fromkeys(s.context for s in samples))
            pos = {d: i for i, d in enumerate(docs)}
            t0 = time.perf_counter()
            with PeakMemory(self.device) as mem:
                adapters = self.d2l.internalize(docs, max_chunk_len=self.max_chunk_len, docs_per_call=self.batch_size,
                                                progress=False)
            cost["internalize_s"] = time.perf_counter() - t0
            cost["internalize_peak_mb"] = mem.peak_mb
            index = [pos[s.context] for s in samples]
        prompts = [self.prompt(s, method) for s in samples]
        t0 = time.perf_counter()
        with PeakMemory(self.device) as mem:
            preds = self.generate(prompts, adapters, index)
        cost["generate_s"] = time.perf_counter() - t0
        cost["generate_peak_mb"] = mem.peak_mb
        cost["memory_kind"] = mem.kind
        return preds, cost


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(rows: Sequence[dict]) -> dict:
    """``{method: {task: {"all" | bin_label: {"n", metric means}}}}`` from per-sample rows (samples.jsonl)."""
    out: dict = {}
    for r in rows:
        for key in ("all", r["bin"]):
            out.setdefault(r["method"], {}).setdefault(r["task"], {}).setdefault(key, []).append(r)
    summary = {}
    for m, tasks in out.items():
        summary[m] = {}
        for task, groups in tasks.items():
            summary[m][task] = {k: {"n": len(g), **{name: _mean([x[name] for x in g]) for name in TASK_METRICS[task]}}
                                for k, g in sorted(groups.items(), key=lambda kv: _bin_key(kv[0]))}
    return summary


def _bin_key(label: str):
    if label == "all":
        return (-1.0, 0.0)
    lo, hi = label.split("-")
    return (float(lo), float(hi))


def _write_csv(path, summary: dict, costs: dict) -> None:
    metric_cols = sorted({m for ms in TASK_METRICS.values() for m in ms})
    cost_cols = ["internalize_s", "generate_s", "internalize_peak_mb", "generate_peak_mb"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "task", "bin", "n", *metric_cols, *cost_cols])
        for m, tasks in summary.items():
            for task, bins in tasks.items():
                for b, vals in bins.items():
                    cost = [costs[m].get(c) if b == "all" else None for c in cost_cols]
                    w.writerow([m, task, b, vals["n"], *[_fmt(vals.get(c)) for c in metric_cols],
                                *[_fmt(c) for c in cost]])


def _fmt(v):
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else v


def plot_scores(path, summary: dict) -> None:
    """Score vs context-length bin, one line per method, one panel per task."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tasks = sorted({t for tasks in summary.values() for t in tasks})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = TASK_METRICS[task][0]
        labels = sorted({b for tasks_ in summary.values() for b in tasks_.get(task, {}) if b != "all"}, key=_bin_key)
        for m, tasks_ in summary.items():
            bins = tasks_.get(task)
            if not bins:
                continue
            xs = [i for i, b in enumerate(labels) if b in bins]
            ax.plot(xs, [bins[labels[i]][metric] for i in xs], marker="o", label=m)
        ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(metric)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(model, records: Sequence[dict], out_dir, *, tokenizer=None, methods: Sequence[str] = METHODS,
             max_new_tokens: int = 32, batch_size: int = 32, max_batch_tokens: int | None = 8192,
             max_samples: int | None = None, seed: int = 42, system: str | None = "",
             instruction: str = EVAL_INSTRUCTION, max_chunk_len: int | None = None,
             fewshot: Sequence[tuple[str, str, str]] | None = None, overwrite: bool = False, plot: bool = True
             ) -> dict:
    """Run ``methods`` on the samples of ``records`` and write the outputs (module docstring) into ``out_dir``.

    Args:
        model: a :class:`~d2l_fast.D2LModel` (any method), or a Hugging Face causal LM (every method but ``d2l``;
            pass ``tokenizer``).
        methods: names from :data:`EVAL_METHODS`.
        records: validated :mod:`.generators` records with gold answers.
        tokenizer: default ``model.tokenizer``.
        instruction: the prompt template, with a ``{question}`` placeholder.
        max_chunk_len: chunk length for internalize (default: the model's).
        batch_size, max_batch_tokens: at most this many prompts, and (prompt + new) tokens, per decoding batch.
        fewshot: ``(document, question, answer)`` examples of ``in_context_fewshot`` (default:
            :func:`~.reading_run.fewshot_examples`).

    Returns:
        the summary written to ``summary.json``.

    Raises:
        ValueError: bad arguments or records, an unknown method, ``d2l`` without a D2LModel, or an existing
            non-empty ``out_dir`` without ``overwrite`` — all before any model call.
    """
    from ..model import D2LModel

    methods = list(methods)
    bad = [m for m in methods if m not in EVAL_METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct names from {EVAL_METHODS}, got {methods}")
    if "d2l" in methods and not isinstance(model, D2LModel):
        raise ValueError("the d2l method needs a D2LModel (a checkpoint); got a plain base model")
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("evaluate needs a tokenizer: pass tokenizer= or a D2LModel that has one")
    for v, what in ((max_new_tokens, "max_new_tokens"), (batch_size, "batch_size")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    if max_batch_tokens is not None and (isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int)
                                         or max_batch_tokens < 1):
        raise ValueError(f"max_batch_tokens must be a positive int or None, got {max_batch_tokens!r}")
    if not isinstance(instruction, str) or "{question}" not in instruction:
        raise ValueError(f"instruction must be a string with a {{question}} placeholder, got {instruction!r}")
    fewshot = _check_fewshot(fewshot) if "in_context_fewshot" in methods else None
    records = list(records)
    if not records:
        raise ValueError("no records to evaluate")
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise ImportError("the score plot needs matplotlib: pip install 'd2l_fast[train]' (or plot=False)") from e
    samples = build_samples(records, tok, max_samples=max_samples, seed=seed)
    out = check_output_dir(out_dir, EVAL_FILES, overwrite=overwrite)
    runner = _Runner(model, tok, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     max_batch_tokens=max_batch_tokens, system=system, instruction=instruction,
                     max_chunk_len=max_chunk_len, fewshot=fewshot)
    rows, costs = [], {}
    for m in methods:
        preds, costs[m] = runner.run(m, samples)
        for s, p in zip(samples, preds):
            rows.append({"sample_id": s.sample_id, "record_id": s.record_id, "method": m, "task": s.task,
                         "question": s.question, "answers": s.answers, "prediction": p,
                         "n_ctx_tokens": s.n_ctx_tokens, "bin": s.bin_label, **score(s, p)})
    summary = {
        "methods": methods,
        "n_samples": len(samples),
        "scores": summarize(rows),
        "cost": costs,
        "settings": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "max_batch_tokens": max_batch_tokens,
                     "max_samples": max_samples, "seed": seed, "system": system, "instruction": instruction,
                     "max_chunk_len": max_chunk_len, "fewshot": [list(e) for e in fewshot] if fewshot else None,
                     "device": str(runner.device), "threads": torch.get_num_threads()},
    }
    tmp = staging_dir(out)
    try:
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        _write_csv(tmp / "summary.csv", summary["scores"], costs)
        if plot:
            plot_scores(tmp / "scores_vs_length.png", summary["scores"])
        publish(tmp, out, EVAL_FILES)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _check_fewshot(fewshot):
    if fewshot is None:
        from .reading_run import fewshot_examples

        return fewshot_examples()
    out = [tuple(e) if isinstance(e, (tuple, list)) else e for e in fewshot]
    if not out or not all(isinstance(e, tuple) and len(e) == 3 and all(isinstance(x, str) and x.strip() for x in e)
                          for e in out):
        raise ValueError(f"fewshot must be a non-empty list of (document, question, answer) string triples, got "
                         f"{fewshot!r:.120}")
    return out


def format_summary(summary: dict) -> str:
    """A plain-text table of the summary: per task and bin, the lead score of each method; then the costs."""
    methods = summary["methods"]
    lines = []
    tasks = sorted({t for m in methods for t in summary["scores"].get(m, {})})
    for task in tasks:
        metric = TASK_METRICS[task][0]
        bins = sorted({b for m in methods for b in summary["scores"][m].get(task, {})}, key=_bin_key)
        lines.append(f"{task} ({metric})  " + "  ".join(f"{m:>10s}" for m in methods) + "       n")
        for b in bins:
            cells = []
            for m in methods:
                v = summary["scores"][m].get(task, {}).get(b)
                cells.append(f"{v[metric]:10.3f}" if v else " " * 10)
            n = next(summary["scores"][m][task][b]["n"] for m in methods if b in summary["scores"][m].get(task, {}))
            lines.append(f"  {b:<{len(task) + len(metric) + 1}s}  " + "  ".join(cells) + f"  {n:6d}")
    lines.append("cost: " + "; ".join(
        f"{m}: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["cost"][m].items() if isinstance(v, float))
        for m in methods))
    return "\n".join(lines)


__all__ = ["EVAL_FILES", "EVAL_INSTRUCTION", "EVAL_METHODS", "METHODS", "PeakMemory", "Sample", "build_samples",
           "evaluate", "format_summary", "plot_scores", "score", "summarize"]
