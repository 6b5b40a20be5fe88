"""Triton kernels of the latent readout: varlen split-K attention of query rows over a shared key stream."""
import triton
import triton.language as tl


@triton.jit
def _readout_fwd_kernel(
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
def _readout_combine_kernel(
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
