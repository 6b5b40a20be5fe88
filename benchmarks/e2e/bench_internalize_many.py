"""Internalising several hundred short documents in ONE call on the real SmolLM2-135M-Instruct (issue 7, item 0).

    python -m pytest benchmarks/e2e/bench_internalize_many.py --benchmark-only -q

SmolLM2 has 30 layers and the layer-to-layer encoder, so one call with C chunks runs the Perceiver on 30·C
segments: 400 documents are 12,000 segments, far past the Perceiver MLP's row blocks (``SwiGLU.block_rows``)
and the encoder's token budget (``D2LModel.encode_token_budget``) — the sizes at which 35 documents used to
crash. The hypernetwork is ``D2LModel.from_base(base, tok, seed=0, latent_size=64, num_blocks=2)`` (fp32);
``D2L_BENCH_MANY_DOCS`` sets the number of documents (default 400), ``D2L_BENCH_FULL=1`` uses the main
hypernetwork config (latent 512, 9 blocks) instead.

Documents are short text notes (8-40 words, seeded). One timed round (no warm-up round: the first call is
the one a user makes). Untimed, afterwards: a sample of documents (first, last, and one per 50) is
internalised alone and must equal its row of the batched call (atol 2e-5, rtol 1e-4: the suite's BATCHING
tolerance), so a wrong-but-fast batched path cannot pass. On the shared 2-core CPU box (load ~4) 400 documents
(17.6k context tokens, 12,000 Perceiver segments) took ~260 s, 6x faster than one call per document; the run
with the sample check ~5 min.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

N_DOCS = int(os.environ.get("D2L_BENCH_MANY_DOCS", "400"))
FULL = os.environ.get("D2L_BENCH_FULL", "") == "1"
CFG = {} if FULL else dict(latent_size=64, num_blocks=2)
_WORDS = ("the keeper of the north lighthouse logged every ship that passed the reef in a green ledger while "
          "the harbour council argued about lantern oil tariffs and the price of rope in winter").split()


def _docs(n: int) -> list[str]:
    rng = random.Random(0)
    return [f"Note {i}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 40))) + "." for i in range(n)]


@pytest.fixture(scope="module")
def smol_model():
    from d2l_fast import D2LModel
    from d2l_fast.demo import load_smollm2

    base, tok = load_smollm2()
    with torch.no_grad():  # library initialisation outside the timing
        base(input_ids=torch.ones(1, 8, dtype=torch.long))
    return D2LModel.from_base(base, tok, seed=0, **CFG)


def test_internalize_hundreds_of_docs_one_call(benchmark, env_info, smol_model):
    model = smol_model
    docs = _docs(N_DOCS)
    packed = model.pack(docs)
    out = benchmark.pedantic(lambda: model.internalize(docs), rounds=1, warmup_rounds=0, iterations=1)
    mean = benchmark.stats.stats.mean
    assert len(out) == N_DOCS
    sample = sorted({0, N_DOCS - 1, *range(0, N_DOCS, 50)})
    t = time.perf_counter()
    max_err = 0.0
    for i in sample:
        alone = model.internalize([docs[i]])
        assert alone.ranks == out[i].ranks
        for m in alone.modules:
            for got, want in ((out[i].A[m], alone.A[m]), (out[i].B[m], alone.B[m])):
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
                max_err = max(max_err, float((got - want).abs().max()))
    one_s = (time.perf_counter() - t) / len(sample)
    benchmark.extra_info.update(
        env_info, n_docs=N_DOCS, n_chunks=len(packed.chunks), ctx_tokens=packed.total_tokens,
        perceiver_segments=model.spec.num_layers * len(packed.chunks), docs_per_s=round(N_DOCS / mean, 2),
        one_at_a_time_s_per_doc=round(one_s, 4), speedup_vs_one_at_a_time=round(one_s * N_DOCS / mean, 2),
        sample_checked=len(sample), sample_max_abs_err=max_err,
        hypernet=dict(latent_size=model.spec.latent_size, num_blocks=model.spec.num_blocks), dtype="float32",
    )
