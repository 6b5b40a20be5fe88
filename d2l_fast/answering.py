"""Prompt layout and batched greedy answers: the one place that turns (document, question) into an answer.

:func:`compare_answers` (the Python API), ``d2l-fast eval`` (:mod:`d2l_fast.training.evaluate`), the teacher of
``d2l-fast gen-data`` and the server's prefill all build their batches here:

* :data:`METHODS` — ``"base"`` (no document), ``"in_context"`` (document in the prompt), ``"d2l"`` (document
  internalized into an adapter, the prompt holds only the question);
* :func:`question_prompt` — the chat rendering of ``[system, user: instruction.format(question=...)]``, with the
  document, a blank line, then that text for ``in_context``; :data:`EVAL_INSTRUCTION` is ``d2l-fast eval``'s;
* :func:`stop_token_ids` — eos ids and the control token that closes an assistant turn; :func:`gold_answer_ids`;
* :func:`left_pad` — ragged prompt ids → left-padded ``(ids, attention_mask)``;
* :func:`greedy_answers` — batched greedy generation of a D2LModel (with or without adapters) or of a plain
  Hugging Face causal LM, decoded and stripped;
* :func:`layout_of` — the prompt layout a call uses: what it gives, else the model's own (its checkpoint's model
  card, :attr:`~d2l_fast.D2LModel.prompt_layout`); :func:`layout_messages` applies one to chat messages (the
  server's chat turns); :func:`model_settings` — a model's chunk length, prompt layout and what it reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .model_card import DEFAULT_PROMPT, check_instruction
from .packing import control_token_ids, tokenize_prompt

METHODS = ("base", "in_context", "d2l")
EVAL_INSTRUCTION = "Answer the question with the answer only, no other words.\n\nQuestion: {question}"


def gold_answer_ids(tokenizer, question: str, answer: str) -> list[int]:
    """Token ids of ``answer`` as the chat template renders an assistant turn after ``[user: question]``, up to
    and including the first control token (the end of the turn); ``answer + eos`` if the template does not
    render the prompt as a prefix of the conversation."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}], tokenize=False)
    ctrl = control_token_ids(tokenizer)
    if full.startswith(prompt):
        ids = list(tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"])
        for k, t in enumerate(ids):
            if t in ctrl:
                return ids[: k + 1]
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token and its chat template closes no assistant turn")
    return ids + [int(tokenizer.eos_token_id)]


def stop_token_ids(model, tokenizer) -> list[int]:
    """Generation stops at: the generation config's eos id(s), the tokenizer's eos, and the control token the
    chat template closes an assistant turn with."""
    ids = set()
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    with_answer = gold_answer_ids(tokenizer, "q", "a")
    if with_answer and with_answer[-1] in control_token_ids(tokenizer):
        ids.add(with_answer[-1])
    return sorted(int(i) for i in ids)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token-id rows → ``(ids, attention_mask)`` ``[len(rows), longest]`` on ``device``, each row
    right-aligned after ``pad_id`` padding (mask 0 there)."""
    if not rows:
        raise ValueError("left_pad needs at least one row of token ids, got none")
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, n - len(r):] = 1
    return ids.to(device), mask.to(device)


def question_prompt(tokenizer, question: str, *, document: str | None = None, instruction: str = "{question}",
                    system: str | None = None) -> list[int]:
    """Prompt ids of ``question`` (``instruction.format(question=...)``), after ``document`` and a blank line when
    one is given (the ``in_context`` method), rendered as a user turn after ``system`` (None: no system turn)."""
    text = instruction.format(question=question.strip())
    if document is not None:
        text = document.strip() + "\n\n" + text
    return tokenize_prompt(tokenizer, text, system)


def layout_of(model, system: str | None = None, instruction: str | None = None) -> dict:
    """``{"system", "instruction"}`` of a call: ``system`` / ``instruction`` when either is given (the other: no
    system turn / the bare question), else ``model.prompt_layout`` (the layout its checkpoint was trained with),
    else the bare question with no system turn."""
    if system is not None and not isinstance(system, str):
        raise ValueError(f"system must be a string or None, got {system!r}")
    if system is None and instruction is None:
        own = getattr(model, "prompt_layout", None)
        return dict(own) if own else dict(DEFAULT_PROMPT)
    return {"system": system, "instruction": check_instruction("{question}" if instruction is None else instruction)}


def layout_messages(messages: list[dict], layout: dict | None) -> list[dict]:
    """Chat ``messages`` (``{"role", "content"}``) in a prompt layout: every user turn's content becomes
    ``instruction.format(question=content)``, and ``layout["system"]`` (when not None) opens the conversation if it
    has no system message. ``layout`` None: the messages unchanged (a copy)."""
    if layout is None:
        return [dict(m) for m in messages]
    ins = check_instruction(layout.get("instruction", "{question}"))
    out = [dict(m, content=ins.format(question=m["content"].strip())) if m.get("role") == "user" else dict(m)
           for m in messages]
    if layout.get("system") is not None and not any(m.get("role") == "system" for m in out):
        out.insert(0, {"role": "system", "content": layout["system"]})
    return out


def model_settings(model) -> dict:
    """What a :class:`~d2l_fast.D2LModel` uses by default and was trained to read: ``max_chunk_len`` (templated
    tokens per chunk, ``<= 0``: no chunking), ``prompt_layout`` (None: bare questions) and ``reads`` (the model
    card's description, None when it has none)."""
    reads = (getattr(model, "model_card", None) or {}).get("reads")
    return {"max_chunk_len": int(model.max_chunk_len), "prompt_layout": getattr(model, "prompt_layout", None),
            "reads": reads}


def greedy_answers(model, prompts: Sequence[list[int]], *, tokenizer=None, adapters=None,
                   adapter_index: Sequence[int] | None = None, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers (decoded, stripped) to templated prompt ids, ``batch_size`` left-padded prompts at a time,
    stopping at :func:`stop_token_ids`.

    ``model``: a :class:`~d2l_fast.D2LModel` — prompt i uses adapter ``adapter_index[i]`` of ``adapters`` (None:
    the base model) — or a plain Hugging Face causal LM (no adapters; pass ``tokenizer``).
    """
    from .model import D2LModel

    d2l = model if isinstance(model, D2LModel) else None
    base = model.base_model if d2l is not None else model
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("greedy_answers needs a tokenizer: pass tokenizer= or a D2LModel that has one")
    if adapters is not None and (d2l is None or adapter_index is None or len(adapter_index) != len(prompts)):
        raise ValueError(f"adapters need a D2LModel and one adapter_index per prompt ({len(prompts)}), got "
                         f"{type(model).__name__} and {None if adapter_index is None else len(adapter_index)}")
    stop = stop_token_ids(base, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    device = next(base.parameters()).device
    kw = dict(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad, temperature=None,
              top_p=None, top_k=None)
    out = []
    for b0 in range(0, len(prompts), batch_size):
        ids, mask = left_pad(list(prompts[b0:b0 + batch_size]), pad, device)
        with torch.no_grad():
            if d2l is not None:
                idx = None if adapters is None else list(adapter_index[b0:b0 + batch_size])
                seq = d2l.generate(ids, mask, adapters=adapters, adapter_index=idx, **kw)
            else:
                seq = base.generate(input_ids=ids, attention_mask=mask, **kw)
        out += [t.strip() for t in tok.batch_decode(seq[:, ids.shape[1]:], skip_special_tokens=True)]
    return out


def compare_answers(model, documents: list[str], questions: list[str], *, methods=("d2l",), max_new_tokens: int = 64,
                    system: str | None = None, instruction: str | None = None, max_chunk_len: int | None = None,
                    batch_size: int = 8, adapters=None) -> dict[str, list[str]]:
    """Answer ``questions[i]`` about ``documents[i]`` greedily with each of ``methods`` (see :data:`METHODS`).

    The prompt is :func:`question_prompt` in the layout of :func:`layout_of` (``system`` / ``instruction``; neither
    given: the model's own, i.e. its checkpoint's model card), as ``d2l-fast eval`` builds it; generation stops at
    the chat template's end of turn. ``max_chunk_len`` None: the model's. ``adapters``: the documents'
    :class:`~d2l_fast.AdapterBatch` (adapter i for document i) if already internalized. Returns
    ``{method: answers}``.
    """
    from .adapters import AdapterBatch
    from .model import D2LModel

    if not isinstance(model, D2LModel):
        raise TypeError(f"model must be a D2LModel, got {type(model).__name__}")
    if model.tokenizer is None:
        raise model.tokenizer_required("answering text questions")
    if isinstance(documents, str) or isinstance(questions, str):
        raise TypeError("documents and questions must be lists of strings; wrap a single one in a list")
    documents, questions = list(documents), list(questions)
    if not documents or len(documents) != len(questions):
        raise ValueError(f"expected as many questions as documents (at least one), got {len(documents)} documents "
                         f"and {len(questions)} questions")
    for what, items in (("document", documents), ("question", questions)):
        for i, t in enumerate(items):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"{what} #{i} must be a non-empty string, got {t!r:.60}")
    methods = list(methods)
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods must be a non-empty list drawn from {METHODS}, got {methods}")
    for v, what in ((max_new_tokens, "max_new_tokens"), (batch_size, "batch_size")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    layout = layout_of(model, system, instruction)
    if adapters is not None:
        if not isinstance(adapters, AdapterBatch) or len(adapters) != len(documents):
            raise ValueError(f"adapters must be an AdapterBatch with one adapter per document ({len(documents)}), "
                             f"got {type(adapters).__name__}"
                             + (f" of {len(adapters)}" if isinstance(adapters, AdapterBatch) else ""))
    elif "d2l" in methods:
        adapters = model.internalize(documents, max_chunk_len=max_chunk_len, docs_per_call=batch_size,
                                     progress=False)
    out = {}
    for m in methods:
        prompts = [question_prompt(model.tokenizer, q, document=d if m == "in_context" else None,
                                   **layout) for d, q in zip(documents, questions)]
        d2l = m == "d2l"
        out[m] = greedy_answers(model, prompts, adapters=adapters if d2l else None,
                                adapter_index=list(range(len(prompts))) if d2l else None,
                                max_new_tokens=max_new_tokens, batch_size=batch_size)
    return out


__all__ = ["EVAL_INSTRUCTION", "METHODS", "compare_answers", "gold_answer_ids", "greedy_answers", "layout_messages",
           "layout_of", "left_pad", "model_settings", "question_prompt", "stop_token_ids"]
