"""FlexAttention backend of the packed varlen encoder pass (:mod:`d2l_fast.varlen`, ``attention="flex"``).

One packed row holds consecutive chunks (documents); every query attends causally to the keys of its own chunk
(and, on a sliding-window layer, to the last ``sliding_window`` of them). Here that is ONE
``torch.nn.attention.flex_attention`` call per layer for the whole row:

* a block mask built once per pass and per window size from the row's document ids: ``doc[q] == doc[kv]``,
  ``q >= kv`` and, with a window, ``q - kv < window`` (blocks of other documents are skipped, not masked);
* Gemma-2's attention logit soft-capping as the ``score_mod`` ``cap · tanh(score / cap)`` (the score already
  carries ``scaling``), applied before the mask, as in the model's eager attention;
* GQA without repeating keys/values (``enable_gqa``); bf16/fp16 in, the same dtype out: the kernel keeps its
  softmax statistics in fp32 in registers, nothing is cast or copied in our code.

On CUDA the call goes through ``torch.compile`` (FlexAttention is only fused when compiled; shapes change from
pass to pass, so the compiled function is shape-generic after its first recompile). Elsewhere it runs eagerly
(torch's unfused reference: it materialises the row's [H, T, T] scores in fp32), which is exact but slow; it is
what the CPU tests use. ``D2L_FLEX_COMPILE=1`` compiles on CPU as well (inductor's C++ template), ``0`` never.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch

#: rows and columns of one block of the block mask (FlexAttention's default sparse block)
BLOCK = 128
#: entries of the document-id buffer the mask reads (rows up to this less two blocks share one size; a compiled
#: kernel is specialised on the size of a tensor its mask captures, so a size per row length would recompile)
DOC_SLOTS = 1 << 16
#: compiled variants of the flex call allowed before dynamo would fall back to eager (see ``_flex_fn``)
RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=1)
def _api():
    try:
        from torch.nn.attention import flex_attention as fa
    except Exception:  # noqa: BLE001 - torch without FlexAttention
        return None
    needed = ("flex_attention", "create_block_mask")
    return fa if all(hasattr(fa, n) for n in needed) else None


def available() -> bool:
    """True when this torch has ``torch.nn.attention.flex_attention`` (torch >= 2.5)."""
    return _api() is not None


def compiles(device: torch.device | str) -> bool:
    """Whether the FlexAttention call for tensors on ``device`` is compiled (``D2L_FLEX_COMPILE``: ``1`` always,
    ``0`` never, unset/``auto``: on CUDA only)."""
    mode = os.environ.get("D2L_FLEX_COMPILE", "auto").strip().lower()
    if mode not in ("", "auto", "0", "1"):
        raise ValueError(f"D2L_FLEX_COMPILE must be 0, 1 or auto, got {mode!r}")
    if mode in ("0", "1"):
        return mode == "1"
    return torch.device(device).type == "cuda"


@functools.lru_cache(maxsize=None)
def _flex_fn(compiled: bool):
    api = _api()
    if api is None:
        raise RuntimeError("FlexAttention needs torch >= 2.5 (torch.nn.attention.flex_attention); this torch is "
                           f"{torch.__version__}")
    if compiled:
        fn = torch.compile(api.flex_attention)
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"

        def run(*args, **kwargs):
            # past dynamo's recompile limit (8) a compiled function silently runs eagerly (unfused); the variants
            # here (row/window layouts, one-block rows, static then shape-generic) stay well inside this bound
            with cfg.patch(**{name: max(getattr(cfg, name), RECOMPILE_LIMIT)}):
                return fn(*args, **kwargs)

        return run

    def eager(*args, **kwargs):
        with warnings.catch_warnings():  # torch warns that the eager path is unfused: that is the point here
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return api.flex_attention(*args, **kwargs)

    return eager


@functools.lru_cache(maxsize=None)
def softcap_score_mod(softcap: float):
    """The ``score_mod`` of logit soft-capping: ``softcap · tanh(score / softcap)`` (one function per value, so a
    compiled kernel is reused across layers and passes)."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) \
            or softcap <= 0:
        raise ValueError(f"softcap must be a positive finite number, got {softcap!r}")
    cap = float(softcap)

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return score_mod


#: the window of a layer without one (farther than any row reaches)
_NO_WINDOW = 1 << 30


def _document_mask_mod(doc: torch.Tensor, window: torch.Tensor, q_start: torch.Tensor):
    # one function for every layer and token window (the window and the first query are 0-d tensors): a compiled
    # kernel is specialised on the mask's code and the values of what it captures; query i is token q_start + i
    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx + q_start
        return (doc[q] == doc[kv_idx]) & (q >= kv_idx) & (q - kv_idx < window)

    return mask_mod


