"""Triton kernels of the latent readout: packed-row attention over a shared key stream, split across programs by
context range and output columns, a log-sum-exp merge of the splits, and the context's RMS statistics."""
import triton
import triton.language as tl


@triton.jit
def _readout_split_kernel(
    # pointers
    q_ptr,
    k_ptr,
    v_ptr,
    tok_scale_ptr,
    out_ptr,
    part_ptr,
    lse_ptr,
    cu_seqlens_ptr,
    # sizes
    n_rows,
    dim_k,
    n_groups,
    n_dv_blocks,
    split_len,
    sm_scale_log2,
    eps,
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
    stride_out_grp,
    stride_out_seg,
    stride_out_row,
    stride_out_dim,
    stride_part_split,
    stride_part_sg,
    stride_part_row,
    stride_lse_split,
    stride_lse_sg,
    dim_v,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    TOK_SCALE: tl.constexpr,
    SHARED_KV: tl.constexpr,
    SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    RSTD_CHUNK: tl.constexpr = 64,
):
    """grid = (n_row_tiles * n_dv_blocks, n_splits, n_seg * n_groups).

    Program (i * n_dv_blocks + c, j, s * n_groups + g) attends query rows [i*BLOCK_M, (i+1)*BLOCK_M) of segment s,
    group g (every row of a group shares one key/value stream: all n_q*H rows in the absorbed form, the n_q*H/n_kv
    rows of one KV head in the plain form) to the tokens [start_s + j*split_len, min(end_s, start_s +
    (j+1)*split_len)). Scores use the full key width; the output accumulates only value columns
    [c*BLOCK_DV, (c+1)*BLOCK_DV) (the "D split": a smaller accumulator, the scores recomputed per column block).
    The programs of one (segment, split) are adjacent in launch order, so their key reads after the first hit L2.

    TOK_SCALE: 0 none, 1 a per-token factor (the context's rstd) read from tok_scale_ptr, 2 the same factor
    computed here from the key rows themselves (absorbed form: keys are the raw context, BLOCK_DK >= dim_k);
    it multiplies the scores and the probabilities. SPLIT: write the split-normalized fp32 partial and its base-2
    log-sum-exp for the merge kernel (splits past the segment's end write nothing); else write the normalized
    output (zeros for an empty segment) to out_ptr.
    """
    pid_t = tl.program_id(0)
    pid_split = tl.program_id(1).to(tl.int64)
    pid_sg = tl.program_id(2)
    pid_m = (pid_t // n_dv_blocks).to(tl.int64)
    pid_dv = (pid_t % n_dv_blocks).to(tl.int64)
    pid_seg = (pid_sg // n_groups).to(tl.int64)
    pid_grp = (pid_sg % n_groups).to(tl.int64)

    seg_start = tl.load(cu_seqlens_ptr + pid_seg).to(tl.int64)
    seg_end = tl.load(cu_seqlens_ptr + pid_seg + 1).to(tl.int64)
    start = seg_start + pid_split * split_len
    end = tl.minimum(seg_end, start + split_len)
    if SPLIT:
        if start >= end:
            return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_m = offs_m < n_rows
    mask_dk = offs_dk < dim_k
    mask_dv = offs_dv < dim_v

    q_ptrs = q_ptr + pid_grp * stride_q_grp + pid_seg * stride_q_seg
    q_ptrs += offs_m[:, None] * stride_q_row + offs_dk[None, :] * stride_q_dim
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_dk[None, :], other=0.0)  # [BLOCK_M, BLOCK_DK]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    k_base = k_ptr + pid_grp * stride_k_grp
    v_base = v_ptr + pid_grp * stride_v_grp
    inv_dim = 1.0 / tl.cast(dim_k, tl.float32)
    eps_f = tl.cast(eps, tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < end
        k = tl.load(
            k_base + offs_n[:, None] * stride_k_tok + offs_dk[None, :] * stride_k_dim,
            mask=mask_n[:, None] & mask_dk[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_DK]
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if TOK_SCALE == 1:
            ts = tl.load(tok_scale_ptr + offs_n, mask=mask_n, other=0.0)
            qk = qk * ts[None, :]
        if TOK_SCALE == 2:
            # the raw rows' mean square, re-read in narrow column chunks (L1/L2 hits) so the full-width tile is
            # never held in registers next to the accumulator
            ss = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in tl.static_range(0, BLOCK_DK, RSTD_CHUNK):
                offs_c = d0 + tl.arange(0, RSTD_CHUNK)
                kc = tl.load(
                    k_base + offs_n[:, None] * stride_k_tok + offs_c[None, :] * stride_k_dim,
                    mask=mask_n[:, None] & (offs_c[None, :] < dim_k),
                    other=0.0,
                ).to(tl.float32)
                ss += tl.sum(kc * kc, 1)
            ts = 1.0 / tl.sqrt(ss * inv_dim + eps_f)
            qk = qk * ts[None, :]
        qk = tl.where(mask_n[None, :], qk * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        if TOK_SCALE != 0:
            p = p * ts[None, :]
        if SHARED_KV and BLOCK_DV == BLOCK_DK:
            v = k
        else:
            v = tl.load(
                v_base + offs_n[:, None] * stride_v_tok + offs_dv[None, :] * stride_v_dim,
                mask=mask_n[:, None] & mask_dv[None, :],
                other=0.0,
            )  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    has = l_i > 0.0
    acc = acc / tl.where(has, l_i, 1.0)[:, None]
    mask_out = mask_m[:, None] & mask_dv[None, :]
    if SPLIT:
        p_ptrs = part_ptr + pid_split * stride_part_split + pid_sg * stride_part_sg
        p_ptrs += offs_m[:, None] * stride_part_row + offs_dv[None, :]
        tl.store(p_ptrs, acc, mask=mask_out)
        if pid_dv == 0:
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + pid_split * stride_lse_split + pid_sg * stride_lse_sg + offs_m, lse, mask=mask_m)
    else:
        o_ptrs = out_ptr + pid_grp * stride_out_grp + pid_seg * stride_out_seg
        o_ptrs += offs_m[:, None] * stride_out_row + offs_dv[None, :] * stride_out_dim
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _readout_merge_kernel(
    # pointers
    part_ptr,
    lse_ptr,
    out_ptr,
    cu_seqlens_ptr,
    # sizes
    n_rows,
    n_groups,
    n_d_blocks,
    split_len,
    # strides
    stride_part_split,
    stride_part_sg,
    stride_part_row,
    stride_lse_split,
    stride_lse_sg,
    stride_out_grp,
    stride_out_seg,
    stride_out_row,
    stride_out_dim,
    dim,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grid = (n_row_tiles * n_d_blocks, n_seg * n_groups): out = sum_j 2^(lse_j - M) o_j / sum_j 2^(lse_j - M) over
    the splits j that hold tokens of the segment (the others were never written); zeros for an empty segment."""
    pid_t = tl.program_id(0)
    pid_sg = tl.program_id(1)
    pid_m = (pid_t // n_d_blocks).to(tl.int64)
    pid_d = (pid_t % n_d_blocks).to(tl.int64)
    pid_seg = (pid_sg // n_groups).to(tl.int64)
    pid_grp = (pid_sg % n_groups).to(tl.int64)
    seg_len = tl.load(cu_seqlens_ptr + pid_seg + 1) - tl.load(cu_seqlens_ptr + pid_seg)
    n_used = tl.cdiv(seg_len, split_len)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_rows
    mask_md = mask_m[:, None] & (offs_d[None, :] < dim)
    lse_base = lse_ptr + pid_sg * stride_lse_sg + offs_m
    p_base = part_ptr + pid_sg * stride_part_sg + offs_m[:, None] * stride_part_row + offs_d[None, :]

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for j in range(0, n_used):
        m = tl.maximum(m, tl.load(lse_base + tl.cast(j, tl.int64) * stride_lse_split, mask=mask_m, other=0.0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_used):
        j64 = tl.cast(j, tl.int64)
        w = tl.exp2(tl.load(lse_base + j64 * stride_lse_split, mask=mask_m, other=float("-inf")) - m_safe)
        o = tl.load(p_base + j64 * stride_part_split, mask=mask_md, other=0.0)
        acc += w[:, None] * o
        den += w
    acc = acc / tl.where(den > 0.0, den, 1.0)[:, None]
    out_ptrs = out_ptr + pid_grp * stride_out_grp + pid_seg * stride_out_seg
    out_ptrs += offs_m[:, None] * stride_out_row + offs_d[None, :] * stride_out_dim
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_md)


@triton.jit
def _ctx_rstd_kernel(
    x_ptr,
    out_ptr,
    n_tok,
    dim,
    eps,
    stride_tok,
    stride_dim,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grid = (cdiv(n_tok, BLOCK_T),): out[t] = 1 / sqrt(mean_d(x[t, d]^2) + eps) in fp32 (the RMSNorm statistic)."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_tok
    ss = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + offs_t[:, None] * stride_tok + offs_d[None, :] * stride_dim,
                    mask=mask_t[:, None] & (offs_d[None, :] < dim), other=0.0).to(tl.float32)
        ss += tl.sum(x * x, 1)
    rstd = 1.0 / tl.sqrt(ss / tl.cast(dim, tl.float32) + tl.cast(eps, tl.float32))
    tl.store(out_ptr + offs_t, rstd, mask=mask_t)
