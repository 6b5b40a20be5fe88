"""Chunking on templated ids (spec §2) and the packed-context structure."""

import pytest
import torch

from d2l_fast import PackedContexts
from d2l_fast.packing import KNOWN_AFFIXES, compact_chat_template, context_affixes, split_ids

from ._tiny import tiny_tokenizer

P, S = [1, 2], [8, 9]


def test_split_ids_follows_the_reference():
    ids = list(range(100, 110))  # N = 10
    assert split_ids(ids, None, P, S) == [ids]
    assert split_ids(ids, 10, P, S) == [ids]
    # n = ceil(10/4) = 3, a = ceil(10/3) = 4: slices of 4, 4, 2; first + suffix, middle wrapped, last prefix +
    assert split_ids(ids, 4, P, S) == [ids[:4] + S, P + ids[4:8] + S, P + ids[8:]]
    # n = ceil(10/3) = 4, a = ceil(10/4) = 3: 4 slices
    assert [len(c) for c in split_ids(ids, 3, P, S)] == [5, 7, 7, 3]
    # N = 10, max 9: n = 2, a = 5 -> two slices of 5
    assert [len(c) for c in split_ids(ids, 9, P, S)] == [7, 7]


def test_known_affixes_and_derived_affixes():
    assert KNOWN_AFFIXES["google/gemma-2-2b-it"] == ([2, 106, 1645, 110], [107, 108, 106, 2516, 108])
    tok = tiny_tokenizer("gemma2")
    pre, suf = context_affixes(tok, "tiny")
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "hello there"}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    assert ids[: len(pre)] == pre and ids[-len(suf):] == suf


def test_compaction():
    assert compact_chat_template("{% if x %}\n    {{ 'a\\n' }}\n{% endif %}") == "{% if x %}{{ 'a\\n' }}{% endif %}"


def test_packed_contexts_structure_and_errors():
    tok = tiny_tokenizer("llama")
    docs = ["short one", "a somewhat longer document " * 10]
    p = PackedContexts.from_documents(tok, docs, max_chunk_len=40, model_name="tiny")
    assert p.n_docs == 2 and p.n_chunks[0] == 1 and p.n_chunks[1] > 1
    assert p.chunk_to_doc == [0] + [1] * p.n_chunks[1]
    cu = p.cu_seqlens()
    assert cu.dtype == torch.int32 and cu[-1].item() == p.total_tokens == p.input_ids().shape[1]
    pos = p.position_ids()[0]
    assert (pos == 0).sum().item() == len(p.chunks)
    with pytest.raises(ValueError, match="n_chunks sums"):
        PackedContexts(chunks=[[1], [2]], n_chunks=[1])
    with pytest.raises(ValueError, match="restart at 0"):
        PackedContexts.from_padded(torch.tensor([[5, 6]]), ctx_position_ids=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="no valid tokens"):
        PackedContexts.from_padded(torch.tensor([[5, 6]]), torch.tensor([[0, 0]]))
    with pytest.raises(TypeError, match="list of documents"):
        PackedContexts.from_documents(tok, "not a list")
