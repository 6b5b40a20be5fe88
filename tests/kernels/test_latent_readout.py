"""Tests of d2l_fast.kernels.latent_readout against the per-segment reference (latent_readout_ref)."""
import math

import pytest
import torch

from d2l_fast.kernels.latent_readout import (
    ReadoutProblem,
    choose_mode,
    compute_rstd,
    latent_readout,
    latent_readout_ref,
    readout_macs,
)
from d2l_fast.kernels.latent_readout import kernel as readout_kernel

from .._numerics import READOUT, READOUT_GRAD, assert_close

PATHS = [
    pytest.param("torch", "absorbed", id="torch-absorbed"),
    pytest.param("torch", "plain", id="torch-plain"),
    pytest.param("triton", "absorbed", id="triton-absorbed", marks=pytest.mark.interpreter),
    pytest.param("triton", "plain", id="triton-plain", marks=pytest.mark.interpreter),
]


def make_problem(lens, n_q=3, H=4, n_kv=2, hd=24, D=40, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    T, n = sum(lens), len(lens)
    cu = torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return dict(
        q=rnd(n, n_q, H, hd),
        ctx=rnd(T, D, scale=3.0),
        cu_seqlens=cu.to(device),
        max_seqlen=max(lens) if lens else 0,
        k_weight=rnd(n_kv * hd, D, scale=1 / math.sqrt(D)),
        v_weight=rnd(n_kv * hd, D, scale=1 / math.sqrt(D)),
        ctx_norm_weight=(1 + 0.2 * torch.randn(D, generator=g)).to(device=device, dtype=dtype),
        n_kv_heads=n_kv,
    )


def run_ref(p, upcast=True):
    return latent_readout_ref(
        p["q"], p["ctx"], p["cu_seqlens"], p["k_weight"], p["v_weight"], p["ctx_norm_weight"],
        n_kv_heads=p["n_kv_heads"], upcast=upcast,
    )  # fmt: skip


def run_op(p, **kw):
    return latent_readout(
        p["q"], p["ctx"], p["cu_seqlens"], p["max_seqlen"], p["k_weight"], p["v_weight"], p["ctx_norm_weight"],
        n_kv_heads=p["n_kv_heads"], **kw,
    )  # fmt: skip


def ref64(p):
    """fp64 reference on the op's (possibly low-precision) inputs, keeping the reference's cast-back."""
    return run_ref(p, upcast=True).double() if p["q"].dtype == torch.float32 else _ref_lowp(p)


def _ref_lowp(p):
    # latent_readout_ref casts its output to q.dtype; recompute with fp64 output from the same inputs
    q64 = p["q"].double()
    out = latent_readout_ref(
        q64, p["ctx"], p["cu_seqlens"], p["k_weight"], p["v_weight"], p["ctx_norm_weight"],
        n_kv_heads=p["n_kv_heads"], upcast=True,
    )  # fmt: skip
    return out


CASES = [
    pytest.param(dict(lens=[5, 0, 1, 17, 33]), id="S5-len0-len1-odd-hd24-D40"),
    pytest.param(dict(lens=[1]), id="S1-L1"),
    pytest.param(dict(lens=[0, 0, 4]), id="S3-empty-first"),
    pytest.param(dict(lens=[8] * 24), id="S24-L8-many"),
    pytest.param(dict(lens=[7, 130, 64, 1, 200, 0, 9], n_q=8, H=8, n_kv=4, hd=16, D=48), id="S7-mixed-H8"),
    pytest.param(dict(lens=[2500, 3], n_q=2, H=2, n_kv=1, hd=16, D=16), id="S2-long2500-D16"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend,mode", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_readout_forward(case, backend, mode, dtype):
    p = make_problem(dtype=dtype, **case)
    out = run_op(p, backend=backend, mode=mode)
    assert out.dtype == dtype and out.shape == p["q"].shape
    assert_close("out", out, ref64(p), **READOUT[dtype])
    lens = case["lens"]
    for s, n in enumerate(lens):
        if n == 0:
            assert torch.all(out[s] == 0), f"empty segment {s} must give zeros"


@pytest.mark.interpreter
def test_interpreter_is_active():
    assert type(readout_kernel._readout_split_kernel).__name__ == "InterpretedFunction"
    assert type(readout_kernel._readout_merge_kernel).__name__ == "InterpretedFunction"
    assert type(readout_kernel._ctx_rstd_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("backend,mode", PATHS)
def test_readout_padded_vs_packed(backend, mode):
    """A padded batch with a key-padding mask, computed densely, equals the packed op (FA pattern)."""
    g = torch.Generator().manual_seed(3)
    B, S, n_q, H, n_kv, hd, D = 4, 37, 4, 4, 2, 16, 32
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[1] = S
    mask = torch.arange(S)[None, :] < lengths[:, None]  # [B, S] key padding mask
    ctx_pad = torch.randn(B, S, D, generator=g) * 2
    q = torch.randn(B, n_q, H, hd, generator=g)
    wk = torch.randn(n_kv * hd, D, generator=g) / math.sqrt(D)
    wv = torch.randn(n_kv * hd, D, generator=g) / math.sqrt(D)
    w = 1 + 0.2 * torch.randn(D, generator=g)
    # dense padded reference
    c = ctx_pad.double()
    c = w.double() * (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6))
    k = (c @ wk.double().T).view(B, S, n_kv, hd).repeat_interleave(H // n_kv, 2)
    v = (c @ wv.double().T).view(B, S, n_kv, hd).repeat_interleave(H // n_kv, 2)
    s = torch.einsum("bihd,bthd->bhit", q.double(), k) / math.sqrt(hd)
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    dense = torch.einsum("bhit,bthd->bihd", torch.softmax(s, -1), v)
    # packed
    ctx = ctx_pad[mask]
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    out = latent_readout(q, ctx, cu, int(lengths.max()), wk, wv, w, n_kv_heads=n_kv, backend=backend, mode=mode)
    assert_close("packed-vs-padded", out, dense, **READOUT[torch.float32])


@pytest.mark.parametrize("use_rstd", [False, True], ids=["rstd-internal", "rstd-given"])
@pytest.mark.parametrize("backend,mode", PATHS)
def test_readout_backward(backend, mode, use_rstd):
    p = make_problem([5, 0, 1, 40, 12], n_q=2, H=4, n_kv=2, hd=12, D=20, seed=1)
    names = ["q", "ctx", "k_weight", "v_weight", "ctx_norm_weight"]
    leaves = {n: p[n].clone().requires_grad_() for n in names}
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(p["q"].shape, generator=g)
    kw = dict(n_kv_heads=p["n_kv_heads"])
    # reference grads: fp64 autograd through the per-segment reference
    ref_leaves = {n: p[n].double().requires_grad_() for n in names}
    ref = latent_readout_ref(
        ref_leaves["q"], ref_leaves["ctx"], p["cu_seqlens"], ref_leaves["k_weight"], ref_leaves["v_weight"],
        ref_leaves["ctx_norm_weight"], **kw,
    )  # fmt: skip
    ref.backward(grad_out.double())
    extra = {}
    if use_rstd:
        extra["ctx_rstd"] = compute_rstd(leaves["ctx"], 1e-6)
    out = latent_readout(
        leaves["q"], leaves["ctx"], p["cu_seqlens"], p["max_seqlen"], leaves["k_weight"], leaves["v_weight"],
        leaves["ctx_norm_weight"], backend=backend, mode=mode, **extra, **kw,
    )  # fmt: skip
    out.backward(grad_out)
    for n in names:
        assert_close(f"d{n}", leaves[n].grad, ref_leaves[n].grad, **READOUT_GRAD)
    # deterministic: a second backward gives bit-identical gradients
    first = {n: leaves[n].grad.clone() for n in names}
    for n in names:
        leaves[n].grad = None
    if use_rstd:
        extra["ctx_rstd"] = compute_rstd(leaves["ctx"], 1e-6)
    out = latent_readout(
        leaves["q"], leaves["ctx"], p["cu_seqlens"], p["max_seqlen"], leaves["k_weight"], leaves["v_weight"],
        leaves["ctx_norm_weight"], backend=backend, mode=mode, **extra, **kw,
    )  # fmt: skip
    out.backward(grad_out)
    for n in names:
        assert torch.equal(first[n], leaves[n].grad), f"d{n} is not deterministic"


def test_readout_backward_multichunk():
    """Segments longer than one CPU key chunk exercise the LSE merge in the backward recompute."""
    p = make_problem([5000, 7, 0], n_q=2, H=2, n_kv=1, hd=8, D=16, seed=2)
    names = ["q", "ctx", "k_weight", "v_weight", "ctx_norm_weight"]
    leaves = {n: p[n].clone().requires_grad_() for n in names}
    ref_leaves = {n: p[n].double().requires_grad_() for n in names}
    grad_out = torch.randn(p["q"].shape, generator=torch.Generator().manual_seed(1))
    latent_readout_ref(
        ref_leaves["q"], ref_leaves["ctx"], p["cu_seqlens"], ref_leaves["k_weight"], ref_leaves["v_weight"],
        ref_leaves["ctx_norm_weight"], n_kv_heads=1,
    ).backward(grad_out.double())  # fmt: skip
    for mode in ("absorbed", "plain"):
        for n in names:
            leaves[n].grad = None
        latent_readout(
            leaves["q"], leaves["ctx"], p["cu_seqlens"], p["max_seqlen"], leaves["k_weight"], leaves["v_weight"],
            leaves["ctx_norm_weight"], n_kv_heads=1, mode=mode, backend="torch",
        ).backward(grad_out)  # fmt: skip
        for n in names:
            assert_close(f"{mode} d{n}", leaves[n].grad, ref_leaves[n].grad, **READOUT_GRAD)


@pytest.mark.interpreter
def test_readout_ctx_rstd_and_noncontiguous():
    p = make_problem([9, 0, 30, 2], seed=4)
    ref = ref64(p)
    rstd = compute_rstd(p["ctx"], 1e-6)
    for mode in ("absorbed", "plain"):
        assert_close("ctx_rstd", run_op(p, mode=mode, ctx_rstd=rstd), ref, **READOUT[torch.float32])
    # a non-contiguous context view (every other row of a wider buffer, strided columns)
    wide = torch.zeros(p["ctx"].shape[0], 2 * p["ctx"].shape[1])
    wide[:, ::2] = p["ctx"]
    p2 = dict(p, ctx=wide[:, ::2])
    assert not p2["ctx"].is_contiguous()
    for backend, mode in (("torch", "absorbed"), ("torch", "plain"), ("triton", "absorbed")):
        assert_close("noncontig", run_op(p2, backend=backend, mode=mode), ref, **READOUT[torch.float32])


@pytest.mark.interpreter
def test_readout_softmax_scale():
    p = make_problem([6, 11], seed=5)
    ref = latent_readout_ref(
        p["q"], p["ctx"], p["cu_seqlens"], p["k_weight"], p["v_weight"], p["ctx_norm_weight"],
        n_kv_heads=p["n_kv_heads"], softmax_scale=0.3,
    )  # fmt: skip
    for backend, mode in (("torch", "absorbed"), ("triton", "plain")):
        assert_close("scale", run_op(p, backend=backend, mode=mode, softmax_scale=0.3), ref, **READOUT[torch.float32])


def test_auto_mode_cost_model():
    gemma = ReadoutProblem(n_seg=26, n_q=8, n_heads=16, n_kv_heads=4, head_dim=128, d_model=512,
                           total_tokens=26 * 2000, max_seqlen=2000)  # fmt: skip
    macs = readout_macs(gemma)
    assert 3.5 < macs["plain"] / macs["absorbed"] < 4.3
    assert choose_mode(gemma) == "absorbed"
    niah = ReadoutProblem(26, 208, 16, 4, 128, 512, 26 * 2000, 2000)
    assert choose_mode(niah) == "plain"
    decoder = ReadoutProblem(26 * 4, 8, 16, 4, 128, 512, 26 * 4 * 8, 8)  # 8 tokens per segment
    assert choose_mode(decoder) == "plain"


def _raises(exc, match, p, **kw):
    with pytest.raises(exc, match=match):
        run_op(p, **kw)


def test_readout_validation():
    p = make_problem([3, 4])
    cu = p["cu_seqlens"]
    _raises(ValueError, r"cu_seqlens must be int32 of shape \(3,\), got torch.int64", dict(p, cu_seqlens=cu.long()))
    _raises(ValueError, r"cu_seqlens must be int32 of shape \(3,\), got torch.int32 \(2,\)", dict(p, cu_seqlens=cu[:2]))
    _raises(ValueError, r"n_kv_heads must be a positive divisor of H=4, got 3", dict(p, n_kv_heads=3))
    _raises(ValueError, r"k_weight must have shape \(48, 40\), got \(48, 41\)", dict(p, k_weight=torch.zeros(48, 41)))
    bad_w = dict(p, ctx_norm_weight=torch.ones(39))
    _raises(ValueError, r"ctx_norm_weight must have shape \(40,\), got \(39,\)", bad_w)
    _raises(TypeError, r"ctx dtype must equal q dtype torch.float32, got torch.float16", dict(p, ctx=p["ctx"].half()))
    _raises(TypeError, r"q dtype must be one of", dict(p, q=p["q"].double(), ctx=p["ctx"].double()))
    _raises(ValueError, r"q must be \[n_seg, n_q, H, hd\], got \(2, 3, 96\)", dict(p, q=p["q"].flatten(2)))
    _raises(ValueError, r"max_seqlen must be a non-negative int, got 4.0", dict(p, max_seqlen=4.0))
    _raises(ValueError, r"ctx_rstd must be float32 of shape \(7,\)", p, ctx_rstd=torch.ones(6))
    _raises(ValueError, r"mode must be one of .*got 'fast'", p, mode="fast")
    _raises(ValueError, r"backend must be one of .*got 'cuda'", p, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["absorbed", "plain"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_readout_gpu(mode, dtype):
    for lens in ([5, 0, 1, 17, 33], [8] * 64, [3000, 1, 500]):
        p = make_problem(lens, n_q=8, H=16, n_kv=4, hd=128, D=512, dtype=dtype, device="cuda")
        out = run_op(p, backend="triton", mode=mode)
        ref = _ref_lowp(p) if dtype != torch.float32 else run_ref(p).double()
        assert_close(f"gpu {dtype} {mode}", out.cpu(), ref.cpu(), **READOUT[dtype])
