"""Checkpoints: the reference's ``pytorch_model.bin`` (safely), a pickle-free format, and the hub layout.

Reference format (spec §3): a torch zip pickle of an OrderedDict with the hypernetwork's fp32 tensors
plus ``base_model_name_or_path`` (str), ``hypernet_config`` and ``ctx_encoder_args`` (pickled
dataclasses of ``ctx_to_lora`` / ``peft``). We read it with ``torch.load(weights_only=True)`` and an
allowlist that maps exactly those dotted class names onto d2l_fast's own config classes, so neither
``ctx_to_lora`` nor ``peft`` is needed and no arbitrary pickle code can run: any other global is
refused by torch's restricted unpickler.

Pickle-free format: a folder with ``d2l_config.json`` (the :class:`~d2l_fast.config.D2LSpec`) and
``hypernet.safetensors`` (same tensor names as the reference).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import zipfile
from dataclasses import dataclass

import torch

from .config import (
    AggregatorConfig,
    CtxEncoderArguments,
    D2LSpec,
    HypernetConfig,
    LoraConfig,
    LoraRuntimeConfig,
    PeftType,
    TaskType,
)

logger = logging.getLogger(__name__)

META_KEYS = ("base_model_name_or_path", "hypernet_config", "ctx_encoder_args")
CONFIG_NAME = "d2l_config.json"
WEIGHTS_NAME = "hypernet.safetensors"
REFERENCE_WEIGHTS_NAME = "pytorch_model.bin"
FORMAT_VERSION = 1

# Every dotted name the reference's checkpoints are known to pickle, mapped onto our classes.
_REFERENCE_GLOBALS = {
    "ctx_to_lora.modeling.hypernet.HypernetConfig": HypernetConfig,
    "ctx_to_lora.modeling_utils.HypernetConfig": HypernetConfig,
    "ctx_to_lora.modeling.aggregator.AggregatorConfig": AggregatorConfig,
    "ctx_to_lora.modeling_utils.AggregatorConfig": AggregatorConfig,
    "ctx_to_lora.configs.CtxEncoderArguments": CtxEncoderArguments,
    "ctx_to_lora.modeling_utils.CtxEncoderArguments": CtxEncoderArguments,
    "peft.tuners.lora.config.LoraConfig": LoraConfig,
    "peft.tuners.lora.LoraConfig": LoraConfig,
    "peft.tuners.lora.config.LoraRuntimeConfig": LoraRuntimeConfig,
    "peft.utils.peft_types.PeftType": PeftType,
    "peft.utils.peft_types.TaskType": TaskType,
    "builtins.set": set,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe, or does not match the model."""


@dataclass
class LoadedCheckpoint:
    """A parsed Doc-to-LoRA checkpoint: the normalised spec and the hypernetwork tensors (fp32, CPU)."""

    spec: D2LSpec
    state_dict: dict[str, torch.Tensor]
    source: str = ""
    hypernet_config: object = None
    ctx_encoder_args: object = None

    @property
    def base_model_name_or_path(self) -> str:
        return self.spec.base_model_name_or_path

    def to_reference_state_dict(self) -> dict:
        """The dict shape the reference's ``from_state_dict`` expects (tensors + the three metadata keys)."""
        hc, ce = (self.hypernet_config, self.ctx_encoder_args)
        if hc is None or ce is None:
            hc, ce = self.spec.to_reference()
        sd = dict(self.state_dict)
        sd["base_model_name_or_path"] = self.spec.base_model_name_or_path
        sd["hypernet_config"] = hc
        sd["ctx_encoder_args"] = ce
        return sd


def _safe_globals():
    return [(obj, name) for name, obj in _REFERENCE_GLOBALS.items()]


