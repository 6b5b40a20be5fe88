"""Starting a run from another run's hypernetwork: extensions added to a checkpoint at init (the trainer calls
:func:`with_copy_head` for ``TrainConfig.copy_modules``)."""

from __future__ import annotations

import dataclasses

import torch

from ..checkpoint import LoadedCheckpoint
from ..hypernet import HyperLoRA
from .config import TrainConfigError


def with_copy_head(ckpt, modules, *, seed: int = 0):
    """``ckpt`` (a LoadedCheckpoint) with a copy head on ``modules``: unchanged when it already has exactly that
    head; a freshly initialised, zero-gated head added when it has none (its adapters are then unchanged until
    training moves the gate); TrainConfigError when it has a different one."""
    want = tuple(sorted(modules))
    have = ckpt.spec.copy_modules
    if have == want:
        return ckpt
    if have:
        raise TrainConfigError(f"the checkpoint's copy head covers {list(have)}, the config asks for {list(want)}; "
                               "a copy head cannot be changed once trained")
    try:
        spec = dataclasses.replace(ckpt.spec, copy_modules=want)
        spec.validate()
    except ValueError as e:
        raise TrainConfigError(f"cannot add a copy head to this checkpoint: {e}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = HyperLoRA(spec).copy_head.state_dict()
    sd = dict(ckpt.state_dict)
    sd.update({f"copy_head.{k}": v.float() for k, v in fresh.items()})
    return LoadedCheckpoint(spec=spec, state_dict=sd, source=ckpt.source)


__all__ = ["with_copy_head"]
