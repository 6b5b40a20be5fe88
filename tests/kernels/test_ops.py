"""One path into the kernels: the public functionals call the torch.library custom ops under torch.compile and the
same forward/backward functions in eager mode. Checks: the ops' schema / fake / autograd registration
(torch.library.opcheck), the compiled public functions (fullgraph, the op as a graph node) against eager and the
fp64 reference with gradients, the in-place variant on non-contiguous inputs, validation, the deprecated aliases."""

from __future__ import annotations

import math

import pytest
import torch

from d2l_fast.kernels import ops
from d2l_fast.kernels.latent_readout import compute_rstd, latent_readout, latent_readout_ref
from d2l_fast.kernels.segmented_lora import SegmentMeta, segmented_lora, segmented_lora_, segmented_lora_ref

from .._numerics import OPS as OPS_TOL
from .._numerics import READOUT_GRAD, seg_fp32
from .._numerics import assert_close as assert_close_tensors
from .test_latent_readout import make_problem as readout_problem
from .test_segmented_lora import make_problem as lora_problem

LORA = ([5, 0, 1, 17, 3], [0, 1, -1, 2, 0], [8, 16, 24], 40, 24)
READOUT = dict(lens=[3, 0, 7, 5], n_q=2, H=4, n_kv=2, hd=8, D=24)
D2L_OPS = {"segmented_lora", "segmented_lora_", "segmented_lora_backward", "latent_readout", "latent_readout_backward"}


def _lora_args(meta, x, A, B, backend="torch"):
    return (x, A, B, list(meta.cu_seqlens_host), list(meta.rank_start_host), list(meta.rank_len_host), 0.5, backend)


def _lora_ref(x, A, B, meta, scale):
    """fp64 autograd through the executable spec (reference.py)."""
    x2, A, B = (t.double() for t in (x.reshape(-1, x.shape[-1]), A, B))
    y = segmented_lora_ref(x2, A, B, meta.cu_seqlens, meta.seg_rank_start, meta.seg_rank_len, scale, upcast=False)
    return y.reshape(*x.shape[:-1], B.shape[1])


def _readout(p, q, ctx, k_weight, **kw):
    return latent_readout(q, ctx, p["cu_seqlens"], p["max_seqlen"], k_weight, p["v_weight"], p["ctx_norm_weight"],
                          n_kv_heads=p["n_kv_heads"], **kw)  # fmt: skip


def _readout_ref(p, q, ctx, k_weight):
    return latent_readout_ref(q.double(), ctx.double(), p["cu_seqlens"], k_weight.double(), p["v_weight"].double(),
                              p["ctx_norm_weight"].double(), n_kv_heads=p["n_kv_heads"], upcast=False)  # fmt: skip


class _Capture:
    """A torch.compile backend that records the d2l_fast ops of every graph it is given, then runs it eagerly."""

    def __init__(self):
        self.graphs, self.ops = 0, []

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.ops += _d2l_ops(gm)
        return gm.forward


