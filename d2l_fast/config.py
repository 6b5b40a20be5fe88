"""Configuration classes, field-compatible with the reference's pickled configs.

The reference checkpoint pickles four dataclasses (``HypernetConfig``, ``AggregatorConfig``,
``CtxEncoderArguments``, peft's ``LoraConfig``/``LoraRuntimeConfig``) and one enum (``PeftType``).
The classes below carry the same field names so a checkpoint's pickled state drops straight into
them (see :mod:`d2l_fast.checkpoint`), and they are plain dataclasses so they round-trip through
JSON for the pickle-free format.

``D2LSpec`` is the normalised, validated view the model is built from: plain Python types only.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
from dataclasses import dataclass
from typing import Any


class PeftType(str, enum.Enum):
    """Stand-in for ``peft.utils.peft_types.PeftType`` (only its value is ever used)."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    BOFT = "BOFT"
    VERA = "VERA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"


class TaskType(str, enum.Enum):
    """Stand-in for ``peft.utils.peft_types.TaskType``."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class _StateBag:
    """Accepts whatever attribute state a pickle BUILD opcode hands it.

    The reference's classes are dataclasses pickled as NEWOBJ + BUILD(state dict); unknown extra
    fields from other versions are kept as attributes rather than rejected.
    """

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            if not all(x is None or isinstance(x, dict) for x in state):
                raise ValueError(f"pickled state of {type(self).__name__} must be a dict, got a malformed tuple")
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict) or not all(isinstance(k, str) and not k.startswith("__") for k in state):
            raise ValueError(f"pickled state of {type(self).__name__} must be a dict of field names, got "
                             f"{type(state).__name__}")
        self.__dict__.update(state)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for k, v in self.__dict__.items():
            out[k] = _jsonable(v)
        return out


def _jsonable(v):
    if isinstance(v, _StateBag):
        return {"__class__": type(v).__name__, **v.to_dict()}
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if hasattr(v, "tolist"):  # tensors (layer_indices)
        return v.tolist()
    return v


@dataclass
class LoraRuntimeConfig(_StateBag):
    ephemeral_gpu_offload: bool = False


@dataclass
class LoraConfig(_StateBag):
    """Subset of peft's LoraConfig that Doc-to-LoRA reads (other peft fields are kept if present)."""

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: Any = None
    task_type: Any = "CAUSAL_LM"
    peft_type: Any = "LORA"
    base_model_name_or_path: str | None = None


@dataclass
class AggregatorConfig(_StateBag):
    aggregator_type: str = "perceiver"
    num_layers: int = 1
    num_modules: int = 1
    num_extra_modules: int = 0
    output_size: int = 512
    feature_size: int = 2304
    pooling_type: str = "mean"
    num_latent_factor: int = 8
    lora_r: int = 8
    per_rank_gen: bool = True
    n_latent_queries: int = 8
    num_blocks: int = 9
    num_self_attn_per_block: int = 0
    shared_weights: bool = False
    layer_to_layer_ctx_encoder: bool = True


@dataclass
class HypernetConfig(_StateBag):
    latent_size: int = 512
    use_light_weight_lora: bool = False
    light_weight_latent_size: int = 128
    per_rank_gen: bool = True
    use_per_rank_bias: bool = False
    use_bias: bool = True
    per_layer_processing: bool = True
    use_token_mixing: bool = False
    num_pre_head_layers: int = 1
    dropout_rate: float = 0.0
    lora_config: Any = None
    extra_modules: Any = None
    base_hidden_size: int = 2304
    layer_indices: Any = None
    feature_sizes: Any = None
    aggregator_config: Any = None


@dataclass
class CtxEncoderArguments(_StateBag):
    ctx_encoder_model_name_or_path: str | None = None
    ctx_encoder_type: str = "per_layer_activations"
    layer_idx: int | None = None
    quantize_ctx_encoder: bool = False
    ctx_encoder_last_layer: int | None = None


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
    return tuple(sorted(tm))


def _feature_dims(d, name: str, modules) -> dict[str, int]:
    if not isinstance(d, dict):
        raise ValueError(f"{name} must be a dict module -> size, got {type(d).__name__}")
    out = {}
    for m in modules:
        if m not in d:
            raise ValueError(f"{name} lacks target module {m!r} (has {sorted(map(str, d))[:8]})")
        out[m] = as_int(d[m], f"{name}[{m!r}]")
    return out


