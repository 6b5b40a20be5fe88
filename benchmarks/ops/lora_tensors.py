"""The tensors of one segmented-LoRA benchmark case on the GPU (scripts/gpu_suite.py's ``lora`` section)."""

from __future__ import annotations

import torch

from d2l_fast.kernels.segmented_lora import SegmentMeta
from d2l_fast.profiling.shapes import LoraCase

DT = torch.bfloat16


class LoraTensors:
    """One :class:`~d2l_fast.profiling.shapes.LoraCase` on the GPU: input, adapters and base weight in bf16."""

    def __init__(self, case: LoraCase, seed=0):
        self.case, self.kind, self.shape, self.name = case, case.kind, case.shape, case.name
        self.d_in, self.d_out = case.d_in, case.d_out
        self.seq_lens, self.seg_adapter, self.ranks = list(case.seq_lens), list(case.seg_adapter), list(case.ranks)
        g = torch.Generator().manual_seed(seed)
        self.offs = [0]
        for r in self.ranks:
            self.offs.append(self.offs[-1] + r)
        self.meta = SegmentMeta.from_lengths(self.seq_lens, self.seg_adapter, self.offs, device="cuda")
        T = self.meta.n_tokens
        self.x = torch.randn(T, self.d_in, generator=g).to("cuda", DT)
        self.A = (torch.randn(self.offs[-1], self.d_in, generator=g) / self.d_in**0.5).to("cuda", DT)
        self.B = (torch.randn(self.offs[-1], self.d_out, generator=g) / 8).to("cuda", DT)
        self.W = (torch.randn(self.d_out, self.d_in, generator=g) / self.d_in**0.5).to("cuda", DT)
        self.scale = case.scale

    def counts(self):
        T = self.meta.n_tokens
        used = sorted({a for a in self.seg_adapter if a >= 0})
        adapter_bytes = sum(self.ranks[a] for a in used) * (self.d_in + self.d_out) * 2
        lora_bytes = adapter_bytes + T * (self.d_in + 2 * self.d_out) * 2
        lora_flops = 2 * sum(n * self.ranks[a] for n, a in zip(self.seq_lens, self.seg_adapter) if a >= 0) * (
            self.d_in + self.d_out
        )
        base_flops = 2 * T * self.d_in * self.d_out
        base_bytes = (self.d_in * self.d_out + T * (self.d_in + self.d_out)) * 2
        return dict(adapter_bytes=adapter_bytes, lora_bytes=lora_bytes, lora_flops=lora_flops, base_flops=base_flops,
                    base_bytes=base_bytes)  # fmt: skip

    def peft(self):
        from peft import LoraConfig, get_peft_model
        from torch import nn

        class Wrap(nn.Module):
            def __init__(self, lin):
                super().__init__()
                self.lin = lin

            def forward(self, x):
                return self.lin(x)

        lin = nn.Linear(self.d_in, self.d_out, bias=False, device="cuda", dtype=DT)
        lin.weight.data.copy_(self.W)
        model = None
        used = sorted({a for a in self.seg_adapter if a >= 0})
        for i in used:
            r = self.ranks[i]
            cfg = LoraConfig(r=r, lora_alpha=self.scale * r, target_modules=["lin"], lora_dropout=0.0)
            if model is None:
                model = get_peft_model(Wrap(lin), cfg, adapter_name=f"a{i}")
            else:
                model.add_adapter(f"a{i}", cfg)
        layer = model.base_model.model.lin
        with torch.no_grad():
            for i in used:
                rs, r = self.offs[i], self.ranks[i]
                layer.lora_A[f"a{i}"].weight.copy_(self.A[rs : rs + r])
                layer.lora_B[f"a{i}"].weight.copy_(self.B[rs : rs + r].T)
        return model.eval().to(DT)
