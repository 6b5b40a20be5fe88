"""Fused gated activation + down_proj LoRA (gated_lora): the Triton kernel (interpreter on CPU tensors) and the torch
path against the per-segment reference, fp32 and fp16 (the interpreter gets bf16 wrong; test_cuda_kernels.py
covers bf16 on a GPU). Shapes are tiny: the interpreter pays per program and per loop step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from d2l_fast.kernels.gated_lora import (
    fused_mlp_lora,
    gated_lora_expand_,
    gated_lora_ref,
    gated_lora_shrink,
)
from d2l_fast.kernels.gated_lora import kernel as gk
from d2l_fast.kernels.gated_lora.configs import MAX_FUSED_RANK, pick_expand_config, pick_shrink_config
from d2l_fast.kernels.gated_lora.launch import row_tiles
from d2l_fast.kernels.segmented_lora import SegmentMeta

from .._numerics import GATED_H, LOWP_ERR_FLOOR, LOWP_ERR_RATIO, assert_close, seg_fp32

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "torch"]

CASES = {
    # id: (lens, seg_adapter, ranks, d_ff, d_model)
    "one-segment": ([13], [0], [16], 40, 24),
    "empty-segments-mixed-8-72-none": ([5, 0, 1, 17, 0, 9, 4], [0, 1, -1, 3, 2, 0, -1], [8, 16, 24, 72], 100, 40),
    "nonpow2-sizes": ([7, 11, 6], [1, -1, 0], [24, 72], 97, 33),
    "no-adapter-at-all": ([4, 5], [-1, -1], [8], 40, 24),
    "adjacent-same-adapter": ([5, 7, 3, 9], [1, 1, 0, 0], [8, 24], 72, 40),
    "rank-above-fused-limit": ([6, 5], [0, 1], [MAX_FUSED_RANK + 8, 8], 40, 24),
}


def make(lens, seg_adapter, ranks, d_ff, d_model, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    meta = SegmentMeta.from_lengths(lens, seg_adapter, offs, device="cpu")
    T = meta.n_tokens
    gate = torch.randn(T, d_ff, generator=g) * 2
    up = torch.randn(T, d_ff, generator=g)
    A = torch.randn(offs[-1], d_ff, generator=g) / math.sqrt(d_ff)
    B = torch.randn(offs[-1], d_model, generator=g) / math.sqrt(max(ranks))
    y0 = torch.randn(T, d_model, generator=g)
    return meta, *(t.to(dtype) for t in (gate, up, A, B, y0))


def ref(meta, gate, up, A, B, scale, act):
    return gated_lora_ref(gate, up, A, B, meta.cu_seqlens, meta.seg_rank_start, meta.seg_rank_len, scale, act)


@pytest.mark.interpreter
def test_kernel_is_interpreted():
    assert type(gk._gated_act_shrink_kernel).__name__ == "InterpretedFunction"


def test_row_tiles_cover_every_row():
    """Unlike segmented_lora's tile table, rows without an adapter get tiles too (they need their activation); runs
    merge across an empty segment."""
    meta = SegmentMeta.from_lengths([5, 7, 3, 0, 9, 2], [1, 1, -1, 0, -1, 0], [0, 8, 24], device="cpu")
    assert row_tiles(meta, 8).tolist() == [[0, 8, 8, 16], [8, 12, 8, 16], [12, 20, 0, 0], [20, 24, 0, 0],
                                           [24, 26, 0, 8]]  # fmt: skip


def test_configs_gpu_rules():
    c = pick_shrink_config(4096, 256, 72, 9216, interpret=False)
    assert (c.BLOCK_M, c.BLOCK_K, c.BLOCK_R) == (64, 32, 128) and 1 < c.SPLIT_K <= 4
    assert pick_shrink_config(16, 1, 8, 9216, interpret=False).BLOCK_R == 16  # dots need >= 16
    e = pick_expand_config(4096, 256, 72, 2304, interpret=False)
    assert e.BLOCK_M == c.BLOCK_M and e.BLOCK_R == 16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("case", [pytest.param(v, id=k) for k, v in CASES.items()])
def test_fp32_matches_reference(case, act, backend):
    meta, gate, up, A, B, y0 = make(*case)
    h, s = gated_lora_shrink(gate, up, A, meta, 1.5, activation=act, backend=backend)
    h_ref, delta = ref(meta, gate.double(), up.double(), A.double(), B.double(), 1.5, act)
    assert h.dtype == torch.float32 and s.dtype == torch.float32 and s.shape[1:] == (meta.n_tokens, meta.max_rank)
    assert_close("h", h, h_ref, **GATED_H[torch.float32])
    y = y0.clone()
    assert gated_lora_expand_(y, s, B, meta, backend=backend) is y
    assert_close("y", y, y0.double() + delta, **seg_fp32(case[3]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("case", [pytest.param(CASES[k], id=k) for k in ("empty-segments-mixed-8-72-none",
                                                                        "nonpow2-sizes")])  # fmt: skip
def test_fp16_matches_reference(case, act, backend):
    dt = torch.float16
    meta, gate, up, A, B, y0 = make(*case, dtype=dt)
    h, s = gated_lora_shrink(gate, up, A, meta, 0.5, activation=act, backend=backend)
    h_ref, delta = ref(meta, gate, up, A, B, 0.5, act)  # fp64 math, h rounded to fp16 (what down_proj reads)
    assert h.dtype == dt
    assert_close("h", h, h_ref, **GATED_H[dt])
    y = y0.clone()
    gated_lora_expand_(y, s, B, meta, backend=backend)
    exact = y0.double() + delta.double()
    # the same computation done naively in fp16 by torch: its error sets the budget
    naive = y0.clone()
    for t0, t1, rs, rl in meta.runs:
        naive[t0:t1] += ((h_ref[t0:t1] @ A[rs : rs + rl].T) * 0.5).to(dt) @ B[rs : rs + rl]
    allowed = LOWP_ERR_RATIO * (naive.double() - exact).abs().max().item() + LOWP_ERR_FLOOR[dt]
    err = (y.double() - exact).abs().max().item()
    assert err <= allowed, f"fp16 error {err:.3e} > allowed {allowed:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_mlp_leading_dims_and_strided_inputs(backend):
    """[B, S, d] inputs; gate and up as column slices of one fused gate_up output (strided, as Phi-3 has it)."""
    meta = SegmentMeta.uniform(2, 9, [1, 0], [0, 8, 32], device="cpu")
    g = torch.Generator().manual_seed(3)
    gate_up = torch.randn(2, 9, 2 * 48, generator=g)
    gate, up = gate_up[..., :48], gate_up[..., 48:]
    A = torch.randn(32, 48, generator=g) / 7
    B = torch.randn(32, 20, generator=g) / 5
    W = torch.randn(20, 48, generator=g) / 7
    y = fused_mlp_lora(gate, up, lambda h: F.linear(h, W), A, B, meta, 2.0, backend=backend)
    h_ref, delta = ref(meta, gate.reshape(18, 48).double(), up.reshape(18, 48).double(), A.double(), B.double(),
                       2.0, "silu")  # fmt: skip
    assert y.shape == (2, 9, 20)
    assert_close("y", y.reshape(18, 20), F.linear(h_ref, W.double()) + delta, **seg_fp32(48))


def test_bad_inputs_rejected_with_clear_messages():
    meta, gate, up, A, B, y0 = make(*CASES["empty-segments-mixed-8-72-none"])
    with pytest.raises(ValueError, match="activation must be one of"):
        gated_lora_shrink(gate, up, A, meta, activation="relu", backend="torch")
    with pytest.raises(TypeError, match="up.dtype must equal gate.dtype"):
        gated_lora_shrink(gate, up.half(), A, meta, backend="torch")
    with pytest.raises(ValueError, match="gate and up must both be"):
        gated_lora_shrink(gate, up[:, :-1], A, meta, backend="torch")
    with pytest.raises(ValueError, match=r"A must be \[R_total, d_ff=100\]"):
        gated_lora_shrink(gate, up, A[:, :-1], meta, backend="torch")
    with pytest.raises(ValueError, match="meta uses rank rows up to 120"):
        gated_lora_shrink(gate, up, A[:100], meta, backend="torch")
    with pytest.raises(ValueError, match="meta.n_tokens must equal gate.shape"):
        gated_lora_shrink(gate[:-1], up[:-1], A, meta, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        gated_lora_shrink(gate, up, A, meta, backend="cuda")
    with pytest.raises(ValueError, match="inference-only"):
        gated_lora_shrink(gate.requires_grad_(), up, A, meta, backend="torch")
    gate.requires_grad_(False)
    h, s = gated_lora_shrink(gate, up, A, meta, backend="torch")
    y = y0.clone()
    with pytest.raises(ValueError, match=r"s must be \[n_splits >= 1, T=36, max_rank=72\]"):
        gated_lora_expand_(y, s[:, :, :8], B, meta, backend="torch")
    with pytest.raises(TypeError, match="s must be the shrink's fp32 partials"):
        gated_lora_expand_(y, s.half(), B, meta, backend="torch")
    with pytest.raises(ValueError, match=r"B must be \[R_total, d_model=40\]"):
        gated_lora_expand_(y, s, B[:, :-1], meta, backend="torch")
    with pytest.raises(TypeError, match="y and B must share one dtype"):
        gated_lora_expand_(y, s, B.half(), meta, backend="torch")
    assert torch.equal(y, y0)  # errors leave y unchanged
    with pytest.raises(TypeError, match="down must be a callable"):
        fused_mlp_lora(gate, up, None, A, B, meta, backend="torch")


@pytest.mark.interpreter
def test_triton_backend_rejects_cpu_without_interpreter(monkeypatch):
    from d2l_fast.kernels.gated_lora import launch

    meta, gate, up, A, B, y0 = make(*CASES["one-segment"])
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        gated_lora_shrink(gate, up, A, meta, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_matches_eager(backend):
    """The custom ops under torch.compile (fullgraph): the fake shapes agree with the real ones, same numbers."""
    meta, gate, up, A, B, y0 = make(*CASES["nonpow2-sizes"])
    W = torch.randn(33, 97) / 10

    def mlp(gate, up, A, B):
        return fused_mlp_lora(gate, up, lambda h: F.linear(h, W), A, B, meta, 1.5, backend=backend)

    torch._dynamo.reset()
    got = torch.compile(mlp, backend="eager", fullgraph=True)(gate, up, A, B)
    assert_close("compiled", got, mlp(gate, up, A, B), atol=1e-6, rtol=1e-6)


def test_opcheck_torch_backend():
    meta, gate, up, A, B, y0 = make(*CASES["nonpow2-sizes"])
    lay = (list(meta.cu_seqlens_host), list(meta.rank_start_host), list(meta.rank_len_host))
    torch.library.opcheck(torch.ops.d2l_fast.gated_lora_shrink, (gate, up, A, *lay, 1.5, "silu", "torch"))
    h, s = torch.ops.d2l_fast.gated_lora_shrink(gate, up, A, *lay, 1.5, "silu", "torch")
    torch.library.opcheck(torch.ops.d2l_fast.gated_lora_expand_, (y0.clone(), s, B, *lay, "torch"))
