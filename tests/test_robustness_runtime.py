"""Runtime robustness (issue 7, items 0, 3, 4, 5): internalisation at scale, row isolation and input checks,
concurrent callers, long documents. Everything runs on tiny random models (see tests/_tiny.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from d2l_fast import D2LModel
from d2l_fast.hypernet.perceiver import SwiGLU

from ._numerics import BATCHING, ISOLATION
from ._tiny import tiny_pair

WORDS = ("the river keeper wrote a date on the slate while the fox watched boats at dusk and the council met "
         "to discuss the roof lanterns and clocks of the old mill town near the water").split()


def doc(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx).capitalize() + "."


def build(arch="llama", seed=0, base_overrides=None, **kw):
    from ._tiny import tiny_model, tiny_tokenizer

    base, tok = (tiny_model(arch, seed=seed, **base_overrides), tiny_tokenizer(arch)) if base_overrides else \
        tiny_pair(arch, seed=seed)
    kw.setdefault("max_chunk_len", 64)
    return D2LModel.from_base(base, tok, seed=seed + 1, latent_size=32, n_latent_queries=8, num_blocks=2, n_heads=4,
                              head_dim=16, n_kv_heads=2, init_scaler_B=1.0, **kw)


def assert_same_adapter(got, want):
    assert got.ranks == want.ranks
    for m in want.modules:
        torch.testing.assert_close(got.A[m], want.A[m], **BATCHING)
        torch.testing.assert_close(got.B[m], want.B[m], **BATCHING)


# ------------------------------------------------------------------------------------------------ item 0
def test_swiglu_blocked_path_takes_any_leading_dims():
    torch.manual_seed(0)
    mlp = SwiGLU(16, 32, 8)
    x = torch.randn(1100, 3, 16)  # 3300 rows > block_rows: the blocked inference path
    with torch.no_grad():
        got = mlp(x)
    with torch.enable_grad():  # the plain path
        want = mlp(x).detach()
    assert got.shape == (1100, 3, 8)
    torch.testing.assert_close(got, want, **BATCHING)


@pytest.fixture(scope="module")
def many():
    model = build("llama")
    # 1,000 short documents plus a few long ones (chunked): layer-to-layer segments 2 x ~1,010 latents of
    # 8 query rows (>> SwiGLU.block_rows), ~13k context tokens (> encode_token_budget: several packed rows)
    docs = [doc(1 + (i * 7) % 9, i) for i in range(1000)]
    for i in (3, 640, 999):
        docs[i] = doc(150, 10_000 + i)
    return model, docs


def test_internalize_thousand_documents_in_one_call(many):
    model, docs = many
    packed = model.pack(docs)
    assert packed.total_tokens > 1.5 * model.encode_token_budget
    n_seg = model.spec.num_layers * len(packed.chunks)
    assert n_seg * model.spec.n_latent_queries > 8 * SwiGLU.block_rows
    assert max(packed.n_chunks) >= 3
    adapters = model.internalize(docs)
    assert adapters.ranks == [(n + 1) * model.spec.lora_r for n in packed.n_chunks]
    # a sample around every boundary: first/last, the long documents, the SwiGLU row blocks of the latents
    # (segment = layer * C + chunk, 8 query rows each) and the encoder's packed rows (token budget)
    C = len(packed.chunks)
    block_segs = [s for s in range(0, n_seg, SwiGLU.block_rows // 8)] + [n_seg - 1]
    sample = {0, 3, 640, 999, len(docs) // 2}
    sample |= {packed.chunk_to_doc[s % C] for s in block_segs}
    cum, budget_docs = 0, set()
    for c, n in enumerate(packed.lengths):
        if cum // model.encode_token_budget != (cum + n) // model.encode_token_budget:
            budget_docs |= {packed.chunk_to_doc[c], packed.chunk_to_doc[min(c + 1, C - 1)]}
        cum += n
    assert budget_docs
    sample |= budget_docs
    for i in sorted(sample):
        assert_same_adapter(adapters[i], model.internalize([docs[i]]))


# ------------------------------------------------------------------------------------------------ item 3
NAN, INF = float("nan"), float("inf")


def _planted(dtype):
    """Four rank-4 adapters; adapter 1 holds a NaN in A, adapter 3 (inside the rank span, used by no row) an inf."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 24, generator=g)
    B = torch.randn(16, 20, generator=g)
    clean_A, clean_B = A.clone(), B.clone()
    A[5, 7] = NAN
    B[14, 3] = INF
    clean_A[4:8] = 0  # what the other rows must see: the bad adapter contributes nothing to them
    clean_B[12:16] = 0
    return A.to(dtype), B.to(dtype), clean_A.to(dtype), clean_B.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq", [1, 5])  # decode rows and prefill rows
