"""Plain, unchunked torch versions of the spec §5.1 objectives: the executable spec :mod:`.losses` is tested against.

They hold the full ``[N, V]`` (or ``[T, V]``) logits and are meant for small shapes and tests only. Computation is in
fp32, or fp64 for fp64 inputs. Shapes follow :mod:`.losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _logits(hidden, weight, bias=None, softcap=None) -> torch.Tensor:
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(cdt) @ weight.to(cdt).t()
    if bias is not None:
        z = z + bias.to(cdt)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def distillation_token_loss_ref(hidden, weight, teacher_logprobs, teacher_indices, *, bias=None,
                                softcap=None) -> torch.Tensor:
    """``[N]``: ``−Σ_k exp(teacher_logprob_k) · (z[idx_k] − logsumexp z)`` with full logits ``z = h Wᵀ``."""
    z = _logits(hidden, weight, bias, softcap)
    logq = z.gather(1, teacher_indices.long()) - torch.logsumexp(z, dim=-1, keepdim=True)
    return -(teacher_logprobs.to(z.dtype).exp() * logq).sum(-1)


def cross_entropy_token_loss_ref(hidden, weight, targets, *, bias=None, softcap=None) -> torch.Tensor:
    """``[N]``: ``F.cross_entropy`` of the full logits, no reduction."""
    return F.cross_entropy(_logits(hidden, weight, bias, softcap), targets.long(), reduction="none")


def per_context_average_ref(token_loss, qa_lengths, n_queries, n_ctx_window: int) -> torch.Tensor:
    """Mean per QA → mean per context → sum over contexts / ``n_ctx_window``.

    QAs without answer tokens are skipped; a context without answer tokens contributes 0 (see
    :func:`~d2l_fast.training.losses.per_context_weights`).
    """
    per_qa = list(torch.split(token_loss, list(qa_lengths)))
    total = token_loss.new_zeros(())
    j = 0
    for m in n_queries:
        live = [q.mean() for q in per_qa[j : j + m] if q.numel()]
        j += m
        if live:
            total = total + torch.stack(live).mean()
    return total / n_ctx_window


def per_token_average_ref(token_loss, n_labels_window: int) -> torch.Tensor:
    return token_loss.sum() / n_labels_window


def lora_l1_ref(padded: dict, n_ctx_window: int) -> torch.Tensor:
    """``mean_m(mean(Σ_G |A_m|) + mean(Σ_G |B_m|)) / n_ctx_window`` over ``{m: {A: [G, L, R, d_in], B: …}}``."""
    terms = [lora["A"].float().abs().sum(0).mean() + lora["B"].float().abs().sum(0).mean() for lora in padded.values()]
    return sum(terms) / len(terms) / n_ctx_window


def packed_qa_loss_ref(hidden, weight, labels, qa_cu_seqlens, n_queries, *, objective="distill",
                       teacher_logprobs=None, teacher_indices=None, average="context", n_ctx_window=None,
                       n_labels_window=None, bias=None, softcap=None) -> torch.Tensor:
    """The task loss of one packed row from its full ``[T, V]`` logits, shifting labels the reference's way."""
    z = _logits(hidden, weight, bias, softcap)  # [T, V]
    label_pos = torch.nonzero(labels != IGNORE_INDEX).flatten()
    if objective == "ce":
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[1:]
        per_pos = F.cross_entropy(z, shifted.long(), reduction="none", ignore_index=IGNORE_INDEX)
        token_loss = per_pos[label_pos - 1]
    else:
        zl = z[label_pos - 1]
        logq = zl.gather(1, teacher_indices.long()) - torch.logsumexp(zl, dim=-1, keepdim=True)
        token_loss = -(teacher_logprobs.to(z.dtype).exp() * logq).sum(-1)
    cu = [int(c) for c in qa_cu_seqlens]
    qa_lengths = [int(((label_pos >= a) & (label_pos < b)).sum()) for a, b in zip(cu[:-1], cu[1:])]
    if average == "context":
        nq = [int(v) for v in n_queries]
        return per_context_average_ref(token_loss, qa_lengths, nq, len(nq) if n_ctx_window is None else n_ctx_window)
    return per_token_average_ref(token_loss, len(label_pos) if n_labels_window is None else n_labels_window)


__all__ = ["cross_entropy_token_loss_ref", "distillation_token_loss_ref", "lora_l1_ref", "packed_qa_loss_ref",
           "per_context_average_ref", "per_token_average_ref"]
