"""The fused MLP LoRA wired into a patched HF model (opt-in): outputs equal the unfused patched path on tiny random
Llama (SiLU) and Gemma-2 (GELU-tanh) configs, CPU torch path; gate/up LoRA and training stay unfused."""

from __future__ import annotations

import pytest
import torch

import d2l_fast.patching as patching
from d2l_fast.adapters import AdapterBatch
from d2l_fast.patching import LoRABinding, mlp_activation, patch_model, set_fused_mlp, unpatch_model

from ._numerics import FUSED_MLP_LOGITS
from ._tiny import tiny_model


def _adapters(model, modules, ranks, seed=0, alpha=2.0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    L, R = cfg.num_hidden_layers, sum(ranks)
    dims = {"down_proj": (cfg.intermediate_size, cfg.hidden_size), "gate_proj": (cfg.hidden_size,
            cfg.intermediate_size)}  # fmt: skip
    A = {m: torch.randn(L, R, dims[m][0], generator=g) / dims[m][0] ** 0.5 for m in modules}
    B = {m: torch.randn(L, R, dims[m][1], generator=g) / 4 for m in modules}
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    return AdapterBatch(A=A, B=B, rank_offsets=offs, alpha=alpha, model_id="tiny")


@pytest.fixture
def count_fused(monkeypatch):
    calls = []
    real = patching.gated_lora_shrink

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(patching, "gated_lora_shrink", counting)
    return calls


def _logits(model, ctx, binding, ids):
    with torch.no_grad(), ctx.bound(binding):
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch, act", [("llama", "silu"), ("gemma2", "gelu_tanh")])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_fused_equals_unfused(arch, act, layout, count_fused):
    model = tiny_model(arch)
    ctx = patch_model(model, ["down_proj"])
    ad = _adapters(model, ["down_proj"], [8, 24, 72])
    L = model.config.num_hidden_layers
    if layout == "packed":  # 4 documents in one row, one without adapter, one empty
        ids = torch.randint(5, 500, (1, 23), generator=torch.Generator().manual_seed(1))
        binding = LoRABinding(ad, {i: i for i in range(L)}, seg_lens=[5, 0, 9, 4, 5], seg_adapter=[2, 1, 0, -1, 2])
    else:
        ids = torch.randint(5, 500, (3, 7), generator=torch.Generator().manual_seed(1))
        binding = LoRABinding(ad, {i: i for i in range(L)}, row_adapter=[1, -1, 2])
    bare = _logits(model, ctx, None, ids)
    unfused = _logits(model, ctx, binding, ids)
    assert count_fused == []
    assert set_fused_mlp(model, True) == L
    assert {m._d2l_act for m in model.modules() if hasattr(m, "_d2l_act")} == {act}
    fused = _logits(model, ctx, binding, ids)
    assert len(count_fused) == L
    assert (unfused - bare).abs().max() > 1e-2  # the adapter matters, far above the tolerance
    torch.testing.assert_close(fused, unfused, **FUSED_MLP_LOGITS)
    torch.testing.assert_close(_logits(model, ctx, None, ids), bare, atol=0, rtol=0)  # no binding: the bare MLP
    assert set_fused_mlp(model, False) == 0
    torch.testing.assert_close(_logits(model, ctx, binding, ids), unfused, atol=0, rtol=0)
    unpatch_model(model)
    assert not any(hasattr(m, "_d2l_mlp_orig_forward") for m in model.modules())


def test_gate_lora_and_training_stay_unfused(count_fused):
    model = tiny_model("llama")
    ctx = patch_model(model, ["gate_proj", "down_proj"], fused_mlp=True)
    ad = _adapters(model, ["gate_proj", "down_proj"], [8, 16])
    L = model.config.num_hidden_layers
    binding = LoRABinding(ad, {i: i for i in range(L)}, row_adapter=[0, 1])
    ids = torch.randint(5, 500, (2, 6), generator=torch.Generator().manual_seed(2))
    fused = _logits(model, ctx, binding, ids)
    assert len(count_fused) == L
    set_fused_mlp(model, False)
    torch.testing.assert_close(fused, _logits(model, ctx, binding, ids), **FUSED_MLP_LOGITS)
    set_fused_mlp(model, True)
    count_fused.clear()
    for t in (*ad.A.values(), *ad.B.values()):
        t.requires_grad_(True)
    with ctx.bound(binding):
        model(input_ids=ids, use_cache=False).logits.sum().backward()
    assert count_fused == [] and ad.A["down_proj"].grad is not None  # gradients: the unfused, differentiable path


def test_activation_probe_and_errors():
    assert mlp_activation(torch.nn.SiLU()) == "silu"
    assert mlp_activation(lambda t: torch.nn.functional.gelu(t, approximate="tanh")) == "gelu_tanh"
    assert mlp_activation(torch.nn.GELU()) is None  # exact erf GELU: not the kernel's function
    assert mlp_activation(None) is None
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs a patched model"):
        set_fused_mlp(model)
    patch_model(model, ["down_proj"])
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_fused_mlp(model, "yes")
