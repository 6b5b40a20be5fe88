"""Static vs dynamic decoding in :class:`~d2l_fast.serving.DecodeEngine`: tokens/s and host time per decode step.

    PYTHONPATH=$PWD python benchmarks/serving/bench_static_decode.py [--rows 16 --new 32]   # CPU, SmolLM2-135M
    PYTHONPATH=$PWD python scripts/gpu_suite.py --only env,decode                            # GPU (decode_rows())

``n_rows`` requests, each with its own random rank-16 adapter (A ~ N(0, 1/d_in), B scaled so the LoRA moves the
output of its Linear by ~5 %), one random prompt of ``prompt_len`` tokens each, ``new`` greedy tokens (the engine's
eos set is emptied so every row decodes exactly ``new`` tokens). All rows are admitted at once (one prefill) and
decoded to the end by calling the engine's own admission and step methods in this thread (no request queue, no
scheduler noise). Each mode runs twice on one engine; the second run is timed (kernels compiled, CUDA graphs
captured, buffers allocated). Modes:

    dynamic         DecodeEngine(static=False): HF DynamicCache, the binding rebuilt per step (the path before)
    static_eager    static=True, cuda_graphs=False: slot KV cache, adapter bank, fixed-shape steps run eagerly
    static_graphs   static=True, cuda_graphs=True (CUDA only): the same steps replayed as CUDA graphs
    *_noadapter     the same engine, every request without adapter

Per mode: ``tokens_per_s`` (rows x new / wall time of the decode loop, the engine's per-row token choice and text
streaming included; prefill excluded), ``step_ms`` (median wall time of one engine step), ``host_ms`` (median wall
time of the step's model call until it returns: the decode forward for ``dynamic``, ``StaticDecoder.step`` for the
static modes; on CUDA the GPU runs behind it, so this is the host's launch cost), ``cuda_ms`` (median CUDA-event time
of that call, CUDA only), ``cpu_ms`` (median CPU time of this thread per engine step: blind to time slices lost to
other processes on a shared CPU box; on CUDA it includes spin-waiting for the GPU) and ``same_tokens_as_dynamic``
(fraction of rows whose tokens equal the dynamic mode's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DELTA_FRACTION = 0.05
RANK = 16


def random_adapters(model, n: int, rank: int = RANK, seed: int = 0):
    """``n`` random adapters (one AdapterBatch) on the model's target modules, in the model's dtype and device."""
    from d2l_fast import AdapterBatch

    if n < 1 or rank < 1:
        raise ValueError(f"n and rank must be >= 1, got {n}, {rank}")
    spec, g = model.spec, torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for m in spec.target_modules:
        d_in, d_out = spec.d_in[m], spec.d_out[m]
        A[m] = torch.randn(spec.num_layers, n * rank, d_in, generator=g) * d_in**-0.5
        # ||alpha · x Aᵀ B|| ≈ DELTA_FRACTION · ||x|| for unit-variance x (a ~5 % change of the Linear's output scale)
        B[m] = torch.randn(spec.num_layers, n * rank, d_out, generator=g) * (
            DELTA_FRACTION / (spec.lora_alpha * (rank * d_out) ** 0.5) * d_out**0.5)
    ad = AdapterBatch(A, B, list(range(0, n * rank + 1, rank)), spec.lora_alpha, model.model_id)
    return ad.to(model.device, model.base_dtype)


def _timed_call(engine, fn, rec):
    """Wrap ``fn`` (the step's model call) to record its host time (and CUDA events on CUDA)."""
    cuda = engine.model.device.type == "cuda"

    def wrapped(*a, **k):
        if cuda:
            e0 = torch.cuda.Event(enable_timing=True)
            e0.record()
        t = time.perf_counter()
        out = fn(*a, **k)
        rec["host"].append(time.perf_counter() - t)
        if cuda:
            e1 = torch.cuda.Event(enable_timing=True)
            e1.record()
            rec["events"].append((e0, e1))
        return out

    return wrapped


def run_mode(engine, prompts, adapters, new: int) -> dict:
    """One timed decode of every prompt on ``engine`` (after an identical warm-up run); see the module docstring."""
    from d2l_fast.serving import GenRequest

    cuda = engine.model.device.type == "cuda"
    for _run in range(2):  # warm-up, then the timed run
        reqs = [GenRequest(prompt_ids=p, adapter=a, max_new_tokens=new, sink=lambda k, v: None)
                for p, a in zip(prompts, adapters)]
        engine._admit(reqs)
        if len(engine._rows) != len(reqs):
            raise RuntimeError("not every request was admitted (an error in prefill?)")
        rec = {"host": [], "events": [], "steps": [], "cpu": []}
        if engine._static is not None:
            orig, engine._static.step = engine._static.step, _timed_call(engine, engine._static.step, rec)
        else:
            orig, engine._forward = engine._forward, _timed_call(engine, engine._forward, rec)
        t0 = time.perf_counter()
        try:
            while engine._rows:
                t, c = time.perf_counter(), time.thread_time()
                engine._step()
                rec["steps"].append(time.perf_counter() - t)
                rec["cpu"].append(time.thread_time() - c)
        finally:
            if engine._static is not None:
                engine._static.step = orig
            else:
                del engine._forward  # back to the method
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    out = {"tokens_per_s": len(prompts) * new / wall, "step_ms": statistics.median(rec["steps"]) * 1e3,
           "host_ms": statistics.median(rec["host"]) * 1e3, "cpu_ms": statistics.median(rec["cpu"]) * 1e3,
           "steps": len(rec["steps"]),
           "tokens": [r.out_ids for r in reqs]}
    if cuda:
        out["cuda_ms"] = statistics.median(a.elapsed_time(b) for a, b in rec["events"])
    return out


def decode_rows(model, *, n_rows: int, new: int, prompt_len: int, seed: int = 0, modes=None, left_s=None,
                tokenizer=None):
    """Rows (dicts) of every mode for ``model`` (a D2LModel); ``left_s()``: seconds left (stops early below 20);
    ``tokenizer``: the engine's (for a model built without one)."""
    from d2l_fast.serving import DecodeEngine

    cuda = model.device.type == "cuda"
    modes = modes or (["dynamic", "static_eager"] + (["static_graphs"] if cuda else []))
    g = torch.Generator().manual_seed(seed)
    V = min(model.vocab_size, 32000)
    prompts = [torch.randint(10, V, (prompt_len,), generator=g).tolist() for _ in range(n_rows)]
    ads = random_adapters(model, n_rows, seed=seed)
    per_row = [ads.select([k]) for k in range(n_rows)]
    results, rows = {}, []
    for mode in modes + [m + "_noadapter" for m in modes]:
        if left_s is not None and left_s() < 20:
            rows.append({"mode": mode, "status": "skipped: out of time budget"})
            continue
        kind = mode.removesuffix("_noadapter")
        engine = DecodeEngine(model, max_batch=n_rows, static=kind != "dynamic",
                              cuda_graphs=(kind == "static_graphs") if cuda else None)
        engine.eos_ids = set()  # exactly `new` tokens per row
        if tokenizer is not None:
            engine.tokenizer = tokenizer
        res = run_mode(engine, prompts, per_row if mode == kind else [None] * n_rows, new)
        results[mode] = res
        row = {"mode": mode, **{k: v for k, v in res.items() if k != "tokens"}}
        if engine._static is not None:
            st = engine._static
            row.update(captures=st.captures, L=st.L, bank_rank=st.rank)
        elif kind != "dynamic":
            row["static_off"] = engine.static_off
        ref = results.get("dynamic" if mode == kind else "dynamic_noadapter")
        if ref is not None:
            row["same_tokens_as_dynamic"] = sum(a == b for a, b in zip(res["tokens"], ref["tokens"])) / n_rows
        rows.append(row)
    tps = {mode: res["tokens_per_s"] for mode, res in results.items()}
    for mode in [m for m in modes if m in tps]:  # ratios within this run
        rows.append({"mode": mode, "speedup_vs_dynamic": tps[mode] / tps.get("dynamic", float("nan")),
                     "vs_noadapter": tps[mode] / tps.get(mode + "_noadapter", float("nan"))})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from d2l_fast import D2LModel
    from d2l_fast.demo import load_smollm2

    base, tok = load_smollm2()
    model = D2LModel.from_base(base, tok, seed=0, latent_size=64, num_blocks=2)  # the hypernetwork is not used
    rows = decode_rows(model, n_rows=a.rows, new=a.new, prompt_len=a.prompt_len)
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "threads": a.threads, "device": "cpu"}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
