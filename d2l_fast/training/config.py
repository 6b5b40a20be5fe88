"""Settings of a training run (spec §5): :class:`TrainConfig`, read from JSON or built in code, and its checks.

Every field is checked for type and range by :meth:`TrainConfig.validate` (called by ``from_dict`` / ``from_file``
and by the :class:`~d2l_fast.training.trainer.Trainer`), and a problem raises :class:`TrainConfigError` naming the
field, what it must be and what it was.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from dataclasses import dataclass, field

from ..config import ENCODER_TYPES
from ..safe_io import read_json

#: configuration fields the hypernetwork is built from (passed to :func:`~d2l_fast.hf.spec_for_model`)
HYPERNET_FIELDS = ("latent_size", "n_latent_queries", "num_blocks", "num_self_attn_per_block", "n_heads", "head_dim",
                   "n_kv_heads", "lora_r", "target_modules")


MAX_CONFIG_BYTES = 1 << 20


def read_config_json(path, error=ValueError) -> dict:
    """A JSON settings file read through :mod:`d2l_fast.safe_io` (a regular file of at most
    :data:`MAX_CONFIG_BYTES`); ``error`` naming the file if it is missing, unreadable, too large, or not a JSON
    object."""
    path = pathlib.Path(path)
    if not path.exists():
        raise error(f"{path}: config file not found")
    d = read_json(path, MAX_CONFIG_BYTES, what="JSON config", error=error)
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object of settings, got {type(d).__name__}")
    return d


class TrainConfigError(ValueError):
    """A configuration that cannot run: unknown / missing / mistyped fields, or an unusable output folder."""



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
    # student row layout (training.student): "dense" (transformers' own [T, T] block mask, the reference's way),
    # "segments" (attention per QA sequence: the same numbers, less work) or "shared_prefix" (besides, a context's
    # QAs share their common leading tokens once)
    student_packing: str = "dense"
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
    # modules whose B vectors get a copy head (d2l_fast extension, see d2l_fast.hypernet.copy_head); added with a
    # zero gate when init_checkpoint has none, so the first step's adapters equal that checkpoint's
    copy_modules: list[str] = field(default_factory=list)
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
        return cls.from_dict(read_config_json(path, TrainConfigError), source=str(path))

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
        if not isinstance(self.copy_modules, list) or len(set(map(repr, self.copy_modules))) != len(self.copy_modules) \
                or not all(isinstance(m, str) and m in self.target_modules for m in self.copy_modules):
            bad("copy_modules", f"a list of distinct target modules ({self.target_modules})")
        if self.layer_indices is not None:
            li = self.layer_indices
            if not isinstance(li, list) or not li or len(set(map(repr, li))) != len(li) or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in li):
                bad("layer_indices", "null or a non-empty list of distinct non-negative ints")
        if self.student_packing not in ("dense", "segments", "shared_prefix"):
            bad("student_packing", "one of 'dense', 'segments', 'shared_prefix'")
        if self.ctx_encoder_type not in ENCODER_TYPES:
            bad("ctx_encoder_type", f"one of {list(ENCODER_TYPES)}")
        v = self.init_scaler_B
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            bad("init_scaler_B", "null or a finite number ≥ 0")
        for name in ("init_checkpoint", "device"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                bad(name, "null or a string")
        return self


__all__ = ["HYPERNET_FIELDS", "TrainConfig", "TrainConfigError"]
