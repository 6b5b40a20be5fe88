"""Where a training step of the reading run goes (issue 16): contexts/s and the time of each phase.

    PYTHONPATH=$PWD python scripts/profile_train_step.py --data DIR --init-checkpoint CKPT \\
        --variant '' --variant '--student-packing shared_prefix' --variant '--bf16 --student-packing shared_prefix'

Builds the :class:`~d2l_fast.training.trainer.Trainer` exactly as ``scripts/train_reading.py`` does (its flags, its
defaults: packed inputs ≤ 1,024 tokens, contexts ≤ 3,072), once per ``--variant`` (that script's flags), on the
parquet folder ``--data`` (e.g. a copy of a few hundred rows of the run's ``data_chunk256``). Every variant steps
through the same packs; after ``--warmup`` untimed steps each, ``--rounds`` rounds run ``--steps`` timed steps of
every variant in turn, and it prints contexts/s with the share of each phase: data (stream + collate), frozen
encoder (the context forward), hypernetwork forward (+ merge), student forward over the packed questions, loss,
backward (split at the moment the adapters' gradients are complete: student backward, then hypernetwork backward)
and the optimizer step.
Wall time only (time.perf_counter); run it under ``/work/notes/quiet.sh`` for numbers worth comparing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import pathlib
import shlex
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


_ACTIVE: dict = {}  # the store of the variant now stepping (module-level functions are patched once)


def _timed(store, name: str, fn):
    """``fn`` adding its wall time to ``store[name]``; ``store=None``: to the active variant's store."""

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            (store if store is not None else _ACTIVE["store"])[name] += time.perf_counter() - t

    return wrapper


def _patch_module_functions() -> None:
    import d2l_fast.training.trainer as tr

    if not getattr(tr, "_profiled", False):
        tr.qa_loss = _timed(None, "loss", tr.qa_loss)
        tr.collate = _timed(None, "data", tr.collate)
        tr._profiled = True


def instrument(trainer, store: dict) -> dict:
    """Patch the trainer's model and loss with timers adding into ``store`` (seconds per phase)."""
    _patch_module_functions()
    m = trainer.model
    marks: dict = {}
    m.ctx_encoder.encode_packed = _timed(store, "encoder", m.ctx_encoder.encode_packed)
    m.hypernet.forward = _timed(store, "hypernet_fwd", m.hypernet.forward)
    merge = m.merge

    def merged(*args, **kwargs):
        t = time.perf_counter()
        out = merge(*args, **kwargs)
        store["hypernet_fwd"] += time.perf_counter() - t

        def hook(g):
            marks["adapter_grad"] = time.perf_counter()
            return g

        for d in (out.A, out.B):
            for v in d.values():
                if v.requires_grad:
                    v.register_hook(hook)
        return out

    m.merge = merged
    trainer.decoder = _timed(store, "student_fwd", trainer.decoder)
    trainer.stream.next = _timed(store, "data", trainer.stream.next)
    trainer.optimizer.step = _timed(store, "optimizer", trainer.optimizer.step)
    return marks


class _Run:
    """One variant's trainer, instrumented, stepping on its own stream (the same packs as every other variant)."""

    def __init__(self, trainer):
        self.trainer = trainer
        trainer._build_model()
        self.store: dict = collections.defaultdict(float)
        self.step = trainer._start()
        self.marks = instrument(trainer, self.store)
        self.params = [p for p in trainer.model.hypernet.parameters() if p.requires_grad]
        self.times: list[float] = []
        self.contexts = 0

    def run(self, n: int, timed: bool) -> None:
        backward = torch.Tensor.backward
        store, marks = self.store, self.marks
        before = dict(store)

        def timed_backward(self_, *a, **k):
            t = time.perf_counter()
            backward(self_, *a, **k)
            end = time.perf_counter()
            split = marks.get("adapter_grad", end)
            store["student_bwd"] += split - t
            store["hypernet_bwd"] += end - split

        torch.Tensor.backward = timed_backward
        _ACTIVE["store"] = store
        try:
            for _ in range(n):
                self.step += 1
                t = time.perf_counter()
                rec = self.trainer._step(self.step, self.params)
                if timed:
                    self.times.append(time.perf_counter() - t)
                    self.contexts += rec["contexts"]
                    store["tokens"] += rec["tokens"]
        finally:
            torch.Tensor.backward = backward
        if not timed:
            store.clear()
            store.update(before)

    def summary(self) -> dict:
        total = sum(self.times)
        out = {k: float(v) for k, v in self.store.items()}
        out["steps"] = len(self.times)
        out["step_s"] = total / len(self.times)
        out["contexts_per_s"] = self.contexts / total
        out["contexts_per_step"] = self.contexts / len(self.times)
        out["other"] = total - sum(v for k, v in out.items() if k in PHASES)
        return out


PHASES = ("data", "encoder", "hypernet_fwd", "student_fwd", "loss", "student_bwd", "hypernet_bwd", "optimizer")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="parquet folder (the run's schema)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the variants (interleaved: slow spells of "
                    "other processes hit every variant alike)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init-checkpoint", default=None)
    ap.add_argument("--variant", action="append", default=None, metavar="FLAGS",
                    help="scripts/train_reading.py flags of one variant, e.g. '--bf16 --student-packing "
                         "shared_prefix' (repeat; default: one variant with no flags, the live run's settings)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.rounds < 1:
        ap.error(f"--steps and --rounds must be ≥ 1 and --warmup ≥ 0, got {a.steps} / {a.rounds} / {a.warmup}")
    torch.set_num_threads(a.threads)
    import train_reading

    from d2l_fast.training.trainer import Trainer

    variants = a.variant or [""]
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i, flags in enumerate(variants):
            out = pathlib.Path(tmp) / str(i)
            ra = train_reading.build_parser().parse_args(["--out", str(out), "--max-steps", "100000",
                                                          *shlex.split(flags)])
            lo, hi = (int(v) for v in ra.layers.split(":"))
            ra.init_checkpoint = a.init_checkpoint
            cfg = train_reading.train_config(ra, a.data, out, list(range(lo, hi)))
            cfg.save_steps = 10**6
            runs.append(_Run(Trainer(cfg)))
        for r in runs:
            r.run(a.warmup, timed=False)
        for i in range(a.rounds):
            for flags, r in zip(variants, runs):
                r.run(a.steps, timed=True)
                print(f"round {i + 1} [{flags or 'live run settings'}] {r.summary()['contexts_per_s']:.3f} contexts/s "
                      "so far", flush=True)
    results = {}
    for flags, r in zip(variants, runs):
        res = results[flags or "(live run)"] = r.summary()
        total = res["step_s"] * res["steps"]
        print(f"[{flags or 'live run settings'}] {res['contexts_per_s']:.3f} contexts/s, "
              f"{res['contexts_per_step']:.2f} contexts/step, {res['step_s']:.2f} s/step, "
              f"{res['tokens'] / total:.0f} tokens/s (threads {a.threads})")
        for k in (*PHASES, "other"):
            print(f"  {k:13s} {res.get(k, 0.0) / res['steps']:7.3f} s/step  {100 * res.get(k, 0.0) / total:5.1f} %")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
