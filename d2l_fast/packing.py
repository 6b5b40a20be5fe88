"""Tokenise, chat-template, chunk and pack documents (spec §1.2 and §2).

``PackedContexts`` is the one structure the context path passes around: all chunks of all documents
of a call in one padding-free row, with ``cu_seqlens`` per chunk and the chunk → document map.
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field

import torch

# Token ids of the chat wrapper around a context, per base model (spec §2, CTX_AFFIXES).
KNOWN_AFFIXES: dict[str, tuple[list[int], list[int]]] = {
    "google/gemma-2-2b-it": ([2, 106, 1645, 110], [107, 108, 106, 2516, 108]),
    "mistralai/Mistral-7B-Instruct-v0.2": ([1, 733, 16289, 28793, 28705, 13, 13], [733, 28748, 16289, 28793]),
    "Qwen/Qwen3-4B-Instruct-2507": ([151644, 8948, 198, 151645, 198, 151644, 872, 198],
                                    [151645, 198, 151644, 77091, 198]),
}

_SENTINEL = "\u2063D2LDOC\u2063"


def compact_chat_template(template: str) -> str:
    """The reference's template compaction: delete every run of four spaces and every literal newline."""
    return template.replace("    ", "").replace("\n", "")


# Chat templates shipped with the package (d2l_fast/data/chat_templates), by published base-model name: they
# render the context strings of spec §1.2 from any working directory (the reference reads its copies from
# ./chat_templates/ and falls back to the stock template elsewhere; Gemma-2's stock one rejects the system role).
PACKAGED_TEMPLATES: dict[str, str] = {
    "google/gemma-2-2b-it": "gemma-2-2b-it.jinja",
    "Qwen/Qwen3-4B-Instruct-2507": "Qwen3-4B-Instruct-2507.jinja",
    "mistralai/Mistral-7B-Instruct-v0.2": "Mistral-7B-Instruct-v0.2.jinja",
}

# Files a tokenizer is loaded from; a local folder holding none of them has no tokenizer (transformers would
# otherwise build an empty one from the model config alone).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.txt", "tekken.json")


def packaged_template_name(model_name) -> str | None:
    """The published model a name refers to (``google/gemma-2-2b-it`` or a folder ending in ``gemma-2-2b-it``)."""
    if model_name is None:
        return None
    name = str(model_name).rstrip("/")
    if name in PACKAGED_TEMPLATES:
        return name
    base = pathlib.PurePath(name).name
    for full in PACKAGED_TEMPLATES:
        if base == full.split("/")[-1]:
            return full
    return None


def packaged_chat_template(model_name) -> str | None:
    """The compacted chat template d2l_fast ships for ``model_name`` (see :data:`PACKAGED_TEMPLATES`), or None."""
    from importlib import resources

    full = packaged_template_name(model_name)
    if full is None:
        return None
    src = resources.files("d2l_fast").joinpath("data/chat_templates", PACKAGED_TEMPLATES[full]).read_text()
    return compact_chat_template(src)


def has_tokenizer_files(name_or_path) -> bool:
    """False only for a local folder that holds none of :data:`TOKENIZER_FILES` (a hub id is assumed to have them)."""
    p = pathlib.Path(str(name_or_path))
    if not p.is_dir():
        return True
    return any((p / f).is_file() for f in TOKENIZER_FILES)


