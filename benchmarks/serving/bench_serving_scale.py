"""Serving at scale on the CPU: many rows, each with its own adapter out of thousands resident in one AdapterBatch.

    python -m pytest benchmarks/serving/bench_serving_scale.py --benchmark-only --benchmark-json /tmp/scale.json -q

The real SmolLM2-135M-Instruct in fp32 (``d2l_fast.demo.load_smollm2()``), LoRA on ``down_proj`` of all 30
layers (1536 -> 576). ``n_resident`` random rank-16 adapters are built straight into one :class:`AdapterBatch`
(no hypernetwork: a pool of N(0, 1/d_in) rows for A and N(0, s²) rows for B, each layer a different permutation
of the pool, so every (adapter, layer) is distinct memory; s makes ||alpha·Aᵀ B|| 5 % of ||W_down||, about what
the e2e suite's hypernetwork emits). The batch: ``rows`` rows with distinct random adapter indices, one common
prompt of 16 tokens (no padding).

Group ``serving_scale`` (cases ``128rows_of_2000``, the target, and ``64rows_of_1000``): decode steps timed
directly (``base_model(next_token, past_key_values=cache)``, greedy), ``DECODE_STEPS`` per provider, the
providers interleaved step by step (bare, d2l, d2l_scattered, bare, ... rotated every step) so that the load of
the shared machine hits all alike. Providers:
    bare           the base model, no adapter bound
    d2l            ``model.bind(adapters, adapter_index)`` (the default: on CPU the rows' adapters are copied
                   once, at bind, into a compact batch in row order; each step reads them contiguously)
    d2l_scattered  the same with ``model.compact_adapters = False`` (each step reads the rows' adapters where
                   they sit among the resident ones: the path before compaction)
The batch is checked for NaN/inf once after it is built (``validate_s``; ``AdapterBatch.load`` and
``internalize`` do the same; the verdict stays cached on the batch). Each provider is prefilled once (timed, not
part of the decode numbers) with its binding entered before; the bind time (the compaction, once per call) is
in ``bind_s``. Reported per provider: median step time, decode tokens/s (rows / step), the ratio to bare
(sum of bare step times / sum of the provider's) and the median of the per-step paired ratios;
``ratio_with_bind`` charges the bind to the decode steps of this run; ``cpu_ratio_vs_bare`` is the same ratio
of this thread's CPU time (blind to time slices lost to other processes; with more than one thread it counts only
the calling thread). ``greedy_tokens_equal_compact_vs_scattered`` checks (and the test asserts) that the compact
and scattered bindings decode the same tokens.

Group ``serving_scale_layer`` (one down_proj layer, 128 rows out of 2,000, one thread): each way to apply the
LoRA at a decode step, timed interleaved with the bare Linear, its time alone (``lora_us``) and
base / (base + lora), and its largest error vs an fp64 reference (relative to the largest delta):
    scattered_auto   segmented_lora on the resident tensors, strategy by the cost model (per-row runs here;
                     ``dense`` and ``bmm`` are ruled out: the used rank span is the whole batch)
    scattered_grouped  the same, strategy ``grouped`` (per adapter: gather its rows, two mm, index_add)
    gather_bmm       per step: index_select of the rows' A/B into preallocated buffers, then two bmm
    gather_bmm_bf16  the same from bf16-resident tensors, upcast after the gather
    ebag_fp32        gather-free: expand by embedding_bag over B, shrink by embedding_bag over A stored
                     transposed per adapter ([d_in, r] rows; a layout copy of A)
    ebag_bf16        the same with bf16 tables (torch returns bf16 sums: the delta is rounded to bf16)
    compact_fp32     what the d2l binding runs per step after compaction: the rows' adapters contiguous, the
                     identity bmm (x·Aᵀ, then baddbmm into the output)
    compact_einsum   the same with einsum
    compact_bf16     compact bf16 adapters, x cast to bf16, bmm in bf16 (AMX/AVX512-BF16 where present)
    compact_fp16     the same in fp16
``bind_us_per_layer`` times the compaction of one layer (index_select of the used rank rows + cast to fp32) from
fp32, bf16 and fp16 resident tensors: the one-off cost per call; resident bf16/fp16 halve the memory of the
resident batch (the compact copy is fp32 either way, so the decode steps do not change).

Threads: ``D2L_SCALE_THREADS`` (default 1; the 2-core box is shared with CPU-heavy jobs, and 2 OpenMP threads
then stall at every barrier: decode steps 3-5x longer than with one thread were seen). ``D2L_SCALE_STEPS`` (default
24) decode steps per provider. Load average and other processes' CPU use (``other_cores``) are recorded.
Memory: the 2,000-adapter batch is 8.1 GB in fp32; with less than 1.25x that available it is built in bf16 and
``d2l_scattered`` is skipped (it would cast the whole batch to fp32). ``D2L_SCALE_RESIDENT=bfloat16`` (or
``float16`` / ``float32``) forces the resident dtype.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from .._common import CpuMonitor, mem_available_bytes

GROUP = "serving_scale"
GROUP_LAYER = "serving_scale_layer"
RANK = 16
PROMPT_LEN = 16
THREADS = int(os.environ.get("D2L_SCALE_THREADS", "1"))
DECODE_STEPS = int(os.environ.get("D2L_SCALE_STEPS", "24"))
DELTA_FRACTION = 0.05  # ||alpha · A_kᵀ B_k|| / ||W_down|| per layer
CASES = {"128rows_of_2000": (2000, 128), "64rows_of_1000": (1000, 64)}
GOAL = "goal: d2l >= 0.9x bare decode tokens/s at 128 rows out of 2,000 resident rank-16 adapters"
PROMPT_TEXT = ("The committee met on a rainy Tuesday to review the harbour project, its budget and the schedule "
               "for the new pier, and then agreed on the next steps.")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scale_model():
    from d2l_fast import D2LModel
    from d2l_fast.demo import load_smollm2

    base, tok = load_smollm2()
    model = D2LModel.from_base(base, tok, seed=0, latent_size=64, num_blocks=2)  # hypernet unused: small
    ids = tok(PROMPT_TEXT)["input_ids"][:PROMPT_LEN]
    assert len(ids) == PROMPT_LEN
    with torch.no_grad():
        base(input_ids=torch.tensor([ids]))  # library initialisation outside timing
    return model, ids


def _b_scale(model) -> float:
    """Std of B's entries for which ||alpha · Aᵀ B||_F ≈ DELTA_FRACTION · ||W_down||_F (A entries of var 1/d_in)."""
    spec = model.spec
    d_out = spec.d_out["down_proj"]
    norms = [float(m.mlp.down_proj.weight.norm()) for m in model.base_model.model.layers]
    return DELTA_FRACTION * statistics.mean(norms) / (spec.lora_alpha * (RANK * d_out) ** 0.5)


