"""Named shape sets for the benchmarks (model-derived layer sizes)."""

from __future__ import annotations

from dataclasses import dataclass

# down_proj of each model: (d_in, d_out) = (intermediate_size, hidden_size)
LORA_SHAPES: dict[str, tuple[int, int]] = {
    "smollm2-down": (1536, 576),
    "gemma2-2b-down": (9216, 2304),
    "qwen3-4b-down": (9728, 2560),
    "mistral-7b-down": (14336, 4096),
}

# prefill tokens per document: 16 documents x 256 tokens is the spec; on the 2-core CPU the big shapes are
# shrunk so one base GEMM stays under ~1 s (the LoRA part scales the same way; ratios vs base are what matter)
PREFILL_DOCS = 16
PREFILL_TOKENS_PER_DOC = {
    "smollm2-down": 256,
    "gemma2-2b-down": 64,
    "qwen3-4b-down": 64,
    "mistral-7b-down": 32,
}
PREFILL_RANKS = (16, 24, 32, 48, 64, 72)  # mixed ranks, drawn per document with a fixed seed

DECODE_ROWS = 64
DECODE_RANK = 16


@dataclass(frozen=True)
class LoraCase:
    name: str  # e.g. "prefill/gemma2-2b-down"
    kind: str  # "prefill" | "decode-distinct" | "decode-shared"
    shape: str
    d_in: int
    d_out: int
    seq_lens: tuple[int, ...]
    seg_adapter: tuple[int, ...]
    ranks: tuple[int, ...]  # per adapter
    scale: float = 2.0


def lora_cases(shapes=None) -> list[LoraCase]:
    import random

    out = []
    for shape, (d_in, d_out) in LORA_SHAPES.items():
        if shapes and shape not in shapes:
            continue
        rng = random.Random(0)
        ranks = tuple(rng.choice(PREFILL_RANKS) for _ in range(PREFILL_DOCS))
        L = PREFILL_TOKENS_PER_DOC[shape]
        out.append(
            LoraCase(
                f"prefill/{shape}", "prefill", shape, d_in, d_out,
                (L,) * PREFILL_DOCS, tuple(range(PREFILL_DOCS)), ranks,
            )  # fmt: skip
        )
        out.append(
            LoraCase(
                f"decode64-distinct/{shape}", "decode-distinct", shape, d_in, d_out,
                (1,) * DECODE_ROWS, tuple(range(DECODE_ROWS)), (DECODE_RANK,) * DECODE_ROWS,
            )
        )  # fmt: skip
        shared = [i % 4 for i in range(DECODE_ROWS)]
        rng.shuffle(shared)
        out.append(
            LoraCase(
                f"decode64-shared4/{shape}", "decode-shared", shape, d_in, d_out,
                (1,) * DECODE_ROWS, tuple(shared), (DECODE_RANK,) * 4,
            )
        )  # fmt: skip
    return out
