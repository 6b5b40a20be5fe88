"""Spec §5.1 objectives: the chunked lm_head losses against the plain unchunked references (values and gradients).

Tolerances: the chunked path and the reference are both run in fp64 (the chunked path computes in fp64 for fp64
inputs), so they agree to rounding of a few reordered sums (|loss| ≲ 10, V ≤ 257): 1e-10 leaves margin and still
fails on any structural mistake (a missing weight, a wrong shift, a dropped softcap derivative moves values by
≥ 1e-3). The fp32 test compares against fp64 with 1e-5 (fp32 rounding of logsumexp over ≤ 257 logits).
"""

import pytest
import torch

from d2l_fast import AdapterBatch, merge_chunk_loras
from d2l_fast.training import (
    answer_tokens,
    cross_entropy_loss,
    distillation_loss,
    lora_l1_norm,
    per_context_weights,
    per_token_weights,
    qa_loss,
)
from d2l_fast.training.reference import (
    cross_entropy_token_loss_ref,
    distillation_token_loss_ref,
    lora_l1_ref,
    packed_qa_loss_ref,
    per_context_average_ref,
)

from .._numerics import LIGER_GRAD, LIGER_LOSS, LOSS_F32, LOSS_F64, LOSS_STORED_F32

F64, F32 = LOSS_F64, LOSS_F32


def _teacher(N, K, V, gen, *, neg_inf=False):
    idx = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(N)]) if N else torch.zeros(0, K).long()
    lp = torch.log_softmax(torch.randn(N, K + 3, generator=gen, dtype=torch.float64), -1)[:, :K]  # not renormalised
    if neg_inf and N:
        lp[::3, -1] = float("-inf")
    return lp, idx


def _head(N, H, V, gen, dtype=torch.float64, bias=False):
    h = torch.randn(N, H, generator=gen, dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=gen, dtype=dtype) / H**0.5).requires_grad_()
    b = (torch.randn(V, generator=gen, dtype=dtype) * 0.1).requires_grad_() if bias else None
    return h, w, b


def _grads(loss, *ts):
    return torch.autograd.grad(loss, [t for t in ts if t is not None])


CASES = [
    pytest.param(37, 24, 101, 16, 16, None, False, False, id="N37-V101-K16-chunk16"),
    pytest.param(37, 24, 101, 1, 5, None, False, False, id="k1-chunk5"),
    pytest.param(20, 8, 257, 4, 1, None, True, False, id="chunk1-bias"),
    pytest.param(20, 8, 64, 16, 64, 3.0, False, True, id="chunk>N-softcap-neginf"),
    pytest.param(30, 16, 50, 8, 7, 2.0, True, True, id="softcap-bias-neginf-chunk7"),
]


@pytest.mark.parametrize("N,H,V,K,chunk,softcap,bias,neg_inf", CASES)
def test_distillation_matches_reference(N, H, V, K, chunk, softcap, bias, neg_inf):
    gen = torch.Generator().manual_seed(N * V + K)
    h, w, b = _head(N, H, V, gen, bias=bias)
    lp, idx = _teacher(N, K, V, gen, neg_inf=neg_inf)
    tw = torch.rand(N, generator=gen, dtype=torch.float64).float()  # arbitrary, non-uniform token weights
    out = distillation_loss(h, w, lp, idx, tw, bias=b, softcap=softcap, chunk_size=chunk)
    ref_tok = distillation_token_loss_ref(h, w, lp, idx, bias=b, softcap=softcap)
    ref = (ref_tok * tw.double()).sum()
    assert out.n_tokens == N and torch.isfinite(out.loss)
    torch.testing.assert_close(out.token_loss.double(), ref_tok.detach(), **LOSS_STORED_F32)  # stored as fp32
    torch.testing.assert_close(out.loss.double(), ref.detach(), **LOSS_STORED_F32)
    for name, g, gr in zip("hwb", _grads(out.loss, h, w, b), _grads(ref, h, w, b)):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, gr.to(g.dtype), **F64, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("N,H,V,K,chunk,softcap,bias,neg_inf", CASES)