@pytest.mark.parametrize("strategy", ["runs", "grouped", "bmm", "dense",
                                      pytest.param("triton", marks=pytest.mark.interpreter),
                                      pytest.param("triton-cuda", marks=pytest.mark.gpu)])
def test_nan_in_one_adapter_stays_in_its_rows(strategy, seq, dtype):
    from d2l_fast.kernels.segmented_lora import SegmentMeta, segmented_lora_
    from d2l_fast.kernels.segmented_lora.torch_impl import segmented_lora_cpu_

    offs = [0, 4, 8, 12, 16]
    rows = [0, 1, -1, 2, 0, 1, 2, -1]  # adapter 3 sits inside the used rank span but no row uses it
    A, B, cA, cB = _planted(dtype)
    x = torch.randn(len(rows) * seq, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    meta = SegmentMeta.uniform(len(rows), seq, rows, offs, x.device)
    y0 = torch.randn(len(rows) * seq, 20, generator=torch.Generator().manual_seed(2)).to(dtype)

    def run(a, b):
        out = y0.clone()
        if strategy == "triton-cuda":  # the compiled kernels on a GPU
            out = out.cuda()
            segmented_lora_(out, x.cuda(), a.cuda(), b.cuda(), meta.to("cuda"), 0.5, backend="triton")
            out = out.cpu()
        elif strategy == "triton":
            segmented_lora_(out, x, a, b, meta, 0.5, backend="triton")
        else:
            segmented_lora_cpu_(out, x, a, b, meta, 0.5, strategy=strategy)
        return out.view(len(rows), seq, -1)

    got, want = run(A, B), run(cA, cB)
    for i, k in enumerate(rows):
        if k == 1:  # the bad adapter's own rows show its NaN (the interpreter's bf16 emulation loses NaN)
            assert not torch.isfinite(got[i]).all() or (strategy == "triton" and dtype == torch.bfloat16)
        else:
            assert torch.isfinite(got[i]).all(), f"row {i} (adapter {k}) was poisoned by adapter 1"
            # not bitwise: the clean run multiplies other (zeroed) adapter rows, and BLAS may block it differently
            torch.testing.assert_close(got[i], want[i], **ISOLATION[dtype])


@pytest.fixture(scope="module")
def tiny():
    model = build("llama", seed=3)
    docs = [doc(12, 1), doc(30, 2), doc(8, 3)]
    return model, docs, model.internalize(docs, names=["one", "two", "three"])


def _poisoned(adapters, k, value=NAN):
    bad = adapters.to(adapters.device)  # a copy: the fixture's adapters stay clean
    bad.A = {m: t.clone() for m, t in bad.A.items()}
    lo = bad.rank_offsets[k]
    bad.A["down_proj"][0, lo, 0] = value
    return bad


def test_non_finite_scalers_and_adapters_are_refused(tiny, tmp_path):
    from d2l_fast import AdapterBatch

    model, docs, adapters = tiny
    with pytest.raises(ValueError, match=r"scalers must be finite.*chunk 0 \(document #0\)"):
        model.internalize(docs, scalers=[NAN] + [1.0] * (len(model.pack(docs).chunks) - 1))
    with pytest.raises(ValueError, match="scalers must be finite"):
        model.internalize(docs, scalers=INF)
    with pytest.raises(ValueError, match="bias_scaler must be finite"):
        model.internalize(docs, bias_scaler=NAN)
    with pytest.raises(ValueError, match="compose weights must be finite"):
        adapters.compose([0, 1], weights=[1.0, NAN])
    bad = _poisoned(adapters, 1)
    assert bad.nonfinite() == [1] and adapters.nonfinite() == []
    ids, mask = model.encode_prompts(["Who watched?", "What date?", "Where?"])
    with pytest.raises(ValueError, match=r"adapter #1 \('two'\).*NaN or infinite"):
        model.generate(ids, mask, adapters=bad, adapter_index=[0, 1, 2], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"adapter #1"):
        model(ids, mask, adapters=bad, adapter_index=[1, -1, 0])
    with pytest.raises(ValueError, match="non-finite alpha"):
        model(ids, mask, adapters=type(adapters)(adapters.A, adapters.B, adapters.rank_offsets, NAN,
                                                 adapters.model_id), adapter_index=[0, 0, 0])
    # rows that do not use the bad adapter run, and equal the clean batch
    ok = model.generate(ids, mask, adapters=bad, adapter_index=[2, -1, 0], max_new_tokens=3, do_sample=False)
    ref = model.generate(ids, mask, adapters=adapters, adapter_index=[2, -1, 0], max_new_tokens=3, do_sample=False)
    assert torch.equal(ok, ref)
    # a NaN written in place after a first (clean) check is still caught: the check follows tensor versions
    fresh = adapters.to(adapters.device)
    fresh.A = {m: t.clone() for m, t in fresh.A.items()}
    assert fresh.nonfinite() == []
    fresh.B["down_proj"] = fresh.B["down_proj"].clone()
    fresh.B["down_proj"][1, fresh.rank_offsets[2], 3] = -INF
    assert fresh.nonfinite() == [2]
    # adapter files
    bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"adapter #1 \('two'\) in .*bad.safetensors"):
        AdapterBatch.load(tmp_path / "bad.safetensors")
    # a hypernetwork that emits NaN: internalize names the documents instead of returning poison
    sb = model.hypernet.scaler_B["down_proj"]
    keep = sb.detach().clone()
    try:
        with torch.no_grad():
            sb[0, 0, 0, 0] = NAN
        with pytest.raises(ValueError, match=r"adapter #0 \('one'\), #1 \('two'\), #2 \('three'\).*internalize"):
            model.internalize(docs, names=["one", "two", "three"])
    finally:
        with torch.no_grad():
            sb.copy_(keep)


