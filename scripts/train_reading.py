"""Train the SmolLM2-135M-Instruct reading model (issue 16) on this CPU: generate data, train (resumable), evaluate.

    python scripts/train_reading.py --out runs/reading --max-steps 2000 \\
        --init-checkpoint d2l_fast/data/pretrained/smollm2-135m                      # data + training
    python scripts/train_reading.py --out runs/reading --max-steps 2000 --resume    # continue a stopped run
    python scripts/train_reading.py --out runs/reading --eval-only --split dev      # evaluate the newest checkpoint

Data (``d2l_fast.training.reading``, train split, gold answers, cross-entropy on the answer tokens): prose fact
documents, number documents, NIAH with varied needles and real prose filler (32–256 tokens), long documents
(512–2,048 tokens, with ``--chunk-len`` split into chunks whose LoRAs the trainer merges, as ``internalize`` does)
and no-hijack questions (general knowledge with fixed short answers, chit-chat answered by the base model itself,
absent facts answered "The document does not say."). Student prompts use the evaluation layout (empty system
message, the "answer only" instruction, ``Question: ...``). Several questions of one document share one encoder
and hypernetwork pass (``max_qas_per_sample=-1``).

Hypernetwork: the shipped ``smollm2-135m`` configuration (early-exit encoder at layer 7, latent 128, 2 blocks,
4 × 32 heads, one latent query per (layer, rank), r 8, ``down_proj`` of layers 14–29), so ``--init-checkpoint``
can start from the shipped weights. Checkpoints every ``--save-steps`` steps; ``--resume`` continues the newest.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import threading
import time

import torch

COPY_BINS = ((32, 128), (128, 256), (256, 512), (512, 1024))
SPLIT_SEEDS = {"train": 100, "dev": 1, "test": 2}  # eval data seeds (train data uses --data-seed, never 100)


def contexts_per_s(metrics_path: pathlib.Path, last: int | None = None) -> tuple[int, float]:
    """(steps, contexts/s over them) from the trainer's metrics.jsonl (per step: tokens / tokens_per_s = seconds)."""
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()] if metrics_path.exists() \
        else []
    rows = rows[-last:] if last else rows
    secs = sum(r["tokens"] / r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))
    return len(rows), (sum(r.get("contexts", 0) for r in rows) / secs if secs else float("nan"))


def _monitor(metrics_path: pathlib.Path, stop: threading.Event, every_s: float = 60.0) -> None:
    seen = 0
    while not stop.wait(every_s):
        rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
        if len(rows) > seen:
            n, cps = contexts_per_s(metrics_path, last=len(rows) - seen)
            r = rows[-1]
            print(f"step {r['step']}: loss {r['loss']:.4f}, {cps:.2f} contexts/s over the last {n} steps", flush=True)
            seen = len(rows)


def _records(tok, a, split: str, base_answers, *, training: bool = False):
    from d2l_fast.training.reading import (
        LONG_BINS,
        NIAH_EVAL_BINS,
        NIAH_TRAIN_BINS,
        generate_copy_docs,
        generate_niah_docs,
        generate_reading,
    )

    if training:
        recs = []
        if a.n_facts or a.n_numbers or a.n_niah_per_bin or a.n_long_per_bin or a.n_nohijack:
            recs = generate_reading(tok, split="train", seed=a.data_seed, n_facts=a.n_facts, n_numbers=a.n_numbers,
                                    n_niah_per_bin=a.n_niah_per_bin, n_long_per_bin=a.n_long_per_bin,
                                    long_bins=LONG_BINS, n_nohijack=a.n_nohijack, base_answers=base_answers,
                                    niah_questions=a.niah_questions, niah_absent_prob=a.niah_absent,
                                    nohijack_present=a.nohijack_present, story_filler=a.story_filler,
                                    fact_absent_prob=a.fact_absent, hard_absent=a.hard_absent)
        if a.n_niah_long_per_bin:  # needles in the evaluation's longer bins, read through the chunk stage
            recs += generate_niah_docs(tok, split="train", bins=NIAH_EVAL_BINS[len(NIAH_TRAIN_BINS):],
                                       n_per_bin=a.n_niah_long_per_bin, seed=a.data_seed + 1000,
                                       n_questions=a.niah_questions,
                                       absent_prob=a.niah_absent if a.niah_absent_long is None else a.niah_absent_long,
                                       story_filler=a.story_filler)
        if a.n_copy_per_bin:  # copy needles: invented words, names and codes in prose, 32 to 1,024 tokens
            recs += generate_copy_docs(tok, split="train", bins=COPY_BINS, n_per_bin=a.n_copy_per_bin,
                                       seed=a.data_seed, absent_prob=a.niah_absent, story_filler=a.story_filler)
        if not recs:
            raise SystemExit("every train count is 0: nothing to train on")
        return recs
    recs = generate_reading(tok, split=split, seed=SPLIT_SEEDS[split], n_facts=a.n_eval_facts,
                            n_numbers=a.n_eval_numbers, n_niah_per_bin=a.n_eval_niah_per_bin,
                            niah_bins=NIAH_EVAL_BINS[: a.eval_bins], n_long_per_bin=a.n_eval_long_per_bin,
                            n_nohijack=a.n_eval_nohijack, base_answers=base_answers)
    if split == "train" and a.n_eval_copy_per_bin:  # copy needles exist for the train split only
        recs += generate_copy_docs(tok, split="train", bins=COPY_BINS, n_per_bin=a.n_eval_copy_per_bin,
                                   seed=SPLIT_SEEDS["train"], absent_prob=0.0)
    return recs


