"""Peak memory of one D2L training step on a ~4k-token pack of a Gemma-2-2b-shaped model (spec §1.8).

One training step = ``Trainer._pack_loss`` (contexts → hypernetwork → merged adapters → packed student forward with
each QA segment on its own context's adapter → chunked distillation loss + L1) followed by ``backward``: the real
trainer code path, gradients only into the hypernetwork, base model frozen, fp32 on CPU. The pack is built by the
trainer's own data path (parquet file in the reference schema → ``PackStream``: one greedy pack under the
``max_packed_inp_len`` / ``max_packed_ctx_len`` budgets).

The base model is a random ``Gemma2ForCausalLM`` with Gemma-2-2b's real widths (hidden 2304, intermediate 9216,
8 heads, 4 KV heads, head_dim 256, vocab 256000, soft-capping, eager attention as the trainer loads it) truncated to
a few decoder layers (≥ 2: the per-layer-activations encoder keeps depth − 1 layers): the full 26-layer model is
9.7 GiB of fp32 weights and its step does not fit a 12 GB budget, so the 26-layer figures are extrapolations along the
measured depths. Every run is a fresh subprocess; the result is the growth of peak RSS (``VmHWM``, reset just before
the step) over the RSS just before the step (weights, hypernetwork, data). A watchdog stops a run past
``--max-rss-gb``.

Variants:

* ``d2l_fast``: the trainer as it is (segmented LoRA op: no per-token LoRA copies).
* ``per_token_copy``: the same step with the LoRA delta computed the way the reference's ``lora_forward_packed``
  does it: each adapter padded to ``R_max`` rank rows, expanded per token to ``A [T, R_max, d_in]`` and
  ``B [T, R_max, d_out]``, batched matmuls over the token axis (autograd keeps the copies for backward). Only the
  binding's ``apply`` is swapped (on the last ``--copy-on`` layers); everything else is the trainer's code.

Op-level runs time one down_proj LoRA delta (forward + backward, input needing a gradient) at the full pack shape
through ``LoRABinding.apply``, segmented vs per-token copies. The reference's per-token-copy cost is also computed
from the formula of spec §1.8 and compared with the measured copies.

    python scripts/train_memory.py --out benchmarks/results/train_memory_cpu.json      # ~25 min on 2 cores
    # = --layers 2 3 (d2l_fast, 4096 tokens) --copy-depth 2 --copy-on 1 2 --copy-n-ctx 8 (copies, 2048 tokens)
    #   + the op-level pair at 4096 tokens
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

GiB = 2**30
FULL_LAYERS = 26
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0, sliding_window=4096, hidden_activation="gelu_pytorch_tanh",
                 max_position_embeddings=8192, tie_word_embeddings=True)
MODEL_NAME = "random-gemma-2-2b-shaped"
LORA_R = 8  # the main config: down_proj, r = 8
NOTES = [
    "in-trainer per-token-copy runs use a 2048-token pack: at 4096 tokens (depth 2, copies on the last layer) the run "
    "passed the 12 GB RSS guard and was stopped (3.7 GiB before the step + 4.2 d2l_fast + 2.8 copies + 2.25 A-copy "
    "gradient ≈ 13 GiB); the op-level runs validate the copies at the full 4096 tokens",
    "the student's Gemma-2 attention is eager (soft-capping), so each layer after the first keeps two "
    "[heads, T, T] fp32 score tensors (tanh and softmax outputs: 2 × 8 × 4096² × 4 B = 1 GiB at 4k) — the largest "
    "single item of d2l_fast's per-layer slope; layer 0's attention keeps none (its input needs no gradient)",
]


# ---------------------------------------------------------------------------------------------- memory readings
def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _rss() -> int:
    return _status_kib("VmRSS") * 1024


def _peak() -> int:
    return _status_kib("VmHWM") * 1024


def _reset_peak() -> None:
    """Reset the peak-RSS mark (``VmHWM``) to the current RSS (Linux ≥ 4.0: write 5 to clear_refs)."""
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    if _peak() > _rss() + 64 * 2**20:
        raise RuntimeError("could not reset the peak-RSS mark (/proc/self/clear_refs)")


def _rss_guard(limit_bytes: int):
    """Kill this worker (exit 3) if its RSS passes ``limit_bytes``: the machine is shared."""
    def watch():
        while True:
            if _rss() > limit_bytes:
                sys.stderr.write(f"RSS passed the {limit_bytes / 1e9:.1f} GB limit; stopping this run\n")
                sys.stderr.flush()
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


# ---------------------------------------------------------------------------------------------- the pack
def _write_data(path: pathlib.Path, n_ctx: int, ctx_len: int, qa_len: int, answer_len: int, topk: int, vocab: int,
                seed: int) -> None:
    """``n_ctx`` contexts (one chunk of ``ctx_len`` tokens) with one QA of ``qa_len`` tokens each, the last
    ``answer_len`` of them the answer, with top-k teacher log-probs: the reference's parquet schema."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = {"ctx_ids": [], "input_ids": [], "response_start_end": [], "logprobs_vals": [], "logprobs_indices": []}
    for _ in range(n_ctx):
        rows["ctx_ids"].append(rng.integers(3, vocab, ctx_len).tolist())
        rows["input_ids"].append([rng.integers(3, vocab, qa_len).tolist()])
        rows["response_start_end"].append([[qa_len - answer_len, qa_len]])
        lp = np.log(rng.dirichlet(np.ones(topk), answer_len)).astype(np.float16)
        rows["logprobs_vals"].append([lp.tolist()])
        rows["logprobs_indices"].append([rng.integers(0, vocab, (answer_len, topk)).tolist()])
    schema = pa.schema([
        ("ctx_ids", pa.list_(pa.int32())),
        ("input_ids", pa.list_(pa.list_(pa.int32()))),
        ("response_start_end", pa.list_(pa.list_(pa.int64()))),
        ("logprobs_vals", pa.list_(pa.list_(pa.list_(pa.float16())))),
        ("logprobs_indices", pa.list_(pa.list_(pa.list_(pa.int32())))),
    ])
    pq.write_table(pa.table(rows, schema=schema), path)


