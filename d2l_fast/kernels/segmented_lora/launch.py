"""Host launchers: validate, allocate, pick a config, launch. No autograd here, and no host syncs:
everything a launcher needs about the batch is a Python int on :class:`SegmentMeta`.

Host cost matters at decode (one call per LoRA layer per generated token, each a few microseconds of GPU
work), so everything that depends only on the batch and the layer shape is computed once and memoised on the
batch's :class:`SegmentMeta`: the validation verdict for a (shapes, dtypes, devices) signature and the launch
plan (config, tile table, grids, split sizes). A steady-state call does two dict lookups and the launches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._common import Launcher, cdiv, input_precision, interpreting, sm_count
from .configs import KernelConfig, pick_config
from .meta import SegmentMeta

__all__ = ["validate_inputs", "segmented_lora_fwd", "segmented_lora_bwd", "SUPPORTED_DTYPES", "launch_plan"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _validate(x, A, B, meta, out) -> None:
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
    need = max([0, *(g.rank_start + g.rank_len for g in meta.groups)])  # (max(..., default=) stops dynamo)
    if need > A.shape[0]:
        raise ValueError(f"meta uses rank rows up to {need}, but A/B have R_total={A.shape[0]}")
    if out is not None and tuple(out.shape) != (x.shape[0], B.shape[1]):
        raise ValueError(f"out must have shape {(x.shape[0], B.shape[1])} (T, d_out), got {tuple(out.shape)}")


def validate_inputs(x, A, B, meta, out=None) -> None:
    """Raise ``TypeError``/``ValueError`` (expected vs got) unless the operands agree. Cheap, no syncs.

    A signature that passed once for this batch (same shapes, dtypes and devices) is not checked again."""
    if not isinstance(meta, SegmentMeta):
        raise TypeError(f"meta must be a SegmentMeta, got {type(meta).__name__}")
    try:
        key = ("valid", x.shape, x.dtype, x.device, A.shape, A.dtype, A.device, B.shape, B.dtype, B.device,
               None if out is None else (out.shape, out.dtype, out.device))  # fmt: skip
    except AttributeError:  # not tensors: let _validate say which
        key = None
    if key is not None and key in meta._cache:
        return
    _validate(x, A, B, meta, out)
    if key is not None:
        meta._cache[key] = True


_LAUNCHERS: dict[str, Launcher] = {}


def _launch(name: str, grid, args: tuple, num_warps: int = 4, num_stages: int = 2, **constexprs):
    """Launch kernel ``name`` of kernel.py (imported on first use: Triton is optional) via its :class:`Launcher`."""
    launcher = _LAUNCHERS.get(name)
    if launcher is None:
        from . import kernel as K

        launcher = _LAUNCHERS[name] = Launcher(getattr(K, name))
    return launcher(grid, args, constexprs, num_warps, num_stages)


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


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a forward launch needs that depends only on the batch, the layer shape and the precision."""

    cfg: KernelConfig
    tiles: torch.Tensor  # int32 [n_tiles, 4]
    n_tiles: int
    n_splits: int
    k_per_split: int
    prec: str


def launch_plan(meta: SegmentMeta, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device,
                config: KernelConfig | None = None, backward: bool = False) -> LaunchPlan:  # fmt: skip
    """The (memoised) launch plan of this batch for a ``d_in -> d_out`` layer."""
    prec = input_precision(dtype)
    key = ("plan", d_in, d_out, prec, config, backward)
    plan = meta._cache.get(key)
    if plan is None:
        seqlen = max(meta.max_seqlen, 2) if backward else meta.max_seqlen
        if seqlen <= 1 and config is None:
            # decode where rows sharing an adapter sit back to back (beams, num_return_sequences): when most
            # tokens are in such runs, tensor-core tiles over the runs read each adapter once per tile instead
            # of once per row
            shared = sum(t1 - t0 for t0, t1, _, _ in meta.runs if t1 - t0 >= 2)
            if 2 * shared >= sum(t1 - t0 for t0, t1, _, _ in meta.runs):
                seqlen = max(t1 - t0 for t0, t1, _, _ in meta.runs)
        cfg = config or pick_config(meta.n_tokens, seqlen, meta.max_rank, d_in, d_out, n_sms=sm_count(device))
        if backward and cfg.SPLIT_K != 1:  # the weight-gradient kernel reads h directly: no split partials
            cfg = KernelConfig(cfg.variant, cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K, cfg.BLOCK_R, cfg.num_warps,
                               cfg.num_stages, 1)  # fmt: skip
        tiles = meta.tile_table(1 if cfg.variant == "decode" else cfg.BLOCK_M)
        k_per_split = cdiv(cdiv(d_in, max(cfg.SPLIT_K, 1)), cfg.BLOCK_K) * cfg.BLOCK_K
        plan = LaunchPlan(cfg, tiles, tiles.shape[0], cdiv(d_in, k_per_split), k_per_split, prec)
        meta._cache[key] = plan
    return plan


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
    validate_inputs(x, A, B, meta, out)
    if not meta.runs:
        return out
    if x.device.type == "cpu" and not interpreting():  # (meta tensors: the compile report captures launches)
        raise ValueError(f"the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {x.device} "
                         "tensors: use backend='torch' or 'auto' on CPU")
    x, A, B = _last_dim_unit(x), _last_dim_unit(A), _last_dim_unit(B)
    plan = launch_plan(meta, x.shape[1], B.shape[1], x.dtype, x.device, config)
    if plan.cfg.variant == "decode" and meta.max_seqlen > 1:  # only reachable with an explicit config
        raise ValueError(f"the decode variant needs max_seqlen <= 1, got {meta.max_seqlen}")
    scale = float(scale)
    with _device_guard(x):
        if plan.cfg.variant == "decode":
            _decode(out, x, A, B, meta, scale, plan)
        elif plan.cfg.variant == "fused":
            _fused(out, x, A, B, scale, plan)
        else:
            h = torch.empty(plan.n_splits, meta.n_tokens, meta.max_rank, dtype=torch.float32, device=x.device)
            _shrink(h, x, A, meta, scale, plan)
            _expand(out, h, B, meta, plan)
    return out


