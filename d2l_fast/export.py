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


__all__ = ["export_peft"]