def _enum_value(v):
    v = getattr(v, "value", v)
    if isinstance(v, str) and "." in v and v.split(".")[0].isupper():  # "CTX_ENCODER_TYPE.early_exit"
        v = v.split(".", 1)[1]
    return v


@dataclass(frozen=True)
class D2LSpec:
    """Everything needed to build a Doc-to-LoRA hypernetwork, as plain validated values.

    Built from the reference's pickled configs by :meth:`from_reference` or from JSON by
    :meth:`from_dict`.
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
            raise ValueError(f"layer_indices has {len(self.layer_indices)} entries, expected num_layers={self.num_layers}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_reference(cls, base_model_name_or_path: str, hypernet_config, ctx_encoder_args) -> "D2LSpec":
        """Normalise the reference's pickled config objects (spec §3.4 step 4)."""
        hc = hypernet_config
        ac = getattr(hc, "aggregator_config", None)
        lc = getattr(hc, "lora_config", None)
        if ac is None or lc is None:
            raise ValueError("hypernet_config lacks aggregator_config or lora_config; not a Doc-to-LoRA checkpoint")
        # back-fills of the reference's from_state_dict
        num_pre_head = getattr(hc, "num_pre_head_layers", 4)
        use_bias = getattr(hc, "use_bias", True)
        if getattr(hc, "extra_modules", None):
            raise ValueError(f"extra_modules are not supported, got {hc.extra_modules!r:.80}")
        if not getattr(hc, "per_rank_gen", True) or not getattr(ac, "per_rank_gen", True):
            raise ValueError("per_rank_gen=False is not supported (the reference cannot run it either)")
        agg_type = _enum_value(getattr(ac, "aggregator_type", "perceiver"))
        if agg_type != "perceiver":
            raise ValueError(f"only the perceiver aggregator is supported, got {agg_type!r}")
        if getattr(ac, "num_extra_modules", 0):
            raise ValueError(f"num_extra_modules must be 0, got {ac.num_extra_modules!r:.80}")
        def req(obj, field, prefix):
            if not hasattr(obj, field):
                raise ValueError(f"{prefix}.{field} is missing")
            return getattr(obj, field)

        li = req(hc, "layer_indices", "hypernet_config")
        n_max = INT_LIMITS["num_layers"][1]
        if hasattr(li, "numel") and li.numel() > n_max or hasattr(li, "__len__") and len(li) > n_max:
            raise ValueError(f"hypernet_config.layer_indices has more than {n_max} entries")
        if hasattr(li, "tolist"):
            li = li.tolist()
        if not isinstance(li, (list, tuple)):
            raise ValueError(f"hypernet_config.layer_indices must be a list or 1-D tensor, got {type(li).__name__}")
        li = tuple(as_int(i, "hypernet_config.layer_indices") for i in li)
        tm = _target_modules(req(lc, "target_modules", "hypernet_config.lora_config"))
        fs = req(hc, "feature_sizes", "hypernet_config")
        if not isinstance(fs, (list, tuple)) or len(fs) != 2:
            raise ValueError(f"hypernet_config.feature_sizes must be a pair (d_in dict, d_out dict), "
                             f"got {type(fs).__name__}")
        fs_in, fs_out = fs
        enc_type = _enum_value(getattr(ctx_encoder_args, "ctx_encoder_type", "per_layer_activations"))
        hcn, acn, lcn, cen = "hypernet_config", "aggregator_config", "lora_config", "ctx_encoder_args"
        spec = cls(
            base_model_name_or_path=_as_str(base_model_name_or_path, "base_model_name_or_path"),
            num_layers=as_int(req(ac, "num_layers", acn), f"{acn}.num_layers"),
            layer_indices=li,
            target_modules=tm,
            d_in=_feature_dims(fs_in, f"{hcn}.feature_sizes[0]", tm),
            d_out=_feature_dims(fs_out, f"{hcn}.feature_sizes[1]", tm),
            feature_size=as_int(req(ac, "feature_size", acn), f"{acn}.feature_size"),
            latent_size=as_int(req(hc, "latent_size", hcn), f"{hcn}.latent_size"),
            lora_r=as_int(req(lc, "r", lcn), f"{lcn}.r"),
            lora_alpha=as_float(req(lc, "lora_alpha", lcn), f"{lcn}.lora_alpha"),
            lora_dropout=as_float(getattr(lc, "lora_dropout", 0.0) or 0.0, f"{lcn}.lora_dropout"),
            n_latent_queries=as_int(req(ac, "n_latent_queries", acn), f"{acn}.n_latent_queries"),
            num_blocks=as_int(req(ac, "num_blocks", acn), f"{acn}.num_blocks"),
            num_self_attn_per_block=as_int(req(ac, "num_self_attn_per_block", acn), f"{acn}.num_self_attn_per_block"),
            shared_weights=_as_bool(req(ac, "shared_weights", acn), f"{acn}.shared_weights"),
            use_bias=_as_bool(use_bias, f"{hcn}.use_bias"),
            per_layer_processing=_as_bool(getattr(hc, "per_layer_processing", False), f"{hcn}.per_layer_processing"),
            num_pre_head_layers=as_int(num_pre_head, f"{hcn}.num_pre_head_layers"),
            dropout_rate=as_float(getattr(hc, "dropout_rate", 0.0) or 0.0, f"{hcn}.dropout_rate"),
            encoder_type=_as_str(enc_type, f"{cen}.ctx_encoder_type"),
            encoder_model_name_or_path=_as_str(getattr(ctx_encoder_args, "ctx_encoder_model_name_or_path", None),
                                               f"{cen}.ctx_encoder_model_name_or_path", optional=True),
            encoder_layer_idx=_as_opt_int(getattr(ctx_encoder_args, "layer_idx", None), f"{cen}.layer_idx", 0,
                                          MAX_LAYER_INDEX),
            encoder_last_layer=_as_opt_int(getattr(ctx_encoder_args, "ctx_encoder_last_layer", None),
                                           f"{cen}.ctx_encoder_last_layer", -MAX_LAYER_INDEX, MAX_LAYER_INDEX),
            quantize_ctx_encoder=_as_bool(getattr(ctx_encoder_args, "quantize_ctx_encoder", False),
                                          f"{cen}.quantize_ctx_encoder"),
        )
        spec.validate()
        return spec

    def to_reference(self):
        """Rebuild reference-style config objects (used when saving in the reference's format)."""
        lc = LoraConfig(
            r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            target_modules=set(self.target_modules), base_model_name_or_path=self.base_model_name_or_path,
        )
        ac = AggregatorConfig(
            num_layers=self.num_layers, num_modules=self.n_modules, output_size=self.latent_size,
            feature_size=self.feature_size, lora_r=self.lora_r, n_latent_queries=self.n_latent_queries,
            num_blocks=self.num_blocks, num_self_attn_per_block=self.num_self_attn_per_block,
            shared_weights=self.shared_weights, layer_to_layer_ctx_encoder=self.layer_to_layer,
        )
        hc = HypernetConfig(
            latent_size=self.latent_size, use_bias=self.use_bias, per_layer_processing=self.per_layer_processing,
            num_pre_head_layers=self.num_pre_head_layers, dropout_rate=self.dropout_rate, lora_config=lc,
            base_hidden_size=self.feature_size, layer_indices=list(self.layer_indices),
            feature_sizes=(dict(self.d_in), dict(self.d_out)), aggregator_config=ac,
        )
        ce = CtxEncoderArguments(
            ctx_encoder_model_name_or_path=self.encoder_model_name_or_path, ctx_encoder_type=self.encoder_type,
            layer_idx=self.encoder_layer_idx, quantize_ctx_encoder=self.quantize_ctx_encoder,
            ctx_encoder_last_layer=self.encoder_last_layer,
        )
        return hc, ce


def default_lora_alpha(r: int) -> float:
    """The reference's ``get_lora_config`` choice: alpha = 2 * r**1.5 (applied as-is, not alpha/r)."""
    return 2.0 * float(r) ** 1.5


__all__ = [
    "AggregatorConfig",
    "CtxEncoderArguments",
    "D2LSpec",
    "HypernetConfig",
    "LoraConfig",
    "LoraRuntimeConfig",
    "PeftType",
    "TaskType",
    "default_lora_alpha",
]
