"""One real trainer step: step time, peak memory, tokens/s and the loss path (issue 18, item 5).

    PYTHONPATH=$PWD python scripts/gpu_suite.py --only env,train     # GPU: Gemma-2-2b-shaped bf16 model (train_rows)
    PYTHONPATH=$PWD python benchmarks/e2e/bench_train_step.py --tiny [--json F.json]     # CPU: tiny random Gemma-2

The step is the trainer's own optimizer step, ``Trainer._step``, run on a given base model. A pack in the reference's
parquet schema is written to a temporary folder, and the trainer's ``PackStream`` reads it back as one greedy pack.
Then come ``_pack_loss`` (the frozen encoder under no_grad, the hypernetwork with grad, the merged adapters, the
packed student row with the segmented LoRA op, the chunked loss and the L1 term), backward, gradient clipping, AdamW
and the scheduler. On CUDA the trainer runs under bf16 autocast with a bf16 base model. On CPU it runs in fp32. The
hypernetwork is the main config (TrainConfig defaults: latent 512, 9 blocks, 16 × 128 heads, r 8, down_proj); with
``--tiny`` it is a small one.

The default pack has 8 contexts of 512 tokens. Each context has one QA of 512 tokens whose second half is the answer.
That makes 4,096 QA tokens and 4,096 context tokens, the main config's budgets (``max_packed_inp_len`` =
``max_packed_ctx_len`` = 4096): the shape of the "main training" row of spec §1.8.

Variants (rows with ``section="train"``):

  distill      the main objective: context distillation against top-16 teacher log-probs, averaged per context.
               It always uses the trainer's chunked torch loss, because Liger's kernel takes hard targets only.
  ce           cross-entropy averaged per label token (the NIAH objective; every token has the same weight).
               It uses Liger's fused linear cross-entropy when liger-kernel imports and the step runs on CUDA.
  ce_no_liger  the same step with Liger off (``use_liger=False``: the chunked torch loss), run only when Liger is
               available, for comparison

Per variant the row gives:

* ``step_ms``: the median of ``reps`` steps after one warm-up step, timed with CUDA events on CUDA and the wall
  clock on CPU; ``first_step_ms`` is the warm-up step, compiles included.
* ``tokens_per_s``: context and QA tokens per second.
* ``peak_mem_GiB``: ``torch.cuda.max_memory_allocated`` over the timed steps. ``mem_before_GiB`` is the memory
  before them: weights, hypernetwork, its gradients and AdamW state.
* ``loss``, ``grad_norm``, and ``param_change``: the L2 norm of the hypernetwork's update over the timed steps.
* ``loss_path``: ``liger_fused_linear_ce`` or ``torch_chunked``. ``liger_reason`` says why Liger did not run.
* The reference's per-token copies for the same pack (spec §1.8). ``lora_forward_packed`` keeps
  ``tot_len × R × (d_in + d_out)`` elements per layer and targeted module for backward, with tot_len = the QA
  tokens and R = (chunks + 1) · r. They are given per layer and for all layers, and ``ref_peak_est_GiB`` adds them
  to this step's peak: the reference's step, all else equal.

A ``train_summary`` row compares ``ce`` with ``ce_no_liger``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
import tempfile
import time

import torch

GiB = 2**30
#: variant -> (use_kl_loss, use_per_ctx_average_loss, Liger allowed)
VARIANTS = {"distill": (True, True, True), "ce": (False, False, True), "ce_no_liger": (False, False, False)}
MAIN_PACK = dict(n_ctx=8, ctx_len=512, qa_len=512, answer_len=256, topk=16)
TINY_PACK = dict(n_ctx=4, ctx_len=24, qa_len=24, answer_len=8, topk=4)
TINY_HYPERNET = dict(latent_size=32, num_blocks=2, n_heads=4, head_dim=16, n_kv_heads=2)


# ------------------------------------------------------------------------------------------------ the pack
def write_pack(path, *, n_ctx: int, ctx_len: int, qa_len: int, answer_len: int, topk: int, vocab: int,
               seed: int = 0) -> pathlib.Path:
    """Write ``n_ctx`` contexts of ``ctx_len`` random ids to ``path`` as parquet in the reference's schema (spec
    §5.2). Each context gets one QA of ``qa_len`` ids whose last ``answer_len`` are the answer, with ``topk`` teacher
    log-probs per answer token. Returns the path."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, v in (("n_ctx", n_ctx), ("ctx_len", ctx_len), ("qa_len", qa_len), ("answer_len", answer_len),
                    ("topk", topk), ("vocab", vocab)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if answer_len >= qa_len or topk > vocab or vocab < 4:
        raise ValueError(f"expected answer_len < qa_len, topk <= vocab and vocab >= 4, got answer_len {answer_len}, "
                         f"qa_len {qa_len}, topk {topk}, vocab {vocab}")
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("ctx_ids", "input_ids", "response_start_end", "logprobs_vals", "logprobs_indices")}
    for _ in range(n_ctx):
        cols["ctx_ids"].append(rng.integers(3, vocab, ctx_len).tolist())
        cols["input_ids"].append([rng.integers(3, vocab, qa_len).tolist()])
        cols["response_start_end"].append([[qa_len - answer_len, qa_len]])
        cols["logprobs_vals"].append([np.log(rng.dirichlet(np.ones(topk), answer_len)).astype(np.float16).tolist()])
        cols["logprobs_indices"].append([rng.integers(0, vocab, (answer_len, topk)).tolist()])
    ids = pa.list_(pa.int32())
    schema = pa.schema([("ctx_ids", ids), ("input_ids", pa.list_(ids)), ("response_start_end", pa.list_(ids)),
                        ("logprobs_vals", pa.list_(pa.list_(pa.list_(pa.float16())))),
                        ("logprobs_indices", pa.list_(pa.list_(ids)))])
    path = pathlib.Path(path)
    pq.write_table(pa.table(cols, schema=schema), path)
    return path


