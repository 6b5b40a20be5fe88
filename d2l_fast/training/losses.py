"""Training objectives of spec §5.1, computed without ever holding ``[tokens, vocab]`` logits for a whole pack.

Notation: a packed row holds ``T`` tokens of ``n_qa`` QA sequences (``qa_cu_seqlens``) belonging to ``n_ctx``
contexts (``n_queries[c]`` QAs each). ``N`` answer tokens (labels ≠ −100) are predicted from the hidden state one
position earlier (``AnswerTokens.positions``). ``V`` is the vocabulary, ``H`` the hidden size, ``K`` the teacher's
top-k (16 in the released data).

Per answer token ``i`` with student logits ``z = h_i Wᵀ (+ b)`` (optionally soft-capped, Gemma-2):

* context distillation: ``ℓ_i = −Σ_k p_k · (z[idx_k] − logsumexp z)`` with ``p_k = exp(teacher_logprob_k)``, not
  renormalised (a teacher log-prob of −inf contributes 0);
* cross-entropy (NIAH): ``ℓ_i = logsumexp z − z[target_i]``.

Both averaging schemes of the reference are linear in the token losses, so they are expressed as one weight per
token (:func:`per_context_weights`, :func:`per_token_weights`) and the task loss is ``Σ_i w_i ℓ_i``:

* per context: token → mean per QA → mean per context → summed and divided by the number of contexts in the
  whole gradient-accumulation window, i.e. ``w_i = 1 / (len(QA) · n_queries(ctx) · n_ctx_window)``;
* per label token: ``w_i = 1 / n_labels_window``.

Memory. The lm_head and the loss run over chunks of ``chunk_size`` rows. Because the token weights are known before
the forward, each chunk's gradient ``dL/dz = w_i · (Σp · softmax(z) − p scattered at idx)`` is formed right after
its loss, multiplied into ``dL/dh`` (and ``dL/dW`` when the lm_head is trainable) and the chunk's logits are freed.
The backward only scales those saved gradients by the incoming scalar, so nothing is recomputed (3 matmuls per
chunk, not 4) and the peak extra memory is one ``[chunk_size, V]`` fp32 block (two with soft-capping) plus ``[N, H]``
for the saved input gradient — never ``[N, V]``. Gradients are formed only when grad mode is on and an input
requires grad. The matmuls run in the input dtype (bf16 on CUDA), softmax/logsumexp in fp32 (fp64 for fp64 inputs).

On CUDA with ``liger-kernel`` installed, the cross-entropy with uniform token weights (per-label-token averaging)
goes through Liger's fused linear cross-entropy; the per-context weights and the distillation loss always use the
chunked torch path here (Liger's kernel takes one reduction for all tokens, not a weight per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Default chunk: as many rows as keep one fp32 [rows, V] block at 2^25 elements (128 MiB), at least 16 rows.
DEFAULT_CHUNK_ELEMENTS = 1 << 25
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossOutput:
    """``loss``: scalar fp32 ``Σ_i w_i ℓ_i`` (differentiable); ``token_loss``: ``[N]`` fp32 per-token losses ℓ_i
    (detached, for logging; None when Liger computed only the sum); ``n_tokens``: N."""

    loss: torch.Tensor
    token_loss: torch.Tensor | None
    n_tokens: int


@dataclass(frozen=True)
class AnswerTokens:
    """Where the answer tokens of a packed row are predicted.

    ``positions [N]`` (long): index of the hidden state that predicts each answer token (its own index − 1);
    ``targets [N]`` (long): the answer token ids; ``qa_lengths``: answer tokens per QA sequence (``n_qa`` ints,
    summing to N). Example: labels ``[-100, -100, 7, 8, -100, 9]`` with ``qa_cu_seqlens [0, 4, 6]`` →
    positions ``[1, 2, 4]``, targets ``[7, 8, 9]``, qa_lengths ``[2, 1]``.
    """

    positions: torch.Tensor
    targets: torch.Tensor
    qa_lengths: list[int]


def _as_int_list(x, name: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or x.is_floating_point():
            raise ValueError(f"{name} must be a 1-D integer tensor or a list of ints, got {x.dtype} {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]
    try:
        out = [int(v) for v in x]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of ints, got {x!r}") from None
    if any(v != w for v, w in zip(out, x)):
        raise ValueError(f"{name} must hold integers, got {list(x)}")
    return out


def answer_tokens(labels: torch.Tensor, qa_cu_seqlens) -> AnswerTokens:
    """Answer-token positions, targets and per-QA counts of one packed row.

    Args:
        labels: ``[T]`` integer tensor, the token id at answer tokens and −100 elsewhere (unshifted, as stored).
        qa_cu_seqlens: ``n_qa + 1`` cumulative QA sequence lengths (list or 1-D int tensor), 0 … T.

    An answer token at the first position of its QA sequence has no previous position to be predicted from and is
    rejected, as are labels that are neither −100 nor ≥ 0.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D integer tensor [T], got {got}")
    cu = _as_int_list(qa_cu_seqlens, "qa_cu_seqlens")
    T = labels.shape[0]
    if len(cu) < 1 or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"qa_cu_seqlens must rise from 0 to the {T} labels, got {cu}")
    is_label = labels != IGNORE_INDEX
    if bool((labels[is_label] < 0).any()):
        bad = sorted(set(labels[labels < 0].tolist()) - {IGNORE_INDEX})
        raise ValueError(f"labels must be token ids ≥ 0 or {IGNORE_INDEX}, got {bad}")
    starts = torch.tensor(cu[:-1], dtype=torch.long, device=labels.device)
    starts = starts[starts < T]
    if starts.numel() and bool(is_label[starts].any()):
        bad = starts[is_label[starts]].tolist()
        raise ValueError(f"answer token at the first position of a QA sequence (positions {bad}): it has no previous "
                         "token to be predicted from")
    pos = torch.nonzero(is_label).flatten()
    lens = torch.tensor([b - a for a, b in zip(cu[:-1], cu[1:])], dtype=torch.long, device=labels.device)
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=labels.device), lens)
    counts = torch.bincount(seg[pos], minlength=len(cu) - 1) if pos.numel() else torch.zeros(len(cu) - 1).long()
    return AnswerTokens(pos - 1, labels[pos].long(), [int(c) for c in counts.tolist()])


