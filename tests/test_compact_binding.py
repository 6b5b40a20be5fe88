"""CPU bindings copy the rows' adapters out of a large resident batch into a compact one (D2LModel.bind)."""

import pytest
import torch

from d2l_fast import AdapterBatch

from ._numerics import BATCHED_LOGITS
from .test_native import QUESTIONS, build

NAN = float("nan")


@pytest.fixture(scope="module")
def model():
    return build("llama", seed=4)


def resident(model, ranks, dtype=torch.float32, seed=0, names=None) -> AdapterBatch:
    """Random adapters of the given ranks (0 allowed) for every target module, one AdapterBatch."""
    g = torch.Generator().manual_seed(seed)
    spec = model.spec
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    A = {m: (torch.randn(spec.num_layers, offs[-1], spec.d_in[m], generator=g) * 0.1).to(dtype)
         for m in spec.target_modules}
    B = {m: (torch.randn(spec.num_layers, offs[-1], spec.d_out[m], generator=g) * 0.01).to(dtype)
         for m in spec.target_modules}
    return AdapterBatch(A, B, offs, spec.lora_alpha, model.model_id, names)


def logits(model, adapters, index, ids, mask, compact=True):
    prev = model.compact_adapters
    model.compact_adapters = compact
    try:
        with torch.no_grad():
            return model(ids, mask, adapters=adapters, adapter_index=index).logits
    finally:
        model.compact_adapters = prev


def row_alone(model, adapters, k, ids, mask):
    """Row 0 of a batch of one with adapter k alone (a one-adapter batch is never compacted): the reference."""
    one = None if k < 0 else adapters.select([k])
    return logits(model, one, None if k < 0 else [0], ids, mask)[0]


RANKS = [4, 0, 1, 8, 4, 3, 4, 16, 2, 4, 5, 4]  # mixed, with a rank-0 and a rank-1 adapter


@pytest.mark.parametrize("index, compacted", [
    ([7, 2, 11, 1, 3], True),     # scattered, mixed ranks, a rank-0 adapter
    ([9, 9, 2, -1, 9], True),     # repeated indices and a row without adapter
    ([3, 2, 1, 0, 4], True),      # a permutation of a contiguous block
    ([5], False),                 # one row: its adapter is read in place
])
def test_compact_binding_matches_each_row_alone(model, index, compacted):
    ad = resident(model, RANKS)
    ids, mask = model.encode_prompts(QUESTIONS[: len(index)])
    keep = {m: t.clone() for m, t in ad.A.items()}
    with torch.no_grad(), model.bind(ad, index) as binding:
        used = list(dict.fromkeys(k for k in index if k >= 0))
        if compacted:
            assert len(binding.adapters) == len(used)  # only the used adapters, each once, in first-use order
            assert binding.adapters.ranks == [ad.ranks[k] for k in used]
            assert binding.row_adapter == [used.index(k) if k >= 0 else -1 for k in index]
        else:
            assert binding.adapters is ad and binding.row_adapter == index
        got = model.base_model(input_ids=ids, attention_mask=mask).logits
    assert all(torch.equal(keep[m], ad.A[m]) for m in keep)  # the caller's batch is untouched
    scattered = logits(model, ad, index, ids, mask, compact=False)
    v = mask.bool()
    torch.testing.assert_close(got[v], scattered[v], **BATCHED_LOGITS)
    for i, k in enumerate(index):
        alone_ids, alone_mask = ids[i : i + 1, mask[i].argmax():], mask[i : i + 1, mask[i].argmax():]
        want = row_alone(model, ad, k, alone_ids, alone_mask)
        torch.testing.assert_close(got[i, mask[i].bool()], want, **BATCHED_LOGITS)


def test_no_compaction_when_already_in_place_or_disabled(model):
    ad = resident(model, RANKS)
    ids, mask = model.encode_prompts(QUESTIONS[:3])
    with torch.no_grad():
        with model.bind(ad, [9, 1, 4]) as b:
            assert len(b.adapters) == 3 and b.row_adapter == [0, 1, 2]
        with model.bind(ad, [4, 5, 6]) as b:  # a contiguous block in row order: read in place
            assert b.adapters is ad and b.row_adapter == [4, 5, 6]
        model.compact_adapters = False
        try:
            with model.bind(ad, [9, 1, 4]) as b:
                assert b.adapters is ad
        finally:
            model.compact_adapters = True
    ad.A = {m: t.requires_grad_() for m, t in ad.A.items()}
    with model.bind(ad, [9, 1, 4]) as b:  # training: the binding must use the caller's tensors
        assert b.adapters is ad
        out = model.base_model(input_ids=ids, attention_mask=mask).logits
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in ad.A.values())


