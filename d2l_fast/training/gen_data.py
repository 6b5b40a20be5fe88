"""``d2l-fast gen-data``: self-generated training data in the reference's parquet schema (spec §5.2).

From JSONL records (documents + questions, :mod:`.generators` format) the base model — the teacher — answers
each question WITH the document in its prompt, greedily, in left-padded batches through ``generate``; the top-k
(16) log-probs of every answer token are kept. The teacher prompt is one user turn without a system message:

    <one-line instruction>
    <blank line> ### Provided information <the document>
    <blank line> ### Instructions <two instruction lines>
    <blank line> ### User input  Question: <the question>

(:data:`TEACHER_TEMPLATE`; the wording is d2l_fast's own, the layout the reference's; on SmolLM2-135M-Instruct
this wording gave the most direct answers of the variants tried). The stored student sequence
drops the document: the chat rendering of ``[user: question]`` with the generation prompt (no system message —
what the template puts before the user content — a template's default system prompt, such as SmolLM2's, included
as in the teacher prompt —, then the question, then the assistant header) followed by the
answer token ids exactly as generated, up to and including the stop token. Only answers that stop (a stop token
before ``max_new_tokens``) are kept, as in the reference. Stop tokens: the generation config's and tokenizer's
eos, and the token the chat template closes an assistant turn with.

Written per context (one parquet row, all its kept QAs): ``ctx_ids`` (the templated context, :func:`tokenize_context`),
``input_ids``, ``response_start_end`` (``[len(student prompt), len(sequence))``), ``logprobs_vals`` (float16
``[n_answer, K]``, log-softmax of the teacher's raw logits, descending) and ``logprobs_indices`` (int32). Row j of
the teacher arrays is the distribution answer token ``start + j`` was chosen from — the layout
:func:`~d2l_fast.training.data.iter_parquet` reads.

``gold=True`` writes the records' gold answer instead (``answers[0]`` as the chat template renders an assistant
turn, up to and including its closing control token): cross-entropy data (NIAH) with only ``ctx_ids``,
``input_ids`` and ``response_start_end``, read by ``iter_parquet(..., teacher=False)``.

Output: a folder of ``part-NNNNN.parquet`` files plus ``gen_data.json`` (counts and settings). Files are written
into a temporary sibling folder and moved in at the end, so an interrupted run leaves a previous output intact.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import random
import shutil
import time
import uuid
from collections.abc import Sequence

import torch

from ..answering import gold_answer_ids, left_pad, stop_token_ids  # their home; kept importable from here
from ..packing import tokenize_context, tokenize_prompt

TEACHER_TEMPLATE = (
    "You answer questions about the information given below.\n\n"
    "### Provided information\n{context}\n\n"
    "### Instructions\n"
    "Answer the question in the user input using only the provided information.\n"
    "Give a short and direct answer.\n\n"
    "### User input\nQuestion: {question}"
)
GEN_DATA_FILES = ("part-*.parquet", "gen_data.json")
logger = logging.getLogger(__name__)


class OutputExistsError(ValueError):
    """The output folder exists and holds files (pass overwrite=True / --overwrite to replace them)."""


def check_output_dir(out, patterns: Sequence[str], *, overwrite: bool) -> pathlib.Path:
    """Refuse, before any compute, an output folder that exists and holds files unless ``overwrite``; with
    ``overwrite`` it may hold only files matching ``patterns`` (what this tool writes), so it never deletes
    unrelated files. The parent folder must exist."""
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {str(out)!r} exists and is not a folder")
    if not out.absolute().parent.is_dir():
        raise ValueError(f"the parent of output folder {str(out)!r} does not exist (create it first)")
    if out.is_dir():
        present = sorted(p.name for p in out.iterdir())
        if present and not overwrite:
            raise OutputExistsError(f"output folder {str(out)!r} exists and is not empty ({len(present)} entries); "
                                    "pass --overwrite (overwrite=True) to replace it, or choose a new folder")
        ours = {p.name for pat in patterns for p in out.glob(pat)}
        other = [n for n in present if n not in ours]
        if other:
            raise OutputExistsError(f"output folder {str(out)!r} holds files this tool did not write ({other[:5]}); "
                                    "refusing to overwrite it: choose an empty or new folder")
    return out


def staging_dir(out: pathlib.Path) -> pathlib.Path:
    tmp = out.absolute().parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(tmp: pathlib.Path, out: pathlib.Path, patterns: Sequence[str]) -> None:
    """Move the files of ``tmp`` into ``out`` (replacing this tool's previous outputs there) and remove ``tmp``."""
    out.mkdir(exist_ok=True)
    for pat in patterns:
        for p in out.glob(pat):
            p.unlink()
    for p in sorted(tmp.iterdir()):
        os.replace(p, out / p.name)
    tmp.rmdir()


def teacher_prompt_text(tokenizer, context: str, question: str) -> str:
    """The teacher's chat-rendered prompt: one user turn holding :data:`TEACHER_TEMPLATE`, generation prompt."""
    msg = TEACHER_TEMPLATE.format(context=context.strip(), question=question.strip())
    return tokenizer.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                         add_generation_prompt=True)


