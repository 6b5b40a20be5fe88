"""The Doc-to-LoRA trainer (spec §5): ``d2l-fast train`` and :class:`Trainer`.

One optimizer step = ``gradient_accumulation_steps`` packed rows (per process). Each row is a greedy pack
(:func:`~d2l_fast.training.data.greedy_pack`, spec §5.3) of consecutive (context, QA) examples under an input-token
and a context-token budget, with no padding anywhere:

1. the contexts' chunks go through the frozen context encoder in one packed pass under ``torch.no_grad`` (no
   autograd graph through the encoder), then through the hypernetwork with grad → one LoRA per chunk, merged into
   one adapter per context (bias LoRA included, spec §1.6);
2. the QA sequences run as ONE row through the frozen base LM, position ids restarting per QA, each QA segment
   using its own context's adapter through the segmented LoRA op (no per-token LoRA copies);
3. the loss (:func:`~d2l_fast.training.losses.qa_loss`) takes the final hidden states at the answer positions and
   the lm_head weight (+ Gemma-2's final soft-cap) and never forms ``[tokens, vocab]`` logits: context
   distillation against the teacher's top-k log-probs (``use_kl_loss``) or cross-entropy (NIAH), averaged per
   context over the whole accumulation window (``use_per_ctx_average_loss``) or per label token, plus
   ``gen_lora_l1_reg_coef`` × the L1 norm of the combined LoRAs (spec §5.1).

Only the hypernetwork has trainable parameters. AdamW with the reference's weight-decay exclusions (LayerNorm /
Embedding modules and names holding ``scaler``, ``bias``, ``layernorm``, ``rmsnorm``, ``latents_q``), a cosine
schedule with warmup and a minimum learning rate, gradient-norm clipping, optional NEFTune noise on the student's
input embeddings; fp32 on CPU, bf16 autocast on CUDA. Under ``accelerate launch`` (``WORLD_SIZE`` > 1) every
process takes its own packs of each step and the gradients are summed across processes (the loss is already
normalised by the window's contexts over all processes, as the reference does).

Output folder::

    output_dir/
      train_config.json          the run's configuration
      metrics.jsonl              one JSON line per optimizer step (loss, task loss, L1, lr, grad norm, tokens/s)
      checkpoint-<step>/
        d2l_config.json, hypernet.safetensors    pickle-free (``load_checkpoint`` / ``D2LModel.from_checkpoint``)
        pytorch_model.bin                         the reference's layout (Sakana's ``from_state_dict`` reads it),
                                                  when it can describe the hypernetwork (``save_reference_format``)
        trainer_state.pt                          optimizer, scheduler, RNG states, data position (weights_only)

A checkpoint is written into a temporary folder and renamed into place, so a crash while saving leaves every
earlier checkpoint intact; ``--resume`` continues from the newest complete one and reproduces the loss curve of an
uninterrupted run. A NaN or infinite loss, gradient norm or adapter stops the run before the optimizer step, with
the last good checkpoint kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data import DataError, collate, greedy_pack, iter_parquet, parse_row, resolve_files, split_qas
from .losses import lora_l1_norm, qa_loss

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"
_TMP_PREFIX = ".tmp-"
#: parameter-name fragments excluded from weight decay (spec §5.4), besides LayerNorm / Embedding modules
NO_DECAY_NAME_PARTS = ("scaler", "bias", "layernorm", "rmsnorm", "latents_q")
#: configuration fields the hypernetwork is built from (passed to :func:`~d2l_fast.hf.spec_for_model`)
HYPERNET_FIELDS = ("latent_size", "n_latent_queries", "num_blocks", "num_self_attn_per_block", "n_heads", "head_dim",
                   "n_kv_heads", "lora_r", "target_modules")


class TrainConfigError(ValueError):
    """A configuration that cannot run: unknown / missing / mistyped fields, or an unusable output folder."""


class TrainingDivergedError(RuntimeError):
    """The loss, the gradient norm or a generated adapter became NaN or infinite; no update was applied."""


@dataclass
class TrainConfig:
    """Settings of one training run; names follow the reference's arguments (``train.py`` / HF ``TrainingArguments``)
    where one exists. ``data``, ``model_name_or_path`` and ``output_dir`` are required."""

    data: list[str] = field(default_factory=list)  # parquet files / folders in the reference's schema (spec §5.2)
    model_name_or_path: str = ""  # base LM: local folder or hub id
    output_dir: str = ""
    resume: bool = False  # continue from the newest checkpoint in output_dir
    overwrite_output_dir: bool = False  # start afresh, removing this trainer's files from output_dir
    init_checkpoint: str | None = None  # start from these hypernetwork weights (e.g. the chunk stage)
    # steps and data
    max_steps: int = -1  # > 0, or -1: num_train_epochs passes over the data (counted up front)
    num_train_epochs: float = 1.0
    max_packed_inp_len: int = 4096
    max_packed_ctx_len: int = 4096
    max_qas_per_sample: int = 1
    shuffle_buffer: int = 256  # packs shuffled together (seeded per epoch); 0 keeps file order
    gradient_accumulation_steps: int = 1
    seed: int = 42
    # objective (spec §5.1)
    use_kl_loss: bool = True  # False: cross-entropy on the label tokens (NIAH); teacher columns not needed
    use_per_ctx_average_loss: bool = True
    gen_lora_l1_reg_coef: float = 0.1
    loss_chunk_size: int | None = None  # lm_head rows per chunk (default: 2^25 / vocab)
    # optimisation (spec §5.4)
    learning_rate: float = 4e-5
    min_lr: float = 1e-7
    warmup_steps: int = 100
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    neftune_noise_alpha: float = 0.0  # the reference's main runs use 5.0, NIAH 0
    bf16: bool | None = None  # bf16 autocast (and a bf16 base LM); default: on CUDA only
    device: str | None = None  # default: cuda if available, else cpu (the process's GPU under accelerate)
    # hypernetwork (new runs; a resumed run keeps its checkpoint's architecture)
    latent_size: int = 512
    n_latent_queries: int = 8
    num_blocks: int = 9
    num_self_attn_per_block: int = 0
    n_heads: int = 16
    head_dim: int = 128
    n_kv_heads: int = 4
    lora_r: int = 8
    target_modules: list[str] = field(default_factory=lambda: ["down_proj"])
    ctx_encoder_type: str = "per_layer_activations"
    layer_idx: int | None = None  # early_exit encoder depth (default: layers // 4)
    layer_indices: list[int] | None = None  # base layers that get a LoRA (default: all)
    init_scaler_B: float | None = None  # new runs: scaler_B ~ N(0, this²) instead of the reference's zeros (see README)
    # saving and logging
    save_steps: int = 5000
    save_total_limit: int = 2  # newest checkpoints kept (0 = all)
    logging_steps: int = 1  # progress-bar refresh period; metrics.jsonl gets every step
    report_to_tensorboard: bool | None = None  # default: if tensorboard is installed
    save_reference_format: bool | None = None  # also write pytorch_model.bin; default: when the layout can describe
    # the hypernetwork (the reference fixes the perceiver's heads at 16 × 128, 4 KV heads)
    disable_tqdm: bool = False

    # ------------------------------------------------------------------ construction and checks
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> "TrainConfig":
        """Build from a JSON-like dict; unknown fields and wrong types are refused, naming the field."""
        if not isinstance(d, dict):
            raise TrainConfigError(f"{source}: expected a JSON object of settings, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise TrainConfigError(f"{source}: unknown field(s) {unknown}; valid fields: "
                                   f"{', '.join(cls.field_names())}")
        cfg = cls(**d)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        path = pathlib.Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise TrainConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TrainConfigError(f"{path}: not a readable JSON config ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, source: str = "config") -> "TrainConfig":
        """Check every field's type and range; raise :class:`TrainConfigError` naming the field."""
        def bad(name, expected):
            raise TrainConfigError(f"{source}: field {name!r} must be {expected}, got {getattr(self, name)!r}")

        if isinstance(self.data, (str, os.PathLike)):
            self.data = [str(self.data)]
        if not isinstance(self.data, list) or not all(isinstance(p, (str, os.PathLike)) for p in self.data):
            bad("data", "a list of parquet paths")
        self.data = [str(p) for p in self.data]
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        missing = [n for n in ("data", "model_name_or_path", "output_dir") if not getattr(self, n)]
        if missing:
            raise TrainConfigError(f"{source}: missing required field(s) {missing} (data: parquet files in the "
                                   "reference's schema; model_name_or_path: the base LM; output_dir: where to write)")
        for name in ("model_name_or_path", "output_dir"):
            if not isinstance(getattr(self, name), (str, os.PathLike)):
                bad(name, "a path or name")
        self.model_name_or_path, self.output_dir = str(self.model_name_or_path), str(self.output_dir)
        ints = {"max_steps": -1, "max_packed_inp_len": 1, "max_packed_ctx_len": 1, "shuffle_buffer": 0,
                "gradient_accumulation_steps": 1, "warmup_steps": 0, "latent_size": 1, "n_latent_queries": 1,
                "num_blocks": 1, "num_self_attn_per_block": 0, "n_heads": 1, "head_dim": 1, "n_kv_heads": 1,
                "lora_r": 1, "save_steps": 1, "save_total_limit": 0, "logging_steps": 1, "seed": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(name, f"an int ≥ {lo}")
        if self.max_steps == 0:
            bad("max_steps", "a positive int, or -1 to run num_train_epochs")
        if isinstance(self.max_qas_per_sample, bool) or not isinstance(self.max_qas_per_sample, int) or \
                (self.max_qas_per_sample < 1 and self.max_qas_per_sample != -1):
            bad("max_qas_per_sample", "a positive int or -1 (all QAs of a context together)")
        for name in ("loss_chunk_size", "layer_idx"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "loss_chunk_size"
                                                                                       else 0)):
                bad(name, "null or a non-negative int" if name == "layer_idx" else "null or a positive int")
        floats = {"num_train_epochs": (0.0, False), "gen_lora_l1_reg_coef": (0.0, True), "learning_rate": (0.0, False),
                  "min_lr": (0.0, True), "weight_decay": (0.0, True), "adam_epsilon": (0.0, False),
                  "max_grad_norm": (0.0, True), "neftune_noise_alpha": (0.0, True)}
        for name, (lo, inclusive) in floats.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    (v < lo if inclusive else v <= lo):
                bad(name, f"a finite number {'≥' if inclusive else '>'} {lo}")
            setattr(self, name, float(v))
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                bad(name, "a number in [0, 1)")
        if self.min_lr > self.learning_rate:
            raise TrainConfigError(f"{source}: min_lr ({self.min_lr}) exceeds learning_rate ({self.learning_rate})")
        for name in ("resume", "overwrite_output_dir", "use_kl_loss", "use_per_ctx_average_loss", "disable_tqdm"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        for name in ("bf16", "report_to_tensorboard", "save_reference_format"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                bad(name, "null, true or false")
        if self.resume and self.overwrite_output_dir:
            raise TrainConfigError(f"{source}: resume and overwrite_output_dir exclude each other")
        if not isinstance(self.target_modules, list) or not self.target_modules or \
                not all(isinstance(m, str) and m for m in self.target_modules):
            bad("target_modules", "a non-empty list of module names")
        if self.layer_indices is not None:
            li = self.layer_indices
            if not isinstance(li, list) or not li or len(set(map(repr, li))) != len(li) or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in li):
                bad("layer_indices", "null or a non-empty list of distinct non-negative ints")
        from ..config import ENCODER_TYPES

        if self.ctx_encoder_type not in ENCODER_TYPES:
            bad("ctx_encoder_type", f"one of {list(ENCODER_TYPES)}")
        v = self.init_scaler_B
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            bad("init_scaler_B", "null or a finite number ≥ 0")
        for name in ("init_checkpoint", "device"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                bad(name, "null or a string")
        return self


# ---------------------------------------------------------------------- data stream
def check_data(paths, *, teacher: bool, vocab_size: int | None = None, rows_per_file: int = 8) -> list[pathlib.Path]:
    """Up-front check of every data file (before any model is loaded): readable parquet, the schema's columns, at
    least one row, and its first ``rows_per_file`` rows well-formed. Later rows are checked as they stream.

    Raises:
        DataError: naming the file (and row).
    """
    from .data import COLUMNS, open_parquet

    files = resolve_files(paths)
    need = list(COLUMNS if teacher else COLUMNS[:3])
    hint = " (use_kl_loss=false reads cross-entropy data without the teacher columns)" if teacher else ""
    for f in files:
        pf = open_parquet(f, need, hint)
        if pf.metadata.num_rows == 0:
            raise DataError(f"{f}: the file holds no rows")
        batch = next(pf.iter_batches(batch_size=rows_per_file, columns=need))
        cols = {c: batch.column(c).to_pylist() for c in need}
        for i in range(batch.num_rows):
            parse_row({c: cols[c][i] for c in need}, teacher=teacher, vocab_size=vocab_size, source=f"{f}:row {i}")
    return files


def stream_packs(files, *, teacher: bool, vocab_size: int | None, max_qas_per_sample: int, max_packed_inp_len: int,
                 max_packed_ctx_len: int, window: int = 256, dropped: list | None = None) -> Iterator[list]:
    """Greedy packs (spec §5.3) of the examples streamed from ``files``, identical to
    :func:`~d2l_fast.training.data.pack_examples` over the whole stream, holding O(window) examples at a time.

    Examples over a budget on their own are skipped (appended to ``dropped`` when given).
    """
    examples = split_qas(iter_parquet(files, teacher=teacher, vocab_size=vocab_size), max_qas_per_sample)
    carry: list = []
    done = False
    while not done:
        buf = list(carry)
        while len(buf) < len(carry) + window:
            ex = next(examples, None)
            if ex is None:
                done = True
                break
            buf.append(ex)
        if not buf:
            return
        packs, drop = greedy_pack([e.n_input_tokens for e in buf], [e.n_ctx_tokens for e in buf], max_packed_inp_len,
                                  max_packed_ctx_len)
        if dropped is not None:
            dropped.extend(buf[i] for i in drop)
        # the last pack may still grow with the next examples unless a dropped example closed it
        open_last = not done and packs and packs[-1][1] == len(buf)
        for s, e in packs[:-1] if open_last else packs:
            yield buf[s:e]
        carry = buf[packs[-1][0]:] if open_last else []


class PackStream:
    """Endless, deterministic stream of packs over epochs: epoch ``k`` is the files in order, packed, then shuffled
    in buffers of ``shuffle_buffer`` packs with ``Random((seed, k))``. ``position = (epoch, packs taken in it)``
    fully determines what comes next, which is what a checkpoint stores."""

    def __init__(self, files, cfg: TrainConfig, vocab_size: int | None):
        self.files, self.cfg, self.vocab_size = files, cfg, vocab_size
        self.epoch, self.index = 0, 0
        self.dropped: list = []
        self._it: Iterator | None = None

    def _epoch_packs(self, epoch: int) -> Iterator[list]:
        c = self.cfg
        dropped = self.dropped if epoch == 0 else None
        packs = stream_packs(self.files, teacher=c.use_kl_loss, vocab_size=self.vocab_size,
                             max_qas_per_sample=c.max_qas_per_sample, max_packed_inp_len=c.max_packed_inp_len,
                             max_packed_ctx_len=c.max_packed_ctx_len, dropped=dropped)
        if c.shuffle_buffer <= 1:
            yield from packs
            return
        rng = random.Random(f"{c.seed}:{epoch}")
        while True:
            buf = [p for _, p in zip(range(c.shuffle_buffer), packs)]
            if not buf:
                return
            rng.shuffle(buf)
            yield from buf

    def seek(self, epoch: int, index: int) -> None:
        """Position the stream at pack ``index`` of ``epoch`` (re-reads and skips; no model compute)."""
        self.epoch, self.index = epoch, 0
        self._it = self._epoch_packs(epoch)
        for _ in range(index):
            if next(self._it, None) is None:
                raise DataError(f"cannot resume at pack {index} of epoch {epoch}: the data now has only "
                                f"{self.index} packs per epoch (did the data files change?)")
            self.index += 1

    def count_epoch(self) -> int:
        return sum(1 for _ in self._epoch_packs(0))

    def next(self) -> list:
        if self._it is None:
            self.seek(0, 0)
        while True:
            pack = next(self._it, None)
            if pack is not None:
                self.index += 1
                return pack
            if self.index == 0:
                raise DataError(f"no example of {[str(f) for f in self.files]} fits the packing budgets "
                                f"(max_packed_inp_len={self.cfg.max_packed_inp_len}, "
                                f"max_packed_ctx_len={self.cfg.max_packed_ctx_len})")
            self.seek(self.epoch + 1, 0)


# ---------------------------------------------------------------------- optimisation pieces
def param_groups(hypernet: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for LayerNorm / Embedding / *Norm modules and names holding
    :data:`NO_DECAY_NAME_PARTS` (spec §5.4); decay for the rest."""
    no_decay = set()
    for mname, mod in hypernet.named_modules():
        if isinstance(mod, (nn.LayerNorm, nn.Embedding)) or "norm" in type(mod).__name__.lower():
            no_decay.update(f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=False))
    decay, rest = [], []
    for name, p in hypernet.named_parameters():
        if not p.requires_grad:
            continue
        if name in no_decay or any(part in name.lower() for part in NO_DECAY_NAME_PARTS):
            rest.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def cosine_with_min_lr(step: int, *, warmup_steps: int, total_steps: int, min_lr_rate: float) -> float:
    """LR multiplier: linear warmup from 0, then a half cosine from 1 down to ``min_lr_rate`` at ``total_steps``
    (HF's ``cosine_with_min_lr``)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_rate + (1.0 - min_lr_rate) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    out = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def find_checkpoints(output_dir) -> list[tuple[int, pathlib.Path]]:
    """Complete checkpoints (``checkpoint-<step>`` with a trainer state) of a run, oldest first."""
    out = []
    d = pathlib.Path(output_dir)
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


class _Distributed:
    """Process group under ``accelerate launch`` / torchrun (``WORLD_SIZE`` > 1); a no-op single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank, self.device = 0, None
        if self.world > 1:
            from accelerate import PartialState  # optional: only multi-process runs need it

            state = PartialState()
            self.rank, self.world, self.device = state.process_index, state.num_processes, state.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


@dataclass
class TrainResult:
    """``step``: optimizer steps done; ``losses``: the loss of every step run in this call (index = step − 1 −
    first step of the call); ``checkpoint``: the newest checkpoint folder (None if none was written)."""

    step: int
    losses: list[float]
    checkpoint: pathlib.Path | None
    metrics_path: pathlib.Path


class Trainer:
    """Trains the hypernetwork of a :class:`~d2l_fast.D2LModel` on the reference's parquet data.

    ``model``: an already-built model to train (its base model must be ``config.model_name_or_path``'s); default:
    load the base LM from ``config.model_name_or_path`` and build a fresh hypernetwork from the config (or the
    newest checkpoint's on ``resume``, or ``init_checkpoint``'s). ``callbacks``: callables
    ``fn(trainer, step, metrics)`` run after each optimizer step (and its checkpoint, if any).

    Everything the run needs is checked in the constructor, before any model is loaded: the config, the output
    folder (it must be new or empty unless ``resume`` / ``overwrite_output_dir``), the data files and, on resume,
    that the checkpoint belongs to the same base model.
    """

    def __init__(self, config: TrainConfig, *, model=None, callbacks=()):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.cfg = config.validate()
        self.callbacks = list(callbacks)
        self.dist = _Distributed()
        self.out = pathlib.Path(self.cfg.output_dir)
        self.resume_from = self._check_output_dir()
        self.files = check_data(self.cfg.data, teacher=self.cfg.use_kl_loss)
        self._resume_state = None
        if self.resume_from is not None:
            self._resume_state = self._read_resume_state(self.resume_from)
        if self.cfg.init_checkpoint and self.resume_from is None:
            from ..checkpoint import load_checkpoint

            self._init_ckpt = load_checkpoint(self.cfg.init_checkpoint)
        else:
            self._init_ckpt = None
        self.model = model
        self._built = False

    # ------------------------------------------------------------------ checks before compute
    def _check_output_dir(self) -> pathlib.Path | None:
        out, c = self.out, self.cfg
        if out.exists() and not out.is_dir():
            raise TrainConfigError(f"output_dir {out} exists and is not a folder")
        ckpts = find_checkpoints(out)
        if c.resume:
            if not ckpts:
                raise TrainConfigError(f"--resume: {out} holds no complete checkpoint ({CHECKPOINT_PREFIX}<step>/ "
                                       f"with {STATE_FILE}); nothing to resume")
            return ckpts[-1][1]
        if out.is_dir() and any(out.iterdir()) and not c.overwrite_output_dir:
            raise TrainConfigError(f"output_dir {out} already exists and is not empty; pass --resume to continue its "
                                   "run or --overwrite to start afresh (this removes its checkpoints and metrics)")
        return None

    def _read_resume_state(self, ckpt: pathlib.Path) -> dict:
        from ..checkpoint import load_checkpoint

        try:
            state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable state is the same user-facing problem
            raise TrainConfigError(f"{ckpt / STATE_FILE}: unreadable trainer state ({type(e).__name__}: {e})") from None
        loaded = load_checkpoint(ckpt)
        base = state.get("base_model_name_or_path")
        if base != self.cfg.model_name_or_path or loaded.spec.base_model_name_or_path != self.cfg.model_name_or_path:
            raise TrainConfigError(f"--resume: {ckpt} was trained on base model {base!r}, this run names "
                                   f"{self.cfg.model_name_or_path!r}; resume with the same model_name_or_path")
        saved = json.loads(state["config"])
        for name in ("use_kl_loss", "max_packed_inp_len", "max_packed_ctx_len", "max_qas_per_sample",
                     "gradient_accumulation_steps", "seed", "shuffle_buffer"):
            if saved.get(name) != getattr(self.cfg, name):
                raise TrainConfigError(f"--resume: {name} was {saved.get(name)!r} in {ckpt}, now "
                                       f"{getattr(self.cfg, name)!r}; an exact resume needs the same value")
        state["checkpoint"] = loaded
        return state

    # ------------------------------------------------------------------ model
    def _device(self) -> torch.device:
        if self.dist.device is not None:
            return torch.device(self.dist.device)
        if self.cfg.device:
            return torch.device(self.cfg.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _build_model(self):
        from ..hf import load_base_model
        from ..model import D2LModel

        c = self.cfg
        dev = self._device()
        self.use_bf16 = (dev.type == "cuda") if c.bf16 is None else c.bf16
        ckpt = self._resume_state["checkpoint"] if self._resume_state else self._init_ckpt
        if self.model is None:
            base = load_base_model(c.model_name_or_path, dtype=torch.bfloat16 if self.use_bf16 and dev.type == "cuda"
                                    else torch.float32, device=dev)
            if ckpt is not None:
                self.model = D2LModel.from_checkpoint(ckpt, base_model=base)
            else:
                kw = {k: getattr(c, k) for k in HYPERNET_FIELDS}
                self.model = D2LModel.from_base(base, seed=c.seed, base_model_name_or_path=c.model_name_or_path,
                                                encoder_type=c.ctx_encoder_type, encoder_layer_idx=c.layer_idx,
                                                layer_indices=c.layer_indices, init_scaler_B=c.init_scaler_B, **kw)
        else:
            name = self.model.spec.base_model_name_or_path
            if name != c.model_name_or_path:
                raise TrainConfigError(f"the given model's hypernetwork was made for {name!r}, the config names "
                                       f"{c.model_name_or_path!r}")
            if ckpt is not None:
                if ckpt.spec != self.model.spec:
                    raise TrainConfigError("the checkpoint's hypernetwork config differs from the given model's")
                self.model.hypernet.load_state_dict(ckpt.state_dict)
        m = self.model
        m.base_model.requires_grad_(False).eval()
        m.hypernet.float().train().requires_grad_(True)
        head = m.base_model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise TrainConfigError(f"{type(m.base_model).__name__} has no lm_head (output embeddings) to train with")
        self.head = head
        self.softcap = getattr(m.base_model.config, "final_logit_softcapping", None)
        from ..hf import decoder_of

        self.decoder = decoder_of(m.base_model)
        self.device = m.device
        self.save_reference = self._reference_format_ok()
        self._built = True

    def _reference_format_ok(self) -> bool:
        from ..checkpoint import CheckpointError, LoadedCheckpoint, reference_configs_or_raise

        want = self.cfg.save_reference_format
        if want is False:
            return False
        try:
            reference_configs_or_raise(LoadedCheckpoint(spec=self.model.spec, state_dict={}))
        except CheckpointError as e:
            if want:
                raise TrainConfigError(f"save_reference_format=true: {e}") from None
            import logging

            logging.getLogger(__name__).warning("checkpoints are written pickle-free only: %s", e)
            return False
        return True

    # ------------------------------------------------------------------ one pack
    @contextlib.contextmanager
    def _neftune(self):
        alpha = self.cfg.neftune_noise_alpha
        if not alpha:
            yield
            return

        def hook(mod, args, out):  # HF's NEFTune: uniform noise of magnitude alpha / sqrt(seq_len · dim)
            mag = alpha / math.sqrt(out.shape[-2] * out.shape[-1])
            return out + torch.empty_like(out).uniform_(-mag, mag)

        h = self.model.base_model.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            h.remove()

    def _pack_loss(self, pack, n_ctx_window: int, n_labels_window: int) -> dict:
        from ..packing import PackedContexts

        m, c = self.model, self.cfg
        b = collate(pack)
        cu = b.ctx_cu_seqlens.tolist()
        chunks = [b.ctx_ids[s:e].tolist() for s, e in zip(cu[:-1], cu[1:])]
        packed = PackedContexts(chunks=chunks, n_chunks=b.n_ctx_chunks)
        qa_cu = b.qa_cu_seqlens.tolist()
        seg_lens = [e - s for s, e in zip(qa_cu[:-1], qa_cu[1:])]
        seg_adapter = [g for g, n in enumerate(b.n_queries) for _ in range(n)]
        dev = self.device
        autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if self.use_bf16 else \
            contextlib.nullcontext()
        with autocast:
            loras = m.chunk_loras(packed)  # the encoder runs under no_grad inside; the hypernetwork with grad
            adapters = m.merge(loras, b.n_ctx_chunks)
            bad = adapters.nonfinite()
            if bad:
                raise TrainingDivergedError(f"the hypernetwork produced NaN/inf adapters for contexts "
                                            f"{[pack[i].source for i in bad[:3]]}")
            with m.bind(adapters, seg_lens=seg_lens, seg_adapter=seg_adapter), self._neftune():
                hidden = self.decoder(input_ids=b.input_ids[None].to(dev), position_ids=b.position_ids[None].to(dev),
                                      use_cache=False).last_hidden_state[0]
        w = self.head.weight
        kw = {}
        if c.use_kl_loss:
            kw = dict(teacher_logprobs=b.logprobs_vals.to(dev), teacher_indices=b.logprobs_indices.to(dev))
        out = qa_loss(hidden.to(w.dtype), w, b.labels.to(dev), qa_cu, b.n_queries,
                      objective="distill" if c.use_kl_loss else "ce",
                      average="context" if c.use_per_ctx_average_loss else "token", n_ctx_window=n_ctx_window,
                      n_labels_window=n_labels_window, bias=getattr(self.head, "bias", None), softcap=self.softcap,
                      chunk_size=c.loss_chunk_size, **kw)
        l1 = lora_l1_norm(adapters, n_ctx_window) if c.gen_lora_l1_reg_coef else out.loss.new_zeros(())
        loss = out.loss + c.gen_lora_l1_reg_coef * l1
        return {"loss": loss, "task": out.loss.detach(), "l1": l1.detach(),
                "tokens": int(b.input_ids.numel() + b.ctx_ids.numel())}

    # ------------------------------------------------------------------ saving
    def _save(self, step: int) -> pathlib.Path:
        """Write ``checkpoint-<step>`` atomically (temporary folder + rename) and prune old checkpoints."""
        from ..checkpoint import save_checkpoint, save_reference_checkpoint

        final = self.out / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.out / f"{_TMP_PREFIX}{CHECKPOINT_PREFIX}{step}"
        if tmp.exists():
            shutil.rmtree(tmp)
        with torch.random.fork_rng(devices=[]):
            ck = self.model.state_dict_for_checkpoint()
            save_checkpoint(ck, tmp)
            if self.save_reference:
                save_reference_checkpoint(ck, tmp / "pytorch_model.bin")
            state = {
                "step": step, "epoch": self.stream.epoch, "pack_index": self.stream.index,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": self._rng_at_save, "base_model_name_or_path": self.cfg.model_name_or_path,
                "config": json.dumps(self.cfg.to_dict()), "format": "d2l_fast.trainer/1",
            }
            torch.save(state, tmp / STATE_FILE)
        if final.exists():  # only when a run re-saves a step it resumed at; the new copy is complete by now
            old = self.out / f"{_TMP_PREFIX}old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        if self.cfg.save_total_limit:
            for _, p in find_checkpoints(self.out)[: -self.cfg.save_total_limit]:
                shutil.rmtree(p)
        return final

    def _prepare_output(self, start_step: int):
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        if self.cfg.overwrite_output_dir and not self.cfg.resume:
            for _, p in find_checkpoints(out):
                shutil.rmtree(p)
            for p in out.iterdir():
                if p.name.startswith(_TMP_PREFIX) or p.name.startswith(CHECKPOINT_PREFIX):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            for name in (METRICS_FILE, CONFIG_FILE):
                (out / name).unlink(missing_ok=True)
            tb = out / "runs"
            if tb.is_dir():
                shutil.rmtree(tb)
        for p in out.glob(f"{_TMP_PREFIX}*"):  # leftovers of a crash while saving
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        metrics = out / METRICS_FILE
        if metrics.exists():  # drop the steps logged after the checkpoint we resume from
            keep = [ln for ln in metrics.read_text().splitlines() if ln.strip() and
                    json.loads(ln).get("step", 0) <= start_step]
            tmp = out / f"{_TMP_PREFIX}{METRICS_FILE}"
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, metrics)
        tmp = out / f"{_TMP_PREFIX}{CONFIG_FILE}"
        tmp.write_text(json.dumps(self.cfg.to_dict(), indent=1))
        os.replace(tmp, out / CONFIG_FILE)

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        c, dist = self.cfg, self.dist
        if not self._built:
            self._build_model()
        m = self.model
        params = [p for p in m.hypernet.parameters() if p.requires_grad]
        if any(p.requires_grad for p in m.base_model.parameters()):
            raise TrainConfigError("the base model has trainable parameters; only the hypernetwork may train")
        self.optimizer = torch.optim.AdamW(param_groups(m.hypernet, c.weight_decay), lr=c.learning_rate,
                                           betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon)
        self.stream = PackStream(self.files, c, m.vocab_size)
        per_step = c.gradient_accumulation_steps * dist.world
        total = c.max_steps
        if total < 0:
            total = max(1, math.ceil(self.stream.count_epoch() * c.num_train_epochs / per_step))
        self.total_steps = total
        rate = c.min_lr / c.learning_rate
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_min_lr(s, warmup_steps=c.warmup_steps, total_steps=total,
                                                         min_lr_rate=rate))
        start = 0
        rs = self._resume_state
        if rs is not None:
            self.optimizer.load_state_dict(rs["optimizer"])
            self.scheduler.load_state_dict(rs["scheduler"])
            start = int(rs["step"])
            self.stream.seek(int(rs["epoch"]), int(rs["pack_index"]))
            _set_rng_state(rs["rng"])
        else:
            torch.manual_seed(c.seed + dist.rank)
            random.seed(c.seed)
            np.random.seed(c.seed)
        last_ckpt = self.resume_from
        if dist.main:
            self._prepare_output(start)
        dist.barrier()
        tb = self._tensorboard() if dist.main else None
        losses: list[float] = []
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=c.disable_tqdm or not dist.main)
        metrics_path = self.out / METRICS_FILE
        try:
            for step in range(start + 1, total + 1):
                t0 = time.perf_counter()
                packs = [self.stream.next() for _ in range(per_step)]
                mine = packs[dist.rank * c.gradient_accumulation_steps:(dist.rank + 1) * c.gradient_accumulation_steps]
                counts = torch.tensor([sum(len(p) for p in packs),
                                       sum(q.n_answer_tokens for p in packs for ex in p for q in ex.qas)])
                n_ctx, n_lab = int(counts[0]), int(counts[1])
                self.optimizer.zero_grad(set_to_none=True)
                acc = torch.zeros(4, dtype=torch.float64)  # loss, task, l1, tokens
                for pack in mine:
                    r = self._pack_loss(pack, n_ctx, max(1, n_lab))
                    if not torch.isfinite(r["loss"]).item():
                        raise TrainingDivergedError(f"loss is {r['loss'].item()} at step {step} (task "
                                                    f"{r['task'].item()}, L1 {r['l1'].item()})")
                    r["loss"].backward()
                    acc += torch.tensor([r["loss"].item(), r["task"].item(), r["l1"].item(), r["tokens"]],
                                        dtype=torch.float64)
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.sum(p.grad)
                dist.sum(acc)
                if c.max_grad_norm > 0:
                    gnorm = float(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm))
                else:
                    gnorm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
                if not math.isfinite(gnorm):
                    raise TrainingDivergedError(f"gradient norm is {gnorm} at step {step} (loss {acc[0].item()})")
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                dt = time.perf_counter() - t0
                loss = float(acc[0])
                losses.append(loss)
                rec = {"step": step, "loss": loss, "task_loss": float(acc[1]), "l1": float(acc[2]), "lr": lr,
                       "grad_norm": gnorm, "tokens": int(acc[3]), "tokens_per_s": float(acc[3]) / max(dt, 1e-9),
                       "epoch": self.stream.epoch, "contexts": n_ctx}
                if dist.main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if tb is not None:
                        for k in ("loss", "task_loss", "l1", "lr", "grad_norm", "tokens_per_s"):
                            tb.add_scalar(f"train/{k}", rec[k], step)
                if step % c.logging_steps == 0 or step == total:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
                if step % c.save_steps == 0 or step == total:
                    self._rng_at_save = _rng_state()
                    if dist.main:
                        last_ckpt = self._save(step)
                    dist.barrier()
                for cb in self.callbacks:
                    cb(self, step, rec)
        except TrainingDivergedError as e:
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint had been written yet"
            raise TrainingDivergedError(f"training stopped: {e}; no update was applied for this step and "
                                        f"{where} (lower learning_rate or check the data)") from None
        finally:
            bar.close()
            if tb is not None:
                tb.close()
        return TrainResult(step=total, losses=losses, checkpoint=last_ckpt, metrics_path=metrics_path)

    def _tensorboard(self):
        want = self.cfg.report_to_tensorboard
        if want is False:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if want:
                raise TrainConfigError("report_to_tensorboard=true needs the tensorboard package") from None
            return None
        return SummaryWriter(str(self.out / "runs"))


def train(config: TrainConfig | dict, **kwargs) -> TrainResult:
    """``Trainer(config, **kwargs).train()``; ``config`` may be a dict of :class:`TrainConfig` fields."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    return Trainer(config, **kwargs).train()


__all__ = ["TrainConfig", "TrainConfigError", "TrainResult", "Trainer", "TrainingDivergedError", "check_data",
           "cosine_with_min_lr", "find_checkpoints", "param_groups", "stream_packs", "train"]
