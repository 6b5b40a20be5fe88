"""Static decoding (d2l_fast.serving.static_decode) against the dynamic engine path and the model's own generate.

Tiny random transformers models (Llama with sdpa, Gemma-2 with eager attention, soft-capping and a sliding window
shorter than the rows), real hypernetwork adapters (init_scaler_B makes them change the tokens). The engine is
driven step by step here (admissions at chosen steps), so joins, departures, bucket changes, compactions and growths
happen at known points; greedy tokens are compared exactly (tests/_numerics.py: batched greedy tokens are exact)."""

import pytest
import torch

from d2l_fast import D2LModel
from d2l_fast.serving import DecodeEngine, GenRequest
from d2l_fast.serving import static_decode as sd

from .._tiny import tiny_model, tiny_tokenizer

KW = dict(latent_size=32, num_blocks=1, n_heads=4, head_dim=16, n_kv_heads=2)
DOCS = ["The keeper of the old mill wrote every storm into a blue ledger, and the river rose twice that spring.",
        "The council met on the first Monday.", "Bread rose in the warm kitchen.", "Snow fell on the quiet harbor."]


def _model(arch, **over):
    return D2LModel.from_base(tiny_model(arch, **over), tiny_tokenizer(arch), seed=0, init_scaler_B=6.0,
                              max_chunk_len=24, **KW)


@pytest.fixture(scope="module")
def llama():
    m = _model("llama")
    return m, m.internalize(DOCS)


@pytest.fixture(scope="module")
def gemma():
    m = _model("gemma2", sliding_window=6)  # the rows outgrow the window: the sliding mask band matters
    return m, m.internalize(DOCS)


@pytest.fixture
def small_buffers(monkeypatch):
    """Length buckets from 16 and no headroom: rows cross the capacity (compaction and growth) within a few steps."""
    monkeypatch.setattr(sd, "MIN_LENGTH", 16)
    monkeypatch.setattr(sd, "MAX_HEADROOM", 0)


def prompt(k, n):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randint(10, 500, (n,), generator=g).tolist()


def reference(model, ids, adapter, n):
    """Greedy tokens of D2LModel.generate for one row alone (eos included, generation stops there)."""
    x = torch.tensor([ids])
    out = model.generate(x, torch.ones_like(x), adapters=adapter, adapter_index=[0] if adapter else None,
                         max_new_tokens=n, do_sample=False)[0, x.shape[1]:].tolist()
    eos = model.base_model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    k = next((i + 1 for i, t in enumerate(out) if t in eos), len(out))
    return out[:k]


def drive(engine, arrivals, before_step=None):
    """Admit ``arrivals`` [(step, [GenRequest])] (each once the step is reached and the batch has room), decode until
    every row finished; the engine thread is not started."""
    pending, step = [(s, list(rs)) for s, rs in arrivals], 0
    while pending or engine._rows:
        while (pending and pending[0][0] <= step and engine.max_batch - len(engine._rows) >= len(pending[0][1])
               and (not engine._rows or engine._can_merge)):  # as the engine's loop: no merge, no join
            engine._admit(pending.pop(0)[1])
        if engine._rows:
            if before_step is not None:
                before_step(engine)
            engine._step()
        step += 1
        assert step < 500, "the engine does not finish"


def jobs(ads):
    """(step, prompt, adapter, max_new_tokens): distinct adapters, two rows without one, one adapter object shared
    by two rows, prompts longer than the write column when they join, rows leaving at different steps."""
    one = [ads.select([k]) for k in range(len(ads))]
    return [(0, prompt(0, 14), one[0], 4), (0, prompt(1, 3), None, 40), (2, prompt(2, 5), one[1], 6),
            (4, prompt(3, 21), one[2], 12), (8, prompt(4, 4), one[1], 25), (9, prompt(5, 6), None, 7),
            (9, prompt(6, 9), one[3], 30)]


