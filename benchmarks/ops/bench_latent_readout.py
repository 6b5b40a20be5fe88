"""Benchmark of the latent cross-attention readout (one Perceiver cross-attention block).

Run: pytest benchmarks/ops/bench_latent_readout.py --benchmark-only --benchmark-json out.json

Providers
  materialized       the reference way (d2l_fast latent_readout_ref, fp32): K/V projected for every token,
                     K/V repeated 4 -> 16 heads, one attention per segment in a Python loop
  d2l_fast           latent_readout(mode="auto") on this device's backend (torch on CPU)
  d2l_fast_absorbed  latent_readout(mode="absorbed")
  d2l_fast_plain     latent_readout(mode="plain")
  triton             latent_readout(backend="triton", mode="auto"); needs CUDA (skipped otherwise)

One block is timed; the Perceiver runs 9 such blocks over the same context (extra_info["blocks"]),
so the per-encoder cost is 9x. The d2l_fast providers get the context rstd precomputed (it is shared
by the 9 blocks, see latent_readout's ctx_rstd).
"""
from __future__ import annotations

import math
import platform

import pytest
import torch

from d2l_fast.kernels.latent_readout import (
    ReadoutProblem,
    compute_rstd,
    latent_readout,
    latent_readout_ref,
    readout_macs,
)
from d2l_fast.kernels.latent_readout.function import resolve_mode
from d2l_fast.profiling.shapes import READOUT_MAIN, READOUT_NIAH

try:
    import triton

    TRITON_VERSION = triton.__version__
except ImportError:  # pragma: no cover
    TRITON_VERSION = None


def _sizes(r) -> dict:
    return dict(n_q=r.n_q, H=r.n_heads, n_kv=r.n_kv_heads, hd=r.head_dim, D=r.d_model)


GEMMA = _sizes(READOUT_MAIN)  # the main hypernetwork config (on Gemma-2-2b)
CASES = {
    # Gemma-2-2b, layer-to-layer: 26 layers x one 2000-token document -> 26 segments
    "gemma2b_l2l_26x2000": dict(lens=[2000] * 26, **GEMMA),
    # Gemma-2-2b, 26 layers x 4 chunks of ragged length (100..1000) -> 104 segments
    "gemma2b_l2l_26x4_ragged": dict(lens="ragged", n_layers=26, n_chunks=4, lo=100, hi=1000, **GEMMA),
    # SmolLM2-135M scale: 30 layers x 300 tokens
    "smollm2_l2l_30x300": dict(lens=[300] * 30, **GEMMA),
    # the 1-block decoder: 26 layers x 4 chunks, each attends to its 8 encoder latents
    "gemma2b_decoder_104x8": dict(lens=[8] * 104, **GEMMA),
    # NIAH config: 208 latents (auto must choose the plain form)
    "niah208_26x500": dict(lens=[500] * 26, **_sizes(READOUT_NIAH)),
}
PROVIDERS = ["materialized", "d2l_fast", "d2l_fast_absorbed", "d2l_fast_plain", "triton"]


def _lens(spec):
    if spec["lens"] != "ragged":
        return spec["lens"]
    g = torch.Generator().manual_seed(0)
    n = spec["n_layers"] * spec["n_chunks"]
    return torch.randint(spec["lo"], spec["hi"] + 1, (n,), generator=g).tolist()


_CACHE: dict = {}


def _problem(case: str, device: str):
    key = (case, device)
    if key in _CACHE:
        return _CACHE[key]
    _CACHE.clear()
    spec = CASES[case]
    lens = _lens(spec)
    g = torch.Generator().manual_seed(0)
    n_q, H, n_kv, hd, D = spec["n_q"], spec["H"], spec["n_kv"], spec["hd"], spec["D"]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    p = dict(
        q=torch.randn(len(lens), n_q, H, hd, generator=g),
        ctx=torch.randn(sum(lens), D, generator=g),
        cu_seqlens=cu,
        max_seqlen=max(lens),
        k_weight=torch.randn(n_kv * hd, D, generator=g) / math.sqrt(D),
        v_weight=torch.randn(n_kv * hd, D, generator=g) / math.sqrt(D),
        ctx_norm_weight=1 + 0.1 * torch.randn(D, generator=g),
        n_kv_heads=n_kv,
    )
    p = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    p["ctx_rstd"] = compute_rstd(p["ctx"], 1e-6)
    prob = ReadoutProblem(len(lens), n_q, H, n_kv, hd, D, sum(lens), max(lens))
    _CACHE[key] = (p, prob, lens)
    return _CACHE[key]


