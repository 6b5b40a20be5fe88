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
input embeddings; fp32 on CPU, bf16 autocast on CUDA (``bf16=True`` on CPU: a bf16 base model with an fp32
hypernetwork, no autocast — several times faster on CPUs with AMX). ``student_packing`` chooses the layout of the QA
row (:mod:`~d2l_fast.training.student`: per-QA attention, shared question prefixes; same loss, less work). Under
``accelerate launch`` (``WORLD_SIZE`` > 1) every process takes its own packs of each step and the gradients are
summed across processes (the loss is already normalised by the window's contexts over all processes, as the
reference does).

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
import json
import math
import os
import pathlib
import random
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import HYPERNET_FIELDS, TrainConfig, TrainConfigError
from .data import DataError, PackStream, check_data, collate, stream_packs
from .losses import lora_l1_norm, qa_loss
from .student import segment_attention, student_row
from .warm_start import with_copy_head

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"
_TMP_PREFIX = ".tmp-"
#: parameter-name fragments excluded from weight decay (spec §5.4), besides LayerNorm / Embedding modules
NO_DECAY_NAME_PARTS = ("scaler", "bias", "layernorm", "rmsnorm", "latents_q")


class TrainingDivergedError(RuntimeError):
    """The loss, the gradient norm or a generated adapter became NaN or infinite; no update was applied."""


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
        if ckpt is not None and c.copy_modules:
            ckpt = with_copy_head(ckpt, c.copy_modules, seed=c.seed)
        if self.model is None:
            base = load_base_model(c.model_name_or_path, dtype=torch.bfloat16 if self.use_bf16 else torch.float32,
                                   device=dev)
            if ckpt is not None:
                self.model = D2LModel.from_checkpoint(ckpt, base_model=base)
            else:
                kw = {k: getattr(c, k) for k in HYPERNET_FIELDS}
                if c.copy_modules:
                    kw["copy_modules"] = c.copy_modules  # spec_for_model makes it the spec's sorted tuple
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

    def _autocasts(self):
        """(around the whole pack, around the student forward): bf16 autocast on CUDA as before; on CPU the
        hypernetwork stays fp32 (its readout kernel takes one dtype) and the student runs in the base model's bf16
        weights (no autocast, no per-step weight casts) or, for a given fp32 model, under autocast."""
        off = contextlib.nullcontext()
        if not self.use_bf16:
            return off, off
        cast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        if self.device.type != "cpu":
            return cast, off
        return off, (off if self.model.base_dtype == torch.bfloat16 else cast)

    def _pack_loss(self, pack, n_ctx_window: int, n_labels_window: int) -> dict:
        from ..packing import PackedContexts

        m, c = self.model, self.cfg
        b = collate(pack)
        cu = b.ctx_cu_seqlens.tolist()
        chunks = [b.ctx_ids[s:e].tolist() for s, e in zip(cu[:-1], cu[1:])]
        packed = PackedContexts(chunks=chunks, n_chunks=b.n_ctx_chunks)
        dev = self.device
        if c.student_packing == "dense":
            input_ids, position_ids, labels = b.input_ids, b.position_ids, b.labels
            qa_cu = b.qa_cu_seqlens.tolist()
            seg_lens = [e - s for s, e in zip(qa_cu[:-1], qa_cu[1:])]
            seg_adapter = [g for g, n in enumerate(b.n_queries) for _ in range(n)]
            attention = contextlib.nullcontext()
        else:
            row = student_row(pack, share_prefix=c.student_packing == "shared_prefix")
            input_ids, position_ids, labels, qa_cu = row.input_ids, row.position_ids, row.labels, row.qa_cu_seqlens
            seg_lens, seg_adapter = row.seg_lens, row.seg_adapter
            attention = segment_attention(m.base_model, row.plan.to(dev))
        autocast, student_autocast = self._autocasts()
        with autocast:
            loras = m.chunk_loras(packed)  # the encoder runs under no_grad inside; the hypernetwork with grad
            adapters = m.merge(loras, b.n_ctx_chunks)
            bad = adapters.nonfinite()
            if bad:
                raise TrainingDivergedError(f"the hypernetwork produced NaN/inf adapters for contexts "
                                            f"{[pack[i].source for i in bad[:3]]}")
            with m.bind(adapters, seg_lens=seg_lens, seg_adapter=seg_adapter), self._neftune(), student_autocast, \
                    attention:
                hidden = self.decoder(input_ids=input_ids[None].to(dev), position_ids=position_ids[None].to(dev),
                                      use_cache=False).last_hidden_state[0]
        w = self.head.weight
        kw = {}
        if c.use_kl_loss:
            kw = dict(teacher_logprobs=b.logprobs_vals.to(dev), teacher_indices=b.logprobs_indices.to(dev))
        out = qa_loss(hidden.to(w.dtype), w, labels.to(dev), qa_cu, b.n_queries,
                      objective="distill" if c.use_kl_loss else "ce",
                      average="context" if c.use_per_ctx_average_loss else "token", n_ctx_window=n_ctx_window,
                      n_labels_window=n_labels_window, bias=getattr(self.head, "bias", None), softcap=self.softcap,
                      chunk_size=c.loss_chunk_size, **kw)
        l1 = lora_l1_norm(adapters, n_ctx_window) if c.gen_lora_l1_reg_coef else out.loss.new_zeros(())
        loss = out.loss + c.gen_lora_l1_reg_coef * l1
        return {"loss": loss, "task": out.loss.detach(), "l1": l1.detach(),
                "tokens": int(input_ids.numel() + b.ctx_ids.numel())}

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
    def _start(self) -> int:
        """Optimizer, scheduler and data stream of the run, positioned at the resumed step; returns that step."""
        c, dist, m = self.cfg, self.dist, self.model
        self.optimizer = torch.optim.AdamW(param_groups(m.hypernet, c.weight_decay), lr=c.learning_rate,
                                           betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon)
        self.stream = PackStream(self.files, c, m.vocab_size)
        total = c.max_steps
        if total < 0:
            per_step = c.gradient_accumulation_steps * dist.world
            total = max(1, math.ceil(self.stream.count_epoch() * c.num_train_epochs / per_step))
        self.total_steps = total
        rate = c.min_lr / c.learning_rate
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_min_lr(s, warmup_steps=c.warmup_steps, total_steps=total,
                                                         min_lr_rate=rate))
        rs = self._resume_state
        if rs is None:
            torch.manual_seed(c.seed + dist.rank)
            random.seed(c.seed)
            np.random.seed(c.seed)
            return 0
        self.optimizer.load_state_dict(rs["optimizer"])
        self.scheduler.load_state_dict(rs["scheduler"])
        self.stream.seek(int(rs["epoch"]), int(rs["pack_index"]))
        _set_rng_state(rs["rng"])
        return int(rs["step"])

    def _step(self, step: int, params: list) -> dict:
        """One optimizer step over this process's packs; returns the step's metrics record."""
        c, dist = self.cfg, self.dist
        t0 = time.perf_counter()
        packs = [self.stream.next() for _ in range(c.gradient_accumulation_steps * dist.world)]
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
        return {"step": step, "loss": float(acc[0]), "task_loss": float(acc[1]), "l1": float(acc[2]), "lr": lr,
                "grad_norm": gnorm, "tokens": int(acc[3]), "tokens_per_s": float(acc[3]) / max(dt, 1e-9),
                "epoch": self.stream.epoch, "contexts": n_ctx}

    def train(self) -> TrainResult:
        c, dist = self.cfg, self.dist
        if not self._built:
            self._build_model()
        m = self.model
        params = [p for p in m.hypernet.parameters() if p.requires_grad]
        if any(p.requires_grad for p in m.base_model.parameters()):
            raise TrainConfigError("the base model has trainable parameters; only the hypernetwork may train")
        start = self._start()
        total = self.total_steps
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
                rec = self._step(step, params)
                losses.append(rec["loss"])
                if dist.main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if tb is not None:
                        for k in ("loss", "task_loss", "l1", "lr", "grad_norm", "tokens_per_s"):
                            tb.add_scalar(f"train/{k}", rec[k], step)
                if step % c.logging_steps == 0 or step == total:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                    tok_s=f"{rec['tokens_per_s']:.0f}")
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


# TrainConfig / TrainConfigError (training.config) and DataError, PackStream, check_data, stream_packs (training.data)
# lived here before the split and stay importable from this module
__all__ = ["DataError", "PackStream", "TrainConfig", "TrainConfigError", "TrainResult", "Trainer",
           "TrainingDivergedError", "check_data", "cosine_with_min_lr", "find_checkpoints", "param_groups",
           "stream_packs", "train"]
