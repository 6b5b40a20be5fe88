"""The FlexAttention encoder backend (d2l_fast.flex, ``attention="flex"``) against the blocked varlen path and against
each document encoded alone (plain HF attention, no packing), on a tiny Gemma-2 (logit soft-capping, sliding window)
and a tiny Llama. Off CUDA flex runs eagerly (torch's unfused reference of the same score_mod / mask_mod)."""

import pytest
import torch

from d2l_fast import flex, varlen
from d2l_fast.encoder import ContextEncoder, encode_in_slices
from d2l_fast.flex import BLOCK

from ._numerics import BATCHING, BF16_ENCODER_REL, SLICED
from ._tiny import tiny_model

pytestmark = pytest.mark.skipif(not flex.available(), reason="torch without FlexAttention")

WINDOW = 8
# one document of one token, one of an odd length, several (one of length 1, two longer than the window), and a
# row longer than a 128-token block whose documents straddle block boundaries
PACKS = [[1], [13], [5, 17, 1, 30, 12], [1, 130, 7, 61]]


def _model(arch, dtype=torch.float32):
    # a soft-cap of 0.02 makes tanh bite on the tiny random model's small scores (Gemma-2's 50 would be the identity
    # here): without it the features move by ~0.2, 10^4 x the tolerance
    kw = dict(sliding_window=WINDOW, attn_logit_softcapping=0.02) if arch == "gemma2" else {}
    return tiny_model(arch, dtype=dtype, **kw)


def _chunks(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 500, (n,), generator=g).tolist() for n in lengths]


def _alone(enc, chunks):
    """Each chunk through the model's own attention, one at a time: [n_features, Σ len, H]."""
    outs = [enc(torch.tensor([c])) for c in chunks]
    return torch.cat([o[0] if enc.encoder_type == "per_layer_activations" else o for o in outs], dim=-2)


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
@pytest.mark.parametrize("lengths", PACKS, ids=lambda x: "-".join(map(str, x)))
def test_flex_matches_blocked_and_alone(arch, lengths):
    model = _model(arch)
    enc = ContextEncoder(model, "per_layer_activations")
    chunks = _chunks(lengths)
    flexed = enc.encode_packed(chunks, attention="flex")
    torch.testing.assert_close(flexed, enc.encode_packed(chunks, attention="blocked"), **BATCHING)
    torch.testing.assert_close(flexed, _alone(enc, chunks), **BATCHING)
    if len(lengths) > 1 and max(lengths) < BLOCK:  # several rows of one pass each
        torch.testing.assert_close(enc.encode_packed(chunks, attention="flex", token_budget=max(lengths)), flexed,
                                   **BATCHING)


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_flex_in_token_windows(arch):
    """Encoder passes in token windows (encode_in_slices: queries of the window against the row's keys so far, a
    0-d offset in the mask) give the whole-row features; windows across chunk ends and longer than a block."""
    enc = ContextEncoder(_model(arch), "per_layer_activations")
    chunks = _chunks([1, 130, 7, 61])
    whole = enc.encode_packed(chunks, attention="blocked")
    for n in (50, 150):
        with encode_in_slices(n):
            torch.testing.assert_close(enc.encode_packed(chunks, attention="flex"), whole, **SLICED)


def test_flex_bf16_in_bf16_out():
    """bf16 weights: flex's features are bf16 and as close to the fp32 features as the blocked bf16 path's."""
    chunks = _chunks([5, 17, 1, 30, 12])
    ref = ContextEncoder(_model("gemma2"), "per_layer_activations").encode_packed(chunks, attention="blocked")
    enc = ContextEncoder(_model("gemma2", torch.bfloat16), "per_layer_activations")
    flexed, blocked = (enc.encode_packed(chunks, attention=a) for a in ("flex", "blocked"))
    assert flexed.dtype == blocked.dtype == torch.bfloat16
    for got in (flexed, blocked):
        assert ((got.float() - ref).norm() / ref.norm()).item() < BF16_ENCODER_REL


def test_block_mask_and_score_mod():
    """The row's token mask is document-causal (windowed) and skips whole blocks of other documents; the score_mod
    is cap·tanh(s/cap)."""
    lengths = [1, 130, 7, 200]
    masks = flex.PackedMasks(lengths, "cpu")
    T = sum(lengths)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for window in (None, 16):
        want = (doc[:, None] == doc[None, :]) & (q >= k)
        if window is not None:
            want &= q - k < window
        bm = masks.block_mask(window)
        got = bm.mask_mod(torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), q, k)
        assert torch.equal(got, want)
        assert bm.sparsity() > 0  # blocks of other documents are not visited at all
        assert masks.block_mask(window) is bm  # built once per pass
    assert masks.block_mask(1000) is masks.block_mask(None)  # a window no chunk reaches is no window
    s = torch.linspace(-40, 40, 9)
    torch.testing.assert_close(flex.softcap_score_mod(5.0)(s, 0, 0, 0, 0), 5.0 * torch.tanh(s / 5.0))


