"""Padding-free varlen encoder pass equals padded micro-batches, on four architectures (sliding windows included)."""

import pytest
import torch

from d2l_fast import varlen
from d2l_fast.encoder import ContextEncoder

from ._numerics import BATCHING
from ._tiny import tiny_model


@pytest.mark.parametrize("arch", ["gemma2", "llama", "qwen3", "mistral"])
def test_varlen_equals_padded(arch):
    assert varlen.register()
    kw = dict(sliding_window=8) if arch in ("gemma2", "mistral") else {}  # chunks longer than the window
    model = tiny_model(arch, **kw)
    before = model.config._attn_implementation
    enc = ContextEncoder(model, "per_layer_activations")
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randint(10, 400, (n,), generator=g).tolist() for n in [5, 17, 1, 30, 12]]
    padded = enc.encode_packed(chunks, varlen=False)
    packed = enc.encode_packed(chunks, varlen=True)
    small_rows = enc.encode_packed(chunks, varlen=True, token_budget=20)  # several packed rows
    torch.testing.assert_close(packed, padded, **BATCHING)
    torch.testing.assert_close(small_rows, padded, **BATCHING)
    assert model.config._attn_implementation == before  # restored after the pass
    with pytest.raises(RuntimeError, match="outside"):
        varlen.varlen_attention(None, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), None)


def test_encoder_row_planning():
    from d2l_fast.encoder import _budget_rows, _padded_batches

    # varlen: consecutive chunks per row of at most the budget; a longer chunk gets a row of its own
    assert _budget_rows([3, 3, 3, 10, 2, 1], 6) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    # padded: longest first, at most budget // longest rows, rows within max_pad_ratio of the longest
    assert _padded_batches([4, 10, 9, 2, 8], 20, 1.25) == [[1, 2], [4], [0], [3]]
    assert _padded_batches([4, 10, 9, 2, 8], 20, 5.0) == [[1, 2], [4, 0], [3]]