def get_tokenizer(name_or_path, *, train: bool = False, chat_template: str | None = None,
                  compact_chat_template_: bool | None = None, model_name: str | None = None, **kwargs):
    """Load a tokenizer the way the reference does (``get_tokenizer``), without depending on the cwd by accident.

    pad := eos when missing; left padding for inference, right for training; left truncation.
    Chat template, in order: ``chat_template`` (a Jinja string or a path to a ``.jinja`` file); else the
    template shipped with d2l_fast when ``model_name`` (default ``name_or_path``) is one of the published base
    models (:data:`PACKAGED_TEMPLATES`; a folder whose name ends like one counts); else
    ``./chat_templates/<name>.jinja`` if it exists (the reference's lookup); else the tokenizer's own.
    Templates read from a file are compacted as the reference does; pass ``compact_chat_template_=True``
    to compact the tokenizer's stock template too (e.g. a tokenizer that ships the reference's raw template).
    A local folder without tokenizer files is refused (ValueError) instead of yielding an empty tokenizer.
    """
    from transformers import AutoTokenizer

    if not has_tokenizer_files(name_or_path):
        raise ValueError(f"{str(name_or_path)!r} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                         "pass the folder or hub id of the base model's tokenizer")
    tok = AutoTokenizer.from_pretrained(str(name_or_path), padding_side="right" if train else "left",
                                        truncation_side="left", **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    from_file = False
    packaged = packaged_chat_template(model_name if model_name is not None else name_or_path)
    if chat_template is not None:
        p = pathlib.Path(chat_template)
        if len(chat_template) < 1024 and p.suffix == ".jinja" and p.exists():
            chat_template, from_file = p.read_text(), True
    elif packaged is not None:
        chat_template, from_file = packaged, True
    else:
        p = pathlib.Path("chat_templates") / f"{pathlib.Path(str(name_or_path)).name}.jinja"
        if p.exists():
            chat_template, from_file = p.read_text(), True
    if chat_template is not None:
        tok.chat_template = chat_template
    compact = from_file if compact_chat_template_ is None else compact_chat_template_
    if compact and tok.chat_template:
        tok.chat_template = compact_chat_template(tok.chat_template)
    if not tok.chat_template:
        raise ValueError(f"tokenizer {name_or_path!r} has no chat template; Doc-to-LoRA needs a chat tokenizer "
                         f"(pass chat_template=, or use one of {sorted(PACKAGED_TEMPLATES)})")
    return tok


def _check_document(doc, i=None):
    where = "" if i is None else f" #{i}"
    if isinstance(doc, str):
        if not doc.strip():
            raise ValueError(f"document{where} is empty or whitespace-only; expected non-empty text")
        return
    if isinstance(doc, (list, tuple)) and not isinstance(doc, str):
        if len(doc) == 0:
            raise ValueError(f"document{where} is an empty token list; expected at least one id")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in doc):
            raise TypeError(f"document{where}: token-id documents must be lists of ints")
        return
    if isinstance(doc, torch.Tensor):
        if doc.dim() != 1 or doc.numel() == 0 or doc.is_floating_point():
            raise ValueError(f"document{where}: expected a non-empty 1-D integer tensor, got {doc.dtype} "
                             f"{tuple(doc.shape)}")
        return
    raise TypeError(f"document{where} must be a str, a list of token ids or a 1-D tensor, got {type(doc).__name__}")


def render_context(tokenizer, doc) -> str:
    """The context string after chat templating: ``[system: "", user: doc.strip()]`` + generation prompt."""
    msgs = doc if isinstance(doc, list) and doc and isinstance(doc[0], dict) else [
        {"role": "system", "content": ""}, {"role": "user", "content": doc.strip()}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def control_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special (control) tokens: bos/eos/pad/unk, chat-turn markers, other special added
    tokens."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, t in added.items() if getattr(t, "special", False))
    return ids


def tokenize_context(tokenizer, doc, *, split_special_tokens: bool = True) -> list[int]:
    """``tokenize_ctx_text`` of the reference: rendered chat, no extra special tokens.

    ``split_special_tokens=True`` (default, a deliberate difference from the reference): control-token text
    inside the document (``<start_of_turn>``, ``<|im_start|>``, ``<bos>``, ...) is tokenized as plain text, so
    a document cannot open or close chat turns; the template's own control tokens stay. For a document without
    such text the ids are the reference's. ``False``: the reference's behaviour (such text becomes control tokens).
    """
    _check_document(doc)
    text = render_context(tokenizer, doc)
    if not split_special_tokens:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return _tokenize_without_injection(tokenizer, doc.strip(), text)


def _tokenize_without_injection(tokenizer, body: str, text: str) -> list[int]:
    """Ids of the rendered ``text`` in which control tokens come only from the template, never from ``body``."""
    pre, _, suf = render_context(tokenizer, _SENTINEL).partition(_SENTINEL)
    if text == pre + body + suf:
        d0 = len(pre)
    elif text.count(body) == 1:
        d0 = text.index(body)
    else:
        raise ValueError("cannot locate the document in its chat-templated text to keep control-token text in it "
                         "plain; pass split_special_tokens=False for the reference's tokenization")
    d1 = d0 + len(body)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # only fast tokenizers report offsets
        raise ValueError("split_special_tokens needs a fast tokenizer (offset mapping); pass "
                         "split_special_tokens=False for the reference's tokenization") from e
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    ctrl = control_token_ids(tokenizer)
    marks = [k for k, t in enumerate(ids) if t in ctrl]
    if not any(offs[k][0] < d1 and offs[k][1] > d0 for k in marks):
        return ids  # no control token came from the document: the reference's ids
    # keep the template's control tokens around the document; re-tokenize the text between them as plain text
    before = [k for k in marks if offs[k][1] <= d0]
    after = [k for k in marks if offs[k][0] >= d1]
    k0, c0 = (before[-1] + 1, offs[before[-1]][1]) if before else (0, 0)
    k1, c1 = (after[0], offs[after[0]][0]) if after else (len(ids), len(text))
    mid = tokenizer(text[c0:c1], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids[:k0] + list(mid) + ids[k1:]


def tokenize_prompt(tokenizer, question: str, system: str | None = None) -> list[int]:
    """A question as the reference's README renders it: ``[user: question]`` + generation prompt."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be non-empty text, got {question!r}")
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs = msgs + [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_affixes(tokenizer, model_name: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the chat wrapper before and after a context (used to re-wrap chunks)."""
    if model_name in KNOWN_AFFIXES:
        p, s = KNOWN_AFFIXES[model_name]
        return list(p), list(s)
    text = render_context(tokenizer, _SENTINEL)
    if text.count(_SENTINEL) != 1:
        raise ValueError("cannot derive the context affixes: the chat template does not echo the user message once")
    pre, suf = text.split(_SENTINEL)
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []  # noqa: E731
    return enc(pre), enc(suf)


def split_ids(ids: list[int], max_chunk_len: int | None, prefix: list[int], suffix: list[int]) -> list[list[int]]:
    """Chunk templated ids (spec §2): n = ceil(N / max); equal slices; re-wrap each chunk as a chat turn."""
    n_ids = len(ids)
    if not max_chunk_len or max_chunk_len <= 0 or n_ids <= max_chunk_len:
        return [list(ids)]
    n = math.ceil(n_ids / max_chunk_len)
    a = math.ceil(n_ids / n)
    pieces = [list(ids[i : i + a]) for i in range(0, n_ids, a)]
    if len(pieces) == 1:
        return pieces
    out = []
    for j, p in enumerate(pieces):
        if j == 0:
            out.append(p + suffix)
        elif j == len(pieces) - 1:
            out.append(prefix + p)
        else:
            out.append(prefix + p + suffix)
    return out


@dataclass
class PackedContexts:
    """All chunks of all documents of a call, packed in one row without padding.

    Example: two documents, the first split in two chunks of 5 and 4 ids, the second one chunk of 3 →
    ``chunks`` lengths [5, 4, 3], ``cu_seqlens`` [0, 5, 9, 12], ``chunk_to_doc`` [0, 0, 1],
    ``n_chunks`` [2, 1], ``position_ids`` 0..4, 0..3, 0..2.
    """

    chunks: list[list[int]]
    n_chunks: list[int]
    chunk_to_doc: list[int] = field(default_factory=list)

    def __post_init__(self):
        if sum(self.n_chunks) != len(self.chunks):
            raise ValueError(f"n_chunks sums to {sum(self.n_chunks)} but there are {len(self.chunks)} chunks")
        if any(n < 1 for n in self.n_chunks):
            raise ValueError(f"every document needs at least one chunk, got n_chunks={self.n_chunks}")
        if any(len(c) == 0 for c in self.chunks):
            raise ValueError("empty chunk")
        if not self.chunk_to_doc:
            self.chunk_to_doc = [d for d, n in enumerate(self.n_chunks) for _ in range(n)]

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.chunks]

    @property
    def n_docs(self) -> int:
        return len(self.n_chunks)

    @property
    def total_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    def cu_seqlens(self, device=None) -> torch.Tensor:
        cu = [0]
        for n in self.lengths:
            cu.append(cu[-1] + n)
        return torch.tensor(cu, dtype=torch.int32, device=device)

    def input_ids(self, device=None) -> torch.Tensor:
        return torch.tensor([t for c in self.chunks for t in c], dtype=torch.long, device=device).unsqueeze(0)

    def position_ids(self, device=None) -> torch.Tensor:
        return torch.cat([torch.arange(len(c)) for c in self.chunks]).unsqueeze(0).to(device)

    @classmethod
    def from_ids(cls, docs_ids: list[list[int]], *, max_chunk_len: int | None = None,
                 affixes: tuple[list[int], list[int]] | None = None) -> "PackedContexts":
        """Templated id lists (one per document) → chunks. Chunking needs the affixes."""
        chunks, n_chunks = [], []
        for i, ids in enumerate(docs_ids):
            _check_document(ids, i)
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
            if max_chunk_len and len(ids) > max_chunk_len and affixes is None:
                raise ValueError("chunking templated ids needs the model's context affixes")
            cs = split_ids(ids, max_chunk_len, *(affixes or ([], [])))
            chunks.extend(cs)
            n_chunks.append(len(cs))
        return cls(chunks=chunks, n_chunks=n_chunks)

    @classmethod
    def from_documents(cls, tokenizer, docs, *, max_chunk_len: int | None = None, model_name: str | None = None,
                       split_special_tokens: bool = True) -> "PackedContexts":
        """Text documents (or pre-tokenised templated id lists) → chat-templated, chunked, packed.

        ``split_special_tokens``: control-token text in a text document stays plain text (see :func:`tokenize_context`).
        """
        if isinstance(docs, (str, torch.Tensor)):
            raise TypeError("docs must be a list of documents; wrap a single document in a list")
        docs = list(docs)
        if not docs:
            raise ValueError("expected at least one document, got an empty list")
        for i, d in enumerate(docs):
            _check_document(d, i)
        ids = [tokenize_context(tokenizer, d, split_special_tokens=split_special_tokens) if isinstance(d, str) else d
               for d in docs]
        long = max_chunk_len and max_chunk_len > 0 and any(len(i) > max_chunk_len for i in ids)
        aff = context_affixes(tokenizer, model_name) if long else None  # only needed when something is chunked
        return cls.from_ids(ids, max_chunk_len=max_chunk_len, affixes=aff)

    @classmethod
    def from_padded(cls, ctx_ids: torch.Tensor, ctx_attn_mask: torch.Tensor | None = None,
                    ctx_position_ids: torch.Tensor | None = None, n_ctx_chunks=None) -> "PackedContexts":
        """The reference's batched inputs: padded rows + mask, or one packed row + restarting position ids."""
        if not isinstance(ctx_ids, torch.Tensor) or ctx_ids.dim() != 2 or ctx_ids.is_floating_point():
            raise ValueError(f"ctx_ids must be a 2-D integer tensor [rows, T], got "
                             f"{getattr(ctx_ids, 'dtype', type(ctx_ids))} {tuple(getattr(ctx_ids, 'shape', ()))}")
        ids = ctx_ids.detach().cpu()
        if ctx_position_ids is not None:
            pos = ctx_position_ids.detach().cpu()
            if pos.shape != ids.shape or ids.shape[0] != 1:
                raise ValueError(f"packed ctx_ids/ctx_position_ids must both be [1, T], got {tuple(ids.shape)} / "
                                 f"{tuple(pos.shape)}")
            starts = (pos[0] == 0).nonzero().flatten().tolist()
            if not starts or starts[0] != 0:
                raise ValueError("ctx_position_ids must start at 0 and restart at 0 for every chunk")
            bounds = starts + [ids.shape[1]]
            chunks = [ids[0, a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
        elif ctx_attn_mask is not None:
            m = ctx_attn_mask.detach().cpu()
            if m.shape != ids.shape:
                raise ValueError(f"ctx_attn_mask shape {tuple(m.shape)} != ctx_ids shape {tuple(ids.shape)}")
            chunks = [ids[r][m[r].bool()].tolist() for r in range(ids.shape[0])]
        else:
            raise ValueError("ctx_attn_mask or ctx_position_ids is required with ctx_ids")
        if any(len(c) == 0 for c in chunks):
            raise ValueError("a context row has no valid tokens")
        if n_ctx_chunks is None:
            n = [1] * len(chunks)
        else:
            n = [int(x) for x in (n_ctx_chunks.tolist() if isinstance(n_ctx_chunks, torch.Tensor) else n_ctx_chunks)]
        return cls(chunks=chunks, n_chunks=n)


__all__ = [
    "KNOWN_AFFIXES",
    "PACKAGED_TEMPLATES",
    "PackedContexts",
    "compact_chat_template",
    "context_affixes",
    "control_token_ids",
    "get_tokenizer",
    "has_tokenizer_files",
    "packaged_chat_template",
    "render_context",
    "split_ids",
    "tokenize_context",
    "tokenize_prompt",
]