def per_context_weights(qa_lengths, n_queries, n_ctx_window: int, *, device=None,
                        dtype=torch.float32) -> torch.Tensor:
    """Token weights of the per-context average (``use_per_ctx_average_loss=True``), ``[N]`` (fp32 by default).

    Args:
        qa_lengths: answer tokens per QA sequence, in packed order (``n_qa`` ints, N in total).
        n_queries: QAs per context (``n_ctx`` ints summing to ``n_qa``); context c owns the next n_queries[c] QAs.
        n_ctx_window: contexts in the whole gradient-accumulation window (≥ n_ctx; across devices under DDP).

    Token i of QA j in context c gets ``1 / (qa_lengths[j] · m_c · n_ctx_window)``, where ``m_c`` is the number of
    QAs of c with at least one answer token. Deviation from the reference, which returns NaN there: a QA without
    answer tokens is left out of its context's mean, and a context without any contributes 0 (it still counts in
    ``n_ctx_window``, as the reference counts it).
    """
    qa = _as_int_list(qa_lengths, "qa_lengths")
    nq = _as_int_list(n_queries, "n_queries")
    if any(v < 0 for v in qa):
        raise ValueError(f"qa_lengths must be ≥ 0, got {qa}")
    if any(v < 0 for v in nq) or sum(nq) != len(qa):
        raise ValueError(f"n_queries must be ≥ 0 and sum to the {len(qa)} QA sequences, got {nq} (sum {sum(nq)})")
    if not isinstance(n_ctx_window, int) or isinstance(n_ctx_window, bool) or n_ctx_window < max(1, len(nq)):
        raise ValueError(f"n_ctx_window must be an int ≥ the {len(nq)} contexts of this row (and ≥ 1), "
                         f"got {n_ctx_window!r}")
    w, j = [], 0
    for m in nq:
        lens = qa[j : j + m]
        j += m
        live = sum(1 for v in lens if v > 0)
        for v in lens:
            if v:
                w.extend([1.0 / (v * live * n_ctx_window)] * v)
    return torch.tensor(w, dtype=dtype, device=device)


