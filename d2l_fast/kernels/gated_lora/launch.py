"""Host launchers of the fused gated-activation + LoRA shrink and of the expand: validate, plan (memoised on the
batch's :class:`~d2l_fast.kernels.segmented_lora.SegmentMeta`), launch. No autograd, no host syncs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._common import Launcher, cdiv, input_precision, interpreting, sm_count
from ..segmented_lora.configs import KernelConfig
from ..segmented_lora.launch import LaunchPlan, _device_guard, _expand, _shrink
from ..segmented_lora.launch import launch_plan as seg_launch_plan
from ..segmented_lora.meta import SegmentMeta
from .configs import ShrinkConfig, pick_expand_config, pick_shrink_config

__all__ = ["ACTIVATIONS", "SUPPORTED_DTYPES", "row_tiles", "shrink_plan", "expand_plan", "validate_shrink",
           "validate_expand", "partial_count", "gated_lora_shrink_fwd", "gated_lora_expand_fwd"]

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- validation
def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _rank_rows_needed(meta: SegmentMeta) -> int:
    return max([0, *(g.rank_start + g.rank_len for g in meta.groups)])


def validate_shrink(gate, up, A, meta, activation) -> None:
    """Raise ``TypeError``/``ValueError`` (expected vs got) unless the shrink's operands agree. Cheap, no syncs."""
    if not isinstance(meta, SegmentMeta):
        raise TypeError(f"meta must be a SegmentMeta, got {type(meta).__name__}")
    for name, t in (("gate", gate), ("up", up), ("A", A)):
        _tensor(name, t)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if gate.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"gate.dtype must be one of {SUPPORTED_DTYPES}, got {gate.dtype}")
    for name, t in (("up", up), ("A", A)):
        if t.dtype != gate.dtype:
            raise TypeError(f"{name}.dtype must equal gate.dtype ({gate.dtype}), got {t.dtype}")
    for name, t in (("up", up), ("A", A), ("meta.cu_seqlens", meta.cu_seqlens)):
        if t.device != gate.device:
            raise ValueError(f"{name} must be on gate's device {gate.device}, got {t.device}")
    if gate.dim() != 2 or tuple(up.shape) != tuple(gate.shape):
        raise ValueError(f"gate and up must both be [T, d_ff] (2-D, one shape), got {tuple(gate.shape)} and "
                         f"{tuple(up.shape)}")  # fmt: skip
    if A.dim() != 2 or A.shape[1] != gate.shape[1]:
        raise ValueError(f"A must be [R_total, d_ff={gate.shape[1]}], got {tuple(A.shape)}")
    if meta.n_tokens != gate.shape[0]:
        raise ValueError(f"meta.n_tokens must equal gate.shape[0]: expected {gate.shape[0]}, got {meta.n_tokens}")
    need = _rank_rows_needed(meta)
    if need > A.shape[0]:
        raise ValueError(f"meta uses rank rows up to {need}, but A has R_total={A.shape[0]}")


def validate_expand(y, s, B, meta) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``y [T, d_model]``, the shrink's partials ``s`` and ``B`` agree."""
    if not isinstance(meta, SegmentMeta):
        raise TypeError(f"meta must be a SegmentMeta, got {type(meta).__name__}")
    for name, t in (("y", y), ("s", s), ("B", B)):
        _tensor(name, t)
    if y.dtype not in SUPPORTED_DTYPES or B.dtype != y.dtype:
        raise TypeError(f"y and B must share one dtype in {SUPPORTED_DTYPES}, got {y.dtype} and {B.dtype}")
    if s.dtype != torch.float32:
        raise TypeError(f"s must be the shrink's fp32 partials, got dtype {s.dtype}")
    for name, t in (("s", s), ("B", B), ("meta.cu_seqlens", meta.cu_seqlens)):
        if t.device != y.device:
            raise ValueError(f"{name} must be on y's device {y.device}, got {t.device}")
    if y.dim() != 2 or y.shape[0] != meta.n_tokens:
        raise ValueError(f"y must be [T={meta.n_tokens}, d_model] (2-D), got {tuple(y.shape)}")
    if B.dim() != 2 or B.shape[1] != y.shape[1]:
        raise ValueError(f"B must be [R_total, d_model={y.shape[1]}], got {tuple(B.shape)}")
    if s.dim() != 3 or s.shape[0] < 1 or s.shape[1] != meta.n_tokens or s.shape[2] != meta.max_rank:
        raise ValueError(f"s must be [n_splits >= 1, T={meta.n_tokens}, max_rank={meta.max_rank}] (the shrink's "
                         f"partials of this batch), got {tuple(s.shape)}")  # fmt: skip
    need = _rank_rows_needed(meta)
    if need > B.shape[0]:
        raise ValueError(f"meta uses rank rows up to {need}, but B has R_total={B.shape[0]}")


