"""The copy head (d2l_fast extension, ``spec.copy_modules``): its attention against a per-chunk loop, chunk
isolation, the zero-gate identity, input checks, the spec/checkpoint format, and a real tiny model end to end."""

import dataclasses

import pytest
import torch

from d2l_fast import D2LModel
from d2l_fast.checkpoint import CheckpointError, load_checkpoint, save_reference_checkpoint
from d2l_fast.config import D2LSpec
from d2l_fast.hypernet import HyperLoRA
from d2l_fast.hypernet.copy_head import COPY_KEY_DIM, copy_reference
from d2l_fast.packing import PackedContexts

from ._numerics import COPY_HEAD
from ._tiny import tiny_model


def _loop_reference(e, ctx, cu, ids, table, *, q_weight, q_bias, k_norm, k_weight, gates, module_index, eps):
    """The copy head written one (chunk, layer, module, rank) slot at a time, in float64."""
    e, ctx, table = e.double(), ctx.double(), table.double()
    C, L, M, R, D = e.shape
    out = {m: torch.zeros(C, L, R, table.shape[1], dtype=torch.float64) for m in gates}
    for c in range(C):
        lo, hi = int(cu[c]), int(cu[c + 1])
        x = ctx[lo:hi]
        kn = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * k_norm.double()
        k = kn @ k_weight.double()
        v = table[ids[lo:hi]]
        v = v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)
        for m, i in module_index.items():
            for layer in range(L):
                for r in range(R):
                    q = e[c, layer, i, r] @ q_weight[layer].double() + q_bias[0, layer, 0, 0].double()
                    w = torch.softmax(k @ q / COPY_KEY_DIM ** 0.5, dim=0)
                    out[m][c, layer, r] = (w[:, None] * v).sum(0) * gates[m][0, layer, r, 0].double()
    return out


def _params(L, D, R, modules, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(q_weight=torch.randn(L, D, COPY_KEY_DIM, generator=g) / D ** 0.5,
                q_bias=torch.randn(1, L, 1, 1, COPY_KEY_DIM, generator=g) * 0.1,
                k_norm=1 + 0.1 * torch.randn(D, generator=g), k_weight=torch.randn(D, COPY_KEY_DIM, generator=g),
                gates={m: torch.randn(1, L, R, 1, generator=g) for m in modules},
                module_index={m: i for i, m in enumerate(modules)}, eps=1e-6)


@pytest.mark.parametrize("lens,budget", [([3, 1, 5], 16384), ([1], 16384), ([7, 7], 16384), ([3, 1, 5, 2, 9], 10),
                                         ([4, 4, 4], 1)])
def test_copy_attention_matches_a_per_chunk_loop(lens, budget):
    """Padded groups (one, several under a small slot budget, one chunk each) equal the slot-by-slot loop."""
    L, M, R, D, V, d = 3, 2, 2, 16, 50, 12
    g = torch.Generator().manual_seed(1)
    C, T = len(lens), sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    e = torch.nn.functional.normalize(torch.randn(C, L, M, R, D, generator=g), dim=-1)
    ctx, ids, table = torch.randn(T, D, generator=g), torch.randint(0, V, (T,), generator=g), torch.randn(V, d)
    p = _params(L, D, R, ("a", "b"))
    got = copy_reference(e, ctx, cu, ids, table, slot_budget=budget, **p)
    want = _loop_reference(e, ctx, cu, ids, table, **p)
    for m in ("a", "b"):
        assert got[m].shape == (C, L, R, d)
        torch.testing.assert_close(got[m].double(), want[m], **COPY_HEAD)


def test_a_sharp_query_copies_that_tokens_embedding():
    """With the query pointing at one token's key, the B vector is that token's output embedding (unit RMS) × gate."""
    L, R, D, V, d = 1, 1, 8, 20, 6
    g = torch.Generator().manual_seed(2)
    ctx, ids, table = torch.randn(5, D, generator=g), torch.tensor([3, 7, 11, 7, 2]), torch.randn(V, d, generator=g)
    p = _params(L, D, R, ("a",))
    p["q_weight"].zero_()
    kn = ctx[2] / torch.sqrt(ctx[2].pow(2).mean() + p["eps"]) * p["k_norm"]
    p["q_bias"][0, 0, 0, 0] = 40.0 * torch.nn.functional.normalize(kn @ p["k_weight"], dim=0) * COPY_KEY_DIM ** 0.5
    e = torch.ones(1, L, 1, R, D)
    out = copy_reference(e, ctx, torch.tensor([0, 5]), ids, table, **p)["a"][0, 0, 0]
    v = table[11] / torch.sqrt(table[11].pow(2).mean() + p["eps"])
    torch.testing.assert_close(out, v * p["gates"]["a"][0, 0, 0, 0], **COPY_HEAD)


def test_chunks_never_read_each_other():
    L, M, R, D, V, d = 2, 1, 2, 16, 40, 8
    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 4, 9, 12])
    e = torch.randn(3, L, M, R, D, generator=g)
    ctx, ids, table = torch.randn(12, D, generator=g), torch.randint(0, V, (12,), generator=g), torch.randn(V, d)
    p = _params(L, D, R, ("a",))
    base = copy_reference(e, ctx, cu, ids, table, **p)["a"]
    ctx2, ids2 = ctx.clone(), ids.clone()
    ctx2[4:9] = torch.randn(5, D, generator=g)
    ids2[4:9] = (ids2[4:9] + 1) % V
    moved = copy_reference(e, ctx2, cu, ids2, table, **p)["a"]
    torch.testing.assert_close(moved[[0, 2]], base[[0, 2]], **COPY_HEAD)
    assert (moved[1] - base[1]).abs().max() > 1e-2  # the edited chunk's own vectors do change