def _fn(provider: str, p: dict):
    args = (p["q"], p["ctx"], p["cu_seqlens"])
    w = (p["k_weight"], p["v_weight"], p["ctx_norm_weight"])
    if provider == "materialized":
        return lambda: latent_readout_ref(*args, *w, n_kv_heads=p["n_kv_heads"], upcast=False)
    mode = {"d2l_fast_absorbed": "absorbed", "d2l_fast_plain": "plain"}.get(provider, "auto")
    backend = "triton" if provider == "triton" else "auto"
    return lambda: latent_readout(
        *args, p["max_seqlen"], *w, n_kv_heads=p["n_kv_heads"], mode=mode, backend=backend, ctx_rstd=p["ctx_rstd"]
    )


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.benchmark(group="latent_readout")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_bench_latent_readout(benchmark, case, provider):
    if provider == "triton" and not torch.cuda.is_available():
        pytest.skip("the triton provider needs CUDA")
    device = "cuda" if provider == "triton" else "cpu"
    p, prob, lens = _problem(case, device)
    fn = _fn(provider, p)
    with torch.no_grad():
        # correctness gate before timing: every provider against the materialized path (fp32)
        if provider != "materialized":
            ref = latent_readout_ref(
                p["q"], p["ctx"], p["cu_seqlens"], p["k_weight"], p["v_weight"], p["ctx_norm_weight"],
                n_kv_heads=p["n_kv_heads"], upcast=False,
            )  # fmt: skip
            out = fn()
            torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-3)

        def run():
            fn()
            _sync(device)

        benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    macs = readout_macs(prob)
    mode = "materialized" if provider == "materialized" else {
        "d2l_fast_absorbed": "absorbed", "d2l_fast_plain": "plain"
    }.get(provider) or resolve_mode("auto", p["q"], p["ctx"], p["n_kv_heads"])
    flops = 2 * (macs["plain"] if mode in ("plain", "materialized") else macs["absorbed"])
    mean_s = benchmark.stats.stats.mean if benchmark.stats else float("nan")
    benchmark.extra_info.update(
        case=case,
        provider=provider,
        mode=mode,
        n_seg=prob.n_seg,
        total_tokens=prob.total_tokens,
        max_seqlen=prob.max_seqlen,
        n_q=prob.n_q,
        n_heads=prob.n_heads,
        n_kv_heads=prob.n_kv_heads,
        head_dim=prob.head_dim,
        d_model=prob.d_model,
        dtype="float32",
        blocks=9,
        flops=flops,
        flops_absorbed=2 * macs["absorbed"],
        flops_plain=2 * macs["plain"],
        gflops_per_s=flops / mean_s / 1e9,
        per_encoder_ms=9 * mean_s * 1e3,
        device=torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        torch_version=torch.__version__,
        triton_version=TRITON_VERSION,
    )


# ------------------------------------------------------------------------------------------ GPU suite section
# scripts/gpu_suite.py's "readout" section: (config, layers, tokens per layer); the Gemma-2-2b main config and NIAH
# over one 2000-token document (one segment per layer), and the main config over 16 chunks of 128 tokens per layer
SUITE_CASES = {"main-26x2000": (READOUT_MAIN, 26, 2000), "niah-26x2000": (READOUT_NIAH, 26, 2000),
               "main-416x128": (READOUT_MAIN, 26 * 16, 128)}  # fmt: skip
# config overrides timed next to pick_config's choice on the main case (so one run says which split wins)
_ALT_CONFIGS = {"ctx-split2-fullD": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_DK=512, BLOCK_DV=512, n_splits=1,
                                         split_len=1024, num_warps=8, num_stages=2),
                "ctx-split5-fullD": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_DK=512, BLOCK_DV=512, n_splits=1,
                                         split_len=448, num_warps=8, num_stages=2)}  # fmt: skip


def _suite_problem(r, layers, T, dt):
    g = torch.Generator().manual_seed(0)
    n_q, H, n_kv, hd, D = r.n_q, r.n_heads, r.n_kv_heads, r.head_dim, r.d_model
    cu = torch.arange(layers + 1, dtype=torch.int32).mul_(T).to("cuda")
    return dict(q=torch.randn(layers, n_q, H, hd, generator=g).to("cuda", dt),
                ctx=(torch.randn(layers * T, D, generator=g) * 3).to("cuda", dt), cu=cu,
                wk=(torch.randn(n_kv * hd, D, generator=g) / D**0.5).to("cuda", dt),
                wv=(torch.randn(n_kv * hd, D, generator=g) / D**0.5).to("cuda", dt),
                w=(1 + 0.2 * torch.randn(D, generator=g)).to("cuda", dt), n_kv=n_kv)  # fmt: skip