def test_compact_binding_of_a_packed_batch(model):
    ad = resident(model, RANKS, seed=2)
    lens, seg = [3, 5, 2, 4], [10, 3, 10, -1]
    ids = torch.randint(3, model.vocab_size, (1, sum(lens)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with model.bind(ad, seg_lens=lens, seg_adapter=seg) as b:
            assert len(b.adapters) == 2 and b.seg_adapter == [0, 1, 0, -1]
            got = model.base_model(input_ids=ids).logits
        model.compact_adapters = False
        try:
            want = model(ids, adapters=ad, seg_lens=lens, seg_adapter=seg).logits
        finally:
            model.compact_adapters = True
    torch.testing.assert_close(got, want, **BATCHED_LOGITS)


def test_bf16_resident_batch_casts_only_the_used_adapters(model):
    ad32 = resident(model, [4] * 10, seed=3)
    ad16 = ad32.to(torch.bfloat16)
    ids, mask = model.encode_prompts(QUESTIONS[:3])
    model._cast_cache.clear()
    with torch.no_grad(), model.bind(ad16, [6, 2, 8]) as b:
        assert b.adapters.dtype == torch.float32 and len(b.adapters) == 3
        # the upcast copy holds exactly the bf16 values of the used adapters
        m = model.spec.target_modules[0]
        assert torch.equal(b.adapters.A[m], ad16.A[m][:, [24, 25, 26, 27, 8, 9, 10, 11, 32, 33, 34, 35]].float())
    assert not model._cast_cache  # the whole batch was never cast
    got = logits(model, ad16, [6, 2, 8], ids, mask)
    want = logits(model, ad16.to(torch.float32), [6, 2, 8], ids, mask)  # the cast the uncompacted path makes
    v = mask.bool()
    torch.testing.assert_close(got[v], want[v], **BATCHED_LOGITS)
    # a subset of a bf16 batch that is already a contiguous block is compacted too (cast only what is used)
    with torch.no_grad(), model.bind(ad16, [3, 4]) as b:
        assert len(b.adapters) == 2 and b.adapters.dtype == torch.float32


def test_nan_adapter_in_a_large_batch(model):
    names = [f"doc{k}" for k in range(10)]
    ad = resident(model, [4] * 10, seed=5, names=names)
    bad = AdapterBatch({m: t.clone() for m, t in ad.A.items()}, dict(ad.B), ad.rank_offsets, ad.alpha,
                       ad.model_id, names)
    m = model.spec.target_modules[0]
    bad.A[m][1, bad.rank_offsets[7] + 2, 5] = NAN
    ids, mask = model.encode_prompts(QUESTIONS[:3])
    with pytest.raises(ValueError, match=r"adapter #7 \('doc7'\) \(bound for this call\) contains NaN"):
        logits(model, bad, [2, 7, 4], ids, mask)
    # rows that do not use it run, and equal the clean batch. Bitwise: with compaction (on here) both calls bind a
    # copy of adapters [2, 9, 4] only, equal element for element, so the same kernels see the same inputs and shapes
    torch.testing.assert_close(logits(model, bad, [2, 9, 4], ids, mask), logits(model, ad, [2, 9, 4], ids, mask),
                               rtol=0, atol=0)
    nan_alpha = AdapterBatch(ad.A, ad.B, ad.rank_offsets, NAN, ad.model_id)
    with pytest.raises(ValueError, match="non-finite alpha"):
        logits(model, nan_alpha, [2, 9], ids[:2], mask[:2])


def test_narrowing_cast_overflow_names_the_callers_adapter():
    m16 = build("llama", seed=4)
    m16.base_model.to(torch.float16)
    ad = resident(m16, [4] * 6, seed=6)
    mod = m16.spec.target_modules[0]
    ad.B[mod][0, ad.rank_offsets[4], 0] = 1e6  # finite in fp32, inf in fp16
    ids, mask = m16.encode_prompts(QUESTIONS[:2])
    with pytest.raises(ValueError, match=r"adapter #4 \(bound for this call, cast to torch.float16\) contains NaN"):
        logits(m16, ad, [4, 1], ids, mask)
    out = logits(m16, ad, [3, 1], ids, mask)
    assert out.dtype == torch.float16 and torch.isfinite(out[mask.bool()]).all()


def test_beams_with_compaction(model):
    ad = resident(model, [4] * 8, seed=7)
    ids, mask = model.encode_prompts(QUESTIONS[:2])
    kw = dict(adapters=ad, adapter_index=[6, 1], num_beams=2, num_return_sequences=2, max_new_tokens=4,
              do_sample=False)
    with torch.no_grad(), model.bind(ad, [6, 1], rows_per_index=2) as b:  # what generate binds
        assert len(b.adapters) == 2 and b.row_adapter == [0, 1] and b.rows_per_index == 2
    got = model.generate(ids, mask, **kw)
    model.compact_adapters = False
    try:
        want = model.generate(ids, mask, **kw)
    finally:
        model.compact_adapters = True
    assert torch.equal(got, want)


def test_cpu_strategy_is_chosen_once_per_batch_and_shape(monkeypatch):
    from d2l_fast.kernels.segmented_lora import SegmentMeta, segmented_lora_, torch_impl

    calls = []
    real = torch_impl.choose_strategy
    monkeypatch.setattr(torch_impl, "choose_strategy", lambda *a: calls.append(a[1:]) or real(*a))
    g = torch.Generator().manual_seed(0)
    meta = SegmentMeta.uniform(6, 1, [5, 0, 3, 1, 4, 2], list(range(0, 25, 4)))
    x, A, B = torch.randn(6, 12, generator=g), torch.randn(24, 12, generator=g), torch.randn(24, 10, generator=g)
    A2, B2 = torch.randn(24, 20, generator=g), torch.randn(24, 7, generator=g)
    outs = [torch.zeros(6, 10) for _ in range(3)]
    for out in outs:
        segmented_lora_(out, x, A, B, meta, 0.5, backend="torch")
    segmented_lora_(torch.zeros(6, 7), torch.randn(6, 20, generator=g), A2, B2, meta, 0.5, backend="torch")
    assert calls == [(12, 10), (20, 7)]  # once per layer shape, not once per call
    assert torch.equal(outs[0], outs[2])
    ref = torch.stack([0.5 * x[i] @ A[4 * k : 4 * k + 4].T @ B[4 * k : 4 * k + 4] for i, k in
                       enumerate([5, 0, 3, 1, 4, 2])])
    torch.testing.assert_close(outs[0], ref, rtol=1e-5, atol=1e-6)


def test_select_casts_layer_by_layer(model):
    ad = resident(model, RANKS, seed=8, names=[f"n{k}" for k in range(len(RANKS))])
    m = model.spec.target_modules[0]
    # a non-contiguous source (rank axis not the middle stride) and a repeated index
    ad.A[m] = ad.A[m].transpose(1, 2).contiguous().transpose(1, 2)
    assert not ad.A[m].is_contiguous()
    idx = [3, 1, 3, 7]
    ro = ad.rank_offsets
    rows = [r for k in idx for r in range(ro[k], ro[k + 1])]
    for dtype in (None, torch.float32, torch.bfloat16, torch.float16):
        sel = ad.select(idx, dtype=dtype)
        want = dtype or torch.float32
        assert sel.dtype == want and sel.ranks == [ad.ranks[k] for k in idx] and sel.names == ["n3", "n1", "n3", "n7"]
        for d in (ad.A, ad.B):
            got = (sel.A if d is ad.A else sel.B)[m]
            assert torch.equal(got, d[m][:, rows].to(want))
    sel = ad.select([1], device="cpu", dtype=torch.float64)  # rank-0 adapter: empty rank axis
    assert sel.A[m].shape == (model.spec.num_layers, 0, model.spec.d_in[m]) and sel.dtype == torch.float64
    with pytest.raises(TypeError, match="floating point"):
        ad.select([0], dtype=torch.int32)
    # trainable adapters stay differentiable through select
    A = ad.A[m].detach().clone().requires_grad_()
    sub = AdapterBatch({m: A}, dict(ad.B), ad.rank_offsets, ad.alpha, ad.model_id).select([7, 3])
    sub.A[m].sum().backward()
    expected = torch.zeros_like(A)
    expected[:, ro[7] : ro[8]] = 1
    expected[:, ro[3] : ro[4]] = 1
    assert torch.equal(A.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_scan_by_row_sums(model, dtype):
    big = torch.finfo(dtype).max
    ad = resident(model, [4] * 6, seed=9, dtype=dtype)
    m = model.spec.target_modules[0]
    A, B = ad.A[m], ad.B[m]
    A[0, 1, :4] = big  # adapter 0: finite entries whose row sum overflows: not reported
    A[1, 6, 3], A[1, 6, 9] = float("inf"), -float("inf")  # adapter 1: +inf and -inf in one row (sum NaN)
    B[0, 13, 2] = NAN  # adapter 3: a NaN in B
    B[1, 23, 0] = -float("inf")  # adapter 5
    ref = [k for k in range(6) if not all(torch.isfinite(t[:, 4 * k : 4 * k + 4]).all() for t in (A, B))]
    assert ref == [1, 3, 5]
    assert ad.nonfinite() == ref
    A[1, 6, 3] = A[1, 6, 9] = 0.0  # fixed in place: the cache follows the tensor version
    assert ad.nonfinite() == [3, 5]


def test_compaction_reuses_a_valid_finite_verdict(model, monkeypatch):
    ad = resident(model, [4] * 10, seed=10)
    assert ad.nonfinite() == []  # e.g. AdapterBatch.load / internalize checked it
    scanned = []
    real = AdapterBatch.nonfinite
    monkeypatch.setattr(AdapterBatch, "nonfinite", lambda self: scanned.append(len(self)) or real(self))
    with torch.no_grad(), model.bind(ad, [5, 2]) as b:
        assert len(b.adapters) == 2
    assert scanned == []  # the verdict cached on the caller's batch is still valid: nothing is scanned
    m = model.spec.target_modules[0]
    ad.A[m][0, ad.rank_offsets[5], 0] = NAN  # in place: the cached verdict is stale now
    with pytest.raises(ValueError, match=r"adapter #5 \(bound for this call\) contains NaN"):
        with model.bind(ad, [2, 5]):
            pass
    assert scanned == [2]  # only the two used adapters were scanned, not the batch of 10
    with torch.no_grad(), model.bind(ad, [2, 7]) as b:  # rows that do not use it still bind
        assert len(b.adapters) == 2


def test_compaction_is_reused_by_the_next_bind_of_the_same_rows(model, monkeypatch):
    """A decode loop binds the same (batch, rows) every step: the compact copy is made once, and again only when
    the rows change or the batch is modified in place."""
    ad = resident(model, [4] * 10, seed=11)
    copies = []
    real = AdapterBatch.select
    monkeypatch.setattr(AdapterBatch, "select", lambda self, *a, **k: copies.append(1) or real(self, *a, **k))
    for _ in range(3):
        with torch.no_grad(), model.bind(ad, [7, 2, 7]) as b:
            assert len(b.adapters) == 2
    assert len(copies) == 1
    with torch.no_grad(), model.bind(ad, [7, 3]):
        pass
    assert len(copies) == 2
    m = model.spec.target_modules[0]
    with torch.no_grad():
        ad.A[m][0, ad.rank_offsets[3], 0] += 1.0  # in place: the copy is stale
    with torch.no_grad(), model.bind(ad, [7, 3]) as b:
        torch.testing.assert_close(b.adapters.A[m][0, 4], ad.A[m][0, ad.rank_offsets[3]])
    assert len(copies) == 3


def test_batch_cache_entry_lives_only_as_long_as_its_batch(model):
    from d2l_fast.adapters import BatchCache

    cache, a, b = BatchCache(), resident(model, [4, 4], seed=5), resident(model, [4], seed=6)
    with pytest.raises(TypeError, match="source must be an AdapterBatch"):
        cache.put("not a batch", None, None)
    cache.put(a, "key", "value")
    assert cache.get(a) == ("key", "value") and cache.get(b) is None
    cache.put(b, "k2", "v2")  # one entry: the newer batch replaces it
    assert cache.get(a) is None and cache.get(b) == ("k2", "v2")
    del a  # the older batch going away must not drop the newer entry
    assert cache.get(b) == ("k2", "v2")
    del b
    assert not cache and cache._entry is None


def test_model_caches_drop_the_copies_with_the_bound_batch(model):
    """A server's decode batch (a concatenation of many requests' adapters) must not stay in memory through the
    model's reuse caches once the engine drops it: the compact (and cast) copies go with their source batch."""
    ids, mask = model.encode_prompts(QUESTIONS[:2])
    ad16 = resident(model, RANKS, seed=7).to(torch.bfloat16)
    logits(model, ad16, [7, 2], ids, mask)
    assert model._compact_cache.get(ad16) is not None
    ad16b = resident(model, RANKS, seed=8).to(torch.bfloat16)
    logits(model, ad16b, [0, 3], ids, mask, compact=False)  # uncompacted: the whole batch is cast
    assert model._cast_cache.get(ad16b) is not None
    del ad16, ad16b
    assert not model._compact_cache and not model._cast_cache
