"""Torch implementation of the readout (any device): the CPU fast path, and the recompute used by the backward.

No Python loop over tokens or segments: every segment is cut into key chunks of `chunk` tokens
(`configs.pick_cpu_chunk`), all chunks are attended with one batched matmul, and the chunk partials
are merged per segment with a log-sum-exp weighting (flash-decoding, on the CPU). Segments are only
grouped (a short Python loop) to bound the size of the gathered context.

All ops are differentiable; segment reductions go through `_SegmentSum` / `_ExpandSegments`, whose
forward and backward are deterministic on CPU and CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .configs import pick_cpu_chunk

__all__ = [
    "ChunkPlan",
    "make_chunk_plan",
    "attend_chunks",
    "compute_rstd",
    "readout_absorbed_torch",
    "readout_plain_torch",
    "readout_torch",
    "segment_groups",
]

# gathered context elements (tokens * width) per segment group
_GROUP_ELEMS = 1 << 25


def compute_rstd(ctx: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 [T] reciprocal RMS of every context row: 1 / sqrt(mean(x^2) + eps)."""
    x = ctx.float()
    return torch.rsqrt(x.pow(2).mean(-1) + eps)


@dataclass(frozen=True)
class ChunkPlan:
    """Key chunks of a packed batch.

    lengths [3, 0, 5] with chunk=4 -> cu_seqlens [0, 3, 3, 8], chunks (seg 0: 0..3), (seg 2: 3..7),
    (seg 2: 7..8): sid = [0, 2, 2], tok = [[0,1,2,x], [3,4,5,6], [7,x,x,x]] (x = padding, masked).
    """

    chunk: int
    n_seg: int
    n_chunks: int
    sid: torch.Tensor  # [n_chunks] int64, segment of each chunk (non-decreasing)
    tok: torch.Tensor | None  # [n_chunks, chunk] int64 token ids (None: chunks tile [0, T) exactly)
    valid: torch.Tensor | None  # [n_chunks, chunk] bool (None: all valid)
    single: bool  # every segment has at most one chunk
    identity: bool  # chunk c is segment c (single and no empty segment)
    slot_sel: tuple  # per in-segment chunk index k: chunk ids with that index (deterministic CUDA sums)


def make_chunk_plan(cu: torch.Tensor, chunk: int, device: torch.device) -> ChunkPlan:
    """Build the chunk plan from CPU int64 `cu` [n_seg + 1] (starting anywhere; offsets are kept)."""
    cu = cu.to(torch.int64)
    n_seg = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    per_seg = (lens + chunk - 1) // chunk
    n_chunks = int(per_seg.sum())
    sid = torch.repeat_interleave(torch.arange(n_seg), per_seg)
    first = torch.cumsum(per_seg, 0) - per_seg
    kidx = torch.arange(n_chunks) - first[sid]
    start = cu[:-1][sid] + kidx * chunk
    tok = start[:, None] + torch.arange(chunk)[None, :]
    valid = tok < cu[1:][sid][:, None]
    single = bool((per_seg <= 1).all())
    identity = single and n_chunks == n_seg
    all_valid = bool(valid.all())
    contiguous = all_valid and n_chunks > 0 and int(cu[0]) == 0 and int(cu[-1]) == n_chunks * chunk
    max_per_seg = int(per_seg.max()) if n_seg else 0
    slot_sel = ()
    if device.type != "cpu" and not single:
        slot_sel = tuple(torch.nonzero(kidx == k).flatten().to(device) for k in range(max_per_seg))
    return ChunkPlan(
        chunk=chunk,
        n_seg=n_seg,
        n_chunks=n_chunks,
        sid=sid.to(device),
        tok=None if contiguous else torch.where(valid, tok, 0).to(device),
        valid=None if all_valid else valid.to(device),
        single=single,
        identity=identity,
        slot_sel=slot_sel,
    )