def _base_and_generate(model):
    """(HF causal LM, generate callable) for an HF model or a D2LModel (generated without adapters)."""
    from ..model import D2LModel

    if isinstance(model, D2LModel):
        return model.base_model, lambda ids, mask, **kw: model.generate(ids, mask, adapters=None, **kw)
    if not hasattr(model, "generate") or not hasattr(model, "config"):
        raise TypeError(f"model must be a Hugging Face causal LM or a D2LModel, got {type(model).__name__}")
    return model, lambda ids, mask, **kw: model.generate(input_ids=ids, attention_mask=mask, **kw)


@torch.no_grad()
def teacher_generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 256, top_k: int = 16,
                     batch_size: int = 8, stop_ids: Sequence[int] | None = None, progress: bool = False):
    """Greedy answers to templated prompt ids with the top-k log-probs of every answer token.

    Returns one entry per prompt: ``(answer_ids, logprob_vals [n, k] float32, logprob_indices [n, k] int64)``
    with the answer up to and including the first stop token, or ``None`` when no stop token came within
    ``max_new_tokens``. Prompts are sorted by length into left-padded batches of ``batch_size``.
    """
    base, gen = _base_and_generate(model)
    vocab = int(base.get_input_embeddings().weight.shape[0])
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}] (the vocabulary size), got {top_k}")
    stop = set(stop_ids if stop_ids is not None else stop_token_ids(base, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    device = next(base.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    results: list = [None] * len(prompts)
    from tqdm.auto import tqdm

    for b0 in tqdm(range(0, len(order), batch_size), disable=not progress, desc="gen-data", unit="batch"):
        idx = order[b0 : b0 + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad, device)
        out = gen(ids, mask, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(stop),
                  pad_token_id=pad, output_logits=True, return_dict_in_generate=True, temperature=None, top_p=None,
                  top_k=None)
        new = out.sequences[:, ids.shape[1]:].cpu()
        logits = torch.stack(out.logits, dim=1).float()  # [B, steps, V] raw (unprocessed) logits
        for r, i in enumerate(idx):
            toks = new[r].tolist()
            end = next((t + 1 for t, tok in enumerate(toks) if tok in stop), None)
            if end is None:
                continue
            lp = torch.log_softmax(logits[r, :end], dim=-1)
            vals, inds = lp.topk(top_k, dim=-1)
            results[i] = (toks[:end], vals.cpu(), inds.cpu())
    return results


def _schema(teacher: bool):
    import pyarrow as pa

    fields = [("ctx_ids", pa.list_(pa.int32())), ("input_ids", pa.list_(pa.list_(pa.int32()))),
              ("response_start_end", pa.list_(pa.list_(pa.int32())))]
    if teacher:
        fields += [("logprobs_vals", pa.list_(pa.list_(pa.list_(pa.float16())))),
                   ("logprobs_indices", pa.list_(pa.list_(pa.list_(pa.int32()))))]
    return pa.schema(fields)


def generate_data(model, tokenizer, records: Sequence[dict], out_dir, *, gold: bool = False, top_k: int = 16,
                  max_new_tokens: int = 256, batch_size: int = 8, rows_per_file: int = 1000,
                  overwrite: bool = False, progress: bool = False, system: str | None = None,
                  shuffle_seed: int | None = None) -> dict:
    """Write the parquet dataset of ``records`` (validated :mod:`.generators` records) into ``out_dir``.

    Args:
        model: the base causal LM (Hugging Face) or a :class:`~d2l_fast.D2LModel` (its base model answers).
        tokenizer: the base model's chat tokenizer.
        gold: write the gold answers (cross-entropy data) instead of teacher generations.
        top_k: teacher log-probs kept per answer token (the reference keeps 16).
        system: the student sequence's system message (None: the chat template's default, the reference's layout;
            ``""``: the empty system message ``d2l-fast eval`` prompts with).
        shuffle_seed: write the rows in the order of ``random.Random(shuffle_seed)`` instead of the records' order.
            The trainer streams the files in order and shuffles only within a window of ``shuffle_buffer`` packs
            (as the reference does), so records grouped by kind (all NIAH, then all facts) train as separate phases
            unless they are shuffled here or before.

    Returns:
        the statistics also written to ``gen_data.json`` (a context whose answers all failed to stop gets no row;
        when none stops, only ``gen_data.json`` is written and a warning is logged).

    Raises:
        ValueError: bad arguments or records, or an existing non-empty ``out_dir`` without ``overwrite`` — all
            before any generation.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .generators import validate_record

    if system is not None and not isinstance(system, str):
        raise ValueError(f"system must be a string or None, got {type(system).__name__}")
    if shuffle_seed is not None and (isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int)):
        raise ValueError(f"shuffle_seed must be an int or None, got {shuffle_seed!r}")
    for v, what in ((top_k, "top_k"), (max_new_tokens, "max_new_tokens"), (batch_size, "batch_size"),
                    (rows_per_file, "rows_per_file")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    records = list(records)
    if not records:
        raise ValueError("no records to generate data from")
    for i, r in enumerate(records):
        validate_record(r, f"record #{i} ({r.get('id', '?') if isinstance(r, dict) else '?'})", need_answers=gold)
    if getattr(tokenizer, "chat_template", None) in (None, ""):
        raise ValueError("gen-data needs a chat tokenizer (the tokenizer has no chat_template)")
    out = check_output_dir(out_dir, GEN_DATA_FILES, overwrite=overwrite)
    base, _ = _base_and_generate(model)

    t0 = time.perf_counter()
    ctx_ids = [tokenize_context(tokenizer, r["context"]) for r in records]
    items = [(d, j) for d, r in enumerate(records) for j in range(len(r["qas"]))]
    student = {(d, j): tokenize_prompt(tokenizer, records[d]["qas"][j]["question"], system=system) for d, j in items}
    if gold:
        answers = {(d, j): (gold_answer_ids(tokenizer, records[d]["qas"][j]["question"],
                                            records[d]["qas"][j]["answers"][0]), None, None) for d, j in items}
    else:
        texts = [teacher_prompt_text(tokenizer, records[d]["context"], records[d]["qas"][j]["question"])
                 for d, j in items]
        prompts = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        gen = teacher_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, top_k=top_k,
                               batch_size=batch_size, progress=progress)
        answers = dict(zip(items, gen))
    rows = []
    for d, r in enumerate(records):
        row = {"ctx_ids": ctx_ids[d], "input_ids": [], "response_start_end": []}
        if not gold:
            row.update(logprobs_vals=[], logprobs_indices=[])
        for j in range(len(r["qas"])):
            a = answers[(d, j)]
            if a is None:
                continue
            ans, vals, inds = a
            s = student[(d, j)]
            row["input_ids"].append(s + list(ans))
            row["response_start_end"].append([len(s), len(s) + len(ans)])
            if not gold:
                row["logprobs_vals"].append(vals.to(torch.float16).tolist())
                row["logprobs_indices"].append(inds.to(torch.int32).tolist())
        if row["input_ids"]:
            rows.append(row)
    if not rows:
        logger.warning("no answer stopped within max_new_tokens=%d: nothing to write but gen_data.json", max_new_tokens)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    kept = sum(len(r["input_ids"]) for r in rows)
    schema = _schema(not gold)
    tmp = staging_dir(out)
    try:
        files = []
        for f0 in range(0, len(rows), rows_per_file):
            part = rows[f0 : f0 + rows_per_file]
            name = f"part-{len(files):05d}.parquet"
            pq.write_table(pa.table({c: [r[c] for r in part] for c in schema.names}, schema=schema), tmp / name)
            files.append(name)
        stats = {"records": len(records), "questions": len(items), "kept": kept,
                 "dropped_no_stop": len(items) - kept, "rows": len(rows), "files": files,
                 "mode": "gold" if gold else "teacher", "top_k": None if gold else top_k,
                 "max_new_tokens": None if gold else max_new_tokens, "shuffle_seed": shuffle_seed,
                 "base_model": getattr(base.config, "_name_or_path", ""), "seconds": round(time.perf_counter() - t0, 3)}
        (tmp / "gen_data.json").write_text(json.dumps(stats, indent=1) + "\n")
        publish(tmp, out, GEN_DATA_FILES)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return stats


__all__ = ["GEN_DATA_FILES", "OutputExistsError", "TEACHER_TEMPLATE", "check_output_dir", "generate_data",
           "gold_answer_ids", "stop_token_ids", "teacher_generate", "teacher_prompt_text"]
