"""Encoder types and hypernetwork variants beyond the released main config."""

import copy

import pytest
import torch

from d2l_fast import D2LModel
from d2l_fast.encoder import ContextEncoder

from ._numerics import BATCHING
from ._tiny import tiny_pair

DOCS = ["The fox lived under the old mill.", "The council met on Monday " * 12, "Boats at dusk."]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_encoder_types_match_hf(arch):
    base, tok = tiny_pair(arch)
    ids = torch.tensor([tok("the river keeper wrote a date")["input_ids"]])
    full = ContextEncoder(base, "per_layer_activations")
    with torch.no_grad():
        hs = base.model(input_ids=ids, output_hidden_states=True).hidden_states
        feats = full(ids)
        n = len(base.model.layers)
        assert feats.shape[1] == n  # L feature maps for L layers: layer-to-layer mode
        for j in range(n - 1):
            torch.testing.assert_close(feats[:, j], hs[j])
        trunc = copy.deepcopy(base)
        trunc.model.layers = trunc.model.layers[:1]
        last = trunc.model(input_ids=ids).last_hidden_state  # final norm of layer 0's output
        if n == 2:  # per-layer mode keeps n-1 = 1 layer: its last map is that same final-norm output
            torch.testing.assert_close(feats[:, -1], last)
        torch.testing.assert_close(ContextEncoder(base, "early_exit", layer_idx=1)(ids), last)
        torch.testing.assert_close(ContextEncoder(base, "embed_only")(ids), hs[0])


@pytest.mark.parametrize("variant", [
    dict(encoder_type="early_exit", n_latent_queries=16),
    dict(encoder_type="embed_only"),
    dict(per_layer_processing=False, num_pre_head_layers=2),
    dict(num_self_attn_per_block=1, shared_weights=True, num_blocks=3),
    dict(target_modules=("down_proj", "q_proj", "v_proj")),
])
def test_variants_internalize_and_generate(variant):
    base, tok = tiny_pair("llama", seed=2)
    kw = dict(latent_size=32, num_blocks=2, n_heads=4, head_dim=16, n_kv_heads=2, init_scaler_B=1.0, max_chunk_len=40)
    kw.update(variant)
    model = D2LModel.from_base(base, tok, seed=3, **kw)
    ad = model.internalize(DOCS)
    assert ad.modules == sorted(kw.get("target_modules", ("down_proj",)))
    assert ad.ranks == [(n + 1) * 8 for n in model.pack(DOCS).n_chunks]
    alone = model.internalize([DOCS[1]])
    for m in ad.modules:
        torch.testing.assert_close(ad[1].A[m], alone.A[m], **BATCHING)
        torch.testing.assert_close(ad[1].B[m], alone.B[m], **BATCHING)
    ids, mask = model.encode_prompts(["Where did the fox live?", "Who met?"])
    out = model(ids, mask, adapters=ad, adapter_index=[0, 2]).logits
    base_out = model(ids, mask).logits
    assert (out - base_out).abs().max() > 1e-4


def test_save_pretrained_roundtrip(tmp_path):
    base, tok = tiny_pair("qwen3")
    model = D2LModel.from_base(base, tok, seed=1, latent_size=32, num_blocks=1, n_heads=4, head_dim=16, n_kv_heads=2,
                               init_scaler_B=1.0)
    model.save_pretrained(tmp_path / "ck")
    again = D2LModel.from_checkpoint(tmp_path / "ck", base_model=base, tokenizer=tok)
    assert again.model_id == model.model_id
    a, b = model.internalize(DOCS[:2]), again.internalize(DOCS[:2])
    assert torch.equal(a.A["down_proj"], b.A["down_proj"])