def reference_copy_estimate(spec, qa_tokens: int, chunks_per_context: int, bytes_per_el: int) -> dict:
    """Spec §1.8: the reference's ``lora_forward_packed`` keeps ``tot_len × R × (d_in + d_out)`` elements per layer
    and targeted module for backward (tot_len = the pack's QA tokens, R = (chunks + 1) · r with the bias LoRA)."""
    if qa_tokens < 1 or chunks_per_context < 1 or bytes_per_el not in (2, 4):
        raise ValueError(f"expected qa_tokens >= 1, chunks_per_context >= 1 and bytes_per_el 2 or 4, got {qa_tokens}, "
                         f"{chunks_per_context}, {bytes_per_el}")
    R = (chunks_per_context + 1) * spec.lora_r
    per_layer = sum(qa_tokens * R * (spec.d_in[m] + spec.d_out[m]) * bytes_per_el for m in spec.target_modules)
    n_layers = len(spec.layer_indices)
    return dict(ref_R=R, ref_layers=n_layers, ref_copy_GiB_per_layer=per_layer / GiB,
                ref_copy_GiB=per_layer * n_layers / GiB)


# ------------------------------------------------------------------------------------------------ the loss path
def liger_unavailable(device: torch.device) -> str | None:
    """None when Liger's fused linear cross-entropy can run on ``device``, else why not."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"liger-kernel not importable: {type(e).__name__}: {e}"
    if device.type != "cuda":
        return f"Liger's kernels run on CUDA only; this step ran on {device.type}"
    return None


@contextlib.contextmanager
def liger_switch(enabled: bool):
    """Within the block the trainer's loss finds Liger only if ``enabled`` (``use_liger=False`` otherwise: the
    trainer itself passes None, "when available"); yields ``{"calls": n}``, the fused kernel's calls."""
    from d2l_fast.training import losses

    orig, calls = losses._liger_fused_ce, {"calls": 0}

    def counted():
        fn = orig()
        if fn is None:
            return None

        def call(*a, **k):
            calls["calls"] += 1
            return fn(*a, **k)

        return call

    losses._liger_fused_ce = counted if enabled else (lambda: None)
    try:
        yield calls
    finally:
        losses._liger_fused_ce = orig


# ------------------------------------------------------------------------------------------------ the step
def _time_ms(fn, cuda: bool):
    if not cuda:
        t = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    out = fn()
    b.record()
    b.synchronize()
    return out, a.elapsed_time(b)