def random_adapters(model, n: int, dtype=torch.float32, seed: int = 0):
    """``n`` rank-16 adapters for every layer of ``model`` in one AdapterBatch (see the module docstring)."""
    from d2l_fast import AdapterBatch

    spec = model.spec
    L, d_in, d_out = spec.num_layers, spec.d_in["down_proj"], spec.d_out["down_proj"]
    g = torch.Generator().manual_seed(seed)
    R = n * RANK
    pool_a = (torch.randn(R, d_in, generator=g) * d_in**-0.5).to(dtype)
    pool_b = (torch.randn(R, d_out, generator=g) * _b_scale(model)).to(dtype)
    A = torch.empty(L, R, d_in, dtype=dtype)
    B = torch.empty(L, R, d_out, dtype=dtype)
    for layer in range(L):
        perm = torch.randperm(R, generator=g)
        torch.index_select(pool_a, 0, perm, out=A[layer])
        torch.index_select(pool_b, 0, perm, out=B[layer])
    return AdapterBatch({"down_proj": A}, {"down_proj": B}, list(range(0, R + 1, RANK)), spec.lora_alpha,
                        model.model_id)


class _Stream:
    """One provider's decode: its binding, KV cache, next tokens and step times."""

    def __init__(self, name, binding, bind_s):
        self.name, self.binding, self.bind_s = name, binding, bind_s
        self.cache = self.next = None
        self.steps: list[float] = []
        self.cpu: list[float] = []  # this thread's CPU time per step (the torch work runs here with 1 thread)
        self.tokens: list[torch.Tensor] = []
        self.prefill_s = 0.0


