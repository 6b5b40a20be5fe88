"""The rewritten readout kernels (issue 18): packed GQA rows, context splits with the log-sum-exp merge, the D split
of the output columns, the in-kernel and one-pass rstd; each forced through explicit configs under the interpreter
against the fp64 reference, plus the GPU branch of pick_config (a pure function of the shape) and the backward op's
dispatch guard."""
import math
from unittest import mock

import pytest
import torch

from d2l_fast.kernels.latent_readout import compute_rstd, latent_readout
from d2l_fast.kernels.latent_readout import configs as rc
from d2l_fast.kernels.latent_readout.configs import KernelConfig, pick_config
from d2l_fast.kernels.latent_readout.launch import ctx_rstd_fwd, latent_readout_triton_fwd, readout_attend_fwd

from .._numerics import READOUT, READOUT_GRAD, assert_close
from .test_latent_readout import make_problem, ref64, run_ref


def _triton(p, mode, cfg=None, rstd=None):
    out = latent_readout_triton_fwd(
        p["q"], p["ctx"], p["cu_seqlens"], p["max_seqlen"], p["k_weight"], p["v_weight"], p["ctx_norm_weight"], rstd,
        n_kv_heads=p["n_kv_heads"], scale=1.0 / math.sqrt(p["q"].shape[-1]), mode=mode, eps=1e-6, cfg=cfg,
    )  # fmt: skip
    return out.to(p["q"].dtype)


