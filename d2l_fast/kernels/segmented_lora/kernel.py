"""Triton kernels for the segmented multi-LoRA op. Only ``@triton.jit`` code lives here.

Notation: the tile table is an int32 ``[n_tiles, 4]`` tensor; tile ``i`` covers token rows
``[row_start, row_end)`` (at most ``BLOCK_M`` rows of one run of tokens that share an adapter: adjacent
segments with the same adapter are merged, so beams / repeated rows share tiles) whose adapter owns rank rows
``[rank_start, rank_start + rank_len)`` of the ragged ``A [R_total, d_in]`` / ``B [R_total, d_out]``.
See README.md for the math and the tiling.
"""

import triton
import triton.language as tl


@triton.jit
def _load_tile(tile_ptr, pid):
    t = tile_ptr + pid * 4
    row_start = tl.load(t).to(tl.int64)
    row_end = tl.load(t + 1).to(tl.int64)
    rank_start = tl.load(t + 2).to(tl.int64)
    rank_len = tl.load(t + 3).to(tl.int64)
    return row_start, row_end, rank_start, rank_len


@triton.jit
def _lora_fused_fwd_kernel(
    # pointers
    x_ptr,
    a_ptr,
    b_ptr,
    out_ptr,
    tile_ptr,
    # sizes
    d_in,
    d_out,
    scale,
    # strides
    stride_x_tok,
    stride_x_d,
    stride_a_rank,
    stride_a_d,
    stride_b_rank,
    stride_b_d,
    stride_out_tok,
    stride_out_d,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """grid = (n_tiles, cdiv(d_out, BLOCK_N)); program (i, j) adds
    scale * (x[tile i] @ A[rs:rs+rl].T) @ B[rs:rs+rl, j-th BLOCK_N cols] into out (load-add-store)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    row_start, row_end, rank_start, rank_len = _load_tile(tile_ptr, pid_m)

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < row_end
    mask_n = offs_n < d_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank_len, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank_len
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = offs_k < d_in
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_x_tok + offs_k[None, :] * stride_x_d,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_K]
            a = tl.load(
                a_ptr + (rank_start + offs_r)[None, :] * stride_a_rank + offs_k[:, None] * stride_a_d,
                mask=mask_r[None, :] & mask_k[:, None],
                other=0.0,
            )  # [BLOCK_K, BLOCK_R]
            h = tl.dot(x, a, h, input_precision=INPUT_PRECISION)
        b = tl.load(
            b_ptr + (rank_start + offs_r)[:, None] * stride_b_rank + offs_n[None, :] * stride_b_d,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_N]
        acc = tl.dot(h.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_out_tok + offs_n[None, :] * stride_out_d
    mask_out = mask_m[:, None] & mask_n[None, :]
    prev = tl.load(out_ptrs, mask=mask_out, other=0.0).to(tl.float32)
    res = prev + acc * tl.cast(scale, tl.float32)
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _lora_shrink_kernel(
    # pointers
    x_ptr,
    w_ptr,
    h_ptr,
    tile_ptr,
    # sizes
    d_in,
    k_per_split,
    scale,
    # strides
    stride_x_tok,
    stride_x_d,
    stride_w_rank,
    stride_w_d,
    stride_h_split,
    stride_h_tok,
    stride_h_rank,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """grid = (n_tiles, cdiv(max_rank, BLOCK_R), n_splits); program (i, j, s) writes the fp32 partial
    h[s, tile i rows, j-th rank block] = scale * x[rows, K slice s] @ W[rs + j*BLOCK_R ..., K slice s].T with
    K slice s = [s * k_per_split, (s + 1) * k_per_split) (split-K: fills the GPU when tiles x rank blocks are
    few). The expand kernel sums the partials in a fixed order: deterministic, no atomics. Rank blocks past
    rl do nothing (never read)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    row_start, row_end, rank_start, rank_len = _load_tile(tile_ptr, pid_m)
    r0 = pid_r * BLOCK_R
    if r0 < rank_len:
        offs_m = row_start + tl.arange(0, BLOCK_M)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_m = offs_m < row_end
        mask_r = offs_r < rank_len
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, d_in)
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = offs_k < k_hi
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_x_tok + offs_k[None, :] * stride_x_d,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_K]
            w = tl.load(
                w_ptr + (rank_start + offs_r)[None, :] * stride_w_rank + offs_k[:, None] * stride_w_d,
                mask=mask_r[None, :] & mask_k[:, None],
                other=0.0,
            )  # [BLOCK_K, BLOCK_R]
            h = tl.dot(x, w, h, input_precision=INPUT_PRECISION)
        h = h * tl.cast(scale, tl.float32)
        tl.store(
            h_ptr + pid_s * stride_h_split + offs_m[:, None] * stride_h_tok + offs_r[None, :] * stride_h_rank,
            h,
            mask=mask_m[:, None] & mask_r[None, :],
        )


