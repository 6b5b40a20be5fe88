"""All GPU checks in one run: CUDA tests, kernel benchmarks against same-device baselines, end to end.

    PYTHONPATH=$PWD python scripts/gpu_suite.py --out /tmp/gpu            # ~7 min on an H100 (budget 420 s; <= 8)
    python scripts/bench_report.py /tmp/gpu/gpu_suite.json                       # markdown tables

Runs from a checkout with the machine's own torch/triton/transformers/peft (nothing is installed). Sections,
each time-guarded so a slow one cannot starve the rest, each writing into gpu_suite.json as it finishes:

  env       versions, device, SMs; measured ceilings: device-to-device copy GB/s (bytes read + written) and a
            bf16 8192^3 matmul TFLOP/s, so every rate below is also given as a fraction of what this card did
  tests     pytest tests/kernels (no interpreter: every Triton variant compiled for this GPU, incl.
            test_cuda_kernels.py at real shapes in bf16/fp16/tf32/ieee) and the rest of tests/ (gpu-marked included)
  lora      segmented LoRA at the down_proj shapes of SmolLM2 / Gemma-2-2b / Qwen3-4B / Mistral-7B, bf16:
            prefill 16 docs x 256 tokens with mixed ranks, decode 64 rows x 64 distinct adapters, decode 64 rows
            x 4 shared adapters, decode 8 rows of one long document (rank 1032). Providers on the same device:
            base (F.linear), d2l_fast (F.linear + segmented_lora_), lora_only (segmented_lora_ into a buffer),
            cublas_loop (per-adapter matmuls), peft (PEFT's mixed-adapter batch). CUDA-event times (median of
            reps), CUDA-graph replay time for lora_only, host us per call, GB/s and TFLOP/s vs the ceilings.
  mlp       a whole gated MLP (16 docs x 256 tokens, bf16, Gemma-2-2b / Qwen3-4B / Mistral-7B) with LoRA on
            down_proj, ranks 8..72: bare vs fused (gated_lora) vs unfused, plus the pieces (benchmarks/ops/
            bench_fused_mlp.py); target fused <= 1.10x bare
  readout   the Perceiver readout at the Gemma-2-2b main config (26 layers x 2000 tokens, 8 queries, 16 heads
            x 128, 4 KV heads, latent 512), NIAH (208 queries) and 416 x 128 tokens: the rewritten kernel (new)
            vs the pre-rewrite one (old, benchmarks/ops/readout_v1.py), alternative split configs, the
            materialised reference, projection + SDPA; % of the bound that applies (benchmarks/ops/
            bench_latent_readout.py suite_rows)
  internalize  a random Gemma-2-2b-shaped model in bf16, main hypernet config: one 2k-token document and 64
            documents x 256 tokens, encoder attention blocked (per chunk, eager soft-capped softmax) vs flex
            (FlexAttention, compiled) vs the bare forward through the same early-exit layers, same run; ratios,
            FLOPs, flex-vs-blocked agreement, kernel profiles (benchmarks/e2e/bench_encoder_attention.py)
  e2e       the same model: 64 rows each with its own adapter, 32 greedy tokens: base vs d2l_fast vs PEFT
            (64 adapters on every down_proj)
  decode    the serving engine's decode on the same model: 64 requests, 64 distinct adapters, 64 greedy tokens;
            dynamic (HF DynamicCache) vs static eager vs static + CUDA graphs, each also without adapters: tokens/s,
            host and CUDA ms per step (benchmarks/serving/bench_static_decode.py); targets: static graphs >= 0.9x
            its no-adapter run and >= 3x dynamic
  train     one real trainer step (Trainer._step, bf16 autocast) on a fresh Gemma-2-2b-shaped model with the main
            hypernet config, one pack of 8 contexts x 512 + 8 QAs x 512 tokens: step time (CUDA events after a
            warm-up step), peak memory, tokens/s, the reference's per-token copies (spec 1.8) for the same pack;
            distillation, CE through Liger's fused linear CE (or why not) and CE without it
            (benchmarks/e2e/bench_train_step.py; if the budget skipped it, run --only env,train: about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.ops.lora_tensors import LoraTensors  # noqa: E402  (the lora section's case tensors)
from d2l_fast.kernels.segmented_lora import segmented_lora_, segmented_lora_ref  # noqa: E402
from d2l_fast.kernels.segmented_lora.configs import KernelConfig, pick_config  # noqa: E402
from d2l_fast.kernels.segmented_lora.launch import segmented_lora_fwd  # noqa: E402
from d2l_fast.profiling.shapes import MODEL_SHAPES, lora_cases  # noqa: E402

DT = torch.bfloat16


class Suite:
    def __init__(self, out_dir: str, budget_s: float):
        self.out_dir = out_dir
        self.t0 = time.time()
        self.budget_s = budget_s
        self.data: dict = {"sections": {}, "rows": [], "errors": []}
        os.makedirs(out_dir, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def row(self, **kw):
        self.data["rows"].append(kw)
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in kw.items()), flush=True)

    def save(self):
        with open(os.path.join(self.out_dir, "gpu_suite.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=str)

    def section(self, name, fn, min_left_s=20):
        if self.left() < min_left_s:
            self.data["sections"][name] = {"status": "skipped: out of time budget"}
            print(f"== {name}: skipped (budget)", flush=True)
            return
        print(f"== {name} (budget left {self.left():.0f} s)", flush=True)
        t = time.time()
        try:
            fn()
            status = "ok"
        except Exception as e:  # noqa: BLE001  (one failing section must not lose the others)
            status = f"error: {type(e).__name__}: {e}"
            self.data["errors"].append({"section": name, "traceback": traceback.format_exc()})
            traceback.print_exc()
        self.data["sections"][name] = {"status": status, "seconds": round(time.time() - t, 1)}
        torch.cuda.empty_cache()
        self.save()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


# ------------------------------------------------------------------------------------------ timing
def cuda_time_us(fn, reps=30, warmup=3) -> float:
    """Median of per-call CUDA-event times (us)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def spin(ms: float = 30.0) -> None:
    """Keep the GPU busy for ~``ms`` so clocks are up before a case's first provider is timed (the first
    provider after an idle gap otherwise measures the clock ramp)."""
    m = torch.randn(2048, 2048, device="cuda", dtype=DT)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    while True:
        for _ in range(20):
            m @ m
        b.record()
        b.synchronize()
        if a.elapsed_time(b) >= ms:
            return