def _step(model, ctx, s: _Stream, ids=None) -> None:
    from transformers import DynamicCache

    with torch.no_grad(), ctx.bound(s.binding):
        if ids is not None:
            s.cache = DynamicCache(config=model.base_model.config)
            out = model.base_model(input_ids=ids, past_key_values=s.cache, use_cache=True, logits_to_keep=1)
        else:
            out = model.base_model(input_ids=s.next, past_key_values=s.cache, use_cache=True)
        s.next = out.logits[:, -1].argmax(-1, keepdim=True)
    s.tokens.append(s.next)


def _bind(model, adapters, index, compact: bool):
    """Enter and leave ``model.bind`` once: the binding object stays valid (it holds the compact adapters)."""
    prev = model.compact_adapters
    model.compact_adapters = compact
    try:
        t = time.perf_counter()
        with model.bind(adapters, index) as binding:
            pass
        return binding, time.perf_counter() - t
    finally:
        model.compact_adapters = prev


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("case", list(CASES))
def test_serving_scale(benchmark, env_info, scale_model, threads, case):
    from d2l_fast.patching import patch_model

    model, prompt = scale_model
    n_resident, rows = CASES[case]
    t = time.perf_counter()
    fp32_bytes = 4 * n_resident * RANK * (model.spec.d_in["down_proj"] + model.spec.d_out["down_proj"]) * \
        model.spec.num_layers
    avail = mem_available_bytes()
    dtype = torch.float32 if avail is None or avail > 1.25 * fp32_bytes else torch.bfloat16
    dtype = getattr(torch, os.environ.get("D2L_SCALE_RESIDENT", str(dtype).split(".")[-1]))
    adapters = random_adapters(model, n_resident, dtype)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    adapters.check_finite()  # once, as AdapterBatch.load and internalize do (the verdict is cached on the batch)
    validate_s = time.perf_counter() - t
    index = torch.randperm(n_resident, generator=torch.Generator().manual_seed(1))[:rows].tolist()
    ctx = patch_model(model.base_model, model.spec.target_modules)  # the model's binding context (idempotent)

    streams = [_Stream("bare", None, 0.0), _Stream("d2l", *_bind(model, adapters, index, True))]
    if dtype == model.base_dtype:
        streams.append(_Stream("d2l_scattered", *_bind(model, adapters, index, False)))
    ids = torch.tensor([prompt] * rows)
    for s in streams:
        t = time.perf_counter()
        _step(model, ctx, s, ids)
        s.prefill_s = time.perf_counter() - t

    mon = CpuMonitor()
    load0 = os.getloadavg()[0]

    def decode():
        for i in range(DECODE_STEPS):
            order = streams[i % len(streams):] + streams[: i % len(streams)]
            for s in order:
                t0, c0 = time.perf_counter(), time.thread_time()
                _step(model, ctx, s)
                s.steps.append(time.perf_counter() - t0)
                s.cpu.append(time.thread_time() - c0)

    mon.start()
    benchmark.pedantic(decode, rounds=1, iterations=1, warmup_rounds=0)
    mon.stop()

    bare = streams[0].steps
    per = {}
    for s in streams:
        med = statistics.median(s.steps)
        per[s.name] = dict(
            step_ms_median=round(med * 1e3, 2), step_ms_mean=round(statistics.mean(s.steps) * 1e3, 2),
            tokens_per_s=round(rows / statistics.mean(s.steps), 2),
            ratio_vs_bare=round(sum(bare) / sum(s.steps), 4),
            ratio_paired_median=round(statistics.median(b / x for b, x in zip(bare, s.steps)), 4),
            ratio_with_bind=round(sum(bare) / (sum(s.steps) + s.bind_s), 4),
            cpu_ratio_vs_bare=round(sum(streams[0].cpu) / sum(s.cpu), 4),
            bind_s=round(s.bind_s, 4), prefill_s=round(s.prefill_s, 3))
    toks = {s.name: torch.cat(s.tokens, 1) for s in streams}
    equal = bool(torch.equal(toks["d2l"], toks["d2l_scattered"])) if "d2l_scattered" in toks else None
    benchmark.extra_info.update(
        case=case, goal=GOAL, n_resident=n_resident, rows=rows, rank=RANK, distinct_adapters=rows,
        prompt_len=PROMPT_LEN, decode_steps=DECODE_STEPS, resident_dtype=str(dtype).split(".")[-1],
        resident_gb=round(sum(t.numel() * t.element_size() for d in (adapters.A, adapters.B)
                              for t in d.values()) / 2**30, 2),
        adapter_bytes_per_step_mb=round(rows * RANK * (model.spec.d_in["down_proj"] + model.spec.d_out["down_proj"])
                                        * 4 * model.spec.num_layers / 2**20, 1),
        build_s=round(build_s, 2), validate_s=round(validate_s, 3), providers=per,
        ratio_d2l=per["d2l"]["ratio_vs_bare"], ratio_d2l_scattered=per.get("d2l_scattered", {}).get("ratio_vs_bare"),
        rows_changed_vs_bare=int((toks["d2l"] != toks["bare"]).any(1).sum()),
        greedy_tokens_equal_compact_vs_scattered=equal,
        other_cores=mon.other_cores, loadavg_1m_before=round(load0, 2), loadavg_1m_after=round(os.getloadavg()[0], 2),
        loadavg=[round(x, 2) for x in os.getloadavg()], dtype="float32", **env_info, threads_used=THREADS,
    )
    del adapters
    if equal is not None:
        assert equal, "compact and scattered bindings decoded different greedy tokens"


