"""Segmented multi-LoRA: Triton kernels (interpreter on CPU tensors) and the torch CPU path against the
per-segment reference. Shapes are tiny on purpose: the interpreter pays ~1 ms per program."""

from __future__ import annotations

import math

import pytest
import torch

from d2l_fast.kernels.segmented_lora import SegmentMeta, segmented_lora, segmented_lora_, segmented_lora_ref
from d2l_fast.kernels.segmented_lora import kernel as seg_kernel
from d2l_fast.kernels.segmented_lora import torch_impl as seg_torch
from d2l_fast.kernels.segmented_lora.configs import KernelConfig, pick_config
from d2l_fast.kernels.segmented_lora.launch import segmented_lora_bwd, segmented_lora_fwd

from .._numerics import LOWP_ERR_FLOOR, LOWP_ERR_RATIO, assert_close, seg_fp32

# the Triton backend on CPU tensors needs the interpreter; test_cuda_kernels.py runs it on a GPU
BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "torch"]


# ------------------------------------------------------------------------------------------ data
def make_problem(lens, seg_adapter, ranks, d_in, d_out, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    meta = SegmentMeta.from_lengths(lens, seg_adapter, offs, device="cpu")
    T = meta.n_tokens
    x = torch.randn(T, d_in, generator=g)
    A = torch.randn(offs[-1], d_in, generator=g) / math.sqrt(d_in)
    B = torch.randn(offs[-1], d_out, generator=g) / math.sqrt(max(ranks, default=1))
    return meta, x.to(dtype), A.to(dtype), B.to(dtype)


def ref_of(x, A, B, meta, scale, upcast=True):
    return segmented_lora_ref(x, A, B, meta.cu_seqlens, meta.seg_rank_start, meta.seg_rank_len, scale, upcast=upcast)


CASES = {
    # id: (lens, seg_adapter, ranks, d_in, d_out)
    "one-segment": ([13], [0], [16], 40, 24),
    "empty-and-len1": ([0, 1, 3, 0, 1], [0, 1, 0, 1, -1], [8, 24], 40, 24),
    "many-short": ([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], [i % 3 for i in range(12)], [8, 16, 24], 40, 24),
    "mixed-ranks-none-repeat": ([5, 0, 1, 17, 3, 9, 4], [0, 1, -1, 3, 2, 0, 3], [8, 16, 24, 72], 72, 40),
    "nonpow2": ([7, 11, 6], [1, -1, 0], [24, 72], 100, 72),
    "rank1032": ([20, 3], [0, 1], [1032, 8], 40, 24),
    "no-adapter-at-all": ([4, 5], [-1, -1], [8], 40, 24),
    # beams / num_return_sequences: adjacent segments share an adapter and are merged into one run of tiles
    "adjacent-same-adapter": ([5, 7, 3, 9, 1, 1], [1, 1, 0, 0, 1, 1], [8, 24], 72, 40),
}


def case_params(ids):
    return [pytest.param(CASES[k], id=k) for k in ids]


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.interpreter
def test_kernels_are_interpreted():
    for k in (
        seg_kernel._lora_fused_fwd_kernel,
        seg_kernel._lora_shrink_kernel,
        seg_kernel._lora_expand_kernel,
        seg_kernel._lora_decode_shrink_kernel,
        seg_kernel._lora_decode_expand_kernel,
        seg_kernel._lora_wgrad_kernel,
    ):
        assert type(k).__name__ == "InterpretedFunction"


def test_tile_table_merges_runs():
    """Tiles follow merged runs (adjacent segments with one adapter), never straddle a run, skip no-adapter rows."""
    meta = SegmentMeta.from_lengths([5, 7, 3, 0, 9], [1, 1, -1, 0, 0], [0, 8, 24], device="cpu")
    assert meta.tile_table(8).tolist() == [[0, 8, 8, 16], [8, 12, 8, 16], [15, 23, 0, 8], [23, 24, 0, 8]]
    assert meta.tile_table(1).shape == (21, 4)


@pytest.mark.interpreter
def test_decode_rows_sharing_an_adapter_use_run_tiles():
    """Beams (adjacent rows with one adapter) at decode: tensor-core tiles over the runs, same result."""
    from d2l_fast.kernels.segmented_lora.launch import launch_plan

    row_adapter = [0, 0, 0, 0, 1, 1, 1, 1, -1, 2]
    meta = SegmentMeta.uniform(10, 1, row_adapter, [0, 8, 24, 40])
    plan = launch_plan(meta, 72, 40, torch.float32, torch.device("cpu"))
    assert plan.cfg.variant != "decode" and plan.n_tiles == 3
    distinct = SegmentMeta.uniform(4, 1, [0, 1, 2, 0], [0, 8, 24, 40])
    assert launch_plan(distinct, 72, 40, torch.float32, torch.device("cpu")).cfg.variant == "decode"
    g = torch.Generator().manual_seed(4)
    x, A, B = torch.randn(10, 72, generator=g), torch.randn(40, 72, generator=g) / 9, torch.randn(40, 40, generator=g)
    out = torch.zeros(10, 40)
    segmented_lora_fwd(out, x, A, B, meta, 0.5)
    assert_close("delta(beams)", out, ref_of(x.double(), A.double(), B.double(), meta, 0.5), **seg_fp32(112))


def test_meta_worked_example():
    meta = SegmentMeta.from_lengths([4, 6], [1, 0], [0, 8, 24], device="cpu")
    assert meta.cu_seqlens.tolist() == [0, 4, 10] and meta.cu_seqlens.dtype == torch.int32
    assert meta.seg_rank_start.tolist() == [8, 0] and meta.seg_rank_len.tolist() == [16, 8]
    assert (meta.n_tokens, meta.max_seqlen, meta.max_rank) == (10, 6, 16)
    u = SegmentMeta.uniform(3, 2, [0, -1, 0], [0, 8, 24])
    assert u.cu_seqlens.tolist() == [0, 2, 4, 6] and u.seg_rank_len.tolist() == [8, 0, 8]
    assert u.runs == ((0, 2, 0, 8), (4, 6, 0, 8))
    assert len(u.groups) == 1 and u.groups[0].runs == ((0, 2), (4, 6))


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_lens=[1, 2], seg_adapter=[0], adapter_rank_offsets=[0, 8]), "expected 2, got 1"),
        (dict(seq_lens=[1], seg_adapter=[3], adapter_rank_offsets=[0, 8]), r"-1 or in \[0, 1\), got 3"),
        (dict(seq_lens=[-1], seg_adapter=[0], adapter_rank_offsets=[0, 8]), "seq_lens must be >= 0, got -1"),
        (dict(seq_lens=[1], seg_adapter=[0], adapter_rank_offsets=[0, 8, 4]), "non-decreasing"),
    ],
)
def test_meta_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentMeta.from_lengths(**kwargs)
    with pytest.raises(ValueError, match="overlap|identical or disjoint"):
        SegmentMeta.from_rank_ranges([1, 1], [0, 4], [8, 8])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params(CASES))