def _d2l_ops(gm) -> list[str]:
    """Names of the d2l_fast ops called in an FX graph (the target is an op packet or one of its overloads)."""
    targets = [str(n.target).split(".") for n in gm.graph.nodes if n.op == "call_function"]
    return [t[1] for t in targets if t[0] == "d2l_fast"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ registration
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_segmented_lora_opcheck(backend):
    meta, x, A, B = lora_problem(*LORA)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    torch.library.opcheck(torch.ops.d2l_fast.segmented_lora.default, _lora_args(meta, x, A, B, backend))
    out = torch.randn(x.shape[0], B.shape[1])
    torch.library.opcheck(torch.ops.d2l_fast.segmented_lora_.default,
                          (out,) + _lora_args(meta, x.detach(), A.detach(), B.detach(), backend))  # fmt: skip


@pytest.mark.parametrize("with_rstd", [False, True])
def test_latent_readout_opcheck(with_rstd):
    p = readout_problem(**READOUT)
    rstd = compute_rstd(p["ctx"], 1e-6).requires_grad_() if with_rstd else None
    args = (p["q"].clone().requires_grad_(), p["ctx"].clone().requires_grad_(), p["cu_seqlens"], p["max_seqlen"],
            p["k_weight"].clone().requires_grad_(), p["v_weight"], p["ctx_norm_weight"], rstd, p["n_kv_heads"], 1e-6,
            1.0 / math.sqrt(8), "absorbed", "torch")  # fmt: skip
    torch.library.opcheck(torch.ops.d2l_fast.latent_readout.default, args)


# ------------------------------------------------------------------------------------------ the compiled public API
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_segmented_lora_is_one_op_node_and_matches_reference(backend):
    """fullgraph: no break; the graph holds d2l_fast::segmented_lora; value and grads equal eager and fp64 ref."""
    meta, x, A, B = lora_problem(*LORA)
    x = x.reshape(1, *x.shape)  # [..., d_in] leading dims, as a model passes them
    dy = torch.randn(*x.shape[:-1], B.shape[1], generator=torch.Generator().manual_seed(1))

    def f(x, A, B):
        return segmented_lora(x, A, B, meta, 0.5)

    cap = _Capture()
    compiled = torch.compile(f, fullgraph=True, backend=cap if backend == "eager" else backend)
    leaves = {k: [t.clone().requires_grad_() for t in (x, A, B)] for k in ("compiled", "eager", "ref")}
    ys = {"compiled": compiled(*leaves["compiled"]), "eager": f(*leaves["eager"]),
          "ref": _lora_ref(*leaves["ref"], meta, 0.5)}  # fmt: skip
    for y in ys.values():
        (y * dy.to(y.dtype)).sum().backward()
    if backend == "eager":
        assert cap.graphs == 1 and cap.ops == ["segmented_lora"], (cap.graphs, cap.ops)
    tol = seg_fp32(max(LORA[2]))
    assert_close_tensors("compiled vs eager delta", ys["compiled"], ys["eager"], **OPS_TOL)
    assert_close_tensors("compiled vs fp64 reference", ys["compiled"], ys["ref"], **tol)
    for i, name in enumerate("xAB"):
        got = leaves["compiled"][i].grad
        assert_close_tensors(f"compiled vs eager d{name}", got, leaves["eager"][i].grad, **OPS_TOL)
        assert_close_tensors(f"compiled vs fp64 reference d{name}", got, leaves["ref"][i].grad,
                             **seg_fp32(max(LORA[3], LORA[4])))  # fmt: skip


def test_compiled_in_place_variant_on_noncontiguous_input():
    """segmented_lora_ compiled (fullgraph, d2l_fast::segmented_lora_ in the graph) on a strided x updates out."""
    meta, x, A, B = lora_problem(*LORA)
    wide = torch.randn(x.shape[0], 2 * x.shape[1], generator=torch.Generator().manual_seed(2))
    xs = wide[:, ::2]  # non-contiguous rows
    assert not xs.is_contiguous()
    base = torch.randn(1, x.shape[0], B.shape[1], generator=torch.Generator().manual_seed(3))

    def f(out, x):
        return segmented_lora_(out, x, A, B, meta, 0.5)

    cap = _Capture()
    out_c, out_e = base.clone(), base.clone()
    with torch.no_grad():
        torch.compile(f, fullgraph=True, backend=cap)(out_c, xs.unsqueeze(0))
        f(out_e, xs.unsqueeze(0))
    assert cap.graphs == 1 and cap.ops == ["segmented_lora_"], (cap.graphs, cap.ops)
    want = base.double() + _lora_ref(xs, A, B, meta, 0.5)
    assert_close_tensors("compiled in place vs eager", out_c, out_e, **OPS_TOL)
    assert_close_tensors("compiled in place vs fp64 reference", out_c, want, **seg_fp32(max(LORA[2])))


@pytest.mark.parametrize("with_rstd", [False, True])
def test_compiled_latent_readout_matches_eager_and_reference(with_rstd):
    p = readout_problem(**READOUT)
    rstd0 = compute_rstd(p["ctx"], 1e-6) if with_rstd else None

    def f(q, ctx, k_weight, rstd):
        return _readout(p, q, ctx, k_weight, ctx_rstd=rstd, mode="absorbed")

    cap = _Capture()
    compiled = torch.compile(f, fullgraph=True, backend=cap)
    grad = torch.randn(p["q"].shape, generator=torch.Generator().manual_seed(4))
    got = {}
    for name, fn in (("compiled", compiled), ("eager", f)):
        leaves = [t.clone().requires_grad_() for t in (p["q"], p["ctx"], p["k_weight"])]
        rstd = rstd0.clone().requires_grad_() if with_rstd else None
        out = fn(*leaves, rstd)
        (out * grad).sum().backward()
        got[name] = (out, *(t.grad for t in leaves), None if rstd is None else rstd.grad)
    assert cap.graphs == 1 and cap.ops == ["latent_readout"], (cap.graphs, cap.ops)
    for i, name in enumerate(["out", "dq", "dctx", "dk_weight", "drstd"]):
        if got["eager"][i] is not None:
            assert_close_tensors(f"compiled vs eager {name}", got["compiled"][i], got["eager"][i], **OPS_TOL)
    # gradients against fp64 autograd through the reference (which recomputes rstd itself: no drstd there)
    leaves = [t.clone().double().requires_grad_() for t in (p["q"], p["ctx"], p["k_weight"])]
    (_readout_ref(p, *leaves) * grad.double()).sum().backward()
    if not with_rstd:  # with a given rstd, dctx excludes the path through rstd
        for i, name in ((1, "dq"), (2, "dctx"), (3, "dk_weight")):
            assert_close_tensors(f"compiled vs fp64 reference {name}", got["compiled"][i], leaves[i - 1].grad,
                                 **READOUT_GRAD)  # fmt: skip


def test_compiled_lora_linear_then_readout_has_no_graph_break():
    """A LoRA'd linear followed by a readout: one graph (torch._dynamo.explain), both ops in it."""
    meta, x, A, B = lora_problem(*LORA)
    W = torch.randn(24, 40) / math.sqrt(40)
    p = readout_problem(**READOUT)

    def f(x, A, q):
        y = x @ W.T + segmented_lora(x, A, B, meta, 0.5)
        r = _readout(p, q, p["ctx"], p["k_weight"])
        return y.square().sum() + r.square().sum()

    explained = torch._dynamo.explain(f)(x, A, p["q"])
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert _d2l_ops(explained.graphs[0]) == ["segmented_lora", "latent_readout"]


# ------------------------------------------------------------------------------------------ validation and aliases
def test_validation_is_the_same_compiled_and_eager():
    meta, x, A, B = lora_problem(*LORA)
    # compiled: dynamo stops at the raise and runs the function eagerly, which raises the same error
    for fn in (segmented_lora, torch.compile(segmented_lora, backend="eager")):
        torch._dynamo.reset()
        with pytest.raises(ValueError, match="meta.n_tokens must equal x.shape"):
            fn(x[:3], A, B, meta)
        bad = SegmentMeta.from_lengths([2], [0], [0, 8])
        with pytest.raises(ValueError):
            fn(x, A, B, bad)
    with pytest.raises(TypeError, match="meta must be a SegmentMeta"):
        segmented_lora(x, A, B, "meta")
    with pytest.raises(ValueError, match="out must have leading shape"):
        segmented_lora_(torch.zeros(3, B.shape[1]), x, A, B, meta)
    p = readout_problem(**READOUT)
    with pytest.raises(ValueError, match="mode must be one of"):
        _readout(p, p["q"], p["ctx"], p["k_weight"], mode="fast")


def test_deprecated_op_names_are_the_public_functionals():
    assert ops.segmented_lora_op is segmented_lora
    assert ops.segmented_lora_op_ is segmented_lora_
    assert ops.latent_readout_op is latent_readout
    assert D2L_OPS <= {name.split("::")[1] for name in _registered_d2l_ops()}


def _registered_d2l_ops():
    return [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("d2l_fast::")]
