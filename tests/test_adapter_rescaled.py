"""AdapterBatch.rescaled: the adapters internalize(scalers=c, bias_scaler=b) makes, from those it made with 1, 1."""

import pytest
import torch

from d2l_fast import AdapterBatch, D2LModel

from ._numerics import BATCHING
from ._tiny import tiny_pair

KW = dict(latent_size=32, num_blocks=1, n_heads=4, head_dim=16, n_kv_heads=2)
DOCS = ["The keeper of the old mill wrote every storm into a blue ledger, and the river rose twice that spring "
        "while the fox watched the boats from under the bridge near the bakery.",
        "The council met on the first Monday."]


@pytest.fixture(scope="module")
def model():
    base, tok = tiny_pair("llama")
    return D2LModel.from_base(base, tok, seed=0, init_scaler_B=6.0, max_chunk_len=24, **KW)


def old_server_scaled(ad: AdapterBatch, n_chunks: int, c: float, b: float, has_bias: bool) -> AdapterBatch:
    """What serving/app.py's ``_scaled`` did before ``rescaled`` existed (one document, rank rows re-derived)."""
    rank = ad.ranks[0]
    r = rank // (n_chunks + (1 if has_bias else 0))
    cut = n_chunks * r
    A, B = {}, {}
    for m in ad.A:
        a, bb = ad.A[m].clone(), ad.B[m].clone()
        a[:, :cut] = a[:, :cut] * torch.tensor(c, dtype=torch.float32).to(a.dtype)
        if has_bias:
            a[:, cut:] = b * a[:, cut:]
            bb[:, cut:] = b * bb[:, cut:]
        A[m], B[m] = a, bb
    return AdapterBatch(A, B, list(ad.rank_offsets), ad.alpha, ad.model_id, ad.names)


def assert_same(x: AdapterBatch, y: AdapterBatch):
    assert x.rank_offsets == y.rank_offsets and x.modules == y.modules
    for m in x.modules:
        torch.testing.assert_close(x.A[m], y.A[m], **BATCHING)
        torch.testing.assert_close(x.B[m], y.B[m], **BATCHING)


@pytest.mark.parametrize("c,b", [(0.5, 2.0), (-1.5, 1.0), (1.0, 0.25), (0.0, 0.0)])
def test_rescaled_equals_internalize_with_scalers_and_the_old_server_path(model, c, b):
    assert model.hypernet.bias_lora() is not None  # the bias rows are part of what is checked
    r = model.spec.lora_r
    plain = model.internalize(DOCS)
    n_chunks = model.pack(DOCS).n_chunks
    assert n_chunks[0] > 1  # a chunked document: its chunk rows and its bias rows both appear
    got = plain.rescaled(context=c, bias=b, bias_rows=r)
    assert_same(got, model.internalize(DOCS, scalers=c, bias_scaler=b))
    for k in range(len(DOCS)):
        assert_same(got.select([k]), old_server_scaled(plain.select([k]), n_chunks[k], c, b, True))
    assert got.names == plain.names
    for m in plain.modules:  # not modified
        torch.testing.assert_close(plain.A[m], model.internalize(DOCS).A[m], **BATCHING)


def test_rescaled_copies_once_or_not_at_all(model):
    plain = model.internalize(DOCS)
    r = model.spec.lora_r
    assert plain.rescaled(context=1.0, bias=1.0, bias_rows=r) is plain  # nothing to scale: no copy
    before = {m: t.clone() for m, t in plain.A.items()}
    copy = plain.rescaled(context=0.5, bias_rows=r)
    assert all(copy.A[m].data_ptr() != plain.A[m].data_ptr() for m in plain.modules)
    assert all(torch.equal(plain.A[m], before[m]) for m in plain.modules)  # the source is untouched
    same = plain.rescaled(context=0.5, bias_rows=r, inplace=True)
    assert same is plain
    assert_same(plain, copy)


def test_rescaled_validates_its_arguments(model):
    ad = model.internalize(DOCS[1:])
    r = model.spec.lora_r
    for bad in (float("nan"), float("inf"), "2", True, None):
        with pytest.raises(ValueError, match="context must be a finite number"):
            ad.rescaled(context=bad, bias_rows=r)
        with pytest.raises(ValueError, match="bias must be a finite number"):
            ad.rescaled(bias=bad, bias_rows=r)
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="bias_rows must be an int >= 0"):
            ad.rescaled(context=2.0, bias_rows=bad)
    with pytest.raises(ValueError, match="has rank"):
        ad.rescaled(context=2.0, bias_rows=ad.ranks[0] + 1)
    with pytest.raises(ValueError, match="no bias rows"):
        ad.rescaled(bias=2.0, bias_rows=0)
    with pytest.raises(TypeError):
        ad.rescaled(2.0, bias_rows=r)  # keywords only
    with pytest.raises(TypeError):
        ad.rescaled(context=2.0)  # the layout must be given
