"""Per-layer ResMLP, L2 normalisation, LoRA head, A/B split and scalers (spec §1.5)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LayerMix(nn.Module):
    """``x · W[l] + b[l]`` applied per base layer; x [..., L, M, r, d_in] (layer axis 1 of [C, L, M, r, d]).

    Weight layout ``[L, in, out]`` and bias ``[1, L, 1, 1, out]`` as the reference's EinMix stores them.
    """

    def __init__(self, n_layers: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_layers, d_in, d_out))
        self.bias = nn.Parameter(torch.empty(1, n_layers, 1, 1, d_out))
        nn.init.uniform_(self.weight, -math.sqrt(3 / d_in), math.sqrt(3 / d_in))
        nn.init.uniform_(self.bias, -math.sqrt(1 / d_in), math.sqrt(1 / d_in))

    def forward(self, x):  # x [C, L, M, r, d_in]
        C, L, M, R, d = x.shape
        y = torch.bmm(x.transpose(0, 1).reshape(L, C * M * R, d), self.weight.to(x.dtype))
        return y.view(L, C, M, R, -1).transpose(0, 1) + self.bias.to(x.dtype)


class ResMLPBlockPerLayer(nn.Module):
    """``x + LN2(Mix2(SiLU(Mix1(LN1(x)))))`` with a separate MLP per base layer."""

    def __init__(self, n_layers: int, d: int, factor: int = 4):
        super().__init__()
        self.layers = nn.Sequential(
            nn.LayerNorm(d), LayerMix(n_layers, d, factor * d), nn.SiLU(), LayerMix(n_layers, factor * d, d),
            nn.LayerNorm(d),
        )

    def forward(self, x):
        return x + self.layers(x)


class ResMLPBlock(nn.Module):
    """Shared-across-layers variant: ``x + LN(Lin(SiLU(Lin(LN(x)))))`` with dropout before each Linear."""

    def __init__(self, d: int, dropout: float, factor: int = 4):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(d), nn.Dropout(dropout), nn.Linear(d, factor * d), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(factor * d, d), nn.LayerNorm(d),
        )

    def forward(self, x):
        return x + self.mlp(x)


class LoRAHead(nn.Module):
    """Per-layer (and per-module when M > 1) projection D → d_lora; no bias."""

    def __init__(self, n_layers: int, n_modules: int, d: int, d_lora: int, r: int):
        super().__init__()
        shape = (n_layers, d, d_lora) if n_modules == 1 else (n_layers, n_modules, d, d_lora)
        self.weight = nn.Parameter(torch.empty(shape))
        nn.init.normal_(self.weight, 0.0, 0.5 / math.sqrt(d + d_lora * r))

    def forward(self, e):  # e [C, L, M, r, D] -> [C, L, M, r, d_lora]
        C, L, M, R, D = e.shape
        w = self.weight.to(e.dtype)
        if w.dim() == 3:
            y = torch.bmm(e.transpose(0, 1).reshape(L, C * M * R, D), w)
            return y.view(L, C, M, R, -1).transpose(0, 1)
        y = torch.einsum("clmrd,lmdo->clmro", e, w)
        return y


def l2_normalize(x):
    """``x / ‖x‖₂`` over the last axis, no epsilon (as the reference)."""
    return x / x.norm(dim=-1, keepdim=True)


__all__ = ["LayerMix", "LoRAHead", "ResMLPBlock", "ResMLPBlockPerLayer", "l2_normalize"]
