"""Fast torch path for the segmented multi-LoRA op: runs on any device; what runs on CPU.

Four strategies, all built from BLAS calls on views or on gathered *token* rows (never per-token
weight copies; extra memory is O(tokens x rank) plus O(tokens x d) for gathers):

* ``runs``:    one ``mm`` + ``addmm_`` per maximal contiguous token run of one adapter; zero copies.
               Best for prefill (long segments).
* ``grouped``: one ``index_select`` + ``mm`` + ``mm`` + ``index_add_`` per distinct adapter. Best when
               many short, interleaved segments share few adapters.
* ``bmm``:     all adapters in use have one rank ``r`` and sit on a regular grid of the rank axis, so
               ``A``/``B`` are viewed (``as_strided``, no copy) as ``[n_slots, r, d]``; tokens are
               gathered into ``[n_slots, c, d_in]`` and two ``bmm`` calls do everything. Best for
               decode with many distinct adapters.
* ``dense``:   one shrink GEMM against the whole used rank span, a mask that zeroes rank columns a
               token does not own, one expand GEMM. Best when the used rank span is small. The span
               GEMMs would spread a NaN/inf of one adapter to every token (0 · NaN = NaN), so when the
               span is not finite (one sum over it) ``dense`` runs as ``grouped`` instead.

Every strategy is row-isolated: a token's result depends only on its own activations and its own
adapter's rank rows, whatever values other adapters (or other tokens) hold.

:func:`choose_strategy` picks one with an explicit cost model (see README.md).
Low-precision inputs are upcast to fp32 for the math (CPU bf16/fp16 GEMMs are 6-500x slower).
"""

from __future__ import annotations

import torch

from .meta import SegmentMeta

__all__ = [
    "segmented_lora_cpu_",
    "segmented_lora_cpu_bwd",
    "choose_strategy",
    "estimate_costs",
    "STRATEGIES",
]

STRATEGIES = ("runs", "grouped", "bmm", "dense")

# cost model constants, measured on the 2-core AVX2 dev box (cpu-baseline.md and README.md)
_OP_SECONDS = 6e-6  # dispatch + BLAS setup per small torch op
_FLOPS = 100e9  # skinny fp32 GEMM rate
_BYTES_PER_S = 15e9  # DRAM streaming rate
_MAX_BMM_PADDING = 2.0  # bmm allowed when padded rows <= 2x real rows
_MAX_DENSE_WASTE = 8.0  # dense allowed when its FLOPs <= 8x the useful FLOPs


def _bmm_layout(meta: SegmentMeta):
    """(lo, r, n_slots, c) when every used adapter has rank r and sits at lo + k*r, else None."""
    groups = [g for g in meta.groups if g.n_tokens > 0]
    if not groups:
        return None
    r = groups[0].rank_len
    if any(g.rank_len != r for g in groups):
        return None
    lo = min(g.rank_start for g in groups)
    if any((g.rank_start - lo) % r for g in groups):
        return None
    n_slots = (max(g.rank_start for g in groups) - lo) // r + 1
    c = max(g.n_tokens for g in groups)
    return lo, r, n_slots, c


def _dense_span(meta: SegmentMeta):
    groups = [g for g in meta.groups if g.n_tokens > 0]
    if not groups:
        return None
    lo = min(g.rank_start for g in groups)
    hi = max(g.rank_start + g.rank_len for g in groups)
    return lo, hi


def estimate_costs(meta: SegmentMeta, d_in: int, d_out: int) -> dict[str, float]:
    """Estimated seconds per strategy (``inf`` where a strategy does not apply)."""
    fb = 4  # the math runs in fp32
    dsum = d_in + d_out
    useful_flops = 2.0 * sum(g.n_tokens * g.rank_len for g in meta.groups) * dsum
    n_tok = sum(g.n_tokens for g in meta.groups)
    act_bytes = n_tok * (d_in + 2 * d_out) * fb
    costs = {s: float("inf") for s in STRATEGIES}
    if n_tok == 0:
        return {s: 0.0 for s in STRATEGIES}

    run_adapter_bytes = sum(rl * dsum * fb for _, _, _, rl in meta.runs)
    costs["runs"] = (
        2 * len(meta.runs) * _OP_SECONDS + useful_flops / _FLOPS + (run_adapter_bytes + act_bytes) / _BYTES_PER_S
    )

    groups = [g for g in meta.groups if g.n_tokens > 0]
    n_ops = sum(2 if len(g.runs) == 1 else 4 for g in groups)
    grp_adapter_bytes = sum(g.rank_len * dsum * fb for g in groups)
    costs["grouped"] = n_ops * _OP_SECONDS + useful_flops / _FLOPS + (grp_adapter_bytes + 2 * act_bytes) / _BYTES_PER_S

    lay = _bmm_layout(meta)
    if lay is not None:
        lo, r, n_slots, c = lay
        padded = n_slots * c
        if padded <= _MAX_BMM_PADDING * n_tok:
            flops = 2.0 * padded * r * dsum
            costs["bmm"] = 5 * _OP_SECONDS + flops / _FLOPS + (n_slots * r * dsum * fb + 3 * act_bytes) / _BYTES_PER_S

    span = _dense_span(meta)
    if span is not None:
        lo, hi = span
        flops = 2.0 * meta.n_tokens * (hi - lo) * dsum
        if flops <= _MAX_DENSE_WASTE * useful_flops:
            costs["dense"] = (
                3 * _OP_SECONDS
                + flops / _FLOPS
                + ((hi - lo) * dsum * fb + meta.n_tokens * (d_in + 2 * d_out + 2 * (hi - lo)) * fb) / _BYTES_PER_S
            )
    return costs


