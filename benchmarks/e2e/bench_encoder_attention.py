"""Internalisation against the bare forward of the same tokens through the same early-exit layers (issue 18, item 1).

    PYTHONPATH=$PWD python scripts/gpu_suite.py --only env,internalize     # on a GPU: the ``internalize`` section
    PYTHONPATH=$PWD python -m benchmarks.e2e.bench_encoder_attention [--out F.json]   # CPU: SmolLM2 + small Gemma-2

For each encoder attention backend (``blocked``: per-chunk SDPA / eager soft-capped softmax, today's path; ``flex``:
one FlexAttention call per layer, :mod:`d2l_fast.flex`) the same run times

* ``bare``: the base model's decoder over the packed row(s), truncated to the layers the context encoder keeps
  (the final norm included), nothing captured, no hypernetwork — the floor;
* ``encode``: the encoder pass with every feature map streamed through the hypernetwork's modality projection
  (what ``internalize`` runs before the Perceiver);
* ``internalize``: ``model.internalize(docs)`` end to end (adapters out);

for one 2,000-token document and for 64 documents of 256 tokens (tokens/s), and reports ``internalize / bare``
(target on the Gemma-2-2b-shaped bf16 model: <= 1.5 with the bare forward on the flex backend). Also: the analytic
FLOPs of the bare forward and of the modality projection (which alone runs a 3-matrix SwiGLU over every kept layer's
features, so it is part of the floor too), and the flex-vs-blocked differences of the features and adapters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

from d2l_fast import varlen
from d2l_fast.hf import decoder_of

BACKENDS = ("blocked", "flex")


@contextlib.contextmanager
def kept_layers(model, k: int):
    """Within the block the decoder of ``model`` has its first ``k`` layers only (its final norm still runs)."""
    dec = decoder_of(model)
    full = dec.layers
    dec.layers = nn.ModuleList(list(full)[:k])
    try:
        yield dec
    finally:
        dec.layers = full


def bare_forward(model, docs: list[list[int]], k: int, backend: str, token_budget: int = 8192):
    """``fn()`` running the first ``k`` decoder layers over ``docs`` packed as the encoder packs them (rows of at most
    ``token_budget`` tokens, each document attending to itself through ``backend``); nothing is kept."""
    from d2l_fast.encoder import SCORES_PER_BUDGET_TOKEN, _budget_rows

    dev = next(model.parameters()).device
    lens = [len(d) for d in docs]
    rows = []
    for i, j in _budget_rows(lens, token_budget):
        ids = torch.tensor([t for d in docs[i:j] for t in d], device=dev).unsqueeze(0)
        pos = torch.cat([torch.arange(n) for n in lens[i:j]]).unsqueeze(0).to(dev)
        rows.append((lens[i:j], ids, pos))

    @torch.no_grad()
    def fn():
        with kept_layers(model, k) as dec:
            for ls, ids, pos in rows:
                with varlen.packed_attention(model, ls, dev, SCORES_PER_BUDGET_TOKEN * token_budget, backend=backend):
                    dec(input_ids=ids, position_ids=pos, use_cache=False)

    return fn


def flops(model, d2l, n_tokens: int, doc_len: int) -> dict:
    """Analytic GEMM FLOPs (2·m·n·k) of the bare truncated forward (projections, MLP, causal attention within
    documents of ``doc_len``) and of the modality projection over every kept feature map."""
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    H, kvh, d, f = c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size
    k = d2l.ctx_encoder.n_kept
    proj = d * hd * (2 * H + 2 * kvh) + 3 * d * f
    attn = 2 * H * hd * doc_len / 2  # QK^T and PV, causal half, per query token
    bare = 2 * n_tokens * k * (proj + attn)
    mp = d2l.hypernet.perceiver.modality_projection
    mp_flops = 2 * n_tokens * d2l.ctx_encoder.n_features * (2 * mp.gate_proj.in_features * mp.gate_proj.out_features
                                                            + mp.down_proj.in_features * mp.down_proj.out_features)
    return dict(bare_GFLOP=bare / 1e9, modality_projection_GFLOP=mp_flops / 1e9, projection_vs_bare=mp_flops / bare)


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def agreement(d2l, docs) -> dict:
    """Relative Frobenius differences flex vs blocked: encoder features and the adapters' A and B."""
    enc = d2l.ctx_encoder
    chunks = d2l.pack(docs).chunks
    feats = {b: enc.encode_packed(chunks, attention=b) for b in BACKENDS}
    ads = {}
    for b in BACKENDS:
        enc.attention = b
        ads[b] = d2l.internalize(docs)
    enc.attention = "auto"
    m = next(iter(ads["flex"].A))
    return dict(features_rel=_rel(feats["flex"], feats["blocked"]),
                A_rel=_rel(ads["flex"].A[m], ads["blocked"].A[m]), B_rel=_rel(ads["flex"].B[m], ads["blocked"].B[m]))


