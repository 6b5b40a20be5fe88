"""Wrapping the target Linears of any HF causal LM and binding a batch of adapters to a forward.

Each targeted ``nn.Linear`` keeps its identity and parameter names (so ``state_dict``/``save_pretrained``
of the base model are unchanged); only its ``forward`` is replaced by one that computes the base output
and then, if an adapter binding is active, adds ``alpha · (x Aₖᵀ) Bₖ`` for the adapter k of every
row/segment through :func:`d2l_fast.kernels.segmented_lora.segmented_lora_` (in place, no per-token
weight copies). With no binding active the layer is exactly the original Linear.

Opt-in (``patch_model(..., fused_mlp=True)`` or :func:`set_fused_mlp`): a gated MLP (``gate_proj``, ``up_proj``,
``down_proj``, ``act_fn`` = SiLU or GELU-tanh) whose ``down_proj`` carries the bound adapter runs its LoRA fused
(:mod:`d2l_fast.kernels.gated_lora`): the shrink inside the activation kernel, the expand added into the bare
down_proj's output in place. gate/up LoRA (if targeted) stays on the unfused path, and so does any forward that
needs gradients.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from .adapters import AdapterBatch, as_index_list
from .hf import find_target_linears
from .kernels.gated_lora import gated_lora_expand_, gated_lora_shrink
from .kernels.segmented_lora import SegmentMeta, segmented_lora, segmented_lora_


class LoRABinding:
    """Adapters bound to one batch: which adapter each row (padded [B, S] input) or segment (packed) uses."""

    def __init__(self, adapters: AdapterBatch, layer_map: dict[int, int], *, row_adapter=None, seg_lens=None,
                 seg_adapter=None, rows_per_index: int = 1):
        self.adapters = adapters
        self.alpha = float(adapters.alpha)
        self.layer_map = layer_map  # base layer index -> adapter layer index
        n = len(adapters)
        if row_adapter is not None and seg_lens is not None:
            raise ValueError("give either row_adapter (padded batch) or seg_lens + seg_adapter (packed), not both")
        if isinstance(rows_per_index, bool) or not isinstance(rows_per_index, int) or rows_per_index < 1:
            raise ValueError(f"rows_per_index must be a positive int, got {rows_per_index!r}")
        if seg_lens is not None:
            if seg_adapter is None:
                raise ValueError("seg_lens needs seg_adapter (one adapter index per segment)")
            seg_lens = as_index_list(seg_lens, "seg_lens")
            seg_adapter = as_index_list(seg_adapter, "seg_adapter")
            if len(seg_lens) != len(seg_adapter):
                raise ValueError(f"{len(seg_lens)} segment lengths but {len(seg_adapter)} segment adapters")
            self._check_ids(seg_adapter, n)
        elif row_adapter is not None:
            row_adapter = as_index_list(row_adapter, "adapter_index")
            self._check_ids(row_adapter, n)
        self.row_adapter, self.seg_lens, self.seg_adapter = row_adapter, seg_lens, seg_adapter
        # generate(num_return_sequences / num_beams) expands each prompt row k times; only the caller knows k
        self.rows_per_index = rows_per_index
        self._metas: dict[tuple, SegmentMeta] = {}

    @property
    def used_adapters(self) -> list[int]:
        """Indices of the adapters some row or segment uses."""
        ids = self.seg_adapter if self.seg_lens is not None else self.row_adapter
        return sorted({i for i in (ids if ids is not None else [0]) if i >= 0})

    @staticmethod
    def _check_ids(ids, n):
        bad = [i for i in ids if not (-1 <= i < n)]
        if bad:
            raise ValueError(f"adapter indices must be in [-1, {n}) (-1 = no adapter), got {bad[:5]}")

    def meta_for(self, x: torch.Tensor) -> SegmentMeta:
        """Segment metadata for a layer input ``x`` [B, S, d] (cached per shape: built once per step)."""
        B, S = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
        key = (B, S)
        meta = self._metas.get(key)
        if meta is not None:
            return meta
        offs = self.adapters.rank_offsets
        if self.seg_lens is not None:
            if B != 1 or sum(self.seg_lens) != S:
                raise ValueError(f"packed binding covers {sum(self.seg_lens)} tokens in one row, got input [{B}, {S}]")
            meta = SegmentMeta.from_lengths(self.seg_lens, self.seg_adapter, offs, x.device)
        else:
            rows = self.row_adapter if self.row_adapter is not None else [0] * B
            if len(rows) != B:
                k = self.rows_per_index
                if k == 1 or len(rows) * k != B:
                    raise ValueError(f"batch has {B} rows but {len(rows)} row adapters were bound"
                                     + (f" with rows_per_index={k}" if k > 1 else
                                        "; give one adapter index per row (or rows_per_index= for expanded rows)"))
                rows = [a for a in rows for _ in range(k)]  # row i of the expanded batch comes from prompt i // k
            meta = SegmentMeta.uniform(B, S, rows, offs, x.device)
        self._metas[key] = meta
        return meta

    def weights_for(self, key: tuple[int, str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A [R, d_in], B [R, d_out])`` bound to the Linear ``key = (layer, module)``, or None."""
        layer, module = key
        li = self.layer_map.get(layer)
        if li is None or module not in self.adapters.A:
            return None
        return self.adapters.A[module][li], self.adapters.B[module][li]

    def apply(self, key: tuple[int, str], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.weights_for(key)
        if w is None:
            return y
        A, B = w
        meta = self.meta_for(x)
        x2 = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
            return y + segmented_lora(x2, A, B, meta, self.alpha).view(y.shape)
        y2 = y.view(-1, y.shape[-1]) if y.is_contiguous() else y.reshape(-1, y.shape[-1])
        segmented_lora_(y2, x2, A, B, meta, self.alpha)
        return y2.view(y.shape)


class LoRAContext:
    """Per-model holder of the active binding (thread-local so concurrent servers don't mix batches)."""

    def __init__(self):
        self._local = threading.local()

    @property
    def binding(self) -> LoRABinding | None:
        return getattr(self._local, "binding", None)

    @contextlib.contextmanager
    def bound(self, binding: LoRABinding | None):
        prev = self.binding
        self._local.binding = binding
        try:
            yield binding
        finally:
            self._local.binding = prev


def _lora_linear_forward(self, x):
    y = self._d2l_orig_forward(x)
    binding = self._d2l_ctx.binding
    if binding is None:
        return y
    return binding.apply(self._d2l_key, x, y)


def patch_model(model: nn.Module, modules, *, fused_mlp: bool = False) -> LoRAContext:
    """Patch every targeted Linear of ``model`` once; returns the context that binds adapters to it.

    ``fused_mlp``: also wire the fused MLP LoRA path (:func:`set_fused_mlp`)."""
    ctx = getattr(model, "_d2l_lora_context", None)
    linears = find_target_linears(model, modules)
    if ctx is None:
        ctx = LoRAContext()
        model._d2l_lora_context = ctx
    for key, lin in linears.items():
        if getattr(lin, "_d2l_ctx", None) is ctx:
            continue
        lin._d2l_orig_forward = lin.forward
        lin._d2l_ctx = ctx
        lin._d2l_key = key
        lin.forward = _lora_linear_forward.__get__(lin, type(lin))
    if fused_mlp:
        set_fused_mlp(model, True)
    return ctx


# ------------------------------------------------------------------------------------------ fused MLP LoRA
def mlp_activation(act_fn) -> str | None:
    """``"silu"`` / ``"gelu_tanh"`` when ``act_fn`` computes that function (probed on fixed points), else None."""
    if not callable(act_fn):
        return None
    p = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    try:
        with torch.no_grad():
            got = act_fn(p)
    except Exception:  # noqa: BLE001  (an activation that cannot run on a CPU fp64 probe: not fusable)
        return None
    for name, ref in (("silu", torch.nn.functional.silu(p)),
                      ("gelu_tanh", torch.nn.functional.gelu(p, approximate="tanh"))):  # fmt: skip
        if isinstance(got, torch.Tensor) and got.shape == p.shape and torch.allclose(got.double(), ref, atol=1e-9):
            return name
    return None


def _fused_mlp_forward(self, x):
    down = self.down_proj
    binding = down._d2l_ctx.binding
    w = binding.weights_for(down._d2l_key) if binding is not None else None
    if w is None or (torch.is_grad_enabled() and (x.requires_grad or w[0].requires_grad or w[1].requires_grad)):
        return self._d2l_mlp_orig_forward(x)
    A, B = w
    meta = binding.meta_for(x)
    h, s = gated_lora_shrink(self.gate_proj(x), self.up_proj(x), A, meta, binding.alpha, activation=self._d2l_act)
    return gated_lora_expand_(down._d2l_orig_forward(h), s, B, meta)


def set_fused_mlp(model: nn.Module, enabled: bool = True) -> int:
    """Turn the fused MLP LoRA path on (or off) for every gated MLP of a patched ``model`` whose ``down_proj`` is a
    patched Linear; returns how many MLPs now run fused. MLPs with another activation keep the unfused path."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if getattr(model, "_d2l_lora_context", None) is None:
        raise ValueError("set_fused_mlp needs a patched model: call patch_model(model, modules) first")
    n = 0
    for mod in model.modules():
        down = getattr(mod, "down_proj", None)
        if getattr(down, "_d2l_ctx", None) is None or not all(hasattr(mod, a) for a in ("gate_proj", "up_proj")):
            continue
        if hasattr(mod, "_d2l_mlp_orig_forward"):
            del mod.forward
            del mod._d2l_mlp_orig_forward, mod._d2l_act
        act = mlp_activation(getattr(mod, "act_fn", None))
        if enabled and act is not None:
            mod._d2l_mlp_orig_forward = mod.forward
            mod._d2l_act = act
            mod.forward = _fused_mlp_forward.__get__(mod, type(mod))
            n += 1
    return n


def unpatch_model(model: nn.Module) -> None:
    """Restore the original forwards of every patched Linear."""
    for mod in model.modules():
        if hasattr(mod, "_d2l_mlp_orig_forward"):
            del mod.forward
            del mod._d2l_mlp_orig_forward, mod._d2l_act
    for mod in model.modules():
        if hasattr(mod, "_d2l_orig_forward"):
            del mod.forward
            del mod._d2l_orig_forward, mod._d2l_ctx, mod._d2l_key
    if hasattr(model, "_d2l_lora_context"):
        del model._d2l_lora_context


__all__ = ["LoRABinding", "LoRAContext", "mlp_activation", "patch_model", "set_fused_mlp", "unpatch_model"]