def test_forward_fp32(case, backend):
    meta, x, A, B = make_problem(*case)
    ref = ref_of(x.double(), A.double(), B.double(), meta, 0.5)
    got = segmented_lora(x, A, B, meta, 0.5, backend=backend)
    assert got.dtype == x.dtype and got.shape == ref.shape
    assert_close("delta", got, ref, **seg_fp32(x.shape[1] + meta.max_rank))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params(["mixed-ranks-none-repeat", "nonpow2"]))
def test_forward_fp16(case, backend):
    dtype = torch.float16
    meta, x, A, B = make_problem(*case, dtype=dtype)
    ref = ref_of(x.float(), A.float(), B.float(), meta, 0.5, upcast=False)
    torch_lowp = ref_of(x, A, B, meta, 0.5, upcast=False).float()  # fp32 math, rounded once, as a floor
    naive = torch.zeros_like(ref)  # the same computation done in fp16 by torch (h rounded to fp16)
    for (t0, t1, rs, rl) in meta.runs:
        h = (x[t0:t1].float() @ A[rs : rs + rl].float().T).to(dtype)
        naive[t0:t1] = (0.5 * (h.float() @ B[rs : rs + rl].float())).to(dtype).float()
    got = segmented_lora(x, A, B, meta, 0.5, backend=backend)
    assert got.dtype == dtype
    allowed = LOWP_ERR_RATIO * max((naive - ref).abs().max().item(), (torch_lowp - ref).abs().max().item())
    err = (got.float() - ref).abs().max().item()
    assert err <= allowed + LOWP_ERR_FLOOR[dtype], f"fp16 err {err:.3e} > allowed {allowed:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_x(backend):
    meta, x, A, B = make_problem(*CASES["mixed-ranks-none-repeat"])
    wide = torch.randn(x.shape[0], 2 * x.shape[1])
    wide[:, ::2] = x
    xv = wide[:, ::2]  # stride (2*d_in, 2)
    assert not xv.is_contiguous()
    xt = x.t().contiguous().t()  # column-major view
    ref = ref_of(x.double(), A.double(), B.double(), meta, 1.5)
    for xin in (xv, xt):
        got = segmented_lora(xin, A, B, meta, 1.5, backend=backend)
        assert_close("delta(non-contiguous x)", got, ref, **seg_fp32(x.shape[1] + meta.max_rank))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_adds_into_out(backend):
    meta, x, A, B = make_problem(*CASES["nonpow2"])
    base = torch.randn(x.shape[0], B.shape[1])
    out = base.clone()
    ret = segmented_lora_(out, x, A, B, meta, 2.0, backend=backend)
    assert ret is out
    ref = base.double() + ref_of(x.double(), A.double(), B.double(), meta, 2.0)
    assert_close("out", out, ref, **seg_fp32(x.shape[1] + meta.max_rank))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq_len", [1, 3], ids=["decode-S1", "prefill-S3"])