def _chitchat(base, tok, split: str, cache: pathlib.Path):
    from d2l_fast.training.evaluate import EVAL_INSTRUCTION
    from d2l_fast.training.reading_pools import CHITCHAT_QUESTIONS
    from d2l_fast.training.reading_run import base_model_answers

    return base_model_answers(base, tok, CHITCHAT_QUESTIONS[split], instruction=EVAL_INSTRUCTION, cache=cache)


def make_data(base, tok, a, out: pathlib.Path) -> pathlib.Path:
    """Generate the train records and their parquet data (once); returns the folder the trainer reads."""
    from d2l_fast.demo import smollm2_path
    from d2l_fast.training.evaluate import EVAL_INSTRUCTION
    from d2l_fast.training.gen_data import generate_data
    from d2l_fast.training.generators import write_records
    from d2l_fast.training.reading_run import chunk_dataset, eval_layout

    raw = out / "data"
    if not (raw / "gen_data.json").exists():
        t = time.time()
        answers = _chitchat(base, tok, "train", out / "base_answers_train.json") if a.n_nohijack else None
        recs = _records(tok, a, "train", answers, training=True)
        if a.general_from_base:
            from d2l_fast.training.reading import general_training_questions, rebase_general
            from d2l_fast.training.reading_run import base_model_answers

            general = base_model_answers(base, tok, general_training_questions(), instruction=EVAL_INSTRUCTION,
                                         cache=out / "base_answers_general_train.json")
            recs = rebase_general(recs, general, seed=a.data_seed)
        write_records(recs, out / "train_records.jsonl")
        stats = generate_data(base, tok, eval_layout(recs, EVAL_INSTRUCTION), raw, gold=True, system="",
                              shuffle_seed=a.data_seed)
        kinds = {}
        for r in recs:
            kinds[r["meta"]["kind"]] = kinds.get(r["meta"]["kind"], 0) + 1
        print(f"data: {kinds}, {stats['rows']} rows, {stats['kept']} questions in {time.time() - t:.0f} s",
              flush=True)
    if not a.chunk_len:
        return raw
    chunked = out / f"data_chunk{a.chunk_len}"
    if not (chunked / "chunks.json").exists():
        st = chunk_dataset(raw, chunked, tok, a.chunk_len, model_name=str(smollm2_path()))
        print(f"chunked at {a.chunk_len}: {st}", flush=True)
    return chunked


