"""The fused MLP LoRA (gated_lora) compiled and run on a CUDA device at the real Gemma-2-2b / Qwen3-4B / Mistral-7B
MLP shapes, bf16 / fp16 / fp32-tf32 / fp32-ieee, against the fp64 reference; the interpreter's edge cases on the
GPU. Skipped without CUDA. Error bounds: CUDA_KERNEL (see test_cuda_kernels.py for their derivation)."""

from __future__ import annotations

import math

import pytest
import torch

from d2l_fast.kernels.gated_lora import gated_lora_expand_, gated_lora_ref, gated_lora_shrink
from d2l_fast.kernels.gated_lora.configs import MAX_FUSED_RANK
from d2l_fast.kernels.segmented_lora import SegmentMeta
from d2l_fast.profiling.shapes import MODEL_SHAPES, mlp_activation, mlp_seg_ranks

from .test_cuda_kernels import DTYPE, PRECISIONS, check, fp32_precision
from .test_gated_lora import CASES

pytestmark = pytest.mark.gpu


def run(lens, seg_adapter, ranks, d_ff, d_model, prec, act, seed=0):
    g = torch.Generator().manual_seed(seed)
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    meta = SegmentMeta.from_lengths(lens, seg_adapter, offs, device="cuda")
    dt = DTYPE[prec]
    gate = (torch.randn(meta.n_tokens, d_ff, generator=g) * 2).to("cuda", dt)
    up = torch.randn(meta.n_tokens, d_ff, generator=g).to("cuda", dt)
    A = (torch.randn(offs[-1], d_ff, generator=g) / math.sqrt(d_ff)).to("cuda", dt)
    B = (torch.randn(offs[-1], d_model, generator=g) / math.sqrt(max(ranks))).to("cuda", dt)
    with fp32_precision(prec), torch.no_grad():
        h, s = gated_lora_shrink(gate, up, A, meta, 2.0, activation=act, backend="triton")
        y = torch.zeros(meta.n_tokens, d_model, device="cuda", dtype=dt)
        gated_lora_expand_(y, s, B, meta, backend="triton")
    h_ref, _ = gated_lora_ref(gate.double(), up.double(), A, B, meta.cu_seqlens, meta.seg_rank_start,
                              meta.seg_rank_len, 2.0, act)  # fmt: skip
    # the delta of the h the kernel wrote (what down_proj reads), in fp64
    delta = torch.zeros(meta.n_tokens, d_model, dtype=torch.float64, device="cuda")
    hd = h.double()
    for t0, t1, rs, rl in meta.runs:
        delta[t0:t1] = 2.0 * (hd[t0:t1] @ A[rs : rs + rl].double().T) @ B[rs : rs + rl].double()
    return h, h_ref, y, delta


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("model", ["gemma-2-2b", "qwen3-4b", "mistral-7b"])
def test_mlp_real_shapes(model, prec):
    """16 documents x 256 tokens, ranks 8..72 in turn (the benchmark batch)."""
    m = MODEL_SHAPES[model]
    h, h_ref, y, delta = run([256] * 16, list(range(16)), list(mlp_seg_ranks(16)), m.intermediate, m.hidden, prec,
                             mlp_activation(model))  # fmt: skip
    check(f"h {model}", h, h_ref.to(h.dtype), prec)
    check(f"delta {model}", y, delta, prec)


@pytest.mark.parametrize("prec", ["bf16", "tf32"])
def test_mixed_lengths_no_adapter_and_big_rank(prec):
    """Ragged documents, one without adapter, and a rank above the fused limit (segmented shrink fallback)."""
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 300, (9,), generator=g).tolist()
    for ranks in ([8, 16, 24, 32, 48, 64, 72, 8], [8, 16, 24, 32, 48, 64, 72, MAX_FUSED_RANK + 8]):
        h, h_ref, y, delta = run(lens, [0, 1, 2, -1, 3, 4, 5, 6, 7], ranks, 9216, 2304, prec, "gelu_tanh")
        check("h", h, h_ref.to(h.dtype), prec)
        check("delta", y, delta, prec)


@pytest.mark.parametrize("prec", ["bf16", "fp16", "ieee"])
@pytest.mark.parametrize("case", [pytest.param(v, id=k) for k, v in CASES.items() if k != "no-adapter-at-all"])
def test_interpreter_cases_on_cuda(case, prec):
    h, h_ref, y, delta = run(*case, prec, "silu")
    check("h", h, h_ref.to(h.dtype), prec)
    check("delta", y, delta, prec)