def _gemma2(n_layers: int):
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(num_hidden_layers=n_layers, **GEMMA2_2B)
    # as d2l_fast.hf.load_base_model loads a Gemma-2 (eager attention: soft-capping), fp32, eval mode
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------- per-token copy
_COPY_FROM_LAYER = [0]  # first base layer that uses per-token copies (set per run)
_SEGMENTED_APPLY = [None]  # the library's LoRABinding.apply


def _per_token_copy_apply(self, key, x, y):
    """``LoRABinding.apply`` done the reference's packed way (spec §1.7 ``lora_forward_packed``): every adapter
    zero-padded to ``R_max`` rank rows, expanded to one ``[R_max, d]`` copy per token, batched matmuls over tokens."""
    import torch
    import torch.nn.functional as F

    layer, module = key
    li = self.layer_map.get(layer)
    if li is None or module not in self.adapters.A:
        return y
    if layer < _COPY_FROM_LAYER[0]:  # layers before the copied ones keep the segmented op
        return _SEGMENTED_APPLY[0](self, key, x, y)
    A, B = self.adapters.A[module][li], self.adapters.B[module][li]  # [R_total, d_in], [R_total, d_out] ragged
    offs = self.adapters.rank_offsets
    r_max = max(b - a for a, b in zip(offs[:-1], offs[1:]))
    Ap = torch.stack([F.pad(A[a:b], (0, 0, 0, r_max - (b - a))) for a, b in zip(offs[:-1], offs[1:])])
    Bp = torch.stack([F.pad(B[a:b], (0, 0, 0, r_max - (b - a))) for a, b in zip(offs[:-1], offs[1:])])
    per_token = torch.repeat_interleave(torch.tensor(self.seg_adapter, device=x.device),
                                        torch.tensor(self.seg_lens, device=x.device))
    A_tok, B_tok = Ap[per_token], Bp[per_token]  # [T, R_max, d_in], [T, R_max, d_out]
    x2 = x.reshape(-1, x.shape[-1])
    h = torch.bmm(A_tok, x2[:, :, None])  # [T, R_max, 1]
    delta = torch.bmm(h.transpose(1, 2), B_tok)  # [T, 1, d_out]
    return y + self.alpha * delta.view(y.shape)


