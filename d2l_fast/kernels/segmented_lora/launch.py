"""Host launchers: validate, allocate, pick a config, launch. No autograd here, and no host syncs:
everything a launcher needs about the batch is a Python int on :class:`SegmentMeta`."""

from __future__ import annotations

import torch

from .._common import input_precision, sm_count
from .configs import KernelConfig, pick_config
from .meta import SegmentMeta

__all__ = ["validate_inputs", "segmented_lora_fwd", "segmented_lora_bwd", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def validate_inputs(x, A, B, meta, out=None) -> None:
    """Raise ``TypeError``/``ValueError`` (expected vs got) unless the operands agree. Cheap, no syncs."""
    if not isinstance(meta, SegmentMeta):
        raise TypeError(f"meta must be a SegmentMeta, got {type(meta).__name__}")
    for name, t in (("x", x), ("A", A), ("B", B)) + ((("out", out),) if out is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x.dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    for name, t in (("A", A), ("B", B)) + ((("out", out),) if out is not None else ()):
        if t.dtype != x.dtype:
            raise TypeError(f"{name}.dtype must equal x.dtype ({x.dtype}); cast adapters once up front, got {t.dtype}")
    for name, t in (("A", A), ("B", B), ("meta.cu_seqlens", meta.cu_seqlens)) + (
        (("out", out),) if out is not None else ()
    ):
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, d_in] (2-D), got shape {tuple(x.shape)}")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(
            f"A must be [R_total, d_in] and B [R_total, d_out] (2-D), got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    if A.shape[1] != x.shape[1]:
        raise ValueError(f"A.shape[1] must equal x.shape[1] (d_in={x.shape[1]}), got A.shape={tuple(A.shape)}")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"A and B must have the same R_total, got A.shape={tuple(A.shape)} B.shape={tuple(B.shape)}")
    if meta.n_tokens != x.shape[0]:
        raise ValueError(f"meta.n_tokens must equal x.shape[0]: expected {x.shape[0]}, got {meta.n_tokens}")
    need = max((g.rank_start + g.rank_len for g in meta.groups), default=0)
    if need > A.shape[0]:
        raise ValueError(f"meta uses rank rows up to {need}, but A/B have R_total={A.shape[0]}")
    if out is not None and tuple(out.shape) != (x.shape[0], B.shape[1]):
        raise ValueError(f"out must have shape {(x.shape[0], B.shape[1])} (T, d_out), got {tuple(out.shape)}")


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    # the kernels take every stride, but a unit last-dim stride keeps loads coalesced on GPU
    return t if t.stride(-1) == 1 or t.is_cpu else t.contiguous()


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _NullCtx()


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def segmented_lora_fwd(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    meta: SegmentMeta,
    scale: float = 1.0,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``out += scale * (x @ A_s.T) @ B_s`` per segment with the Triton kernels; returns ``out``."""
    from . import kernel as K

    validate_inputs(x, A, B, meta, out)
    if not meta.runs:
        return out
    x, A, B = _last_dim_unit(x), _last_dim_unit(A), _last_dim_unit(B)
    d_in, d_out = x.shape[1], B.shape[1]
    cfg = config or pick_config(meta.n_tokens, meta.max_seqlen, meta.max_rank, d_in, d_out, n_sms=sm_count(x.device))
    prec = input_precision(x.dtype)
    scale = float(scale)
    with _device_guard(x):
        if cfg.variant == "decode":
            if meta.max_seqlen > 1:
                raise ValueError(f"the decode variant needs max_seqlen <= 1, got {meta.max_seqlen}")
            _decode(out, x, A, B, meta, scale, cfg)
            return out
        tile_seg, tile_row = meta.tiles(cfg.BLOCK_M)
        n_tiles = tile_seg.numel()
        if cfg.variant == "fused":
            grid = (n_tiles, triton_cdiv(d_out, cfg.BLOCK_N))
            K._lora_fused_fwd_kernel[grid](
                x, A, B, out,
                tile_seg, tile_row, meta.cu_seqlens, meta.seg_rank_start, meta.seg_rank_len,
                d_in, d_out, scale,
                x.stride(0), x.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1),
                out.stride(0), out.stride(1),
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=cfg.BLOCK_R,
                INPUT_PRECISION=prec,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
            return out
        h = torch.empty(meta.n_tokens, max(meta.max_rank, 1), dtype=torch.float32, device=x.device)
        _shrink(h, x, A, meta, scale, cfg, prec, tile_seg, tile_row)
        _expand(out, h, B, meta, cfg, prec, tile_seg, tile_row)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _decode(out, x, A, B, meta, scale, cfg):
    """Decode (one token per row): split-K shrink into fp32 partials, then the expand sums them."""
    from . import kernel as K

    d_in, d_out = x.shape[1], B.shape[1]
    tile_seg, tile_row = meta.tiles(1)
    n_rows = tile_seg.numel()
    k_per_split = triton_cdiv(d_in, cfg.SPLIT_K)
    k_per_split = triton_cdiv(k_per_split, cfg.BLOCK_K) * cfg.BLOCK_K
    n_splits = triton_cdiv(d_in, k_per_split)
    h = torch.empty(n_splits, n_rows, max(meta.max_rank, 1), dtype=torch.float32, device=x.device)
    K._lora_decode_shrink_kernel[(n_rows, triton_cdiv(meta.max_rank, cfg.BLOCK_R), n_splits)](
        x, A, h,
        tile_seg, tile_row, meta.seg_rank_start, meta.seg_rank_len,
        d_in, k_per_split,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), h.stride(0), h.stride(1), h.stride(2),
        BLOCK_R=cfg.BLOCK_R, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    K._lora_decode_expand_kernel[(n_rows, triton_cdiv(d_out, cfg.BLOCK_N))](
        h, B, out,
        tile_seg, tile_row, meta.seg_rank_start, meta.seg_rank_len,
        d_out, n_splits, scale,
        h.stride(0), h.stride(1), h.stride(2), B.stride(0), B.stride(1), out.stride(0), out.stride(1),
        BLOCK_N=cfg.BLOCK_N, BLOCK_R=cfg.BLOCK_R,
        num_warps=cfg.num_warps,
    )  # fmt: skip


def _shrink(h, x, W, meta, scale, cfg, prec, tile_seg, tile_row):
    from . import kernel as K

    grid = (tile_seg.numel(), triton_cdiv(max(meta.max_rank, 1), cfg.BLOCK_R))
    K._lora_shrink_kernel[grid](
        x, W, h,
        tile_seg, tile_row, meta.cu_seqlens, meta.seg_rank_start, meta.seg_rank_len,
        x.shape[1], scale,
        x.stride(0), x.stride(1), W.stride(0), W.stride(1), h.stride(0), h.stride(1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_R=cfg.BLOCK_R, BLOCK_K=cfg.BLOCK_K, INPUT_PRECISION=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _expand(out, h, W, meta, cfg, prec, tile_seg, tile_row):
    from . import kernel as K

    d = out.shape[1]
    grid = (tile_seg.numel(), triton_cdiv(d, cfg.BLOCK_N))
    K._lora_expand_kernel[grid](
        h, W, out,
        tile_seg, tile_row, meta.cu_seqlens, meta.seg_rank_start, meta.seg_rank_len,
        d,
        h.stride(0), h.stride(1), W.stride(0), W.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_R=cfg.BLOCK_R, INPUT_PRECISION=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _wgrad(dw, g, x, meta, cfg, prec):
    from . import kernel as K

    d = x.shape[1]
    n_adapters = meta.adapter_rank_len.numel()
    grid = (n_adapters, triton_cdiv(max(meta.max_rank, 1), cfg.BLOCK_R), triton_cdiv(d, cfg.BLOCK_N))
    K._lora_wgrad_kernel[grid](
        g, x, dw,
        meta.adapter_rank_start, meta.adapter_rank_len, meta.adapter_seg_ptr, meta.adapter_seg_ids,
        meta.cu_seqlens,
        d,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_R=cfg.BLOCK_R, BLOCK_N=cfg.BLOCK_N, INPUT_PRECISION=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def segmented_lora_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    meta: SegmentMeta,
    scale: float = 1.0,
    needs: tuple[bool, bool, bool] = (True, True, True),
    config: KernelConfig | None = None,
):
    """Triton backward: ``(dx, dA, dB)`` (``None`` where not needed).

    Recomputes the shrink instead of saving it: ``hs = scale * x A_s^T`` and ``gs = scale * dy B_s^T``
    (both fp32 ``[T, max_rank]`` buffers, the same shrink kernel), then ``dx = gs A_s`` (expand kernel),
    ``dA = gs^T x`` and ``dB = hs^T dy`` (per-adapter wgrad kernel; unused rank rows stay 0).
    """
    validate_inputs(x, A, B, meta)
    if tuple(dy.shape) != (x.shape[0], B.shape[1]):
        raise ValueError(f"dy must have shape {(x.shape[0], B.shape[1])}, got {tuple(dy.shape)}")
    need_dx, need_dA, need_dB = needs
    dx = torch.zeros_like(x, memory_format=torch.contiguous_format) if need_dx else None
    dA = torch.zeros_like(A, memory_format=torch.contiguous_format) if need_dA else None
    dB = torch.zeros_like(B, memory_format=torch.contiguous_format) if need_dB else None
    if not meta.runs:
        return dx, dA, dB
    x, A, B, dy = _last_dim_unit(x), _last_dim_unit(A), _last_dim_unit(B), _last_dim_unit(dy.to(x.dtype))
    d_in, d_out = x.shape[1], B.shape[1]
    cfg = config or pick_config(meta.n_tokens, max(meta.max_seqlen, 2), meta.max_rank, d_in, d_out)
    prec = input_precision(x.dtype)
    tile_seg, tile_row = meta.tiles(cfg.BLOCK_M)
    R = max(meta.max_rank, 1)
    with _device_guard(x):
        if need_dx or need_dA:
            gs = torch.empty(meta.n_tokens, R, dtype=torch.float32, device=x.device)
            _shrink(gs, dy, B, meta, float(scale), cfg, prec, tile_seg, tile_row)
            if need_dx:
                _expand(dx, gs, A, meta, cfg, prec, tile_seg, tile_row)
            if need_dA:
                _wgrad(dA, gs, x, meta, cfg, prec)
        if need_dB:
            hs = torch.empty(meta.n_tokens, R, dtype=torch.float32, device=x.device)
            _shrink(hs, x, A, meta, float(scale), cfg, prec, tile_seg, tile_row)
            _wgrad(dB, hs, dy, meta, cfg, prec)
    return dx, dA, dB
