"""Triton kernel of the gated activation with the LoRA shrink fused in. Only ``@triton.jit`` code lives here.

The tile table is an int32 ``[n_tiles, 4]`` tensor ``(row_start, row_end, rank_start, rank_len)`` over EVERY token
(unlike segmented_lora's, which skips rows without an adapter: here every row needs its activation); a tile is at
most ``BLOCK_M`` rows of one run of tokens that share an adapter, ``rank_len == 0`` for rows without one.
The expand is segmented_lora's ``_lora_expand_kernel``. See README.md.
"""

import triton
import triton.language as tl


@triton.jit
def _gated_act_shrink_kernel(
    # pointers
    gate_ptr,
    up_ptr,
    a_ptr,
    h_ptr,
    s_ptr,
    tile_ptr,
    # sizes
    d_ff,
    k_per_split,
    scale,
    # strides
    stride_g_tok,
    stride_g_d,
    stride_u_tok,
    stride_u_d,
    stride_a_rank,
    stride_a_d,
    stride_h_tok,
    stride_h_d,
    stride_s_split,
    stride_s_tok,
    stride_s_rank,
    # meta-parameters
    ACTIVATION: tl.constexpr,  # 0: SiLU (Llama, Qwen, Mistral), 1: GELU with the tanh approximation (Gemma)
    HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """grid = (n_tiles, n_splits); program (i, s) covers the rows of tile i and the intermediate columns
    [s * k_per_split, (s + 1) * k_per_split): for each BLOCK_K step it loads gate and up once, writes
    h = act(gate) * up (computed in fp32, stored in h's dtype) and, with HAS_LORA, accumulates h @ A[rs:rs+rl].T
    on the h it just rounded (what down_proj reads), then stores the fp32 partial s[s, rows, :rl] = scale * that.
    Tiles with rank_len == 0 store no partial (their A loads are fully masked: no traffic). Deterministic."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    t = tile_ptr + pid_m * 4
    row_start = tl.load(t).to(tl.int64)
    row_end = tl.load(t + 1).to(tl.int64)
    rank_start = tl.load(t + 2).to(tl.int64)
    rank_len = tl.load(t + 3).to(tl.int64)

    offs_m = row_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank_len
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, d_ff)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < k_hi
        mask = mask_m[:, None] & mask_k[None, :]
        g = tl.load(gate_ptr + offs_m[:, None] * stride_g_tok + offs_k[None, :] * stride_g_d, mask=mask,
                    other=0.0).to(tl.float32)  # fmt: skip
        u = tl.load(up_ptr + offs_m[:, None] * stride_u_tok + offs_k[None, :] * stride_u_d, mask=mask,
                    other=0.0).to(tl.float32)  # fmt: skip
        if ACTIVATION == 0:
            z = g
        else:  # 0.5 * (1 + tanh(c * (g + 0.044715 g^3))) == sigmoid(2c * (g + 0.044715 g^3)), c = sqrt(2 / pi)
            z = 1.5957691216057308 * (g + 0.044715 * g * g * g)
        h = (g / (1.0 + tl.exp(-z)) * u).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs_m[:, None] * stride_h_tok + offs_k[None, :] * stride_h_d, h, mask=mask)
        if HAS_LORA:
            a = tl.load(
                a_ptr + (rank_start + offs_r)[None, :] * stride_a_rank + offs_k[:, None] * stride_a_d,
                mask=mask_r[None, :] & mask_k[:, None],
                other=0.0,
            )  # [BLOCK_K, BLOCK_R]
            acc = tl.dot(h, a, acc, input_precision=INPUT_PRECISION)
    if HAS_LORA:
        if rank_len > 0:
            tl.store(
                s_ptr + pid_s * stride_s_split + offs_m[:, None] * stride_s_tok + offs_r[None, :] * stride_s_rank,
                acc * tl.cast(scale, tl.float32),
                mask=mask_m[:, None] & mask_r[None, :],
            )
