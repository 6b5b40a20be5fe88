"""Fused MLP LoRA benchmark (CUDA only; skips on CPU): a whole gated MLP with LoRA on down_proj vs the bare MLP.

    pytest benchmarks/ops/bench_fused_mlp.py --benchmark-only --benchmark-json /tmp/mlp.json   # on a GPU
    (scripts/gpu_suite.py runs the same providers in its ``mlp`` section, CUDA-event timed)

Batch: 16 documents x 256 tokens, one adapter each, ranks 8..72 in turn
(:func:`d2l_fast.profiling.shapes.mlp_seg_ranks`), bf16, at the Gemma-2-2b (GELU-tanh), Qwen3-4B and Mistral-7B
(SiLU) MLP shapes. Providers, each computing the MLP's output ``y`` for the whole batch:

* ``base``     gate_proj, up_proj (two cuBLAS GEMMs), ``act(gate) * up`` (torch elementwise), down_proj
* ``fused``    the same GEMMs; the gated_lora kernel writes h and the LoRA shrink partials in one pass over gate/up;
               down_proj on h; the expand added into y in place (one read + write of y)
* ``unfused``  the bare MLP then ``segmented_lora_(y, h, A, B)`` (the shrink re-reads h, the expand y)
* ``act_only`` / ``gated_shrink_only`` / ``expand_only``: the pieces that differ (the elementwise op alone, the fused
  kernel alone, the expand alone), to attribute the overhead; ``gated_shrink_only_bk64`` the fused kernel with the
  runner-up config (to confirm the pick on the card).

The target (issue 18): ``fused`` <= 1.10x ``base`` (the bare MLP).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from d2l_fast.kernels.gated_lora import gated_lora_expand_, gated_lora_shrink
from d2l_fast.kernels.gated_lora.launch import gated_lora_shrink_fwd, shrink_plan
from d2l_fast.kernels.gated_lora.torch_impl import gated_act
from d2l_fast.kernels.segmented_lora import SegmentMeta, segmented_lora_
from d2l_fast.profiling.shapes import MODEL_SHAPES, PREFILL_DOCS, PREFILL_TOKENS, mlp_activation, mlp_seg_ranks

MLP_MODELS = ("gemma-2-2b", "qwen3-4b", "mistral-7b")
PROVIDERS = ("base", "fused", "unfused", "act_only", "gated_shrink_only", "gated_shrink_only_bk64", "expand_only")
SCALE = 2.0


class MlpTensors:
    """One model's MLP weights, a batch's gate_proj input and the 16 adapters of down_proj, on ``device``."""

    def __init__(self, model: str, device: str = "cuda", dtype=torch.bfloat16, seed: int = 0,
                 n_docs: int = PREFILL_DOCS, doc_tokens: int = PREFILL_TOKENS):  # fmt: skip
        if model not in MODEL_SHAPES:
            raise ValueError(f"unknown model {model!r}; expected one of {list(MODEL_SHAPES)}")
        m = MODEL_SHAPES[model]
        self.model, self.act = model, mlp_activation(model)
        self.d_model, self.d_ff = m.hidden, m.intermediate
        self.ranks = list(mlp_seg_ranks(n_docs))
        offs = [0]
        for r in self.ranks:
            offs.append(offs[-1] + r)
        self.meta = SegmentMeta.from_lengths([doc_tokens] * n_docs, list(range(n_docs)), offs, device=device)
        g = torch.Generator().manual_seed(seed)
        T, d, f = self.meta.n_tokens, self.d_model, self.d_ff

        def rnd(*shape, std=1.0):
            return (torch.randn(*shape, generator=g) * std).to(device, dtype)

        self.x = rnd(T, d)
        self.Wg, self.Wu, self.Wd = rnd(f, d, std=d**-0.5), rnd(f, d, std=d**-0.5), rnd(d, f, std=f**-0.5)
        self.A, self.B = rnd(offs[-1], f, std=f**-0.5), rnd(offs[-1], d, std=1 / 8)

    def reference(self) -> torch.Tensor:
        """fp32 MLP with the LoRA on down_proj (per run, on the rounded h the kernels feed down_proj)."""
        gate, up = F.linear(self.x, self.Wg), F.linear(self.x, self.Wu)
        h = gated_act(gate.float(), up.float(), self.act).to(self.x.dtype).float()
        y = F.linear(h, self.Wd.float())
        for t0, t1, rs, rl in self.meta.runs:
            y[t0:t1] += SCALE * (h[t0:t1] @ self.A[rs : rs + rl].float().T) @ self.B[rs : rs + rl].float()
        return y

    def providers(self) -> dict:
        x, Wg, Wu, Wd, A, B, meta, act = self.x, self.Wg, self.Wu, self.Wd, self.A, self.B, self.meta, self.act
        gate0, up0 = F.linear(x, Wg), F.linear(x, Wu)
        _, s0 = gated_lora_shrink(gate0, up0, A, meta, SCALE, activation=act)
        y0 = torch.empty(x.shape[0], self.d_model, device=x.device, dtype=x.dtype)

        def bare():
            return F.linear(gated_act(F.linear(x, Wg), F.linear(x, Wu), act), Wd)

        def fused():
            h, s = gated_lora_shrink(F.linear(x, Wg), F.linear(x, Wu), A, meta, SCALE, activation=act)
            return gated_lora_expand_(F.linear(h, Wd), s, B, meta)

        def unfused():
            h = gated_act(F.linear(x, Wg), F.linear(x, Wu), act)
            return segmented_lora_(F.linear(h, Wd), h, A, B, meta, SCALE)

        fns = {
            "base": bare, "fused": fused, "unfused": unfused,
            "act_only": lambda: gated_act(gate0, up0, act),
            "gated_shrink_only": lambda: gated_lora_shrink(gate0, up0, A, meta, SCALE, activation=act),
            "expand_only": lambda: gated_lora_expand_(y0, s0, B, meta),
        }  # fmt: skip
        if x.is_cuda:  # the runner-up config of the compile report (BLOCK_K 64: 139 registers, one program per SM)
            cfg = shrink_plan(meta, self.d_ff, x.dtype, x.device).cfg
            alt = dataclasses.replace(cfg, BLOCK_K=64, num_stages=2)
            fns["gated_shrink_only_bk64"] = lambda: gated_lora_shrink_fwd(gate0, up0, A, meta, SCALE, act, alt)
        return fns

    def flops_bytes(self) -> dict:
        T, d, f, e = self.meta.n_tokens, self.d_model, self.d_ff, self.x.element_size()
        lora_rows = sum(self.ranks)
        return dict(
            mlp_flops=2 * T * d * f * 3,
            lora_flops=2 * sum((t1 - t0) * rl for t0, t1, _, rl in self.meta.runs) * (f + d),
            act_bytes=3 * T * f * e,  # gate, up read; h written
            fused_min_bytes=3 * T * f * e + lora_rows * (f + d) * e + 2 * T * d * e,
        )


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def suite_rows(time_us, graph_us, spin):
    """The rows of scripts/gpu_suite.py's ``mlp`` section: per model, every provider's CUDA-event time (``time_us(fn,
    reps)``), the fused provider's CUDA-graph time, the errors vs the fp32 reference, then a summary row."""
    for model in MLP_MODELS:
        t = MlpTensors(model)
        case = f"mlp16x256/{model}"
        with torch.no_grad():
            ref, fns, times = t.reference(), t.providers(), {}
            spin()
            for prov, fn in fns.items():
                err = rel_err(fn(), ref) if prov in ("fused", "unfused") else None
                times[prov] = time_us(fn, reps=15)
                yield dict(section="mlp", case=case, provider=prov, us=times[prov], rel_err=err,
                           graph_us=graph_us(fn) if prov == "fused" else None)  # fmt: skip
        yield dict(section="mlp_summary", case=case, fused_vs_bare=times["fused"] / times["base"],
                   unfused_vs_bare=times["unfused"] / times["base"], target_met=times["fused"] <= 1.10 * times["base"],
                   gated_shrink_vs_act=times["gated_shrink_only"] / times["act_only"], **t.flops_bytes())  # fmt: skip
        del t, fns, ref
        torch.cuda.empty_cache()