def test_backend_choice():
    q = torch.zeros(1, 2, 3, 4)
    with varlen.packed_attention(_model("llama"), [3], "cpu", backend="auto"):
        assert varlen._pick_backend(q, 50.0) == "blocked"  # off CUDA auto never compiles flex
    with varlen.packed_attention(_model("llama"), [3], "cpu", backend="flex"):
        assert varlen._pick_backend(q, None) == "flex"
    with varlen.packed_attention(_model("llama"), [3], "cpu", backend="flash"):
        with pytest.raises(RuntimeError, match="flash-attn and a CUDA"):
            varlen._pick_backend(q, None)


def test_bad_inputs():
    model = _model("gemma2")
    enc = ContextEncoder(model, "per_layer_activations")
    with pytest.raises(ValueError, match="attention must be one of"):
        enc.encode_packed([[3, 4]], attention="fast")
    with pytest.raises(ValueError, match="attention must be one of"):
        enc.attention = "flexible"
    with pytest.raises(ValueError, match="backend must be one of"):
        with varlen.packed_attention(model, [2], "cpu", backend="sdpa"):
            pass
    with pytest.raises(ValueError, match="lengths must be"):
        with varlen.packed_attention(model, [2, 0], "cpu"):
            pass
    # eager flex would hold H·T² scores above the pass's bound: refused with the way out
    with pytest.raises(ValueError, match="attention='blocked'"):
        enc.encode_packed([list(range(10, 210))], attention="flex", token_budget=1)
    with pytest.raises(ValueError, match="positive finite"):
        flex.softcap_score_mod(0.0)
    with pytest.raises(ValueError, match="non-empty list of positive ints"):
        flex.PackedMasks([3, 0], "cpu")
    with pytest.raises(ValueError, match="window must be a positive int"):
        flex.PackedMasks([3], "cpu").block_mask(0)
    q, kv = torch.zeros(1, 4, 5, 16), torch.zeros(1, 2, 5, 16)
    with pytest.raises(ValueError, match="add up to 4 tokens"):
        flex.packed_flex_attention(q, kv, kv, flex.PackedMasks([2, 2], "cpu"), scaling=0.25)
    with pytest.raises(ValueError, match="the 7 tokens up to the last query"):
        flex.packed_flex_attention(q, kv, kv, flex.PackedMasks([2, 6], "cpu"), scaling=0.25, q_start=2)
    with pytest.raises(ValueError, match="not a token window"):
        flex.PackedMasks([3], "cpu").block_mask(None, 2, 2)
    with pytest.raises(ValueError, match="number of heads dividing 4"):
        flex.packed_flex_attention(q, torch.zeros(1, 3, 5, 16), torch.zeros(1, 3, 5, 16), flex.PackedMasks([5], "cpu"),
                                   scaling=0.25)
    with pytest.raises(ValueError, match="dtypes differ"):
        flex.packed_flex_attention(q, kv.half(), kv, flex.PackedMasks([5], "cpu"), scaling=0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_cuda_flex_compiled(arch):
    """On CUDA in bf16: auto picks flex (compiled, block-sparse), its features match the fp32 CPU features as the
    blocked bf16 path does, and several rows and shapes reuse the compiled kernel."""
    chunks = _chunks([5, 17, 1, 30, 12, 140])
    ref = ContextEncoder(_model(arch), "per_layer_activations").encode_packed(chunks, attention="blocked")
    enc = ContextEncoder(_model(arch, torch.bfloat16).cuda(), "per_layer_activations")
    q = torch.zeros(1, 4, 3, 16, device="cuda", dtype=torch.bfloat16)
    with varlen.packed_attention(enc.model, [3], "cuda"):
        assert varlen._pick_backend(q, 50.0) == "flex"
    for kw in (dict(attention="auto"), dict(attention="flex", token_budget=64), dict(attention="blocked")):
        got = enc.encode_packed(chunks, **kw)
        assert got.dtype == torch.bfloat16 and got.is_cuda
        assert ((got.float().cpu() - ref).norm() / ref.norm()).item() < BF16_ENCODER_REL, kw
    assert not varlen._flex_broken, varlen._flex_broken
