"""The student's packed row for training without a ``[T, T]`` attention mask, optionally sharing question prefixes.

The trainer's default (``student_packing="dense"``) runs a pack's QA sequences as one row and lets transformers
build the block-causal mask from the restarting position ids: every layer then computes all ``T × T`` attention
scores (T ≈ 1,000 in the reading run) although a QA of ~50 tokens only looks at itself. Two faster layouts give the
same loss and gradients (up to floating-point summation order):

* ``"segments"``: the same row, attention computed per QA sequence — the sequences are gathered into one padded
  batch ``[n_seq, heads, longest, d]`` (one causal SDPA call per layer; padding only at the end of a sequence);
* ``"shared_prefix"``: besides, the QAs of one context are laid out as their common prefix (the chat template,
  the instruction, "Question:" — about half of each QA in the reading data) once, then each QA's rest, whose
  tokens attend to the prefix and to themselves (position ids continue after the prefix). The prefix's hidden
  states equal those of each separate sequence's first tokens, so every answer token sees exactly what it sees in
  its own sequence, and the prefix is computed once per context instead of once per question.

:func:`student_row` builds the row (ids, positions, labels, the QA bounds the loss takes, the LoRA segments: one
per context) and its :class:`AttentionPlan`; :func:`segment_attention` switches the base model to the planned
attention for the duration of one forward (Gemma-2's logit soft-capping and sliding windows included).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, ContextExample

NAME = "d2l_train_segments"
PACKINGS = ("dense", "segments", "shared_prefix")
_state = threading.local()
_registered: list[bool] = []


@dataclass(frozen=True)
class AttentionPlan:
    """Attention of a packed row as one padded batch of M items; item m's queries are the row's tokens
    ``q_index[m, :n_m]``, its keys ``k_index[m]`` (a shared prefix, padded to ``P``, then the queries' own tokens),
    ``mask [M, 1, Lq, P + Lq]`` what each query may see (None: plain causal, no prefixes), ``q_valid [M, Lq]`` the
    real queries (flattened in item order they are the row's tokens 0 … T − 1), ``q_pos`` / ``k_pos`` the position
    ids (sliding windows)."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    q_valid: torch.Tensor
    mask: torch.Tensor | None
    q_pos: torch.Tensor
    k_pos: torch.Tensor

    @property
    def valid_rows(self) -> torch.Tensor:
        """Flat indices (into ``M · Lq``) of the real queries, in row order."""
        return torch.nonzero(self.q_valid.flatten()).flatten()

    def to(self, device) -> "AttentionPlan":
        f = lambda t: None if t is None else t.to(device)  # noqa: E731
        return AttentionPlan(f(self.q_index), f(self.k_index), f(self.q_valid), f(self.mask), f(self.q_pos),
                             f(self.k_pos))


@dataclass(frozen=True)
class StudentRow:
    """One packed student row. ``qa_cu_seqlens``: the loss's QA bounds (a context's first QA owns the shared
    prefix, which holds no labels); ``seg_lens`` / ``seg_adapter``: one LoRA segment per context."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    qa_cu_seqlens: list[int]
    n_queries: list[int]
    seg_lens: list[int]
    seg_adapter: list[int]
    plan: AttentionPlan


def common_prefix(qas) -> int:
    """Tokens every QA of a context can share: their common leading ids, ending before the token that predicts the
    first answer token of any of them (so every predicting position stays in its own QA's part); 0 for one QA."""
    if len(qas) < 2:
        return 0
    n = min(q.start for q in qas) - 1
    first = qas[0].input_ids
    for q in qas[1:]:
        ids = q.input_ids
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    return max(0, n)


def student_row(pack: Sequence[ContextExample], *, share_prefix: bool) -> StudentRow:
    """The packed student row of ``pack`` (the trainer's examples) and its attention plan; see the module doc."""
    pack = list(pack)
    if not pack or not all(isinstance(ex, ContextExample) for ex in pack):
        raise ValueError(f"pack must be a non-empty list of ContextExample, got {[type(e).__name__ for e in pack]}")
    ids, pos, labels, cu, seg_lens, items = [], [], [], [0], [], []
    for ex in pack:
        p = common_prefix(ex.qas) if share_prefix else 0
        begin = len(ids)
        if p:
            ids.extend(ex.qas[0].input_ids[:p])
            pos.extend(range(p))
            labels.extend([IGNORE_INDEX] * p)
            items.append((begin, begin, begin, begin + p))  # the prefix: causal on itself
        for q in ex.qas:
            a = len(ids)
            ids.extend(q.input_ids[p:])
            pos.extend(range(p, len(q.input_ids)))
            lab = [IGNORE_INDEX] * len(q.input_ids)
            lab[q.start : q.end] = q.input_ids[q.start : q.end]
            labels.extend(lab[p:])
            cu.append(len(ids))
            items.append((begin, begin + p, a, len(ids)))
        seg_lens.append(len(ids) - begin)
    items = [it for it in items if it[3] > it[2]]
    pos_t = torch.tensor(pos, dtype=torch.long)
    return StudentRow(
        input_ids=torch.tensor(ids, dtype=torch.long), position_ids=pos_t,
        labels=torch.tensor(labels, dtype=torch.long), qa_cu_seqlens=cu, n_queries=[len(ex.qas) for ex in pack],
        seg_lens=seg_lens, seg_adapter=list(range(len(pack))), plan=attention_plan(items, pos_t),
    )  # fmt: skip


def attention_plan(items: list[tuple[int, int, int, int]], position_ids: torch.Tensor) -> AttentionPlan:
    """The plan of ``items`` ``(prefix_start, prefix_end, query_start, query_end)``: the query tokens attend to the
    prefix tokens and causally to themselves. The query ranges must tile the row ``0 … T`` in order."""
    if not items:
        raise ValueError("attention_plan needs at least one item")
    if [it[2] for it in items[1:]] != [it[3] for it in items[:-1]] or items[0][2] != 0:
        raise ValueError(f"the items' query ranges must tile the row in order, got {items}")
    M = len(items)
    Lq = max(b - a for _, _, a, b in items)
    P = max(pb - pa for pa, pb, _, _ in items)
    q_index = torch.zeros(M, Lq, dtype=torch.long)
    k_index = torch.zeros(M, P + Lq, dtype=torch.long)
    q_valid = torch.zeros(M, Lq, dtype=torch.bool)
    prefix_valid = torch.zeros(M, P, dtype=torch.bool)
    for m, (pa, pb, a, b) in enumerate(items):
        q_index[m, : b - a] = torch.arange(a, b)
        q_valid[m, : b - a] = True
        k_index[m, : pb - pa] = torch.arange(pa, pb)
        k_index[m, P : P + b - a] = torch.arange(a, b)
        prefix_valid[m, : pb - pa] = True
    mask = None
    if P:
        causal = torch.ones(Lq, Lq, dtype=torch.bool).tril()
        mask = torch.cat([prefix_valid[:, None, :].expand(M, Lq, P), causal.expand(M, Lq, Lq)], -1)[:, None]
    return AttentionPlan(q_index, k_index, q_valid, mask, position_ids[q_index], position_ids[k_index])


# ---------------------------------------------------------------------------------------------- the attention
def _plan() -> AttentionPlan:
    p = getattr(_state, "plan", None)
    if p is None:
        raise RuntimeError(f"{NAME} attention used outside d2l_fast.training.student.segment_attention")
    return p


def planned_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      softcap=None, **kwargs):
    """HF attention-interface function: query ``[1, H, T, d]``, key/value ``[1, KVH, T, d]`` → ``([1, T, H, d],
    None)``, attending as the active :class:`AttentionPlan` says."""
    plan = _plan()
    if query.shape[0] != 1:
        raise RuntimeError(f"{NAME} expects one packed row, got batch {query.shape[0]}")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    M, Lq = plan.q_index.shape
    # index_select (backward: index_add) rather than advanced indexing (backward: a serial accumulating index_put)
    q = query[0].index_select(1, plan.q_index.flatten()).unflatten(1, (M, Lq)).transpose(0, 1)  # [M, H, Lq, d]
    k = key[0].index_select(1, plan.k_index.flatten()).unflatten(1, (M, -1)).transpose(0, 1)  # [M, KVH, Lk, d]
    v = value[0].index_select(1, plan.k_index.flatten()).unflatten(1, (M, -1)).transpose(0, 1)
    keep = plan.mask
    if sliding_window is not None:
        near = (plan.q_pos[:, :, None] - plan.k_pos[:, None, :]) < sliding_window
        keep = (keep if keep is not None else _causal(q.shape[2], k.shape[2], q.device)) & near[:, None]
    if q.is_cuda and softcap is None:  # fused kernels; on CPU their backward is slower than the plain products
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=keep is None, scale=scaling,
                                           enable_gqa=True)
    else:
        o = grouped_attention(q, k, v, keep, scaling, softcap)
    o = o.transpose(1, 2).reshape(M * Lq, *o.shape[1:2], o.shape[-1])
    return o.index_select(0, plan.valid_rows).unsqueeze(0), None  # [1, T, H, d] in row order


def grouped_attention(q, k, v, keep, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Attention as plain products, the query heads of one KV head stacked (no K/V copies): q ``[M, H, Lq, d]``,
    k/v ``[M, KVH, Lk, d]``, ``keep`` ``[M, 1, Lq, Lk]`` bool (None: causal with Lq = Lk) → ``[M, H, Lq, d]``.
    Soft-capping as Gemma-2 (``tanh(s / cap) · cap``), softmax in fp32 as transformers' eager attention."""
    M, H, Lq, d = q.shape
    kvh, Lk = k.shape[1], k.shape[2]
    rep = H // kvh
    s = (q.reshape(M, kvh, rep * Lq, d) @ k.transpose(-1, -2)) * scaling  # [M, KVH, rep·Lq, Lk]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if keep is None:
        keep = _causal(Lq, Lk, q.device)
    s = s.view(M, kvh, rep, Lq, Lk).masked_fill(~keep.view(-1, 1, 1, Lq, Lk), float("-inf"))
    p = torch.softmax(s.view(M, kvh, rep * Lq, Lk).float(), -1).to(v.dtype)
    return (p @ v).view(M, H, Lq, d)


def _causal(lq: int, lk: int, device) -> torch.Tensor:
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)


def _no_mask(*args, **kwargs):
    return None


def register() -> bool:
    """Register the attention (and a mask function that builds no mask) with transformers; False if unsupported."""
    if not _registered:
        try:
            from transformers import AttentionInterface
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            AttentionInterface.register(NAME, planned_attention)
            ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _no_mask)
            _registered.append(True)
        except Exception:  # noqa: BLE001 - older transformers
            _registered.append(False)
    return _registered[0]


@contextlib.contextmanager
def segment_attention(model, plan: AttentionPlan):
    """Within the block, ``model`` (an HF model) attends as ``plan`` says (one forward; the configs' attention
    implementation is switched and restored)."""
    if not isinstance(plan, AttentionPlan):
        raise TypeError(f"plan must be an AttentionPlan, got {type(plan).__name__}")
    if not register():
        raise RuntimeError("this transformers version has no AttentionInterface; use student_packing='dense'")
    from ..varlen import attention_implementation

    _state.plan = plan
    try:
        with attention_implementation(model, NAME):
            yield
    finally:
        _state.plan = None


__all__ = ["NAME", "PACKINGS", "AttentionPlan", "StudentRow", "attention_plan", "common_prefix", "grouped_attention",
           "planned_attention", "register", "segment_attention", "student_row"]