def _segment_sum(x: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    """[G, n_chunks, ...] -> [G, n_seg, ...]: sum of the chunks of every segment."""
    out = x.new_zeros((x.shape[0], plan.n_seg) + tuple(x.shape[2:]))
    if x.device.type == "cpu":
        # CPU index_add_ is a sequential loop: deterministic
        return out.index_add_(1, plan.sid, x)
    # one contribution per segment per step: atomics add onto zero exactly once
    for sel in plan.slot_sel:
        out.index_add_(1, plan.sid[sel], x[:, sel])
    return out


class _SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan):
        ctx.plan = plan
        return _segment_sum(x, plan)

    @staticmethod
    def backward(ctx, g):
        return g.index_select(1, ctx.plan.sid), None


class _ExpandSegments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan):
        ctx.plan = plan
        return x.index_select(1, plan.sid)

    @staticmethod
    def backward(ctx, g):
        return _segment_sum(g, ctx.plan), None


def _gather(src: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    """[G, T, ...] -> [G, n_chunks, chunk, ...] (a view when the chunks tile the tokens exactly)."""
    if plan.tok is None:
        return src.reshape((src.shape[0], plan.n_chunks, plan.chunk) + tuple(src.shape[2:]))
    return src[:, plan.tok]


def attend_chunks(
    q: torch.Tensor,
    k_src: torch.Tensor,
    v_src: torch.Tensor | None,
    tok_scale: torch.Tensor | None,
    plan: ChunkPlan,
) -> torch.Tensor:
    """Varlen softmax attention of per-segment query rows over chunked keys, fp32, group-major.

    Args:
        q: [G, n_seg, R, dk] fp32 query rows, softmax scale already folded in.
        k_src: [G, T, dk] keys (any float dtype; upcast to fp32 per chunk).
        v_src: [G, T, dv] values, or None to reuse the keys as values (absorbed form).
        tok_scale: optional fp32 [T] per-token factor applied to keys and values (the rstd); it is
            applied to the scores and probabilities, so the context is never rescaled or copied.
    Returns:
        [G, n_seg, R, dv] fp32; segments without tokens give zeros.
    """
    G, n_seg, R, _ = q.shape
    dv = k_src.shape[-1] if v_src is None else v_src.shape[-1]
    if plan.n_chunks == 0:
        return q.new_zeros(G, n_seg, R, dv)
    ts = None if tok_scale is None else _gather(tok_scale[None], plan)[:, :, None, :]  # [1, nc, 1, Lc]
    kc = _gather(k_src, plan).float()  # [G, nc, Lc, dk]
    vc = kc if v_src is None else _gather(v_src, plan).float()  # [G, nc, Lc, dv]
    qc = q if plan.identity else _ExpandSegments.apply(q, plan)  # [G, nc, R, dk]
    s = torch.matmul(qc, kc.transpose(-1, -2))  # [G, nc, R, Lc]
    if ts is not None:
        s = s * ts
    if plan.valid is not None:
        s = s.masked_fill(~plan.valid[None, :, None, :], float("-inf"))
    if plan.single:
        p = torch.softmax(s, dim=-1)
        uc = torch.matmul(p if ts is None else p * ts, vc)  # [G, nc, R, dv]
        return uc if plan.identity else _SegmentSum.apply(uc, plan)
    m = s.detach().amax(-1, keepdim=True)  # [G, nc, R, 1]
    p = torch.exp(s - m)
    l_c = p.sum(-1, keepdim=True)
    acc = torch.matmul(p if ts is None else p * ts, vc)  # [G, nc, R, dv]
    idx = plan.sid[None, :, None, None].expand_as(m)
    m_seg = m.new_full((G, n_seg, R, 1), float("-inf")).scatter_reduce_(1, idx, m, "amax")
    beta = torch.exp(m - m_seg.index_select(1, plan.sid))
    num = _SegmentSum.apply(acc * beta, plan)
    den = _SegmentSum.apply(l_c * beta, plan)
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)


def segment_groups(cu: list[int], cap_tokens: int) -> list[tuple[int, int]]:
    """Consecutive segment ranges [s0, s1) whose tokens total at most cap_tokens (or one segment)."""
    groups, s0, acc = [], 0, 0
    n = len(cu) - 1
    for s in range(n):
        length = cu[s + 1] - cu[s]
        if acc > 0 and acc + length > cap_tokens:
            groups.append((s0, s))
            s0, acc = s, 0
        acc += length
    groups.append((s0, n))
    return groups


