"""Safe checkpoint loading: reference pickles without ctx_to_lora/peft, refusal of foreign pickles, pickle-free
format."""

import os
import shutil
import sys

import pytest
import torch

from d2l_fast import CheckpointError, D2LModel, load_checkpoint, save_checkpoint
from d2l_fast.checkpoint import split_reference_state_dict


def test_reference_modules_not_needed(golden_dir):
    assert "ctx_to_lora" not in sys.modules
    ck = load_checkpoint(golden_dir / "pytorch_model.bin")
    assert "ctx_to_lora" not in sys.modules
    assert ck.spec.base_model_name_or_path == "tiny-gemma2"
    assert ck.spec.lora_alpha == pytest.approx(45.254833995939045)
    assert ck.spec.target_modules == ("down_proj",)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in ck.state_dict.values())


def test_folder_and_hub_layout_offline(golden_dir, tmp_path):
    # the hub layout: <repo>/<run>/checkpoint-N/pytorch_model.bin, resolved from a local folder
    sub = tmp_path / "doc-to-lora" / "gemma_demo" / "checkpoint-80000"
    sub.mkdir(parents=True)
    shutil.copy(golden_dir / "pytorch_model.bin", sub / "pytorch_model.bin")
    a = load_checkpoint(tmp_path / "doc-to-lora", subfolder="gemma_demo/checkpoint-80000")
    b = load_checkpoint(sub)
    assert a.spec == b.spec


def test_safetensors_roundtrip(golden_dir, tmp_path):
    ck = load_checkpoint(golden_dir / "pytorch_model.bin")
    save_checkpoint(ck, tmp_path / "st")
    assert sorted(os.listdir(tmp_path / "st")) == ["d2l_config.json", "hypernet.safetensors"]
    ck2 = load_checkpoint(tmp_path / "st")
    assert ck2.spec == ck.spec
    for k, v in ck.state_dict.items():
        assert torch.equal(ck2.state_dict[k], v)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/d2l_fast_pwned",))


def test_malicious_pickle_is_refused(golden_dir, tmp_path):
    sd = load_checkpoint(golden_dir / "pytorch_model.bin").to_reference_state_dict()
    sd["evil"] = Evil()
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not os.path.exists("/tmp/d2l_fast_pwned")


class NotAllowed:
    pass


def test_unknown_class_is_refused(tmp_path):
    path = tmp_path / "x.bin"
    torch.save({"hypernet_config": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="allowlist"):
        load_checkpoint(path)


def test_truncated_and_corrupt_files(golden_dir, tmp_path):
    data = (golden_dir / "pytorch_model.bin").read_bytes()
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(trunc)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="not a torch zip"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.bin")
    st = tmp_path / "st"
    save_checkpoint(load_checkpoint(golden_dir / "pytorch_model.bin"), st)
    w = st / "hypernet.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_checkpoint(st)


def test_not_a_d2l_state_dict():
    with pytest.raises(CheckpointError, match="missing entries"):
        split_reference_state_dict({"a": torch.zeros(1)})


def test_state_dict_not_mutated(golden_dir):
    sd = load_checkpoint(golden_dir / "pytorch_model.bin").to_reference_state_dict()
    keys = set(sd)
    split_reference_state_dict(sd)
    assert set(sd) == keys


def test_mismatched_base_model_is_rejected(golden_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16)
    wrong = AutoModelForCausalLM.from_config(cfg)  # same hidden size, down_proj 128->64 instead of 256->64
    with pytest.raises(CheckpointError, match="down_proj"):
        D2LModel.from_checkpoint(golden_dir / "pytorch_model.bin", base_model=wrong)
    cfg2 = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(CheckpointError, match="hidden_size"):
        D2LModel.from_checkpoint(golden_dir / "pytorch_model.bin", base_model=AutoModelForCausalLM.from_config(cfg2))
