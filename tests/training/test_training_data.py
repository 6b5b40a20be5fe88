"""Spec §5.2 parquet schema (real parquet files written with pyarrow in the reference's layout) and §5.3 packing."""

import random
import re

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from d2l_fast.training import qa_loss  # noqa: E402
from d2l_fast.training.data import (  # noqa: E402
    ContextExample,
    DataError,
    collate,
    greedy_pack,
    iter_parquet,
    pack_examples,
    split_qas,
)

from .._parquet import SCHEMA, write_rows  # noqa: E402


def _row(rng, n_qa, K=4, V=50):
    ctx = rng.integers(0, V, rng.integers(3, 12)).tolist()
    ids, spans, vals, idx = [], [], [], []
    for _ in range(n_qa):
        S = int(rng.integers(4, 14))
        start = int(rng.integers(1, S))
        end = int(rng.integers(start, S + 1))
        ids.append(rng.integers(0, V, S).tolist())
        spans.append([start, end])
        lp = np.log(rng.dirichlet(np.ones(K + 2), size=end - start)[:, :K]).astype(np.float16)
        vals.append(lp.tolist())
        idx.append(rng.integers(0, V, (end - start, K)).astype(np.int32).tolist())
    return {"ctx_ids": ctx, "input_ids": ids, "response_start_end": spans, "logprobs_vals": vals,
            "logprobs_indices": idx}


def _write(path, rows, schema=SCHEMA):
    return write_rows(path, rows, schema, row_group_size=3)


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    return [_row(rng, n) for n in (1, 3, 2, 1, 2, 4, 1)]


def test_reads_reference_schema_streaming_in_order(tmp_path, rows):
    (tmp_path / "d").mkdir()
    f1 = _write(tmp_path / "d" / "ds_0000.parquet", rows[:4])
    f2 = _write(tmp_path / "d" / "ds_0001.parquet", rows[4:])
    got = list(iter_parquet(tmp_path / "d", batch_rows=2, vocab_size=50))
    assert len(got) == len(rows)
    assert [g.source for g in got] == [f"{f1}:row {i}" for i in range(4)] + [f"{f2}:row {i}" for i in range(3)]
    for ex, r in zip(got, rows):
        assert ex.ctx_chunks == [r["ctx_ids"]] and len(ex.qas) == len(r["input_ids"])
        for q, ids, (s, e), v, ix in zip(ex.qas, r["input_ids"], r["response_start_end"], r["logprobs_vals"],
                                         r["logprobs_indices"]):
            assert q.input_ids == ids and (q.start, q.end) == (s, e)
            assert q.logprobs_vals.dtype == np.float32 and q.logprobs_vals.shape == (e - s, 4)
            want = np.asarray(v, dtype=np.float16).astype(np.float32).reshape(e - s, 4)
            np.testing.assert_array_equal(q.logprobs_vals, want)
            np.testing.assert_array_equal(q.logprobs_indices, np.asarray(ix).reshape(e - s, 4))
    # a list of files reads them in the given order
    assert [g.source for g in iter_parquet([f2, f1])][:3] == [f"{f2}:row {i}" for i in range(3)]