def test_select_and_concat_inherit_the_nan_check(tiny, monkeypatch):
    """select/concat of checked batches need no new scan (the server binds a concatenation at every admission);
    the inherited result names the right adapters and is dropped when a tensor is written in place."""
    from d2l_fast import AdapterBatch

    _, _, adapters = tiny
    bad, clean = _poisoned(adapters, 1), adapters.select([0, 2])
    unscanned = _poisoned(adapters, 2)
    assert bad.nonfinite() == [1] and clean.nonfinite() == []
    isfinite, scans = torch.isfinite, []
    monkeypatch.setattr(torch, "isfinite", lambda t: scans.append(1) or isfinite(t))
    cat = AdapterBatch.concat([clean, bad])  # adapters 2..4 are bad's 0..2
    sel = cat.select([3, 0, 3, 4])
    assert cat.nonfinite() == [3] and sel.nonfinite() == [0, 2] and not scans
    with pytest.raises(ValueError, match="adapter #3"):
        cat.check_finite()
    mixed = AdapterBatch.concat([clean, unscanned])  # one part never checked: the concatenation is scanned
    assert mixed.nonfinite() == [4] and scans
    scans.clear()
    sel.B["down_proj"][0, sel.rank_offsets[1], 0] = INF  # in place: the inherited result no longer holds
    assert sel.nonfinite() == [0, 1, 2] and scans


def test_adapter_indices_must_be_integers(tiny):
    import numpy as np

    model, docs, adapters = tiny
    ids, mask = model.encode_prompts(["Who watched?", "What date?", "Where?"])
    for bad in ([0.9, 1.7, "2"], [0, 1, 2.0], [0, True, 1], torch.tensor([0.0, 1.0, 2.0]), "012"):
        with pytest.raises(TypeError, match="integer"):
            model(ids, mask, adapters=adapters, adapter_index=bad)
        with pytest.raises(TypeError, match="integer"):
            model.generate(ids, mask, adapters=adapters, adapter_index=bad, max_new_tokens=1)
    with pytest.raises(TypeError, match="integer"):
        adapters.select([0.5])
    with pytest.raises(TypeError, match="integer"):
        with model.bind(adapters, [0, 1.5, 2]):
            pass
    with pytest.raises(TypeError, match="integer"):
        model(ids[:1, :4], None, adapters=adapters, seg_lens=[2, 2.0], seg_adapter=[0, 1])
    want = model(ids, mask, adapters=adapters, adapter_index=[2, 0, 1]).logits
    for good in (np.array([2, 0, 1]), torch.tensor([2, 0, 1]), (np.int64(2), 0, 1)):
        # bitwise: every spelling becomes the same index list, so the same kernels run on the same inputs and shapes
        torch.testing.assert_close(model(ids, mask, adapters=adapters, adapter_index=good).logits, want,
                                   rtol=0, atol=0)