@triton.jit
def _lora_expand_kernel(
    # pointers
    h_ptr,
    w_ptr,
    out_ptr,
    tile_ptr,
    # sizes
    d_out,
    n_splits,
    # strides
    stride_h_split,
    stride_h_tok,
    stride_h_rank,
    stride_w_rank,
    stride_w_d,
    stride_out_tok,
    stride_out_d,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """grid = (n_tiles, cdiv(d_out, BLOCK_N)); program (i, j) adds (sum_s h[s, tile i rows, :rl]) @ W[rs:rs+rl,
    j-th BLOCK_N cols] into out (load-add-store). h holds the shrink kernel's fp32 split partials."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    row_start, row_end, rank_start, rank_len = _load_tile(tile_ptr, pid_m)

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < row_end
    mask_n = offs_n < d_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank_len, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank_len
        h_ptrs = h_ptr + offs_m[:, None] * stride_h_tok + offs_r[None, :] * stride_h_rank
        h_mask = mask_m[:, None] & mask_r[None, :]
        h = tl.load(h_ptrs, mask=h_mask, other=0.0)  # [BLOCK_M, BLOCK_R]
        for s in range(1, n_splits):
            h += tl.load(h_ptrs + s * stride_h_split, mask=h_mask, other=0.0)
        w = tl.load(
            w_ptr + (rank_start + offs_r)[:, None] * stride_w_rank + offs_n[None, :] * stride_w_d,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_N]
        acc = tl.dot(h.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_out_tok + offs_n[None, :] * stride_out_d
    mask_out = mask_m[:, None] & mask_n[None, :]
    prev = tl.load(out_ptrs, mask=mask_out, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (prev + acc).to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _lora_decode_shrink_kernel(
    # pointers
    x_ptr,
    a_ptr,
    h_ptr,
    tile_ptr,
    # sizes
    d_in,
    k_per_split,
    # strides
    stride_x_tok,
    stride_x_d,
    stride_a_rank,
    stride_a_d,
    stride_h_split,
    stride_h_row,
    stride_h_rank,
    # meta-parameters
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """grid = (n_rows_with_adapter, cdiv(max_rank, BLOCK_R), n_splits); decode shrink, one token per tile
    (the tile table of BLOCK_M = 1). Program (i, j, s) writes the fp32 partial h[s, i, j-th rank block] =
    A[rs + rank block, K slice s] @ x[row, K slice s]. Every element of A is read by exactly one program (one
    A read per row); the expand kernel sums the n_splits partials in a fixed order (deterministic, no atomics).
    Rank blocks past the row's rank do nothing (the expand never reads them)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    row, row_end, rank_start, rank_len = _load_tile(tile_ptr, pid_m)
    r0 = pid_r * BLOCK_R
    if r0 < rank_len:
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank_len
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, d_in)
        h = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = offs_k < k_hi
            x = tl.load(x_ptr + row * stride_x_tok + offs_k * stride_x_d, mask=mask_k, other=0.0)  # [BLOCK_K]
            a = tl.load(
                a_ptr + (rank_start + offs_r)[:, None] * stride_a_rank + offs_k[None, :] * stride_a_d,
                mask=mask_r[:, None] & mask_k[None, :],
                other=0.0,
            )  # [BLOCK_R, BLOCK_K]
            h += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(h_ptr + pid_s * stride_h_split + pid_m * stride_h_row + offs_r * stride_h_rank, h, mask=mask_r)


