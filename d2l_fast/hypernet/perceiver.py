"""The Perceiver aggregator of Doc-to-LoRA (spec §1.4), padding-free over packed segments.

Parameter names and shapes match the reference checkpoint (``aggregator.perceiver.*``). Every
attention call is segment-wise over packed data described by ``cu_seqlens``: keys/values come from the
context only (cross layers) or the latents only (self layers), non-causal, GQA, no positions.

Cross-attention goes through :func:`d2l_fast.kernels.latent_readout.latent_readout`, which never
materialises K/V when the absorbed form is cheaper; the RMS statistics of the context are computed
once per forward and shared by all blocks (the context does not change across blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.latent_readout import compute_rstd, latent_readout


class RMSNorm(nn.Module):
    """``w ⊙ cast_back(x / sqrt(mean(x²) + eps))`` with statistics in fp32 (Idefics2 style)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dt)


_LIGER = []


def _liger_silu_mul():
    """``LigerSiLUMulFunction.apply`` when liger-kernel is installed (optional extra), else None."""
    if not _LIGER:
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            _LIGER.append(LigerSiLUMulFunction.apply)
        except Exception:  # noqa: BLE001 - not installed or incompatible
            _LIGER.append(None)
    return _LIGER[0]


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases."""

    block_rows = 1024

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        if x.is_cuda and _liger_silu_mul() is not None:  # Liger's fused silu·mul kernel (fwd + bwd) on CUDA
            return self.down_proj(_liger_silu_mul()(self.gate_proj(x), self.up_proj(x)))
        n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if torch.is_grad_enabled() or n_rows <= self.block_rows:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # inference: row blocks keep the two [rows, hidden] intermediates small and cache-resident; any
        # leading dims (e.g. latents [segments, queries, D]) are flattened into rows first
        x2 = x.reshape(n_rows, x.shape[-1])
        out = x2.new_empty(n_rows, self.down_proj.out_features)
        for i in range(0, n_rows, self.block_rows):
            xb = x2[i : i + self.block_rows]
            g = self.gate_proj(xb)
            out[i : i + self.block_rows] = self.down_proj(F.silu(g, inplace=True).mul_(self.up_proj(xb)))
        return out.view(*x.shape[:-1], self.down_proj.out_features)


class PerceiverAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, head_dim: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.head_dim, self.n_kv_heads = n_heads, head_dim, n_kv_heads
        self.q_proj = nn.Linear(d, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d, bias=False)


class PerceiverLayer(nn.Module):
    """Sandwich-norm perceiver layer: cross (context K/V) or self (latent K/V) attention + SwiGLU MLP."""

    def __init__(self, d: int, n_heads: int, head_dim: int, n_kv_heads: int, eps: float, is_cross: bool,
                 mlp_factor: int = 4):
        super().__init__()
        self.is_cross = is_cross
        self.input_latents_layernorm = RMSNorm(d, eps)
        if is_cross:
            self.input_context_layernorm = RMSNorm(d, eps)
        self.self_attn = PerceiverAttention(d, n_heads, head_dim, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_ff_layernorm = RMSNorm(d, eps)
        self.post_ff_layernorm = RMSNorm(d, eps)
        self.mlp = SwiGLU(d, mlp_factor * d, d)

    def forward(self, latents, ctx=None, cu_seqlens=None, max_seqlen=0, ctx_rstd=None):
        """latents [n_seg, n_q, D]; ctx [T_total, D] packed (cross layers only)."""
        attn = self.self_attn
        n_seg, n_q, _ = latents.shape
        z = self.input_latents_layernorm(latents)
        q = attn.q_proj(z).view(n_seg, n_q, attn.n_heads, attn.head_dim)
        if self.is_cross:
            o = latent_readout(
                q, ctx, cu_seqlens, max_seqlen, attn.k_proj.weight, attn.v_proj.weight,
                self.input_context_layernorm.weight, n_kv_heads=attn.n_kv_heads,
                eps=self.input_context_layernorm.eps, ctx_rstd=ctx_rstd,
            )
        else:
            o = _self_attention(q, z, attn)
        a = attn.o_proj(o.reshape(n_seg, n_q, attn.n_heads * attn.head_dim))
        latents = latents + self.post_attention_layernorm(a)
        latents = latents + self.post_ff_layernorm(self.mlp(self.pre_ff_layernorm(latents)))
        return latents


def _self_attention(q, z, attn: PerceiverAttention):
    n_seg, n_q, h, hd = q.shape
    k = attn.k_proj(z).view(n_seg, n_q, attn.n_kv_heads, hd).transpose(1, 2)
    v = attn.v_proj(z).view(n_seg, n_q, attn.n_kv_heads, hd).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=True)
    return o.transpose(1, 2)


class PerceiverResampler(nn.Module):
    def __init__(self, d: int, n_latents: int, num_blocks: int, n_self: int, shared: bool,
                 n_heads: int, head_dim: int, n_kv_heads: int, eps: float):
        super().__init__()
        self.latents_q = nn.Parameter(torch.randn(n_latents, d))
        mk = lambda cross: PerceiverLayer(d, n_heads, head_dim, n_kv_heads, eps, is_cross=cross)  # noqa: E731
        layers = []
        first_self = [mk(False) for _ in range(n_self)]
        shared_cross = None
        for b in range(num_blocks):
            if shared and b >= 1:
                shared_cross = shared_cross or mk(True)
                layers.append(shared_cross)
                layers.extend(first_self)
            else:
                layers.append(mk(True))
                layers.extend(first_self if (shared or b == 0) else [mk(False) for _ in range(n_self)])
        self.layers = nn.ModuleList(layers)
        self.layernorm = RMSNorm(d, eps)

    def forward(self, ctx, cu_seqlens, max_seqlen: int, n_seg: int, ctx_rstd=None):
        latents = self.latents_q.to(ctx.dtype).unsqueeze(0).expand(n_seg, -1, -1)
        for layer in self.layers:
            latents = layer(latents, ctx, cu_seqlens, max_seqlen, ctx_rstd)
        return self.layernorm(latents)


class Perceiver(nn.Module):
    """Modality projection → encoder resampler (n_latent_queries) → decoder resampler (n_output_queries)."""

    def __init__(self, spec):
        super().__init__()
        D, H = spec.latent_size, spec.feature_size
        f = spec.intermediate_size_factor
        kw = dict(n_heads=spec.n_heads, head_dim=spec.head_dim, n_kv_heads=spec.n_kv_heads, eps=spec.rms_norm_eps)
        self.modality_projection = SwiGLU(H, f * H, D)
        self.encoder = PerceiverResampler(D, spec.n_latent_queries, spec.num_blocks, spec.num_self_attn_per_block,
                                          spec.shared_weights, **kw)
        self.decoder = PerceiverResampler(D, spec.n_output_queries, 1, 0, False, **kw)

    def forward(self, features, cu_seqlens, max_seqlen: int, *, return_intermediates: bool = False,
                projected: bool = False):
        """features [T_total, H] packed; segments by ``cu_seqlens`` (int32 [n_seg+1], max_seqlen a Python int).

        ``projected=True``: ``features`` already went through the modality projection ([T_total, D]).
        Returns [n_seg, n_output_queries, D].
        """
        n_seg = cu_seqlens.numel() - 1
        ctx = features if projected else self.modality_projection(features)
        ctx_rstd = compute_rstd(ctx, self.encoder.layernorm.eps)
        enc = self.encoder(ctx, cu_seqlens, max_seqlen, n_seg, ctx_rstd)
        n_q = enc.shape[1]
        dec_cu = torch.arange(0, (n_seg + 1) * n_q, n_q, device=enc.device, dtype=torch.int32)
        dec_ctx = enc.reshape(n_seg * n_q, -1)
        dec = self.decoder(dec_ctx, dec_cu, n_q, n_seg, compute_rstd(dec_ctx, self.decoder.layernorm.eps))
        if return_intermediates:
            return dec, {"modality_projection": ctx, "encoder_latents": enc, "decoder_out": dec}
        return dec
