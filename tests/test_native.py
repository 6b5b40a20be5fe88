"""Native batched API on four tiny architectures: packed internalisation of many documents, per-row adapters."""

import pytest
import torch

from d2l_fast import AdapterBatch, D2LModel, PackedContexts

from ._numerics import BATCHED_LOGITS, BATCHING
from ._tiny import tiny_pair

ARCHS = ["gemma2", "llama", "qwen3", "mistral"]

WORDS = ("the river keeper wrote a date on the slate while the fox watched boats at dusk and the council met "
         "to discuss the roof lanterns and clocks of the old mill town near the water").split()


def doc(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx).capitalize() + "."


DOCS = [doc(n, i) for i, n in enumerate([5, 60, 12, 140, 30, 1, 90, 20])]
QUESTIONS = ["What did the keeper write?", "Who watched?", "Where is the mill?", "What did the council discuss?"] * 2


def build(arch, seed=0, **kw):
    base, tok = tiny_pair(arch, seed=seed)
    return D2LModel.from_base(base, tok, seed=seed + 1, latent_size=32, n_latent_queries=8, num_blocks=2, n_heads=4,
                              head_dim=16, n_kv_heads=2, init_scaler_B=1.0, max_chunk_len=64, **kw)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return build(request.param)


def test_packed_batch_of_documents(model):
    packed = model.pack(DOCS)
    assert len(packed.chunks) > len(DOCS)  # some documents were chunked
    assert max(packed.n_chunks) >= 3
    adapters = model.internalize(DOCS)
    r = model.spec.lora_r
    assert len(adapters) == len(DOCS)
    assert adapters.ranks == [(n + 1) * r for n in packed.n_chunks]  # ragged, not padded
    # one packed call equals internalising each document alone
    for i in (0, 3, 5):
        alone = model.internalize([DOCS[i]])
        for m in adapters.modules:
            torch.testing.assert_close(adapters[i].A[m], alone.A[m], **BATCHING)
            torch.testing.assert_close(adapters[i].B[m], alone.B[m], **BATCHING)
    # several packed calls (memory-bounded) equal one call
    split = model.internalize(DOCS, docs_per_call=3, progress=False)
    assert split.ranks == adapters.ranks
    torch.testing.assert_close(split.A["down_proj"], adapters.A["down_proj"], **BATCHING)


