"""The spec: :class:`D2LSpec`, the normalised, validated view a hypernetwork is built from (plain Python types
only), with the bounds and validators of its fields. It depends on nothing else in the package.

The reference's pickled config classes and the conversion from/to them live in :mod:`d2l_fast.reference_format`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from dataclasses import dataclass
from typing import Any

ENCODER_TYPES = ("per_layer_activations", "early_exit", "embed_only")

# Inclusive bounds of the integer sizes of a D2LSpec. Far above every released or plausible config, they
# exist so a malformed file is refused before any allocation (a checkpoint's tensors are then checked
# against the shapes these sizes imply, see ``checkpoint.check_tensors``).
INT_LIMITS: dict[str, tuple[int, int]] = {
    "num_layers": (1, 1024),
    "feature_size": (1, 1 << 17),
    "latent_size": (1, 1 << 16),
    "lora_r": (1, 1024),
    "n_latent_queries": (1, 1 << 14),
    "num_blocks": (1, 256),
    "num_self_attn_per_block": (0, 64),
    "n_heads": (1, 1024),
    "head_dim": (1, 4096),
    "n_kv_heads": (1, 1024),
    "intermediate_size_factor": (1, 64),
    "num_pre_head_layers": (0, 64),
}
MAX_FEATURE_DIM = 1 << 20  # d_in / d_out of a target module
MAX_LAYER_INDEX = 1 << 14
MAX_PERCEIVER_LAYERS = 1024  # num_blocks * (1 + num_self_attn_per_block)
MAX_OUTPUT_QUERIES = 1 << 16
MAX_TARGET_MODULES = 64


def as_int(v, name: str) -> int:
    """``v`` as a Python int (ints, integer numpy/torch scalars); a ValueError naming ``name`` otherwise."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an integer, got the bool {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(v).__name__} {v!r:.80}") from None


def as_float(v, name: str) -> float:
    """``v`` as a finite Python float (ints and floats only); a ValueError naming ``name`` otherwise."""
    if isinstance(v, (bool, str, bytes)) or not hasattr(v, "__float__"):
        raise ValueError(f"{name} must be a number, got {type(v).__name__} {v!r:.80}")
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {type(v).__name__} {v!r:.80}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {f}")
    return f