def test_bad_row_is_reported_after_the_good_rows_before_it(tmp_path, rows):
    spans = [list(x) for x in rows[5]["response_start_end"]]
    spans[1] = [3, 99]
    bad = dict(rows[5], response_start_end=spans)
    f = _write(tmp_path / "x.parquet", rows[:5] + [bad])
    it = iter_parquet(f, batch_rows=2)
    assert len([next(it) for _ in range(5)]) == 5  # streamed: the first 5 rows come before row 5 is read
    with pytest.raises(DataError, match=rf"{f}:row 5: response_start_end\[1\] = \[3, 99\] is out of range"):
        next(it)


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.update(logprobs_vals=[r["logprobs_vals"][0][:-1]] + r["logprobs_vals"][1:]),
     r"logprobs_vals\[0\] must be \[\d+, K\] \(one row per answer token\), got shape"),
    (lambda r: r.update(logprobs_indices=[[x[:2] for x in r["logprobs_indices"][0]]] + r["logprobs_indices"][1:]),
     r"logprobs_vals\[0\] \(\d+, 4\) and logprobs_indices\[0\] \(\d+, 2\) differ"),
    (lambda r: r.update(input_ids=r["input_ids"][:1]), "columns hold different numbers of QA sequences"),
    (lambda r: r.update(response_start_end=[[0, 1]] + r["response_start_end"][1:]),
     r"response_start_end\[0\] = \[0, 1\] is out of range"),
    (lambda r: r.update(response_start_end=[[2]] + r["response_start_end"][1:]),
     r"response_start_end\[0\] must be a \[start, end\] pair, got \[2\]"),
    (lambda r: r.update(logprobs_indices=[[[60] * 4 for _ in r["logprobs_indices"][0]]] + r["logprobs_indices"][1:]),
     r"logprobs_indices\[0\] must be token ids in \[0, 50\)"),
    (lambda r: r.update(logprobs_vals=[[[0.5] * 4 for _ in r["logprobs_vals"][0]]] + r["logprobs_vals"][1:]),
     r"logprobs_vals\[0\] must be log-probabilities ≤ 0 \(−inf allowed\), got max 0.5"),
    (lambda r: r.update(input_ids=[r["input_ids"][0][:-1] + [77]] + r["input_ids"][1:]),
     r"input_ids\[0\] holds token id 77 ≥ vocab size 50"),
    (lambda r: r.update(ctx_ids=[]), "ctx_ids must be a non-empty list"),
    (lambda r: r.update(input_ids=None), "column 'input_ids' is null"),
])
def test_malformed_row_names_file_row_and_problem(tmp_path, rows, mutate, message):
    bad = {k: list(v) for k, v in rows[1].items()}
    if bad["response_start_end"][0][1] == bad["response_start_end"][0][0]:
        bad["response_start_end"][0] = [1, 2]  # make QA 0 non-empty so its teacher rows can be mutated
        bad["logprobs_vals"][0] = [[-1.0] * 4]
        bad["logprobs_indices"][0] = [[1, 2, 3, 4]]
    mutate(bad)
    f = _write(tmp_path / "bad.parquet", [rows[0], bad])
    with pytest.raises(DataError, match=f"{re.escape(str(f))}:row 1: {message}"):
        list(iter_parquet(f, vocab_size=50))


