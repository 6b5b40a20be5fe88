"""``d2l-fast train``: train the hypernetwork; one flag per :class:`~d2l_fast.training.trainer.TrainConfig` field
(unset flags are left to ``--config`` and the config's defaults)."""

from __future__ import annotations

import argparse

from ._common import CLIError

NAME = "train"

# flags of `d2l-fast train` that differ from --<field-name> (reference / HF names stay available as the long form)
TRAIN_ALIASES = {"model_name_or_path": ["--base-model"], "learning_rate": ["--lr"],
                 "overwrite_output_dir": ["--overwrite"], "init_checkpoint": ["--init-from"]}


def bool_flag(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def add_parser(sub):
    t = sub.add_parser(NAME, help="train the hypernetwork on the reference's parquet QA data (spec §5)",
                       description="Train a Doc-to-LoRA hypernetwork: --config cfg.json and/or flags (one per "
                                   "TrainConfig field). Example: d2l-fast train --data data/ --base-model "
                                   "HuggingFaceTB/SmolLM2-135M-Instruct --output-dir runs/a --max-steps 1000")
    add_train_flags(t)
    t.set_defaults(fn=run, loads_models=True)
    return t


def add_train_flags(t) -> None:
    import dataclasses

    from ..training.trainer import TrainConfig

    t.add_argument("--config", help="JSON file of TrainConfig fields; flags given on the command line override it")
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}"] + TRAIN_ALIASES.get(f.name, [])
        kind = str(f.type)
        if f.name in ("resume", "overwrite_output_dir", "disable_tqdm"):
            t.add_argument(*flags, dest=f.name, action="store_true", default=argparse.SUPPRESS)
        elif f.name in ("data", "target_modules", "copy_modules"):
            t.add_argument(*flags, dest=f.name, nargs="+", default=argparse.SUPPRESS)
        elif f.name == "layer_indices":
            t.add_argument(*flags, dest=f.name, nargs="+", type=int, default=argparse.SUPPRESS)
        elif kind.startswith("bool"):
            t.add_argument(*flags, dest=f.name, type=bool_flag, default=argparse.SUPPRESS, metavar="{true,false}")
        elif kind.startswith("int"):
            t.add_argument(*flags, dest=f.name, type=int, default=argparse.SUPPRESS)
        elif kind.startswith("float"):
            t.add_argument(*flags, dest=f.name, type=float, default=argparse.SUPPRESS)
        else:
            t.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS)


def run(args) -> int:
    import dataclasses

    from ..training.config import read_config_json
    from ..training.trainer import TrainConfig, Trainer, TrainingDivergedError

    d = {}
    if args.config:
        d = read_config_json(args.config, CLIError)
    d.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})
    cfg = TrainConfig.from_dict(d, source=args.config or "arguments")
    try:
        res = Trainer(cfg).train()
    except TrainingDivergedError as e:
        raise CLIError(str(e)) from None
    last = f"; last checkpoint {res.checkpoint}" if res.checkpoint else ""
    print(f"trained {res.step} steps; final loss {res.losses[-1] if res.losses else float('nan'):.4f}; "
          f"metrics {res.metrics_path}{last}")
    return 0