def _torch_load_reference(path: pathlib.Path) -> dict:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a torch zip checkpoint (expected the reference's pytorch_model.bin); "
            "the file is truncated, corrupt or in another format"
        )
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it pickles something outside the Doc-to-LoRA allowlist "
            f"({', '.join(sorted(set(_REFERENCE_GLOBALS)))}). Only load files you trust with other tools. "
            f"Details: {e}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"{path} could not be read (truncated or corrupt?): {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict state_dict at the top level, got {type(obj).__name__}")
    return obj


def split_reference_state_dict(sd: dict, *, source: str = "<dict>", copy: bool = True) -> LoadedCheckpoint:
    """Split a reference state dict into (spec, tensors). Does not mutate ``sd`` unless ``copy=False``."""
    if copy:
        sd = dict(sd)
    missing = [k for k in META_KEYS if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: not a Doc-to-LoRA checkpoint, missing entries {missing}")
    base = sd.pop("base_model_name_or_path")
    hc = sd.pop("hypernet_config")
    ce = sd.pop("ctx_encoder_args")
    tensors = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} should be a tensor, got {type(v).__name__}")
        k = k.replace("_orig_mod.", "")
        tensors[k] = v.detach().to("cpu")
    try:
        spec = D2LSpec.from_reference(base, hc, ce)
    except (AttributeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{source}: malformed hypernet_config / ctx_encoder_args: {e}") from e
    return LoadedCheckpoint(spec=spec, state_dict=tensors, source=source, hypernet_config=hc, ctx_encoder_args=ce)


def _resolve_hub(path_or_id: str, subfolder: str | None, revision: str | None) -> pathlib.Path:
    """Download a folder of the hub layout (e.g. ``SakanaAI/doc-to-lora``, ``gemma_demo/checkpoint-80000``)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - hub is an optional extra
        raise CheckpointError(f"{path_or_id!r} is not a local path and huggingface_hub is not installed") from e
    pattern = f"{subfolder.strip('/')}/*" if subfolder else None
    local = snapshot_download(path_or_id, revision=revision, allow_patterns=[pattern] if pattern else None)
    return pathlib.Path(local) / (subfolder or "")


def resolve_checkpoint_path(path_or_id, subfolder: str | None = None, revision: str | None = None) -> pathlib.Path:
    """Local file, local folder (either format), or a hub repo id (+ subfolder)."""
    p = pathlib.Path(path_or_id)
    if p.exists():
        if subfolder:
            p = p / subfolder
    elif isinstance(path_or_id, str) and path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/")):
        p = _resolve_hub(path_or_id, subfolder, revision)
    else:
        raise CheckpointError(f"checkpoint {str(path_or_id)!r} not found (expected a file, a folder or a hub repo id)")
    if p.is_dir():
        for name in (CONFIG_NAME, REFERENCE_WEIGHTS_NAME):
            if (p / name).exists():
                return p / name if name == REFERENCE_WEIGHTS_NAME else p
        raise CheckpointError(f"{p} holds neither {CONFIG_NAME} nor {REFERENCE_WEIGHTS_NAME}")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} not found")
    return p


def load_checkpoint(path_or_id, subfolder: str | None = None, revision: str | None = None) -> LoadedCheckpoint:
    """Load a Doc-to-LoRA checkpoint without ``ctx_to_lora``, ``peft`` or arbitrary pickle code.

    Accepts the reference's ``pytorch_model.bin`` (CPU- or CUDA-tagged storages), a folder holding it,
    a pickle-free folder written by :func:`save_checkpoint`, or a hub repo id with ``subfolder``
    (e.g. ``load_checkpoint("SakanaAI/doc-to-lora", "gemma_demo/checkpoint-80000")``).
    """
    p = resolve_checkpoint_path(path_or_id, subfolder, revision)
    if p.is_dir():
        return load_safetensors_checkpoint(p)
    sd = _torch_load_reference(p)
    return split_reference_state_dict(sd, source=str(p), copy=False)


def save_checkpoint(ckpt: LoadedCheckpoint | tuple, folder) -> pathlib.Path:
    """Write the pickle-free format: ``d2l_config.json`` + ``hypernet.safetensors`` (atomic per file)."""
    from safetensors.torch import save_file

    if isinstance(ckpt, tuple):
        ckpt = LoadedCheckpoint(spec=ckpt[0], state_dict=ckpt[1])
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in ckpt.state_dict.items()}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "d2l_fast", "version": str(FORMAT_VERSION)})
    os.replace(tmp, folder / WEIGHTS_NAME)
    cfg = {"format_version": FORMAT_VERSION, "spec": ckpt.spec.to_dict()}
    tmp = folder / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=1, sort_keys=True))
    os.replace(tmp, folder / CONFIG_NAME)
    return folder


def load_safetensors_checkpoint(folder) -> LoadedCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = pathlib.Path(folder)
    try:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: unreadable config: {e}") from e
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: format_version {cfg.get('format_version')!r}, expected {FORMAT_VERSION}")
    spec = D2LSpec.from_dict(cfg["spec"])
    try:
        tensors = load_file(str(folder / WEIGHTS_NAME), device="cpu")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{folder / WEIGHTS_NAME}: unreadable weights (truncated or corrupt?): {e}") from e
    return LoadedCheckpoint(spec=spec, state_dict=tensors, source=str(folder))


def save_reference_checkpoint(ckpt: LoadedCheckpoint, path) -> pathlib.Path:
    """Write a ``pytorch_model.bin`` in the reference's layout (for tools that expect it).

    Note the pickled config classes are d2l_fast's, so the reference itself needs an alias to read it.
    """
    path = pathlib.Path(path)
    torch.save(ckpt.to_reference_state_dict(), path)
    return path


__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "load_checkpoint",
    "load_safetensors_checkpoint",
    "save_checkpoint",
    "save_reference_checkpoint",
    "split_reference_state_dict",
]
