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
