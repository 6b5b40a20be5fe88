"""Read PEFT LoRA folders back as adapters: the inverse of :func:`d2l_fast.export.export_peft`.

    from d2l_fast.peft_import import load_peft_adapter
    adapter = load_peft_adapter("peft_out/doc0", model)      # an AdapterBatch of one adapter for `model`

The folder (``adapter_config.json`` + ``adapter_model.safetensors``, as ``d2l-fast export-peft``,
:meth:`AdapterBatch.to_peft` or ``PeftModel.save_pretrained`` write them) must be a LoRA on the same base model,
target modules and adapted layers; every file is read through :mod:`d2l_fast.safe_io` (regular files only, bounded).
The document server loads folders this way (``POST /v1/load_lora_adapter``). This module sits above both
:mod:`d2l_fast.adapters` and :mod:`d2l_fast.export` (which sits below adapters), so neither imports it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .adapters import AdapterBatch
from .config import D2LSpec
from .export import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, _module_paths, _module_tree, _resolve_model
from .safe_io import check_regular_file, read_json


class PeftFormatError(ValueError):
    """A PEFT LoRA folder that cannot be read, or does not fit the model it is loaded for."""


MAX_CONFIG_BYTES = 1 << 20
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MUST_BE = {"peft_type": "LORA", "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}


def load_peft_adapter(folder, model_or_spec, *, name: str | None = None, base_model=None,
                      max_bytes: int | None = None):
    """Read a PEFT LoRA folder (as :func:`export_peft` or ``PeftModel.save_pretrained`` writes it) as an
    :class:`~d2l_fast.AdapterBatch` of one adapter for ``model_or_spec`` (the inverse of :func:`export_peft`).

    ``model_or_spec``: a :class:`~d2l_fast.D2LModel` (its base model gives the module paths; the adapter gets its
    model id), a :class:`~d2l_fast.LoadedCheckpoint` or a :class:`~d2l_fast.D2LSpec` (then ``base_model`` as in
    :func:`export_peft`). The folder must adapt exactly the model's target modules in its adapted layers:
    ``base_model_name_or_path``, ``target_modules``, ``layers_to_transform``, ``r`` and every tensor's name, dtype
    and shape are checked before any tensor is read; PEFT options d2l_fast cannot apply (DoRA, rsLoRA, biases,
    per-module ranks) are refused. ``lora_alpha / r`` is folded into B when it differs from the model's alpha.
    ``max_bytes``: the largest weights file accepted. Every problem raises :class:`PeftFormatError` naming the
    file and the field.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a string or None, got {type(name).__name__}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    spec, tree, model_id = _resolve_model(model_or_spec, base_model)
    folder = Path(folder)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise PeftFormatError(f"{folder}: {what}; expected a PEFT adapter folder holding {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME}")
    cfg = read_json(folder / CONFIG_NAME, MAX_CONFIG_BYTES, what="PEFT adapter config", error=PeftFormatError)
    r, alpha = _check_peft_config(cfg, spec, folder / CONFIG_NAME)
    weights = folder / WEIGHTS_NAME
    check_regular_file(weights, what="PEFT adapter weights", max_bytes=max_bytes, error=PeftFormatError)
    paths = _module_paths(spec, _module_tree(spec, tree))
    _check_peft_targets(cfg, spec, paths, folder / CONFIG_NAME)
    A, B, meta = _read_peft_tensors(weights, spec, paths, r)
    own = meta.get("d2l_fast.alpha")
    if own is not None:  # d2l_fast's own export: its exact alpha (lora_alpha / r may round)
        try:
            own = float(own)
        except ValueError:
            own = None
    if own is not None and math.isfinite(own) and math.isclose(own, alpha, rel_tol=1e-6):
        alpha = own
    if alpha != spec.lora_alpha:  # one alpha per model: fold the ratio into B
        B = {m: b * (alpha / spec.lora_alpha) for m, b in B.items()}
    if model_id is None:
        model_id = meta.get("d2l_fast.model_id") or f"{spec.base_model_name_or_path}@peft"
    try:
        ad = AdapterBatch(A, B, [0, r], float(spec.lora_alpha), model_id, [name] if name is not None else None)
        ad.check_finite(where=f" in {weights}")
    except ValueError as e:
        raise PeftFormatError(f"{weights}: {e}") from None
    return ad


