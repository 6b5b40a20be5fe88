"""The adapter file format: an :class:`~d2l_fast.adapters.AdapterBatch` as one safetensors file, read back with
every field checked.

Tensors ``<module>.A`` ``[layers, rank, d_in]`` and ``<module>.B`` ``[layers, rank, d_out]`` (the batch's ragged
tensors as they are); metadata ``format`` (``"d2l_fast.adapters"``), ``version``, ``rank_offsets`` (JSON list),
``alpha``, ``model_id`` and ``names`` (JSON list or null). :func:`read_adapter_file` checks the metadata, tensor
names, dtypes and shapes before any tensor is read, and raises :class:`~d2l_fast.CheckpointError` for every
malformed field. This module knows nothing of the batch class (:mod:`d2l_fast.adapters` builds on it).
"""

from __future__ import annotations

import json
import math

FORMAT = "d2l_fast.adapters"
_MAX_ADAPTERS = 1 << 24


def adapter_error(source: str, msg: str) -> ValueError:
    """A :class:`~d2l_fast.CheckpointError` (a ValueError) ``"<source>: <msg>"``."""
    from .checkpoint import CheckpointError

    return CheckpointError(f"{source}: {msg}")


def write_adapter_file(path, A: dict, B: dict, *, rank_offsets: list[int], alpha: float, model_id: str,
                       names: list | None) -> None:
    """Write the ragged tensors ``A`` / ``B`` (module → tensor) and the batch's fields to the safetensors ``path``."""
    from safetensors.torch import save_file

    if not isinstance(A, dict) or not isinstance(B, dict) or set(A) != set(B):
        what = [sorted(x) if isinstance(x, dict) else type(x).__name__ for x in (A, B)]
        raise ValueError(f"A and B must be dicts over the same modules, got {what[0]} and {what[1]}")
    tensors = {f"{m}.A": t.detach().cpu().contiguous() for m, t in A.items()}
    tensors.update({f"{m}.B": t.detach().cpu().contiguous() for m, t in B.items()})
    meta = {"format": FORMAT, "version": "1", "rank_offsets": json.dumps(rank_offsets),
            "alpha": repr(float(alpha)), "model_id": model_id, "names": json.dumps(names)}
    save_file(tensors, str(path), metadata=meta)


def read_adapter_file(path) -> tuple[dict, dict, list[int], float, str, list | None]:
    """``(A, B, rank_offsets, alpha, model_id, names)`` of a file written by :func:`write_adapter_file`, checked
    field by field (a :class:`~d2l_fast.CheckpointError` for the first malformed one) before any tensor is read."""
    from safetensors import SafetensorError, safe_open

    from .checkpoint import CheckpointError
    from .safe_io import check_regular_file

    check_regular_file(path, what="adapter file", error=CheckpointError)  # no device, FIFO or folder
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a d2l_fast adapter file (metadata format="
                                      f"{str(meta.get('format'))[:80]!r})")
            ro, alpha, model_id, names = _parse_adapter_meta(meta, path)
            shapes = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            mods = _check_adapter_tensors(shapes, ro, len(ro) - 1, path)
            tensors = {k: f.get_tensor(k) for k in shapes}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: unreadable adapter file (truncated or corrupt?): {e}") from e
    return ({m: tensors[f"{m}.A"] for m in mods}, {m: tensors[f"{m}.B"] for m in mods}, ro, alpha, model_id,
            names)


def _parse_adapter_meta(meta: dict, path):
    """rank_offsets (JSON list of ints from 0, non-decreasing), finite alpha, model id, optional names."""
    from .checkpoint import CheckpointError

    def field(name):
        if name not in meta:
            raise CheckpointError(f"{path}: adapter metadata lacks field {name!r}")
        return meta[name]

    def parse_json(name):
        try:
            return json.loads(field(name))
        except (json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: adapter metadata field {name!r} is not valid JSON: {e}") from None

    ro = parse_json("rank_offsets")
    if not isinstance(ro, list) or not 2 <= len(ro) <= _MAX_ADAPTERS + 1:
        raise CheckpointError(f"{path}: field 'rank_offsets' must be a list of 2 to {_MAX_ADAPTERS + 1} integers, got "
                              f"{type(ro).__name__} of length {len(ro) if isinstance(ro, list) else '-'}")
    bad = [x for x in ro if not isinstance(x, int) or isinstance(x, bool)]
    if bad:
        raise CheckpointError(f"{path}: field 'rank_offsets' must hold integers only, got {bad[:3]!r:.80}")
    if ro[0] != 0 or any(b < a for a, b in zip(ro[:-1], ro[1:])):
        raise CheckpointError(f"{path}: field 'rank_offsets' must start at 0 and be non-decreasing, got {ro[:8]}...")
    try:
        alpha = float(field("alpha"))
    except ValueError:
        raise CheckpointError(f"{path}: field 'alpha' must be a number, got {field('alpha')[:80]!r}") from None
    if not math.isfinite(alpha):
        raise CheckpointError(f"{path}: field 'alpha' must be finite, got {alpha}")
    model_id = field("model_id")
    names = parse_json("names") if "names" in meta else None
    if names is not None and (not isinstance(names, list) or len(names) != len(ro) - 1
                              or not all(n is None or isinstance(n, str) for n in names)):
        raise CheckpointError(f"{path}: field 'names' must be null or a list of {len(ro) - 1} strings")
    return ro, alpha, model_id, names


def _check_adapter_tensors(shapes: dict, ro: list[int], n: int, path) -> list[str]:
    """Names ``<module>.A``/``.B`` in pairs, float dtypes, A [L, R, d_in] / B [L, R, d_out], R = rank_offsets[-1]."""
    from .checkpoint import CheckpointError

    mods = set()
    for k, (dtype, shape) in shapes.items():
        m, _, ab = k.rpartition(".")
        if ab not in ("A", "B") or not m:
            raise CheckpointError(f"{path}: unexpected tensor {k!r:.80} (expected <module>.A and <module>.B)")
        if dtype not in ("F16", "BF16", "F32", "F64"):
            raise CheckpointError(f"{path}: tensor {k!r} has dtype {dtype}, expected a float dtype")
        if len(shape) != 3:
            raise CheckpointError(f"{path}: tensor {k!r} has shape {list(shape)}, expected [layers, rank, features]")
        mods.add(m)
    if not mods:
        raise CheckpointError(f"{path}: no adapter tensors")
    L = None
    for m in sorted(mods):
        if f"{m}.A" not in shapes or f"{m}.B" not in shapes:
            raise CheckpointError(f"{path}: module {m!r} needs both {m}.A and {m}.B")
        a, b = shapes[f"{m}.A"][1], shapes[f"{m}.B"][1]
        if a[:2] != b[:2] or a[1] != ro[-1]:
            raise CheckpointError(f"{path}: module {m!r}: A {list(a)} / B {list(b)} must share [layers, rank] "
                                  f"with rank = rank_offsets[-1] = {ro[-1]}")
        if L is not None and a[0] != L:
            raise CheckpointError(f"{path}: module {m!r} has {a[0]} layers, another module {L}")
        L = a[0]
    return sorted(mods)


__all__ = ["FORMAT", "adapter_error", "read_adapter_file", "write_adapter_file"]
