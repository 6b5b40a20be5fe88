"""d2l_fast.answering: the one home of the prompt layout and batched greedy answers (its old names stay importable)."""

import pytest
import torch

from d2l_fast import answering
from d2l_fast.packing import tokenize_prompt

from ._tiny import tiny_pair


def test_left_pad_right_aligns_rows():
    ids, mask = answering.left_pad([[5, 6, 7], [9]], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="at least one row"):
        answering.left_pad([], 0, "cpu")


def test_question_prompt_layout():
    _, tok = tiny_pair("llama")
    plain = answering.question_prompt(tok, " Who? ", instruction="Q: {question}", system="")
    assert plain == tokenize_prompt(tok, "Q: Who?", "")
    with_doc = answering.question_prompt(tok, "Who?", document=" The fox. ", system=None)
    assert with_doc == tokenize_prompt(tok, "The fox.\n\nWho?", None)


def test_old_import_paths_are_the_same_objects():
    from d2l_fast import zoo
    from d2l_fast.serving import engine
    from d2l_fast.training import evaluate, gen_data

    assert zoo.compare_answers is answering.compare_answers and zoo.METHODS is answering.METHODS
    assert evaluate.METHODS is answering.METHODS and evaluate.EVAL_INSTRUCTION is answering.EVAL_INSTRUCTION
    assert gen_data.left_pad is answering.left_pad is engine.left_pad
    assert gen_data.stop_token_ids is answering.stop_token_ids
    assert gen_data.gold_answer_ids is answering.gold_answer_ids


def test_greedy_answers_of_a_plain_model_equal_one_at_a_time():
    base, tok = tiny_pair("llama")
    prompts = [answering.question_prompt(tok, q) for q in ("Who watched the boats?", "When?", "Where did it go?")]
    together = answering.greedy_answers(base, prompts, tokenizer=tok, max_new_tokens=4, batch_size=3)
    alone = [answering.greedy_answers(base, [p], tokenizer=tok, max_new_tokens=4, batch_size=1)[0] for p in prompts]
    assert together == alone and len(together) == 3
    with pytest.raises(ValueError, match="adapters need a D2LModel"):
        answering.greedy_answers(base, prompts, tokenizer=tok, adapters=object(), adapter_index=[0, 1, 2],
                                 max_new_tokens=1, batch_size=1)


def test_public_api_lists():
    import d2l_fast
    import d2l_fast.serving as serving

    assert {"latent_readout", "compare_answers", "export_peft", "load_peft_adapter"} <= set(d2l_fast.__all__)
    assert not {"DecodeEngine", "GenRequest", "InternalizeBatcher"} & set(serving.__all__)
    assert all(hasattr(d2l_fast, n) for n in d2l_fast.__all__) and all(hasattr(serving, n) for n in serving.__all__)
    from d2l_fast.serving import DecodeEngine, GenRequest, InternalizeBatcher  # noqa: F401 (still importable)


def _generate_alone(model, tok, prompts, *, adapters=None, index=None, n=6):
    """Reference answers: transformers' ``generate`` on each prompt alone (no batch, no padding, no shared cache)."""
    from d2l_fast import D2LModel

    d2l = isinstance(model, D2LModel)
    stop = answering.stop_token_ids(model.base_model if d2l else model, tok)
    out = []
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        kw = dict(do_sample=False, max_new_tokens=n, eos_token_id=stop, pad_token_id=stop[0])
        seq = (model.generate(ids, torch.ones_like(ids), adapters=adapters,
                              adapter_index=None if adapters is None else [index[i]], **kw) if d2l
               else model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw))
        out.append(tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])  # gemma2: sliding layers → generate on sorted batches
def test_batched_shared_prefix_answers_equal_generate_alone(arch):
    base, tok = tiny_pair(arch)
    docs = ["The fox watched the boats all day long near the old harbour wall.", "Rain fell on the quiet town " * 9]
    qs = ["Who watched?", "When did it happen and why?", "Where?"]
    prompts = [answering.question_prompt(tok, q, document=d, system="") for d in docs for q in qs]
    prompts += [answering.question_prompt(tok, q, system="") for q in qs]
    prompts += [answering.question_prompt(tok, "Who?", document=docs[0], system="",
                                          examples=[(docs[1], "What fell?", "Rain")])]
    want = _generate_alone(base, tok, prompts)
    for share in (False, True):
        for bs, budget in ((1, None), (3, None), (16, None), (16, 200)):
            got = answering.greedy_answers(base, prompts, tokenizer=tok, max_new_tokens=6, batch_size=bs,
                                           max_batch_tokens=budget, share_prefix=share)
            assert got == want, (share, bs, budget)


def test_batched_answers_with_adapters_equal_generate_alone():
    from d2l_fast import D2LModel

    base, tok = tiny_pair("llama")
    m = D2LModel.from_base(base, tok, seed=1, latent_size=32, n_latent_queries=8, num_blocks=2, n_heads=4,
                           head_dim=16, n_kv_heads=2, init_scaler_B=1.0, max_chunk_len=128)
    ad = m.internalize(["The fox watched the boats.", "Rain fell on the quiet town all night."])
    prompts = [answering.question_prompt(tok, q) for q in ("Who watched?", "When?", "Where did it all go?")] * 2
    index = [0, 0, 0, 1, 1, -1]
    want = _generate_alone(m, tok, prompts, adapters=ad, index=index)
    for bs in (1, 4, 8):
        assert answering.greedy_answers(m, prompts, adapters=ad, adapter_index=index, max_new_tokens=6,
                                        batch_size=bs) == want
    with pytest.raises(ValueError, match="share_prefix needs adapters=None"):
        answering.greedy_answers(m, prompts, adapters=ad, adapter_index=index, max_new_tokens=1, batch_size=1,
                                 share_prefix=True)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        answering.greedy_answers(m, prompts, max_new_tokens=1, batch_size=1, max_batch_tokens=0)


def test_prefix_groups_by_hand():
    head, doc_a, doc_b = [1, 2, 3], list(range(100, 140)), list(range(200, 400))
    prompts = [head + doc_a + [7, 8], head + doc_a + [9], head + [5, 6], head + doc_b + [4]]
    g, lens, group = answering.prefix_groups(prompts, min_shared=16, min_alone=128)
    assert g == 3  # the shared head
    assert lens[:2] == [43, 43] and group[0] == group[1]  # two questions after doc_a: its prefix, once
    assert lens[2] == 3 and lens[3] == len(prompts[3]) - 1  # short prompt: the head only; long one alone
    assert len({group[0], group[2], group[3]}) == 3
    assert answering.prefix_groups([[1, 2, 3]])[:2] == (2, [2])  # at least the last token stays out
    with pytest.raises(ValueError, match="at least one prompt"):
        answering.prefix_groups([])


def test_few_shot_prompt_is_earlier_turns():
    _, tok = tiny_pair("llama")
    got = answering.question_prompt(tok, "Who?", document="Doc two.", instruction="A: {question}", system="",
                                    examples=[("Doc one.", "What?", "One")])
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "Doc one.\n\nA: What?"},
            {"role": "assistant", "content": "One"}, {"role": "user", "content": "Doc two.\n\nA: Who?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert got == tok(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="triple"):
        answering.question_prompt(tok, "Who?", examples=[("Doc", "Q?")])
