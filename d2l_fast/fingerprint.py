"""The identity of a (base model, hypernetwork) pair that adapters carry as their ``model_id``.

It sits low in the package (it needs only the spec and the hypernetwork's weights) so that the model, the
exporter and the adapter containers can all compute or check it without importing one another.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from .config import D2LSpec


def model_fingerprint(spec: D2LSpec, hypernet: nn.Module) -> str:
    """Identity of (base model, hypernetwork weights): adapters made by one model refuse to bind to another."""
    if not isinstance(spec, D2LSpec):
        raise TypeError(f"spec must be a D2LSpec, got {type(spec).__name__}")
    params = dict(hypernet.named_parameters())
    if "head.weight" not in params:
        raise ValueError(f"the hypernetwork has no 'head.weight' parameter (got {sorted(params)[:8]})")
    h = hashlib.sha1(json.dumps(spec.to_dict(), sort_keys=True).encode())
    with torch.no_grad():
        t = params["head.weight"].detach().float().flatten()
        h.update(repr(round(float(t[:4096].double().sum()), 6)).encode())
        h.update(repr(round(float(t[-4096:].double().abs().sum()), 6)).encode())
    return f"{spec.base_model_name_or_path}@{h.hexdigest()[:16]}"


__all__ = ["model_fingerprint"]
