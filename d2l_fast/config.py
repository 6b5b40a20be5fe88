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
            state = {**(state[0] or {}), **(state[1] or {})}
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
        d = dict(d)
        d["layer_indices"] = tuple(int(i) for i in d["layer_indices"])
        d["target_modules"] = tuple(d["target_modules"])
        d["d_in"] = {str(k): int(v) for k, v in d["d_in"].items()}
        d["d_out"] = {str(k): int(v) for k, v in d["d_out"].items()}
        spec = cls(**d)
        spec.validate()
        return spec

    def validate(self) -> None:
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
            raise ValueError(f"extra_modules are not supported, got {hc.extra_modules!r}")
        if not getattr(hc, "per_rank_gen", True) or not getattr(ac, "per_rank_gen", True):
            raise ValueError("per_rank_gen=False is not supported (the reference cannot run it either)")
        agg_type = _enum_value(getattr(ac, "aggregator_type", "perceiver"))
        if agg_type != "perceiver":
            raise ValueError(f"only the perceiver aggregator is supported, got {agg_type!r}")
        if getattr(ac, "num_extra_modules", 0):
            raise ValueError(f"num_extra_modules must be 0, got {ac.num_extra_modules}")
        li = hc.layer_indices
        li = tuple(int(i) for i in (li.tolist() if hasattr(li, "tolist") else li))
        tm = lc.target_modules
        tm = tuple(sorted([tm] if isinstance(tm, str) else tm))
        fs_in, fs_out = hc.feature_sizes
        enc_type = _enum_value(getattr(ctx_encoder_args, "ctx_encoder_type", "per_layer_activations"))
        spec = cls(
            base_model_name_or_path=str(base_model_name_or_path),
            num_layers=int(ac.num_layers),
            layer_indices=li,
            target_modules=tm,
            d_in={m: int(fs_in[m]) for m in tm},
            d_out={m: int(fs_out[m]) for m in tm},
            feature_size=int(ac.feature_size),
            latent_size=int(hc.latent_size),
            lora_r=int(lc.r),
            lora_alpha=float(lc.lora_alpha),
            lora_dropout=float(getattr(lc, "lora_dropout", 0.0) or 0.0),
            n_latent_queries=int(ac.n_latent_queries),
            num_blocks=int(ac.num_blocks),
            num_self_attn_per_block=int(ac.num_self_attn_per_block),
            shared_weights=bool(ac.shared_weights),
            use_bias=bool(use_bias),
            per_layer_processing=bool(getattr(hc, "per_layer_processing", False)),
            num_pre_head_layers=int(num_pre_head),
            dropout_rate=float(getattr(hc, "dropout_rate", 0.0) or 0.0),
            encoder_type=enc_type,
            encoder_model_name_or_path=getattr(ctx_encoder_args, "ctx_encoder_model_name_or_path", None),
            encoder_layer_idx=getattr(ctx_encoder_args, "layer_idx", None),
            encoder_last_layer=getattr(ctx_encoder_args, "ctx_encoder_last_layer", None),
            quantize_ctx_encoder=bool(getattr(ctx_encoder_args, "quantize_ctx_encoder", False)),
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


def spec_for_model(
    model,
    *,
    base_model_name_or_path: str | None = None,
    target_modules=("down_proj",),
    lora_r: int = 8,
    latent_size: int = 512,
    n_latent_queries: int = 8,
    num_blocks: int = 9,
    num_self_attn_per_block: int = 0,
    n_heads: int = 16,
    head_dim: int = 128,
    n_kv_heads: int = 4,
    encoder_type: str = "per_layer_activations",
    encoder_layer_idx: int | None = None,
    **overrides,
) -> D2LSpec:
    """A D2LSpec for a fresh hypernetwork over an already-loaded HF causal LM (the main config by default)."""
    from .patching import find_target_linears

    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    tm = tuple(sorted(target_modules))
    linears = find_target_linears(model, tm)
    d_in, d_out = {}, {}
    for m in tm:
        lin = linears[(0, m)]
        d_in[m], d_out[m] = int(lin.in_features), int(lin.out_features)
    if encoder_type == "early_exit" and encoder_layer_idx is None:
        encoder_layer_idx = max(1, n_layers // 4)
    spec = D2LSpec(
        base_model_name_or_path=base_model_name_or_path or getattr(cfg, "_name_or_path", "") or cfg.model_type,
        num_layers=n_layers,
        layer_indices=tuple(range(n_layers)),
        target_modules=tm,
        d_in=d_in,
        d_out=d_out,
        feature_size=int(cfg.hidden_size),
        latent_size=latent_size,
        lora_r=lora_r,
        lora_alpha=overrides.pop("lora_alpha", default_lora_alpha(lora_r)),
        n_latent_queries=n_latent_queries,
        num_blocks=num_blocks,
        num_self_attn_per_block=num_self_attn_per_block,
        n_heads=n_heads,
        head_dim=head_dim,
        n_kv_heads=n_kv_heads,
        encoder_type=encoder_type,
        encoder_layer_idx=encoder_layer_idx,
        **overrides,
    )
    spec.validate()
    return spec


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
    "spec_for_model",
]