def _param_change(params, snapshot) -> float:
    return float(sum(float((p.detach().cpu().double() - s.double()).square().sum()) for p, s in zip(params, snapshot))
                 ** 0.5)


def _variant_row(d2l, data: pathlib.Path, out: pathlib.Path, variant: str, pack: dict, reps: int, liger_ok: bool,
                 liger_reason: str | None, **cfg_kw) -> dict:
    from d2l_fast.training.config import TrainConfig
    from d2l_fast.training.trainer import Trainer

    kl, per_ctx, allow = VARIANTS[variant]
    cfg = TrainConfig(data=[str(data)], model_name_or_path=d2l.spec.base_model_name_or_path, output_dir=str(out),
                      max_steps=reps + 1, warmup_steps=0, shuffle_buffer=0, use_kl_loss=kl,
                      use_per_ctx_average_loss=per_ctx, max_packed_inp_len=pack["n_ctx"] * pack["qa_len"],
                      max_packed_ctx_len=pack["n_ctx"] * pack["ctx_len"], device=str(d2l.device),
                      disable_tqdm=True, report_to_tensorboard=False, save_reference_format=False, **cfg_kw)
    tr = Trainer(cfg, model=d2l)
    tr._build_model()
    tr._start()
    params = [p for p in d2l.hypernet.parameters() if p.requires_grad]
    cuda = d2l.device.type == "cuda"
    with liger_switch(allow) as liger:
        rec, first_ms = _time_ms(lambda: tr._step(1, params), cuda)
        if rec["contexts"] != pack["n_ctx"]:
            raise RuntimeError(f"the pack holds {rec['contexts']} contexts, expected all {pack['n_ctx']}")
        snapshot = [p.detach().to("cpu", copy=True) for p in params]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else None
        times, recs = [], []
        for step in range(2, reps + 2):
            rec, ms = _time_ms(lambda s=step: tr._step(s, params), cuda)
            times.append(ms)
            recs.append(rec)
        peak = torch.cuda.max_memory_allocated() if cuda else None
    change = _param_change(params, snapshot)
    step_ms = statistics.median(times)
    qa_tokens = pack["n_ctx"] * pack["qa_len"]
    ref = reference_copy_estimate(d2l.spec, qa_tokens, 1, 2 if tr.use_bf16 else 4)
    if liger["calls"]:
        path, reason = "liger_fused_linear_ce", None
    elif kl:
        path, reason = "torch_chunked", ("distillation (top-k soft targets, per-context weights): Liger's fused "
                                         "linear cross-entropy takes hard targets")
    elif not allow:
        path, reason = "torch_chunked", "turned off for the comparison (use_liger=False)"
    else:
        path, reason = "torch_chunked", liger_reason or "Liger was available but not called (unequal token weights?)"
    last = recs[-1]
    return dict(
        section="train", variant=variant, objective="distill" if kl else "ce", average="context" if per_ctx else
        "token", student_packing=cfg.student_packing, device=str(d2l.device),
        dtype="bf16 autocast, bf16 base" if tr.use_bf16 else "fp32", base_layers=len(tr.decoder.layers),
        hypernet_params_M=sum(p.numel() for p in params) / 1e6, contexts=rec["contexts"],
        ctx_tokens=pack["n_ctx"] * pack["ctx_len"], qa_tokens=qa_tokens,
        answer_tokens=pack["n_ctx"] * pack["answer_len"], tokens=last["tokens"], first_step_ms=first_ms,
        step_ms=step_ms, step_ms_all=times, tokens_per_s=last["tokens"] / (step_ms / 1e3),
        mem_before_GiB=None if before is None else before / GiB, peak_mem_GiB=None if peak is None else peak / GiB,
        step_extra_GiB=None if peak is None else (peak - before) / GiB, loss=last["loss"],
        task_loss=last["task_loss"], l1=last["l1"], grad_norm=last["grad_norm"],
        loss_finite=all(torch.isfinite(torch.tensor(r["loss"])).item() for r in recs), param_change=change,
        loss_path=path, liger_calls=liger["calls"], liger_available=liger_ok, liger_reason=reason, **ref,
        ref_peak_est_GiB=None if peak is None else peak / GiB + ref["ref_copy_GiB"])