def case_rows(d2l, case: str, docs, time_us, reps: int):
    """Rows for one case: per backend the bare / encode / internalize times, then the ratios."""
    enc, dtype = d2l.ctx_encoder, d2l.hypernet.head.weight.dtype
    proj = d2l.hypernet.perceiver.modality_projection
    chunks = d2l.pack(docs).chunks
    n_tok = sum(len(c) for c in chunks)
    times = {}
    for b in BACKENDS:
        enc.attention = b
        fns = {"bare": bare_forward(d2l.base_model, chunks, enc.n_kept, b, d2l.encode_token_budget),
               "encode": lambda: enc.encode_packed(chunks, token_budget=d2l.encode_token_budget, dtype=dtype,
                                                   transform=proj),
               "internalize": lambda: d2l.internalize(docs)}
        for what, fn in fns.items():
            with torch.no_grad():
                us = time_us(fn, reps=reps)
            times[(b, what)] = us
            yield dict(section="internalize", case=case, attention=b, step=what, ms=us / 1e3,
                       tokens_per_s=n_tok / (us / 1e6))
    enc.attention = "auto"
    floor = times[("flex", "bare")]
    yield dict(section="internalize_summary", case=case, n_tokens=n_tok, n_docs=len(docs),
               today_vs_bare=times[("blocked", "internalize")] / floor,
               flex_vs_bare=times[("flex", "internalize")] / floor,
               flex_encode_vs_bare=times[("flex", "encode")] / floor,
               bare_blocked_vs_bare_flex=times[("blocked", "bare")] / floor,
               flex_speedup=times[("blocked", "internalize")] / times[("flex", "internalize")],
               target_met=times[("flex", "internalize")] <= 1.5 * floor,
               peak_mem_GiB=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
               **flops(d2l.base_model, d2l, n_tok, n_tok // len(docs)))


def suite_rows(d2l, time_us, profile=None, reps: int = 10, bos: int = 2, vocab: int | None = None):
    """The rows of scripts/gpu_suite.py's ``internalize`` section (``time_us(fn, reps)``: CUDA-event median;
    ``profile(label, fn)``: records the top kernels of one call itself)."""
    vocab = vocab or d2l.vocab_size
    g = torch.Generator().manual_seed(1)
    one = [[bos] + torch.randint(10, vocab, (1999,), generator=g).tolist()]
    many = [[bos] + torch.randint(10, vocab, (255,), generator=g).tolist() for _ in range(64)]
    t = time.time()
    d2l.ctx_encoder.attention = "flex"
    d2l.internalize(one)
    d2l.internalize(many)  # first compiles of the flex kernel (then shape-generic)
    d2l.ctx_encoder.attention = "auto"
    yield dict(section="internalize", step="warmup_compile", seconds=time.time() - t,
               torch=torch.__version__, flex_broken=list(varlen._flex_broken))
    yield dict(section="internalize", case="agreement_1doc_2k", **agreement(d2l, one))
    yield from case_rows(d2l, "1doc_2k", one, time_us, reps)
    if profile is not None:
        for b in BACKENDS:
            d2l.ctx_encoder.attention = b
            profile(f"internalize_1doc_2k_{b}", lambda: d2l.internalize(one))
        d2l.ctx_encoder.attention = "auto"
    yield from case_rows(d2l, "64docs_256", many, time_us, max(3, reps // 3))


# ----------------------------------------------------------------------------------------------------- CPU run
def wall_time_us(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median wall-clock us of ``fn()`` (CPU)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e6)
    return statistics.median(ts)


def _small_gemma2(dtype):
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64,
                       sliding_window=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager").eval()


def cpu_main(argv=None) -> int:
    from d2l_fast import D2LModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--models", default="gemma2-small,smollm2")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=2000, help="tokens of the one document")
    a = ap.parse_args(argv)
    # eager flex off CUDA is torch's unfused reference (and refuses rows above the score bound): compile it here
    os.environ.setdefault("D2L_FLEX_COMPILE", "1")
    dtype = getattr(torch, a.dtype)
    rows = [dict(section="env", torch=torch.__version__, threads=torch.get_num_threads(), dtype=a.dtype,
                 flex_compile=os.environ["D2L_FLEX_COMPILE"])]
    for name in a.models.split(","):
        if name == "smollm2":
            from d2l_fast.demo import load_smollm2

            base, _ = load_smollm2(dtype=dtype)
        elif name == "gemma2-small":
            base = _small_gemma2(dtype)
        else:
            raise ValueError(f"--models: expected gemma2-small and/or smollm2, got {name!r}")
        d2l = D2LModel.from_base(base, None, seed=0, hypernet_dtype=dtype, latent_size=64, num_blocks=2,
                                 init_scaler_B=6.0)
        g = torch.Generator().manual_seed(1)
        docs = [[2] + torch.randint(10, 4000, (a.tokens - 1,), generator=g).tolist()]
        d2l.ctx_encoder.attention = "flex"
        d2l.internalize(docs)  # first-call overheads outside the timing
        for row in (dict(section="internalize", case=f"agreement_1doc_{a.tokens}", **agreement(d2l, docs)),
                    *case_rows(d2l, f"1doc_{a.tokens}", docs, wall_time_us, a.reps)):
            row["model"] = name
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(cpu_main())
