"""NIAH training probe on SmolLM2-135M-Instruct, CPU: generate data, train, evaluate on held-out needles.

    python benchmarks/train_niah_smollm2.py --out runs/niah_probe --max-steps 600      # ~2 s per step on 2 cores
    python benchmarks/train_niah_smollm2.py --out runs/niah_probe --max-steps 1200 --resume   # continue
    python benchmarks/train_niah_smollm2.py --out runs/niah_short --bins 10-24 --max-steps 700   # needle-only-ish

Data: NIAH records of spec §5.2 (``d2l_fast.training.generators.generate_niah``), 32–256 tokens, gold answers
(cross-entropy), fresh numbers per record; held-out: another seed. Hypernetwork: the reference's NIAH choices
scaled to the CPU budget (early-exit encoder at a quarter of the depth, one latent query per (layer, rank) as
the reference's NIAH config, a small latent, few blocks), L1 1.5. Prints the held-out exact-match of D2L and of
the base model without the document (`summary.json` under ``--out/eval``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--n-train-per-bin", type=int, default=1500)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--latent-size", type=int, default=128)
    ap.add_argument("--num-blocks", type=int, default=2)
    ap.add_argument("--n-latent-queries", type=int, default=None,
                    help="default: layers x lora_r (the reference's NIAH)")
    ap.add_argument("--bins", default="32-128,128-256", help="token-length bins lo-hi,... (train and held-out)")
    ap.add_argument("--save-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from d2l_fast import D2LModel
    from d2l_fast.demo import load_smollm2, smollm2_path
    from d2l_fast.training.evaluate import evaluate
    from d2l_fast.training.gen_data import generate_data
    from d2l_fast.training.generators import generate_niah
    from d2l_fast.training.trainer import TrainConfig, find_checkpoints, train

    bins = tuple(tuple(int(v) for v in b.split("-")) for b in a.bins.split(","))
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base, tok = load_smollm2()
    n_layers = base.config.num_hidden_layers
    data_dir = out / "data"
    if not (data_dir / "gen_data.json").exists():
        t = time.time()
        recs = generate_niah(tok, bins=bins, n_per_bin=a.n_train_per_bin, seed=0)
        stats = generate_data(base, tok, recs, data_dir, gold=True)
        print(f"data: {stats} in {time.time() - t:.0f} s", flush=True)
    lora_r = 8
    cfg = TrainConfig(
        data=[str(data_dir)], model_name_or_path=str(smollm2_path()), output_dir=str(out / "run"),
        max_steps=a.max_steps, max_packed_inp_len=512, max_packed_ctx_len=1024, use_kl_loss=False,
        gen_lora_l1_reg_coef=1.5, learning_rate=a.lr, warmup_steps=20, min_lr=a.lr / 10, seed=0,
        latent_size=a.latent_size, num_blocks=a.num_blocks, n_heads=4, head_dim=32, n_kv_heads=2,
        n_latent_queries=a.n_latent_queries or n_layers * lora_r, lora_r=lora_r, ctx_encoder_type="early_exit",
        save_steps=a.save_steps, save_total_limit=2, disable_tqdm=True, resume=a.resume,
    )  # fmt: skip
    t = time.time()
    res = train(cfg)
    print(f"trained to step {getattr(res, 'step', '?')} in {time.time() - t:.0f} s", flush=True)
    ckpts = find_checkpoints(out / "run")
    if not ckpts:
        print("no checkpoint written", file=sys.stderr)
        return 1
    step, path = ckpts[-1]
    model = D2LModel.from_checkpoint(str(path), base_model=base, tokenizer=tok)
    held = generate_niah(tok, bins=bins, n_per_bin=max(1, a.n_eval // len(bins)), seed=12345)
    summary = evaluate(model, held, out / "eval", methods=("base", "d2l"), max_new_tokens=8, overwrite=True,
                       plot=False)
    print(json.dumps({"step": step, "summary": summary}, indent=1, default=str)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
