"""Imported by the guard's forkserver: does once, before any case forks, the lazy work that the first checkpoint
read of a process does (imports, torch's first load and meta-device module build), so the guard measures the
refusal and not that one-off set-up."""

import io
import tempfile

import torch
from safetensors.torch import load_file, save_file

import d2l_fast
from d2l_fast.adapters import AdapterBatch  # noqa: F401
from d2l_fast.checkpoint import _expected_shapes  # noqa: F401
from d2l_fast.hypernet import HyperLoRA  # noqa: F401
from d2l_fast.training import data  # noqa: F401

buf = io.BytesIO()
torch.save({"t": torch.zeros(2)}, buf)
buf.seek(0)
torch.load(buf, weights_only=True)
with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
    save_file({"t": torch.zeros(2)}, f.name)
    load_file(f.name)

_spec = d2l_fast.D2LSpec(base_model_name_or_path="warm", num_layers=1,
                         layer_indices=(0,), target_modules=("down_proj",),
                         d_in={"down_proj": 8}, d_out={"down_proj": 8}, feature_size=8, latent_size=8, lora_r=2,
                         lora_alpha=1.0, n_latent_queries=2, num_blocks=1, n_heads=2, head_dim=4, n_kv_heads=1)
_expected_shapes(_spec)
