"""The parts of a :class:`~d2l_fast.model.D2LModel`: from a checkpoint (:func:`load_checkpoint_parts`: the
checkpoint, its model card, the base model, the tokenizer and the hypernetwork with the checkpoint's weights) or a
fresh untrained hypernetwork for a base model (:func:`fresh_hypernet`).

:meth:`D2LModel.from_checkpoint <d2l_fast.model.D2LModel.from_checkpoint>` and :meth:`D2LModel.from_base
<d2l_fast.model.D2LModel.from_base>` build the model from these; this module does not know the model class.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

from .checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from .config import D2LSpec
from .hf import check_base_model, load_base_model, spec_for_model
from .hypernet import HyperLoRA
from .model_card import card_folder, read_model_card

logger = logging.getLogger("d2l_fast.model")  # the messages of D2LModel.from_checkpoint, as before the move


class CheckpointParts(NamedTuple):
    """What :func:`load_checkpoint_parts` returns."""

    base_model: nn.Module
    hypernet: HyperLoRA
    tokenizer: object
    #: why there is no tokenizer (None when there is one)
    tokenizer_note: str | None
    #: the checkpoint folder's model card (``{}`` when it has none; see :mod:`d2l_fast.model_card`)
    card: dict


def _base_model(src, spec: D2LSpec, *, dtype, device, base_model_kwargs: dict | None, strict_base_name: bool):
    if isinstance(src, nn.Module):
        name = getattr(src.config, "_name_or_path", "")
        if strict_base_name and name and name != spec.base_model_name_or_path:
            raise CheckpointError(f"checkpoint was trained on {spec.base_model_name_or_path!r}, got {name!r}")
        return src
    bmk = dict(base_model_kwargs or {})
    for key in ("dtype", "torch_dtype", "device"):  # the reference passes these through base_model_kwargs
        if key in bmk:
            v, own = bmk.pop(key), device if key == "device" else dtype
            if own is not None and v != own:
                raise ValueError(f"base_model_kwargs[{key!r}]={v!r} conflicts with "
                                 f"{'device' if key == 'device' else 'dtype'}={own!r}")
            if key == "device":
                device = v
            else:
                dtype = v
    model = load_base_model(src, dtype=dtype, device=device, **bmk)
    if strict_base_name and str(src) != spec.base_model_name_or_path:
        raise CheckpointError(f"checkpoint was trained on {spec.base_model_name_or_path!r}, got {src!r}")
    return model


def _tokenizer(tokenizer, src, spec: D2LSpec):
    """``(tokenizer, note)``: the tokenizer to use and, when there is none, why."""
    from .packing import get_tokenizer

    if tokenizer is None and not isinstance(src, nn.Module):
        # the reference builds the model without a tokenizer; only text calls need one
        try:
            return get_tokenizer(src, model_name=spec.base_model_name_or_path), None
        except (OSError, ValueError) as e:
            note = f"no tokenizer could be loaded from {str(src)!r}: {e}"
            logger.warning("%s; id-level calls work, text calls need tokenizer=", note)
            return None, note
    if isinstance(tokenizer, (str,)) or hasattr(tokenizer, "__fspath__"):
        return get_tokenizer(tokenizer, model_name=spec.base_model_name_or_path), None
    if tokenizer is None:
        return None, "base_model was an already-loaded model and no tokenizer= was given"
    return tokenizer, None


def load_checkpoint_parts(checkpoint, base_model=None, tokenizer=None, *, subfolder=None, dtype=None, device=None,
                          base_model_kwargs: dict | None = None, hypernet_dtype=torch.float32,
                          strict_base_name=False) -> CheckpointParts:
    """The parts of a model from a checkpoint (path, hub id, reference state dict or :class:`LoadedCheckpoint`);
    the arguments are :meth:`D2LModel.from_checkpoint <d2l_fast.model.D2LModel.from_checkpoint>`'s. The model card
    is read (a bad one is an error) before the base model loads; the checkpoint's tensor names and shapes are
    checked before the hypernetwork is allocated."""
    from .checkpoint import split_reference_state_dict

    if isinstance(checkpoint, LoadedCheckpoint):
        ckpt = checkpoint
    elif isinstance(checkpoint, dict):
        ckpt = split_reference_state_dict(checkpoint)
    else:
        ckpt = load_checkpoint(checkpoint, subfolder=subfolder)
    spec = ckpt.spec
    folder = card_folder(ckpt.source)
    card = read_model_card(folder) if folder is not None else {}
    src = base_model if base_model is not None else spec.base_model_name_or_path
    model = _base_model(src, spec, dtype=dtype, device=device, base_model_kwargs=base_model_kwargs,
                        strict_base_name=strict_base_name)
    tokenizer, tokenizer_note = _tokenizer(tokenizer, src, spec)
    check_base_model(model, spec)
    ckpt.validate()  # names/shapes checked on the meta device before the hypernetwork is allocated
    hypernet = HyperLoRA(spec)
    missing, unexpected = hypernet.load_state_dict(ckpt.state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint tensors do not match the hypernetwork built from its config: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    dev = next(model.parameters()).device
    hypernet.to(device=dev, dtype=hypernet_dtype).eval()
    return CheckpointParts(model, hypernet, tokenizer, tokenizer_note, card)


def fresh_hypernet(base_model, *, seed: int = 0, spec: D2LSpec | None = None, hypernet_dtype=torch.float32,
                   init_scaler_B: float | None = None, **spec_kwargs) -> HyperLoRA:
    """An untrained hypernetwork for ``base_model`` (``spec``, or :func:`~d2l_fast.hf.spec_for_model` with
    ``spec_kwargs``), seeded with ``seed`` without touching the global RNG; the reference's init unless
    ``init_scaler_B`` is set (then ``scaler_B`` is drawn from N(0, init_scaler_B²)). On the base model's device."""
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"base_model must be a loaded torch model (nn.Module), got {type(base_model).__name__}")
    spec = spec or spec_for_model(base_model, **spec_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hypernet = HyperLoRA(spec)
        if init_scaler_B is not None:
            with torch.no_grad():
                for p in hypernet.scaler_B.values():
                    p.normal_(0.0, init_scaler_B)
    dev = next(base_model.parameters()).device
    hypernet.to(device=dev, dtype=hypernet_dtype).eval()
    return hypernet


__all__ = ["CheckpointParts", "fresh_hypernet", "load_checkpoint_parts"]
