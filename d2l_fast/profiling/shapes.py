"""The model shapes the kernels are measured and compiled at: one definition for the CPU benchmarks
(``benchmarks/ops/``), the GPU suite (``scripts/gpu_suite.py``) and the compile report (:mod:`.compile_report`).

* :data:`MODEL_SHAPES` — the published base models D2L targets, by hidden and intermediate width. D2L puts its
  LoRA on ``mlp.down_proj``, so the segmented-LoRA op runs at ``d_in = intermediate``, ``d_out = hidden``.
* :data:`READOUT_MAIN` / :data:`READOUT_NIAH` — the Perceiver readout of the main hypernetwork config (latent 512,
  16 heads x 128, 4 KV heads) with 8 queries per segment, and the NIAH config's 208.
* :func:`lora_cases` — the batches the segmented-LoRA benchmarks time at every model's ``down_proj``: a prefill of
  16 documents with mixed ranks, 64 decode rows with 64 distinct adapters and with 4 shared ones (and, on the GPU,
  8 decode rows of one long document's rank 1032).

Plain data: this module itself imports only the standard library.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """One base model's widths. ``lora_label`` names its ``down_proj`` in benchmark case ids (kept stable so
    results files stay comparable); ``tag`` is its one-letter column tag in the compile report's tables."""

    name: str
    hidden: int
    intermediate: int
    lora_label: str
    tag: str

    @property
    def down_proj(self) -> tuple[int, int]:
        """``(d_in, d_out)`` of ``mlp.down_proj``: ``(intermediate, hidden)``."""
        return self.intermediate, self.hidden


MODEL_SHAPES: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("smollm2-135m", 576, 1536, "smollm2-down", "S"),
    ModelShape("gemma-2-2b", 2304, 9216, "gemma2-2b-down", "G"),
    ModelShape("qwen3-4b", 2560, 9728, "qwen3-4b-down", "Q"),
    ModelShape("mistral-7b", 4096, 14336, "mistral-7b-down", "M"),
)}

#: ``down_proj`` ``(d_in, d_out)`` by benchmark label ("gemma2-2b-down", ...)
LORA_SHAPES: dict[str, tuple[int, int]] = {m.lora_label: m.down_proj for m in MODEL_SHAPES.values()}


@dataclass(frozen=True)
class ReadoutShape:
    """The Perceiver readout's sizes: queries per segment, attention heads, head width, KV heads, latent width."""

    n_q: int
    n_heads: int
    head_dim: int
    n_kv_heads: int
    d_model: int


READOUT_MAIN = ReadoutShape(n_q=8, n_heads=16, head_dim=128, n_kv_heads=4, d_model=512)
READOUT_NIAH = ReadoutShape(n_q=208, n_heads=16, head_dim=128, n_kv_heads=4, d_model=512)

# the standard batches: a prefill of PREFILL_DOCS documents of PREFILL_TOKENS tokens, DECODE_ROWS decode rows
PREFILL_DOCS = 16
PREFILL_TOKENS = 256
DECODE_ROWS = 64
PREFILL_RANKS = (16, 24, 32, 48, 64, 72)  # mixed prefill ranks, drawn per document with a fixed seed
DECODE_RANK = 16
LONG_DOC_RANK = 1032  # the merged rank of a ~128-chunk document
LONG_DECODE_ROWS = 8
# the fused MLP LoRA batch: PREFILL_DOCS documents of PREFILL_TOKENS tokens, ranks 8..72 in turn (both ends present)
MLP_RANKS = (8, 16, 24, 32, 48, 64, 72)


def mlp_seg_ranks(n_docs: int = PREFILL_DOCS) -> tuple[int, ...]:
    """One adapter rank per document of the fused-MLP benchmark batch: :data:`MLP_RANKS` in turn."""
    if not isinstance(n_docs, int) or n_docs < 0:
        raise ValueError(f"n_docs must be an int >= 0, got {n_docs!r}")
    return tuple(MLP_RANKS[i % len(MLP_RANKS)] for i in range(n_docs))


def mlp_activation(model: str) -> str:
    """The gated MLP's activation of a :data:`MODEL_SHAPES` model: GELU-tanh for Gemma, SiLU otherwise."""
    if model not in MODEL_SHAPES:
        raise ValueError(f"unknown model {model!r}; expected one of {list(MODEL_SHAPES)}")
    return "gelu_tanh" if model.startswith("gemma") else "silu"