# ----------------------------------------------------------------------------------------------- plans
def row_tiles(meta: SegmentMeta, block_m: int) -> torch.Tensor:
    """int32 ``[n_tiles, 4]`` ``(row_start, row_end, rank_start, rank_len)`` over EVERY token: adjacent segments
    with the same rank range (or both without adapter) are merged into runs, each cut into <= ``block_m`` rows.
    Cached on ``meta`` per ``block_m``."""

    def build():
        runs: list[list[int]] = []
        cu = meta.cu_seqlens_host
        for s, (rs, rl) in enumerate(zip(meta.rank_start_host, meta.rank_len_host)):
            t0, t1 = cu[s], cu[s + 1]
            if t1 == t0:
                continue
            if runs and runs[-1][1] == t0 and runs[-1][2:] == [rs, rl]:
                runs[-1][1] = t1
            else:
                runs.append([t0, t1, rs, rl])
        rows = [(r, min(r + block_m, t1), rs, rl) for t0, t1, rs, rl in runs for r in range(t0, t1, block_m)]
        return torch.tensor(rows, dtype=torch.int32).reshape(-1, 4).to(meta.device, non_blocking=True)

    return meta.cached(("gated_row_tiles", block_m), build)


@dataclass(frozen=True)
class ShrinkPlan:
    cfg: ShrinkConfig
    tiles: torch.Tensor  # row_tiles(meta, BLOCK_M)
    n_tiles: int
    n_splits: int
    k_per_split: int
    prec: str
    fused: bool  # False: max_rank > MAX_FUSED_RANK, the shrink runs as segmented_lora's kernel after the activation


def shrink_plan(meta: SegmentMeta, d_ff: int, dtype: torch.dtype, device: torch.device,
                config: ShrinkConfig | None = None) -> ShrinkPlan:  # fmt: skip
    """The (memoised) plan of the fused kernel for this batch at intermediate width ``d_ff``."""
    prec = input_precision(dtype)
    key = ("gated_shrink_plan", d_ff, prec, config)
    plan = meta._cache.get(key)
    if plan is None:
        cfg = config or pick_shrink_config(meta.n_tokens, meta.max_seqlen, meta.max_rank, d_ff,
                                           n_sms=sm_count(device))  # fmt: skip
        tiles = row_tiles(meta, cfg.BLOCK_M)
        k_per_split = cdiv(cdiv(d_ff, max(cfg.SPLIT_K, 1)), cfg.BLOCK_K) * cfg.BLOCK_K
        fused = meta.max_rank <= cfg.BLOCK_R
        plan = ShrinkPlan(cfg, tiles, tiles.shape[0], cdiv(d_ff, k_per_split), k_per_split, prec, fused)
        meta._cache[key] = plan
    return plan


def partial_count(n_tokens: int, max_seqlen: int, max_rank: int, has_runs: bool, d_ff: int,
                  device: torch.device) -> int:  # fmt: skip
    """How many fp32 partial slices the Triton shrink writes (``s.shape[0]``), from the batch's ints alone (the
    custom op's fake implementation uses it; the launcher's plan agrees by construction)."""
    if n_tokens == 0 or not has_runs:
        return 1
    cfg = pick_shrink_config(n_tokens, max_seqlen, max_rank, d_ff, n_sms=sm_count(device))
    if max_rank <= cfg.BLOCK_R:
        return cdiv(d_ff, cdiv(cdiv(d_ff, max(cfg.SPLIT_K, 1)), cfg.BLOCK_K) * cfg.BLOCK_K)
    c = _two_pass_cfg(n_tokens, max_seqlen, max_rank, d_ff, device)
    return cdiv(d_ff, cdiv(cdiv(d_ff, max(c.SPLIT_K, 1)), c.BLOCK_K) * c.BLOCK_K)


def _two_pass_cfg(n_tokens: int, max_seqlen: int, max_rank: int, d_ff: int, device: torch.device) -> KernelConfig:
    """segmented_lora's shrink config for a rank above MAX_FUSED_RANK (its split-K rule, rank blocks of <= 64)."""
    from ..segmented_lora.configs import pick_config

    c = pick_config(n_tokens, max(max_seqlen, 2), max_rank, d_ff, 1 << 20, n_sms=sm_count(device))
    return KernelConfig("two_pass", c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.BLOCK_R, c.num_warps, c.num_stages, c.SPLIT_K)


