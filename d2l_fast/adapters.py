"""Ragged batches of per-document LoRA adapters.

``AdapterBatch`` stores, per target module, ``A [L, R_total, d_in]`` and ``B [L, R_total, d_out]``
(B rank-major as the reference produces it) with ``rank_offsets`` (n_adapters + 1 cumulative ranks):
adapter k owns rank rows ``rank_offsets[k]:rank_offsets[k+1]`` of every layer. A document internalised
from n chunks has rank (n+1)·r: its chunks' rows in order, then the bias rows. Nothing is padded.
The update applied to a target Linear is ``y += alpha · (x Aₖᵀ) Bₖ`` (alpha as-is, not alpha/r).
:meth:`AdapterBatch.save` / :meth:`AdapterBatch.load` use the file format of :mod:`d2l_fast.adapter_file`.
"""

from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass

import torch

from .adapter_file import adapter_error, read_adapter_file, write_adapter_file


def as_index_list(values, what: str = "adapter_index") -> list[int]:
    """``values`` as a list of Python ints; floats, strings and bools are refused (no silent truncation).

    Accepts a sequence of ints (numpy integers too) or an integer tensor of at most one dimension.
    """
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of integers, got a string {values!r}")
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool or values.dim() > 1:
            raise TypeError(f"{what} must be a 1-D integer tensor, got {values.dtype} {tuple(values.shape)}")
        return [int(v) for v in values.reshape(-1).tolist()]
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of integers, got {type(values).__name__}") from None
    out = []
    for i, v in enumerate(items):
        if isinstance(v, bool) or type(v).__name__ == "bool_":
            raise TypeError(f"{what}[{i}] must be an integer, got the bool {v!r}")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{what}[{i}] must be an integer, got {type(v).__name__} {v!r}") from None
    return out