def test_packed_equals_padded(model):
    packed = model.pack(DOCS[:4])
    n = max(packed.lengths)
    ids = torch.zeros(len(packed.chunks), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(packed.chunks):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    from_padded = PackedContexts.from_padded(ids, mask, n_ctx_chunks=packed.n_chunks)
    from_row = PackedContexts.from_padded(packed.input_ids(), ctx_position_ids=packed.position_ids(),
                                          n_ctx_chunks=packed.n_chunks)
    with torch.no_grad():
        a = model.chunk_loras(packed)
        b = model.chunk_loras(from_padded)
        c = model.chunk_loras(from_row)
    for x in (b, c):
        torch.testing.assert_close(x["down_proj"]["A"], a["down_proj"]["A"], **BATCHING)
        torch.testing.assert_close(x["down_proj"]["B"], a["down_proj"]["B"], **BATCHING)


def test_generate_mixed_adapters_matches_alone(model):
    adapters = model.internalize(DOCS)
    rows = [3, 0, -1, 7, 3, 5, 1, 6]  # repeated adapter, a row without adapter
    ids, mask = model.encode_prompts(QUESTIONS)
    out = model.generate(ids, mask, adapters=adapters, adapter_index=rows, max_new_tokens=6, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits, 1)
    base = model.generate(ids, mask, max_new_tokens=6, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    assert (logits[0] - torch.stack(base.logits, 1)[0]).abs().max() > 1e-3  # adapters change the output
    for i in (0, 2, 3):
        one_ids, one_mask = model.encode_prompts([QUESTIONS[i]])
        kw = dict(adapters=adapters[rows[i]]) if rows[i] >= 0 else {}
        alone = model.generate(one_ids, one_mask, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, **kw)
        n_new = alone.sequences.shape[1] - one_ids.shape[1]
        assert torch.equal(out.sequences[i, -n_new:], alone.sequences[0, -n_new:])
        torch.testing.assert_close(logits[i, :n_new], torch.stack(alone.logits, 1)[0], **BATCHED_LOGITS)


def test_adapter_save_load_and_select(model, tmp_path):
    adapters = model.internalize(DOCS[:3], names=["a", "b", "c"])
    adapters.save(tmp_path / "ad.safetensors")
    back = AdapterBatch.load(tmp_path / "ad.safetensors")
    assert back.names == ["a", "b", "c"] and back.rank_offsets == adapters.rank_offsets
    assert back.model_id == model.model_id
    assert torch.equal(back.A["down_proj"], adapters.A["down_proj"])
    sel = adapters.select([2, 0])
    assert sel.names == ["c", "a"] and sel.ranks == [adapters.ranks[2], adapters.ranks[0]]
    both = AdapterBatch.concat([adapters[0], adapters[1:]])
    assert torch.equal(both.B["down_proj"], adapters.B["down_proj"])
    comp = adapters.compose([0, 1])
    assert len(comp) == 1 and comp.ranks == [adapters.ranks[0] + adapters.ranks[1]]


def test_bad_input_is_rejected_and_changes_nothing(model):
    adapters = model.internalize(DOCS[:2])
    snapshot = adapters.A["down_proj"].clone()
    for bad, err in [([""], ValueError), (["   \n "], ValueError), ([42], TypeError), ("a single string", TypeError),
                     ([], ValueError), ([DOCS[0], None], TypeError)]:
        with pytest.raises(err):
            model.internalize(bad)
    ids, mask = model.encode_prompts(QUESTIONS[:3])
    with pytest.raises(ValueError, match="adapter indices"):
        model.generate(ids, mask, adapters=adapters, max_new_tokens=2)  # 3 rows, 2 adapters, no index
    with pytest.raises(ValueError, match=r"\[-1, 2\)"):
        model.generate(ids, mask, adapters=adapters, adapter_index=[0, 1, 2], max_new_tokens=2)
    with pytest.raises(ValueError, match="integer tensor"):
        model.generate(ids.float(), mask, adapters=adapters, adapter_index=[0, 1, 0], max_new_tokens=2)
    with pytest.raises(ValueError, match="on meta"):
        model.generate(ids.to("meta"), None, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.generate(ids, mask[:, 1:], max_new_tokens=2)
    other = build("llama", seed=5)
    with pytest.raises(ValueError, match="another model"):
        other.generate(*other.encode_prompts(QUESTIONS[:2]), adapters=adapters, max_new_tokens=2)
    assert torch.equal(adapters.A["down_proj"], snapshot)
    # the adapters still work after all the failures
    out = model.generate(ids[:2], mask[:2], adapters=adapters, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2


def test_base_model_untouched_without_binding(model):
    ids, mask = model.encode_prompts(QUESTIONS[:2])
    with torch.no_grad():
        a = model.base_model(input_ids=ids, attention_mask=mask).logits
        model.internalize(DOCS[:2])
        b = model.base_model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


def test_bf16_base_model_matches_fp32():
    """A bf16 base model: adapters are cast once per binding, the LoRA runs in bf16 with fp32 accumulation."""
    m32 = build("llama", seed=7)
    base16, tok = tiny_pair("llama", seed=7)
    m16 = D2LModel(base16.to(torch.bfloat16), m32.hypernet, tok)
    ad = m32.internalize(DOCS[:3])
    assert m16.model_id == m32.model_id
    ids, mask = m32.encode_prompts(QUESTIONS[:3])
    with torch.no_grad():
        l32 = m32(ids, mask, adapters=ad, adapter_index=[2, 0, 1]).logits
        l16 = m16(ids, mask, adapters=ad, adapter_index=[2, 0, 1]).logits
        b32 = m32(ids, mask).logits
    assert l16.dtype == torch.bfloat16
    v = mask.bool()
    err = (l16.float() - l32)[v].abs().max()
    effect = (l32 - b32)[v].abs().max()
    assert err < 0.25 * effect, (err, effect)  # bf16 rounding is well below the adapters' effect
    assert m16._prepare_adapters(ad).dtype == torch.bfloat16
    assert m16._prepare_adapters(ad) is m16._prepare_adapters(ad)  # cast once, cached


def test_beam_search_expands_row_adapters():
    model = build("qwen3", seed=9)
    adapters = model.internalize(DOCS[:2])
    ids, mask = model.encode_prompts(QUESTIONS[:2])
    out = model.generate(ids, mask, adapters=adapters, adapter_index=[1, 0], num_beams=2, num_return_sequences=2,
                         max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 4  # HF expands each row into its beams: rows keep their adapter
    one_ids, one_mask = model.encode_prompts([QUESTIONS[0]])
    alone = model.generate(one_ids, one_mask, adapters=adapters[1], num_beams=2, num_return_sequences=2,
                           max_new_tokens=4, do_sample=False)
    assert torch.equal(out[:2, -4:], alone[:, -4:])