def _cfg(bm, bn, dk, dv, split_len, max_seqlen):
    return KernelConfig(bm, bn, dk, dv, max(1, -(-max(1, max_seqlen) // split_len)), split_len, num_warps=4,
                        num_stages=1, MERGE_M=16, MERGE_D=16)


# (lens, n_q, H, n_kv, hd, D): GQA groups 1 / 2 / 4 / 8, one document, empty and one-token segments, lengths that
# are not a multiple of the block
SHAPES = [
    pytest.param(([37], 2, 4, 4, 16, 32), id="one-doc-grp1"),
    pytest.param(([5, 0, 1, 23, 40], 3, 4, 2, 16, 32), id="empty-one-tok-grp2"),
    pytest.param(([0, 19, 1, 0], 2, 8, 2, 16, 48), id="edge-empties-grp4"),
    pytest.param(([33, 2, 17], 1, 8, 1, 24, 40), id="odd-widths-grp8"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["absorbed", "plain"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_and_dsplit_configs(shape, mode, dtype):
    """Every split / D-split combination, incl. splits that leave an empty tail (split_len * n_splits covers more
    than the longest segment, and shorter segments end before later splits start)."""
    lens, n_q, H, n_kv, hd, D = shape
    p = make_problem(lens, n_q=n_q, H=H, n_kv=n_kv, hd=hd, D=D, dtype=dtype, seed=11)
    ref = ref64(p)
    L = p["max_seqlen"]
    dk = 1 << max(4, (D if mode == "absorbed" else hd) - 1).bit_length()
    rows = n_q * H if mode == "absorbed" else n_q * (H // n_kv)
    bm = 16 if rows <= 16 else 32
    for split_len, dv in ((1 << 20, dk), (16, dk), (16, 16), (32, dk // 2 if dk >= 32 else dk)):
        cfg = _cfg(bm, 16, dk, dv, split_len, L)
        out = _triton(p, mode, cfg)
        assert_close(f"{mode} split_len={split_len} dv={dv}", out, ref, **READOUT[dtype])
        for s, n in enumerate(lens):
            if n == 0:
                assert torch.count_nonzero(out[s]) == 0


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rstd_in_kernel_equals_given(dtype):
    """Absorbed form without ctx_rstd computes the statistic in the kernel; it matches a given rstd and the
    reference (several column chunks: D = 160 > RSTD_CHUNK, padded to 256)."""
    p = make_problem([9, 0, 41, 1], n_q=2, H=4, n_kv=2, hd=16, D=160, dtype=dtype, seed=12)
    ref = ref64(p)
    cfg = _cfg(16, 16, 256, 256, 16, p["max_seqlen"])
    inside = _triton(p, "absorbed", cfg)
    given = _triton(p, "absorbed", cfg, rstd=compute_rstd(p["ctx"], 1e-6))
    assert_close("rstd in kernel", inside, ref, **READOUT[dtype])
    assert_close("rstd in kernel vs given", inside.float(), given.float(), **READOUT[dtype])


@pytest.mark.interpreter
def test_ctx_rstd_kernel():
    g = torch.Generator().manual_seed(0)
    for T, D in ((1, 16), (37, 40), (5, 600)):
        x = torch.randn(T, D, generator=g) * 3
        assert_close("rstd", ctx_rstd_fwd(x, 1e-6), compute_rstd(x, 1e-6), atol=1e-6, rtol=1e-5)
        xt = torch.randn(D, T, generator=g).t()  # strided rows
        assert_close("rstd strided", ctx_rstd_fwd(xt, 1e-5), compute_rstd(xt, 1e-5), atol=1e-6, rtol=1e-5)
    assert ctx_rstd_fwd(torch.zeros(0, 8), 1e-6).shape == (0,)
    with pytest.raises(ValueError, match=r"ctx must be a 2-D tensor \[T, D\], got torch.Size\(\[3\]\)"):
        ctx_rstd_fwd(torch.zeros(3), 1e-6)


@pytest.mark.interpreter
def test_attend_rejects_narrow_rstd_block():
    q = torch.zeros(1, 1, 4, 40)
    k = torch.zeros(5, 40)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"in-kernel rstd needs BLOCK_DK >= dk \(40\), got 32"):
        readout_attend_fwd(q, k[None], None, None, cu, 5, 1.0, eps=1e-6, cfg=_cfg(16, 16, 32, 32, 16, 5))


@pytest.mark.interpreter
def test_public_op_default_config():
    """The public op on the Triton path (its own config; long segment -> splits) against the reference."""
    p = make_problem([300, 0, 7], n_q=2, H=4, n_kv=2, hd=16, D=32, seed=13)
    for mode in ("absorbed", "plain"):
        out = latent_readout(p["q"], p["ctx"], p["cu_seqlens"], p["max_seqlen"], p["k_weight"], p["v_weight"],
                             p["ctx_norm_weight"], n_kv_heads=2, mode=mode, backend="triton")  # fmt: skip
        assert_close(mode, out, ref64(p), **READOUT[torch.float32])


# ------------------------------------------------------------------------------------------ GPU configs (pure)
def _gpu_cfg(*args, **kw):
    with mock.patch.object(rc, "interpreting", lambda: False), mock.patch.object(rc, "sm_count", lambda d: 132):
        return pick_config(*args, torch.bfloat16, torch.device("cuda", 0), **kw)


@pytest.mark.parametrize("n_seg,groups,rows,dim,L,shared,inside", [
    (26, 1, 128, 512, 2000, True, False),  # Gemma main config, absorbed, rstd given
    (26, 1, 128, 512, 2000, True, True),  # the same, rstd in the kernel
    (16, 1, 128, 512, 256, True, True),
    (1, 1, 128, 512, 2048, True, False),  # one long document: context splits
    (26, 4, 832, 128, 2000, False, False),  # NIAH, plain: 832 packed rows per KV head
    (104, 4, 32, 128, 8, False, False),  # the decoder: 8 tokens per segment
    (3, 2, 5, 40, 1, False, False),
])  # fmt: skip
def test_gpu_pick_config_invariants(n_seg, groups, rows, dim, L, shared, inside):
    cfg = _gpu_cfg(n_seg, groups, rows, dim, L, shared_kv=shared, rstd_in_kernel=inside)
    assert cfg.BLOCK_DK >= dim and cfg.BLOCK_DK >= 16 and cfg.BLOCK_M >= 16 and cfg.BLOCK_N >= 16
    assert cfg.BLOCK_M * cfg.BLOCK_DV <= 32768, "fp32 accumulator over the register budget"
    assert cfg.BLOCK_DV >= 16 and cfg.BLOCK_DK % cfg.BLOCK_DV == 0
    assert cfg.split_len % cfg.BLOCK_N == 0
    assert cfg.n_splits * cfg.split_len >= L and (cfg.n_splits - 1) * cfg.split_len < max(L, 1)
    if dim >= 512 and inside and cfg.BLOCK_DV == cfg.BLOCK_DK:
        assert cfg.BLOCK_N == 32, "full-width tiles with the in-kernel rstd spill at BLOCK_N 64 on sm_90"
    if cfg.BLOCK_DV < cfg.BLOCK_DK:
        assert n_seg * groups * -(-rows // cfg.BLOCK_M) < 132, "a D split only while row tiles cannot fill the SMs"


def test_gpu_pick_config_shapes():
    main = _gpu_cfg(26, 1, 128, 512, 2000, shared_kv=True, rstd_in_kernel=False)
    assert main.BLOCK_M == 64  # two row tiles of the 128 packed rows
    niah = _gpu_cfg(26, 4, 832, 128, 2000)
    assert (niah.BLOCK_M, niah.n_splits, niah.num_warps) == (128, 1, 8)
    one = _gpu_cfg(1, 1, 128, 512, 2048, shared_kv=True)
    assert one.n_splits * (one.BLOCK_DK // one.BLOCK_DV) >= 8, "one long document must spread over the SMs"


# ------------------------------------------------------------------------------------------ backward dispatch guard
def test_backward_op_under_excluded_autograd():
    """The backward op recomputes with autograd; called below the autograd keys (as inside another op's
    implementation) it must still produce the reference gradients, not zeros."""
    p = make_problem([5, 0, 9], n_q=2, H=4, n_kv=2, hd=8, D=16, seed=14)
    names = ["q", "ctx", "k_weight", "v_weight", "ctx_norm_weight"]
    ref_leaves = {n: p[n].double().requires_grad_() for n in names}
    grad = torch.randn(p["q"].shape, generator=torch.Generator().manual_seed(2))
    run_ref(dict(p, **ref_leaves)).backward(grad.double())
    for mode in ("absorbed", "plain"):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            probe = torch.ones(1, requires_grad=True)
            assert not (probe * 2).requires_grad, "autograd dispatch should be excluded here"
            got = torch.ops.d2l_fast.latent_readout_backward(
                grad, p["q"], p["ctx"], p["cu_seqlens"], p["k_weight"], p["v_weight"], p["ctx_norm_weight"], None,
                2, 1e-6, 1.0 / math.sqrt(8), mode, [True] * 5 + [False],
            )  # fmt: skip
        for n, g in zip(names, got):
            assert_close(f"{mode} d{n}", g, ref_leaves[n].grad, **READOUT_GRAD)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["absorbed", "plain"])
def test_gpu_configs_at_main_shape(mode):
    """On CUDA (compiled kernels): pick_config's choice, the GPU suite's alternative full-width configs, rstd on the
    device vs given, at the Gemma main config (bf16) against the fp64 reference."""
    from .._numerics import CUDA_KERNEL

    p = make_problem([2000] * 4 + [37, 0, 1], n_q=8, H=16, n_kv=4, hd=128, D=512, dtype=torch.bfloat16, device="cuda")
    p64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in p.items()}
    ref = run_ref(p64).float()
    cfgs = [None]
    if mode == "absorbed":
        cfgs += [KernelConfig(64, 32, 512, 512, 2, 1024, num_warps=8, num_stages=2),
                 KernelConfig(64, 32, 512, 512, 5, 448, num_warps=8, num_stages=2)]
    rstd = compute_rstd(p["ctx"], 1e-6)
    for cfg in cfgs:
        for given in (None, rstd):
            out = _triton(p, mode, cfg, rstd=given).float()
            rms = ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
            assert rms < CUDA_KERNEL["bf16"]["rms"], (cfg, given is not None, rms)