def test_cross_entropy_matches_reference(N, H, V, K, chunk, softcap, bias, neg_inf):
    gen = torch.Generator().manual_seed(N + V)
    h, w, b = _head(N, H, V, gen, bias=bias)
    tgt = torch.randint(0, V, (N,), generator=gen)
    tw = torch.rand(N, generator=gen).float()
    out = cross_entropy_loss(h, w, tgt, tw, bias=b, softcap=softcap, chunk_size=chunk)
    ref_tok = cross_entropy_token_loss_ref(h, w, tgt, bias=b, softcap=softcap)
    ref = (ref_tok * tw.double()).sum()
    torch.testing.assert_close(out.token_loss.double(), ref_tok.detach(), **LOSS_STORED_F32)
    torch.testing.assert_close(out.loss.double(), ref.detach(), **LOSS_STORED_F32)
    for name, g, gr in zip("hwb", _grads(out.loss, h, w, b), _grads(ref, h, w, b)):
        torch.testing.assert_close(g, gr.to(g.dtype), **F64, msg=lambda m, name=name: f"grad {name}: {m}")


def test_fp32_against_fp64_reference_and_noncontiguous_hidden():
    gen = torch.Generator().manual_seed(3)
    h64, w64, _ = _head(40, 32, 130, gen)
    lp, idx = _teacher(20, 16, 130, gen)
    full = h64.detach().float()[::2].requires_grad_()  # a strided view: rows 0, 2, 4, ...
    w = w64.detach().float().requires_grad_()
    tw = torch.full((20,), 0.05)
    out = distillation_loss(full, w, lp.float(), idx, tw, chunk_size=6)
    ref = (distillation_token_loss_ref(h64[::2], w64, lp, idx) * 0.05).sum()
    torch.testing.assert_close(out.loss.double(), ref.detach(), **F32)
    for g, gr in zip(_grads(out.loss, full, w), _grads(ref, h64, w64)):
        gr = gr[::2] if gr.shape[0] == 40 else gr
        torch.testing.assert_close(g.double(), gr, **F32)


def test_grad_scales_with_upstream_gradient():
    gen = torch.Generator().manual_seed(4)
    h, w, _ = _head(9, 8, 33, gen)
    tgt = torch.randint(0, 33, (9,), generator=gen)
    tw = torch.rand(9, generator=gen)
    (gh,) = torch.autograd.grad(3.5 * cross_entropy_loss(h, w, tgt, tw, chunk_size=4).loss, h)
    (gr,) = torch.autograd.grad(3.5 * (cross_entropy_token_loss_ref(h, w, tgt) * tw.double()).sum(), h)
    torch.testing.assert_close(gh, gr, **F64)


def test_empty_answer_set_gives_zero_loss_and_gradient():
    gen = torch.Generator().manual_seed(5)
    h, w, _ = _head(0, 8, 33, gen)
    lp, idx = _teacher(0, 4, 33, gen)
    for out in (distillation_loss(h, w, lp, idx, torch.zeros(0)), cross_entropy_loss(h, w, torch.zeros(0).long(),
                                                                                      torch.zeros(0))):
        assert out.loss.item() == 0.0 and out.n_tokens == 0
        (gw,) = torch.autograd.grad(out.loss, w)
        assert torch.count_nonzero(gw) == 0


def test_no_grad_mode_skips_gradients_and_matches():
    gen = torch.Generator().manual_seed(6)
    h, w, _ = _head(12, 8, 40, gen)
    tgt = torch.randint(0, 40, (12,), generator=gen)
    with torch.no_grad():
        out = cross_entropy_loss(h, w, tgt, torch.ones(12), chunk_size=5)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss.double(), cross_entropy_token_loss_ref(h, w, tgt).sum().detach(), **F32)


