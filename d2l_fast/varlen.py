"""Padding-free varlen attention for the context encoder on the base model's own weights.

During a packed encoder pass the base model runs ONE row holding every chunk back to back
(``position_ids`` restart at 0 per chunk) with the attention implementation switched to
``"d2l_varlen"``: each chunk attends causally to itself only, computed chunk by chunk, so there is no
padding anywhere and no [T_total, T_total] mask. Model-specific attention details arrive as the
usual HF keyword arguments: ``scaling``, ``softcap`` (Gemma-2 logit soft-capping), ``sliding_window``.
The attention runs through one of :data:`BACKENDS`: ``blocked`` (chunk by chunk, as above), ``flex`` (the whole
row in one FlexAttention call, :mod:`d2l_fast.flex`), ``flash`` (flash-attn's ``flash_attn_varlen_func``);
``auto`` picks a fused one on CUDA in 16-bit (flash-attn where the model does not soft-cap and it is installed,
else flex) and ``blocked`` elsewhere.

The switch is made on the model's config for the duration of one encoder pass; the pass holds the
model's lock exclusively (:mod:`d2l_fast.concurrency`), so forwards from other threads wait for it
instead of seeing the switched config.

A packed row may also be encoded in token windows (``window=`` of :func:`packed_attention`, a
:class:`RowCache`), as chunked prefill does: each pass runs the tokens ``start .. end-1`` of the row, their
keys and values are kept, and each query attends to the keys of its own chunk up to itself, from this window and
the windows before. A query attends to the same keys as in one whole-row pass; only the blocking of the
arithmetic differs (fp32 rounding). Windows run the blocked path or flex (queries of the window against the row's
keys up to its end, :mod:`d2l_fast.flex`), not flash-attn.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
import torch.nn.functional as F

from . import flex as _flex

logger = logging.getLogger(__name__)

NAME = "d2l_varlen"
#: attention backends of a packed pass: ``auto`` (CUDA, 16-bit: flash-attn varlen where the model has no soft-capping
#: and flash-attn is installed, else FlexAttention; otherwise blocked), ``flex`` (:mod:`d2l_fast.flex`), ``flash``
#: (flash-attn's varlen kernel; CUDA, 16-bit), ``blocked`` (per-chunk SDPA / eager softcap attention, any device)
BACKENDS = ("auto", "flex", "flash", "blocked")
_state = threading.local()
_registered = []
_flex_ok: list = []  # flex ran once in this process (after that its errors are real errors, not fallbacks)
_flex_broken: list = []  # why auto stopped choosing flex (a failed compile)


def _bounds():
    b = getattr(_state, "bounds", None)
    if b is None:
        raise RuntimeError("d2l_varlen attention used outside ContextEncoder.encode_packed")
    return b


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # optional, CUDA only
    except Exception:  # noqa: BLE001
        return None
    return flash_attn_varlen_func


def _pick_backend(query, softcap) -> str:
    """The backend this pass's attention call uses (see :data:`BACKENDS`)."""
    backend = getattr(_state, "backend", "auto")
    half = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash":
        if not half or _flash_varlen() is None:
            raise RuntimeError(f"attention='flash' needs flash-attn and a CUDA fp16/bf16 model, got "
                               f"{query.device.type} {query.dtype} (flash-attn "
                               f"{'installed' if _flash_varlen() is not None else 'not installed'})")
        return backend
    if backend == "flex":
        if not _flex.available():
            raise RuntimeError(f"attention='flex' needs torch >= 2.5 (FlexAttention), got torch {torch.__version__}")
        return backend
    if backend == "blocked" or not half:
        return "blocked"
    if _flash_varlen() is not None and not softcap:
        return "flash"
    if _flex.available() and not _flex_broken and _flex.compiles(query.device):
        return "flex"
    return "flash" if _flash_varlen() is not None else "blocked"


def _masks() -> _flex.PackedMasks:
    m = getattr(_state, "masks", None)
    if m is None:
        bounds, cu, _ = _bounds()
        m = _state.masks = _flex.PackedMasks([b - a for a, b in bounds], cu.device)
    return m


def _block_attention(q, k, v, offset, scaling, softcap, window):
    """Queries ``offset .. offset+qb-1`` of a chunk (q [H, qb, d]) against keys 0 .. kb-1 (k/v [KVH, kb, d])."""
    qb, kb = q.shape[1], k.shape[1]
    i = torch.arange(qb, device=q.device)[:, None] + offset
    j = torch.arange(kb, device=q.device)[None, :]
    keep = j <= i
    if window is not None:
        keep &= (i - j) < window
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scaling, enable_gqa=True)
    rep = q.shape[0] // k.shape[0]
    if rep > 1:
        k = k.repeat_interleave(rep, 0)
        v = v.repeat_interleave(rep, 0)
    s = torch.tanh((q @ k.transpose(-1, -2)) * scaling / softcap) * softcap
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s.float(), -1).to(v.dtype) @ v