# ---------------------------------------------------------------------------------------------- one run
def _run(a) -> dict:
    import torch

    from d2l_fast.model import D2LModel
    from d2l_fast.patching import LoRABinding
    from d2l_fast.training.config import TrainConfig
    from d2l_fast.training.data import PackStream
    from d2l_fast.training.trainer import Trainer

    _rss_guard(int(a.max_rss_gb * 1e9))
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    base = _gemma2(a.layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="d2l-train-memory-"))
    data = tmp / "pack.parquet"
    _write_data(data, a.n_ctx, a.ctx_len, a.qa_len, a.answer_len, a.topk, GEMMA2_2B["vocab_size"], a.seed)
    cfg = TrainConfig(data=[str(data)], model_name_or_path=MODEL_NAME, output_dir=str(tmp / "out"), max_steps=1,
                      max_packed_inp_len=a.max_packed_inp_len, max_packed_ctx_len=a.max_packed_ctx_len,
                      shuffle_buffer=0, device="cpu", bf16=False, disable_tqdm=True, lora_r=LORA_R)
    # the reference's init has scaler_B = 0 (generated part zero); a small random scaler_B makes every QA segment's
    # own adapter matter, so the loss of the two variants checks that they compute the same step
    model = D2LModel.from_base(base, seed=a.seed, base_model_name_or_path=MODEL_NAME, init_scaler_B=0.02,
                               **{k: getattr(cfg, k) for k in ("latent_size", "n_latent_queries", "num_blocks",
                                                               "num_self_attn_per_block", "n_heads", "head_dim",
                                                               "n_kv_heads", "lora_r", "target_modules")})
    tr = Trainer(cfg, model=model)
    tr._build_model()
    stream = PackStream(tr.files, cfg, model.vocab_size)
    pack = stream.next()
    if a.variant == "per_token_copy":
        _COPY_FROM_LAYER[0] = a.layers - a.copy_on_one
        _SEGMENTED_APPLY[0] = LoRABinding.apply
        LoRABinding.apply = _per_token_copy_apply
    n_ctx = len(pack)
    n_lab = sum(q.n_answer_tokens for ex in pack for q in ex.qas)
    hyper_params = sum(p.numel() for p in model.hypernet.parameters())
    build_s = time.perf_counter() - t0
    # where the memory goes: RSS (and the peak so far) above the pre-step RSS at the end of each encoder layer,
    # the hypernetwork, each student layer, the loss and the backward (forward hooks only: the step is unchanged)
    trace, phase = [], ["encoder"]

    def mark(label):
        trace.append({"at": label, "rss_GiB": round((_rss() - before) / GiB, 3),
                      "peak_so_far_GiB": round((_peak() - before) / GiB, 3)})

    def layer_hook(i):
        return lambda mod, args, out: mark(f"{phase[0]} layer {i}")

    def hypernet_hook(mod, args, out):
        mark("hypernetwork")
        phase[0] = "student"

    for i, layer in enumerate(tr.decoder.layers):
        layer.register_forward_hook(layer_hook(i))
    model.hypernet.register_forward_hook(hypernet_hook)
    gc.collect()
    before = _rss()
    _reset_peak()
    t1 = time.perf_counter()
    r = tr._pack_loss(pack, n_ctx, n_lab)
    mark("loss (forward done)")
    fwd_peak = _peak()
    fwd_s = time.perf_counter() - t1
    r["loss"].backward()
    mark("backward done")
    step_peak = _peak()
    step_s = time.perf_counter() - t1
    grads = [p.grad for p in model.hypernet.parameters() if p.grad is not None]
    gnorm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    base_grads = sum(p.grad is not None for p in model.base_model.parameters())
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "variant": a.variant, "layers": a.layers, "copy_on_last_layers": a.copy_on_one, "device": "cpu",
        "dtype": "float32",
        "qa_tokens": int(sum(len(q.input_ids) for ex in pack for q in ex.qas)),
        "ctx_tokens": int(sum(ex.n_ctx_tokens for ex in pack)), "contexts": n_ctx, "answer_tokens": n_lab,
        "qa_segments": sum(len(ex.qas) for ex in pack), "base_weights_GiB": round(weight_bytes / GiB, 3),
        "hypernet_params": hyper_params, "rss_before_step_GiB": round(before / GiB, 3),
        "forward_peak_growth_GiB": round((fwd_peak - before) / GiB, 3),
        "step_peak_growth_GiB": round((step_peak - before) / GiB, 3),
        "loss": float(r["loss"].detach()), "task_loss": float(r["task"]), "l1": float(r["l1"]),
        "hypernet_grad_norm": gnorm, "hypernet_params_with_grad": len(grads), "base_params_with_grad": base_grads,
        "trace": trace, "build_s": round(build_s, 1), "forward_s": round(fwd_s, 1), "step_s": round(step_s, 1),
    }