# ------------------------------------------------------------------------------------------------ one layer
def _layer_choices(n: int, rows: int, d_in: int, d_out: int, seed: int = 0):
    """(base, {choice: fn}, reference delta, bind fns): each fn adds the LoRA delta into ``out``."""
    from d2l_fast.kernels.segmented_lora import SegmentMeta
    from d2l_fast.kernels.segmented_lora.torch_impl import segmented_lora_cpu_

    g = torch.Generator().manual_seed(seed)
    r = RANK
    A = torch.randn(n * r, d_in, generator=g) * d_in**-0.5
    B = torch.randn(n * r, d_out, generator=g) * 0.01
    W = torch.randn(d_out, d_in, generator=g) * d_in**-0.5
    x = torch.randn(rows, d_in, generator=g)
    idx = torch.randperm(n, generator=g)[:rows]
    scale = 2.0
    A3, B3 = A.view(n, r, d_in), B.view(n, r, d_out)
    A3b, B3b, A3h, B3h = A3.bfloat16(), B3.bfloat16(), A3.half(), B3.half()
    meta = SegmentMeta.uniform(rows, 1, idx.tolist(), list(range(0, n * r + 1, r)))
    rank_rows = (idx[:, None] * r + torch.arange(r)).flatten()
    bufA, bufB = torch.empty(rows, r, d_in), torch.empty(rows, r, d_out)
    bufAb, bufBb = torch.empty(rows, r, d_in, dtype=torch.bfloat16), torch.empty(rows, r, d_out, dtype=torch.bfloat16)
    AT = A3.transpose(1, 2).contiguous().view(n * d_in, r)  # layout copy: per adapter [d_in, r]
    ATb, Bb = AT.bfloat16(), B.bfloat16()
    ia = (idx[:, None] * d_in + torch.arange(d_in)).flatten()
    oa, ob = torch.arange(rows) * d_in, torch.arange(rows) * r
    ca, cb = A3[idx].contiguous(), B3[idx].contiguous()  # what compaction leaves (bind time, not per step)
    cab, cbb, cah, cbh = ca.bfloat16(), cb.bfloat16(), ca.half(), cb.half()
    x64 = x.double()
    ref = torch.bmm(torch.bmm(x64.unsqueeze(1), A3.double()[idx].transpose(1, 2)), B3.double()[idx]).squeeze(1) * scale

    def base(out):
        torch.mm(x, W.t(), out=out)

    def scattered_auto(out):
        segmented_lora_cpu_(out, x, A, B, meta, scale)

    def scattered_grouped(out):
        segmented_lora_cpu_(out, x, A, B, meta, scale, strategy="grouped")

    def gather_bmm(out):
        torch.index_select(A3, 0, idx, out=bufA)
        torch.index_select(B3, 0, idx, out=bufB)
        out.unsqueeze(1).baddbmm_(torch.bmm(x.unsqueeze(1), bufA.transpose(1, 2)), bufB, alpha=scale)

    def gather_bmm_bf16(out):
        torch.index_select(A3b, 0, idx, out=bufAb)
        torch.index_select(B3b, 0, idx, out=bufBb)
        bufA.copy_(bufAb)
        bufB.copy_(bufBb)
        out.unsqueeze(1).baddbmm_(torch.bmm(x.unsqueeze(1), bufA.transpose(1, 2)), bufB, alpha=scale)

    def ebag_fp32(out):
        h = F.embedding_bag(ia, AT, oa, mode="sum", per_sample_weights=x.reshape(-1))
        out.add_(F.embedding_bag(rank_rows, B, ob, mode="sum", per_sample_weights=h.reshape(-1)), alpha=scale)

    def ebag_bf16(out):
        h = F.embedding_bag(ia, ATb, oa, mode="sum", per_sample_weights=x.reshape(-1).bfloat16())
        out.add_(F.embedding_bag(rank_rows, Bb, ob, mode="sum", per_sample_weights=h.reshape(-1)), alpha=scale)

    def compact_fp32(out):
        out.unsqueeze(1).baddbmm_(torch.bmm(x.unsqueeze(1), ca.transpose(1, 2)), cb, alpha=scale)

    def compact_einsum(out):
        out.add_(torch.einsum("tr,tro->to", torch.einsum("td,trd->tr", x, ca), cb), alpha=scale)

    def compact_bf16(out):
        h = torch.bmm(x.bfloat16().unsqueeze(1), cab.transpose(1, 2))
        out.add_(torch.bmm(h, cbb).squeeze(1), alpha=scale)

    def compact_fp16(out):
        h = torch.bmm(x.half().unsqueeze(1), cah.transpose(1, 2))
        out.add_(torch.bmm(h, cbh).squeeze(1), alpha=scale)

    choices = dict(scattered_auto=scattered_auto, scattered_grouped=scattered_grouped, gather_bmm=gather_bmm,
                   gather_bmm_bf16=gather_bmm_bf16, ebag_fp32=ebag_fp32, ebag_bf16=ebag_bf16,
                   compact_fp32=compact_fp32, compact_einsum=compact_einsum, compact_bf16=compact_bf16,
                   compact_fp16=compact_fp16)
    binds = {name: (lambda a=a, b=b: (a.index_select(0, idx).float(), b.index_select(0, idx).float()))
             for name, (a, b) in dict(fp32=(A3, B3), bf16=(A3b, B3b), fp16=(A3h, B3h)).items()}
    return base, choices, ref, binds, meta