_DATA: dict = {}


def _tensors(model: str) -> MlpTensors:
    if model not in _DATA:
        _DATA.clear()
        torch.cuda.empty_cache()
        _DATA[model] = MlpTensors(model)
    return _DATA[model]


@pytest.mark.benchmark(group="fused_mlp")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model", MLP_MODELS)
@torch.no_grad()
def test_fused_mlp(benchmark, env_info, model, provider):
    if not torch.cuda.is_available():
        pytest.skip("the fused MLP LoRA benchmark needs CUDA (the Triton kernels; the CPU path is not the target)")
    t = _tensors(model)
    fn = t.providers()[provider]
    if provider in ("base", "fused", "unfused"):
        ref = t.reference()
        if provider == "base":
            gate, up = F.linear(t.x, t.Wg), F.linear(t.x, t.Wu)
            ref = F.linear(gated_act(gate.float(), up.float(), t.act).to(t.x.dtype).float(), t.Wd.float())
        err = rel_err(fn(), ref)
        benchmark.extra_info["rel_err"] = err
        assert err < 2e-2 and math.isfinite(err), f"{provider} disagrees with the fp32 reference: {err:.2e}"
    benchmark.extra_info.update(dict(case=f"mlp16x256/{model}", provider=provider, model=model, ranks=t.ranks,
                                     activation=t.act, **t.flops_bytes(), **env_info))  # fmt: skip

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=3)