def _run_op(a) -> dict:
    """One down_proj LoRA delta (forward + backward) at the pack's exact shape, through ``LoRABinding.apply``:
    the library's segmented op or the per-token copies; growth of peak RSS over the inputs."""
    import torch

    from d2l_fast.adapters import AdapterBatch
    from d2l_fast.patching import LoRABinding

    _rss_guard(int(a.max_rss_gb * 1e9))
    torch.manual_seed(a.seed)
    d_in, d_out, rank = GEMMA2_2B["intermediate_size"], GEMMA2_2B["hidden_size"], 2 * LORA_R  # 1 chunk + bias
    seg_lens, seg_adapter = [a.qa_len] * a.n_ctx, list(range(a.n_ctx))
    T = sum(seg_lens)
    A = (torch.randn(1, a.n_ctx * rank, d_in) * 0.01).requires_grad_()
    B = (torch.randn(1, a.n_ctx * rank, d_out) * 0.01).requires_grad_()
    x = torch.randn(1, T, d_in).requires_grad_()  # the MLP product entering down_proj (kept for backward anyway)
    y = torch.randn(1, T, d_out)  # the frozen base Linear's output
    dy = torch.randn(1, T, d_out)
    adapters = AdapterBatch({"down_proj": A}, {"down_proj": B}, list(range(0, (a.n_ctx + 1) * rank, rank)), 45.25,
                            "bench")
    binding = LoRABinding(adapters, {0: 0}, seg_lens=seg_lens, seg_adapter=seg_adapter)
    if a.variant == "per_token_copy":
        LoRABinding.apply = _per_token_copy_apply
    gc.collect()
    before = _rss()
    _reset_peak()
    out = binding.apply((0, "down_proj"), x, y)
    fwd_peak = _peak()
    (out * dy).sum().backward()
    step_peak = _peak()
    return {"variant": a.variant, "op": "down_proj LoRA delta", "tokens": T, "segments": a.n_ctx, "R": rank,
            "d_in": d_in, "d_out": d_out, "forward_peak_growth_GiB": round((fwd_peak - before) / GiB, 3),
            "step_peak_growth_GiB": round((step_peak - before) / GiB, 3),
            "out_checksum": float(out.detach().double().sum()), "grad_A_norm": float(A.grad.norm()),
            "grad_x_norm": float(x.grad.norm())}


