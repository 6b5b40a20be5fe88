"""Per-batch segment metadata for the segmented multi-LoRA op.

One :class:`SegmentMeta` is built once per batch (on the host, from Python lists) and reused by every
LoRA layer of the model. It carries

* device tensors the kernels read (``cu_seqlens``, ``seg_rank_start``, ``seg_rank_len`` and the
  per-adapter CSR used by the weight-gradient kernel),
* Python ints (``n_tokens``, ``max_seqlen``, ``max_rank``) so launchers never sync,
* host-side grouping (merged token runs, unique adapters with their token runs) for the CPU path,
* a small cache for derived, per-(device, block size) data: Triton tile tables and CPU gather indices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["SegmentMeta", "AdapterGroup"]


@dataclass(frozen=True)
class AdapterGroup:
    """All tokens that use one adapter (one rank range ``[rank_start, rank_start + rank_len)``).

    ``runs`` are maximal contiguous token ranges ``(tok_start, tok_end)``; ``segments`` the segment ids.
    """

    rank_start: int
    rank_len: int
    runs: tuple[tuple[int, int], ...]
    segments: tuple[int, ...]
    n_tokens: int


def _as_int_list(name: str, values) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        values = values.tolist()
    try:
        out = [int(v) for v in values]
    except TypeError as e:
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}") from e
    for v, orig in zip(out, values):
        if v != orig:
            raise ValueError(f"{name} must contain integers, got {orig!r}")
    return out


@dataclass(frozen=True, eq=False)
class SegmentMeta:
    """Segments of a packed token batch and the adapter rank range each segment uses.

    Token ``t`` of segment ``s`` gets ``scale * (x[t] @ A[rs:rs+rl].T) @ B[rs:rs+rl]`` with
    ``rs = seg_rank_start[s]`` and ``rl = seg_rank_len[s]`` (``rl == 0``: no adapter).

    Example::

        # two documents of 4 and 6 tokens; adapter 0 has rank 8, adapter 1 rank 16
        meta = SegmentMeta.from_lengths([4, 6], seg_adapter=[1, 0], adapter_rank_offsets=[0, 8, 24], device="cpu")
        meta.cu_seqlens      # tensor([0, 4, 10], dtype=torch.int32)
        meta.seg_rank_start  # tensor([8, 0], dtype=torch.int32)
        meta.seg_rank_len    # tensor([16, 8], dtype=torch.int32)
        meta.n_tokens, meta.max_seqlen, meta.max_rank  # (10, 6, 16)

        # a padded HF batch x: [3, S, d_in] where row i uses adapter row_adapter[i] (decode: S == 1)
        meta = SegmentMeta.uniform(3, S, row_adapter=[0, -1, 0], adapter_rank_offsets=[0, 8, 24], device="cpu")

    Build it once per batch; all layers reuse it. Fields ending in ``_host`` are Python tuples.
    """

    # device tensors (int32)
    cu_seqlens: torch.Tensor
    seg_rank_start: torch.Tensor
    seg_rank_len: torch.Tensor
    # python ints: launchers never sync
    n_tokens: int
    max_seqlen: int
    max_rank: int
    # host copies
    cu_seqlens_host: tuple[int, ...]
    rank_start_host: tuple[int, ...]
    rank_len_host: tuple[int, ...]
    # maximal contiguous token runs with one adapter: (tok_start, tok_end, rank_start, rank_len), rank_len > 0
    runs: tuple[tuple[int, int, int, int], ...]
    # one entry per distinct rank range in use
    groups: tuple[AdapterGroup, ...]
    # per-adapter CSR over segments for the weight-gradient kernel (device, int32)
    adapter_rank_start: torch.Tensor
    adapter_rank_len: torch.Tensor
    adapter_seg_ptr: torch.Tensor
    adapter_seg_ids: torch.Tensor
    # derived data (tile tables, CPU gather indices), filled lazily
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_segments(self) -> int:
        return len(self.rank_len_host)

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lengths(
        cls,
        seq_lens: Sequence[int],
        seg_adapter: Sequence[int],
        adapter_rank_offsets: Sequence[int],
        device: torch.device | str | None = None,
    ) -> "SegmentMeta":
        """Build from segment lengths and one adapter index (or -1) per segment.

        Args:
            seq_lens: tokens per segment, ``>= 0`` (empty segments allowed).
            seg_adapter: adapter index per segment in ``[0, n_adapters)``, or ``-1`` for no adapter.
            adapter_rank_offsets: ``[n_adapters + 1]`` cumulative ranks into the ragged ``A``/``B``
                (adapter ``i`` owns rank rows ``[offsets[i], offsets[i + 1])``).
            device: where the kernel-side tensors live.
        """
        seq_lens = _as_int_list("seq_lens", seq_lens)
        seg_adapter = _as_int_list("seg_adapter", seg_adapter)
        offsets = _as_int_list("adapter_rank_offsets", adapter_rank_offsets)
        if len(seg_adapter) != len(seq_lens):
            raise ValueError(
                f"seg_adapter must have one entry per segment: expected {len(seq_lens)}, got {len(seg_adapter)}"
            )
        if len(offsets) < 1:
            raise ValueError("adapter_rank_offsets must have n_adapters + 1 >= 1 entries, got 0")
        if offsets[0] < 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"adapter_rank_offsets must be non-negative and non-decreasing, got {offsets}")
        n_adapters = len(offsets) - 1
        rank_start, rank_len = [], []
        for i, a in enumerate(seg_adapter):
            if a == -1:
                rank_start.append(0)
                rank_len.append(0)
            elif 0 <= a < n_adapters:
                rank_start.append(offsets[a])
                rank_len.append(offsets[a + 1] - offsets[a])
            else:
                raise ValueError(f"seg_adapter[{i}] must be -1 or in [0, {n_adapters}), got {a}")
        return cls.from_rank_ranges(seq_lens, rank_start, rank_len, device)

    @classmethod
    def uniform(
        cls,
        n_rows: int,
        seq_len: int,
        row_adapter: Sequence[int],
        adapter_rank_offsets: Sequence[int],
        device: torch.device | str | None = None,
    ) -> "SegmentMeta":
        """Padded ``[n_rows, seq_len, d]`` batch where every row uses one adapter (decode: ``seq_len == 1``)."""
        if not isinstance(n_rows, int) or n_rows < 0:
            raise ValueError(f"n_rows must be an int >= 0, got {n_rows!r}")
        if not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(f"seq_len must be an int >= 0, got {seq_len!r}")
        row_adapter = _as_int_list("row_adapter", row_adapter)
        if len(row_adapter) != n_rows:
            raise ValueError(f"row_adapter must have n_rows entries: expected {n_rows}, got {len(row_adapter)}")
        return cls.from_lengths([seq_len] * n_rows, row_adapter, adapter_rank_offsets, device)

    @classmethod
    def from_rank_ranges(
        cls,
        seq_lens: Sequence[int],
        seg_rank_start: Sequence[int],
        seg_rank_len: Sequence[int],
        device: torch.device | str | None = None,
    ) -> "SegmentMeta":
        """Build from explicit per-segment rank ranges (``seg_rank_len == 0``: no adapter).

        Distinct rank ranges must not partially overlap (segments either share a range exactly or use
        disjoint ones), so per-adapter weight gradients are well defined.
        """
        seq_lens = _as_int_list("seq_lens", seq_lens)
        rank_start = _as_int_list("seg_rank_start", seg_rank_start)
        rank_len = _as_int_list("seg_rank_len", seg_rank_len)
        n_seg = len(seq_lens)
        if len(rank_start) != n_seg or len(rank_len) != n_seg:
            raise ValueError(
                f"seg_rank_start/seg_rank_len must have one entry per segment: expected {n_seg}, "
                f"got {len(rank_start)}/{len(rank_len)}"
            )
        for name, vals in (("seq_lens", seq_lens), ("seg_rank_start", rank_start), ("seg_rank_len", rank_len)):
            bad = [v for v in vals if v < 0]
            if bad:
                raise ValueError(f"{name} must be >= 0, got {bad[0]}")
        # no adapter: normalise the start so equal "none" segments compare equal
        rank_start = [rs if rl > 0 else 0 for rs, rl in zip(rank_start, rank_len)]
        cu = [0]
        for n in seq_lens:
            cu.append(cu[-1] + n)
        if cu[-1] >= 2**31:
            raise ValueError(f"total tokens must fit int32, got {cu[-1]}")

        # merged token runs and unique adapters
        runs: list[tuple[int, int, int, int]] = []
        group_runs: dict[tuple[int, int], list[tuple[int, int]]] = {}
        group_segs: dict[tuple[int, int], list[int]] = {}
        for s in range(n_seg):
            t0, t1, rs, rl = cu[s], cu[s + 1], rank_start[s], rank_len[s]
            if rl == 0:
                continue
            key = (rs, rl)
            group_segs.setdefault(key, []).append(s)
            if t1 == t0:
                continue
            if runs and runs[-1][1] == t0 and runs[-1][2:] == key:
                runs[-1] = (runs[-1][0], t1, rs, rl)
            else:
                runs.append((t0, t1, rs, rl))
            gr = group_runs.setdefault(key, [])
            if gr and gr[-1][1] == t0:
                gr[-1] = (gr[-1][0], t1)
            else:
                gr.append((t0, t1))
        keys = sorted(group_segs)
        for (rs0, rl0), (rs1, rl1) in zip(keys, keys[1:]):
            if rs1 < rs0 + rl0:
                raise ValueError(
                    f"rank ranges must be identical or disjoint, got [{rs0}, {rs0 + rl0}) and [{rs1}, {rs1 + rl1})"
                )
        groups = tuple(
            AdapterGroup(
                rank_start=k[0],
                rank_len=k[1],
                runs=tuple(group_runs.get(k, ())),
                segments=tuple(group_segs[k]),
                n_tokens=sum(t1 - t0 for t0, t1 in group_runs.get(k, ())),
            )
            for k in keys
        )
        seg_ptr = [0]
        seg_ids: list[int] = []
        for g in groups:
            seg_ids.extend(g.segments)
            seg_ptr.append(len(seg_ids))

        dev = torch.device(device) if device is not None else torch.device("cpu")

        def i32(v):
            return torch.tensor(v, dtype=torch.int32).to(dev, non_blocking=True)

        return cls(
            cu_seqlens=i32(cu),
            seg_rank_start=i32(rank_start),
            seg_rank_len=i32(rank_len),
            n_tokens=cu[-1],
            max_seqlen=max(seq_lens, default=0),
            max_rank=max(rank_len, default=0),
            cu_seqlens_host=tuple(cu),
            rank_start_host=tuple(rank_start),
            rank_len_host=tuple(rank_len),
            runs=tuple(runs),
            groups=groups,
            adapter_rank_start=i32([g.rank_start for g in groups]),
            adapter_rank_len=i32([g.rank_len for g in groups]),
            adapter_seg_ptr=i32(seg_ptr),
            adapter_seg_ids=i32(seg_ids),
        )

    def to(self, device: torch.device | str) -> "SegmentMeta":
        """The same metadata with its kernel-side tensors on ``device`` (derived caches are not copied)."""
        dev = torch.device(device)
        tensors = {
            f.name: getattr(self, f.name).to(dev)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, _cache={}, **tensors)

    # ------------------------------------------------------------------ derived data
    def tiles(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile table for row tiles of ``block_m`` tokens that never straddle segments.

        Returns ``(tile_seg, tile_row_start)`` int32 device tensors; only segments with an adapter and
        at least one token get tiles, so the Triton grid is exact.
        """
        key = ("tiles", block_m)
        hit = self._cache.get(key)
        if hit is None:
            seg, row = [], []
            cu = self.cu_seqlens_host
            for s, rl in enumerate(self.rank_len_host):
                if rl == 0:
                    continue
                for r in range(cu[s], cu[s + 1], block_m):
                    seg.append(s)
                    row.append(r)
            dev = self.device
            hit = (
                torch.tensor(seg, dtype=torch.int32).to(dev, non_blocking=True),
                torch.tensor(row, dtype=torch.int32).to(dev, non_blocking=True),
            )
            self._cache[key] = hit
        return hit

    def cached(self, key, build):
        """Memoise ``build()`` under ``key`` for the lifetime of this batch (used by the CPU path)."""
        hit = self._cache.get(key)
        if hit is None:
            hit = build()
            self._cache[key] = hit
        return hit