def expand_plan(meta: SegmentMeta, d_model: int, dtype: torch.dtype, device: torch.device,
                config: KernelConfig | None = None) -> LaunchPlan:  # fmt: skip
    """The (memoised) plan of segmented_lora's expand kernel over this batch's adapter runs."""
    prec = input_precision(dtype)
    key = ("gated_expand_plan", d_model, prec, config)
    plan = meta._cache.get(key)
    if plan is None:
        cfg = config or pick_expand_config(meta.n_tokens, meta.max_seqlen, meta.max_rank, d_model,
                                           n_sms=sm_count(device))  # fmt: skip
        tiles = meta.tile_table(cfg.BLOCK_M)
        plan = LaunchPlan(cfg, tiles, tiles.shape[0], 1, 0, prec)
        meta._cache[key] = plan
    return plan


# ----------------------------------------------------------------------------------------------- launches
_LAUNCHER: list = []


def _launcher() -> Launcher:
    if not _LAUNCHER:
        from . import kernel as K

        _LAUNCHER.append(Launcher(K._gated_act_shrink_kernel))
    return _LAUNCHER[0]


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not interpreting():
        raise ValueError(f"the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {t.device} "
                         "tensors: use backend='torch' or 'auto' on CPU")  # fmt: skip


def gated_lora_shrink_fwd(gate, up, A, meta: SegmentMeta, scale: float = 1.0, activation: str = "silu",
                          config: ShrinkConfig | None = None):  # fmt: skip
    """``(h, s)``: ``h = act(gate) * up`` in gate's dtype and the fp32 partials ``s [n_splits, T, max_rank]`` whose
    sum over dim 0 is ``scale * h @ A_s.T`` on every row with an adapter (rows without one: never read)."""
    validate_shrink(gate, up, A, meta, activation)
    _check_device(gate)
    T, d_ff = gate.shape
    h = torch.empty(T, d_ff, dtype=gate.dtype, device=gate.device)
    if T == 0:
        return h, torch.zeros(1, 0, meta.max_rank, dtype=torch.float32, device=gate.device)
    plan = shrink_plan(meta, d_ff, gate.dtype, gate.device, config)
    has_lora = bool(meta.runs) and plan.fused
    s = torch.empty(plan.n_splits if has_lora else 1, T, max(meta.max_rank, 1), dtype=torch.float32,
                    device=gate.device)[..., : meta.max_rank]  # fmt: skip
    A = A if A.stride(-1) == 1 or A.is_cpu else A.contiguous()
    cfg = plan.cfg
    with _device_guard(gate):
        _launcher()((plan.n_tiles, plan.n_splits), (
            gate, up, A, h, s, plan.tiles,
            d_ff, plan.k_per_split, float(scale),
            gate.stride(0), gate.stride(1), up.stride(0), up.stride(1), A.stride(0), A.stride(1),
            h.stride(0), h.stride(1), s.stride(0), s.stride(1), s.stride(2)),
            {"ACTIVATION": ACTIVATIONS[activation], "HAS_LORA": has_lora, "BLOCK_M": cfg.BLOCK_M,
             "BLOCK_K": cfg.BLOCK_K, "BLOCK_R": cfg.BLOCK_R, "INPUT_PRECISION": plan.prec},
            cfg.num_warps, cfg.num_stages)  # fmt: skip
        if meta.runs and not plan.fused:  # rank > MAX_FUSED_RANK: segmented_lora's split-K shrink over h
            cfg2 = _two_pass_cfg(T, meta.max_seqlen, meta.max_rank, d_ff, gate.device)
            sp = seg_launch_plan(meta, d_ff, 1, gate.dtype, gate.device, cfg2)
            s = torch.empty(sp.n_splits, T, meta.max_rank, dtype=torch.float32, device=gate.device)
            _shrink(s, h, A, meta, float(scale), sp)
    return h, s


def gated_lora_expand_fwd(y, s, B, meta: SegmentMeta, config: KernelConfig | None = None) -> torch.Tensor:
    """``y += (Σ_i s[i]) @ B_s`` on every row with an adapter, one read and one write of those rows of y."""
    validate_expand(y, s, B, meta)
    if not meta.runs:
        return y
    _check_device(y)
    B = B if B.stride(-1) == 1 or B.is_cpu else B.contiguous()
    plan = expand_plan(meta, y.shape[1], y.dtype, y.device, config)
    with _device_guard(y):
        _expand(y, s, B, meta, plan)
    return y