def run_eval(base, tok, a, out: pathlib.Path, path: pathlib.Path) -> dict:
    from d2l_fast import D2LModel
    from d2l_fast.training.evaluate import evaluate, format_summary
    from d2l_fast.training.generators import write_records
    from d2l_fast.training.reading_run import reading_report

    model = D2LModel.from_checkpoint(str(path), base_model=base, tokenizer=tok)
    answers = _chitchat(base, tok, a.split, out / f"base_answers_{a.split}.json") if a.n_eval_nohijack else None
    recs = _records(tok, a, a.split, answers)
    eval_dir = pathlib.Path(a.eval_out) if a.eval_out else out / f"eval_{a.split}_{path.name}"
    summary = evaluate(model, recs, eval_dir, methods=a.eval_methods.split(","), max_new_tokens=a.max_new_tokens,
                       overwrite=True, max_chunk_len=a.chunk_len or None)
    rows = [json.loads(ln) for ln in (eval_dir / "samples.jsonl").read_text().splitlines() if ln.strip()]
    report = reading_report(recs, rows)
    write_records(recs, eval_dir / "records.jsonl")
    (eval_dir / "reading_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_summary(summary), flush=True)
    print(json.dumps({"checkpoint": str(path), "split": a.split, "report": report}, indent=1)[:12000], flush=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--n-facts", type=int, default=6000, help="train fact documents")
    ap.add_argument("--n-numbers", type=int, default=6000, help="train number documents")
    ap.add_argument("--n-niah-per-bin", type=int, default=1500, help="train NIAH documents per bin (32–128, 128–256)")
    ap.add_argument("--niah-questions", type=int, default=1, help="train: wordings of the needle question per "
                    "NIAH document (the encoder runs once for all)")
    ap.add_argument("--niah-absent", type=float, default=0.0, help="train: probability of a question about "
                    "another needle (gold: the document does not say) in a NIAH document")
    ap.add_argument("--niah-absent-long", type=float, default=None, help="train: --niah-absent for the longer "
                    "NIAH documents (--n-niah-long-per-bin) alone; default: --niah-absent. 0 keeps the absent "
                    "questions in single-chunk documents, so empty chunks are not taught to refuse")
    ap.add_argument("--n-niah-long-per-bin", type=int, default=0, help="train NIAH documents per longer bin "
                    "(256–512, 512–1,024, 1,024–2,048); use with --chunk-len")
    ap.add_argument("--n-copy-per-bin", type=int, default=0, help="train copy-needle documents (invented words, "
                    "names and codes to copy; 1–3 needles, --niah-absent for the unanswered question) per bin of "
                    "32–128, 128–256, 256–512, 512–1,024 tokens")
    ap.add_argument("--n-long-per-bin", type=int, default=0, help="train long documents per bin (512–1,024, "
                    "1,024–2,048); use with --chunk-len")
    ap.add_argument("--n-nohijack", type=int, default=2000, help="train documents with unanswered questions")
    ap.add_argument("--nohijack-present", action="store_true", help="train: each no-hijack document also asks "
                    "one question it does answer (beside its unanswered ones)")
    ap.add_argument("--fact-absent", type=float, default=None, help="train: probability of an unanswered "
                    "question about the main person in a fact document (default: the generator's 0.25)")
    ap.add_argument("--hard-absent", type=float, default=0.0, help="train: probability that an unanswered fact or "
                    "number question asks what a distractor holds or a thing of the kind of a stated one (another "
                    "city, another person, another year) — the binding negatives; 0 keeps the data as it was")
    ap.add_argument("--general-from-base", action="store_true", help="train: general-knowledge questions come "
                    "from a larger train-only list with the base model's own answer as gold (rebase_general)")
    ap.add_argument("--story-filler", action="store_true", help="train: some filler of the needle, copy, long and "
                    "no-hijack documents is everyday prose (d2l_fast.training.reading_stories), not only docstrings "
                    "and licences")
    ap.add_argument("--chunk-len", type=int, default=0, help="split contexts longer than this into chunks (0: off)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--l1", type=float, default=0.0)
    ap.add_argument("--layers", default="14:30")
    ap.add_argument("--latent-size", type=int, default=128)
    ap.add_argument("--num-blocks", type=int, default=2)
    ap.add_argument("--init-scaler-b", type=float, default=1.0)
    ap.add_argument("--max-packed-inp-len", type=int, default=1024)
    ap.add_argument("--max-packed-ctx-len", type=int, default=3072)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--save-steps", type=int, default=25)
    ap.add_argument("--bf16", action="store_true", help="bf16 base model and autocast (AMX CPUs: see "
                    "docs/training-reading.md, Training speed); default fp32 on CPU")
    ap.add_argument("--student-packing", default="dense", choices=("dense", "segments", "shared_prefix"),
                    help="student row layout (TrainConfig.student_packing): shared_prefix is the fastest, same loss")
    ap.add_argument("--copy-modules", default="", help="comma-separated target modules that get a copy head "
                    "(d2l_fast.hypernet.copy_head, e.g. down_proj); added zero-gated to an --init-checkpoint "
                    "without one")
    ap.add_argument("--init-checkpoint", default=None, help="start from this checkpoint's hypernetwork")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("D2L_TRAIN_THREADS", "2")))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--data-only", action="store_true")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--split", default="dev", choices=("train", "dev", "test"),
                    help="evaluation split (test: final table only; train: eval-sized data of the train pools, seed "
                         f"{SPLIT_SEEDS['train']}, to tell not-learned from not-generalized)")
    ap.add_argument("--checkpoint", help="evaluate this checkpoint (default: the run's newest)")
    ap.add_argument("--eval-bins", type=int, default=5, help="NIAH evaluation bins: the first N of 32–2,048")
    ap.add_argument("--n-eval-facts", type=int, default=60)
    ap.add_argument("--n-eval-numbers", type=int, default=60)
    ap.add_argument("--n-eval-niah-per-bin", type=int, default=20)
    ap.add_argument("--n-eval-long-per-bin", type=int, default=10)
    ap.add_argument("--n-eval-nohijack", type=int, default=30)
    ap.add_argument("--n-eval-copy-per-bin", type=int, default=10,
                    help="copy-needle documents per bin in a --split train evaluation (dev/test have none)")
    ap.add_argument("--eval-methods", default="base,in_context,in_context_fewshot,d2l")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--eval-out", default=None)
    return ap