def _check_peft_config(cfg, spec: D2LSpec, path: Path) -> tuple[int, float]:
    """(r, alpha = lora_alpha / r) of an adapter_config.json, every field d2l_fast relies on checked."""
    if not isinstance(cfg, dict):
        raise PeftFormatError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    for k, want in _MUST_BE.items():
        got = cfg.get(k, want if k != "peft_type" else None)
        if got != want and not (got is None and want is False):
            raise PeftFormatError(f"{path}: field {k!r} must be {want!r} for d2l_fast, got {got!r:.80}")
    base = cfg.get("base_model_name_or_path")
    if base is not None and str(base) != str(spec.base_model_name_or_path):
        raise PeftFormatError(f"{path}: field 'base_model_name_or_path' is {base!r:.200}, this model's base model is "
                              f"{spec.base_model_name_or_path!r} (an adapter for another base model)")
    r, la = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise PeftFormatError(f"{path}: field 'r' must be a positive integer, got {r!r:.80}")
    if isinstance(la, bool) or not isinstance(la, (int, float)) or not math.isfinite(la) or la == 0:
        raise PeftFormatError(f"{path}: field 'lora_alpha' must be a finite non-zero number, got {la!r:.80}")
    for k in ("rank_pattern", "alpha_pattern"):
        if cfg.get(k):
            raise PeftFormatError(f"{path}: field {k!r} must be empty (one rank and alpha for every module), got "
                                  f"{cfg[k]!r:.80}")
    if cfg.get("modules_to_save"):
        raise PeftFormatError(f"{path}: field 'modules_to_save' must be empty (d2l_fast applies LoRA only), got "
                              f"{cfg['modules_to_save']!r:.80}")
    return r, float(la) / r


def _check_peft_targets(cfg: dict, spec: D2LSpec, paths, path: Path) -> None:
    tm = cfg.get("target_modules")
    if isinstance(tm, str):  # a regex over module paths: it must select exactly the adapted Linears
        try:
            rx = re.compile(tm)
        except re.error as e:
            raise PeftFormatError(f"{path}: field 'target_modules' is not a valid regex: {e}") from None
        missing = [p for p in paths.values() if not rx.fullmatch(p)]
        if missing:
            raise PeftFormatError(f"{path}: field 'target_modules' (a regex) does not select {missing[0]!r}, "
                                  "which this model adapts")
        return
    if not isinstance(tm, list) or sorted(map(str, tm)) != sorted(spec.target_modules):
        raise PeftFormatError(f"{path}: field 'target_modules' must name this model's target modules "
                              f"{sorted(spec.target_modules)}, got {tm!r:.120}")
    lt = cfg.get("layers_to_transform")
    want = sorted(spec.layer_indices)
    if lt is not None:  # None: every layer (tensors of layers this model does not adapt are refused by name)
        if isinstance(lt, int) and not isinstance(lt, bool):
            lt = [lt]
        if not isinstance(lt, list) or sorted(lt) != want:
            raise PeftFormatError(f"{path}: field 'layers_to_transform' must be {want} (the layers this model "
                                  f"adapts), got {cfg.get('layers_to_transform')!r:.120}")


def _read_peft_tensors(weights: Path, spec: D2LSpec, paths, r: int):
    """({module: A [L, r, d_in]}, {module: B [L, r, d_out]}, metadata) of the weights file, names, dtypes and
    shapes checked before any tensor is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            want = {}
            for (i, m), p in paths.items():
                want[f"{PEFT_PREFIX}{p}.lora_A.weight"] = (i, m, "A", (r, spec.d_in[m]))
                want[f"{PEFT_PREFIX}{p}.lora_B.weight"] = (i, m, "B", (spec.d_out[m], r))
            missing, extra = sorted(set(want) - keys), sorted(keys - set(want))
            if missing or extra:
                raise PeftFormatError(f"{weights}: tensor names do not match this model's adapted modules: missing "
                                      f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected "
                                      f"{extra[:3]}{' ...' if len(extra) > 3 else ''}")
            for k, (_, _, _, shape) in want.items():
                sl = f.get_slice(k)
                dt, got = sl.get_dtype(), tuple(sl.get_shape())
                if dt not in _FLOATS:
                    raise PeftFormatError(f"{weights}: tensor {k!r} has dtype {dt}; expected F32, F16 or BF16")
                if got != shape:
                    raise PeftFormatError(f"{weights}: tensor {k!r} has shape {list(got)}, expected {list(shape)} "
                                          f"(r={r} from adapter_config.json)")
            tensors = {k: f.get_tensor(k) for k in want}
    except (OSError, SafetensorError) as e:
        raise PeftFormatError(f"{weights}: unreadable safetensors file (truncated or corrupt?): {e}") from None
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise PeftFormatError(f"{weights}: tensors of mixed dtypes {sorted(map(str, dtypes))}; expected one dtype")
    L, dt = spec.num_layers, dtypes.pop()
    A = {m: torch.empty(L, r, spec.d_in[m], dtype=dt) for m in spec.target_modules}
    B = {m: torch.empty(L, r, spec.d_out[m], dtype=dt) for m in spec.target_modules}
    for k, (i, m, ab, _) in want.items():
        if ab == "A":
            A[m][i] = tensors[k]
        else:
            B[m][i] = tensors[k].t()
    return A, B, meta


__all__ = ["PeftFormatError", "load_peft_adapter"]
