"""Hugging Face helpers: where a causal LM keeps its decoder and target Linears, loading a base model, checking
it against a checkpoint, and a spec for a fresh hypernetwork over it.

Every module that needs to look inside a transformers model imports it from here; this module imports only the
spec (:mod:`d2l_fast.config`) and :class:`~d2l_fast.checkpoint.CheckpointError`. transformers itself is
imported lazily, inside the loaders.
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import CheckpointError
from .config import D2LSpec, default_lora_alpha


def decoder_of(model: nn.Module) -> nn.Module:
    """The inner decoder (``model.model`` for HF causal LMs; PEFT wrappers are unwrapped)."""
    m = model
    if hasattr(m, "peft_config") and hasattr(m, "base_model"):  # PeftModel -> LoraModel -> HF model
        m = m.base_model
        m = getattr(m, "model", m)
    if hasattr(m, "get_decoder"):
        try:
            dec = m.get_decoder()
            if dec is not None and hasattr(dec, "layers"):
                return dec
        except (AttributeError, NotImplementedError):
            pass
    if hasattr(m, "model") and hasattr(m.model, "layers"):
        return m.model
    if hasattr(m, "layers"):
        return m
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: expected model.model.layers")


def find_target_linears(model: nn.Module, modules) -> dict[tuple[int, str], nn.Linear]:
    """{(layer_index, module_name): Linear} for every decoder layer of ``model``."""
    dec = decoder_of(model)
    out = {}
    for i, layer in enumerate(dec.layers):
        for m in modules:
            found = [mod for name, mod in layer.named_modules()
                     if name.rsplit(".", 1)[-1] == m and isinstance(mod, nn.Linear)]
            if len(found) != 1:
                raise ValueError(f"layer {i}: expected exactly one Linear named {m!r}, found {len(found)}")
            out[(i, m)] = found[0]
    return out


def load_base_model(name_or_path, *, dtype=None, device=None, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` in eval mode: fp32 unless ``dtype``; eager attention for Gemma-2
    (softcapping), sdpa otherwise, unless ``attn_implementation`` is given."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(name_or_path))
    attn = kwargs.pop("attn_implementation", None)
    if attn is None:
        attn = "eager" if cfg.model_type in ("gemma2",) else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype or torch.float32,
                                                 attn_implementation=attn, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()


def base_model_skeleton(name_or_path) -> nn.Module:
    """The causal LM of ``name_or_path``'s config on the ``meta`` device: module names and shapes only, no weights
    allocated or read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = str(name_or_path)
    try:
        cfg = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the base model config from {src!r} to find the module paths: {e}; "
                         "pass base_model= (CLI: --base-model) a local HF model folder") from e
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def check_base_model(base_model: nn.Module, spec: D2LSpec) -> None:
    """:class:`CheckpointError` unless ``base_model`` has the layers, hidden size and target Linears ``spec``
    was trained on."""
    cfg = base_model.config
    n_layers = len(decoder_of(base_model).layers)
    if max(spec.layer_indices) >= n_layers:
        raise CheckpointError(f"checkpoint targets layers {list(spec.layer_indices)} but the base model has "
                              f"{n_layers}")
    if int(cfg.hidden_size) != spec.feature_size:
        raise CheckpointError(f"checkpoint expects context features of size {spec.feature_size} (hidden size of "
                              f"{spec.base_model_name_or_path!r}), the base model has hidden_size={cfg.hidden_size}")
    try:
        lins = find_target_linears(base_model, spec.target_modules)
    except ValueError as e:
        raise CheckpointError(f"base model does not have the checkpoint's target modules: {e}") from e
    for m in spec.target_modules:
        lin = lins[(spec.layer_indices[0], m)]
        if (lin.in_features, lin.out_features) != (spec.d_in[m], spec.d_out[m]):
            raise CheckpointError(f"{m}: checkpoint expects {spec.d_in[m]}→{spec.d_out[m]}, base model has "
                                  f"{lin.in_features}→{lin.out_features} (wrong base model?)")


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
    layer_indices=None,
    **overrides,
) -> D2LSpec:
    """A D2LSpec for a fresh hypernetwork over an already-loaded HF causal LM (the main config by default).

    ``layer_indices``: the base layers that receive a LoRA (default: all of them).
    """
    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    if layer_indices is None:
        layer_indices = tuple(range(n_layers))
    else:
        if isinstance(layer_indices, (str, bytes)) or not hasattr(layer_indices, "__iter__"):
            raise ValueError(f"layer_indices must be a sequence of layer numbers, got {layer_indices!r}")
        layer_indices = tuple(layer_indices)
        bad = [i for i in layer_indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers]
        if bad or not layer_indices:
            raise ValueError(f"layer_indices must be distinct ints in [0, {n_layers}) (the model has {n_layers} "
                             f"layers), got {list(layer_indices)[:16]}")
        if encoder_type == "per_layer_activations" and layer_indices != tuple(range(n_layers)):
            raise ValueError("layer_indices other than all layers needs encoder_type 'early_exit' or 'embed_only' "
                             "(the per-layer encoder pairs every base layer's features with that layer's LoRA)")
    tm = tuple(sorted(target_modules))
    linears = find_target_linears(model, tm)
    d_in, d_out = {}, {}
    for m in tm:
        lin = linears[(0, m)]
        d_in[m], d_out[m] = int(lin.in_features), int(lin.out_features)
    if encoder_type == "early_exit" and encoder_layer_idx is None:
        encoder_layer_idx = max(1, n_layers // 4)
    if "copy_modules" in overrides:  # any sequence of names → the spec's sorted tuple (checked by validate)
        cm = overrides["copy_modules"]
        overrides["copy_modules"] = tuple(sorted(cm)) if isinstance(cm, (list, tuple)) else cm
    spec = D2LSpec(
        base_model_name_or_path=base_model_name_or_path or getattr(cfg, "_name_or_path", "") or cfg.model_type,
        num_layers=len(layer_indices),
        layer_indices=layer_indices,
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
    "base_model_skeleton",
    "check_base_model",
    "decoder_of",
    "find_target_linears",
    "load_base_model",
    "spec_for_model",
]