def _as_bool(v, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ValueError(f"{name} must be a bool, got {type(v).__name__} {v!r:.80}")


def _as_opt_int(v, name: str, lo: int, hi: int) -> int | None:
    if v is None:
        return None
    i = as_int(v, name)
    if not lo <= i <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {i}")
    return i


def _as_str(v, name: str, *, optional: bool = False) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > 4096:
        raise ValueError(f"{name} must be a string (at most 4096 characters), got {type(v).__name__} {v!r:.80}")
    return v


def _target_modules(tm) -> tuple[str, ...]:
    if isinstance(tm, str):
        tm = [tm]
    if not isinstance(tm, (list, tuple, set, frozenset)):
        raise ValueError(f"lora_config.target_modules must be a name or a collection of names, got {type(tm).__name__}")
    if len(tm) > MAX_TARGET_MODULES:
        raise ValueError(f"lora_config.target_modules names {len(tm)} modules, at most {MAX_TARGET_MODULES} supported")
    for m in tm:
        if not isinstance(m, str) or not m.isidentifier():
            raise ValueError(f"lora_config.target_modules entries must be module names, got {m!r:.80}")
        if m.startswith("_") or m in _reserved_module_names():
            raise ValueError(f"lora_config.target_modules entry {m!r} collides with an attribute of torch modules "
                             "(the hypernetwork keys its parameters by module name); expected a base-model module "
                             "name such as 'down_proj'")
    return tuple(sorted(tm))


def _copy_modules(cm) -> tuple[str, ...]:
    """``copy_modules`` as a sorted tuple of distinct names (membership in target_modules is checked by validate)."""
    if not isinstance(cm, (list, tuple)):
        raise ValueError(f"copy_modules must be a list of target-module names, got {type(cm).__name__} {cm!r:.80}")
    if any(not isinstance(m, str) for m in cm) or len(set(cm)) != len(cm):
        raise ValueError(f"copy_modules must be distinct module names, got {list(cm)!r:.120}")
    return tuple(sorted(cm))


@functools.lru_cache(maxsize=1)
def _reserved_module_names() -> frozenset[str]:
    """Attribute names of the torch containers the hypernetwork keys by target-module name."""
    import torch.nn as nn

    return frozenset(name for cls in (nn.ParameterDict, nn.ModuleDict) for name in dir(cls))


def _feature_dims(d, name: str, modules) -> dict[str, int]:
    if not isinstance(d, dict):
        raise ValueError(f"{name} must be a dict module -> size, got {type(d).__name__}")
    out = {}
    for m in modules:
        if m not in d:
            raise ValueError(f"{name} lacks target module {m!r} (has {sorted(map(str, d))[:8]})")
        out[m] = as_int(d[m], f"{name}[{m!r}]")
    return out


@dataclass(frozen=True)
class D2LSpec:
    """Everything needed to build a Doc-to-LoRA hypernetwork, as plain validated values.

    Built from the reference's pickled configs by :func:`d2l_fast.reference_format.spec_from_reference` or from
    JSON by :meth:`from_dict`.
    """

    base_model_name_or_path: str
    num_layers: int  # L, base layers that receive a LoRA
    layer_indices: tuple[int, ...]
    target_modules: tuple[str, ...]  # sorted
    d_in: dict[str, int]
    d_out: dict[str, int]
    feature_size: int  # H, context-encoder hidden size
    latent_size: int  # D
    lora_r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    n_latent_queries: int = 8
    num_blocks: int = 9
    num_self_attn_per_block: int = 0
    shared_weights: bool = False
    n_heads: int = 16
    head_dim: int = 128
    n_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    intermediate_size_factor: int = 4
    use_bias: bool = True
    per_layer_processing: bool = True
    num_pre_head_layers: int = 1
    dropout_rate: float = 0.0
    encoder_type: str = "per_layer_activations"
    encoder_model_name_or_path: str | None = None
    encoder_layer_idx: int | None = None
    encoder_last_layer: int | None = None
    quantize_ctx_encoder: bool = False
    # d2l_fast extension (not in the reference): target modules whose B vectors also get a copy head's output,
    # an attention-weighted sum of the context tokens' output embeddings (see d2l_fast.hypernet.copy_head)
    copy_modules: tuple[str, ...] = ()

    @property
    def layer_to_layer(self) -> bool:
        return self.encoder_type == "per_layer_activations"

    @property
    def n_modules(self) -> int:
        return len(self.target_modules)

    @property
    def d_lora(self) -> int:
        return max(self.d_in[m] + self.d_out[m] for m in self.target_modules)

    @property
    def n_output_queries(self) -> int:
        per = self.n_modules * self.lora_r
        return per if self.layer_to_layer else self.num_layers * per

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_indices"] = list(self.layer_indices)
        d["target_modules"] = list(self.target_modules)
        if self.copy_modules:
            d["copy_modules"] = list(self.copy_modules)
        else:  # absent when off, so configs (and model fingerprints) of plain hypernetworks stay the reference's
            del d["copy_modules"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "D2LSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown D2L config fields {sorted(unknown)}; expected a subset of {sorted(names)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = required - set(d)
        if missing:
            raise ValueError(f"missing D2L config fields {sorted(missing)}")
        d = dict(d)
        li = d["layer_indices"]
        if not isinstance(li, (list, tuple)) or len(li) > INT_LIMITS["num_layers"][1]:
            raise ValueError(f"layer_indices must be a list of at most {INT_LIMITS['num_layers'][1]} ints")
        d["layer_indices"] = tuple(as_int(i, "layer_indices") for i in li)
        d["target_modules"] = _target_modules(d["target_modules"])
        if "copy_modules" in d:
            d["copy_modules"] = _copy_modules(d["copy_modules"])
        d["d_in"] = _feature_dims(d["d_in"], "d_in", d["target_modules"])
        d["d_out"] = _feature_dims(d["d_out"], "d_out", d["target_modules"])
        spec = cls(**d)
        spec.validate()
        return spec

    def validate(self) -> None:
        """Types, bounds and consistency of every field; ValueError naming the field. Allocates nothing."""
        for name, (lo, hi) in INT_LIMITS.items():
            v = as_int(getattr(self, name), name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
        _as_str(self.base_model_name_or_path, "base_model_name_or_path")
        for name in ("shared_weights", "use_bias", "per_layer_processing", "quantize_ctx_encoder"):
            _as_bool(getattr(self, name), name)
        as_float(self.lora_alpha, "lora_alpha")
        for name in ("lora_dropout", "dropout_rate"):
            if not 0.0 <= as_float(getattr(self, name), name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < as_float(self.rms_norm_eps, "rms_norm_eps") < 1.0:
            raise ValueError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        if not isinstance(self.encoder_type, str):
            raise ValueError(f"ctx_encoder_type must be a string, got {type(self.encoder_type).__name__}")
        _as_str(self.encoder_model_name_or_path, "encoder_model_name_or_path", optional=True)
        _as_opt_int(self.encoder_layer_idx, "encoder_layer_idx", 0, MAX_LAYER_INDEX)
        _as_opt_int(self.encoder_last_layer, "encoder_last_layer", -MAX_LAYER_INDEX, MAX_LAYER_INDEX)
        if not isinstance(self.layer_indices, tuple) or not isinstance(self.target_modules, tuple):
            raise ValueError("layer_indices and target_modules must be tuples")
        for i in self.layer_indices:
            if not 0 <= as_int(i, "layer_indices") < MAX_LAYER_INDEX:
                raise ValueError(f"layer_indices must be in [0, {MAX_LAYER_INDEX}), got {i}")
        if len(set(self.layer_indices)) != len(self.layer_indices):
            raise ValueError(f"layer_indices must be distinct, got {list(self.layer_indices)[:16]}")
        _target_modules(self.target_modules)
        for name in ("d_in", "d_out"):
            for m, v in _feature_dims(getattr(self, name), name, self.target_modules).items():
                if not 1 <= v <= MAX_FEATURE_DIM:
                    raise ValueError(f"{name}[{m!r}] must be in [1, {MAX_FEATURE_DIM}], got {v}")
        n_perceiver = self.num_blocks * (1 + self.num_self_attn_per_block)
        if n_perceiver > MAX_PERCEIVER_LAYERS:
            raise ValueError(f"num_blocks * (1 + num_self_attn_per_block) = {n_perceiver} perceiver layers, at most "
                             f"{MAX_PERCEIVER_LAYERS} supported")
        if self.encoder_type in ENCODER_TYPES and self.n_output_queries > MAX_OUTPUT_QUERIES:
            raise ValueError(f"{self.n_output_queries} perceiver output queries (layers x modules x r), at most "
                             f"{MAX_OUTPUT_QUERIES} supported")
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"ctx_encoder_type must be one of {ENCODER_TYPES}, got {self.encoder_type!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module, got none")
        if list(self.target_modules) != sorted(self.target_modules):
            raise ValueError(f"target_modules must be sorted, got {list(self.target_modules)}")
        for m in self.target_modules:
            if m not in self.d_in or m not in self.d_out:
                raise ValueError(f"feature sizes missing for module {m!r}: d_in={self.d_in}, d_out={self.d_out}")
        if len(self.layer_indices) != self.num_layers:
            raise ValueError(f"layer_indices has {len(self.layer_indices)} entries, expected "
                             f"num_layers={self.num_layers}")
        if not isinstance(self.copy_modules, tuple) or _copy_modules(self.copy_modules) != self.copy_modules:
            raise ValueError(f"copy_modules must be a sorted tuple of distinct names, got {self.copy_modules!r:.120}")
        for m in self.copy_modules:
            if m not in self.target_modules:
                raise ValueError(f"copy_modules must be target modules ({list(self.target_modules)}), got {m!r}")
        if self.copy_modules and self.layer_to_layer:
            raise ValueError("copy_modules needs encoder_type 'early_exit' or 'embed_only' (one feature map per "
                             "context token), got 'per_layer_activations'")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")


def default_lora_alpha(r: int) -> float:
    """The reference's ``get_lora_config`` choice: alpha = 2 * r**1.5 (applied as-is, not alpha/r)."""
    return 2.0 * float(r) ** 1.5


__all__ = ["D2LSpec", "as_float", "as_int", "default_lora_alpha"]
