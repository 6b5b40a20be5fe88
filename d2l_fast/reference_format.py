"""The reference's checkpoint format: stand-ins for its pickled config classes, and conversion to/from the spec.

The reference checkpoint pickles four dataclasses (``HypernetConfig``, ``AggregatorConfig``,
``CtxEncoderArguments``, peft's ``LoraConfig``/``LoraRuntimeConfig``) and one enum (``PeftType``).
The classes below carry the same field names so a checkpoint's pickled state drops straight into
them (the allowlist in :mod:`d2l_fast.checkpoint` maps the reference's dotted names onto them), and
:func:`spec_from_reference` / :func:`spec_to_reference` convert between them and the normalised
:class:`~d2l_fast.config.D2LSpec`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .config import (
    INT_LIMITS,
    MAX_LAYER_INDEX,
    D2LSpec,
    _as_bool,
    _as_opt_int,
    _as_str,
    _feature_dims,
    _target_modules,
    as_float,
    as_int,
)


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


def _enum_value(v):
    v = getattr(v, "value", v)
    if isinstance(v, str) and "." in v and v.split(".")[0].isupper():  # "CTX_ENCODER_TYPE.early_exit"
        v = v.split(".", 1)[1]
    return v


def spec_from_reference(base_model_name_or_path: str, hypernet_config, ctx_encoder_args) -> D2LSpec:
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
    spec = D2LSpec(
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
        num_self_attn_per_block=as_int(req(ac, "num_self_attn_per_block", acn),
                                       f"{acn}.num_self_attn_per_block"),
        shared_weights=_as_bool(req(ac, "shared_weights", acn), f"{acn}.shared_weights"),
        use_bias=_as_bool(use_bias, f"{hcn}.use_bias"),
        per_layer_processing=_as_bool(getattr(hc, "per_layer_processing", False),
                                      f"{hcn}.per_layer_processing"),
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


def spec_to_reference(spec: D2LSpec) -> tuple[HypernetConfig, CtxEncoderArguments]:
    """Reference-style ``(hypernet_config, ctx_encoder_args)`` for ``spec`` (used when saving in the reference's
    format). A hypernetwork with a copy head (a d2l_fast extension) has no reference form: ValueError."""
    if spec.copy_modules:
        raise ValueError(f"the reference's pytorch_model.bin layout cannot hold a copy head (copy_modules="
                         f"{list(spec.copy_modules)}); save it pickle-free (save_pretrained / save_checkpoint) instead")
    lc = LoraConfig(
        r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
        target_modules=set(spec.target_modules), base_model_name_or_path=spec.base_model_name_or_path,
    )
    ac = AggregatorConfig(
        num_layers=spec.num_layers, num_modules=spec.n_modules, output_size=spec.latent_size,
        feature_size=spec.feature_size, lora_r=spec.lora_r, n_latent_queries=spec.n_latent_queries,
        num_blocks=spec.num_blocks, num_self_attn_per_block=spec.num_self_attn_per_block,
        shared_weights=spec.shared_weights, layer_to_layer_ctx_encoder=spec.layer_to_layer,
    )
    hc = HypernetConfig(
        latent_size=spec.latent_size, use_bias=spec.use_bias, per_layer_processing=spec.per_layer_processing,
        num_pre_head_layers=spec.num_pre_head_layers, dropout_rate=spec.dropout_rate, lora_config=lc,
        base_hidden_size=spec.feature_size, layer_indices=list(spec.layer_indices),
        feature_sizes=(dict(spec.d_in), dict(spec.d_out)), aggregator_config=ac,
    )
    ce = CtxEncoderArguments(
        ctx_encoder_model_name_or_path=spec.encoder_model_name_or_path, ctx_encoder_type=spec.encoder_type,
        layer_idx=spec.encoder_layer_idx, quantize_ctx_encoder=spec.quantize_ctx_encoder,
        ctx_encoder_last_layer=spec.encoder_last_layer,
    )
    return hc, ce


__all__ = [
    "AggregatorConfig",
    "CtxEncoderArguments",
    "HypernetConfig",
    "LoraConfig",
    "LoraRuntimeConfig",
    "PeftType",
    "TaskType",
    "spec_from_reference",
    "spec_to_reference",
]
