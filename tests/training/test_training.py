"""Training support: gradients reach the hypernetwork through the packed (segmented) and padded LoRA paths."""

import torch

from d2l_fast import D2LModel

from .._numerics import PACKED_VS_PADDED_GRAD
from .._tiny import tiny_pair


def test_hypernet_gradients_packed_equal_padded():
    base, tok = tiny_pair("llama", seed=3)
    model = D2LModel.from_base(base, tok, seed=4, latent_size=32, num_blocks=2, n_heads=4, head_dim=16, n_kv_heads=2,
                               init_scaler_B=1.0)
    model.hypernet.train()
    docs = ["The fox lived under the old mill.", "The council met on Monday to discuss the roof and the lanterns."]
    packed = model.pack(docs)
    prompts = [tok("Where did the fox live?")["input_ids"], tok("Who met?")["input_ids"]]
    # packed: one row, position ids restart per prompt, segment i uses adapter i
    ids = torch.tensor([t for p in prompts for t in p]).unsqueeze(0)
    pos = torch.cat([torch.arange(len(p)) for p in prompts]).unsqueeze(0)

    def loss_packed():
        ad = model.merge(model.chunk_loras(packed), packed.n_chunks)
        logits = model(ids, None, adapters=ad, seg_lens=[len(p) for p in prompts], seg_adapter=[0, 1], position_ids=pos,
                       use_cache=False).logits
        return logits.float().logsumexp(-1).mean()

    def loss_padded():
        ad = model.merge(model.chunk_loras(packed), packed.n_chunks)
        n = max(len(p) for p in prompts)
        pid = torch.zeros(2, n, dtype=torch.long)
        mask = torch.zeros(2, n, dtype=torch.long)
        for i, p in enumerate(prompts):  # right padding so positions match the packed row
            pid[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        logits = model(pid, mask, adapters=ad, adapter_index=[0, 1]).logits
        return logits[mask.bool()].float().logsumexp(-1).mean()

    grads = []
    for fn in (loss_packed, loss_padded):
        model.hypernet.zero_grad()
        fn().backward()
        g = {k: p.grad.clone() for k, p in model.hypernet.named_parameters() if p.grad is not None}
        assert "head.weight" in g and "aggregator.perceiver.modality_projection.gate_proj.weight" in g
        assert "aggregator.perceiver.encoder.layers.0.self_attn.k_proj.weight" in g  # through the readout op
        assert all(torch.isfinite(v).all() for v in g.values())
        assert g["head.weight"].abs().max() > 0
        grads.append(g)
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], **PACKED_VS_PADDED_GRAD)
    assert all(p.grad is None and not p.requires_grad for p in model.base_model.parameters())  # base LM frozen