def _absorb_queries(q, k_weight, w, n_kv, scale):
    n_seg, n_q, H, hd = q.shape
    D = k_weight.shape[1]
    wk = k_weight.float().view(n_kv, hd, D) * w.float()  # diag(w) folded into W_k
    qg = q.float().reshape(n_seg, n_q, n_kv, H // n_kv, hd)
    qt = torch.einsum("sikgd,kdD->sikgD", qg, wk) * scale
    return qt.reshape(1, n_seg, n_q * H, D)


def _absorb_output(u, v_weight, w, n_kv, q_shape):
    n_seg, n_q, H, hd = q_shape
    D = v_weight.shape[1]
    wv = v_weight.float().view(n_kv, hd, D) * w.float()
    out = torch.einsum("sikgD,kdD->sikgd", u.reshape(n_seg, n_q, n_kv, H // n_kv, D), wv)
    return out.reshape(n_seg, n_q, H, hd)


def readout_absorbed_torch(q, ctx, plan, k_weight, v_weight, w, rstd, *, n_kv_heads, scale):
    """Absorbed form, fp32 result: K and V are never materialized (see README.md)."""
    qt = _absorb_queries(q, k_weight, w, n_kv_heads, scale)
    u = attend_chunks(qt, ctx.unsqueeze(0), None, rstd, plan)  # [1, n_seg, R, D]
    return _absorb_output(u, v_weight, w, n_kv_heads, q.shape)


def readout_plain_torch(q, ctx, plan, k_weight, v_weight, w, rstd, *, n_kv_heads, scale):
    """Plain form, fp32 result: project K/V once for all tokens, then GQA attention without repeat_kv."""
    n_seg, n_q, H, hd = q.shape
    T = ctx.shape[0]
    c = ctx.float() * rstd[:, None]
    if ctx.dtype != torch.float32:
        # mirror the reference RMSNorm: normalized rows are cast back to the input dtype
        c = c.to(ctx.dtype).float()
    c = c * w.float()
    w_kv = torch.cat([k_weight, v_weight], 0).float().view(2 * n_kv_heads, hd, -1)
    # group-major K/V [2 * n_kv, T, hd], so every chunk of a group is a contiguous matrix
    kv = torch.bmm(c.expand(2 * n_kv_heads, T, c.shape[1]), w_kv.transpose(1, 2))
    grp = H // n_kv_heads
    qg = q.float().reshape(n_seg, n_q, n_kv_heads, grp, hd).permute(2, 0, 1, 3, 4)
    qg = qg.reshape(n_kv_heads, n_seg, n_q * grp, hd) * scale
    u = attend_chunks(qg, kv[:n_kv_heads], kv[n_kv_heads:], None, plan)  # [n_kv, n_seg, n_q * grp, hd]
    return u.view(n_kv_heads, n_seg, n_q, grp, hd).permute(1, 2, 0, 3, 4).reshape(n_seg, n_q, H, hd)


def readout_torch(
    q, ctx, cu_cpu, k_weight, v_weight, w, rstd, *, n_kv_heads, scale, mode, group_elems=_GROUP_ELEMS
):
    """Grouped forward in fp32 (no autograd bookkeeping needed by callers). Returns fp32 [n_seg, n_q, H, hd].

    `cu_cpu` is a CPU int64 tensor; `rstd` is fp32 [T].
    """
    n_seg, n_q, H, hd = q.shape
    D = ctx.shape[1]
    fn = readout_absorbed_torch if mode == "absorbed" else readout_plain_torch
    rows = n_q * H if mode == "absorbed" else n_q * (H // n_kv_heads)
    width = D if mode == "absorbed" else 2 * n_kv_heads * hd
    chunk = pick_cpu_chunk(cu_cpu[1:] - cu_cpu[:-1], rows)
    cu = cu_cpu.tolist()
    outs = []
    for s0, s1 in segment_groups(cu, max(1, group_elems // max(width, 1))):
        t0, t1 = cu[s0], cu[s1]
        plan = make_chunk_plan(cu_cpu[s0 : s1 + 1] - t0, chunk, ctx.device)
        outs.append(
            fn(q[s0:s1], ctx[t0:t1], plan, k_weight, v_weight, w, rstd[t0:t1], n_kv_heads=n_kv_heads, scale=scale)
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)
