"""Per-row token choice helpers of the decode engine: stop-string hold-back, OpenAI penalties, temperature / top-p.

Moved out of :mod:`d2l_fast.serving.engine` (which keeps only the batching); the engine calls them per row.
"""

from __future__ import annotations

import math

import torch


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (not yet safe to send)."""
    if not isinstance(text, str) or not all(isinstance(s, str) for s in stops):
        raise TypeError(f"stop_holdback needs a str and a list of str, got {type(text).__name__} / {stops!r:.60}")
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def penalty_offsets(r, vocab: int, device) -> torch.Tensor:
    """OpenAI's presence / frequency penalties of the tokens ``r`` (a GenRequest) generated so far, as a logit offset
    ``[vocab]``: ``frequency_penalty · count + presence_penalty · [count > 0]``."""
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"vocab must be a positive int, got {vocab!r}")
    ids = torch.tensor([t for t in r.out_ids if 0 <= t < vocab], dtype=torch.long, device=device)
    count = torch.bincount(ids, minlength=vocab).float()
    return r.frequency_penalty * count + r.presence_penalty * (count > 0).float()


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """One token from ``softmax(logits / temperature)`` restricted to the top-p nucleus (``gen``: the row's
    generator, None: the global one); the argmax when the probabilities are not finite."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 1:
        raise ValueError(f"logits must be a 1-D tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature!r}")
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(0) - sp < top_p  # the smallest prefix whose mass reaches top_p (at least one token)
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    if not math.isfinite(float(probs.sum())) or float(probs.sum()) <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(probs, 1, generator=gen))


__all__ = ["penalty_offsets", "sample_token", "stop_holdback"]
