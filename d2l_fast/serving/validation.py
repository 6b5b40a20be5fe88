"""Reading and checking request bodies: every malformed field is a 400 naming it (OpenAI's error format)."""

from __future__ import annotations

import json
import math

from .errors import bad_request

_MISSING = object()

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def typename(v) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                     list: "array", dict: "object"}.get(type(v), type(v).__name__)


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object; not JSON, nested too deeply for the parser (RecursionError) or not an
    object: a 400."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad_request("the request body nests arrays/objects too deeply to parse") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {typename(body)}")
    return body


def field_value(body: dict, name: str, kind: str, default=_MISSING, *, lo=None, hi=None):
    """``body[name]`` checked to be of ``kind`` (str, int, number, bool, object) and within [lo, hi]."""
    if name not in body or body[name] is None:
        if default is _MISSING:
            raise bad_request(f"missing required field {name!r}", name)
        return default
    v = body[name]
    ok = {"str": isinstance(v, str), "bool": isinstance(v, bool), "object": isinstance(v, dict),
          "int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool)}[kind]
    if not ok:
        want = {"str": "a string", "int": "an integer", "number": "a number", "bool": "a boolean",
                "object": "an object"}[kind]
        raise bad_request(f"{name!r} must be {want}, got {typename(v)} {json.dumps(v)[:60]}", name)
    if kind == "number":
        if not math.isfinite(v):
            raise bad_request(f"{name!r} must be a finite number, got {v}", name)
        v = float(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if lo is not None and hi is not None else (f">= {lo}" if lo is not None
                                                                                 else f"<= {hi}")
        raise bad_request(f"{name!r} must be {rng}, got {v}", name)
    return v


def str_list(body: dict, name: str, *, max_len: int, allow_str: bool = False) -> list[str] | None:
    if name not in body or body[name] is None:
        return None
    v = body[name]
    if allow_str and isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad_request(f"{name!r} must be an array of strings{' or a string' if allow_str else ''}, got "
                          f"{typename(v)} {json.dumps(v)[:60]}", name)
    if len(v) > max_len:
        raise bad_request(f"{name!r} has {len(v)} entries, at most {max_len} are allowed", name)
    return v


def message_text(content, k: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise bad_request(f"messages[{k}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) "
                                  f"are supported", "messages")
            parts.append(p["text"])
        return "".join(parts)
    raise bad_request(f"messages[{k}].content must be a string or an array of text parts, got "
                      f"{typename(content)}", "messages")


__all__ = ["ROLES", "field_value", "message_text", "parse_json_body", "str_list", "typename"]
