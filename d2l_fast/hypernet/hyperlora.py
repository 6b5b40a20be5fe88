"""HyperLoRA: Perceiver aggregator + per-layer head that turns context features into LoRA A/B (re-exported by
:mod:`d2l_fast.hypernet`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import D2LSpec
from .copy_head import CopyHead
from .head import LoRAHead, ResMLPBlock, ResMLPBlockPerLayer, l2_normalize
from .perceiver import Perceiver


class Aggregator(nn.Module):
    def __init__(self, spec: D2LSpec):
        super().__init__()
        self.perceiver = Perceiver(spec)


class HyperLoRA(nn.Module):
    """Maps packed context features to one rank-r LoRA per chunk (uncombined; spec §1.4–1.5).

    State-dict names equal the reference's ``HyperLoRA`` so its checkpoints load strictly.
    """

    def __init__(self, spec: D2LSpec):
        super().__init__()
        self.spec = spec
        L, D, r = spec.num_layers, spec.latent_size, spec.lora_r
        self.aggregator = Aggregator(spec)
        if spec.per_layer_processing:
            self.layers = nn.ModuleList([ResMLPBlockPerLayer(L, D) for _ in range(spec.num_pre_head_layers)])
        else:
            self.layers = nn.ModuleList([ResMLPBlock(D, spec.dropout_rate) for _ in range(spec.num_pre_head_layers)])
        self.head = LoRAHead(L, spec.n_modules, D, spec.d_lora, r)
        if spec.use_bias:
            self.bias_A = nn.ParameterDict(
                {m: nn.Parameter(torch.randn(L, r, spec.d_in[m]) * (0.2 / math.sqrt(spec.d_in[m] * r)))
                 for m in spec.target_modules}
            )
            self.bias_B = nn.ParameterDict(
                {m: nn.Parameter(torch.zeros(L, r, spec.d_out[m])) for m in spec.target_modules})
        self.scaler_A = nn.ParameterDict({m: nn.Parameter(torch.ones(1, L, r, 1)) for m in spec.target_modules})
        self.scaler_B = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, L, r, 1)) for m in spec.target_modules})
        if spec.copy_modules:
            self.copy_head = CopyHead(spec)

    @property
    def perceiver(self) -> Perceiver:
        return self.aggregator.perceiver

    def aggregate(self, features, cu_seqlens, max_seqlen: int, n_chunks: int, intermediates: dict | None = None,
                  projected: bool = False):
        """features [T_total, H] packed; segments = (layer, chunk) layer-major in layer-to-layer mode.

        Returns E [n_chunks, L, M, r, D].
        """
        s = self.spec
        out = self.perceiver(features, cu_seqlens, max_seqlen, return_intermediates=intermediates is not None,
                             projected=projected)
        if intermediates is not None:
            out, inter = out
            intermediates.update(inter)
        n_out, D = out.shape[1], out.shape[2]
        if s.layer_to_layer:
            # segments ordered (layer, chunk): [L*C, n_out, D] -> [C, L, n_out, D]
            out = out.view(s.num_layers, n_chunks, n_out, D).transpose(0, 1)
        return out.reshape(n_chunks, s.num_layers, s.n_modules, s.lora_r, D)

    @property
    def has_copy_head(self) -> bool:
        return bool(self.spec.copy_modules)

    def head_forward(self, e, intermediates: dict | None = None, copy_inputs: tuple | None = None):
        """E [C, L, M, r, D] -> {module: {"A": [C, L, r, d_in], "B": [C, L, r, d_out]}} with scalers applied.

        ``copy_inputs`` (needed when the hypernetwork has a copy head): ``(ctx [T, D] projected features,
        cu_seqlens [C+1], token_ids [T], value_table [V, d_out], chunk lengths as a host list)``."""
        s = self.spec
        e = e.float() if e.dtype != self.head.weight.dtype else e
        for blk in self.layers:
            e = blk(e)
        if intermediates is not None:
            intermediates["pre_head"] = e
        en = l2_normalize(e)
        f = self.head(en)
        copied = self.copy_head(en, *copy_inputs) if self.has_copy_head else {}
        if intermediates is not None:
            intermediates["head_out"] = f
        loras = {}
        for i, m in enumerate(s.target_modules):
            fm = f[:, :, i]
            a = fm[..., : s.d_in[m]] * self.scaler_A[m].to(fm.dtype)
            b = fm[..., s.d_in[m] : s.d_in[m] + s.d_out[m]] * self.scaler_B[m].to(fm.dtype)
            if m in copied:
                b = b + copied[m]
            loras[m] = {"A": a, "B": b}
        return loras

    def forward(self, features, cu_seqlens, max_seqlen: int, n_chunks: int, intermediates: dict | None = None,
                projected: bool = False, *, token_ids=None, value_table=None):
        """Packed features [T_total, H] (or modality-projected [T_total, D] with ``projected=True``) → per-chunk
        LoRAs.

        A hypernetwork with a copy head also needs the context's ``token_ids`` (long [T_total], aligned with the
        feature rows) and the base model's output embedding ``value_table`` ([vocab, d_out])."""
        copy_inputs = None
        if self.has_copy_head:
            copy_inputs = self._copy_inputs(features, cu_seqlens, token_ids, value_table, projected)
            features, projected = copy_inputs[0], True
        e = self.aggregate(features, cu_seqlens, max_seqlen, n_chunks, intermediates, projected)
        if intermediates is not None:
            intermediates["aggregator_out"] = e
        return self.head_forward(e, intermediates, copy_inputs)

    def _copy_inputs(self, features, cu_seqlens, token_ids, value_table, projected: bool) -> tuple:
        s = self.spec
        if token_ids is None or value_table is None:
            raise ValueError("this hypernetwork has a copy head (copy_modules="
                             f"{list(s.copy_modules)}): pass token_ids= (the context ids, one per feature row) and "
                             "value_table= (the base model's output embedding weight)")
        if not isinstance(token_ids, torch.Tensor) or token_ids.dtype not in (torch.int32, torch.int64) \
                or tuple(token_ids.shape) != (features.shape[0],):
            raise ValueError(f"token_ids must be an int tensor of shape ({features.shape[0]},) (one id per feature "
                             f"row), got {getattr(token_ids, 'dtype', type(token_ids).__name__)} "
                             f"{tuple(getattr(token_ids, 'shape', ()))}")
        if not isinstance(value_table, torch.Tensor) or value_table.dim() != 2:
            raise ValueError(f"value_table must be a 2-D tensor [vocab, d], got "
                             f"{tuple(getattr(value_table, 'shape', ())) or type(value_table).__name__}")
        for m in s.copy_modules:
            if value_table.shape[1] != s.d_out[m]:
                raise ValueError(f"value_table rows have {value_table.shape[1]} features, copy module {m!r} writes "
                                 f"d_out={s.d_out[m]}")
        # one host read for the checks and the copy head's grouping (chunk lengths), not one per check
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if token_ids.numel():
            lo, hi = torch.stack([token_ids.min(), token_ids.max()]).tolist()
            if lo < 0 or hi >= value_table.shape[0]:
                raise ValueError(f"token_ids must lie in [0, {value_table.shape[0]}), got ids in [{lo}, {hi}]")
        if lens and min(lens) < 1:
            raise ValueError("every chunk needs at least one token for the copy head, got an empty chunk")
        ctx = features if projected else self.perceiver.modality_projection(features)
        return ctx, cu_seqlens, token_ids, value_table, lens

    def bias_lora(self):
        if not self.spec.use_bias:
            return None
        return {m: {"A": self.bias_A[m], "B": self.bias_B[m]} for m in self.spec.target_modules}

    def get_head_bias(self):
        """The reference's name for :meth:`bias_lora`: {module: {"A": [L, r, d_in], "B": [L, r, d_out]}} or None."""
        return self.bias_lora()


__all__ = ["HyperLoRA"]
