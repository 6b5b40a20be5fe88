"""Drop-in API behaviour beyond the golden numbers: packed forward, state safety, errors."""

import pytest
import torch
from safetensors.torch import load_file

from d2l_fast import ModulatedPretrainedModel, get_tokenizer

from ._numerics import GOLDEN_LOGITS


@pytest.fixture(scope="module")
def cases(golden_dir):
    return load_file(str(golden_dir / "cases.safetensors"))


@pytest.fixture(scope="module")
def model(golden_dir):
    tok = get_tokenizer(golden_dir / "tiny-gemma2", compact_chat_template_=True)
    return ModulatedPretrainedModel.from_state_dict(str(golden_dir / "pytorch_model.bin"), train=False,
                                                    use_sequence_packing=True, base_model=golden_dir / "tiny-gemma2",
                                                    tokenizer=tok)


def test_packed_forward_equals_padded(model, cases):
    ids, mask = cases["inputs.prompt_ids"], cases["inputs.prompt_mask"]
    rows = [ids[i][mask[i].bool()] for i in range(2)]
    packed = torch.cat(rows).unsqueeze(0)
    pos = torch.cat([torch.arange(len(r)) for r in rows]).unsqueeze(0)
    with torch.no_grad():
        out = model(cases["inputs.ctx_pair_ids"], cases["inputs.ctx_pair_mask"], n_ctx_chunks=[1, 1], input_ids=packed,
                    position_ids=pos).logits[0]
    ref = cases["case5.logits_lora_11"]
    torch.testing.assert_close(out[: len(rows[0])], ref[0][mask[0].bool()], **GOLDEN_LOGITS)
    torch.testing.assert_close(out[len(rows[0]):], ref[1][mask[1].bool()], **GOLDEN_LOGITS)


def test_state_dict_roundtrip(model):
    sd = model.state_dict()
    assert sd["base_model_name_or_path"] == "tiny-gemma2"
    model.load_state_dict(sd)


def test_bad_input_keeps_internalized_document(model, cases):
    model.reset()
    doc = "The keeper of the river library wrote the date on a slate."
    loras = model.internalize(doc)
    kept = {k: v.clone() for k, v in loras["down_proj"].items()}
    for bad in ["", "   ", None, 3]:
        with pytest.raises((ValueError, TypeError)):
            model.internalize(bad)
    assert model.generated_loras is loras
    assert torch.equal(model.generated_loras["down_proj"]["A"], kept["A"])
    with pytest.raises(ValueError, match="n_ctx_chunks"):
        model.generate(ctx_ids=cases["inputs.ctx_pair_ids"], ctx_attn_mask=cases["inputs.ctx_pair_mask"],
                       input_ids=cases["inputs.prompt_ids"])
    with pytest.raises(ValueError, match="ctx_attn_mask or ctx_position_ids"):
        model.generate_weights(cases["inputs.ctx_pair_ids"])
    with pytest.raises(ValueError, match="n_queries"):
        model.generate(ctx_ids=cases["inputs.ctx_batch_ids"], ctx_attn_mask=cases["inputs.ctx_batch_mask"],
                       n_ctx_chunks=[1, 1, 1], input_ids=cases["inputs.prompt_ids"],
                       attention_mask=cases["inputs.prompt_mask"])
    with pytest.raises(ValueError, match="integer tensor"):
        model.generate_weights(cases["inputs.ctx_pair_ids"].float(), cases["inputs.ctx_pair_mask"])
    with pytest.raises(ValueError, match="ctx_attn_mask shape"):
        model.generate_weights(cases["inputs.ctx_pair_ids"], cases["inputs.ctx_pair_mask"][:, 1:])
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(max_new_tokens=2)
    assert model.generated_loras is loras
    model.reset()
    assert model.generated_loras is None


def test_n_queries_maps_rows_to_contexts(model, cases):
    ids, mask = cases["inputs.prompt_ids"], cases["inputs.prompt_mask"]
    # both prompt rows read context 0 (n_queries=[2]): row 1 then equals the row-1 output under [ctx0, ctx0]
    with torch.no_grad():
        two = model(cases["inputs.ctx_single_ids"], cases["inputs.ctx_single_mask"], n_ctx_chunks=[1], n_queries=[2],
                    input_ids=ids, attention_mask=mask).logits
        pair = model(cases["inputs.ctx_single_ids"].repeat(2, 1), cases["inputs.ctx_single_mask"].repeat(2, 1),
                     n_ctx_chunks=[1, 1], input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(two[mask.bool()], pair[mask.bool()], **GOLDEN_LOGITS)
