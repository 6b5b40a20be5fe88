"""Copy head (a d2l_fast extension, off unless ``spec.copy_modules`` names modules): each generated B vector of a
copy module gets ``gate · Σ_t softmax(q·k_t) · v_t`` added, an attention-weighted sum over its chunk's tokens of
their output embeddings.

Why: the plain head makes every B vector a linear map of one ``latent_size``-wide latent, so the B vectors of a
layer live in a fixed subspace of the residual stream; the adapter can then write "one of the values seen in
training" but not an arbitrary token of the document. With tied (or any) output embeddings as values a B vector
can write "the next token is this one of the context's tokens" directly (docs/training-reading.md, session 6).

* queries: the l2-normalised pre-head latent of each (layer, module, rank) slot, per layer ``LayerMix(D → dk)``;
* keys: the modality-projected context features ([T, D], what the perceiver reads), RMS-normalised, ``D → dk``;
* values: the base model's output-embedding rows of the context token ids, scaled to unit RMS (frozen, passed in
  at call time, never stored in the checkpoint);
* gate: per (module, layer, rank), initialised to zero, so adding a copy head to a trained hypernetwork leaves its
  adapters unchanged until training moves the gate.

Attention never crosses chunks: chunk ``c`` attends to ``ctx[cu[c]:cu[c+1]]`` only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .head import LayerMix

#: width of the copy head's query/key space
COPY_KEY_DIM = 64


class CopyHead(nn.Module):
    def __init__(self, spec):
        super().__init__()
        L, D, r = spec.num_layers, spec.latent_size, spec.lora_r
        self.module_index = {m: spec.target_modules.index(m) for m in spec.copy_modules}
        self.eps = spec.rms_norm_eps
        self.q = LayerMix(L, D, COPY_KEY_DIM)
        self.k_norm = nn.Parameter(torch.ones(D))
        self.k = nn.Parameter(torch.empty(D, COPY_KEY_DIM))
        nn.init.uniform_(self.k, -math.sqrt(3 / D), math.sqrt(3 / D))
        self.gate = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, L, r, 1)) for m in spec.copy_modules})

    def forward(self, e, ctx, cu_seqlens, token_ids, value_table, lens: list[int] | None = None) -> dict:
        """e [C, L, M, r, D] (l2-normalised head input); ctx [T, D] projected features; cu_seqlens int [C+1];
        token_ids long [T]; value_table [V, d]; ``lens``: the chunk lengths if already on the host. Returns
        {module: [C, L, r, d]} in ``e``'s dtype."""
        return copy_reference(e, ctx, cu_seqlens, token_ids, value_table, lens=lens, q_weight=self.q.weight,
                              q_bias=self.q.bias,
                              k_norm=self.k_norm, k_weight=self.k, gates=dict(self.gate.items()),
                              module_index=self.module_index, eps=self.eps)


#: padded (chunk, token) slots one attention group may hold: bounds the [chunks, tokens, d] value gather and the
#: [chunks, slots, tokens] weights when one long chunk sits among many short ones (16,384 × 576 fp32 = 38 MiB)
COPY_SLOT_BUDGET = 16384


def copy_reference(e, ctx, cu_seqlens, token_ids, value_table, *, q_weight, q_bias, k_norm, k_weight, gates: dict,
                   module_index: dict, eps: float, slot_budget: int = COPY_SLOT_BUDGET,
                   lens: list[int] | None = None) -> dict:
    """Plain-torch copy attention (see the module docstring for the maths). Chunks are sorted by length and
    padded in groups of at most ``slot_budget`` (chunk, token) slots (a chunk longer than that is its own group).
    ``lens``: the chunk lengths as a host list when the caller has them (else read once from ``cu_seqlens``)."""
    C, L, M, R, D = e.shape
    dt = e.dtype
    cu = cu_seqlens.to(device=ctx.device, dtype=torch.long)
    if lens is None:
        lens = (cu[1:] - cu[:-1]).tolist()
    lens_dev = torch.tensor(lens, device=ctx.device)
    # queries [C, L, M, R, dk] (LayerMix maths, per layer); keys [T, dk]; values [T, d] at unit RMS
    q = torch.bmm(e.transpose(0, 1).reshape(L, C * M * R, D), q_weight.to(dt)).view(L, C, M, R, -1).transpose(0, 1)
    q = (q + q_bias.to(dt)) * (q.shape[-1] ** -0.5)
    c32 = ctx.float()
    k = (c32 * torch.rsqrt(c32.pow(2).mean(-1, keepdim=True) + eps) * k_norm.float()).to(dt) @ k_weight.to(dt)
    out = e.new_empty(C, L, M, R, value_table.shape[1])
    ids = token_ids.to(value_table.device)
    for group in _groups(lens, slot_budget):
        g = torch.tensor(group, device=ctx.device)
        t_max = max(lens[c] for c in group)
        pos = torch.arange(t_max, device=ctx.device)
        valid = pos[None, :] < lens_dev[g, None]  # [G, t_max]
        idx = torch.where(valid, cu[g, None] + pos[None, :], 0)
        logits = torch.einsum("glmrk,gtk->glmrt", q[g], k[idx]).float()
        w = torch.softmax(logits.masked_fill(~valid[:, None, None, None, :], float("-inf")), dim=-1).to(dt)
        v = value_table[ids[idx]].float()  # [G, t_max, d]
        v = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(dt)
        out[g] = torch.einsum("glmrt,gtd->glmrd", w, v)
    return {m: out[:, :, module_index[m]] * gates[m].to(dt) for m in gates}


def _groups(lens: list[int], budget: int) -> list[list[int]]:
    """Chunk indices in groups by ascending length, each padding to at most ``budget`` slots (or one chunk)."""
    groups, cur, cur_max = [], [], 0
    for c in sorted(range(len(lens)), key=lens.__getitem__):
        if cur and (len(cur) + 1) * max(cur_max, lens[c]) > budget:
            groups.append(cur)
            cur, cur_max = [], 0
        cur.append(c)
        cur_max = max(cur_max, lens[c])
    if cur:
        groups.append(cur)
    return groups


__all__ = ["COPY_KEY_DIM", "COPY_SLOT_BUDGET", "CopyHead", "copy_reference"]