def test_uniform_hf_layout(backend, seq_len):
    """x: [B, S, d_in] with one adapter per row (repeated adapters, a row without adapter)."""
    rows, d_in, d_out, offs = 6, 72, 40, [0, 8, 24, 48]
    row_adapter = [2, 0, -1, 2, 1, 0]
    meta = SegmentMeta.uniform(rows, seq_len, row_adapter, offs)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, seq_len, d_in, generator=g)
    A = torch.randn(offs[-1], d_in, generator=g) / math.sqrt(d_in)
    B = torch.randn(offs[-1], d_out, generator=g) / 4
    base = torch.randn(rows, seq_len, d_out, generator=g)
    out = base.clone()
    segmented_lora_(out, x, A, B, meta, 0.25, backend=backend)
    ref = ref_of(x.reshape(-1, d_in).double(), A.double(), B.double(), meta, 0.25).reshape(rows, seq_len, d_out)
    assert_close("out", out, base.double() + ref, **seg_fp32(d_in + 24))
    delta = segmented_lora(x, A, B, meta, 0.25, backend=backend)
    assert delta.shape == (rows, seq_len, d_out)
    assert_close("delta", delta, ref, **seg_fp32(d_in + 24))


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "cfg",
    [
        KernelConfig("fused", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, BLOCK_R=16),
        KernelConfig("two_pass", BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, BLOCK_R=32),
        KernelConfig("two_pass", BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, BLOCK_R=16, SPLIT_K=3),
    ],
    ids=["fused", "two_pass", "two_pass-splitK3"],
)
def test_triton_variants(cfg):
    """Both prefill kernels with blocks smaller than the problem (multi-block loops, masked tails)."""
    meta, x, A, B = make_problem(*CASES["mixed-ranks-none-repeat"])
    out = torch.zeros(x.shape[0], B.shape[1])
    segmented_lora_fwd(out, x, A, B, meta, 0.5, cfg)
    ref = ref_of(x.double(), A.double(), B.double(), meta, 0.5)
    assert_close(f"delta({cfg.variant})", out, ref, **seg_fp32(x.shape[1] + meta.max_rank))


@pytest.mark.interpreter
def test_decode_variant_is_picked_and_correct():
    meta = SegmentMeta.uniform(5, 1, [0, 0, -1, 1, 0], [0, 8, 24])
    assert pick_config(meta.n_tokens, meta.max_seqlen, meta.max_rank, 100, 40).variant == "decode"
    g = torch.Generator().manual_seed(2)
    x, A, B = torch.randn(5, 100, generator=g), torch.randn(24, 100, generator=g) / 10, torch.randn(24, 40, generator=g)
    out = torch.zeros(5, 40)
    segmented_lora_fwd(out, x, A, B, meta, 0.5)
    assert_close("delta(decode)", out, ref_of(x.double(), A.double(), B.double(), meta, 0.5), **seg_fp32(124))