def run(model, spec, *, static, max_batch=4, before_step=None):
    events = []
    engine = DecodeEngine(model, max_batch=max_batch, static=static)
    reqs = [GenRequest(prompt_ids=p, adapter=a, max_new_tokens=n, sink=lambda k, v: events.append((k, v)))
            for _, p, a, n in spec]
    drive(engine, [(s, [r]) for (s, *_), r in zip(spec, reqs)], before_step)
    assert not [v for k, v in events if k == "error"]
    return engine, [r.out_ids for r in reqs]


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_static_tokens_equal_dynamic_and_generate(arch, llama, gemma, small_buffers):
    model, ads = llama if arch == "llama" else gemma
    spec = jobs(ads)
    eng, got = run(model, spec, static=True)
    assert eng._static is not None and eng.static_off is None
    st = eng._static
    # the schedule crossed every mechanism: joins into a running batch, bucket moves, compaction and growth
    assert eng.joins_mid_batch >= 5 and eng.max_rows_seen == 4
    assert st.moves >= 1 and st.compactions >= 1 and st.growths >= 1, (st.moves, st.compactions, st.growths)
    _, dyn = run(model, spec, static=False)
    assert got == dyn
    for (_, p, a, n), out in zip(spec, got):
        assert out == reference(model, p, a, n)
    base = [reference(model, p, None, n) for _, p, a, n in spec]
    assert sum(o != b for o, b in zip(got, base)) >= 3  # the adapters change the tokens: they were applied


def test_pad_rows_and_freed_slots_are_inert(llama):
    """Every free slot (pad rows of the bucket, slots of rows that left) is filled with NaN before each step: the
    running rows and the rows that later join those slots decode exactly as without it."""
    model, ads = llama
    spec = jobs(ads)

    def poison(engine):
        st = engine._static
        free = torch.tensor([s for s in range(st.max_batch) if st.rows[s] is None], dtype=torch.long)
        if len(free):
            for buf in (*st.keys, *st.values):
                buf.index_fill_(0, free, float("nan"))

    eng, got = run(model, spec, static=True, before_step=poison)
    assert eng._static is not None
    _, clean = run(model, spec, static=True)
    assert got == clean


def test_a_bad_row_fails_alone(llama):
    """A request with a NaN adapter or a two-adapter batch fails; the rows admitted with it decode unchanged."""
    model, ads = llama
    bad = ads.select([1])
    bad.A["down_proj"][0, 0, 0] = float("nan")
    good = [(prompt(0, 7), ads.select([0]), 6), (prompt(1, 5), None, 9)]
    events = []
    sink = lambda k, v: events.append((k, v))  # noqa: E731
    reqs = [GenRequest(prompt_ids=p, adapter=a, max_new_tokens=n, sink=sink) for p, a, n in good]
    bad_reqs = [GenRequest(prompt_ids=prompt(2, 4), adapter=bad, max_new_tokens=5, sink=sink),
                GenRequest(prompt_ids=prompt(3, 4), adapter=ads.select([2, 3]), max_new_tokens=5, sink=sink)]
    engine = DecodeEngine(model, max_batch=4, static=True)
    drive(engine, [(0, [reqs[0], bad_reqs[0], reqs[1], bad_reqs[1]])])
    errors = [v for k, v in events if k == "error"]
    assert len(errors) == 2 and "NaN" in str(errors[0]) and "one adapter" in str(errors[1])
    assert [r.out_ids for r in bad_reqs] == [[], []]
    for r, (p, a, n) in zip(reqs, good):
        assert r.out_ids == reference(model, p, a, n)
    assert engine._static is not None and not engine._static.bank.nonfinite()