def test_file_level_errors(tmp_path, rows):
    no_teacher = pa.schema(list(SCHEMA)[:3])
    f = _write(tmp_path / "qa_only.parquet", [{k: r[k] for k in no_teacher.names} for r in rows[:2]], no_teacher)
    with pytest.raises(DataError, match=rf"{f}: missing column\(s\) \['logprobs_vals', 'logprobs_indices'\]"):
        list(iter_parquet(f))
    got = list(iter_parquet(f, teacher=False))  # cross-entropy data needs no teacher columns
    assert len(got) == 2 and got[0].qas[0].logprobs_vals is None
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet file"):
        list(iter_parquet(tmp_path / "junk.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder holds no"):
        list(iter_parquet(tmp_path / "empty"))
    with pytest.raises(DataError, match="no such file or folder"):
        list(iter_parquet(tmp_path / "missing.parquet"))


def test_chunked_ctx_ids_are_kept_as_chunks(tmp_path, rows):
    schema = pa.schema([("ctx_ids", pa.list_(pa.list_(pa.int32())))] + list(SCHEMA)[1:])
    r = dict(rows[0], ctx_ids=[[1, 2, 3], [4, 5]])
    (ex,) = iter_parquet(_write(tmp_path / "c.parquet", [r], schema))
    assert ex.ctx_chunks == [[1, 2, 3], [4, 5]] and ex.n_ctx_tokens == 5


def _reference_packing(inp, ctx, max_inp, max_ctx, max_size=-1):
    """The reference's range search: from i, the last j whose cumulative sums fit both budgets."""
    ci, cc = np.cumsum(inp), np.cumsum(ctx)
    packs, i, n = [], 0, len(inp)
    while i < n:
        bi = ci[i - 1] if i else 0
        bc = cc[i - 1] if i else 0
        ok = ((ci[i:] - bi) <= max_inp) & ((cc[i:] - bc) <= max_ctx)
        if not ok.any():
            i += 1
            continue
        j = i + int(np.where(ok)[0][-1])
        if max_size > 0:
            j = min(j, i + max_size - 1)
        packs.append((i, j + 1))
        i = j + 1
    return packs


def test_greedy_pack_docstring_example():
    assert greedy_pack([3, 4, 9, 2], [1, 1, 1, 1], 8, 8) == ([(0, 2), (3, 4)], [2])
    # the context budget binds too, and a pack may be exactly full
    assert greedy_pack([1, 1, 1], [5, 3, 4], 10, 8) == ([(0, 2), (2, 3)], [])
    assert greedy_pack([], [], 4, 4) == ([], [])


@pytest.mark.parametrize("seed", range(6))
def test_greedy_pack_invariants_and_reference_agreement(seed):
    rnd = random.Random(seed)
    n = rnd.randint(1, 60)
    inp = [rnd.choice([0, rnd.randint(1, 40), rnd.randint(30, 90)]) for _ in range(n)]
    ctx = [rnd.randint(0, 70) for _ in range(n)]
    max_inp, max_ctx = rnd.randint(40, 120), rnd.randint(50, 150)
    max_size = rnd.choice([-1, 1, 3])
    packs, dropped = greedy_pack(inp, ctx, max_inp, max_ctx, max_packed_size=max_size)
    assert dropped == [i for i in range(n) if inp[i] > max_inp or ctx[i] > max_ctx]
    covered = [i for s, e in packs for i in range(s, e)]
    assert covered == sorted(set(range(n)) - set(dropped))  # every kept example once, in order
    for s, e in packs:
        assert e > s and sum(inp[s:e]) <= max_inp and sum(ctx[s:e]) <= max_ctx
        assert max_size == -1 or e - s <= max_size
        if e < n and e not in dropped:  # greedy: the next example did not fit
            assert (sum(inp[s : e + 1]) > max_inp or sum(ctx[s : e + 1]) > max_ctx
                    or (max_size != -1 and e + 1 - s > max_size))
    assert packs == _reference_packing(inp, ctx, max_inp, max_ctx, max_size)


def test_greedy_pack_errors():
    with pytest.raises(ValueError, match="one entry per example, got 2 and 1"):
        greedy_pack([1, 2], [1], 4, 4)
    with pytest.raises(ValueError, match="max_packed_ctx_len must be a positive int, got 0"):
        greedy_pack([1], [1], 4, 0)
    with pytest.raises(ValueError, match="inp_lens must hold ints ≥ 0, got -1"):
        greedy_pack([-1], [1], 4, 4)
    with pytest.raises(ValueError, match="max_packed_size must be a positive int or -1"):
        greedy_pack([1], [1], 4, 4, max_packed_size=0)


def test_split_pack_collate_feeds_the_loss(tmp_path, rows):
    exs = list(split_qas(iter_parquet(_write(tmp_path / "a.parquet", rows)), max_qas_per_sample=1))
    assert len(exs) == sum(len(r["input_ids"]) for r in rows)
    assert all(len(ex.qas) == 1 for ex in exs)
    assert [len(ex.qas) for ex in split_qas(exs[:1] and [ContextExample([[1]], exs[0].qas * 5)], 2)] == [2, 2, 1]
    packs, dropped = pack_examples(exs, 30, 25)
    assert not dropped or all(ex.n_input_tokens > 30 or ex.n_ctx_tokens > 25 for ex in dropped)
    batch = collate(packs[0])
    N = sum(q.n_answer_tokens for ex in packs[0] for q in ex.qas)
    assert batch.logprobs_vals.shape == (N, 4) and int((batch.labels != -100).sum()) == N
    assert batch.qa_cu_seqlens[-1] == len(batch.input_ids) == len(batch.position_ids)
    assert batch.n_queries == [1] * len(packs[0]) and batch.n_ctx_chunks == [1] * len(packs[0])
    assert batch.ctx_cu_seqlens[-1] == len(batch.ctx_ids)
    # positions restart per QA and labels are the answer tokens of each span
    for j, (s, e) in enumerate(zip(batch.qa_cu_seqlens[:-1].tolist(), batch.qa_cu_seqlens[1:].tolist())):
        q = [q for ex in packs[0] for q in ex.qas][j]
        assert batch.position_ids[s:e].tolist() == list(range(e - s))
        assert batch.labels[s + q.start : s + q.end].tolist() == q.input_ids[q.start : q.end]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(len(batch.input_ids), 8, generator=gen)
    w = torch.randn(50, 8, generator=gen)
    out = qa_loss(h, w, batch.labels, batch.qa_cu_seqlens, batch.n_queries, teacher_logprobs=batch.logprobs_vals,
                  teacher_indices=batch.logprobs_indices)
    assert out.n_tokens == N and torch.isfinite(out.loss)
