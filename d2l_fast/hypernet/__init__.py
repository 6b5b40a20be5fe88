"""The hypernetwork: a Perceiver aggregator (:mod:`.perceiver`) and a per-layer head (:mod:`.head`), assembled into
:class:`HyperLoRA` (:mod:`.hyperlora`), which turns context features into LoRA A/B."""

from .hyperlora import Aggregator, HyperLoRA  # noqa: F401 (Aggregator: internal, kept importable from here)

__all__ = ["HyperLoRA"]