@pytest.mark.parametrize("strategy", seg_torch.STRATEGIES)
@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(([1] * 8, list(range(8)), [16] * 8), id="decode-distinct"),
        pytest.param(([1] * 8, [3, 1, 1, 0, 3, 3, 0, 1], [16] * 4), id="decode-shared"),
        pytest.param(([1] * 6, [2, -1, 0, 0, 2, 1], [16] * 4), id="decode-gaps"),
        pytest.param(([3, 0, 5, 2, 4], [0, 1, 2, 0, -1], [8, 16, 24]), id="prefill-mixed"),
    ],
)
def test_cpu_strategies(setup, strategy):
    lens, ad, ranks = setup
    meta, x, A, B = make_problem(lens, ad, ranks, 40, 24)
    costs = seg_torch.estimate_costs(meta, 40, 24)
    if costs[strategy] == float("inf"):
        pytest.skip(f"{strategy} does not apply to this layout")
    out = torch.randn(x.shape[0], 24)
    base = out.clone()
    seg_torch.segmented_lora_cpu_(out, x, A, B, meta, 0.5, strategy=strategy)
    ref = base.double() + ref_of(x.double(), A.double(), B.double(), meta, 0.5)
    assert_close(f"out({strategy})", out, ref, **seg_fp32(40 + 24))


def test_cpu_strategy_choice():
    """The cost rule picks bmm for many distinct equal-rank decode adapters and runs for long prefill."""
    decode = SegmentMeta.uniform(64, 1, list(range(64)), [16 * i for i in range(65)])
    assert seg_torch.choose_strategy(decode, 9216, 2304) == "bmm"
    prefill = SegmentMeta.from_lengths([256] * 16, list(range(16)), [0] + [16 * (i + 1) for i in range(16)])
    assert seg_torch.choose_strategy(prefill, 9216, 2304) in ("runs", "grouped")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params(["mixed-ranks-none-repeat", "empty-and-len1", "rank1032"]))