def _fused(out, x, A, B, scale, plan):
    cfg = plan.cfg
    _launch("_lora_fused_fwd_kernel", (plan.n_tiles, cdiv(B.shape[1], cfg.BLOCK_N)), (
        x, A, B, out, plan.tiles,
        x.shape[1], B.shape[1], scale,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        out.stride(0), out.stride(1)),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=cfg.BLOCK_R,
        INPUT_PRECISION=plan.prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _decode(out, x, A, B, meta, scale, plan):
    """Decode (one token per row): split-K shrink into fp32 partials, then the expand sums them."""
    cfg = plan.cfg
    h = torch.empty(plan.n_splits, plan.n_tiles, meta.max_rank, dtype=torch.float32, device=x.device)
    _launch("_lora_decode_shrink_kernel", (plan.n_tiles, cdiv(meta.max_rank, cfg.BLOCK_R), plan.n_splits), (
        x, A, h, plan.tiles,
        x.shape[1], plan.k_per_split,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), h.stride(0), h.stride(1), h.stride(2)),
        BLOCK_R=cfg.BLOCK_R, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    _launch("_lora_decode_expand_kernel", (plan.n_tiles, cdiv(B.shape[1], cfg.BLOCK_N)), (
        h, B, out, plan.tiles,
        B.shape[1], plan.n_splits, scale,
        h.stride(0), h.stride(1), h.stride(2), B.stride(0), B.stride(1), out.stride(0), out.stride(1)),
        BLOCK_N=cfg.BLOCK_N, BLOCK_R=cfg.BLOCK_R,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _shrink(h, x, W, meta, scale, plan):
    """h[s] = scale * x @ W_s.T over K slice s (h: fp32 [n_splits, T, max_rank])."""
    cfg = plan.cfg
    _launch("_lora_shrink_kernel", (plan.n_tiles, cdiv(meta.max_rank, cfg.BLOCK_R), plan.n_splits), (
        x, W, h, plan.tiles,
        x.shape[1], plan.k_per_split, scale,
        x.stride(0), x.stride(1), W.stride(0), W.stride(1), h.stride(0), h.stride(1), h.stride(2)),
        BLOCK_M=cfg.BLOCK_M, BLOCK_R=cfg.BLOCK_R, BLOCK_K=cfg.BLOCK_K, INPUT_PRECISION=plan.prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _expand(out, h, W, meta, plan):
    """out += (sum_s h[s]) @ W_s."""
    cfg = plan.cfg
    _launch("_lora_expand_kernel", (plan.n_tiles, cdiv(out.shape[1], cfg.BLOCK_N)), (
        h, W, out, plan.tiles,
        out.shape[1], h.shape[0],
        h.stride(0), h.stride(1), h.stride(2), W.stride(0), W.stride(1), out.stride(0), out.stride(1)),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_R=cfg.BLOCK_R, INPUT_PRECISION=plan.prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _wgrad(dw, g, x, meta, cfg, prec):
    d = x.shape[1]
    n_adapters = meta.adapter_rank_len.numel()
    grid = (n_adapters, cdiv(max(meta.max_rank, 1), cfg.BLOCK_R), cdiv(d, cfg.BLOCK_N))
    _launch("_lora_wgrad_kernel", grid, (
        g, x, dw,
        meta.adapter_rank_start, meta.adapter_rank_len, meta.adapter_seg_ptr, meta.adapter_seg_ids,
        meta.cu_seqlens,
        d,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1)),
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
    (both fp32 ``[T, max_rank]`` buffers, the same shrink kernel without split-K), then ``dx = gs A_s``
    (expand kernel), ``dA = gs^T x`` and ``dB = hs^T dy`` (per-adapter wgrad kernel; unused rank rows stay 0).
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
    # dy B^T is a shrink over d_out, x A^T one over d_in: one plan each (the shrink's K is the reduced dim)
    plan_dy = launch_plan(meta, d_out, d_in, x.dtype, x.device, config, backward=True)
    plan_x = launch_plan(meta, d_in, d_out, x.dtype, x.device, config, backward=True)
    R = meta.max_rank
    with _device_guard(x):
        if need_dx or need_dA:
            gs = torch.empty(1, meta.n_tokens, R, dtype=torch.float32, device=x.device)
            _shrink(gs, dy, B, meta, float(scale), plan_dy)
            if need_dx:
                _expand(dx, gs, A, meta, plan_dy)
            if need_dA:
                _wgrad(dA, gs[0], x, meta, plan_dy.cfg, plan_dy.prec)
        if need_dB:
            hs = torch.empty(1, meta.n_tokens, R, dtype=torch.float32, device=x.device)
            _shrink(hs, x, A, meta, float(scale), plan_x)
            _wgrad(dB, hs[0], dy, meta, plan_x.cfg, plan_x.prec)
    return dx, dA, dB