def test_sdpa_batch_buckets_and_the_adapter_bank(llama):
    """Three rows run in the bucket of 4 (one pad row); the bank holds each row's adapter zero-padded to the slot
    rank and zeros for the row without one; rows leaving shrink the bucket."""
    model, ads = llama
    assert model.base_model.config._attn_implementation == "sdpa"
    spec = [(0, prompt(0, 6), ads.select([0]), 3), (0, prompt(1, 8), None, 12), (0, prompt(2, 5), ads.select([3]), 12)]
    seen = []

    def record(engine):
        st = engine._static
        seen.append(sd.batch_bucket(max(st.occupied) + 1, st.max_batch))
        if len(seen) == 1:
            R, ranks = st.rank, ads.ranks
            assert R == -(-max(ranks[0], ranks[3]) // sd.RANK_MULTIPLE) * sd.RANK_MULTIPLE
            A = st.bank.A["down_proj"]
            for slot, k in ((0, 0), (2, 3)):
                src = ads.A["down_proj"][:, ads.rank_offsets[k]:ads.rank_offsets[k + 1]]
                assert torch.equal(A[:, slot * R:slot * R + ranks[k]], src)  # a plain fp32 copy: bit for bit
                assert not A[:, slot * R + ranks[k]:(slot + 1) * R].any()
            assert not A[:, R:2 * R].any() and st.has_adapter[:3] == [True, False, True]

    eng, got = run(model, spec, static=True, before_step=record)
    assert seen[0] == 4 and seen[-1] == 2 and eng._static.moves == 1  # after row 0 left: 2 rows, moved into slot 0
    for (_, p, a, n), out in zip(spec, got):
        assert out == reference(model, p, a, n)


def test_buckets_and_support():
    from transformers import DynamicCache, StaticCache

    assert [sd.batch_bucket(n, 64) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert [sd.batch_bucket(n, 12) for n in (1, 8, 9, 12)] == [1, 8, 12, 12]
    assert [sd.length_bucket(n) for n in (0, 64, 65, 1000)] == [64, 64, 128, 1024]
    for bad in (0, 65, 2.0, True):
        with pytest.raises(ValueError, match="n must be an int in"):
            sd.batch_bucket(bad, 64)
    with pytest.raises(ValueError, match="static must be"):
        DecodeEngine(_model("llama"), static="yes")
    model = _model("gemma2", sliding_window=6)
    cfg = model.base_model.config
    assert sd.static_unsupported(model, DynamicCache(config=cfg)) is None  # full + sliding layers, eager
    reason = sd.static_unsupported(model, StaticCache(config=cfg, max_cache_len=16))
    assert "StaticLayer" in reason or "StaticSlidingWindowLayer" in reason


def test_auto_is_dynamic_on_cpu(llama):
    model, ads = llama
    spec = [(0, prompt(0, 6), ads.select([0]), 5), (1, prompt(1, 4), None, 5)]
    eng, got = run(model, spec, static="auto")
    assert eng._static is None and not eng.static
    for (_, p, a, n), out in zip(spec, got):
        assert out == reference(model, p, a, n)


@pytest.mark.gpu
def test_cuda_graphs_equal_the_dynamic_path(small_buffers):
    """On CUDA: the captured graphs (buckets, growth, compaction: re-captures) give the dynamic path's tokens."""
    model = D2LModel.from_base(tiny_model("llama").cuda(), tiny_tokenizer("llama"), seed=0, init_scaler_B=6.0,
                               max_chunk_len=24, **KW)
    ads = model.internalize(DOCS)
    spec = jobs(ads)
    eng, got = run(model, spec, static=True)
    assert eng._static is not None and eng._static.graphs and eng._static.captures >= 3
    _, dyn = run(model, spec, static=False)
    assert got == dyn


def test_server_static_decode_setting(llama):
    """``d2l-fast serve --static-decode on``: a real server and the official client get the tokens the dynamic
    server gives, concurrently and with a document; /health says which path decodes; bad values are refused."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from concurrent.futures import ThreadPoolExecutor

    from d2l_fast.cli import build_parser
    from d2l_fast.cli.serve import settings_from_args
    from d2l_fast.serving import BackgroundServer, ServerSettings, create_app

    model, _ = llama
    answers, health = {}, {}
    for mode in ("off", "on"):
        with BackgroundServer(create_app(model, ServerSettings(static_decode=mode, max_batch=4))) as srv:
            http = httpx.Client(base_url=srv.url, timeout=60)
            health[mode] = http.get("/health").json()
            doc = http.post("/v1/documents", json={"text": DOCS[0]}).json()["id"]
            oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)

            def ask(i, oa=oa, doc=doc):
                extra = {"documents": [doc]} if i % 2 else {}
                r = oa.chat.completions.create(model=srv.app.state.d2l.model_name, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": f"Question {i}?"}],
                                               extra_body=extra)
                return r.choices[0].message.content

            with ThreadPoolExecutor(4) as pool:
                answers[mode] = list(pool.map(ask, range(6)))
            assert http.get("/health").json()["decode"] == health[mode]["decode"]  # still static after the batch
    assert answers["on"] == answers["off"] and all(answers["off"])
    assert health["off"]["decode"] == "dynamic" and health["on"]["decode"] == "static"
    assert health["on"]["static_off"] is None and health["on"]["cuda_graphs"] is False  # CPU: no graphs
    with pytest.raises(ValueError, match="static_decode must be"):
        ServerSettings(static_decode="yes")
    args = build_parser().parse_args(["serve", "--untrained", "--static-decode", "auto"])
    assert settings_from_args(args).static_decode == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--untrained", "--static-decode", "always"])