def _bound(prob, mode, us, env):
    """FLOPs and minimum bytes of the form that runs, their rates, and the roofline bound it is held to."""
    macs = readout_macs(prob)
    flops = 2 * macs[mode]
    R, e = prob.n_q * prob.n_heads, 2
    if mode == "absorbed":  # context once (rstd on the fly), queries in, output out
        min_bytes = prob.total_tokens * prob.d_model * e + prob.n_seg * R * prob.head_dim * e * 2
    else:  # context once for the projection, K/V written and read once, queries in, output out
        kv = prob.total_tokens * 2 * prob.n_kv_heads * prob.head_dim * e
        min_bytes = prob.total_tokens * prob.d_model * e + 2 * kv + prob.n_seg * R * prob.head_dim * e * 2
    tflops, gbps = flops / us / 1e6, min_bytes / us / 1e3
    peak, bw = env.get("bf16_matmul_TFLOPs"), env.get("copy_GBps")
    out = dict(mode=mode, flops=flops, min_bytes=min_bytes, TFLOPs=tflops, GBps=gbps)
    if peak and bw:
        t_compute, t_memory = flops / (peak * 1e6), min_bytes / (bw * 1e3)  # us at the card's measured ceilings
        out.update(frac_peak=tflops / peak, frac_copy_bw=gbps / bw, bound="compute" if t_compute >= t_memory
                   else "memory", pct_of_bound=100 * max(t_compute, t_memory) / us)  # fmt: skip
    return out


def suite_rows(time_us, graph_us, spin, env, old):
    """Rows of the GPU suite's readout section. Per case: the rewritten kernel (the public op, rstd computed on the
    device, as the 817 us baseline was called), the pre-rewrite kernel ``old`` in the same form (scripts/gpu_suite.py
    passes benchmarks/ops/readout_v1.py's ``latent_readout_v1``), both with ctx_rstd given, alternative configs, the
    materialised reference and projection + SDPA; CUDA-event times, CUDA-graph times of new and old, relative
    errors vs the fp32 reference, % of the applicable bound."""
    for cname, (r, layers, T) in SUITE_CASES.items():
        yield from _suite_case(cname, r, layers, T, time_us, graph_us, spin, env, old)


def _suite_case(cname, r, layers, T, time_us, graph_us, spin, env, latent_readout_v1):
    """One case of :func:`suite_rows` (a function, so the providers' closures bind this case's tensors)."""
    import torch.nn.functional as F

    from d2l_fast.kernels.latent_readout.configs import KernelConfig
    from d2l_fast.kernels.latent_readout.launch import latent_readout_triton_fwd

    dt = torch.bfloat16
    p = _suite_problem(r, layers, T, dt)
    q, ctx, cu, wk, wv, w, n_kv = (p[k] for k in ("q", "ctx", "cu", "wk", "wv", "w", "n_kv"))
    prob = ReadoutProblem(layers, r.n_q, r.n_heads, n_kv, r.head_dim, r.d_model, layers * T, T)
    mode = resolve_mode("auto", q, ctx, n_kv)
    rstd = compute_rstd(ctx, 1e-6)
    args = (q, ctx, cu, T, wk, wv, w)
    with torch.no_grad():
        ref = latent_readout_ref(q.float(), ctx.float(), cu, wk.float(), wv.float(), w.float(), n_kv_heads=n_kv)

    def sdpa():
        c = ctx.float()
        c = (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt) * w
        k = (c @ wk.T).view(layers, T, n_kv, -1).transpose(1, 2)
        v = (c @ wv.T).view(layers, T, n_kv, -1).transpose(1, 2)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=True).transpose(1, 2)

    provs = {
        "new": lambda: latent_readout(*args, n_kv_heads=n_kv, backend="triton"),
        "old": lambda: latent_readout_v1(*args, n_kv_heads=n_kv, mode=mode),
        "new_rstd_given": lambda: latent_readout(*args, n_kv_heads=n_kv, backend="triton", ctx_rstd=rstd),
        "old_rstd_given": lambda: latent_readout_v1(*args, n_kv_heads=n_kv, mode=mode, ctx_rstd=rstd),
        "reference_materialised": lambda: latent_readout_ref(q, ctx, cu, wk, wv, w, n_kv_heads=n_kv),
        "projection_sdpa": sdpa,
    }
    if cname == "main-26x2000":
        for alt, kw in _ALT_CONFIGS.items():
            cfg = KernelConfig(**dict(kw, n_splits=-(-T // kw["split_len"])))
            provs[f"new_{alt}"] = lambda cfg=cfg: latent_readout_triton_fwd(
                q, ctx, cu, T, wk, wv, w, None, n_kv_heads=n_kv, scale=r.head_dim**-0.5, mode=mode, cfg=cfg)
    spin()
    times = {}
    for prov, fn in provs.items():
        with torch.no_grad():
            y = fn()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            times[prov] = t = time_us(fn, reps=10)
            gus = graph_us(fn) if prov in ("new", "old") else None
        yield dict(section="readout", case=cname, provider=prov, us=t, graph_us=gus, rel_err=err,
                   **_bound(prob, mode, t, env))  # fmt: skip
    yield dict(section="readout_summary", case=cname, mode=mode, new_us=times["new"], old_us=times["old"],
               speedup=times["old"] / times["new"], **_bound(prob, mode, times["new"], env))  # fmt: skip
    del p, ref
    torch.cuda.empty_cache()
