"""Context encoders (spec §1.3), sharing the base model's weights instead of loading a second copy.

The reference loads an independent copy of the LM and truncates its layer list. We run the base
model's own decoder and stop it early with hooks: forward pre-hooks record the residual stream
entering each layer, a forward hook on the last kept layer applies the final norm and aborts the
forward. No weights are duplicated and the remaining layers never run. LoRA patches on the base model
are inactive while encoding (no adapter is bound), as in the reference's separate encoder copy.

Chunks are encoded without padding waste: sorted by length and run in micro-batches of similar
length (right-padded with an attention mask; padded positions are dropped), and the valid tokens
are scattered into one packed buffer. Outputs are therefore padding-free and layer-major.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .concurrency import guard_forward, model_lock
from .hf import decoder_of

logger = logging.getLogger(__name__)


class _Stop(Exception):
    pass


#: attention scores a varlen encoder pass may hold at once, per token of ``token_budget`` (a 8192-token budget
#: allows 2^24 scores: 64 MiB in fp32); longer chunks are attended in query blocks (:mod:`d2l_fast.varlen`)
SCORES_PER_BUDGET_TOKEN = 2048


class ContextEncoder(nn.Module):
    """Produces context features for the hypernetwork from the (shared) base LM.

    ``encoder_type``:
      * ``per_layer_activations``: K+1 feature maps (embedding output, residual entering layers 1..K-1,
        final norm of layer K-1's output), K = n_layers-1 or ``last_layer``-1.
      * ``early_exit``: final norm of layer ``layer_idx``-1's output.
      * ``embed_only``: the embedding output.
    """

    def __init__(self, model: nn.Module, encoder_type: str, *, layer_idx: int | None = None,
                 last_layer: int | None = None):
        super().__init__()
        self._model = [model]  # not registered: weights belong to the base model
        dec = decoder_of(model)
        n = len(dec.layers)
        if encoder_type == "per_layer_activations":
            k = (n - 1) if last_layer is None else (last_layer - 1)
        elif encoder_type == "early_exit":
            k = layer_idx if layer_idx is not None else max(1, n // 4)
        elif encoder_type == "embed_only":
            k = 0
        else:
            raise ValueError(f"unknown encoder type {encoder_type!r}")
        if not 0 <= k <= n:
            raise ValueError(f"encoder would keep {k} layers but the model has {n}")
        self.encoder_type, self.n_kept = encoder_type, k
        # encoder passes hook the decoder and switch its attention: they run alone (see d2l_fast.concurrency)
        guard_forward(dec)

    @property
    def model(self):
        return self._model[0]

    @property
    def _lock(self):
        return model_lock(decoder_of(self.model))

    @property
    def n_features(self) -> int:
        return self.n_kept + 1 if self.encoder_type == "per_layer_activations" else 1

    def _run(self, input_ids, attention_mask=None, position_ids=None, sink=None) -> list[torch.Tensor]:
        """Run the truncated decoder; feature maps are returned, or handed to ``sink(j, hs)`` as they appear."""
        dec = decoder_of(self.model)
        k, kind = self.n_kept, self.encoder_type
        states: list[torch.Tensor] = []
        handles = []
        count = [0]

        def emit(hs):
            if sink is None or kind != "per_layer_activations":
                states.append(hs)
            else:
                sink(count[0], hs)
            count[0] += 1

        def pre_hook(mod, args, kwargs):
            emit(args[0] if args else kwargs["hidden_states"])
            if kind == "embed_only":
                raise _Stop

        def post_hook(mod, args, kwargs, out):
            hs = out[0] if isinstance(out, (tuple, list)) else out
            emit(dec.norm(hs))
            raise _Stop

        with self._lock.exclusive():  # hooks on shared layers: no other thread's forward may run meanwhile
            try:
                if kind == "per_layer_activations":
                    for j in range(k):
                        handles.append(dec.layers[j].register_forward_pre_hook(pre_hook, with_kwargs=True))
                if kind == "embed_only" or k == 0:
                    handles.append(dec.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
                    if kind != "embed_only":
                        raise ValueError("an encoder with 0 layers only makes sense as embed_only")
                else:
                    handles.append(dec.layers[k - 1].register_forward_hook(post_hook, with_kwargs=True))
                with contextlib.suppress(_Stop):
                    dec(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
        if kind == "per_layer_activations":
            expected = k + 1
        else:
            states = states[-1:]
            expected = 1
        got = count[0] if kind == "per_layer_activations" else len(states)
        if got != expected:
            raise RuntimeError(f"context encoder captured {got} feature maps, expected {expected}")
        if sink is not None and kind != "per_layer_activations":
            sink(0, states[0])
            return []
        return states

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """Reference-shaped output: [B, K+1, T, H] (per_layer_activations) or [B, T, H]."""
        states = self._run(input_ids, attention_mask, position_ids)
        if self.encoder_type == "per_layer_activations":
            return torch.stack(states, 1)
        return states[0]

    @torch.no_grad()
    def encode_packed(self, chunks: list[list[int]], *, token_budget: int = 8192, dtype=None, transform=None,
                      varlen: bool | None = None, max_pad_ratio: float = 1.25) -> torch.Tensor:
        """Encode chunks of ids into one packed buffer [n_features, Σ len, H'] (no padding in the output).

        ``varlen`` (default: whenever transformers accepts the custom attention): chunks run back to back
        in packed rows of at most ``token_budget`` tokens (a longer chunk runs alone), each chunk attending to
        itself only (:mod:`d2l_fast.varlen`) — no padding anywhere — with at most
        ``SCORES_PER_BUDGET_TOKEN · token_budget`` attention scores held at once. Otherwise chunks run
        longest-first in padded micro-batches of similar lengths (padding ≤ ``max_pad_ratio`` per row),
        dropped from the output.
        With ``transform`` (e.g. the hypernetwork's modality projection, ``[n, H] -> [n, H']``) every
        feature map is transformed on its valid tokens as soon as the encoder produces it, so the
        [n_features, T, H] stack is never held: peak memory is one layer's hidden states plus the output.
        """
        from . import varlen as _varlen

        dev = next(self.model.parameters()).device
        lens = [len(c) for c in chunks]
        if not lens or any(n == 0 for n in lens):
            raise ValueError(f"every chunk needs at least one token, got lengths {lens}")
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        use_varlen = _varlen.register() if varlen is None else (varlen and _varlen.register())
        state = {"out": None}

        def make_sink(dest, mask):
            def sink(j, hs):
                valid = hs.reshape(-1, hs.shape[-1]) if mask is None else hs[mask]  # [n_valid, H], (row, pos) order
                if dtype is not None:
                    valid = valid.to(dtype)
                y = transform(valid) if transform is not None else valid
                if state["out"] is None:
                    state["out"] = y.new_empty(self.n_features, offsets[-1], y.shape[-1])
                state["out"][j].index_copy_(0, dest, y)

            return sink

        def run(idx, sink, ids, mask, pos):
            states = self._run(ids, mask, pos, sink=sink)
            for j, hs in enumerate(states):  # encoder types without streaming return their single map
                sink(j, hs)

        if use_varlen:
            i = 0
            while i < len(chunks):  # consecutive chunks, one packed row per token budget
                j, n = i + 1, lens[i]
                while j < len(chunks) and n + lens[j] <= token_budget:
                    n += lens[j]
                    j += 1
                ids = torch.tensor([t for c in chunks[i:j] for t in c], dtype=torch.long, device=dev).unsqueeze(0)
                pos = torch.cat([torch.arange(m) for m in lens[i:j]]).unsqueeze(0).to(dev)
                dest = torch.arange(offsets[i], offsets[j], device=dev)
                max_scores = SCORES_PER_BUDGET_TOKEN * token_budget
                with self._lock.exclusive(), _varlen.packed_attention(self.model, lens[i:j], dev, max_scores):
                    run(range(i, j), make_sink(dest, None), ids, None, pos)
                i = j
            return state["out"]

        order = sorted(range(len(chunks)), key=lambda i: -lens[i])
        i = 0
        while i < len(order):
            longest = lens[order[i]]
            cap = max(1, token_budget // max(1, longest))
            nb = 1  # similar lengths only: padding stays below max_pad_ratio of the real tokens of each row
            while nb < cap and i + nb < len(order) and lens[order[i + nb]] * max_pad_ratio >= longest:
                nb += 1
            idx = order[i : i + nb]
            ids = torch.zeros(len(idx), longest, dtype=torch.long)
            mask = torch.zeros(len(idx), longest, dtype=torch.bool)
            dest = []
            for row, ci in enumerate(idx):
                ids[row, : lens[ci]] = torch.as_tensor(chunks[ci], dtype=torch.long)
                mask[row, : lens[ci]] = True
                dest.append(torch.arange(offsets[ci], offsets[ci + 1]))
            dest = torch.cat(dest).to(dev)
            ids, mask = ids.to(dev), mask.to(dev)
            single = len(idx) == 1
            run(idx, make_sink(dest, None if single else mask), ids, None if single else mask.long(), None)
            i += nb
        return state["out"]


__all__ = ["ContextEncoder"]
