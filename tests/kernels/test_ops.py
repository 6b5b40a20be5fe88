"""The kernels as torch.library custom ops: schema / fake / autograd registration (torch.library.opcheck),
equality with the functional API, and torch.compile(fullgraph=True) tracing through both ops."""

from __future__ import annotations

import math

import pytest
import torch

from d2l_fast.kernels.latent_readout import latent_readout
from d2l_fast.kernels.ops import latent_readout_op, segmented_lora_op, segmented_lora_op_
from d2l_fast.kernels.segmented_lora import SegmentMeta, segmented_lora

from .._numerics import OPS as OPS_TOL
from .._numerics import assert_close as assert_close_tensors
from .test_latent_readout import make_problem as readout_problem
from .test_segmented_lora import make_problem as lora_problem

LORA = ([5, 0, 1, 17, 3], [0, 1, -1, 2, 0], [8, 16, 24], 40, 24)


def _lora_args(meta, x, A, B, backend="torch"):
    return (x, A, B, list(meta.cu_seqlens_host), list(meta.rank_start_host), list(meta.rank_len_host), 0.5, backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_segmented_lora_opcheck(backend):
    meta, x, A, B = lora_problem(*LORA)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    torch.library.opcheck(torch.ops.d2l_fast.segmented_lora.default, _lora_args(meta, x, A, B, backend))
    out = torch.randn(x.shape[0], B.shape[1])
    torch.library.opcheck(torch.ops.d2l_fast.segmented_lora_.default,
                          (out,) + _lora_args(meta, x.detach(), A.detach(), B.detach(), backend))


def test_segmented_lora_op_equals_functional_with_grads():
    meta, x, A, B = lora_problem(*LORA)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    dy = torch.randn(x.shape[0], B.shape[1], generator=torch.Generator().manual_seed(1))
    y = segmented_lora_op(*leaves, meta, 0.5)
    y_ref = segmented_lora(*ref_leaves, meta, 0.5)
    assert_close_tensors("op delta", y, y_ref, **OPS_TOL)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    for name, a, b in zip("xAB", leaves, ref_leaves):
        assert_close_tensors(f"d{name}", a.grad, b.grad, **OPS_TOL)
    out = torch.randn(x.shape[0], B.shape[1])
    want = out + y_ref.detach()
    segmented_lora_op_(out, x, A, B, meta, 0.5)
    assert_close_tensors("in-place op", out, want, **OPS_TOL)


def test_compile_fullgraph_traces_through_both_ops():
    """One graph, no breaks: a LoRA'd linear followed by a readout, forward and backward (aot_eager)."""
    meta, x, A, B = lora_problem(*LORA)
    W = torch.randn(24, 40) / math.sqrt(40)
    p = readout_problem([3, 0, 7, 5], n_q=2, H=4, n_kv=2, hd=8, D=24)

    def f(x, A, q):
        y = x @ W.T + segmented_lora_op(x, A, B, meta, 0.5)
        r = latent_readout_op(q, p["ctx"], p["cu_seqlens"], p["max_seqlen"], p["k_weight"], p["v_weight"],
                              p["ctx_norm_weight"], n_kv_heads=p["n_kv_heads"])
        return y.square().sum() + r.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_in = [t.clone().requires_grad_() for t in (x, A, p["q"])]
    comp_in = [t.clone().requires_grad_() for t in (x, A, p["q"])]
    torch._dynamo.reset()
    v_eager, v_comp = f(*eager_in), compiled(*comp_in)
    assert_close_tensors("compiled value", v_comp, v_eager, **OPS_TOL)
    v_eager.backward()
    v_comp.backward()
    for name, a, b in zip(["x", "A", "q"], comp_in, eager_in):
        assert_close_tensors(f"compiled d{name}", a.grad, b.grad, **OPS_TOL)


@pytest.mark.parametrize("with_rstd", [False, True])
def test_latent_readout_op_opcheck_and_equality(with_rstd):
    from d2l_fast.kernels.latent_readout import compute_rstd

    p = readout_problem([3, 0, 7, 5], n_q=2, H=4, n_kv=2, hd=8, D=24)
    rstd = compute_rstd(p["ctx"], 1e-6).requires_grad_() if with_rstd else None
    q = p["q"].clone().requires_grad_()
    args = (q, p["ctx"].clone().requires_grad_(), p["cu_seqlens"], p["max_seqlen"],
            p["k_weight"].clone().requires_grad_(), p["v_weight"], p["ctx_norm_weight"], rstd, p["n_kv_heads"], 1e-6,
            1.0 / math.sqrt(8), "absorbed", "torch")
    torch.library.opcheck(torch.ops.d2l_fast.latent_readout.default, args)
    got = latent_readout_op(q, p["ctx"], p["cu_seqlens"], p["max_seqlen"], p["k_weight"], p["v_weight"],
                            p["ctx_norm_weight"], n_kv_heads=p["n_kv_heads"], ctx_rstd=rstd)
    want = latent_readout(q, p["ctx"], p["cu_seqlens"], p["max_seqlen"], p["k_weight"], p["v_weight"],
                          p["ctx_norm_weight"], n_kv_heads=p["n_kv_heads"], ctx_rstd=rstd)
    assert_close_tensors("readout op", got, want, **OPS_TOL)


def test_op_inputs_are_validated():
    meta, x, A, B = lora_problem(*LORA)
    with pytest.raises(TypeError, match="meta must be a SegmentMeta"):
        segmented_lora_op(x, A, B, "meta")
    with pytest.raises(ValueError, match="meta.n_tokens must equal x.shape"):
        segmented_lora_op(x[:3], A, B, meta)
    bad = SegmentMeta.from_lengths([2], [0], [0, 8])
    with pytest.raises(ValueError):
        segmented_lora_op(x, A, B, bad)