@dataclass(frozen=True)
class LoraCase:
    """One segmented-LoRA batch at one model's ``down_proj``: segment lengths, the adapter of each segment, and
    each adapter's rank. ``kind`` is "prefill", "decode-distinct", "decode-shared", "decode-long" (all rows on one
    rank-1032 adapter) or "decode-long-distinct"."""

    name: str  # e.g. "prefill16x256/gemma2-2b-down"
    kind: str
    shape: str  # a LORA_SHAPES label
    d_in: int
    d_out: int
    seq_lens: tuple[int, ...]
    seg_adapter: tuple[int, ...]
    ranks: tuple[int, ...]  # per adapter
    scale: float = 2.0


def lora_cases(shapes=None, *, prefill_tokens: dict[str, int] | None = None,
               long_decode: bool = False) -> list[LoraCase]:
    """The benchmark batches for each ``down_proj`` in :data:`LORA_SHAPES` (or only the labels in ``shapes``).

    ``prefill_tokens``: tokens per prefill document by label, to shrink the prefill where one base GEMM would be
    too slow (the CPU benchmarks); those prefill cases are named ``prefill/<label>``. Without it every document has
    :data:`PREFILL_TOKENS` tokens and the case is ``prefill16x256/<label>``. ``long_decode`` adds the two decode
    batches of :data:`LONG_DECODE_ROWS` rows at rank :data:`LONG_DOC_RANK`. The ranks and the shared-adapter order
    are drawn from ``random.Random(0)`` per shape, so every caller gets the same batches.
    """
    if shapes is not None:
        unknown = sorted(set(shapes) - set(LORA_SHAPES))
        if unknown:
            raise ValueError(f"unknown shape label(s) {unknown}; expected some of {list(LORA_SHAPES)}")
    if prefill_tokens is not None:
        missing = sorted(set(shapes or LORA_SHAPES) - set(prefill_tokens))
        if missing or not all(isinstance(v, int) and v > 0 for v in prefill_tokens.values()):
            raise ValueError(f"prefill_tokens must give a positive int for every shape, missing {missing}, got "
                             f"{prefill_tokens!r}")
    out = []
    for shape, (d_in, d_out) in LORA_SHAPES.items():
        if shapes is not None and shape not in shapes:
            continue
        rng = random.Random(0)
        ranks = tuple(rng.choice(PREFILL_RANKS) for _ in range(PREFILL_DOCS))
        if prefill_tokens is None:
            n_tok, label = PREFILL_TOKENS, f"prefill{PREFILL_DOCS}x{PREFILL_TOKENS}"
        else:
            n_tok, label = prefill_tokens[shape], "prefill"
        shared = [i % 4 for i in range(DECODE_ROWS)]
        rng.shuffle(shared)
        batches = [
            (label, "prefill", (n_tok,) * PREFILL_DOCS, tuple(range(PREFILL_DOCS)), ranks),
            (f"decode{DECODE_ROWS}-distinct", "decode-distinct", (1,) * DECODE_ROWS, tuple(range(DECODE_ROWS)),
             (DECODE_RANK,) * DECODE_ROWS),
            (f"decode{DECODE_ROWS}-shared4", "decode-shared", (1,) * DECODE_ROWS, tuple(shared), (DECODE_RANK,) * 4),
        ]
        if long_decode:
            n = LONG_DECODE_ROWS
            batches += [
                (f"decode{n}-rank{LONG_DOC_RANK}", "decode-long", (1,) * n, (0,) * n, (LONG_DOC_RANK,)),
                (f"decode{n}-distinct-r{LONG_DOC_RANK}", "decode-long-distinct", (1,) * n, tuple(range(n)),
                 (LONG_DOC_RANK,) * n),
            ]
        for name, kind, seq_lens, seg_adapter, rs in batches:
            out.append(LoraCase(f"{name}/{shape}", kind, shape, d_in, d_out, seq_lens, seg_adapter, rs))
    return out


__all__ = ["DECODE_RANK", "DECODE_ROWS", "LONG_DECODE_ROWS", "LONG_DOC_RANK", "LORA_SHAPES", "LoraCase",
           "MLP_RANKS", "MODEL_SHAPES", "ModelShape", "mlp_activation", "mlp_seg_ranks", "PREFILL_DOCS",
           "PREFILL_RANKS", "PREFILL_TOKENS", "READOUT_MAIN", "READOUT_NIAH", "ReadoutShape", "lora_cases"]