def train_rows(d2l, *, pack: dict | None = None, variants=tuple(VARIANTS), reps: int = 2, left_s=None, seed: int = 0,
               **cfg_kw):
    """Rows of scripts/gpu_suite.py's ``train`` section for ``d2l`` (a D2LModel whose hypernetwork trains; its spec
    must name a ``base_model_name_or_path``): one dict per variant, then a ``train_summary`` row. ``pack``: the
    keyword arguments of :func:`write_pack` except ``vocab`` (default :data:`MAIN_PACK`); ``reps``: timed steps after
    the warm-up step; ``left_s()``: seconds left (a variant is skipped below 20); ``cfg_kw``: further
    :class:`~d2l_fast.training.config.TrainConfig` fields (e.g. ``student_packing``)."""
    pack = dict(MAIN_PACK if pack is None else pack)
    if set(pack) != set(MAIN_PACK):
        raise ValueError(f"pack must have the keys {sorted(MAIN_PACK)}, got {sorted(pack)}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"variants must be a non-empty selection of {list(VARIANTS)}, got {list(variants)}")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be a positive int, got {reps!r}")
    if not getattr(d2l.spec, "base_model_name_or_path", None):
        raise ValueError("the D2LModel's spec must name its base model (D2LModel.from_base(..., "
                         "base_model_name_or_path=...)): the trainer checks it")
    reason = liger_unavailable(d2l.device)
    by = {}
    with tempfile.TemporaryDirectory(prefix="d2l-train-step-") as tmp:
        data = write_pack(pathlib.Path(tmp) / "pack.parquet", vocab=d2l.vocab_size, seed=seed, **pack)
        for v in variants:
            if v == "ce_no_liger" and reason is not None:
                yield dict(section="train", variant=v, status=f"skipped: Liger not available ({reason})")
                continue
            if left_s is not None and left_s() < 20:
                yield dict(section="train", variant=v, status="skipped: out of time budget")
                continue
            try:
                row = _variant_row(d2l, data, pathlib.Path(tmp) / f"out-{v}", v, pack, reps, reason is None, reason,
                                   **cfg_kw)
            except torch.OutOfMemoryError as e:  # the other variants may still fit
                row = dict(section="train", variant=v, status=f"error: out of memory: {str(e)[:300]}")
            by[v] = row
            if d2l.device.type == "cuda":
                torch.cuda.empty_cache()
            yield row
    if "step_ms" in by.get("ce", {}) and "step_ms" in by.get("ce_no_liger", {}):
        a, b = by["ce"], by["ce_no_liger"]
        yield dict(section="train_summary", case="ce: Liger vs torch chunked", liger_ran=a["liger_calls"] > 0,
                   step_torch_vs_liger=b["step_ms"] / a["step_ms"],
                   peak_torch_minus_liger_GiB=None if a["peak_mem_GiB"] is None else
                   b["peak_mem_GiB"] - a["peak_mem_GiB"], loss_rel_diff=abs(a["loss"] - b["loss"]) / abs(b["loss"]))


# ------------------------------------------------------------------------------------------------ CPU run
def tiny_gemma2(seed: int = 0, dtype=torch.float32):
    """A small random Gemma-2 (soft-capping, sliding window, tied embeddings), eager attention as the trainer loads
    Gemma-2, in eval mode."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                       sliding_window=64, max_position_embeddings=512, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager").eval()


def tiny_d2l(seed: int = 0, device: str = "cpu"):
    """:func:`tiny_gemma2` with a small fresh hypernetwork (scaler_B ~ N(0, 0.02²) so every adapter matters)."""
    from d2l_fast import D2LModel

    base = tiny_gemma2(seed).to(device)
    return D2LModel.from_base(base, None, seed=seed, base_model_name_or_path="tiny-random-gemma2",
                              init_scaler_B=0.02, **TINY_HYPERNET)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Gemma-2 and a small pack (runs on CPU)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--reps", type=int, default=2, help="timed steps after the warm-up step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    if not a.tiny:
        print("bench_train_step: the Gemma-2-2b-shaped run is scripts/gpu_suite.py --only env,train (it builds the "
              "model); pass --tiny for the small CPU run", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    rows = list(train_rows(tiny_d2l(device=a.device), pack=TINY_PACK, variants=tuple(a.variants.split(",")),
                           reps=a.reps))
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "device": a.device, "threads": a.threads}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
