"""A checkpoint's own settings: the ``model_card.json`` beside its weights, read and validated.

A checkpoint folder may hold a ``model_card.json`` (:func:`read_model_card`); every field is optional. The ones code
uses are the settings the hypernetwork was trained with:

* ``prompt`` — ``{"system": str | null, "instruction": str with "{question}"}``: the prompt layout of its training
  questions (:func:`prompt_layout`; default: the bare question, no system message, as ``d2l-fast gen-data`` writes);
* ``max_chunk_len`` — int: chat-templated tokens per document chunk (the longest context it was trained to read);
* ``reads`` — str: one or two sentences for people on what it was trained to read;
* ``training_data`` — str: which generated data it was trained on, e.g. ``"reading"`` (the reading data of
  :mod:`d2l_fast.training.reading`: ``d2l-fast demo`` then shows its held-out needles, facts and numbers).

:meth:`d2l_fast.D2LModel.from_checkpoint` (and so :func:`d2l_fast.pretrained`, ``d2l-fast ask``, ``serve`` and
``demo``) reads the card of a checkpoint folder and uses these as the model's defaults. This module imports nothing
from the package, so that the model can read cards without an import cycle.
"""

from __future__ import annotations

import json
import os
import pathlib

MODEL_CARD_JSON = "model_card.json"
#: the prompt layout of a card that gives none: ``d2l-fast gen-data``'s student turn, the bare question, no system
DEFAULT_PROMPT = {"system": None, "instruction": "{question}"}


def _fail(path, what: str, value) -> ValueError:
    return ValueError(f"{path}: {what}, got {value!r:.200}")


def check_instruction(instruction, where: str = "instruction") -> str:
    """``instruction`` if it is a string with exactly the ``{question}`` slot (``str.format`` must fill it)."""
    if not isinstance(instruction, str) or "{question}" not in instruction:
        raise ValueError(f"{where} must be a string containing {{question}}, got {instruction!r:.200}")
    try:
        instruction.format(question="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{where} must have {{question}} as its only {{...}} slot (write other braces as {{{{ }}}}), "
                         f"got {instruction!r:.200}: {e!r}") from None
    return instruction


def read_model_card(folder) -> dict:
    """The ``model_card.json`` of a checkpoint folder as a dict (``{}`` when there is none).

    Known fields (all optional): ``training_command`` (str), ``steps`` (int or str), ``heldout`` (object of results),
    ``prompt`` (``{"system": str | null, "instruction": str with "{question}"}``), ``max_chunk_len`` (positive
    int), ``reads`` and ``training_data`` (non-empty str); see the module docstring. A bad field is a
    :class:`ValueError` naming the file and the field.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path, got {type(folder).__name__}")
    path = pathlib.Path(folder) / MODEL_CARD_JSON
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable model card: {e}") from e
    if not isinstance(card, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(card).__name__}")
    prompt = card.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, dict) or set(prompt) - {"system", "instruction"}:
            raise _fail(path, "'prompt' must be an object with 'system' and/or 'instruction'", prompt)
        if not isinstance(prompt.get("system"), (str, type(None))):
            raise _fail(path, "prompt.system must be a string or null", prompt.get("system"))
        check_instruction(prompt.get("instruction", "{question}"), f"{path}: prompt.instruction")
    mcl = card.get("max_chunk_len")
    if mcl is not None and (isinstance(mcl, bool) or not isinstance(mcl, int) or mcl < 1):
        raise _fail(path, "max_chunk_len must be a positive int (chat-templated tokens per chunk)", mcl)
    reads = card.get("reads")
    if reads is not None and (not isinstance(reads, str) or not reads.strip()):
        raise _fail(path, "reads must be a non-empty string (what the model was trained to read)", reads)
    data = card.get("training_data")
    if data is not None and (not isinstance(data, str) or not data.strip()):
        raise _fail(path, "training_data must be a non-empty string (the data it was trained on, e.g. 'reading')",
                    data)
    return card


def prompt_layout(card: dict | None) -> dict:
    """``{"system": ..., "instruction": ...}`` of a model card (the defaults for what it leaves out)."""
    return {**DEFAULT_PROMPT, **((card or {}).get("prompt") or {})}


def card_folder(source) -> pathlib.Path | None:
    """The folder whose model card belongs to a checkpoint loaded from ``source`` (a folder, or a weights file:
    its folder), or None (no local source, e.g. an in-memory state dict)."""
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        return None
    p = pathlib.Path(source)
    if p.is_dir():
        return p
    return p.parent if p.is_file() else None


__all__ = ["DEFAULT_PROMPT", "MODEL_CARD_JSON", "card_folder", "check_instruction", "prompt_layout",
           "read_model_card"]
