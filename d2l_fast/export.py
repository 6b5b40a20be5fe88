"""Export d2l_fast adapters as standard PEFT LoRA folders (for PEFT, vLLM, SGLang, LoRAX and other LoRA servers).

    from d2l_fast.export import export_peft
    adapters = model.internalize(["doc one ...", "doc two ..."])
    export_peft(model, adapters, [0, 1], "peft_out")              # peft_out/doc0/, peft_out/doc1/
    export_peft(model, adapters, 1, "doc_one")                     # one folder for document 1
    export_peft(model, adapters, [0, 1], "both", compose=True)     # one adapter applying both documents

Each folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` exactly as ``PeftModel.save_pretrained``
writes them for a LoRA on the same base model: the key of adapter layer i, module m is
``base_model.model.<path of m in base decoder layer spec.layer_indices[i]>.lora_A.weight`` (and ``lora_B``),
with the module path read from the base model's own module tree. Document k's update ΔW = alpha · Bₖᵀ Aₖ becomes
``lora_A.weight = Aₖ`` [r, d_in], ``lora_B.weight = Bₖᵀ`` [d_out, r], ``r = rank of document k`` (no padding) and
``lora_alpha = alpha · r``, so PEFT's scaling ``lora_alpha / r`` equals d2l_fast's alpha.

Serving with vLLM: start it with ``--enable-lora --max-lora-rank N`` where N ≥ the largest exported rank (vLLM
accepts a fixed set of values, e.g. 8, 16, 32, 64, 128, 256, 320, 512) and ``--lora-modules name=folder``, or load
folders at run time. A document of n chunks has rank (n + 1) · lora_r, so long documents have large ranks:
``max_rank=`` makes the export fail early when a document would exceed the rank the server accepts. The server must
also support LoRA on the exported target modules of that architecture. The folders are tested with PEFT only.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import shutil
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

from .config import D2LSpec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


def export_peft(model_or_spec, adapters, index_or_indices, out_dir, *, dtype=None, names=None,
                overwrite: bool = False, compose: bool = False, weights=None, max_rank: int | None = None,
                base_model=None) -> list[Path]:
    """Write documents of ``adapters`` as PEFT LoRA folders; returns the folders written.

    ``model_or_spec``: the :class:`~d2l_fast.D2LModel` that made the adapters (its base model gives the module
    paths), a :class:`~d2l_fast.LoadedCheckpoint`, or a :class:`~d2l_fast.D2LSpec`. Adapters made by another model
    are refused (model id check; with a bare spec only the base model name and the shapes can be checked).
    ``base_model``: where module paths come from when no D2LModel is given — an HF model, or a local folder / hub
    id whose config is instantiated on the meta device (no weights are read); default: the spec's base model.

    ``index_or_indices``: an int writes that document to the folder ``out_dir``; a list writes one folder per
    document under the directory ``out_dir`` (named by ``names``, else the adapters' own names made file-safe,
    else ``doc{k}``); with ``compose=True`` the listed documents (optionally scaled by ``weights``, as
    :meth:`AdapterBatch.compose`) become one adapter of rank Σ rₖ written to ``out_dir``.

    ``dtype``: float32, float16 or bfloat16 (default: the adapters' dtype). ``max_rank``: refuse any folder whose
    rank exceeds it (set it to the serving engine's limit, e.g. vLLM's ``--max-lora-rank``).

    Every input is checked before anything is written. Each folder is written to a temporary sibling and renamed
    into place; an existing folder is refused unless ``overwrite=True``, and even then only an empty folder or a
    PEFT folder (one holding ``adapter_config.json``) is replaced — the old one is removed only after the new one
    is in place.
    """
    spec, tree, expected_id = _resolve_model(model_or_spec, base_model)
    if not _is_adapter_batch(adapters):
        raise TypeError(f"adapters must be an AdapterBatch, got {type(adapters).__name__}")
    _check_same_model(adapters, spec, expected_id)
    adapters.check_fits(spec, source="adapters")
    if not math.isfinite(float(adapters.alpha)):
        raise ValueError(f"adapters.alpha must be finite, got {adapters.alpha}")
    dtype = adapters.dtype if dtype is None else dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES.values())}, got {dtype}")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank must be a positive int or None, got {max_rank!r}")
    out_dir = Path(out_dir)

    single = not isinstance(index_or_indices, (list, tuple, range))
    indices = _check_indices([index_or_indices] if single else list(index_or_indices), len(adapters))
    if not compose and weights is not None:
        raise ValueError("weights= only applies with compose=True")
    if single or compose:
        if names is not None:
            mode = "compose=True" if compose else "an int index"
            raise ValueError(f"names= names the folders of a list export; with {mode} the folder is out_dir itself "
                             f"({str(out_dir)!r}), got names={names!r:.80}")
        if compose:
            ad = adapters.compose(indices, weights)  # validates weights against the indices
            jobs = [(out_dir, ad, 0, indices)]
        else:
            jobs = [(out_dir, adapters, indices[0], indices)]
    else:
        folder_names = _folder_names(adapters, indices, names)
        jobs = [(out_dir / nm, adapters, k, [k]) for nm, k in zip(folder_names, indices)]

    for folder, ad, k, docs in jobs:
        r = ad.ranks[k]
        what = f"composed adapter of documents {docs}" if compose else f"document {k}"
        if r == 0:
            raise ValueError(f"{what} has rank 0 (an empty adapter); PEFT needs r >= 1")
        if max_rank is not None and r > max_rank:
            raise ValueError(f"{what} has rank {r}, above max_rank={max_rank} (a document of n chunks has rank "
                             f"(n+1)*lora_r = (n+1)*{spec.lora_r}): raise the server's limit (vLLM: --max-lora-rank) "
                             "to at least this rank, or internalize the document with fewer/longer chunks")
        _check_target(folder, overwrite)

    if not single and not compose and (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} exists and is not a directory (a list export writes one folder "
                                 "per document under it)")
    tree = _module_tree(spec, tree)
    paths = _module_paths(spec, tree)
    target_modules, layers_to_transform = _peft_targets(spec, tree, paths)
    staged = []
    try:
        for folder, ad, k, docs in jobs:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
            staged.append((tmp, folder))
            _write_folder(tmp, ad, k, spec, paths, target_modules, layers_to_transform, dtype,
                          [_doc_name(adapters, i) for i in docs])
        for tmp, folder in staged:
            _commit(tmp, folder, overwrite)
    finally:
        for tmp, _ in staged:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return [folder for _, folder in staged]


# ----------------------------------------------------------------------------- validation
def _is_adapter_batch(obj) -> bool:
    """An :class:`~d2l_fast.AdapterBatch` by its interface: this module sits below :mod:`d2l_fast.adapters`
    (``AdapterBatch.to_peft`` calls :func:`export_peft`), so it does not import the class."""
    return all(hasattr(obj, a) for a in ("A", "B", "rank_offsets", "alpha", "model_id", "names", "check_fits",
                                         "select", "compose"))


def _resolve_model(model_or_spec, base_model):
    """(spec, module tree source, expected adapter model id or None)."""
    from .checkpoint import LoadedCheckpoint

    if isinstance(model_or_spec, D2LSpec):
        return model_or_spec, base_model, None
    if isinstance(model_or_spec, LoadedCheckpoint):
        from .fingerprint import model_fingerprint

        sd = model_or_spec.state_dict
        if "head.weight" not in sd:
            raise ValueError("checkpoint has no 'head.weight' tensor; cannot identify the model its adapters come from")
        shim = types.SimpleNamespace(named_parameters=lambda: [("head.weight", sd["head.weight"])])
        return model_or_spec.spec, base_model, model_fingerprint(model_or_spec.spec, shim)
    spec, model_id, bm = (getattr(model_or_spec, a, None) for a in ("spec", "model_id", "base_model"))
    if isinstance(spec, D2LSpec) and isinstance(model_id, str) and isinstance(bm, nn.Module):
        if base_model is not None:
            raise ValueError("base_model= is only for a spec or checkpoint; a D2LModel brings its own base model")
        return spec, bm, model_id
    raise TypeError(f"model_or_spec must be a D2LModel, LoadedCheckpoint or D2LSpec, "
                    f"got {type(model_or_spec).__name__}")


def _check_same_model(adapters, spec: D2LSpec, expected_id: str | None) -> None:
    if expected_id is not None:
        if adapters.model_id != expected_id:
            raise ValueError(f"these adapters were made by another model: expected model id {expected_id!r}, "
                             f"got {adapters.model_id!r}")
        return
    base_name = adapters.model_id.rpartition("@")[0]
    if base_name != spec.base_model_name_or_path:
        raise ValueError(f"these adapters were made for base model {base_name!r} (model id {adapters.model_id!r}), "
                         f"the spec is for {spec.base_model_name_or_path!r}")


def _check_indices(indices, n: int) -> list[int]:
    if not indices:
        raise ValueError("no document index given (expected an int or a non-empty list of ints)")
    out = []
    for i in indices:
        try:
            if isinstance(i, bool):
                raise TypeError
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"document indices must be ints, got {i!r:.40} ({type(i).__name__})") from None
        if not -n <= i < n:
            raise IndexError(f"document index {i} out of range: the adapters hold {n} documents (0..{n - 1})")
        out.append(i % n)
    return out


def _doc_name(adapters, k: int) -> str | None:
    return adapters.names[k] if adapters.names else None


def _folder_names(adapters, indices: list[int], names) -> list[str]:
    if names is not None:
        if isinstance(names, str) or len(names) != len(indices):
            raise ValueError(f"names must be a list of {len(indices)} folder names (one per index), got {names!r:.80}")
        for nm in names:
            if not isinstance(nm, str) or not _NAME_OK.fullmatch(nm):
                raise ValueError(f"folder name {nm!r:.80} is not allowed: expected 1-200 characters from "
                                 "[A-Za-z0-9._+-], starting with a letter or digit")
        out = list(names)
    else:
        out = []
        for k in indices:
            own = re.sub(r"[^A-Za-z0-9._+-]+", "_", _doc_name(adapters, k) or "").lstrip("._+-")[:200]
            out.append(own or f"doc{k}")
        if len(set(out)) != len(out):  # repeated document names: make each folder name unique by its index
            out = [f"{nm}-{k}" if out.count(nm) > 1 else nm for nm, k in zip(out, indices)]
    dup = sorted({nm for nm in out if out.count(nm) > 1})
    if dup:
        raise ValueError(f"two documents would be written to the same folder {dup[:3]}; give distinct names=")
    return out


def _check_target(folder: Path, overwrite: bool) -> None:
    if not folder.exists() and not folder.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if folder.is_symlink() or not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a directory; refusing to replace it")
    if any(folder.iterdir()) and not (folder / CONFIG_NAME).is_file():
        raise FileExistsError(f"{folder} is a non-empty directory without {CONFIG_NAME} (not a PEFT adapter folder); "
                              "refusing to replace it even with overwrite=True")


# ----------------------------------------------------------------------------- module paths
def _module_tree(spec: D2LSpec, tree):
    if isinstance(tree, nn.Module):
        return tree
    from .hf import base_model_skeleton

    return base_model_skeleton(tree if tree is not None else spec.base_model_name_or_path)


def _module_paths(spec: D2LSpec, model: nn.Module) -> dict[tuple[int, str], str]:
    """{(adapter layer i, module): qualified name of that Linear in the base causal LM}."""
    from .hf import find_target_linears

    try:
        lins = find_target_linears(model, spec.target_modules)
    except ValueError as e:
        raise ValueError(f"base model does not have the adapters' target modules {list(spec.target_modules)}: "
                         f"{e}") from e
    n_layers = 1 + max(layer for layer, _ in lins)
    if max(spec.layer_indices) >= n_layers:
        raise ValueError(f"adapters target decoder layers {list(spec.layer_indices)}, the base model has {n_layers}")
    qual = {id(mod): name for name, mod in model.named_modules(remove_duplicate=False)}
    out = {}
    for i, layer in enumerate(spec.layer_indices):
        for m in spec.target_modules:
            lin = lins[(layer, m)]
            if (lin.in_features, lin.out_features) != (spec.d_in[m], spec.d_out[m]):
                raise ValueError(f"layer {layer} {m}: adapters expect {spec.d_in[m]}->{spec.d_out[m]}, the base model "
                                 f"has {lin.in_features}->{lin.out_features} (wrong base model?)")
            out[(i, m)] = qual[id(lin)]
    return out


def _peft_targets(spec: D2LSpec, model: nn.Module, paths) -> tuple[list[str] | str, list[int] | None]:
    """PEFT ``target_modules`` / ``layers_to_transform`` selecting exactly the exported Linears.

    The portable form is the list of module names (what vLLM and others expect), with ``layers_to_transform``
    when only some decoder layers are adapted. If a module name also occurs outside the decoder layers (e.g. a
    vision tower), PEFT would wrap those too, so the exact module paths are given as one regex instead.
    """
    from .hf import find_target_linears

    decoder = {id(mod) for mod in find_target_linears(model, spec.target_modules).values()}
    suffix_hits = [mod for name, mod in model.named_modules()
                   if any(name == m or name.endswith("." + m) for m in spec.target_modules)]
    n_layers = len({layer for layer, _ in find_target_linears(model, spec.target_modules[:1])})
    if all(id(mod) in decoder for mod in suffix_hits):
        subset = sorted(spec.layer_indices) if set(spec.layer_indices) != set(range(n_layers)) else None
        return list(spec.target_modules), subset
    return "(" + "|".join(re.escape(p) for p in sorted(paths.values())) + ")", None


# ----------------------------------------------------------------------------- writing
def _write_folder(folder: Path, ad, k: int, spec: D2LSpec, paths, target_modules, layers_to_transform,
                  dtype, doc_names) -> None:
    from safetensors.torch import save_file

    s, e = ad.rank_offsets[k], ad.rank_offsets[k + 1]
    r = e - s
    tensors = {}
    for (i, m), path in paths.items():
        a = ad.A[m][i, s:e]  # [r, d_in]
        b = ad.B[m][i, s:e]  # [r, d_out] → PEFT's lora_B.weight is [d_out, r]
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.detach().to("cpu", dtype).contiguous().clone()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.detach().t().to("cpu", dtype).contiguous().clone()
    alpha = float(ad.alpha)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha * r,  # PEFT scales by lora_alpha / r = alpha
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "layers_to_transform": layers_to_transform,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    meta = {"format": "pt", "d2l_fast.model_id": ad.model_id, "d2l_fast.documents": json.dumps(doc_names),
            "d2l_fast.alpha": repr(alpha)}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata=meta)
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _commit(tmp: Path, folder: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``folder``; an existing folder (allowed by overwrite) is moved aside first, removed last."""
    if not (folder.exists() or folder.is_symlink()):
        os.rename(tmp, folder)
        return
    _check_target(folder, overwrite)  # re-checked: the folder may have appeared since validation
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.rename(folder, old / "x")
    try:
        os.rename(tmp, folder)
    except OSError:
        os.rename(old / "x", folder)  # put the previous adapter back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- loading (the inverse)
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
    from .adapters import AdapterBatch
    from .safe_io import check_regular_file, read_json

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


__all__ = ["PeftFormatError", "export_peft", "load_peft_adapter"]
