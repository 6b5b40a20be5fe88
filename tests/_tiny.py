"""Test fixtures: tiny random-weight causal LMs (Llama, Qwen3, Mistral, Gemma2) and matching byte-level BPE
tokenizers with arch-style special tokens and chat templates, trained in-process on a small bundled English text.
All offline; transformers / tokenizers are imported lazily.

* :func:`tiny_model` / :func:`tiny_tokenizer` / :func:`tiny_pair`.
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Any

import torch

from d2l_fast.packing import compact_chat_template

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["TINY_ARCHS", "TINY_VOCAB_SIZE", "tiny_model", "tiny_pair", "tiny_tokenizer"]

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


# The reference's Gemma-2 template (system message folded into the first user turn).
_GEMMA2_TEMPLATE = compact_chat_template(  # what the reference does to a template file
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


def tiny_reader(seed: int = 1, arch: str = "llama"):
    """A D2L model on ``tiny_pair(arch)`` with a small random hypernetwork (latent 32, 8 latent queries, 2 blocks,
    rank from the defaults) that chunks at 128 tokens: for tests of scripts that score a reader's answers."""
    from d2l_fast import D2LModel

    base, tok = tiny_pair(arch)
    return D2LModel.from_base(base, tok, seed=seed, latent_size=32, n_latent_queries=8, num_blocks=2, n_heads=4,
                              head_dim=16, n_kv_heads=2, init_scaler_B=1.0, max_chunk_len=128)