def test_answer_tokens_example_and_errors():
    at = answer_tokens(torch.tensor([-100, -100, 7, 8, -100, 9]), [0, 4, 6])
    assert at.positions.tolist() == [1, 2, 4] and at.targets.tolist() == [7, 8, 9] and at.qa_lengths == [2, 1]
    at = answer_tokens(torch.tensor([-100, -100, -100, 5]), [0, 2, 2, 4])  # an empty QA sequence in the middle
    assert at.qa_lengths == [0, 0, 1] and at.positions.tolist() == [2]
    with pytest.raises(ValueError, match="first position of a QA"):
        answer_tokens(torch.tensor([-100, 3, 4, -100]), [0, 2, 4])
    with pytest.raises(ValueError, match="rise from 0 to the 4 labels"):
        answer_tokens(torch.tensor([-100, 3, 4, -100]), [0, 2, 5])
    with pytest.raises(ValueError, match="token ids ≥ 0 or -100"):
        answer_tokens(torch.tensor([-100, -5]), [0, 2])
    with pytest.raises(ValueError, match="1-D integer tensor"):
        answer_tokens(torch.tensor([0.0, 1.0]), [0, 2])


def test_per_context_weights_hand_computed():
    # ctx0: QAs of 2 and 1 answer tokens; ctx1: an empty QA and one of 3 tokens; 4 contexts in the window
    w = per_context_weights([2, 1, 0, 3], [2, 2], 4)
    assert w.tolist() == pytest.approx([1 / 16, 1 / 16, 1 / 8, 1 / 12, 1 / 12, 1 / 12])
    # every context's weights sum to 1 / n_ctx_window (a context without tokens: 0)
    assert per_context_weights([0, 0, 5], [2, 1], 3).tolist() == pytest.approx([1 / 15] * 5)
    assert per_token_weights(3, 10).tolist() == pytest.approx([0.1] * 3)
    with pytest.raises(ValueError, match="sum to the 4 QA"):
        per_context_weights([2, 1, 0, 3], [2, 1], 4)
    with pytest.raises(ValueError, match="n_ctx_window must be an int ≥ the 2 contexts"):
        per_context_weights([2, 1, 0, 3], [2, 2], 1)
    with pytest.raises(ValueError, match="n_labels_window must be an int ≥ the 3"):
        per_token_weights(3, 2)
    with pytest.raises(ValueError, match="must hold integers"):
        per_context_weights([2.5], [1], 1)


def _packed_row(gen, V):
    # 3 contexts: ctx0 has 2 QAs, ctx1 has 1 QA without an answer token, ctx2 has 2 QAs; spans cross chunk edges
    qa_lens = [9, 7, 5, 11, 6]
    ans = [(4, 9), (3, 6), None, (2, 11), (5, 6)]  # answer span [start, end) inside each QA sequence
    labels = []
    for n, span in zip(qa_lens, ans):
        seq = [-100] * n
        if span:
            for t in range(*span):
                seq[t] = int(torch.randint(0, V, (1,), generator=gen))
        labels += seq
    cu = [0]
    for n in qa_lens:
        cu.append(cu[-1] + n)
    return torch.tensor(labels), cu, [2, 1, 2]