def per_token_weights(n_tokens: int, n_labels_window: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Token weights of the per-label-token average: ``[n_tokens]`` (fp32 by default) filled with
    ``1 / n_labels_window`` (the answer tokens of the whole gradient-accumulation window, ≥ n_tokens)."""
    if not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int ≥ 0, got {n_tokens!r}")
    if not isinstance(n_labels_window, int) or isinstance(n_labels_window, bool) or n_labels_window < max(1, n_tokens):
        raise ValueError(f"n_labels_window must be an int ≥ the {n_tokens} answer tokens of this row (and ≥ 1), "
                         f"got {n_labels_window!r}")
    return torch.full((n_tokens,), 1.0 / n_labels_window, dtype=dtype, device=device)


def _auto_chunk(n: int, v: int) -> int:
    return max(16, min(max(n, 1), DEFAULT_CHUNK_ELEMENTS // max(v, 1)))


class ChunkedLinearLossFunction(torch.autograd.Function):
    """``(Σ_i w_i ℓ_i, ℓ)`` for lm_head logits computed chunk by chunk; see the module docstring.

    Backward does not recompute: the forward forms each chunk's gradients (only when asked) and saves
    ``dL/dh [N, H]`` (input dtype), ``dL/dW [V, H]`` and ``dL/db [V]`` (fp32, only when they require grad).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_weight, targets, t_logprobs, t_indices, chunk_size, softcap,
                want_grad):
        N = hidden.shape[0]
        V = weight.shape[0]
        cdt = torch.promote_types(hidden.dtype, torch.float32)
        need_h, need_w, need_b = (want_grad and hidden.requires_grad, want_grad and weight.requires_grad,
                                  want_grad and bias is not None and bias.requires_grad)
        any_grad = need_h or need_w or need_b
        token_loss = torch.empty(N, dtype=cdt, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(V, weight.shape[1], dtype=cdt, device=weight.device) if need_w else None
        grad_b = torch.zeros(V, dtype=cdt, device=weight.device) if need_b else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for s in range(0, N, chunk_size):
                e = min(N, s + chunk_size)
                h = hidden[s:e]
                z = h @ weight.t()
                if bias is not None:
                    z = z + bias
                z = z.to(cdt)  # [c, V]
                t = None
                if softcap is not None:
                    t = torch.tanh(z / softcap)
                    z = t * softcap
                lse = torch.logsumexp(z, dim=-1)  # [c]
                if targets is not None:
                    tgt = targets[s:e, None]
                    token_loss[s:e] = lse - z.gather(1, tgt).squeeze(1)
                else:
                    idx = t_indices[s:e]
                    p = t_logprobs[s:e].to(cdt).exp()  # [c, K]; exp(-inf) = 0
                    token_loss[s:e] = (p * (lse[:, None] - z.gather(1, idx))).sum(-1)
                if not any_grad:
                    continue
                # dℓ/dz = Σp · softmax(z) − p at idx (p = one-hot target for CE), times the token weight
                g = z.sub_(lse[:, None]).exp_()
                if targets is not None:
                    g.scatter_add_(1, tgt, torch.full(tgt.shape, -1.0, dtype=cdt, device=g.device))
                else:
                    g.mul_(p.sum(-1, keepdim=True)).scatter_add_(1, idx, -p)
                g.mul_(token_weight[s:e, None].to(cdt))
                if t is not None:
                    g.mul_(1.0 - t * t)
                    del t
                if need_h:
                    grad_h[s:e] = g.to(weight.dtype) @ weight
                if need_w:
                    grad_w.addmm_(g.t(), h.to(cdt))
                if need_b:
                    grad_b.add_(g.sum(0))
                del g, z
        loss = (token_loss * token_weight.to(cdt)).sum().float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        out_tl = token_loss.float()
        ctx.mark_non_differentiable(out_tl)
        return loss, out_tl

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        wdt, bdt = ctx.dtypes
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss.to(grad_w.dtype)).to(wdt) if grad_w is not None else None
        gb = (grad_b * grad_loss.to(grad_b.dtype)).to(bdt) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None, None, None, None


