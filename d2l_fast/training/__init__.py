"""Training foundations (spec §5, §6): objectives, the reference's parquet data, packing and evaluation metrics.

* :mod:`.losses` — context distillation / next-token CE through a chunked lm_head (never a whole pack of logits),
  the per-context and per-label-token averaging, and the L1 regulariser on the combined LoRAs (spec §5.1);
* :mod:`.reference` — the same objectives in plain, unchunked torch (the executable spec the tests compare to);
* :mod:`.data` — streaming reader of the reference's self-generated parquet schema, greedy packing (§5.2, §5.3)
  and the resumable stream of packs the trainer takes;
* :mod:`.config` — :class:`~d2l_fast.training.config.TrainConfig`, the settings of a run, and their checks;
* :mod:`.trainer` — the :class:`~d2l_fast.training.trainer.Trainer` loop, its checkpoints and resume;
* :mod:`.metrics` — QA F1, exact match and ROUGE-L with the reference's normalisation (§6).

``pyarrow`` (the ``train`` extra) is imported only when a parquet file is read.
"""

from .losses import (
    AnswerTokens,
    LossOutput,
    answer_tokens,
    cross_entropy_loss,
    distillation_loss,
    lora_l1_norm,
    per_context_weights,
    per_token_weights,
    qa_loss,
)

__all__ = [
    "AnswerTokens",
    "LossOutput",
    "answer_tokens",
    "cross_entropy_loss",
    "distillation_loss",
    "lora_l1_norm",
    "per_context_weights",
    "per_token_weights",
    "qa_loss",
]