# ---------------------------------------------------------------------------------------------- driver
def _param_bytes(n_layers: int) -> int:
    """fp32 bytes of the Gemma-2-2b-shaped base model with ``n_layers`` layers (built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(Gemma2Config(num_hidden_layers=n_layers, **GEMMA2_2B))
    return sum(p.numel() for p in m.parameters()) * 4


def per_token_copy_bytes(tot_len: int, rank: int, d_in: int, d_out: int, bytes_per_el: int) -> int:
    """Spec §1.8: the reference keeps ``tot_len × R × (d_in + d_out)`` elements per layer and targeted module."""
    return tot_len * rank * (d_in + d_out) * bytes_per_el


def _fit(points: dict[int, float]) -> dict | None:
    """Least-squares line through ``{layers: GiB}``; None with fewer than two depths."""
    if len(points) < 2:
        return None
    xs, ys = list(points), list(points.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"from_layers": xs, "per_layer_GiB": round(slope, 3), "intercept_GiB": round(my - slope * mx, 3),
            "extrapolated_26_layers_GiB": round(my + slope * (FULL_LAYERS - mx), 2)}


def analyse(runs: list, ops: list, failed: list, args: dict) -> dict:
    """Fits, the spec §1.8 formula, the copy validation and the 26-layer extrapolations from the measured runs."""
    n_ctx, qa_len = args["n_ctx"], args["qa_len"]
    # the reference's per-token copies (spec §1.8): down_proj, R_max = (max chunks + 1) · r; every context is 1 chunk
    d_in, d_out, rank = GEMMA2_2B["intermediate_size"], GEMMA2_2B["hidden_size"], 2 * LORA_R

    def gib(tokens, d, bytes_per_el=4):
        return tokens * rank * d * bytes_per_el / GiB

    tot_len = n_ctx * qa_len
    formula = {
        "formula": "per layer (down_proj): tot_len × R × (d_in + d_out) × bytes, both per-token copies kept by "
                   "autograd for backward (spec §1.8); R = R_max = (max chunks + 1) · r",
        "tot_len": tot_len, "R": rank, "d_in": d_in, "d_out": d_out,
        "fp32_per_layer_GiB": round(gib(tot_len, d_in + d_out, 4), 4),
        "bf16_per_layer_GiB": round(gib(tot_len, d_in + d_out, 2), 4),
        "fp32_26_layers_GiB": round(FULL_LAYERS * gib(tot_len, d_in + d_out, 4), 2),
        "bf16_26_layers_GiB": round(FULL_LAYERS * gib(tot_len, d_in + d_out, 2), 2),
        "refinement": "measured here: layer 0 keeps only its B copy (its input needs no gradient), and backward adds "
                      "one transient gradient of the A copy (tot_len × R × d_in) at a time",
        "fp32_26_layers_refined_GiB": round(25 * gib(tot_len, d_in + d_out) + gib(tot_len, d_out), 2),
        "bf16_26_layers_refined_GiB": round(25 * gib(tot_len, d_in + d_out, 2) + gib(tot_len, d_out, 2), 2),
        "fp32_backward_transient_GiB": round(gib(tot_len, d_in), 4),
    }

    full = {x["layers"]: x for x in runs if x["variant"] == "d2l_fast" and x["qa_tokens"] == tot_len}
    fits = {key: _fit({n: x[key] for n, x in sorted(full.items())})
            for key in ("step_peak_growth_GiB", "forward_peak_growth_GiB")}
    increments = {}  # RSS added by the hypernetwork pass and by each student layer's forward (from the trace)
    for n, x in sorted(full.items()):
        rss = [t["rss_GiB"] for t in x["trace"] if t["at"].startswith("student layer")]
        hyper = [t["rss_GiB"] for t in x["trace"] if t["at"] == "hypernetwork"]
        increments[n] = {"after_hypernetwork_GiB": hyper[0],
                         "student_layer_GiB": [round(b - a_, 3) for a_, b in zip([hyper[0]] + rss[:-1], rss)]}

    validation = []
    for x in runs:
        if x["variant"] != "per_token_copy":
            continue
        pair = [y for y in runs if y["variant"] == "d2l_fast" and y["layers"] == x["layers"]
                and y["qa_tokens"] == x["qa_tokens"]]
        if not pair:
            continue
        y, n, k, t = pair[0], x["layers"], x["copy_on_last_layers"], x["qa_tokens"]
        saved = (k - 1 if k == n else k) * gib(t, d_in + d_out) + (1 if k == n else 0) * gib(t, d_out)
        validation.append({
            "where": "trainer step", "layers": n, "copied_last_layers": k, "tot_len": t,
            "extra_forward_peak_GiB": round(x["forward_peak_growth_GiB"] - y["forward_peak_growth_GiB"], 3),
            "spec_formula_GiB": round(k * gib(t, d_in + d_out), 3), "refined_saved_GiB": round(saved, 3),
            "extra_step_peak_GiB": round(x["step_peak_growth_GiB"] - y["step_peak_growth_GiB"], 3),
            "refined_saved_plus_A_gradient_GiB": round(saved + gib(t, d_in), 3),
            "loss": [y["loss"], x["loss"]], "hypernet_grad_norm": [y["hypernet_grad_norm"], x["hypernet_grad_norm"]]})
    seg = [o for o in ops if o["variant"] == "d2l_fast"]
    cp = [o for o in ops if o["variant"] == "per_token_copy"]
    if seg and cp:
        t = cp[0]["tokens"]
        validation.append({
            "where": "one down_proj LoRA op (input needs grad), forward + backward", "tot_len": t,
            "d2l_fast_step_peak_GiB": seg[0]["step_peak_growth_GiB"],
            "per_token_copy_step_peak_GiB": cp[0]["step_peak_growth_GiB"],
            "extra_forward_peak_GiB": round(cp[0]["forward_peak_growth_GiB"] - seg[0]["forward_peak_growth_GiB"], 3),
            "spec_formula_GiB": round(gib(t, d_in + d_out), 3),
            "extra_step_peak_GiB": round(cp[0]["step_peak_growth_GiB"] - seg[0]["step_peak_growth_GiB"], 3),
            "refined_saved_plus_A_gradient_GiB": round(gib(t, d_in + d_out) + gib(t, d_in), 3),
            "out_checksum": [seg[0]["out_checksum"], cp[0]["out_checksum"]],
            "grad_A_norm": [seg[0]["grad_A_norm"], cp[0]["grad_A_norm"]]})

    best = fits["step_peak_growth_GiB"]
    summary = {"base_weights_26_layers_GiB": round(_param_bytes(FULL_LAYERS) / GiB, 2)}
    if best:
        d2l26 = best["extrapolated_26_layers_GiB"]
        summary.update({
            "d2l_fast_step_growth_26_layers_GiB_EXTRAPOLATED": d2l26,
            "per_token_copies_26_layers_fp32_GiB_FORMULA": formula["fp32_26_layers_GiB"],
            "reference_step_growth_26_layers_GiB_EXTRAPOLATED": round(
                d2l26 + formula["fp32_26_layers_refined_GiB"] + formula["fp32_backward_transient_GiB"], 2),
            "note": "26-layer numbers are extrapolations, not measurements: d2l_fast = the line through the measured "
                    "depths at 26 layers; the reference = that + its per-token copies of 26 layers (refined formula: "
                    "layer 0 keeps B only) + one transient A-copy gradient (fp32)"})
    return {"what": "peak RSS growth of one training step (forward + backward, grads into the hypernetwork only) on "
                    "one packed row, random Gemma-2-2b-shaped base truncated to a few layers, fp32, CPU",
            "pack": {"contexts": n_ctx, "ctx_len": args["ctx_len"], "qa_len": qa_len,
                     "answer_len": args["answer_len"], "topk": args["topk"],
                     "max_packed_inp_len": args["max_packed_inp_len"], "max_packed_ctx_len": args["max_packed_ctx_len"],
                     "copy_runs_contexts": args["copy_n_ctx"]},
            "model": {"config": GEMMA2_2B, "attn_implementation": "eager", "target_modules": ["down_proj"],
                      "lora_r": LORA_R},
            "args": {k: v for k, v in args.items() if k not in ("run", "variant", "one", "reanalyse",
                                                                                            "copy_on_one", "out")},
            "runs": runs, "op_runs": ops, "failed": failed, "fits": fits, "trace_increments": increments,
            "reference_formula": formula, "copy_validation": validation, "summary": summary,
            "notes": NOTES, "cpu_count": os.cpu_count()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3],
                   help="decoder depths of the d2l_fast step (≥ 2: the per-layer-activations encoder keeps depth − 1 "
                        "layers; depth 4 is predicted past a 12 GB budget)")
    p.add_argument("--copy-depth", type=int, default=2, help="decoder depth of the in-trainer per-token-copy runs")
    p.add_argument("--copy-on", type=int, nargs="*", default=[1, 2],
                   help="in-trainer per-token-copy runs: copies on this many last layers (the others keep the "
                        "segmented op)")
    p.add_argument("--copy-n-ctx", type=int, default=8,
                   help="contexts (QAs) of the in-trainer per-token-copy runs' pack (8 × 256 = 2048 tokens: at 4096 "
                        "the copy run passes 12 GB) and of its d2l_fast pair")
    p.add_argument("--no-op", action="store_true", help="skip the op-level runs at the full pack shape")
    p.add_argument("--n-ctx", type=int, default=16, help="contexts in the pack (one QA each)")
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--qa-len", type=int, default=256)
    p.add_argument("--answer-len", type=int, default=64)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--max-packed-inp-len", type=int, default=4096)
    p.add_argument("--max-packed-ctx-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-gb", type=float, default=12.0, help="a run whose RSS passes this many GB is stopped")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--reanalyse", metavar="JSON", help="recompute the analysis of an earlier --out file (no runs)")
    p.add_argument("--run", choices=["step", "op"], help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["d2l_fast", "per_token_copy"], default="d2l_fast", help=argparse.SUPPRESS)
    p.add_argument("--layers-one", type=int, dest="one", help=argparse.SUPPRESS)
    p.add_argument("--copy-on-one", type=int, dest="copy_on_one", default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.run:
        a.layers = a.one
        print(json.dumps(_run(a) if a.run == "step" else _run_op(a)), flush=True)
        return
    if a.reanalyse:
        old = json.loads(pathlib.Path(a.reanalyse).read_text())
        out = analyse(old["runs"], old["op_runs"], old["failed"], old.get("args", vars(a)))
        pathlib.Path(a.out or a.reanalyse).write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps({k: out[k] for k in ("copy_validation", "summary")}, indent=1))
        return
    if any(k < 1 or k > a.copy_depth for k in a.copy_on):
        p.error(f"--copy-on values must be in [1, --copy-depth={a.copy_depth}]")
    if min(a.layers + [a.copy_depth]) < 2:
        p.error("depths must be ≥ 2 (the per-layer-activations encoder keeps depth − 1 ≥ 1 layers)")

    def cmd(kind, variant, n_ctx, layers=0, k=0):
        return [sys.executable, __file__, "--run", kind, "--variant", variant, "--layers-one", str(layers),
                "--copy-on-one", str(k), "--n-ctx", str(n_ctx), "--ctx-len", str(a.ctx_len), "--qa-len",
                str(a.qa_len), "--answer-len", str(a.answer_len), "--topk", str(a.topk), "--max-packed-inp-len",
                str(a.max_packed_inp_len), "--max-packed-ctx-len", str(a.max_packed_ctx_len), "--seed", str(a.seed),
                "--max-rss-gb", str(a.max_rss_gb)]

    todo = [("step", "d2l_fast", a.n_ctx, n, 0) for n in a.layers]
    if a.copy_on:
        todo.append(("step", "d2l_fast", a.copy_n_ctx, a.copy_depth, 0))
        todo += [("step", "per_token_copy", a.copy_n_ctx, a.copy_depth, k) for k in a.copy_on]
    if not a.no_op:
        todo += [("op", v, a.n_ctx) for v in ("d2l_fast", "per_token_copy")]
    runs, ops, failed = [], [], []
    for kind, variant, n_ctx, *rest in todo:
        what = {"kind": kind, "variant": variant, "contexts": n_ctx, "layers": rest[0] if rest else None,
                "copy_on": rest[1] if rest else None}
        try:
            res = subprocess.run(cmd(kind, variant, n_ctx, *rest), capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            failed.append({**what, "error": f"timed out after {a.timeout} s"})
            print(json.dumps(failed[-1]), flush=True)
            continue
        if res.returncode != 0:
            failed.append({**what, "error": res.stderr.strip().splitlines()[-1:]})
            print(json.dumps(failed[-1]), flush=True)
            continue
        (runs if kind == "step" else ops).append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps((runs if kind == "step" else ops)[-1]), flush=True)

    out = analyse(runs, ops, failed, vars(a))
    print(json.dumps({k: out[k] for k in ("fits", "trace_increments", "reference_formula", "copy_validation",
                                           "summary")}, indent=1))
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