def _segment_attention(q, k, v, scaling, softcap, window, max_scores=None):
    """q [H, t, d], k/v [KVH, t, d] of one chunk: causal (and sliding-window) attention, fp32 softmax.

    With ``max_scores``, a chunk whose [H, t, t] score matrix would exceed it is attended in query blocks
    (each against its causal / windowed keys only), so at most about ``max_scores`` scores exist at once.
    """
    t = q.shape[1]
    if max_scores is not None and q.shape[0] * t * t > max_scores:
        qb = max(16, max_scores // (q.shape[0] * t))
        out = q.new_empty(q.shape[0], t, v.shape[-1])
        for a in range(0, t, qb):
            b = min(t, a + qb)
            k0 = 0 if window is None else max(0, a - window + 1)
            out[:, a:b] = _block_attention(q[:, a:b], k[:, k0:b], v[:, k0:b], a - k0, scaling, softcap, window)
        return out
    if softcap is None and (window is None or t <= window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    rep = q.shape[0] // k.shape[0]
    if rep > 1:
        k = k.repeat_interleave(rep, 0)
        v = v.repeat_interleave(rep, 0)
    s = (q @ k.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    i = torch.arange(t, device=q.device)
    keep = i[None, :] <= i[:, None]
    if window is not None:
        keep &= (i[:, None] - i[None, :]) < window
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s.float(), -1).to(v.dtype) @ v


class RowCache:
    """Keys and values of one packed row of ``n_tokens`` tokens encoded in token windows (see the module docstring).

    :meth:`window` sets the tokens the next pass runs; each attention layer's keys and values are written to this
    row's buffers as the pass goes (one [KVH, n_tokens, d] pair per layer, allocated at its first window).
    """

    def __init__(self, n_tokens: int):
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
        self.n_tokens = n_tokens
        self.start = self.end = 0
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def window(self, start: int, end: int) -> RowCache:
        """The next pass runs the row's tokens ``start .. end-1`` (windows in order: the keys before ``start``
        were written by earlier windows)."""
        if not 0 <= start < end <= self.n_tokens:
            raise ValueError(f"window {start}..{end} is not inside the row's {self.n_tokens} tokens")
        self.start, self.end = start, end
        return self

    def update(self, module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this window's key/value [KVH, end-start, d] of ``module``; its keys/values of tokens 0 .. end-1."""
        kv = self._kv.get(id(module))
        if kv is None:
            kv = (key.new_empty(key.shape[0], self.n_tokens, key.shape[-1]),
                  value.new_empty(value.shape[0], self.n_tokens, value.shape[-1]))
            self._kv[id(module)] = kv
        kv[0][:, self.start : self.end] = key
        kv[1][:, self.start : self.end] = value
        return kv[0][:, : self.end], kv[1][:, : self.end]


def _window_attention(module, query, key, value, bounds, cache: RowCache, scaling, softcap, window, max_scores):
    """Queries of the window ``cache.start .. cache.end-1`` of the row (query [1, H, w, d]) → [1, w, H, d]."""
    s, e = cache.start, cache.end
    if query.shape[2] != e - s:
        raise RuntimeError(f"d2l_varlen window {s}..{e} got {query.shape[2]} queries")
    keys, values = cache.update(module, key[0], value[0])
    n_heads = query.shape[1]
    out = query.new_empty(1, e - s, n_heads, value.shape[-1])
    for a, b in bounds:  # the chunk a..b-1 of the row: its queries in this window, against its keys up to each
        qa, qb = max(a, s), min(b, e)
        if qa >= qb:
            continue
        step = qb - qa if max_scores is None else max(16, max_scores // (n_heads * (qb - a)))
        for x in range(qa, qb, step):
            y = min(qb, x + step)
            k0 = a if window is None else max(a, x - window + 1)
            o = _block_attention(query[0, :, x - s : y - s], keys[:, k0:y], values[:, k0:y], x - k0, scaling,
                                 softcap, window)
            out[0, x - s : y - s] = o.transpose(0, 1)
    return out


def _flex_attention(module, query, key, value, cache: RowCache | None, scaling, softcap, window, max_scores):
    """FlexAttention over the whole row, or over the token window of ``cache`` against the row's keys up to its end;
    None where ``auto`` chose flex and its first call in this process failed (a compile error: logged, and auto
    stops choosing flex)."""
    if cache is not None and query.shape[2] != cache.end - cache.start:
        raise RuntimeError(f"d2l_varlen window {cache.start}..{cache.end} got {query.shape[2]} queries")
    try:
        if cache is None:
            out = _flex.packed_flex_attention(query, key, value, _masks(), scaling=scaling, softcap=softcap,
                                              window=window, max_scores=max_scores)
        else:
            keys, values = cache.update(module, key[0], value[0])
            out = _flex.packed_flex_attention(query, keys[None], values[None], _masks(), scaling=scaling,
                                              softcap=softcap, window=window, max_scores=max_scores,
                                              q_start=cache.start)
    except Exception as e:  # noqa: BLE001 - auto only, before flex ever worked here: compile failures
        if getattr(_state, "backend", "auto") != "auto" or _flex_ok or isinstance(e, ValueError):
            raise
        _flex_broken.append(f"{type(e).__name__}: {e}")
        logger.warning("flex attention failed (%s); the encoder uses the blocked path from now on",
                       _flex_broken[0][:300])
        return None
    if not _flex_ok:
        _flex_ok.append(True)
    return out


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     softcap=None, **kwargs):
    """HF attention-interface function: query [1, H, T, d], key/value [1, KVH, T, d] → ([1, T, H, d], None)."""
    bounds, cu, max_len = _bounds()
    max_scores = getattr(_state, "max_scores", None)
    if query.shape[0] != 1:
        raise RuntimeError(f"d2l_varlen expects one packed row, got batch {query.shape[0]}")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    cache = getattr(_state, "window", None)
    backend = _pick_backend(query, softcap)
    if backend == "flex":
        out = _flex_attention(module, query, key, value, cache, scaling, softcap, sliding_window, max_scores)
        if out is not None:
            return out, None
        backend = "blocked"  # auto, and flex failed to compile here
    if cache is not None:
        return _window_attention(module, query, key, value, bounds, cache, scaling, softcap, sliding_window,
                                 max_scores), None
    if backend == "flash":
        out = _flash_varlen()(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu, cu,
                              max_len, max_len, softmax_scale=scaling, causal=True, softcap=softcap or 0.0,
                              window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1))
        return out.unsqueeze(0), None
    out = torch.empty_like(query.transpose(1, 2))  # [1, T, H, d]
    for a, b in bounds:
        o = _segment_attention(query[0, :, a:b], key[0, :, a:b], value[0, :, a:b], scaling, softcap, sliding_window,
                               max_scores)
        out[0, a:b] = o.transpose(0, 1)
    return out, None


def _no_mask(*args, **kwargs):
    return None


def register() -> bool:
    """Register the attention (and a mask function that builds no mask) with transformers; False if unsupported."""
    if _registered:
        return _registered[0]
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        AttentionInterface.register(NAME, varlen_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _no_mask)
        _registered.append(True)
    except Exception:  # noqa: BLE001 - older transformers: fall back to padded micro-batches
        _registered.append(False)
    return _registered[0]


def _configs(model):
    seen = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and all(cfg is not c for c in seen):
            seen.append(cfg)
    return seen


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Within the block, every config of ``model`` (an HF model) names ``name`` as its attention implementation;
    the old names are restored on exit."""
    cfgs = _configs(model)
    old = [c._attn_implementation for c in cfgs]
    try:
        for c in cfgs:
            c._attn_implementation = name
        yield
    finally:
        for c, o in zip(cfgs, old):
            c._attn_implementation = o


@contextlib.contextmanager
def packed_attention(model, lengths: list[int], device, max_scores: int | None = None, window: RowCache | None = None,
                     backend: str = "auto"):
    """Within the block, ``model`` attends within each of the consecutive chunks of ``lengths`` only.

    ``max_scores``: attention scores held at once per chunk (query-blocked above it; None: no bound).
    ``window``: the pass runs the tokens ``window.start .. window.end-1`` of the row only (the keys of earlier
    windows are in ``window``; windows always run the blocked path). ``backend``: one of :data:`BACKENDS`.
    """
    if window is not None and not isinstance(window, RowCache):
        raise TypeError(f"window must be a RowCache or None, got {type(window).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths!r}")
    bounds, s = [], 0
    for n in lengths:
        bounds.append((s, s + n))
        s += n
    cu = torch.tensor([0] + [b for _, b in bounds], dtype=torch.int32, device=device)
    _state.bounds = (bounds, cu, max(lengths))
    _state.max_scores = max_scores
    _state.window = window
    _state.backend, _state.masks = backend, None
    try:
        with attention_implementation(model, NAME):
            yield
    finally:
        _state.bounds = None
        _state.max_scores = None
        _state.window = None
        _state.backend, _state.masks = "auto", None
