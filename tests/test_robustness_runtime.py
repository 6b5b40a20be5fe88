"""Runtime robustness (issue 7, items 0, 3, 4, 5): internalisation at scale, row isolation and input checks,
concurrent callers, long documents. Everything runs on tiny random models (see :mod:`d2l_fast.zoo`)."""

from __future__ import annotations

import pytest
import torch

from d2l_fast import D2LModel
from d2l_fast.hypernet.perceiver import SwiGLU
from d2l_fast.zoo import tiny_pair

from ._numerics import BATCHING

WORDS = ("the river keeper wrote a date on the slate while the fox watched boats at dusk and the council met "
         "to discuss the roof lanterns and clocks of the old mill town near the water").split()


def doc(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx).capitalize() + "."


def build(arch="llama", seed=0, base_overrides=None, **kw):
    from d2l_fast.zoo import tiny_model, tiny_tokenizer

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
    # 1,100 short documents plus a few long ones (chunked): layer-to-layer segments 2 x ~1,110 latents rows
    # of 8 queries (>> SwiGLU.block_rows), ~14k context tokens (> encode_token_budget, several packed rows)
    docs = [doc(1 + (i * 7) % 9, i) for i in range(1100)]
    for i in (3, 640, 1099):
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
    sample = {0, 3, 640, 1099, len(docs) // 2}
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
    # several packed calls give the same adapters as one
    split = model.internalize(docs, docs_per_call=400, progress=False)
    assert_same_adapter(split, adapters)