class PackedMasks:
    """The block masks of one packed row of consecutive chunks of ``lengths`` tokens on ``device``, built at
    first use and kept for the pass: one per sliding-window size (None: whole chunks) and token window of queries
    (the whole row, or the tokens ``q_start .. q_end-1`` against the keys ``0 .. q_end-1``, as
    :class:`d2l_fast.varlen.RowCache` passes run)."""

    def __init__(self, lengths: list[int], device):
        if not isinstance(lengths, (list, tuple)) or not lengths or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
            raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths!r}")
        self.lengths = list(lengths)
        self.n_tokens = sum(self.lengths)
        self.device = torch.device(device)
        # compiled kernels may read the ids of a last block's padding, also a window's (shifted by q_start)
        slots = DOC_SLOTS
        while slots < self.n_tokens + 2 * BLOCK:
            slots *= 2
        doc = torch.full((slots,), -1, dtype=torch.int32)
        doc[: self.n_tokens] = torch.repeat_interleave(torch.arange(len(self.lengths), dtype=torch.int32),
                                                       torch.tensor(self.lengths))
        self.doc = doc.to(self.device)
        self._masks: dict = {}

    def block_mask(self, window: int | None, q_start: int = 0, q_end: int | None = None):
        """The BlockMask for a layer with ``window`` (None, or a positive int: keys ``q - window < kv <= q``), for
        the queries ``q_start .. q_end-1`` (default: the whole row) against the keys ``0 .. q_end-1``."""
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        q_end = self.n_tokens if q_end is None else q_end
        if not (isinstance(q_start, int) and isinstance(q_end, int) and 0 <= q_start < q_end <= self.n_tokens):
            raise ValueError(f"queries {q_start!r}..{q_end!r} are not a token window of the row's {self.n_tokens}")
        if window is not None and window >= max(self.lengths):
            window = None  # no chunk is longer than the window: the same mask, one fewer to build
        key = (window, q_start, q_end)
        bm = self._masks.get(key)
        if bm is None:
            start, win = (torch.tensor(v, dtype=torch.int32, device=self.device)
                          for v in (q_start, _NO_WINDOW if window is None else window))
            bm = _api().create_block_mask(_document_mask_mod(self.doc, win, start), None, None, q_end - q_start,
                                          q_end, device=self.device, BLOCK_SIZE=BLOCK)
            self._masks[key] = bm
        return bm


def packed_flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, masks: PackedMasks, *,
                          scaling: float, softcap: float | None = None, window: int | None = None,
                          max_scores: int | None = None, q_start: int = 0) -> torch.Tensor:
    """query [1, H, Tq, d], key/value [1, KVH, Tk, d] of one packed row → [1, Tq, H, d], each chunk of ``masks``
    attending causally to itself (within ``window``), scores soft-capped at ``softcap``; output in query's dtype.

    The queries are the row's tokens ``q_start .. q_start+Tq-1`` and the keys its tokens ``0 .. Tk-1`` with
    ``Tk = q_start + Tq`` (the whole row: ``q_start=0``, ``Tq = Tk`` = the row's tokens).
    ``max_scores``: off the compiled path the call holds H·Tq·Tk fp32 scores; above this bound it refuses.
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"expected query [1, H, Tq, d] and key/value [1, KVH, Tk, d], got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    H, T, KVH, Tk = query.shape[1], query.shape[2], key.shape[1], key.shape[2]
    if value.shape[2] != Tk or Tk != q_start + T or value.shape[1] != KVH or KVH < 1 or H % KVH:
        raise ValueError(f"key/value must have the {q_start + T} tokens up to the last query and a number of heads "
                         f"dividing {H}, got key {tuple(key.shape)}, value {tuple(value.shape)}")
    if Tk > masks.n_tokens:
        raise ValueError(f"the keys reach token {Tk} but the row's chunks add up to {masks.n_tokens} tokens")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query/key/value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    compiled = compiles(query.device)
    if not compiled and max_scores is not None and H * T * Tk > max_scores:
        raise ValueError(f"flex attention off the compiled path materialises {H}·{T}·{Tk} = {H * T * Tk} scores, above "
                         f"this pass's bound of {max_scores}: use attention='blocked', a smaller token_budget, or "
                         "D2L_FLEX_COMPILE=1")
    score_mod = None if not softcap else softcap_score_mod(softcap)
    bm = masks.block_mask(window, q_start, Tk)
    out = _flex_fn(compiled)(query, key, value, score_mod=score_mod, block_mask=bm, scale=scaling, enable_gqa=H != KVH)
    return out.transpose(1, 2)


__all__ = ["BLOCK", "PackedMasks", "available", "compiles", "packed_flex_attention", "softcap_score_mod"]