@pytest.mark.parametrize("objective", ["distill", "ce"])
@pytest.mark.parametrize("average", ["context", "token"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_packed_qa_loss_matches_reference(objective, average, softcap):
    gen = torch.Generator().manual_seed(7)
    V, H = 97, 16
    labels, cu, nq = _packed_row(gen, V)
    T = len(labels)
    h, w, _ = _head(T, H, V, gen)
    N = int((labels != -100).sum())
    lp, idx = _teacher(N, 5, V, gen, neg_inf=True)
    win = dict(n_ctx_window=5) if average == "context" else dict(n_labels_window=N + 4)
    kw = dict(objective=objective, teacher_logprobs=lp, teacher_indices=idx, average=average, softcap=softcap, **win)
    out = qa_loss(h, w, labels, cu, nq, chunk_size=4, **kw)
    ref = packed_qa_loss_ref(h, w, labels, cu, nq, **kw)
    torch.testing.assert_close(out.loss.double(), ref.detach(), **LOSS_STORED_F32)
    for name, g, gr in zip("hw", _grads(out.loss, h, w), _grads(ref, h, w)):
        torch.testing.assert_close(g, gr, **F64, msg=lambda m, name=name: f"grad {name}: {m}")
    # the hidden states of positions that predict no answer token get no gradient
    (gh,) = torch.autograd.grad(qa_loss(h, w, labels, cu, nq, chunk_size=4, **kw).loss, h)
    predicting = torch.zeros(T, dtype=torch.bool)
    predicting[torch.nonzero(labels != -100).flatten() - 1] = True
    assert torch.count_nonzero(gh[~predicting]) == 0 and torch.count_nonzero(gh[predicting]) > 0


def test_packed_default_window_is_the_row_and_batched_shapes_accepted():
    gen = torch.Generator().manual_seed(8)
    V, H = 40, 8
    labels, cu, nq = _packed_row(gen, V)
    h, w, _ = _head(len(labels), H, V, gen)
    out = qa_loss(h[None], w, labels[None], cu, nq, objective="ce")
    tl = cross_entropy_token_loss_ref(h[torch.nonzero(labels != -100).flatten() - 1], w, labels[labels != -100])
    ref = per_context_average_ref(tl, [5, 3, 0, 9, 1], nq, 3)
    torch.testing.assert_close(out.loss.double(), ref.detach(), **F32)


def test_loss_input_errors():
    gen = torch.Generator().manual_seed(9)
    h, w, _ = _head(6, 8, 20, gen)
    lp, idx = _teacher(6, 4, 20, gen)
    tw = torch.ones(6)
    with pytest.raises(ValueError, match=r"lm_head weight must be \[V, 8\]"):
        distillation_loss(h, w[:, :7], lp, idx, tw)
    with pytest.raises(ValueError, match="share a floating dtype"):
        distillation_loss(h, w.float(), lp, idx, tw)
    with pytest.raises(ValueError, match=r"teacher_logprobs must be \[N=6, K≥1\], got \(5, 4\)"):
        distillation_loss(h, w, lp[:5], idx, tw)
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(h, w, lp[:, :3], idx, tw)
    with pytest.raises(ValueError, match=r"token ids in \[0, 20\), got range"):
        distillation_loss(h, w, lp, idx + 19, tw)
    with pytest.raises(ValueError, match=r"token_weight must be a floating \[N=6\]"):
        distillation_loss(h, w, lp, idx, torch.ones(5))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        cross_entropy_loss(h, w, torch.zeros(6).long(), tw, chunk_size=0)
    with pytest.raises(ValueError, match=r"targets must be an integer \[N=6\]"):
        cross_entropy_loss(h, w, torch.zeros(6), tw)
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        cross_entropy_loss(h, w, torch.zeros(6).long(), tw, softcap=-1.0)
    with pytest.raises(ValueError, match="use_liger=True needs a CUDA input"):
        cross_entropy_loss(h, w, torch.zeros(6).long(), tw, use_liger=True)
    with pytest.raises(ValueError, match="objective must be"):
        qa_loss(h, w, torch.full((6,), -100), [0, 6], [1], objective="kl")
    with pytest.raises(ValueError, match="needs teacher_logprobs"):
        qa_loss(h, w, torch.tensor([-100, 1, -100, -100, -100, -100]), [0, 6], [1])


def test_no_full_logits_are_allocated():
    """The largest single allocation of the chunked loss is one [chunk, V] block, not [N, V]."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(10)
    N, H, V, chunk = 256, 16, 2048, 32
    h, w, _ = _head(N, H, V, gen, dtype=torch.float32)
    lp, idx = _teacher(N, 16, V, gen)

    def biggest(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max(e.self_cpu_memory_usage for e in prof.events())

    def chunked():
        torch.autograd.grad(distillation_loss(h, w, lp.float(), idx, torch.ones(N), chunk_size=chunk).loss, [h, w])

    def full():
        torch.autograd.grad(distillation_token_loss_ref(h, w, lp.float(), idx).sum(), [h, w])

    assert biggest(full) >= N * V * 4  # the profiler does see a full [N, V] fp32 block in the reference
    assert biggest(chunked) <= chunk * V * 4


def _random_chunk_loras(gen, n_chunks, L=2, r=3, dims=(("down_proj", 7, 5), ("up_proj", 5, 7))):
    C = sum(n_chunks)
    loras = {m: {"A": torch.randn(C, L, r, di, generator=gen), "B": torch.randn(C, L, r, do, generator=gen)}
             for m, di, do in dims}
    bias = {m: {"A": torch.randn(L, r, di, generator=gen), "B": torch.randn(L, r, do, generator=gen)}
            for m, di, do in dims}
    return loras, bias


def test_l1_hand_computed():
    pad = {"down_proj": {"A": torch.ones(2, 2, 3, 4), "B": torch.full((2, 2, 3, 5), 2.0)}}
    # Σ_G |A| = 2 everywhere, Σ_G |B| = 4 everywhere → (2 + 4) / 1 module / 3 contexts
    assert lora_l1_norm(pad, 3).item() == pytest.approx(2.0)
    assert lora_l1_ref(pad, 3).item() == pytest.approx(2.0)


def test_l1_adapter_batch_matches_padded_reference_with_gradients():
    gen = torch.Generator().manual_seed(11)
    n_chunks = [1, 3, 2]
    loras, bias = _random_chunk_loras(gen, n_chunks)
    leaves = [t.requires_grad_() for d in loras.values() for t in d.values()]
    ab = merge_chunk_loras(loras, n_chunks, bias=bias, alpha=1.0, model_id="t", scalers=[0.5, 1, 2, 1, 1, 3])
    assert isinstance(ab, AdapterBatch) and max(ab.ranks) == (max(n_chunks) + 1) * 3
    padded = {m: dict(zip("AB", ab.to_padded(m))) for m in ab.modules}
    ours, ref = lora_l1_norm(ab, 5), lora_l1_ref(padded, 5)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(lora_l1_norm(padded, 5), ref)
    for g, gr in zip(torch.autograd.grad(ours, leaves, retain_graph=True), torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(g, gr)
    # a larger R_max (e.g. the reference's (max n_chunks + 1)·r without a bias LoRA) scales the mean down
    torch.testing.assert_close(lora_l1_norm(ab, 5, rank_rows=24), ref * 12 / 24)


def test_l1_errors():
    with pytest.raises(ValueError, match="n_ctx_window must be an int ≥ 1"):
        lora_l1_norm({"m": {"A": torch.ones(1, 1, 1, 1), "B": torch.ones(1, 1, 1, 1)}}, 0)
    with pytest.raises(ValueError, match=r"expected A \[G, L, R, d_in\]"):
        lora_l1_norm({"m": {"A": torch.ones(1, 1, 1), "B": torch.ones(1, 1, 1, 1)}}, 1)
    with pytest.raises(ValueError, match="AdapterBatch or a non-empty"):
        lora_l1_norm({}, 1)


@pytest.mark.gpu
def test_liger_cross_entropy_matches_chunked_on_cuda():
    pytest.importorskip("liger_kernel")
    gen = torch.Generator().manual_seed(12)
    h, w, _ = _head(300, 64, 1000, gen, dtype=torch.float32)
    h, w = h.detach().cuda().requires_grad_(), w.detach().cuda()
    tgt = torch.randint(0, 1000, (300,), generator=gen).cuda()
    tw = per_token_weights(300, 400, device="cuda")
    liger = cross_entropy_loss(h, w, tgt, tw, use_liger=True)
    ours = cross_entropy_loss(h, w, tgt, tw, use_liger=False)
    assert liger.token_loss is None
    torch.testing.assert_close(liger.loss, ours.loss, **LIGER_LOSS)
    torch.testing.assert_close(torch.autograd.grad(liger.loss, h)[0], torch.autograd.grad(ours.loss, h)[0],
                               **LIGER_GRAD)