def choose_strategy(meta: SegmentMeta, d_in: int, d_out: int) -> str:
    """The cheapest strategy under :func:`estimate_costs` (ties go to the simpler, earlier one)."""
    costs = estimate_costs(meta, d_in, d_out)
    return min(STRATEGIES, key=lambda s: (costs[s], STRATEGIES.index(s)))


# ---------------------------------------------------------------------------------------------- helpers
def _group_index(meta: SegmentMeta, device: torch.device):
    """Per group: a token slice (single run) or an int64 index tensor on ``device``."""

    def build():
        out = []
        for g in meta.groups:
            if g.n_tokens == 0:
                out.append(None)
            elif len(g.runs) == 1:
                out.append(slice(*g.runs[0]))
            else:
                idx = torch.cat([torch.arange(t0, t1, dtype=torch.int64) for t0, t1 in g.runs])
                out.append(idx.to(device))
        return out

    return meta.cached(("group_index", str(device)), build)


def _bmm_plan(meta: SegmentMeta, device: torch.device):
    def build():
        lo, r, n_slots, c = _bmm_layout(meta)
        tok, pos = [], []
        for g in meta.groups:
            if g.n_tokens == 0:
                continue
            slot = (g.rank_start - lo) // r
            j = 0
            for t0, t1 in g.runs:
                for t in range(t0, t1):
                    tok.append(t)
                    pos.append(slot * c + j)
                    j += 1
        identity = n_slots * c == meta.n_tokens and tok == pos and pos == list(range(meta.n_tokens))
        full = n_slots * c == len(tok) and sorted(pos) == pos
        return dict(
            lo=lo,
            r=r,
            n_slots=n_slots,
            c=c,
            identity=identity,
            full=full,
            tok=torch.tensor(tok, dtype=torch.int64).to(device),
            pos=torch.tensor(pos, dtype=torch.int64).to(device),
        )

    return meta.cached(("bmm_plan", str(device)), build)


def _dense_mask(meta: SegmentMeta, device: torch.device):
    """(lo, hi, not_owned): bool [n_tokens, hi - lo], True where a token does NOT own the rank column."""

    def build():
        lo, hi = _dense_span(meta)
        not_owned = torch.ones(meta.n_tokens, hi - lo, dtype=torch.bool)
        for t0, t1, rs, rl in meta.runs:
            not_owned[t0:t1, rs - lo : rs - lo + rl] = False
        return lo, hi, not_owned.to(device)

    return meta.cached(("dense_not_owned", str(device)), build)


def _finite(*ts: torch.Tensor) -> bool:
    """True when every entry is finite: one sum per tensor (a finite sum that overflows only costs the fast path)."""
    return all(bool(torch.isfinite(t.sum())) for t in ts if t.numel())


def _rank_view(W: torch.Tensor, lo: int, r: int, n_slots: int) -> torch.Tensor:
    """``W[lo : lo + n_slots * r]`` viewed as ``[n_slots, r, d]`` without a copy."""
    s0, s1 = W.stride()
    return W.as_strided((n_slots, r, W.shape[1]), (r * s0, s0, s1), W.storage_offset() + lo * s0)


