"""The readout's Triton forward as it was before the issue-18 rewrite (commit ff2c91b): the baseline the GPU suite
times the rewrite against ("old" in its readout rows). Benchmark-only, never imported by the package.

One program per (segment, group, 32/64-row tile, context split) keeps a [BLOCK_M, D] fp32 accumulator and re-reads
the context once per row tile; rstd is computed in torch (fp32 copies of the context) unless passed; partials
are fp32 and merged by a second kernel. See d2l_fast/kernels/latent_readout/README.md for the rewrite.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from d2l_fast.kernels._common import cdiv, input_precision, interpreting
from d2l_fast.kernels.latent_readout.torch_impl import _absorb_output, _absorb_queries, compute_rstd

__all__ = ["latent_readout_v1"]


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _pick_config_v1(n_seg, n_groups, n_rows, dim, max_seqlen, dtype, device):
    """pick_config of ff2c91b (GPU branch; the interpreter gets one small config)."""
    BLOCK_D = max(16, _next_pow2(dim))
    max_seqlen = max(1, int(max_seqlen))
    if interpreting() or device.type != "cuda":
        BLOCK_M = min(64, max(16, _next_pow2(n_rows)))
        BLOCK_N = min(128, max(16, _next_pow2(max_seqlen)))
        n_splits = min(4, cdiv(max_seqlen, BLOCK_N * 4)) if max_seqlen > 4 * BLOCK_N else 1
        split_len = cdiv(cdiv(max_seqlen, n_splits), BLOCK_N) * BLOCK_N
        return BLOCK_M, BLOCK_N, BLOCK_D, cdiv(max_seqlen, split_len), split_len, 4, 1
    BLOCK_M = 32 if BLOCK_D >= 512 else 64
    BLOCK_M = min(BLOCK_M, max(16, _next_pow2(n_rows)))
    elem = torch.finfo(dtype).bits // 8
    BLOCK_N = 32 if BLOCK_D * elem >= 1024 else 64
    num_warps = 8 if BLOCK_M * BLOCK_D >= 16384 else 4
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    base = n_seg * n_groups * cdiv(n_rows, BLOCK_M)
    n_splits = 1
    if base < 4 * n_sm:
        n_splits = max(1, min(cdiv(4 * n_sm, max(base, 1)), cdiv(max_seqlen, 4 * BLOCK_N)))
    split_len = cdiv(cdiv(max_seqlen, n_splits), BLOCK_N) * BLOCK_N
    return BLOCK_M, BLOCK_N, BLOCK_D, cdiv(max_seqlen, split_len), split_len, num_warps, 2


@triton.jit
def _readout_fwd_kernel_v1(
    # pointers
    q_ptr,
    k_ptr,
    v_ptr,
    tok_scale_ptr,
    o_ptr,
    lse_ptr,
    # segment metadata
    cu_seqlens_ptr,
    # sizes
    n_rows,
    dim,
    n_row_tiles,
    split_len,
    sm_scale_log2,
    # strides
    stride_q_grp,
    stride_q_seg,
    stride_q_row,
    stride_q_dim,
    stride_k_grp,
    stride_k_tok,
    stride_k_dim,
    stride_v_grp,
    stride_v_tok,
    stride_v_dim,
    stride_o_split,
    stride_o_grp,
    stride_o_seg,
    stride_o_row,
    stride_o_dim,
    stride_lse_split,
    stride_lse_grp,
    stride_lse_seg,
    stride_lse_row,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_TOK_SCALE: tl.constexpr,
    SHARED_KV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """grid = (n_seg, n_groups * n_row_tiles, n_splits).

    Program (s, g * n_row_tiles + i, j) attends query rows [i*BLOCK_M, (i+1)*BLOCK_M) of segment s,
    group g, to the tokens [start_s + j*split_len, min(end_s, start_s + (j+1)*split_len)) and writes
    the split-normalized output and its base-2 log-sum-exp (-inf for an empty split).
    """
    pid_seg = tl.program_id(0).to(tl.int64)
    pid_gm = tl.program_id(1)
    pid_split = tl.program_id(2).to(tl.int64)
    pid_grp = (pid_gm // n_row_tiles).to(tl.int64)
    pid_m = (pid_gm % n_row_tiles).to(tl.int64)

    seg_start = tl.load(cu_seqlens_ptr + pid_seg).to(tl.int64)
    seg_end = tl.load(cu_seqlens_ptr + pid_seg + 1).to(tl.int64)
    start = seg_start + pid_split * split_len
    end = tl.minimum(seg_end, start + split_len)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_rows
    mask_d = offs_d < dim

    q_ptrs = q_ptr + pid_grp * stride_q_grp + pid_seg * stride_q_seg
    q_ptrs += offs_m[:, None] * stride_q_row + offs_d[None, :] * stride_q_dim
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + pid_grp * stride_k_grp
    v_base = v_ptr + pid_grp * stride_v_grp
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < end
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            k_base + offs_n[:, None] * stride_k_tok + offs_d[None, :] * stride_k_dim, mask=mask_nd, other=0.0
        )  # [BLOCK_N, BLOCK_D]
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_TOK_SCALE:
            ts = tl.load(tok_scale_ptr + offs_n, mask=mask_n, other=0.0)  # [BLOCK_N]
            qk = qk * ts[None, :]
        qk = tl.where(mask_n[None, :], qk * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_TOK_SCALE:
            p = p * ts[None, :]
        if SHARED_KV:
            v = k
        else:
            v = tl.load(
                v_base + offs_n[:, None] * stride_v_tok + offs_d[None, :] * stride_v_dim, mask=mask_nd, other=0.0
            )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    has = l_i > 0.0
    acc = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))

    o_ptrs = o_ptr + pid_split * stride_o_split + pid_grp * stride_o_grp + pid_seg * stride_o_seg
    o_ptrs += offs_m[:, None] * stride_o_row + offs_d[None, :] * stride_o_dim
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    lse_ptrs = lse_ptr + pid_split * stride_lse_split + pid_grp * stride_lse_grp + pid_seg * stride_lse_seg
    tl.store(lse_ptrs + offs_m * stride_lse_row, lse, mask=mask_m)


@triton.jit
def _readout_combine_kernel_v1(
    # pointers
    o_part_ptr,
    lse_ptr,
    out_ptr,
    # sizes
    n_rows,
    dim,
    n_row_tiles,
    n_splits,
    # strides
    stride_o_split,
    stride_o_grp,
    stride_o_seg,
    stride_o_row,
    stride_o_dim,
    stride_lse_split,
    stride_lse_grp,
    stride_lse_seg,
    stride_lse_row,
    stride_out_grp,
    stride_out_seg,
    stride_out_row,
    stride_out_dim,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grid = (n_seg, n_groups * n_row_tiles): merge the n_splits partials with LSE weights."""
    pid_seg = tl.program_id(0).to(tl.int64)
    pid_gm = tl.program_id(1)
    pid_grp = (pid_gm // n_row_tiles).to(tl.int64)
    pid_m = (pid_gm % n_row_tiles).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_rows
    mask_md = mask_m[:, None] & (offs_d[None, :] < dim)

    lse_base = lse_ptr + pid_grp * stride_lse_grp + pid_seg * stride_lse_seg + offs_m * stride_lse_row
    o_base = o_part_ptr + pid_grp * stride_o_grp + pid_seg * stride_o_seg
    o_base += offs_m[:, None] * stride_o_row + offs_d[None, :] * stride_o_dim

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for j in range(0, n_splits):
        j64 = tl.cast(j, tl.int64)
        m = tl.maximum(m, tl.load(lse_base + j64 * stride_lse_split, mask=mask_m, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_splits):
        j64 = tl.cast(j, tl.int64)
        w = tl.exp2(tl.load(lse_base + j64 * stride_lse_split, mask=mask_m, other=float("-inf")) - m_safe)
        o = tl.load(o_base + j64 * stride_o_split, mask=mask_md, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_D]
        acc += w[:, None] * o
        den += w
    acc = acc / tl.where(den > 0.0, den, 1.0)[:, None]
    out_ptrs = out_ptr + pid_grp * stride_out_grp + pid_seg * stride_out_seg
    out_ptrs += offs_m[:, None] * stride_out_row + offs_d[None, :] * stride_out_dim
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_md)


_LOG2E = 1.4426950408889634


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _attend_v1(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    tok_scale: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    sm_scale: float,
) -> torch.Tensor:
    """Varlen attention of per-segment query rows over a shared key stream (Triton).

    Args:
        q: [G, n_seg, R, d] query rows (same dtype as k).
        k: [G, T, d] keys; v: [G, T, d] values or None to reuse k (absorbed form).
        tok_scale: optional fp32 [T] factor on each token's key and value (the context rstd).
        cu_seqlens: int32 [n_seg + 1] on the same device; max_seqlen: python int.
    Returns:
        fp32 [G, n_seg, R, d], zeros for empty segments.
    """
    G, n_seg, R, d = q.shape
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    v_arg = k if v is None else _last_dim_contiguous(v)
    ts_arg = tok_scale if tok_scale is not None else cu_seqlens  # never read when HAS_TOK_SCALE is False
    BM, BN, BD, n_splits, split_len, num_warps, num_stages = _pick_config_v1(n_seg, G, R, d, max_seqlen, q.dtype,
                                                                             q.device)
    n_row_tiles = -(-R // BM)
    out = torch.empty(G, n_seg, R, d, device=q.device, dtype=torch.float32)
    if n_seg == 0:
        return out
    split = n_splits > 1
    o_part = torch.empty(n_splits, G, n_seg, R, d, device=q.device, dtype=torch.float32) if split else out[None]
    lse = torch.empty(n_splits, G, n_seg, R, device=q.device, dtype=torch.float32)
    precision = input_precision(q.dtype)
    grid = (n_seg, G * n_row_tiles, n_splits)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _readout_fwd_kernel_v1[grid](
            q, k, v_arg, ts_arg, o_part, lse,
            cu_seqlens,
            R, d, n_row_tiles, split_len, sm_scale * _LOG2E,
            *q.stride(), *k.stride(), *v_arg.stride(), *o_part.stride(), *lse.stride(),
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
            HAS_TOK_SCALE=tok_scale is not None, SHARED_KV=v is None, INPUT_PRECISION=precision,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
        if split:
            _readout_combine_kernel_v1[(n_seg, G * n_row_tiles)](
                o_part, lse, out,
                R, d, n_row_tiles, n_splits,
                *o_part.stride(), *lse.stride(), *out.stride(),
                BLOCK_M=BM, BLOCK_D=BD,
                num_warps=num_warps,
            )  # fmt: skip
    return out


def _triton_fwd_v1(q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, w, rstd, *, n_kv_heads, scale, mode):
    """Forward of the readout on the Triton path; fp32 result [n_seg, n_q, H, hd].

    absorbed: the query fold (q~ = diag(w) W_k,h^T q) and the output fold (W_v,h diag(w) u) are torch
    batched matmuls; the kernel streams the raw context once with the rstd applied per token.
    plain: K/V projections are one torch GEMM (group-major layout); the kernel runs the GQA attention.
    """
    if not (q.is_cuda or interpreting()):
        raise RuntimeError("the Triton backend needs CUDA tensors or TRITON_INTERPRET=1")
    n_seg, n_q, H, hd = q.shape
    T, D = ctx.shape
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    if mode == "absorbed":
        qt = _absorb_queries(q, k_weight, w, n_kv_heads, 1.0).to(ctx.dtype)  # [1, n_seg, R, D]
        u = _attend_v1(qt, ctx.unsqueeze(0), None, rstd, cu, max_seqlen, scale)
        return _absorb_output(u, v_weight, w, n_kv_heads, q.shape)
    c = ctx.float() * rstd[:, None]
    c = c.to(ctx.dtype) * w.to(ctx.dtype)
    w_kv = torch.cat([k_weight, v_weight], 0).to(ctx.dtype).view(2 * n_kv_heads, hd, D)
    kv = torch.matmul(c.unsqueeze(0), w_kv.transpose(1, 2))  # [2 * n_kv, T, hd]
    grp = H // n_kv_heads
    qg = q.reshape(n_seg, n_q, n_kv_heads, grp, hd).permute(2, 0, 1, 3, 4).reshape(n_kv_heads, n_seg, n_q * grp, hd)
    u = _attend_v1(qg.to(ctx.dtype), kv[:n_kv_heads], kv[n_kv_heads:], None, cu, max_seqlen, scale)
    return u.view(n_kv_heads, n_seg, n_q, grp, hd).permute(1, 2, 0, 3, 4).reshape(n_seg, n_q, H, hd)



def latent_readout_v1(q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, ctx_norm_weight, *, n_kv_heads, eps=1e-6,
                      mode="absorbed", ctx_rstd=None):
    """The pre-rewrite forward (no autograd, no validation): rstd in torch unless given, result in q's dtype."""
    if mode not in ("absorbed", "plain"):
        raise ValueError(f"mode must be 'absorbed' or 'plain', got {mode!r}")
    rstd = ctx_rstd if ctx_rstd is not None else compute_rstd(ctx, eps)
    scale = 1.0 / q.shape[-1] ** 0.5
    out = _triton_fwd_v1(q, ctx, cu_seqlens, max_seqlen, k_weight, v_weight, ctx_norm_weight, rstd,
                         n_kv_heads=n_kv_heads, scale=scale, mode=mode)
    return out.to(q.dtype)
