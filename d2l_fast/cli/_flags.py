"""argparse flags generated from a settings dataclass: one ``--<field-name>`` flag per field (or
``metadata["flag"]``), its help from ``metadata["help"]``, its default the field's, its type from the annotation,
its allowed values from ``metadata["choices"]`` when given."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def _base_type(tp):
    """``int``, ``float``, ``str`` or ``bool`` of an annotation (``X | None`` → X)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        if len(args) != 1:
            raise TypeError(f"cannot make a flag for the annotation {tp!r}")
        tp = args[0]
    if tp not in (int, float, str, bool):
        raise TypeError(f"cannot make a flag for the annotation {tp!r}")
    return tp


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, *, skip=(), types: dict | None = None) -> list[str]:
    """One flag per field of the dataclass ``cls`` (except ``skip``); returns the field names (the ``dest`` s).

    ``types``: argparse ``type`` per field name where the annotation's type is not the parser wanted (e.g. a
    positive-int parser)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"cls must be a dataclass type, got {cls!r}")
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name} has no default; give it as a positional argument instead")
        tp = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        shown = "none" if f.default is None else f.default
        if "default" not in help_:
            help_ = f"{help_} (default: {shown})".strip()
        kw = dict(dest=f.name, default=f.default, help=help_)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = (types or {}).get(f.name, tp)
            kw["metavar"] = {int: "N", float: "X"}.get(tp, flag_name(f)[2:].upper().replace("-", "_"))
            if "choices" in f.metadata:  # argparse lists them and rejects anything else
                kw["choices"] = tuple(f.metadata["choices"])
                del kw["metavar"]
        parser.add_argument(flag_name(f), **kw)
        names.append(f.name)
    return names


def dataclass_kwargs(args: argparse.Namespace, cls, *, skip=()) -> dict:
    """The parsed values of ``cls`` 's flags, as keyword arguments of ``cls``."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip}
