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


_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
           "presence_penalty", "frequency_penalty", "logprobs", "documents", "document", "context_scaling",
           "bias_scaling"}
#: the body fields each endpoint implements; any other field with a non-null value is a 400 naming it
ALLOWED = {"chat": _COMMON | {"messages", "max_completion_tokens"},
           "completion": _COMMON | {"prompt", "best_of", "echo", "suffix"}}


def check_supported(body: dict, kind: str) -> None:
    """A 400 naming the first body field (sorted) this server does not implement (tools, response_format, ...)."""
    extra = sorted(k for k, v in body.items() if k not in ALLOWED[kind] and v is not None)
    if extra:
        raise bad_request(f"the parameter {extra[0]!r} is not supported by this server"
                          f"{f' (nor {extra[1:]})' if len(extra) > 1 else ''}; supported: {sorted(ALLOWED[kind])}",
                          extra[0])


def completion_prompts(body: dict, tokenizer, vocab_size: int, max_prompts: int) -> list[list[int]]:
    """The prompt(s) of a text completion as token ids: a string, an array of strings, an array of token ids or an
    array of arrays of token ids (OpenAI's four forms)."""
    p = body.get("prompt")
    if isinstance(p, str):
        p = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        p = [p]
    if not isinstance(p, list) or not p:
        raise bad_request(f"'prompt' must be a non-empty string, array of strings, array of token ids or array of "
                          f"arrays of token ids, got {typename(p)}", "prompt")
    if len(p) > max_prompts:
        raise bad_request(f"'prompt' holds {len(p)} prompts, at most {max_prompts} are allowed", "prompt")
    out = []
    for k, x in enumerate(p):
        if isinstance(x, str) and x:
            out.append(list(tokenizer(x)["input_ids"]))
        elif (isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)):
            bad = [t for t in x if not 0 <= t < vocab_size]
            if bad:
                raise bad_request(f"prompt[{k}] has token id {bad[0]} outside the vocabulary (0..{vocab_size - 1})",
                                  "prompt")
            out.append(list(x))
        else:
            raise bad_request(f"prompt[{k}] must be a non-empty string or a non-empty array of token ids, got "
                              f"{typename(x)}", "prompt")
    return out


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


__all__ = ["ALLOWED", "ROLES", "check_supported", "completion_prompts", "field_value", "message_text",
           "parse_json_body", "str_list", "typename"]