# ------------------------------------------------------------------ spec and HyperLoRA
def _spec(**kw):
    d = dict(base_model_name_or_path="tiny", num_layers=2, layer_indices=(0, 1), target_modules=("down_proj", "o_proj"),
             d_in={"down_proj": 24, "o_proj": 16}, d_out={"down_proj": 16, "o_proj": 16}, feature_size=16,
             latent_size=32, lora_r=2, lora_alpha=4.0, n_latent_queries=4, num_blocks=1, n_heads=2, head_dim=8,
             n_kv_heads=1, encoder_type="early_exit", encoder_layer_idx=1)
    d.update(kw)
    s = D2LSpec(**d)
    s.validate()
    return s


def test_spec_format_and_refusals():
    plain = _spec()
    assert "copy_modules" not in plain.to_dict()  # plain configs (and fingerprints) stay the reference's
    s = _spec(copy_modules=("down_proj",))
    assert s.to_dict()["copy_modules"] == ["down_proj"]
    assert D2LSpec.from_dict(s.to_dict()) == s
    assert D2LSpec.from_dict(plain.to_dict()) == plain
    with pytest.raises(ValueError, match="copy_modules must be target modules"):
        _spec(copy_modules=("q_proj",))
    with pytest.raises(ValueError, match="copy_modules needs encoder_type 'early_exit'"):
        _spec(copy_modules=("down_proj",), encoder_type="per_layer_activations", encoder_layer_idx=None)
    with pytest.raises(ValueError, match="sorted tuple"):
        _spec(target_modules=("down_proj", "o_proj"), copy_modules=("o_proj", "down_proj"))
    with pytest.raises(ValueError, match="copy_modules must be a list"):
        D2LSpec.from_dict({**s.to_dict(), "copy_modules": "down_proj"})
    with pytest.raises(ValueError, match="distinct"):
        D2LSpec.from_dict({**s.to_dict(), "copy_modules": ["down_proj", "down_proj"]})


def _pair(seed=0):
    """A plain HyperLoRA and the same weights with a (zero-gated) copy head on down_proj."""
    torch.manual_seed(seed)
    plain = HyperLoRA(_spec())
    for p in plain.scaler_B.values():
        torch.nn.init.normal_(p)
    net = HyperLoRA(_spec(copy_modules=("down_proj",)))
    missing, unexpected = net.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("copy_head.") for k in missing)
    return plain, net


def _inputs(seed=0, lens=(5, 3)):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return torch.randn(T, 16, generator=g), cu, max(lens), len(lens), torch.randint(0, 30, (T,), generator=g), \
        torch.randn(30, 16, generator=g)


def test_zero_gate_keeps_the_adapters_and_the_gate_moves_only_b():
    plain, net = _pair()
    x, cu, mx, C, ids, table = _inputs()
    with torch.no_grad():
        a = plain(x, cu, mx, C)
        b = net(x, cu, mx, C, token_ids=ids, value_table=table)
        for m in a:
            for k in ("A", "B"):
                torch.testing.assert_close(b[m][k], a[m][k], **COPY_HEAD)
        net.copy_head.gate["down_proj"].fill_(0.5)
        c = net(x, cu, mx, C, token_ids=ids, value_table=table)
    torch.testing.assert_close(c["down_proj"]["A"], a["down_proj"]["A"], **COPY_HEAD)
    torch.testing.assert_close(c["o_proj"]["B"], a["o_proj"]["B"], **COPY_HEAD)  # not a copy module
    assert (c["down_proj"]["B"] - a["down_proj"]["B"]).abs().max() > 0.1