@triton.jit
def _lora_decode_expand_kernel(
    # pointers
    h_ptr,
    b_ptr,
    out_ptr,
    tile_ptr,
    # sizes
    d_out,
    n_splits,
    scale,
    # strides
    stride_h_split,
    stride_h_row,
    stride_h_rank,
    stride_b_rank,
    stride_b_d,
    stride_out_tok,
    stride_out_d,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """grid = (n_rows_with_adapter, cdiv(d_out, BLOCK_N)); decode expand (GEMV over d_out), one token per tile:
    out[row, cols] += scale * (sum_s h[s, i, :rl]) @ B[rs:rs+rl, cols], fp32 reductions, no tl.dot (a single
    token would waste 15/16 of an MMA tile). B is read once per row."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    row, row_end, rank_start, rank_len = _load_tile(tile_ptr, pid_m)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_out
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank_len, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank_len
        h = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for s in range(0, n_splits):
            h_s = h_ptr + s * stride_h_split + pid_m * stride_h_row + offs_r * stride_h_rank
            h += tl.load(h_s, mask=mask_r, other=0.0)
        b = tl.load(
            b_ptr + (rank_start + offs_r)[:, None] * stride_b_rank + offs_n[None, :] * stride_b_d,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_N]
        acc += tl.sum(h[:, None] * b.to(tl.float32), axis=0)
    out_ptrs = out_ptr + row * stride_out_tok + offs_n * stride_out_d
    prev = tl.load(out_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    res = prev + acc * tl.cast(scale, tl.float32)
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _lora_wgrad_kernel(
    # pointers
    g_ptr,
    x_ptr,
    dw_ptr,
    # adapter metadata
    adapter_rank_start_ptr,
    adapter_rank_len_ptr,
    adapter_seg_ptr,
    adapter_seg_ids_ptr,
    cu_seqlens_ptr,
    # sizes
    d,
    # strides
    stride_g_tok,
    stride_g_rank,
    stride_x_tok,
    stride_x_d,
    stride_dw_rank,
    stride_dw_d,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """grid = (n_adapters_used, cdiv(max_rank, BLOCK_R), cdiv(d, BLOCK_N)); program (u, j, k) writes
    dW[rs_u + j-th rank block, k-th col block] = sum over the tokens of all segments of adapter u of
    g[t, rank block]^T x[t, col block]. One writer per output element: deterministic, no atomics."""
    pid_u = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2).to(tl.int64)
    rank_start = tl.load(adapter_rank_start_ptr + pid_u).to(tl.int64)
    rank_len = tl.load(adapter_rank_len_ptr + pid_u).to(tl.int64)
    r0 = pid_r * BLOCK_R
    if r0 < rank_len:
        offs_r = r0 + tl.arange(0, BLOCK_R)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_r = offs_r < rank_len
        mask_n = offs_n < d
        p_start = tl.load(adapter_seg_ptr + pid_u)
        p_end = tl.load(adapter_seg_ptr + pid_u + 1)
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for p in range(p_start, p_end):
            seg = tl.load(adapter_seg_ids_ptr + p).to(tl.int64)
            seg_start = tl.load(cu_seqlens_ptr + seg).to(tl.int64)
            seg_end = tl.load(cu_seqlens_ptr + seg + 1).to(tl.int64)
            for m0 in range(seg_start, seg_end, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                mask_m = offs_m < seg_end
                g = tl.load(
                    g_ptr + offs_m[None, :] * stride_g_tok + offs_r[:, None] * stride_g_rank,
                    mask=mask_r[:, None] & mask_m[None, :],
                    other=0.0,
                )  # [BLOCK_R, BLOCK_M]
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_x_tok + offs_n[None, :] * stride_x_d,
                    mask=mask_m[:, None] & mask_n[None, :],
                    other=0.0,
                )  # [BLOCK_M, BLOCK_N]
                acc = tl.dot(g.to(x.dtype), x, acc, input_precision=INPUT_PRECISION)
        tl.store(
            dw_ptr + (rank_start + offs_r)[:, None] * stride_dw_rank + offs_n[None, :] * stride_dw_d,
            acc.to(dw_ptr.dtype.element_ty),
            mask=mask_r[:, None] & mask_n[None, :],
        )