def train_config(a, data, out: pathlib.Path, layers: list[int]):
    """The run's TrainConfig from the parsed flags (also used by ``scripts/profile_train_step.py``)."""
    from d2l_fast.demo import smollm2_path
    from d2l_fast.training.trainer import TrainConfig

    return TrainConfig(
        data=[str(data)], model_name_or_path=str(smollm2_path()), output_dir=str(out / "run"),
        max_steps=a.max_steps, max_packed_inp_len=a.max_packed_inp_len, max_packed_ctx_len=a.max_packed_ctx_len,
        max_qas_per_sample=-1, use_kl_loss=False, gen_lora_l1_reg_coef=a.l1, learning_rate=a.lr,
        warmup_steps=a.warmup_steps, min_lr=a.lr / 10, seed=0, latent_size=a.latent_size, num_blocks=a.num_blocks,
        n_heads=4, head_dim=32, n_kv_heads=2, n_latent_queries=len(layers) * 8, lora_r=8,
        ctx_encoder_type="early_exit", layer_indices=layers, init_scaler_B=a.init_scaler_b or None,
        save_steps=a.save_steps, save_total_limit=3, disable_tqdm=True, resume=a.resume,
        init_checkpoint=None if a.resume else a.init_checkpoint, bf16=True if a.bf16 else None,
        student_packing=a.student_packing, copy_modules=[m for m in a.copy_modules.split(",") if m],
    )  # fmt: skip


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.data_seed in (SPLIT_SEEDS["train"], SPLIT_SEEDS["train"] - 1000):
        ap.error(f"--data-seed {a.data_seed} would overlap the train-split evaluation data "
                 f"(seed {SPLIT_SEEDS['train']})")
    torch.set_num_threads(a.threads)
    from d2l_fast.demo import load_smollm2
    from d2l_fast.training.trainer import find_checkpoints, train

    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base, tok = load_smollm2()
    lo, hi = (int(v) for v in a.layers.split(":"))
    layers = list(range(lo, hi))
    if not a.eval_only:
        data = make_data(base, tok, a, out)
        if a.data_only:
            return 0
        cfg = train_config(a, data, out, layers)
        metrics = out / "run" / "metrics.jsonl"
        stop = threading.Event()
        mon = threading.Thread(target=_monitor, args=(metrics, stop), daemon=True)
        mon.start()
        t = time.time()
        try:
            res = train(cfg)
        finally:
            stop.set()
        n, cps = contexts_per_s(metrics)
        print(f"trained to step {res.step} in {time.time() - t:.0f} s; {cps:.2f} contexts/s over {n} steps",
              flush=True)
        return 0
    path = pathlib.Path(a.checkpoint) if a.checkpoint else None
    if path is None:
        ckpts = find_checkpoints(out / "run")
        if not ckpts:
            print("no checkpoint written", file=sys.stderr)
            return 1
        path = ckpts[-1][1]
    run_eval(base, tok, a, out, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
