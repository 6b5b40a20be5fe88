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
                    system: str | None = None, examples: Sequence[tuple[str, str, str]] | None = None) -> list[int]:
    """Prompt ids of ``question`` (``instruction.format(question=...)``), after ``document`` and a blank line when
    one is given (the ``in_context`` method), rendered as a user turn after ``system`` (None: no system turn).

    ``examples`` (few-shot): ``(document, question, answer)`` triples rendered the same way as earlier turns of the
    conversation — a user turn each (document, blank line, instruction with the question) answered by an
    assistant turn holding the answer — before the question's own turn."""
    text = instruction.format(question=question.strip())
    if document is not None:
        text = document.strip() + "\n\n" + text
    if not examples:
        return tokenize_prompt(tokenizer, text, system)
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for ex in examples:
        if not (isinstance(ex, (tuple, list)) and len(ex) == 3 and all(isinstance(x, str) and x.strip() for x in ex)):
            raise ValueError(f"each example must be a (document, question, answer) triple of non-empty strings, "
                             f"got {ex!r:.80}")
        msgs += [{"role": "user", "content": ex[0].strip() + "\n\n" + instruction.format(question=ex[1].strip())},
                 {"role": "assistant", "content": ex[2].strip()}]
    msgs.append({"role": "user", "content": text})
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


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


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _plain_cache_kw(base) -> str | None:
    """The forward keyword of the KV cache (``cache`` in transformers 5.x, else ``past_key_values``) when the
    model's cache is made of plain full-attention layers (rows can be selected and padded), else None."""
    import inspect

    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=base.config).layers
    except Exception:  # noqa: BLE001 - older transformers or an unusual config: use generate
        return None
    if not all(type(layer) is DynamicLayer for layer in layers):
        return None
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(kv: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def _kv_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def prefix_groups(prompts: Sequence[list[int]], min_shared: int = 16, min_alone: int = 128
                  ) -> tuple[int, list[int], list[int]]:
    """Shared prompt prefixes: ``(g, lens, group)`` where ``g`` is the length of the prefix all prompts share,
    ``lens[i]`` the length of the prefix prompt i shares with the other prompts of its group (prompts whose common
    prefix runs at least ``min_shared`` tokens past ``g``, e.g. several questions about one document), and
    ``group[i]`` the group's id. A prompt in no group is a group of its own: its prefix is all but its last token
    when that runs at least ``min_alone`` tokens past ``g`` (a long prompt is prefilled alone, not padded in a
    batch), else ``g``. Every prefix leaves at least the last token of its prompts."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("prefix_groups needs at least one prompt, each of at least one token id")
    n = len(prompts)
    g = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        g = min(g, _lcp(prompts[0], p))
    lens, group = [g] * n, list(range(n))
    order = sorted(range(n), key=lambda i: prompts[i])
    k = 0
    while k < n:
        j, shared = k + 1, len(prompts[order[k]]) - 1
        while j < n:
            s = min(shared, _lcp(prompts[order[j - 1]], prompts[order[j]]), len(prompts[order[j]]) - 1)
            if s - g < min_shared:
                break
            shared, j = s, j + 1
        if j - k > 1:
            for i in order[k:j]:
                lens[i], group[i] = shared, order[k]
        elif len(prompts[order[k]]) - 1 - g >= min_alone:
            lens[order[k]] = len(prompts[order[k]]) - 1
        k = j
    return g, lens, group


class _Decoder:
    """Greedy decoding with a transformers ``DynamicCache``: batches of prompts sorted by length, optional
    shared-prefix caches (computed once, copied into each row), and rows leaving the batch when they stop."""

    def __init__(self, d2l, base, *, cache_kw: str, stop, pad: int, max_new_tokens: int, adapters, adapter_index):
        self.d2l, self.base, self.cache_kw, self.stop, self.pad = d2l, base, cache_kw, set(stop), pad
        self.max_new_tokens, self.adapters, self.adapter_index = max_new_tokens, adapters, adapter_index
        self.device = next(base.parameters()).device

    def forward(self, rows: list[int], ids, mask, pos, cache) -> torch.Tensor:
        """Last-position logits of one forward; row j uses the adapter of prompt ``rows[j]``."""
        import contextlib

        kw = {self.cache_kw: cache}
        if self.d2l is None:
            ctx = contextlib.nullcontext()
        elif self.adapters is None:
            ctx = self.d2l.bind(None)
        else:
            ctx = self.d2l.bind(self.adapters, [self.adapter_index[r] for r in rows])
        with torch.no_grad(), ctx:
            out = self.base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                            **kw)
        return out.logits[:, -1, :]

    def prefix(self, ids: list[int], start_kv, start: int):
        """The KV of ``ids`` (batch 1), continuing the cached ``start_kv`` of ``ids[:start]``."""
        cache = _cache_of(start_kv or [])
        x = torch.tensor([ids[start:]], dtype=torch.long, device=self.device)
        mask = torch.ones((1, len(ids)), dtype=torch.long, device=self.device)
        pos = torch.arange(start, len(ids), device=self.device)[None]
        self.forward([], x, mask, pos, cache)
        return _kv_of(cache)

    def batch(self, rows: list[int], prompts, pre: list[int], kvs: list) -> dict[int, list[int]]:
        """Greedy answers (token ids up to and including the stop token) of ``rows``; ``kvs[j]`` is the cached KV
        of ``prompts[rows[j]][:pre[j]]`` (None when ``pre[j]`` is 0)."""
        P = max(pre)
        S = max(len(prompts[r]) - p for r, p in zip(rows, pre))
        ref = next((kv for kv in kvs if kv), None)
        layers = []
        if ref is not None:
            for li, (k0, v0) in enumerate(ref):
                ks, vs = [], []
                for kv, p in zip(kvs, pre):
                    k, v = kv[li] if kv else (k0[:, :, :0], v0[:, :, :0])
                    pad_shape = (1, k.shape[1], P - p, k.shape[3])
                    ks.append(torch.cat([k.new_zeros(pad_shape), k], 2))
                    vs.append(torch.cat([v.new_zeros(pad_shape[:3] + (v.shape[3],)), v], 2))
                layers.append((torch.cat(ks, 0), torch.cat(vs, 0)))
        ids = torch.full((len(rows), S), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), P + S), dtype=torch.long)
        for j, (r, p) in enumerate(zip(rows, pre)):
            suffix = prompts[r][p:]
            ids[j, S - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
            mask[j, P - p:P] = 1
            mask[j, P + S - len(suffix):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = _cache_of(layers)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, P:]
        active = list(range(len(rows)))
        out: dict[int, list[int]] = {r: [] for r in rows}
        logits = self.forward(rows, ids, mask, pos, cache)
        for step in range(self.max_new_tokens):
            nxt = logits.argmax(-1).tolist()
            keep = []
            for q, (j, t) in enumerate(zip(active, nxt)):
                out[rows[j]].append(t)
                if t not in self.stop:
                    keep.append(q)
            if not keep or step == self.max_new_tokens - 1:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=self.device)
                cache = _cache_of([(k.index_select(0, sel), v.index_select(0, sel)) for k, v in _kv_of(cache)])
                mask = mask.index_select(0, sel)
                nxt = [nxt[i] for i in keep]
                active = [active[i] for i in keep]
            pos = mask.sum(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], 1)
            x = torch.tensor(nxt, dtype=torch.long, device=self.device)[:, None]
            logits = self.forward([rows[j] for j in active], x, mask, pos, cache)
        return out


def _batches(order: list[int], total: list[int], batch_size: int, budget: int | None) -> list[list[int]]:
    out, cur, longest = [], [], 0
    for i in order:
        n = max(longest, total[i])
        if cur and (len(cur) >= batch_size or (budget is not None and n * (len(cur) + 1) > budget)):
            out.append(cur)
            cur, n = [], total[i]
        cur.append(i)
        longest = n
    return out + ([cur] if cur else [])


def _greedy_cached(dec: _Decoder, prompts: list[list[int]], *, batch_size: int, max_batch_tokens: int | None,
                   share_prefix: bool) -> list[list[int]]:
    n = len(prompts)
    g, pre, group = prefix_groups(prompts) if share_prefix else (0, [0] * n, list(range(n)))
    total = [len(p) + dec.max_new_tokens for p in prompts]
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(group[i], []).append(i)
    # a group's rows together; groups, and rows within a group, by length
    groups = sorted(members.values(), key=lambda rows: (max(total[i] for i in rows), rows[0]))
    order = [i for rows in groups for i in sorted(rows, key=lambda i: (total[i], i))]
    left = {k: len(v) for k, v in members.items()}
    base_kv = dec.prefix(prompts[0][:g], None, 0) if g > 0 else None
    kvs_of: dict[int, list] = {}  # group → KV of its shared prefix, while rows of it are left
    answers: list = [None] * n
    for rows in _batches(order, total, batch_size, max_batch_tokens):
        kvs = []
        for i in rows:
            if pre[i] > g and group[i] not in kvs_of:
                kvs_of[group[i]] = dec.prefix(prompts[i][:pre[i]], base_kv, g)
            kvs.append(kvs_of[group[i]] if pre[i] > g else base_kv)
            left[group[i]] -= 1
        for r, ids in dec.batch(rows, prompts, [pre[i] for i in rows], kvs).items():
            answers[r] = ids
        for k in [k for k in kvs_of if left[k] == 0]:
            del kvs_of[k]
    return answers


def greedy_answers(model, prompts: Sequence[list[int]], *, tokenizer=None, adapters=None,
                   adapter_index: Sequence[int] | None = None, max_new_tokens: int, batch_size: int,
                   max_batch_tokens: int | None = None, share_prefix: bool = False) -> list[str]:
    """Greedy answers (decoded, stripped) to templated prompt ids, stopping at :func:`stop_token_ids`.

    ``model``: a :class:`~d2l_fast.D2LModel` — prompt i uses adapter ``adapter_index[i]`` of ``adapters`` (None:
    the base model) — or a plain Hugging Face causal LM (no adapters; pass ``tokenizer``).

    Prompts are decoded in batches of at most ``batch_size`` prompts of similar length (sorted; left-padded) and,
    with ``max_batch_tokens``, at most that many (prompt + new) tokens per batch; a row leaves its batch when it
    stops. ``share_prefix`` (no adapters only): the prefix all prompts share, and the longer prefix each group of
    prompts shares (:func:`prefix_groups`: e.g. several questions after one document), are run once and their KV
    cache is copied into the rows. Models whose cache is not a plain full-attention ``DynamicCache`` (sliding
    window layers) use ``generate`` on the sorted batches instead.
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
    if share_prefix and adapters is not None:
        raise ValueError("share_prefix needs adapters=None: a prefix's KV cache depends on the row's adapter")
    if max_batch_tokens is not None and (isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int)
                                         or max_batch_tokens < 1):
        raise ValueError(f"max_batch_tokens must be a positive int or None, got {max_batch_tokens!r}")
    prompts = [list(p) for p in prompts]
    if not prompts:
        return []
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token id")
    stop = stop_token_ids(base, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    cache_kw = _plain_cache_kw(base)
    if cache_kw is not None:
        dec = _Decoder(d2l, base, cache_kw=cache_kw, stop=stop, pad=pad, max_new_tokens=max_new_tokens,
                       adapters=adapters, adapter_index=list(adapter_index) if adapter_index is not None else None)
        ids = _greedy_cached(dec, prompts, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                             share_prefix=share_prefix)
        return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    device = next(base.parameters()).device
    kw = dict(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad, temperature=None,
              top_p=None, top_k=None)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list = [None] * len(prompts)
    for rows in _batches(order, [len(p) + max_new_tokens for p in prompts], batch_size, max_batch_tokens):
        ids, mask = left_pad([prompts[i] for i in rows], pad, device)
        with torch.no_grad():
            if d2l is not None:
                idx = None if adapters is None else [adapter_index[i] for i in rows]
                seq = d2l.generate(ids, mask, adapters=adapters, adapter_index=idx, **kw)
            else:
                seq = base.generate(input_ids=ids, attention_mask=mask, **kw)
        for i, t in zip(rows, tok.batch_decode(seq[:, ids.shape[1]:], skip_special_tokens=True)):
            out[i] = t.strip()
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
           "layout_of", "left_pad", "model_settings", "prefix_groups", "question_prompt", "stop_token_ids"]
