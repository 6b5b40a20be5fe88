"""Diagnostics of hypernetwork training on SmolLM2-135M-Instruct (CPU): why a fresh D2L hypernetwork sits on the
NIAH plateau, measured in three ways.

    python scripts/train_diagnostics.py grads --scaler-b 0 --l1 1.5      # gradient magnitudes at init
    python scripts/train_diagnostics.py probe                            # are the digits in the representation?
    python scripts/train_diagnostics.py run --data four --steps 60       # short runs with held-out loss
    python scripts/train_diagnostics.py run --data pool100 --steps 120 --scaler-b 0.1 --l1 0
    python scripts/train_diagnostics.py run --data fresh --steps 120 --scaler-b 0.1 --l1 0

Data (needle-only contexts ``The special magic number is NNNN.``, gold answers, the reference's student prompt):
``four`` = 4 fixed documents (memorisation), ``pool100`` = 3,000 contexts whose numbers come from a pool of 100,
``fresh`` = 3,000 contexts with fresh numbers; the held-out set is 32 numbers outside the pool. Hypernetwork: the
probe configuration (early-exit encoder at layer 7, latent 128, 2 blocks, 4 × 32 heads, one latent query per
layer × rank, LoRA r 8 on every ``down_proj``). ``run`` prints the mean answer loss every 5 steps and the held-out
loss every 25. One thread by default (``--threads``): on a shared 2-core box two OpenMP threads stall each other.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import shutil
import sys
import tempfile
import time

import torch

HYPER = dict(latent_size=128, num_blocks=2, n_heads=4, head_dim=32, n_kv_heads=2, lora_r=8)


def _needle(n: str, i: int) -> dict:
    return {"id": f"n{i}", "task": "niah", "context": f"The special magic number is {n}.",
            "qas": [{"question": "What is the special magic number?", "answers": [n]}]}


def make_data(base, tok, kind: str, root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    from d2l_fast.training.gen_data import generate_data

    rng = random.Random(5)
    pool = sorted({f"{rng.randrange(10000):04d}" for _ in range(100)})
    held: list[str] = []
    while len(held) < 32:
        n = f"{rng.randrange(10000):04d}"
        if n not in pool and n not in held:
            held.append(n)
    if kind == "four":
        nums = [f"{rng.randrange(10000):04d}" for _ in range(4)]
    elif kind == "pool100":
        nums = [rng.choice(pool) for _ in range(3000)]
    elif kind == "fresh":
        nums = [f"{rng.randrange(10000):04d}" for _ in range(3000)]
    else:
        raise ValueError(f"--data must be four, pool100 or fresh, got {kind!r}")
    train, heldout = root / kind, root / "held32"
    if not train.exists():
        generate_data(base, tok, [_needle(n, i) for i, n in enumerate(nums)], train, gold=True)
    if not heldout.exists():
        generate_data(base, tok, [_needle(n, i) for i, n in enumerate(held)], heldout, gold=True)
    return train, heldout


def _trainer(base, tok, data, out, a, steps=1):
    from d2l_fast import D2LModel
    from d2l_fast.demo import smollm2_path
    from d2l_fast.training.trainer import TrainConfig, Trainer

    n_layers = base.config.num_hidden_layers
    cfg = TrainConfig(data=[str(data)], model_name_or_path=str(smollm2_path()), output_dir=str(out), max_steps=steps,
                      max_packed_inp_len=256, max_packed_ctx_len=512, use_kl_loss=False,
                      gen_lora_l1_reg_coef=a.l1, learning_rate=a.lr, warmup_steps=20, min_lr=a.lr / 10, seed=0,
                      save_steps=10**6, disable_tqdm=True, adam_beta2=a.beta2, ctx_encoder_type="early_exit",
                      n_latent_queries=n_layers * 8, **HYPER)
    m = D2LModel.from_base(base, tok, seed=0, init_scaler_B=a.scaler_b or None,
                           base_model_name_or_path=str(smollm2_path()), encoder_type="early_exit",
                           n_latent_queries=n_layers * 8, **HYPER)
    return cfg, Trainer(cfg, model=m)


def cmd_grads(base, tok, a, root):
    from d2l_fast.training.data import PackStream

    data, _ = make_data(base, tok, "fresh", root)
    cfg, tr = _trainer(base, tok, data, root / "g", a)
    tr._build_model()
    pack = PackStream(tr.files, cfg, tr.model.vocab_size).next()
    r = tr._pack_loss(pack, len(pack), 100)
    r["loss"].backward()
    print(f"scaler_B init std {a.scaler_b}, L1 {a.l1}: loss {r['loss'].item():.4f} over {len(pack)} contexts")
    for n, p in tr.model.hypernet.named_parameters():
        if any(k in n for k in ("head.", "scaler", "bias_", "modality_projection.down", "encoder.layers.0.self_attn.q",
                                "layers.0.layers.1.weight")):
            g = p.grad.abs() if p.grad is not None else torch.zeros(1)
            print(f"  {n:62s} |grad| mean {g.mean():.2e} max {g.max():.2e}   |param| mean {p.abs().mean():.2e}")


def cmd_probe(base, tok, a, root):
    """Ridge probe (one-vs-all, held-out 150 of 600) of the first and last digit from the untrained hypernetwork's
    intermediate representations."""
    from d2l_fast import D2LModel

    rng = random.Random(1)
    nums = [f"{rng.randrange(10000):04d}" for _ in range(600)]
    m = D2LModel.from_base(base, tok, seed=0, encoder_type="early_exit", n_latent_queries=240, **HYPER)
    inter: dict = {}
    with torch.no_grad():
        m.chunk_loras(m.pack([f"The special magic number is {n}." for n in nums]), intermediates=inter)
    for pos in (0, 3):
        y = torch.tensor([int(n[pos]) for n in nums])
        for k in ("encoder_latents", "decoder_out", "pre_head"):
            X = inter[k].reshape(len(nums), -1).float()
            X = (X - X.mean(0)) / (X.std(0) + 1e-6)
            Xtr = X[:450]
            onehot = torch.nn.functional.one_hot(y[:450], 10).float()
            W = torch.linalg.solve(Xtr @ Xtr.T + 10.0 * torch.eye(450), onehot)
            acc = ((X[450:] @ Xtr.T @ W).argmax(-1) == y[450:]).float().mean().item()
            print(f"digit {pos + 1} from {k:16s} ({X.shape[1]} dims): held-out accuracy {acc:.3f} (chance 0.1)")


def cmd_run(base, tok, a, root):
    import dataclasses

    from d2l_fast.training.data import PackStream, check_data

    data, held = make_data(base, tok, a.data, root)
    out = root / f"run-{a.data}"
    shutil.rmtree(out, ignore_errors=True)
    cfg, tr = _trainer(base, tok, data, out, a, steps=a.steps)
    hc = dataclasses.replace(cfg, data=[str(held)], shuffle_buffer=0)
    packs = []
    t0, buf = time.time(), []

    def held_loss(trainer):
        if not packs:
            st = PackStream(check_data([str(held)], teacher=False), hc, trainer.model.vocab_size)
            packs.extend(st.next() for _ in range(st.count_epoch()))
        with torch.no_grad():
            return sum(trainer._pack_loss(p, len(p), 100)["task"].item() * len(p) for p in packs) / sum(map(len, packs))

    def cb(trainer, step, rec):
        buf.append(rec["task_loss"])
        if step % 5 == 0:
            sb = torch.cat([p.detach().abs().flatten() for p in trainer.model.hypernet.scaler_B.values()]).mean()
            print(f"step {step:4d}  answer loss {sum(buf) / len(buf):.4f}  grad norm {rec['grad_norm']:.2f}  "
                  f"|scaler_B| {sb:.4f}  {time.time() - t0:.0f} s", flush=True)
            buf.clear()
        if step % 25 == 0:
            print(f"           held-out answer loss {held_loss(trainer):.4f}", flush=True)

    tr.callbacks.append(cb)
    tr.train()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=("grads", "probe", "run"))
    ap.add_argument("--data", default="fresh", help="run: four, pool100 or fresh")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--l1", type=float, default=1.5, help="gen_lora_l1_reg_coef (spec: 1.5 for NIAH)")
    ap.add_argument("--scaler-b", type=float, default=0.0, help="std of the scaler_B init (0: the reference's zeros)")
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", help="where data and runs go (default: a temporary folder)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from d2l_fast.demo import load_smollm2

    base, tok = load_smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(a.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        {"grads": cmd_grads, "probe": cmd_probe, "run": cmd_run}[a.cmd](base, tok, a, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
