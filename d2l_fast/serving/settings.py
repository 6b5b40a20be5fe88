"""The server's limits and options: :class:`ServerSettings` (each field is a ``d2l-fast serve`` flag, see
:mod:`d2l_fast.cli.serve`; ``metadata["help"]`` is the flag's help text, ``metadata["flag"]`` its name when it is
not ``--<field-name>``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ServerSettings:
    """Limits and options of the server (the ``d2l-fast serve`` flags of the same names)."""

    model_name: str | None = _opt(None, "the model id in /v1/models and responses (default: d2l-<base model name>)",
                                  flag="--served-model-name")
    adapter_memory_mb: float = _opt(1024.0, "in-memory adapter budget in MiB (least recently used beyond it)")
    store: str | None = _opt(None, "folder: one safetensors file per document, reloaded on restart")
    max_batch: int = _opt(16, "rows decoded together")
    max_queue: int = _opt(256, "requests running + waiting; more are answered 429")
    max_document_tokens: int = _opt(32768, "templated tokens per document; more are answered 413")
    max_documents_per_request: int = _opt(64, "documents one request may post or use")
    max_new_tokens: int = _opt(1024, "upper bound of a request's max_tokens; more are answered 400")
    default_max_tokens: int = _opt(256, "max_tokens of a request that gives none")
    max_body_bytes: int = _opt(8 << 20, "request body limit in bytes; larger bodies are answered 413")
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' on /v1/* (default: $D2L_API_KEY if set)")
    batch_window_ms: float = _opt(5.0, "documents posted within this window are internalized in one call")
    encode_slice_tokens: int = _opt(256, "run the encoder over a document in windows of N tokens (as chunked "
                                    "prefill), so that a running stream waits at most one decoder layer over N "
                                    "tokens per token during an upload; the chunking and the adapters stay those of "
                                    "an unsliced pass (up to fp rounding); 0: whole packed rows")
    trained_prompt: bool = _opt(True, "chat user turns in the prompt layout the checkpoint was trained with (its "
                                "model card); a request's 'trained_prompt': false sends them as they are")
    allow_runtime_lora_loading: bool = _opt(False, "enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                                            "(vLLM's runtime LoRA API): the server then reads PEFT folders from "
                                            "local paths a client names; off by default")
    static_decode: str = _opt("off", "decode steps with a preallocated KV cache, fixed shapes and the adapters in a "
                              "slot bank, captured as CUDA graphs on a GPU (serving/static_decode.py): 'on', 'off', "
                              "or 'auto' (on for a model on CUDA); a model it cannot serve keeps the dynamic path "
                              "and /health says why", choices=("off", "on", "auto"))
    data_dir: str | None = _opt(None, "folder of generated data and 'd2l-fast eval' outputs (*.jsonl) to browse at "
                                "/view (the data viewer; read-only)")

    def __post_init__(self):
        for k in ("max_batch", "max_queue", "max_document_tokens", "max_documents_per_request", "max_new_tokens",
                  "default_max_tokens", "max_body_bytes"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ServerSettings.{k} must be a positive int, got {v!r}")
        v = self.encode_slice_tokens
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"ServerSettings.encode_slice_tokens must be an int >= 0 (0: whole packed rows), got "
                             f"{v!r}")
        for k in ("adapter_memory_mb", "batch_window_ms"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"ServerSettings.{k} must be a non-negative number, got {v!r}")
        if not isinstance(self.allow_runtime_lora_loading, bool):
            raise ValueError(f"ServerSettings.allow_runtime_lora_loading must be a bool, got "
                             f"{self.allow_runtime_lora_loading!r}")
        if self.static_decode not in ("off", "on", "auto"):
            raise ValueError(f"ServerSettings.static_decode must be 'off', 'on' or 'auto', got {self.static_decode!r}")
        for k in ("model_name", "store", "api_key", "data_dir"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"ServerSettings.{k} must be a string or None, got {type(v).__name__}")
        if self.data_dir is not None and self.api_key is not None:
            raise ValueError("ServerSettings.data_dir with api_key: the data viewer (/view) does not check the API "
                             "key; browse the folder with `d2l-fast view DIR` on a loopback port instead")


__all__ = ["ServerSettings"]