def graph_time_us(fn, reps=50) -> float | None:
    """Per-call time of ``fn`` captured into a CUDA graph (launch overhead removed); None if capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(10):
                fn()
        g.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) * 1e3 / (reps * 10)
    except Exception as e:  # noqa: BLE001
        print(f"    graph capture failed: {type(e).__name__}: {e}")
        return None


def host_us(fn, n=200) -> float:
    """Wall-clock us per call of back-to-back calls (no sync inside): the host-side cost when the GPU keeps up."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


# ------------------------------------------------------------------------------------------ sections
def sec_env(S: Suite):
    import triton

    p = torch.cuda.get_device_properties(0)
    env = dict(
        device=torch.cuda.get_device_name(0), sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        cuda=torch.version.cuda,
    )  # fmt: skip
    for mod in ("transformers", "peft", "accelerate", "liger_kernel", "flash_attn"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    n = 2**28  # 512 MiB of bf16
    a = torch.empty(n, dtype=DT, device="cuda")
    b = torch.empty_like(a)
    t = cuda_time_us(lambda: b.copy_(a), reps=20)
    env["copy_GBps"] = 2 * n * 2 / t / 1e3
    m = torch.randn(8192, 8192, dtype=DT, device="cuda")
    t = cuda_time_us(lambda: m @ m, reps=10)
    env["bf16_matmul_TFLOPs"] = 2 * 8192**3 / t / 1e6
    S.data["env"] = env
    print(json.dumps(env, indent=1), flush=True)


def sec_tests(S: Suite):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = {}
    for name, args in (
        ("kernels", ["tests/kernels", "-n", "8"]),
        # the rest of the suite on the GPU machine's own stack (its torch/transformers/peft/triton versions);
        # tests needing packages that machine lacks (the SmolLM2 GGUF, rouge-score) fail or skip there
        ("library", ["tests", "--ignore=tests/kernels", "-n", "8", "-m", "not slow"]),
    ):
        timeout = max(30, min(120, S.left() - 120))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--tb=short", *args]
        t = time.time()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            out = p.stdout + p.stderr
            rc = p.returncode
        except subprocess.TimeoutExpired as e:
            raw = e.stdout or b""
            out, rc = (raw.decode(errors="replace") if isinstance(raw, bytes) else raw), 124
        if rc != 0 and "-n" in args and ("unrecognized arguments: -n" in out or "xdist" in out and rc == 4):
            p = subprocess.run([c for c in cmd if c not in ("-n", "8")], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=timeout)  # fmt: skip
            out, rc = p.stdout + p.stderr, p.returncode
        summary = [ln for ln in out.splitlines() if " passed" in ln or " failed" in ln or " error" in ln][-1:]
        res[name] = dict(rc=rc, seconds=round(time.time() - t, 1), summary=summary)
        with open(os.path.join(S.out_dir, f"pytest_{name}.log"), "w") as f:
            f.write(out)
        print(f"  {name}: rc={rc} {summary} ({time.time() - t:.0f} s)", flush=True)
        if rc not in (0, 5):
            print(out[-6000:], flush=True)
    S.data["tests"] = res


def sec_lora(S: Suite):
    env = S.data.get("env", {})
    bw, tf = env.get("copy_GBps"), env.get("bf16_matmul_TFLOPs")
    for case in lora_cases(long_decode=True):
        if S.left() < 60:
            print("  (lora: stopping early, budget)")
            break
        c = LoraTensors(case)
        m, x, A, B, W = c.meta, c.x, c.A, c.B, c.W
        cfg = pick_config(m.n_tokens, m.max_seqlen, m.max_rank, c.d_in, c.d_out,
                          n_sms=torch.cuda.get_device_properties(0).multi_processor_count)  # fmt: skip
        with torch.no_grad():
            ref = F.linear(x, W).float() + segmented_lora_ref(
                x.float(), A.float(), B.float(), m.cu_seqlens, m.seg_rank_start, m.seg_rank_len, c.scale
            )
        y0 = F.linear(x, W)
        fns = {
            "base": lambda: F.linear(x, W),
            "d2l_fast": lambda: segmented_lora_(F.linear(x, W), x, A, B, m, c.scale),
            "lora_only": lambda: segmented_lora_(y0, x, A, B, m, c.scale),
        }
        runs = [(t0, t1, rs, rl) for (t0, t1, rs, rl) in m.runs]

        def cublas_loop():
            y = F.linear(x, W)
            for t0, t1, rs, rl in runs:
                y[t0:t1] += c.scale * ((x[t0:t1] @ A[rs : rs + rl].T) @ B[rs : rs + rl])
            return y

        fns["cublas_loop"] = cublas_loop
        if cfg.SPLIT_K > 1:  # the same config without split-K: what the split buys
            cfg1 = KernelConfig(cfg.variant, cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K, cfg.BLOCK_R, cfg.num_warps,
                                cfg.num_stages, 1)  # fmt: skip
            fns["lora_only_splitk1"] = lambda: segmented_lora_fwd(y0, x, A, B, m, c.scale, cfg1)
        try:
            pm = c.peft()
            rows = len(c.seq_lens)
            x3 = x.view(rows, c.seq_lens[0], c.d_in)
            names = [f"a{a}" for a in c.seg_adapter]
            fns["peft"] = lambda: pm(x3, adapter_names=names).view(-1, c.d_out)
        except Exception as e:  # noqa: BLE001
            print(f"  peft unavailable for {c.name}: {type(e).__name__}: {e}")
        n = c.counts()
        times = {}
        spin()
        for prov, fn in fns.items():
            with torch.no_grad():
                y = fn()
                if not prov.startswith("lora_only"):
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                else:
                    err = None
                t = cuda_time_us(fn, reps=30 if c.kind.startswith("decode") else 15)
            times[prov] = t
            row = dict(section="lora", case=c.name, provider=prov, us=t, rel_err=err)
            if prov.startswith("lora_only"):
                row["graph_us"] = graph_time_us(fn)
                row["host_us"] = host_us(fn)
                if prov == "lora_only":  # the same calls through Triton's own launch path (no Launcher reuse)
                    from d2l_fast.kernels.segmented_lora import launch as L

                    row["fast_launch_active"] = all(lc.enabled for lc in L._LAUNCHERS.values())
                    saved = {k: lc.enabled for k, lc in L._LAUNCHERS.items()}
                    for lc in L._LAUNCHERS.values():
                        lc.enabled = False
                    row["host_us_triton_launch"] = host_us(fn)
                    row["us_triton_launch"] = cuda_time_us(fn, reps=15)
                    for k, lc in L._LAUNCHERS.items():
                        lc.enabled = saved[k]
                row["GBps"] = n["lora_bytes"] / t / 1e3
                row["frac_copy_bw"] = row["GBps"] / bw if bw else None
                row["TFLOPs"] = n["lora_flops"] / t / 1e6
                row["config"] = (f"{cfg.variant} M{cfg.BLOCK_M} N{cfg.BLOCK_N} K{cfg.BLOCK_K} R{cfg.BLOCK_R} "
                                 f"w{cfg.num_warps} s{cfg.SPLIT_K}")
            if prov == "base":
                row["TFLOPs"] = n["base_flops"] / t / 1e6
                row["frac_peak"] = row["TFLOPs"] / tf if tf else None
            S.row(**row)
        if "base" in times:
            S.row(section="lora_summary", case=c.name, overhead_vs_base=times["d2l_fast"] / times["base"] - 1,
                  lora_only_vs_base=times["lora_only"] / times["base"],
                  peft_vs_base=(times["peft"] / times["base"]) if "peft" in times else None,
                  cublas_loop_vs_base=times["cublas_loop"] / times["base"])  # fmt: skip
        del fns
        torch.cuda.empty_cache()


def sec_mlp(S: Suite):
    from benchmarks.ops.bench_fused_mlp import suite_rows

    for row in suite_rows(cuda_time_us, graph_time_us, spin):
        S.row(**row)


def sec_readout(S: Suite):
    from benchmarks.ops.bench_latent_readout import suite_rows
    from benchmarks.ops.readout_v1 import latent_readout_v1

    for row in suite_rows(cuda_time_us, graph_time_us, spin, S.data.get("env", {}), latent_readout_v1):
        S.row(**row)


def gemma2_2b_model():
    from transformers import AutoModelForCausalLM, Gemma2Config

    shape = MODEL_SHAPES["gemma-2-2b"]
    cfg = Gemma2Config(
        vocab_size=256000, hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    cfg._name_or_path = "google/gemma-2-2b-it"
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=DT, attn_implementation="eager")
    return model.eval()


def _profile(S: Suite, label: str, fn, top=15):
    """Top CUDA kernels by self CUDA time for one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    S.row(section="profile", case=label, total_cuda_us=total, n_kernels=sum(e.count for e in events))
    for e in events[:top]:
        S.row(section="profile", case=label, kernel=e.key[:90], calls=e.count, cuda_us=e.self_device_time_total,
              frac=e.self_device_time_total / max(total, 1e-9))  # fmt: skip


_E2E: list = []


def e2e_models(S: Suite):
    """(base, D2LModel) of the ``internalize`` and ``e2e`` sections: built once per run."""
    if _E2E:
        return _E2E[0]
    from d2l_fast import D2LModel

    t = time.time()
    base = gemma2_2b_model()
    S.row(section="e2e", step="build_base", seconds=time.time() - t,
          params_M=sum(p.numel() for p in base.parameters()) / 1e6)  # fmt: skip
    t = time.time()
    model = D2LModel.from_base(base, None, seed=0, hypernet_dtype=DT, init_scaler_B=6.0)
    S.row(section="e2e", step="build_hypernet", seconds=time.time() - t,
          hypernet_params_M=sum(p.numel() for p in model.hypernet.parameters()) / 1e6,
          latent=model.spec.latent_size if hasattr(model.spec, "latent_size") else None)  # fmt: skip
    _E2E.append((base, model))
    return base, model


def sec_internalize(S: Suite):
    from benchmarks.e2e.bench_encoder_attention import suite_rows

    _, model = e2e_models(S)
    for row in suite_rows(model, cuda_time_us, lambda label, fn: _profile(S, label, fn)):
        S.row(**row)


def sec_e2e(S: Suite):
    base, model = e2e_models(S)
    g = torch.Generator().manual_seed(1)
    bos = 2
    # serving: 64 rows, 64 distinct adapters
    n_rows, new = 64, 32
    docs = [[bos] + torch.randint(10, 250000, (127,), generator=g).tolist() for _ in range(n_rows)]
    ads = model.internalize(docs)
    ids = torch.randint(10, 250000, (n_rows, 32), generator=g).to("cuda")
    mask = torch.ones_like(ids)
    gen_kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    res = {}

    def timed(label, fn):
        fn()  # warm-up
        torch.cuda.synchronize()
        a = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - a
        res[label] = out
        S.row(section="e2e", step=f"generate_{label}", seconds=dt, tokens_per_s=n_rows * new / dt)
        return dt

    t_base = timed("base", lambda: model.generate(ids, mask, **gen_kw))
    rows = list(range(n_rows))
    t_d2l = timed("d2l_fast", lambda: model.generate(ids, mask, adapters=ads, adapter_index=rows, **gen_kw))
    S.row(section="e2e", step="generate_ratio", d2l_vs_base_tokens_per_s=t_base / t_d2l)
    if S.left() < 60:
        return
    try:
        import re

        from peft import LoraConfig, get_peft_model

        t = time.time()
        ro, alpha = ads.rank_offsets, float(ads.alpha)
        names = [f"a{i}" for i in range(n_rows)]
        pm = None
        for k, name in enumerate(names):
            r = ro[k + 1] - ro[k]
            cfg = LoraConfig(r=r, lora_alpha=alpha * r, target_modules=list(model.spec.target_modules),
                             lora_dropout=0.0, bias="none", init_lora_weights=False)  # fmt: skip
            if pm is None:
                pm = get_peft_model(base, cfg, adapter_name=name)
            else:
                pm.add_adapter(name, cfg)
        layer_map = {b: i for i, b in enumerate(model.spec.layer_indices)}
        with torch.no_grad():
            for qual, mod in pm.named_modules():
                hit = re.search(r"layers\.(\d+)\.(?:.*\.)?([A-Za-z_]+)$", qual)
                if not (hit and hit.group(2) in model.spec.target_modules and hasattr(mod, "lora_A")):
                    continue
                li, m = layer_map[int(hit.group(1))], hit.group(2)
                for k, name in enumerate(names):
                    mod.lora_A[name].weight.copy_(ads.A[m][li, ro[k] : ro[k + 1]])
                    mod.lora_B[name].weight.copy_(ads.B[m][li, ro[k] : ro[k + 1]].T)
        pm.eval()
        S.row(section="e2e", step="peft_build", seconds=time.time() - t)
        t_peft = timed("peft", lambda: pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **gen_kw))
        same = (res["peft"] == res["d2l_fast"]).all(dim=1).float().mean().item()
        S.row(section="e2e", step="generate_ratio_peft", peft_vs_base_tokens_per_s=t_base / t_peft,
              d2l_vs_peft_speed=t_peft / t_d2l, rows_with_identical_tokens=same)  # fmt: skip
    except Exception as e:  # noqa: BLE001
        print(f"  peft e2e failed: {type(e).__name__}: {e}")
        traceback.print_exc()


def sec_decode(S: Suite):
    from benchmarks.serving.bench_static_decode import decode_rows
    from d2l_fast import D2LModel
    from tests._tiny import tiny_tokenizer  # text streaming only (the random model's ids mostly decode to nothing)

    model = D2LModel.from_base(gemma2_2b_model(), None, seed=0, latent_size=64, num_blocks=2, hypernet_dtype=DT)
    for row in decode_rows(model, n_rows=64, new=64, prompt_len=32, left_s=S.left, tokenizer=tiny_tokenizer("gemma2")):
        S.row(section="decode", **row)


def sec_train(S: Suite):
    from benchmarks.e2e.bench_train_step import train_rows
    from d2l_fast import D2LModel

    _E2E.clear()  # the e2e section's base carries PEFT's adapters by now: free it, train a fresh one
    torch.cuda.empty_cache()
    d2l = D2LModel.from_base(gemma2_2b_model(), None, seed=0, base_model_name_or_path="random-gemma-2-2b-shaped",
                             init_scaler_B=0.02)  # the main config; a small scaler_B: every adapter matters
    for row in train_rows(d2l, left_s=S.left):
        S.row(**row)


SECTIONS = ("env", "tests", "lora", "mlp", "readout", "internalize", "e2e", "decode", "train")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/d2l_gpu"))
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("D2L_GPU_BUDGET_S", 420)))
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma list of sections (default: all: {','.join(SECTIONS)})")
    a = ap.parse_args(argv)
    unknown = sorted(set(a.only.split(",")) - set(SECTIONS))
    if unknown:
        ap.error(f"--only: unknown section(s) {unknown}; expected names from {', '.join(SECTIONS)}")
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; nothing to do (CPU runs of the same code: python -m "
              "benchmarks.e2e.bench_encoder_attention, python benchmarks/e2e/bench_train_step.py --tiny)",
              file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_suite: unset TRITON_INTERPRET (kernels would be interpreted)", file=sys.stderr)
        return 2
    S = Suite(a.out, a.budget_s)
    only = a.only.split(",")
    table = {"env": (sec_env, 0), "tests": (sec_tests, 180), "lora": (sec_lora, 100), "mlp": (sec_mlp, 40),
             "readout": (sec_readout, 60), "internalize": (sec_internalize, 90), "e2e": (sec_e2e, 50),
             "decode": (sec_decode, 60), "train": (sec_train, 60)}  # fmt: skip
    for name in SECTIONS:
        if name in only:
            fn, need = table[name]
            S.section(name, lambda fn=fn: fn(S), min_left_s=need)
    S.data["total_s"] = round(time.time() - S.t0, 1)
    S.save()
    print(f"done in {S.data['total_s']} s; errors in {len(S.data['errors'])} section(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