@pytest.mark.benchmark(group=GROUP_LAYER)
def test_serving_scale_layer(benchmark, env_info, threads):
    from d2l_fast.kernels.segmented_lora.torch_impl import choose_strategy

    n, rows, d_in, d_out = 2000, 128, 1536, 576
    base, choices, ref, binds, meta = _layer_choices(n, rows, d_in, d_out)
    out = torch.zeros(rows, d_out)
    errs = {}
    for name, fn in choices.items():  # correctness, and warm-up
        out.zero_()
        fn(out)
        errs[name] = float((out.double() - ref).abs().max() / ref.abs().max())
    times: dict[str, list[float]] = {name: [] for name in ("base", *choices)}
    bind_times: dict[str, list[float]] = {name: [] for name in binds}
    mon = CpuMonitor()
    load0 = os.getloadavg()[0]

    def one_round():
        for name, fn in (("base", base), *choices.items()):
            t0 = time.perf_counter()
            fn(out)
            times[name].append(time.perf_counter() - t0)
        for name, fn in binds.items():
            t0 = time.perf_counter()
            fn()
            bind_times[name].append(time.perf_counter() - t0)

    mon.start()
    benchmark.pedantic(one_round, rounds=15, iterations=1, warmup_rounds=1)
    mon.stop()
    b = statistics.median(times["base"])
    per = {}
    for name in choices:
        lora = statistics.median(times[name])
        per[name] = dict(lora_us=round(lora * 1e6, 1), layer_ratio=round(b / (b + lora), 4),
                         rel_err=float(f"{errs[name]:.3g}"))
    benchmark.extra_info.update(
        case=f"layer_{rows}rows_of_{n}", n_resident=n, rows=rows, rank=RANK, d_in=d_in, d_out=d_out,
        base_us=round(b * 1e6, 1), choices=per, scattered_auto_strategy=choose_strategy(meta, d_in, d_out),
        bind_us_per_layer={k: round(statistics.median(v) * 1e6, 1) for k, v in bind_times.items()},
        other_cores=mon.other_cores, loadavg_1m_before=round(load0, 2), loadavg_1m_after=round(os.getloadavg()[0], 2),
        **env_info, threads_used=THREADS,
    )
    assert errs["compact_fp32"] < 1e-5 and errs["scattered_auto"] < 1e-5