# ---------------------------------------------------------------------------------------------- forward
def _fwd_fp32_(out, x, A, B, meta: SegmentMeta, scale: float, strategy: str):
    if strategy == "runs":
        for t0, t1, rs, rl in meta.runs:
            h = torch.mm(x[t0:t1], A[rs : rs + rl].t())
            out[t0:t1].addmm_(h, B[rs : rs + rl], alpha=scale)
    elif strategy == "grouped":
        for g, idx in zip(meta.groups, _group_index(meta, x.device)):
            if idx is None:
                continue
            a, b = A[g.rank_start : g.rank_start + g.rank_len], B[g.rank_start : g.rank_start + g.rank_len]
            if isinstance(idx, slice):
                out[idx].addmm_(torch.mm(x[idx], a.t()), b, alpha=scale)
            else:
                y = torch.mm(torch.mm(x.index_select(0, idx), a.t()), b)
                out.index_add_(0, idx, y, alpha=scale)
    elif strategy == "bmm":
        p = _bmm_plan(meta, x.device)
        lo, r, n_slots, c = p["lo"], p["r"], p["n_slots"], p["c"]
        a3 = _rank_view(A, lo, r, n_slots)
        b3 = _rank_view(B, lo, r, n_slots)
        if p["identity"]:
            x3 = x.reshape(n_slots, c, x.shape[1])
            h = torch.bmm(x3, a3.transpose(1, 2))
            if out.is_contiguous():
                out.view(n_slots, c, out.shape[1]).baddbmm_(h, b3, alpha=scale)
            else:
                out.add_(torch.bmm(h, b3).view(-1, out.shape[1]), alpha=scale)
            return
        if p["full"]:
            x3 = x.index_select(0, p["tok"]).view(n_slots, c, x.shape[1])
        else:
            x3 = x.new_zeros(n_slots * c, x.shape[1])
            x3.index_copy_(0, p["pos"], x.index_select(0, p["tok"]))
            x3 = x3.view(n_slots, c, x.shape[1])
        y = torch.bmm(torch.bmm(x3, a3.transpose(1, 2)), b3).view(n_slots * c, out.shape[1])
        if not p["full"]:
            y = y.index_select(0, p["pos"])
        out.index_add_(0, p["tok"], y, alpha=scale)
    elif strategy == "dense":
        lo, hi, not_owned = _dense_mask(meta, x.device)
        a, b = A[lo:hi], B[lo:hi]
        if not _finite(a, b):  # a non-finite entry would reach every token through the span GEMMs
            _fwd_fp32_(out, x, A, B, meta, scale, "grouped")
            return
        h = torch.mm(x, a.t())
        h.masked_fill_(not_owned, 0.0)  # a fill, not a multiply: a token only ever sees its own rank columns
        out.addmm_(h, b, alpha=scale)
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def segmented_lora_cpu_(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    meta: SegmentMeta,
    scale: float = 1.0,
    strategy: str | None = None,
) -> torch.Tensor:
    """``out += segmented LoRA delta`` with torch ops. Inputs are assumed validated (see launch.py).

    ``x``: ``[T, d_in]`` (any strides), ``out``: ``[T, d_out]``. ``strategy=None`` picks by cost model.
    """
    if not meta.runs:
        return out
    if strategy is None:  # memoised per batch and layer shape: the cost model loops over every adapter group
        d_in, d_out = x.shape[1], out.shape[1]
        strategy = meta.cached(("strategy", d_in, d_out), lambda: choose_strategy(meta, d_in, d_out))
    if x.dtype == torch.float32 or x.dtype == torch.float64:
        _fwd_fp32_(out, x, A, B, meta, scale, strategy)
        return out
    # low precision: fp32 math on upcast copies of the activations and of the used rank span only
    lo = min(g.rank_start for g in meta.groups)
    hi = max(g.rank_start + g.rank_len for g in meta.groups)
    A32 = torch.zeros(hi, A.shape[1], dtype=torch.float32, device=A.device)
    B32 = torch.zeros(hi, B.shape[1], dtype=torch.float32, device=B.device)
    A32[lo:hi] = A[lo:hi]
    B32[lo:hi] = B[lo:hi]
    delta = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    _fwd_fp32_(delta, x.float(), A32, B32, meta, scale, strategy)
    out.add_(delta.to(out.dtype))
    return out


# ---------------------------------------------------------------------------------------------- backward
def segmented_lora_cpu_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    meta: SegmentMeta,
    scale: float = 1.0,
    needs: tuple[bool, bool, bool] = (True, True, True),
):
    """Gradients ``(dx, dA, dB)`` of ``delta = segmented_lora(x, A, B)`` given ``dy = d loss / d delta``.

    Per distinct adapter k with token set T_k (u = x A_k^T, g = dy B_k^T):
    ``dx[T_k] = scale * g A_k``, ``dA_k = scale * g^T x[T_k]``, ``dB_k = scale * u^T dy[T_k]``.
    Rank rows no segment uses get zero gradient. Math in fp32; results in the input dtype.
    """
    need_dx, need_dA, need_dB = needs
    f32 = torch.float32
    dx = torch.zeros(x.shape, dtype=f32, device=x.device) if need_dx else None
    dA = torch.zeros(A.shape, dtype=f32, device=A.device) if need_dA else None
    dB = torch.zeros(B.shape, dtype=f32, device=B.device) if need_dB else None
    for g, idx in zip(meta.groups, _group_index(meta, x.device)):
        if idx is None:
            continue
        rs, rl = g.rank_start, g.rank_len
        a, b = A[rs : rs + rl].to(f32), B[rs : rs + rl].to(f32)
        if isinstance(idx, slice):
            xs, dys = x[idx].to(f32), dy[idx].to(f32)
        else:
            xs, dys = x.index_select(0, idx).to(f32), dy.index_select(0, idx).to(f32)
        gh = torch.mm(dys, b.t())  # [n, r]
        if need_dx:
            if isinstance(idx, slice):
                dx[idx].addmm_(gh, a, alpha=scale)
            else:
                dx.index_add_(0, idx, torch.mm(gh, a), alpha=scale)
        if need_dA:
            torch.mm(gh.t(), xs, out=dA[rs : rs + rl]).mul_(scale)
        if need_dB:
            torch.mm(torch.mm(xs, a.t()).t(), dys, out=dB[rs : rs + rl]).mul_(scale)
    return (
        dx.to(x.dtype) if need_dx else None,
        dA.to(A.dtype) if need_dA else None,
        dB.to(B.dtype) if need_dB else None,
    )