def _check_head(hidden, weight, bias, token_weight, chunk_size, softcap) -> int:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be [N, H] (hidden states at the answer positions), got {got}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"lm_head weight must be [V, {hidden.shape[1]}] to match hidden, got {got}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and lm_head weight must share a floating dtype, got {hidden.dtype} / {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but lm_head weight on {weight.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"lm_head bias must be [{weight.shape[0]}], got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    N = hidden.shape[0]
    if not isinstance(token_weight, torch.Tensor) or token_weight.dim() != 1 or token_weight.shape[0] != N \
            or not token_weight.is_floating_point():
        got = f"{token_weight.dtype} {tuple(token_weight.shape)}" if isinstance(token_weight, torch.Tensor) else \
            type(token_weight).__name__
        raise ValueError(f"token_weight must be a floating [N={N}] tensor (per_context_weights / per_token_weights), "
                         f"got {got}")
    if token_weight.device != hidden.device:
        raise ValueError(f"token_weight is on {token_weight.device} but hidden on {hidden.device}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if chunk_size is None:
        return _auto_chunk(N, weight.shape[0])
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _want_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def distillation_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher_logprobs: torch.Tensor,
                      teacher_indices: torch.Tensor, token_weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                      softcap: float | None = None, chunk_size: int | None = None) -> LossOutput:
    """Context-distillation loss against the teacher's top-k log-probs (``use_kl_loss=True``), chunked.

    Args:
        hidden: ``[N, H]`` student hidden states (after the final norm) at the positions that predict the N answer
            tokens (``packed_hidden[answer_tokens(...).positions]``).
        weight: lm_head weight ``[V, H]``, same dtype and device as ``hidden``; ``bias``: optional ``[V]``.
        teacher_logprobs: ``[N, K]`` floating (fp16 as stored is fine): the teacher's top-k log-probs; −inf allowed.
        teacher_indices: ``[N, K]`` integer token ids in ``[0, V)``.
        token_weight: ``[N]`` floating, from :func:`per_context_weights` or :func:`per_token_weights`.
        softcap: final logit soft-capping ``c`` (``z = c·tanh(z/c)``, Gemma-2's ``final_logit_softcapping``).
        chunk_size: rows per chunk (default: ``2^25 // V``, at least 16).

    Returns:
        :class:`LossOutput` with ``loss = Σ_i w_i · (−Σ_k p_ik (z_i[idx_ik] − logsumexp z_i))``.
    """
    chunk = _check_head(hidden, weight, bias, token_weight, chunk_size, softcap)
    N, V = hidden.shape[0], weight.shape[0]
    for name, t in (("teacher_logprobs", teacher_logprobs), ("teacher_indices", teacher_indices)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != N or t.shape[1] < 1:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be [N={N}, K≥1], got {got}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden on {hidden.device}")
    if teacher_logprobs.shape != teacher_indices.shape:
        raise ValueError(f"teacher_logprobs {tuple(teacher_logprobs.shape)} and teacher_indices "
                         f"{tuple(teacher_indices.shape)} must have the same shape [N, K]")
    if not teacher_logprobs.is_floating_point() or teacher_indices.is_floating_point():
        raise ValueError(f"teacher_logprobs must be floating and teacher_indices integer, got "
                         f"{teacher_logprobs.dtype} / {teacher_indices.dtype}")
    if N and (int(teacher_indices.min()) < 0 or int(teacher_indices.max()) >= V):
        raise ValueError(f"teacher_indices must be token ids in [0, {V}), got range "
                         f"[{int(teacher_indices.min())}, {int(teacher_indices.max())}]")
    loss, tl = ChunkedLinearLossFunction.apply(hidden, weight, bias, token_weight.detach(), None, teacher_logprobs,
                                               teacher_indices.long(), chunk, softcap,
                                               _want_grad(hidden, weight, bias))
    return LossOutput(loss, tl, N)


def _liger_fused_ce():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return liger_fused_linear_cross_entropy


def cross_entropy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weight: torch.Tensor,
                       *, bias: torch.Tensor | None = None, softcap: float | None = None,
                       chunk_size: int | None = None, use_liger: bool | None = None) -> LossOutput:
    """Next-token cross-entropy on the answer tokens (``use_kl_loss=False``, NIAH), chunked; fp32 softmax.

    Args:
        hidden: ``[N, H]`` hidden states at the positions that predict the answer tokens; weight ``[V, H]``.
        targets: ``[N]`` integer answer token ids in ``[0, V)`` (``answer_tokens(...).targets``).
        token_weight: ``[N]`` floating token weights (:func:`per_context_weights` / :func:`per_token_weights`).
        use_liger: None = Liger's fused linear CE when on CUDA, installed, and all token weights are equal
            (``token_loss`` is then None); True requires it (errors otherwise); False never uses it.

    Returns:
        :class:`LossOutput` with ``loss = Σ_i w_i · (logsumexp z_i − z_i[target_i])``.
    """
    chunk = _check_head(hidden, weight, bias, token_weight, chunk_size, softcap)
    N, V = hidden.shape[0], weight.shape[0]
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != N \
            or targets.is_floating_point():
        got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an integer [N={N}] tensor, got {got}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden on {hidden.device}")
    if N and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(f"targets must be token ids in [0, {V}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    if use_liger is not False:
        fused = _liger_fused_ce() if hidden.is_cuda else None
        uniform = N > 0 and bool((token_weight == token_weight[0]).all())
        if use_liger and (fused is None or not uniform):
            raise ValueError("use_liger=True needs a CUDA input, liger-kernel installed and equal token weights; got "
                             f"device {hidden.device}, liger {'found' if fused else 'missing'}, "
                             f"{'equal' if uniform else 'unequal'} weights")
        if fused is not None and uniform:
            out = fused(hidden, weight, targets.long(), bias, reduction="sum", softcap=softcap)
            out = out.loss if hasattr(out, "loss") else out[0] if isinstance(out, tuple) else out
            return LossOutput(out.float() * token_weight[0].float(), None, N)
    loss, tl = ChunkedLinearLossFunction.apply(hidden, weight, bias, token_weight.detach(), targets.long(), None, None,
                                               chunk, softcap, _want_grad(hidden, weight, bias))
    return LossOutput(loss, tl, N)


def lora_l1_norm(adapters, n_ctx_window: int, *, rank_rows: int | None = None) -> torch.Tensor:
    """L1 regulariser on the combined LoRAs (spec §5.1), before the coefficient ``gen_lora_l1_reg_coef``.

    In the reference's padded layout ``A [G, L, R_max, d_in]``, ``B [G, L, R_max, d_out]`` (bias rows and zero
    padding included) it is ``mean_m( mean(Σ_G |A_m|) + mean(Σ_G |B_m|) ) / n_ctx_window``.

    Args:
        adapters: an :class:`~d2l_fast.AdapterBatch` (ragged; differentiable through its tensors) or the
            reference's dict ``{module: {"A": [G, L, R_max, d_in], "B": [G, L, R_max, d_out]}}``.
        n_ctx_window: contexts in the gradient-accumulation window (≥ 1).
        rank_rows: for an AdapterBatch, the ``R_max`` of the reference's padded layout; default the largest
            adapter rank, which is the reference's ``(max n_chunks + 1)·r`` whenever the bias LoRA is used.

    Returns:
        A scalar fp32 tensor.
    """
    from ..adapters import AdapterBatch

    if not isinstance(n_ctx_window, int) or isinstance(n_ctx_window, bool) or n_ctx_window < 1:
        raise ValueError(f"n_ctx_window must be an int ≥ 1, got {n_ctx_window!r}")
    terms = []
    if isinstance(adapters, AdapterBatch):
        rmax = max(adapters.ranks, default=0)
        if rank_rows is not None:
            if not isinstance(rank_rows, int) or rank_rows < rmax:
                raise ValueError(f"rank_rows must be an int ≥ the largest adapter rank {rmax}, got {rank_rows!r}")
            rmax = rank_rows
        if rmax == 0:
            raise ValueError("the AdapterBatch holds no rank rows; the L1 mean is undefined")
        for m in adapters.modules:
            a, b = adapters.A[m], adapters.B[m]
            terms.append(a.float().abs().sum() / (a.shape[0] * rmax * a.shape[2])
                         + b.float().abs().sum() / (b.shape[0] * rmax * b.shape[2]))
    elif isinstance(adapters, dict) and adapters:
        if rank_rows is not None:
            raise ValueError("rank_rows applies to an AdapterBatch only; the padded dict carries its own R_max")
        for m, lora in adapters.items():
            if not isinstance(lora, dict) or set(lora) < {"A", "B"}:
                raise ValueError(f"module {m!r}: expected {{'A': [G, L, R, d_in], 'B': [G, L, R, d_out]}}, "
                                 f"got {type(lora).__name__} {sorted(lora) if isinstance(lora, dict) else ''}")
            a, b = lora["A"], lora["B"]
            if a.dim() != 4 or b.dim() != 4 or a.shape[:3] != b.shape[:3]:
                raise ValueError(f"module {m!r}: expected A [G, L, R, d_in] and B [G, L, R, d_out], got "
                                 f"{tuple(a.shape)} / {tuple(b.shape)}")
            terms.append(a.float().abs().sum(0).mean() + b.float().abs().sum(0).mean())
    else:
        raise ValueError(f"adapters must be an AdapterBatch or a non-empty {{module: {{'A', 'B'}}}} dict, "
                         f"got {type(adapters).__name__}")
    return torch.stack(terms).mean() / n_ctx_window


def qa_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, qa_cu_seqlens, n_queries, *,
            objective: str = "distill", teacher_logprobs: torch.Tensor | None = None,
            teacher_indices: torch.Tensor | None = None, average: str = "context", n_ctx_window: int | None = None,
            n_labels_window: int | None = None, bias: torch.Tensor | None = None, softcap: float | None = None,
            chunk_size: int | None = None, use_liger: bool | None = None) -> LossOutput:
    """The task loss of one packed row, as the reference's ``compute_loss`` forms it (without the L1 term).

    Args:
        hidden: ``[T, H]`` (or ``[1, T, H]``) final hidden states of the packed row; weight: lm_head ``[V, H]``.
        labels: ``[T]`` (or ``[1, T]``) answer token ids, −100 elsewhere; ``qa_cu_seqlens``: ``n_qa + 1`` QA bounds.
        n_queries: QAs per context (``n_ctx`` ints); used by ``average="context"``.
        objective: ``"distill"`` (needs ``teacher_logprobs``/``teacher_indices`` ``[N, K]``, N = answer tokens, in
            packed order) or ``"ce"``.
        average: ``"context"`` (needs ``n_ctx_window``; default = the row's contexts) or ``"token"`` (needs
            ``n_labels_window``; default = the row's answer tokens).
    """
    if objective not in ("distill", "ce"):
        raise ValueError(f"objective must be 'distill' or 'ce', got {objective!r}")
    if average not in ("context", "token"):
        raise ValueError(f"average must be 'context' or 'token', got {average!r}")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[0] == 1:
        hidden = hidden[0]
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[0] == 1:
        labels = labels[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H] or [1, T, H], got "
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    at = answer_tokens(labels, qa_cu_seqlens)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} positions but labels {labels.shape[0]}")
    N = len(at.targets)
    wkw = dict(device=hidden.device, dtype=torch.promote_types(hidden.dtype, torch.float32))
    if average == "context":
        nq = _as_int_list(n_queries, "n_queries")
        w = per_context_weights(at.qa_lengths, nq, len(nq) if n_ctx_window is None else n_ctx_window, **wkw)
    else:
        if N == 0 and n_labels_window is None:
            w = torch.zeros(0, **wkw)
        else:
            w = per_token_weights(N, N if n_labels_window is None else n_labels_window, **wkw)
    h = hidden.index_select(0, at.positions.to(hidden.device))
    if objective == "ce":
        return cross_entropy_loss(h, weight, at.targets.to(hidden.device), w, bias=bias, softcap=softcap,
                                  chunk_size=chunk_size, use_liger=use_liger)
    if teacher_logprobs is None or teacher_indices is None:
        raise ValueError("objective='distill' needs teacher_logprobs and teacher_indices [N, K]")
    return distillation_loss(h, weight, teacher_logprobs, teacher_indices, w, bias=bias, softcap=softcap,
                             chunk_size=chunk_size)


__all__ = ["AnswerTokens", "ChunkedLinearLossFunction", "LossOutput", "answer_tokens", "cross_entropy_loss",
           "distillation_loss", "lora_l1_norm", "per_context_weights", "per_token_weights", "qa_loss"]
