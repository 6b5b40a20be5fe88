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
        self.modules_ = tuple(spec.copy_modules)
        self.module_index = {m: spec.target_modules.index(m) for m in self.modules_}
        self.eps = spec.rms_norm_eps
        self.q = LayerMix(L, D, COPY_KEY_DIM)
        self.k_norm = nn.Parameter(torch.ones(D))
        self.k = nn.Parameter(torch.empty(D, COPY_KEY_DIM))
        nn.init.uniform_(self.k, -math.sqrt(3 / D), math.sqrt(3 / D))
        self.gate = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, L, r, 1)) for m in self.modules_})

    def forward(self, e, ctx, cu_seqlens, token_ids, value_table) -> dict:
        """e [C, L, M, r, D] (l2-normalised head input); ctx [T, D] projected features; cu_seqlens int [C+1];
        token_ids long [T]; value_table [V, d]. Returns {module: [C, L, r, d]} in ``e``'s dtype."""
        return copy_reference(e, ctx, cu_seqlens, token_ids, value_table, q_weight=self.q.weight, q_bias=self.q.bias,
                              k_norm=self.k_norm, k_weight=self.k, gates=dict(self.gate.items()),
                              module_index=self.module_index, eps=self.eps)


def copy_reference(e, ctx, cu_seqlens, token_ids, value_table, *, q_weight, q_bias, k_norm, k_weight, gates: dict,
                   module_index: dict, eps: float) -> dict:
    """Plain-torch copy attention (padded per chunk, masked); see the module docstring for the maths."""
    C, L, M, R, D = e.shape
    T = ctx.shape[0]
    dt = e.dtype
    cu = cu_seqlens.to(device=ctx.device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]
    t_max = int(lens.max()) if C else 0
    pos = torch.arange(t_max, device=ctx.device)
    valid = pos[None, :] < lens[:, None]  # [C, t_max]
    idx = (cu[:-1, None] + pos[None, :]).clamp_max(max(T - 1, 0))
    # queries [C, L, M, R, dk] (LayerMix maths, per layer)
    q = torch.bmm(e.transpose(0, 1).reshape(L, C * M * R, D), q_weight.to(dt)).view(L, C, M, R, -1).transpose(0, 1)
    q = q + q_bias.to(dt)
    c32 = ctx.float()
    kn = c32 * torch.rsqrt(c32.pow(2).mean(-1, keepdim=True) + eps) * k_norm.float()
    k = (kn.to(dt) @ k_weight.to(dt))[idx]  # [C, t_max, dk]
    logits = torch.einsum("clmrk,ctk->clmrt", q, k) * (k.shape[-1] ** -0.5)
    logits = logits.float().masked_fill(~valid[:, None, None, None, :], float("-inf"))
    w = torch.softmax(logits, dim=-1).to(dt)
    v = value_table[token_ids.to(value_table.device)[idx]].float()  # [C, t_max, d]
    v = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(dt)
    out = torch.einsum("clmrt,ctd->clmrd", w, v)
    return {m: out[:, :, i] * g.to(dt) for m, (i, g) in ((m, (module_index[m], gates[m])) for m in gates)}


__all__ = ["COPY_KEY_DIM", "CopyHead", "copy_reference"]
