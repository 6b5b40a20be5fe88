"""The context encoder run in token windows (``encode_in_slices``, chunked prefill) gives the adapters of the whole-row
pass: same chunking and ranks, values within ``_numerics.SLICED``; each pass runs at most n tokens."""

import functools
import threading

import pytest
import torch

from d2l_fast import D2LModel
from d2l_fast.concurrency import ModelLock
from d2l_fast.encoder import encode_in_slices, observe_encoding
from d2l_fast.hf import decoder_of
from d2l_fast.varlen import RowCache

from ._numerics import SLICED
from ._tiny import tiny_model, tiny_tokenizer

KW = dict(latent_size=32, num_blocks=1, n_heads=4, head_dim=16, n_kv_heads=2)
LONG = " ".join(f"Line {i}: the keeper of the mill wrote storm number {i} into the blue ledger." for i in range(8))
DOCS = [LONG, "Bread rose in the warm kitchen.", LONG[:200]]


@functools.lru_cache(maxsize=None)
def _make(arch, overrides):
    base = tiny_model(arch, **dict(overrides))
    return D2LModel.from_base(base, tiny_tokenizer(arch), seed=0, init_scaler_B=6.0, max_chunk_len=48, **KW)


def make(arch, **overrides):
    return _make(arch, tuple(sorted(overrides.items())))


def pass_lengths(model, fn):
    """(fn's result, the token count of every encoder pass it ran: the inputs of decoder layer 0 on this thread)."""
    lens, me = [], threading.get_ident()

    def hook(mod, args, kwargs):
        if threading.get_ident() == me:
            lens.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    h = decoder_of(model.base_model).layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return fn(), lens
    finally:
        h.remove()


@pytest.mark.parametrize("arch,overrides", [("llama", {"num_hidden_layers": 4}), ("qwen3", {}),
                                                  ("gemma2", {"sliding_window": 8})],
                         ids=["llama", "qwen3", "gemma2-window8"])
@pytest.mark.parametrize("n", [13, 100])
def test_sliced_internalize_matches_the_whole_row_pass(arch, overrides, n):
    model = make(arch, **overrides)
    ref, whole = pass_lengths(model, lambda: model.internalize(DOCS))
    with encode_in_slices(n):
        got, lens = pass_lengths(model, lambda: model.internalize(DOCS))
    total = sum(model.pack(DOCS).lengths)
    assert whole == [total] and total > n  # one packed row unsliced; windows of n tokens (across chunk ends) sliced
    assert lens == [min(n, total - a) for a in range(0, total, n)]
    assert got.ranks == ref.ranks  # the chunking is the model's: slicing changes no adapter's shape
    for m in ref.A:
        torch.testing.assert_close(got.A[m], ref.A[m], **SLICED)
        torch.testing.assert_close(got.B[m], ref.B[m], **SLICED)
    with encode_in_slices(n):
        again = model.internalize(DOCS)
    assert all(torch.equal(again.A[m], got.A[m]) and torch.equal(again.B[m], got.B[m]) for m in got.A)


def test_slices_report_progress_through_every_window_in_order():
    model = make("llama", num_hidden_layers=4)
    events = []
    with encode_in_slices(16), observe_encoding(lambda *e: events.append(e)):
        model.internalize([LONG])
    layers = [(a, b) for ev, a, b in events if ev == "layer"]
    assert layers == sorted(layers) and len({b for _, b in layers}) == 1
    k = model.ctx_encoder.n_kept
    windows = -(-sum(model.pack([LONG]).lengths) // 16)
    assert layers[-1] == (windows * k - 1, windows * k)


def test_encode_in_slices_and_row_cache_check_their_arguments():
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="positive int"), encode_in_slices(bad):
            pass
    with pytest.raises(ValueError, match="positive int"):
        RowCache(0)
    with pytest.raises(ValueError, match="inside the row"):
        RowCache(10).window(8, 12)


def test_the_lock_counts_slices_and_how_many_a_reader_waited():
    lock = ModelLock()
    with lock.exclusive("test pass"):
        assert lock.slices == 1
        assert lock.yield_to_readers() is False  # nobody waits: the next slice begins all the same
        assert lock.slices == 2
        entered = threading.Event()

        def reader():
            with lock.shared():
                entered.set()

        t = threading.Thread(target=reader)
        t.start()
        while lock.readers_waiting == 0:
            threading.Event().wait(0.001)
        assert lock.yield_to_readers() is True  # the reader gets in before this slice ends
        assert entered.is_set() and lock.slices == 3
    t.join(10)
    assert lock.max_slices_waited == 0
    assert lock.longest_slice[1] == "test pass" and lock.longest_slice[0] >= 0
    with pytest.raises(TypeError, match="str"), lock.exclusive(3):
        pass