def test_row_count_must_match_unless_expansion_is_declared(tiny):
    model, docs, adapters = tiny
    ids, mask = model.encode_prompts(["Who watched?", "What date?", "Where?", "When?"])
    with pytest.raises(ValueError, match="4 rows but 2 row adapters"):
        with torch.no_grad(), model.bind(adapters, [0, 1]):
            model.base_model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        with model.bind(adapters, [0, 1], rows_per_index=2):
            got = model.base_model(input_ids=ids, attention_mask=mask).logits
        with model.bind(adapters, [0, 0, 1, 1]):
            want = model.base_model(input_ids=ids, attention_mask=mask).logits
    # bitwise: rows_per_index=2 expands to the same row→adapter list [0, 0, 1, 1] before any kernel runs, so both
    # calls run the same kernels on the same inputs and shapes
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rows_per_index=3"):
        with torch.no_grad(), model.bind(adapters, [0, 1], rows_per_index=3):
            model.base_model(input_ids=ids, attention_mask=mask)
    # generate declares its own expansion (num_return_sequences): each prompt keeps its adapter
    out = model.generate(ids[:2], mask[:2], adapters=adapters, adapter_index=[1, 0], num_return_sequences=2,
                         do_sample=True, top_k=1, max_new_tokens=3)
    alone = model.generate(ids[1:2], mask[1:2], adapters=adapters[0], max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 4 and torch.equal(out[2, -3:], alone[0, -3:]) and torch.equal(out[3, -3:], alone[0, -3:])


def test_empty_prompts_and_out_of_vocabulary_ids(tiny):
    model, docs, adapters = tiny
    V = model.vocab_size
    with pytest.raises(ValueError, match="at least one prompt"):
        model.generate_text([])
    with pytest.raises(ValueError, match="at least one prompt"):
        model.generate_text([], adapters, adapter_index=[])
    ids, mask = model.encode_prompts(["Who watched?"])
    for bad_id in (V, V + 100, -3):
        bad = ids.clone()
        bad[0, -1] = bad_id
        with pytest.raises(ValueError, match=rf"token id {bad_id} is outside the vocabulary \(size {V}"):
            model.generate(bad, mask, max_new_tokens=1)
        with pytest.raises(ValueError, match=rf"token id {bad_id} is outside the vocabulary \(size {V}"):
            model(bad, mask, adapters=adapters[0])
        templated = model.pack([docs[0]]).chunks[0]
        with pytest.raises(ValueError, match=rf"document #1 .*token id {bad_id} is outside the vocabulary"):
            model.internalize([templated, templated[:3] + [bad_id] + templated[3:]])
    assert model.internalize([templated]).ranks == [2 * model.spec.lora_r]  # still fine afterwards


# ------------------------------------------------------------------------------------------------ item 4
def test_concurrent_internalize_generate_forward_match_single_threaded():
    import threading

    model = build("gemma2", seed=11)  # 4 layers, eager attention + softcapping: the varlen switch matters
    docs = [[doc(20 + 9 * i, 50 + i), doc(5 + i, 70 + i), doc(90, 80 + i)] for i in range(3)]
    prompts = ["Who watched the boats?", "What did the council discuss?", "Where is the mill?"]
    ids, mask = model.encode_prompts(prompts)
    # single-threaded results first
    want_ad = [model.internalize(d) for d in docs]
    want_gen = [model.generate(ids, mask, adapters=a, adapter_index=[2, 0, 1], max_new_tokens=4, do_sample=False)
                for a in want_ad]
    with torch.no_grad():
        want_fwd = [model(ids, mask, adapters=a, adapter_index=[1, -1, 2]).logits for a in want_ad]
        want_base = model(ids, mask).logits

    jobs = []
    for _rep in range(2):
        for k in range(3):
            jobs += [("internalize", k), ("generate", k), ("forward", k), ("base", k)]
    errors, done = [], []

    def worker(my_jobs):
        try:
            for kind, k in my_jobs:
                if kind == "internalize":
                    assert_same_adapter(model.internalize(docs[k]), want_ad[k])
                elif kind == "generate":
                    out = model.generate(ids, mask, adapters=want_ad[k], adapter_index=[2, 0, 1], max_new_tokens=4,
                                         do_sample=False)
                    assert torch.equal(out, want_gen[k]), (kind, k)
                elif kind == "forward":
                    with torch.no_grad():
                        got = model(ids, mask, adapters=want_ad[k], adapter_index=[1, -1, 2]).logits
                    torch.testing.assert_close(got, want_fwd[k], **BATCHING)
                else:
                    with torch.no_grad():
                        torch.testing.assert_close(model(ids, mask).logits, want_base, **BATCHING)
                done.append(kind)
        except BaseException as e:  # noqa: BLE001 - reported below with the thread's job
            errors.append(e)

    n_threads = 4
    threads = [threading.Thread(target=worker, args=(jobs[t::n_threads][::(-1) ** t],)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock?)"
    assert not errors, errors[:3]
    assert len(done) == len(jobs)


# ------------------------------------------------------------------------------------------------ item 5
def test_long_documents_are_chunked_at_the_context_window_by_default():
    from d2l_fast.model import LongDocumentWarning

    W = 96  # a small context window (the tiny llama's chat affixes alone take ~30 tokens)
    model = build("llama", base_overrides=dict(max_position_embeddings=W), max_chunk_len=None)
    assert model.max_chunk_len == W
    short, long = doc(6, 1), doc(300, 2)
    from d2l_fast.packing import context_affixes

    pre, suf = context_affixes(model.tokenizer)
    content = W - len(pre) - len(suf)  # chunk length that keeps every re-wrapped chunk inside the window
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # beyond-the-window must not fire: the default stays inside it
        with pytest.raises(LongDocumentWarning, match=rf"#1\) exceed the default chunk length {content}"):
            model.pack([short, long])
    with pytest.warns(LongDocumentWarning, match="exceed the default"):
        packed = model.pack([short, long])
    assert packed.n_chunks[0] == 1 and packed.n_chunks[1] >= 4
    assert max(packed.lengths) <= W
    with pytest.warns(LongDocumentWarning):
        by_default = model.internalize([short, long])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = model.internalize([short, long], max_chunk_len=content)  # the user's choice: no warning
    assert_same_adapter(by_default, explicit)
    # chunking off (the reference's behaviour): one chunk past the context window, and a warning that says so
    with pytest.warns(LongDocumentWarning, match=f"beyond the base model's max_position_embeddings={W}"):
        whole = model.pack([short, long], max_chunk_len=0)
    assert whole.n_chunks == [1, 1]
    off = build("llama", base_overrides=dict(max_position_embeddings=W), max_chunk_len=0)
    with pytest.warns(LongDocumentWarning, match="beyond"):
        assert off.pack([long]).n_chunks == [1]
    with pytest.raises(TypeError, match="max_chunk_len"):
        build("llama", max_chunk_len=64.5)


@pytest.mark.parametrize("softcap,window", [(None, None), (30.0, None), (None, 24), (30.0, 24)])
def test_blocked_chunk_attention_equals_whole(softcap, window):
    from d2l_fast.varlen import _segment_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 100, 16, generator=g), torch.randn(2, 100, 16, generator=g), torch.randn(2, 100, 16,
                                                                                                      generator=g)
    whole = _segment_attention(q, k, v, 0.25, softcap, window)
    blocked = _segment_attention(q, k, v, 0.25, softcap, window, max_scores=4 * 100 * 20)  # 16-20 query rows
    torch.testing.assert_close(blocked, whole, **BATCHING)


def test_encoder_working_memory_is_bounded_by_the_token_budget():
    from torch.profiler import ProfilerActivity, profile

    model = build("llama", max_chunk_len=0)
    ids = torch.randint(10, 500, (1500,), generator=torch.Generator().manual_seed(0)).tolist()
    H = model.base_model.config.num_attention_heads
    whole_scores_mb = H * 1500 * 1500 * 4 / 2**20  # what one [H, t, t] fp32 score matrix would take

    def encode(budget):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad():
            feats = model.ctx_encoder.encode_packed([ids], token_budget=budget)
        return feats, max(e.cpu_memory_usage for e in prof.events()) / 2**20

    small, small_mb = encode(256)
    assert small_mb < whole_scores_mb / 4, (small_mb, whole_scores_mb)  # largest single allocation of the pass
    big, _ = encode(8192)
    torch.testing.assert_close(small, big, **BATCHING)