def test_gradients_reach_the_copy_head():
    _, net = _pair()
    x, cu, mx, C, ids, table = _inputs()
    with torch.no_grad():
        net.copy_head.gate["down_proj"].fill_(0.5)
    out = net(x, cu, mx, C, token_ids=ids, value_table=table)
    out["down_proj"]["B"].square().sum().backward()
    for name in ("copy_head.q.weight", "copy_head.k", "copy_head.k_norm", "copy_head.gate.down_proj", "head.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bad_copy_inputs_are_refused_before_any_work():
    _, net = _pair()
    x, cu, mx, C, ids, table = _inputs()
    cases = [
        (dict(), "pass token_ids="),
        (dict(token_ids=ids[:-1], value_table=table), r"int tensor of shape \(8,\)"),
        (dict(token_ids=ids.float(), value_table=table), "int tensor"),
        (dict(token_ids=ids, value_table=table[:, :5]), "d_out=16"),
        (dict(token_ids=ids, value_table=table[0]), "2-D tensor"),
        (dict(token_ids=ids.clone().fill_(30), value_table=table), r"token_ids must lie in \[0, 30\)"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            net(x, cu, mx, C, **kw)
    empty = torch.tensor([0, 5, 5, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="empty chunk"):
        net(x, empty, mx, 3, token_ids=ids, value_table=table)


# ------------------------------------------------------------------ a real tiny model, saved and loaded
@pytest.fixture(scope="module")
def tiny_copy_model():
    base = tiny_model("llama", seed=4)
    m = D2LModel.from_base(base, seed=1, encoder_type="early_exit", encoder_layer_idx=1, latent_size=32,
                           num_blocks=1, n_heads=2, head_dim=16, n_kv_heads=1, n_latent_queries=4,
                           target_modules=("down_proj",), copy_modules=["down_proj"], init_scaler_B=0.5)
    assert m.spec.copy_modules == ("down_proj",)  # a list of names becomes the spec's tuple
    with torch.no_grad():
        m.hypernet.copy_head.gate["down_proj"].normal_()
    return m


def test_model_round_trips_through_the_pickle_free_format(tiny_copy_model, tmp_path):
    m = tiny_copy_model
    packed = PackedContexts(chunks=[[5, 9, 33, 41], [7, 8, 120, 200], [17], [44, 45, 46]], n_chunks=[3, 1])
    with torch.no_grad():
        before = m.chunk_loras(packed)
    m.save_pretrained(tmp_path / "ck")
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.spec.copy_modules == ("down_proj",)
    m2 = D2LModel.from_checkpoint(ck, base_model=m.base_model)
    with torch.no_grad():
        after = m2.chunk_loras(packed)
        # the streamed inference path and the training path (features kept for autograd) agree
        inter = m2.chunk_loras(packed, intermediates={})
    for k in ("A", "B"):
        torch.testing.assert_close(after["down_proj"][k], before["down_proj"][k], **COPY_HEAD)
        torch.testing.assert_close(inter["down_proj"][k], before["down_proj"][k], **COPY_HEAD)
    assert m2.model_id == m.model_id
    with pytest.raises(CheckpointError, match="cannot hold a copy head"):
        save_reference_checkpoint(ck, tmp_path / "ref.bin")
    # a checkpoint whose copy head tensors went missing is refused by name, never half-loaded
    sd = {k: v for k, v in ck.state_dict.items() if not k.startswith("copy_head.gate")}
    with pytest.raises(CheckpointError, match="copy_head.gate"):
        D2LModel.from_checkpoint(dataclasses.replace(ck, state_dict=sd), base_model=m.base_model)


def test_model_feeds_the_copy_head_its_ids_and_output_embedding(tiny_copy_model):
    """B of the copy module = the plain head's B + copy attention over this document's token ids, with the base
    model's output embedding as values and the projected features the perceiver read as keys."""
    m = tiny_copy_model
    ids = [5, 9, 33, 41, 7, 300]
    packed = PackedContexts(chunks=[ids], n_chunks=[1])
    head = m.hypernet.copy_head
    with torch.no_grad():
        inter = {}
        b = m.chunk_loras(packed, intermediates=inter)["down_proj"]["B"]
        gate = head.gate["down_proj"].clone()
        head.gate["down_proj"].zero_()
        b0 = m.chunk_loras(packed)["down_proj"]["B"]
        head.gate["down_proj"].copy_(gate)
        e = torch.nn.functional.normalize(inter["pre_head"], dim=-1)
        ctx = inter["modality_projection"]
        want = copy_reference(e, ctx, torch.tensor([0, ctx.shape[0]]), torch.tensor(ids),
                              m.base_model.get_output_embeddings().weight, q_weight=head.q.weight,
                              q_bias=head.q.bias, k_norm=head.k_norm, k_weight=head.k, gates={"down_proj": gate},
                              module_index={"down_proj": 0}, eps=head.eps)["down_proj"]
    assert ctx.shape[0] == len(ids)
    torch.testing.assert_close(b - b0, want, **COPY_HEAD)
    assert want.abs().max() > 1e-2


def test_the_committed_seed_checkpoint_loads():
    """checkpoints/reading14-step1800 (the next reading run's init) stays loadable by the pickle-free loader."""
    import pathlib

    ck = load_checkpoint(pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "reading14-step1800").validate()
    assert ck.spec.copy_modules == ("down_proj",) and ck.spec.encoder_type == "early_exit"
    assert ck.state_dict["copy_head.gate.down_proj"].abs().max() > 0  # a trained head, not a fresh zero gate