def test_backward_fp32(case, backend):
    meta, x, A, B = make_problem(*case)
    xr, Ar, Br = (t.double().requires_grad_() for t in (x, A, B))
    yr = ref_of(xr, Ar, Br, meta, 0.75)
    dy = torch.randn(yr.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    yr.backward(dy)
    xx, AA, BB = (t.clone().requires_grad_() for t in (x, A, B))
    segmented_lora(xx, AA, BB, meta, 0.75, backend=backend).backward(dy.float())
    k = x.shape[1] + B.shape[1] + meta.max_rank + meta.max_seqlen
    assert_close("dx", xx.grad, xr.grad, **seg_fp32(k))
    assert_close("dA", AA.grad, Ar.grad, **seg_fp32(k))
    assert_close("dB", BB.grad, Br.grad, **seg_fp32(k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_partial_and_sum_grad(backend):
    """Only x needs a grad; the incoming grad of .sum() is an expanded stride-0 tensor."""
    meta, x, A, B = make_problem(*CASES["nonpow2"])
    xx = x.clone().requires_grad_()
    segmented_lora(xx, A, B, meta, 1.0, backend=backend).sum().backward()
    xr = x.double().requires_grad_()
    ref_of(xr, A.double(), B.double(), meta, 1.0).sum().backward()
    assert_close("dx", xx.grad, xr.grad, **seg_fp32(200))


@pytest.mark.interpreter
def test_backward_fp16_triton():
    dtype = torch.float16
    meta, x, A, B = make_problem(*CASES["mixed-ranks-none-repeat"], dtype=dtype)
    xr, Ar, Br = (t.float().requires_grad_() for t in (x, A, B))
    yr = ref_of(xr, Ar, Br, meta, 0.5, upcast=False)
    dy = torch.randn(yr.shape, generator=torch.Generator().manual_seed(4))
    yr.backward(dy)
    dx, dA, dB = segmented_lora_bwd(dy.to(dtype), x, A, B, meta, 0.5)
    for name, got, ref in (("dx", dx, xr.grad), ("dA", dA, Ar.grad), ("dB", dB, Br.grad)):
        assert got.dtype == dtype
        rel = ((got.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert rel < 5e-3, f"{name}: relative L2 err {rel:.3e}"


def _bad_inputs():
    meta, x, A, B = make_problem([3, 2], [0, 1], [8, 16], 40, 24)
    out = torch.zeros(5, 24)
    return meta, x, A, B, out


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda p: p.update(x=p["x"].half()), TypeError, "must equal x.dtype"),
        (lambda p: p.update(A=p["A"].double(), B=p["B"].double(), x=p["x"].double(), out=p["out"].double()),
         TypeError, "x.dtype must be one of"),
        (lambda p: p.update(A=p["A"][:, :30]), ValueError, r"A.shape\[1\] must equal x.shape\[1\] \(d_in=40\)"),
        (lambda p: p.update(B=p["B"][:20]), ValueError, "same R_total"),
        (lambda p: p.update(A=p["A"][:16], B=p["B"][:16]), ValueError, "rank rows up to 24"),
        (lambda p: p.update(x=p["x"][:4], out=p["out"][:4]), ValueError,
         r"meta.n_tokens must equal x.shape\[0\]: expected 4, got 5"),
        (lambda p: p.update(out=torch.zeros(5, 23)), ValueError, r"out must have shape \(5, 24\)"),
        (lambda p: p.update(meta="nope"), TypeError, "meta must be a SegmentMeta"),
        (lambda p: p.update(A=p["A"].to("meta")), ValueError, "must be on x's device"),
    ],
    ids=["dtype-mismatch", "fp64", "d_in", "R_total", "rank-range", "n_tokens", "out-shape", "meta-type", "device"],
)
def test_validation_errors_leave_out_unchanged(mutate, exc, match, backend):
    meta, x, A, B, out = _bad_inputs()
    p = dict(meta=meta, x=x, A=A, B=B, out=out)
    mutate(p)
    before = p["out"].clone()
    with pytest.raises(exc, match=match):
        segmented_lora_(p["out"], p["x"], p["A"], p["B"], p["meta"], 1.0, backend=backend)
    assert torch.equal(p["out"], before)
    if p["out"].shape == (p["x"].shape[0], p["B"].shape[1]):
        with pytest.raises(exc, match=match):
            segmented_lora(p["x"], p["A"], p["B"], p["meta"], 1.0, backend=backend)


def test_bad_backend():
    meta, x, A, B, out = _bad_inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        segmented_lora(x, A, B, meta, backend="cuda")


def test_pick_config_is_pure_and_gpu_legal():
    problems = [(64, 1, 16, 9216, 2304), (4096, 256, 72, 9216, 2304), (10, 10, 8, 40, 24),
                (4096, 4096, 1032, 1536, 576)]
    for args in problems:
        for interpret in (True, False):
            a, b = pick_config(*args, interpret=interpret), pick_config(*args, interpret=interpret)
            assert a == b
            if a.variant != "decode":
                assert min(a.BLOCK_M, a.BLOCK_N, a.BLOCK_K, a.BLOCK_R) >= 16


@pytest.mark.gpu
@pytest.mark.parametrize("case", case_params(["mixed-ranks-none-repeat", "nonpow2", "rank1032"]))
def test_bf16_cuda(case):
    meta, x, A, B = make_problem(*case, dtype=torch.bfloat16)
    meta, x, A, B = meta.to("cuda"), x.cuda(), A.cuda(), B.cuda()
    ref = ref_of(x.float(), A.float(), B.float(), meta, 0.5, upcast=False)
    got = segmented_lora(x, A, B, meta, 0.5)
    naive = ref_of(x, A, B, meta, 0.5, upcast=False).float()
    err = (got.float() - ref).abs().max().item()
    allowed = LOWP_ERR_RATIO * (naive - ref).abs().max().item() + LOWP_ERR_FLOOR[torch.bfloat16]
    assert err <= allowed
    xx = x.clone().requires_grad_()
    segmented_lora(xx, A, B, meta, 0.5).float().sum().backward()
    xr = x.float().requires_grad_()
    ref_of(xr, A.float(), B.float(), meta, 0.5, upcast=False).sum().backward()
    rel = ((xx.grad.float() - xr.grad).norm() / xr.grad.norm()).item()
    assert rel < 2e-2