@dataclass
class AdapterBatch:
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    rank_offsets: list[int]
    alpha: float
    model_id: str
    names: list[str] | None = None

    def __post_init__(self):
        self.rank_offsets = [int(x) for x in self.rank_offsets]
        ro = self.rank_offsets
        if not ro or ro[0] != 0 or any(b < a for a, b in zip(ro[:-1], ro[1:])):
            raise ValueError(f"rank_offsets must start at 0 and be non-decreasing, got {ro}")
        if set(self.A) != set(self.B):
            raise ValueError(f"A and B name different modules: {sorted(self.A)} vs {sorted(self.B)}")
        for m in self.A:
            a, b = self.A[m], self.B[m]
            if a.dim() != 3 or b.dim() != 3 or a.shape[:2] != b.shape[:2]:
                raise ValueError(f"module {m}: expected A [L, R, d_in] and B [L, R, d_out], got {tuple(a.shape)} / "
                                 f"{tuple(b.shape)}")
            if a.shape[1] != ro[-1]:
                raise ValueError(f"module {m}: A has {a.shape[1]} rank rows but rank_offsets ends at {ro[-1]}")
        if self.names is not None and len(self.names) != len(self):
            raise ValueError(f"{len(self.names)} names for {len(self)} adapters")

    def __len__(self) -> int:
        return len(self.rank_offsets) - 1

    def nonfinite(self) -> list[int]:
        """Indices of the adapters holding a NaN or an infinity (in any module or layer).

        The result is cached until a tensor is replaced or modified in place (tensor version counters; inference
        tensors have none and are scanned on every call). :meth:`select` and :meth:`concat` of scanned batches
        inherit the result (their rows are copies), so binding a concatenation does not scan it again.
        """
        tensors, key = self._nonfinite_key()
        known = self._known_nonfinite(key)
        if known is not None:
            return known
        R = self.rank_offsets[-1]
        flagged = None
        with torch.no_grad():
            # a rank row whose sum is finite holds no NaN/inf (both propagate through a sum): one read-only pass
            # of row sums; only rows whose sum is not finite (a NaN/inf, or a finite sum that overflowed) are
            # then checked entry by entry
            for t in tensors:
                for layer in t:
                    acc = torch.float32 if layer.dtype in (torch.float16, torch.bfloat16) else None
                    rows = ~torch.isfinite(layer.sum(1, dtype=acc))
                    flagged = rows if flagged is None else flagged | rows
            idx = None if flagged is None or R == 0 else flagged.nonzero().flatten()
            if idx is None or idx.numel() == 0:
                bad = []
            else:
                bad_rows = torch.zeros_like(flagged)
                for t in tensors:
                    for layer in t:
                        bad_rows[idx] |= ~torch.isfinite(layer.index_select(0, idx)).all(1)
                cnt = torch.cat([bad_rows.new_zeros(1, dtype=torch.long), bad_rows.long().cumsum(0)]).cpu()
                ro = torch.tensor(self.rank_offsets)
                bad = (cnt[ro[1:]] - cnt[ro[:-1]]).nonzero().flatten().tolist()
        if key is not None:
            self.__dict__["_nonfinite_cache"] = (key, bad)
        return list(bad)

    def _nonfinite_key(self):
        tensors = [t for d in (self.A, self.B) for _, t in sorted(d.items())]
        key = None if any(t.is_inference() for t in tensors) else [(t, t._version) for t in tensors]  # no counter
        return tensors, key

    def known_nonfinite(self) -> list[int] | None:
        """What :meth:`nonfinite` would return without scanning: its last result while no tensor was replaced or
        modified since (or the verdict :meth:`select` / :meth:`concat` inherited), else None (unknown)."""
        return self._known_nonfinite()

    def tensor_versions(self) -> list[tuple[torch.Tensor, int]] | None:
        """``[(tensor, version counter)]`` of every A/B tensor: equal (tensor for tensor by identity, versions by
        value) as long as no tensor was replaced or modified in place. None when a tensor has no counter (an
        inference tensor): then nothing can be cached against this batch."""
        return self._nonfinite_key()[1]

    def _known_nonfinite(self, key=None) -> list[int] | None:
        """What :meth:`nonfinite` returned last if no tensor was replaced or modified since, else None (unknown)."""
        key = self._nonfinite_key()[1] if key is None else key
        cached = self.__dict__.get("_nonfinite_cache")
        if key is not None and cached is not None and len(cached[0]) == len(key) and all(
                a is b and va == vb for (a, va), (b, vb) in zip(cached[0], key)):
            return list(cached[1])
        return None

    def _inherit_nonfinite(self, bad: list[int] | None) -> "AdapterBatch":
        """Cache ``bad`` as this batch's :meth:`nonfinite` (its rows were copied from batches already scanned)."""
        key = self._nonfinite_key()[1] if bad is not None else None
        if key is not None:
            self.__dict__["_nonfinite_cache"] = (key, list(bad))
        return self

    def check_finite(self, indices=None, *, where: str = "") -> None:
        """Raise ``ValueError`` naming every adapter (of ``indices``, default all) that holds a NaN or infinity."""
        if not math.isfinite(self.alpha):
            raise ValueError(f"adapters{where} have a non-finite alpha ({self.alpha}); it would scale every row")
        bad = self.nonfinite()
        if indices is not None:
            used = set(indices)
            bad = [k for k in bad if k in used]
        if bad:
            raise self.nonfinite_error(bad, where=where)

    def nonfinite_error(self, bad: list[int], *, where: str = "") -> ValueError:
        """The error (returned, not raised) that names adapters ``bad`` (indices into this batch, e.g. from
        :meth:`nonfinite` of a selection mapped back) as holding NaN or infinite values; ``where`` is appended
        to the adapter names."""
        if not isinstance(bad, (list, tuple)) or not bad:
            raise ValueError(f"nonfinite_error needs a non-empty list of adapter indices, got {bad!r:.60}")
        label = ", ".join(f"#{k}" + (f" ({self.names[k]!r})" if self.names and self.names[k] else "")
                          for k in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        return ValueError(f"adapter {label}{more}{where} contains NaN or infinite values; refusing to use it "
                          f"(it would turn its rows into NaN)")

    @property
    def modules(self) -> list[str]:
        return sorted(self.A)

    @property
    def ranks(self) -> list[int]:
        ro = self.rank_offsets
        return [b - a for a, b in zip(ro[:-1], ro[1:])]

    @property
    def num_layers(self) -> int:
        return next(iter(self.A.values())).shape[0]

    @property
    def dtype(self):
        return next(iter(self.A.values())).dtype

    @property
    def device(self):
        return next(iter(self.A.values())).device

    def to(self, *args, **kwargs) -> "AdapterBatch":
        """A copy moved/cast like ``Tensor.to``: ``to(device)``, ``to(dtype)``, ``to(device, dtype)``,
        ``to(tensor)`` or keywords ``device=``, ``dtype=``, ``non_blocking=``. The dtype must be floating point."""
        probe = torch.empty(0, dtype=self.dtype).to(*args, **kwargs)  # torch parses (and rejects) the arguments
        if not probe.is_floating_point():
            raise TypeError(f"AdapterBatch.to: adapters must stay floating point, got dtype {probe.dtype}")
        f = lambda t: t.to(*args, **kwargs)  # noqa: E731
        return AdapterBatch({m: f(t) for m, t in self.A.items()}, {m: f(t) for m, t in self.B.items()},
                            list(self.rank_offsets), self.alpha, self.model_id, self.names)

    def select(self, indices, *, device=None, dtype=None) -> "AdapterBatch":
        """A new batch holding adapters ``indices`` (in that order; repeats allowed).

        ``device`` / ``dtype``: the copy is made there and in that (floating point) dtype, one layer at a time (no
        full-size temporary in the source dtype), e.g. ``select(rows_adapters, dtype=torch.float32)`` of a
        bf16-resident batch.
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"AdapterBatch.select: dtype must be a floating point torch.dtype, got {dtype!r}")
        indices = as_index_list(indices, "indices")
        n = len(self)
        for i in indices:
            if not -n <= i < n:
                raise IndexError(f"adapter index {i} out of range for a batch of {n}")
        indices = [i % n for i in indices]
        ro = self.rank_offsets
        rows = [r for i in indices for r in range(ro[i], ro[i + 1])]
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        offs = [0]
        for i in indices:
            offs.append(offs[-1] + ro[i + 1] - ro[i])
        names = [self.names[i] for i in indices] if self.names else None
        dev = torch.device(device) if device is not None else None

        def take(t):
            if torch.is_grad_enabled() and t.requires_grad:  # differentiable (compose of trainable adapters)
                return t.index_select(1, idx).to(device=dev, dtype=dtype)
            out = torch.empty(t.shape[0], idx.numel(), t.shape[2], dtype=dtype or t.dtype, device=dev or t.device)
            # layer by layer along the rank axis: whole contiguous rows (3-4x faster on CPU than one index_select
            # over dim 1 of the [L, R, d] tensor), and a cast needs only a one-layer temporary
            for layer, o in zip(t, out):
                if o.dtype == layer.dtype and o.device == layer.device:
                    torch.index_select(layer, 0, idx, out=o)
                else:
                    o.copy_(layer.index_select(0, idx))
            return out

        # a scanned batch: the copy needs no new scan, unless a narrowing cast could overflow to inf
        widening = dtype is None or torch.finfo(dtype).max >= torch.finfo(self.dtype).max
        bad = self._known_nonfinite() if widening else None
        out = AdapterBatch({m: take(t) for m, t in self.A.items()}, {m: take(t) for m, t in self.B.items()}, offs,
                           self.alpha, self.model_id, names)
        if bad is not None:
            bad = set(bad)
            bad = [j for j, i in enumerate(indices) if i in bad]
        return out._inherit_nonfinite(bad)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(range(len(self))[i])
        return self.select([i])

    @staticmethod
    def concat(batches: list["AdapterBatch"]) -> "AdapterBatch":
        if not batches:
            raise ValueError("concat needs at least one AdapterBatch")
        first = batches[0]
        for b in batches[1:]:
            if b.model_id != first.model_id or b.alpha != first.alpha or b.modules != first.modules:
                raise ValueError(f"cannot concat adapters of different models: {first.model_id!r} vs {b.model_id!r}")
        offs = [0]
        for b in batches:
            base = offs[-1]
            offs.extend([base + x for x in b.rank_offsets[1:]])
        names = sum((b.names or [None] * len(b) for b in batches), [])
        known = [b._known_nonfinite() for b in batches]  # all parts scanned: the concatenation needs no new scan
        bad, base = [], 0
        for b, k in zip(batches, known):
            bad.extend(base + i for i in k or [])
            base += len(b)
        out = AdapterBatch({m: torch.cat([b.A[m] for b in batches], 1) for m in first.A},
                           {m: torch.cat([b.B[m] for b in batches], 1) for m in first.B}, offs, first.alpha,
                           first.model_id, names if any(n is not None for n in names) else None)
        return out._inherit_nonfinite(bad if all(k is not None for k in known) else None)

    def compose(self, indices, weights=None) -> "AdapterBatch":
        """One adapter that applies several documents at once (ranks concatenated; optional weight per doc on A)."""
        sel = self.select(indices)
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(sel):
                raise ValueError(f"{len(weights)} weights for {len(sel)} adapters")
            if not all(math.isfinite(w) for w in weights):
                raise ValueError(f"compose weights must be finite, got {weights}")
            scale = torch.cat([torch.full((r,), float(w)) for r, w in zip(sel.ranks, weights)])
            scale = scale.to(sel.device, sel.dtype)
            sel = AdapterBatch({m: t * scale[None, :, None] for m, t in sel.A.items()}, dict(sel.B),
                               sel.rank_offsets, sel.alpha, sel.model_id)
        return AdapterBatch(sel.A, sel.B, [0, sel.rank_offsets[-1]], sel.alpha, sel.model_id)

    def rescaled(self, *, context: float = 1.0, bias: float = 1.0, bias_rows: int,
                 inplace: bool = False) -> "AdapterBatch":
        """The adapters ``internalize(..., scalers=context, bias_scaler=bias)`` makes, from those it made with 1, 1.

        Uses the rank-row layout of :func:`merge_chunk_loras`: every adapter holds its chunks' rows, then
        ``bias_rows`` bias rows (the hypernetwork's ``lora_r`` when it has a bias LoRA, else 0). ``context``
        multiplies A of the chunk rows; ``bias`` multiplies A and B of the bias rows. Both 1: ``self`` (no copy).
        Otherwise one copy (``inplace=True``: this batch's tensors are scaled in place and ``self`` is returned,
        e.g. for a concatenation the caller just made).
        """
        for name, v in (("context", context), ("bias", bias)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"rescaled: {name} must be a finite number, got {v!r}")
        if isinstance(bias_rows, bool) or not isinstance(bias_rows, int) or bias_rows < 0:
            raise ValueError(f"rescaled: bias_rows must be an int >= 0, got {bias_rows!r}")
        short = [k for k, r in enumerate(self.ranks) if r < bias_rows]
        if short:
            raise ValueError(f"rescaled: bias_rows={bias_rows} but adapter #{short[0]} has rank "
                             f"{self.ranks[short[0]]} (fewer rows than its bias rows)")
        if bias_rows == 0 and bias != 1.0:
            raise ValueError(f"rescaled: bias={bias} but bias_rows=0 (these adapters have no bias rows to scale)")
        if context == 1.0 and bias == 1.0:
            return self
        ro = self.rank_offsets
        is_bias = torch.zeros(ro[-1], dtype=torch.bool)
        for end in ro[1:]:
            is_bias[end - bias_rows:end] = True
        a_scale = torch.where(is_bias, float(bias), float(context))
        b_scale = torch.where(is_bias, float(bias), 1.0)
        out = self if inplace else AdapterBatch({m: t.clone() for m, t in self.A.items()},
                                                {m: t.clone() for m, t in self.B.items()}, list(ro), self.alpha,
                                                self.model_id, self.names)
        with torch.no_grad():
            for d, s in ((out.A, a_scale), (out.B, b_scale)):
                if bool((s == 1.0).all()):
                    continue
                for t in d.values():
                    t.mul_(s.to(t.device, t.dtype)[None, :, None])
        return out

    def to_peft(self, folder, index: int, *, model=None, spec=None, base_model=None, dtype=None,
                overwrite: bool = False, max_rank: int | None = None):
        """Write adapter ``index`` as one standard PEFT LoRA folder; returns its path (a ``pathlib.Path``).

        A shortcut for :func:`d2l_fast.export.export_peft` with one document: give exactly one of ``model=``
        (the :class:`~d2l_fast.D2LModel` that made these adapters, or its
        :class:`~d2l_fast.LoadedCheckpoint`) or ``spec=`` (a :class:`~d2l_fast.D2LSpec`; the module paths then come
        from ``base_model=``: an HF model, a local folder or hub id, default the spec's base model). ``dtype``,
        ``overwrite`` and ``max_rank`` are those of ``export_peft``. For several documents in one adapter, export
        ``self.compose(indices, weights)`` with ``index=0``.
        """
        from .config import D2LSpec
        from .export import export_peft

        try:
            if isinstance(index, bool) or type(index).__name__ == "bool_":
                raise TypeError
            index = operator.index(index)  # ints and numpy integers; lists, floats and strings are refused
        except TypeError:
            raise TypeError(f"to_peft: index must be one int (the adapter to write), got {index!r:.60} "
                            f"({type(index).__name__}); for several documents in one folder use "
                            "compose(indices).to_peft(folder, 0, ...), for one folder each export_peft") from None
        if (model is None) == (spec is None):
            raise TypeError("to_peft: give exactly one of model= (the D2LModel or LoadedCheckpoint that made these "
                            f"adapters) or spec= (a D2LSpec), got model={type(model).__name__}, "
                            f"spec={type(spec).__name__}")
        if spec is not None and not isinstance(spec, D2LSpec):
            raise TypeError(f"to_peft: spec must be a D2LSpec, got {type(spec).__name__}")
        if model is not None and isinstance(model, D2LSpec):
            raise TypeError("to_peft: a D2LSpec goes in spec=, not model=")
        (out,) = export_peft(model if model is not None else spec, self, index, folder, dtype=dtype,
                             overwrite=overwrite, max_rank=max_rank, base_model=base_model)
        return out

    def to_padded(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's padded layout for one module: A [G, L, R_max, d_in], B [G, L, R_max, d_out], zero rows
        after."""
        a, b = self.A[module], self.B[module]
        G, L, rmax = len(self), a.shape[0], max(self.ranks, default=0)
        pa = a.new_zeros(G, L, rmax, a.shape[2])
        pb = b.new_zeros(G, L, rmax, b.shape[2])
        for g, (s, e) in enumerate(zip(self.rank_offsets[:-1], self.rank_offsets[1:])):
            pa[g, :, : e - s] = a[:, s:e]
            pb[g, :, : e - s] = b[:, s:e]
        return pa, pb

    def save(self, path) -> None:
        """safetensors with the ragged tensors; metadata holds offsets, alpha, model id and names
        (:mod:`d2l_fast.adapter_file`)."""
        write_adapter_file(path, self.A, self.B, rank_offsets=self.rank_offsets, alpha=self.alpha,
                           model_id=self.model_id, names=self.names)

    @classmethod
    def load(cls, path, device=None, *, spec=None) -> "AdapterBatch":
        """Read a file written by :meth:`save`; every malformed field raises :class:`~d2l_fast.CheckpointError`.

        Metadata, tensor names, dtypes and shapes are checked before any tensor is read. With ``spec`` (a
        :class:`~d2l_fast.D2LSpec`) the adapters must also fit that model's modules, layers and feature sizes.
        """
        A, B, ro, alpha, model_id, names = read_adapter_file(path)
        try:
            out = cls(A, B, ro, alpha, model_id, names)
        except ValueError as e:
            raise adapter_error(str(path), str(e)) from None
        if spec is not None:
            out.check_fits(spec, source=str(path))
        out.check_finite(where=f" in {path}")
        return out.to(device) if device is not None else out

    def check_fits(self, spec, *, source: str = "adapters") -> None:
        """Modules, layer count and per-module feature sizes must be those of ``spec`` (ValueError otherwise)."""
        if self.modules != list(spec.target_modules) or self.num_layers != spec.num_layers:
            raise adapter_error(source, f"modules/layers {self.modules}/{self.num_layers} do not match the model's "
                                         f"{list(spec.target_modules)}/{spec.num_layers}")
        for m in self.modules:
            d_in, d_out = self.A[m].shape[2], self.B[m].shape[2]
            if (d_in, d_out) != (spec.d_in[m], spec.d_out[m]):
                raise adapter_error(source, f"module {m!r}: A/B feature sizes {d_in}/{d_out}, the model's {m} is "
                                             f"{spec.d_in[m]} -> {spec.d_out[m]}")


def merge_chunk_loras(chunk_loras: dict, n_chunks: list[int], *, bias: dict | None, alpha: float, model_id: str,
                      scalers=None, bias_scaler: float | None = None, names=None) -> AdapterBatch:
    """Per-chunk LoRAs {m: {A: [C, L, r, d_in], B: [C, L, r, d_out]}} → ragged AdapterBatch (spec §1.6).

    Document g gets its chunks' rows (chunk-major), then β·bias rows; per-chunk ``scalers`` multiply A only.
    One gather per tensor; no per-document device work.
    """
    mods = sorted(chunk_loras)
    C, L, r, _ = chunk_loras[mods[0]]["A"].shape
    if sum(n_chunks) != C:
        raise ValueError(f"n_ctx_chunks sums to {sum(n_chunks)} but {C} chunk LoRAs were given")
    G = len(n_chunks)
    dev = chunk_loras[mods[0]]["A"].device
    beta = 1.0 if bias_scaler is None else float(bias_scaler)
    # row order: for doc g: its chunk rows, then bias rows (index C*r + g*r ...)
    rows, offs, c0 = [], [0], 0
    for g, n in enumerate(n_chunks):
        rows.extend(range(c0 * r, (c0 + n) * r))
        if bias is not None:
            rows.extend(range(C * r + g * r, C * r + (g + 1) * r))
        c0 += n
        offs.append(len(rows))
    idx = torch.tensor(rows, dtype=torch.long, device=dev)
    if not math.isfinite(beta):
        raise ValueError(f"bias_scaler must be finite, got {bias_scaler}")
    sc = None
    if scalers is not None:
        sc = torch.as_tensor(scalers, dtype=torch.float32, device=dev).flatten()
        if sc.numel() not in (1, C):
            raise ValueError(f"scalers must have 1 or n_chunks_total={C} entries, got {sc.numel()}")
        bad = (~torch.isfinite(sc)).nonzero().flatten().tolist()
        if bad:
            chunk_doc = [g for g, n in enumerate(n_chunks) for _ in range(n)]
            where = "every chunk" if sc.numel() == 1 else ", ".join(
                f"chunk {c} (document #{chunk_doc[c]})" for c in bad[:8])
            raise ValueError(f"scalers must be finite: got {sc[bad[0]].item()} for {where}")
        sc = sc.expand(C) if sc.numel() == 1 else sc
    A, B = {}, {}
    for m in mods:
        a = chunk_loras[m]["A"]
        b = chunk_loras[m]["B"]
        if sc is not None:
            a = a * sc.to(a.dtype)[:, None, None, None]
        a = a.transpose(0, 1).reshape(L, C * r, -1)
        b = b.transpose(0, 1).reshape(L, C * r, -1)
        if bias is not None:
            ba = (beta * bias[m]["A"]).to(a.dtype)
            bb = (beta * bias[m]["B"]).to(b.dtype)
            a = torch.cat([a, ba.repeat(1, G, 1)], 1)
            b = torch.cat([b, bb.repeat(1, G, 1)], 1)
        A[m] = a.index_select(1, idx)
        B[m] = b.index_select(1, idx)
    return AdapterBatch(A, B, offs, alpha, model_id, names)


class BatchCache:
    """One value derived from an adapter batch (a cast or compacted copy), kept only while that batch is alive.

    The batch is held by a weak reference: once its owner drops it, the entry (and everything it holds, e.g. the
    copy and the batch's tensors in ``key``) is dropped with it, so a cache never keeps a large batch of finished
    requests in memory. ``key`` is whatever the caller checks before reusing ``value``."""

    def __init__(self):
        self._entry: tuple | None = None  # (weak reference to the source batch, key, value)

    def get(self, source: AdapterBatch) -> tuple | None:
        """``(key, value)`` stored for ``source`` (the same object), or None."""
        e = self._entry
        return (e[1], e[2]) if e is not None and e[0]() is source else None

    def put(self, source: AdapterBatch, key, value) -> None:
        if not isinstance(source, AdapterBatch):
            raise TypeError(f"source must be an AdapterBatch, got {type(source).__name__}")
        self._entry = (weakref.ref(source, self._dropped), key, value)

    def _dropped(self, ref) -> None:
        e = self._entry
        if e is not None and e[0] is ref:
            self._entry = None

    def clear(self) -> None:
        self._entry = None

    def __bool__(self) -> bool:
        return self._entry is not None


__all__ = ["AdapterBatch", "BatchCache", "as_index_list", "merge_chunk_loras"]
