"""The soak benchmark's pieces (benchmarks/serving/bench_soak.py), quickly, on a tiny model: the traffic of its
coverage pass and of a phase bounded by request count against a real server with a store, the restart check, the
memory snapshot and sampler, and the contract's verdict."""

import gc

import pytest
import torch

from d2l_fast import D2LModel

from .._tiny import tiny_model, tiny_tokenizer

pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from benchmarks import _common  # noqa: E402
from benchmarks.serving import bench_soak as soak  # noqa: E402
from d2l_fast.serving import BackgroundServer, ServerSettings, create_app  # noqa: E402

KW = dict(latent_size=32, num_blocks=1, n_heads=4, head_dim=16, n_kv_heads=2)


@pytest.fixture(scope="module")
def model():
    return D2LModel.from_base(tiny_model("llama"), tiny_tokenizer("llama"), seed=0, max_chunk_len=64, **KW)


def test_documents_have_the_requested_size_within_the_last_sentences(model):
    import random

    tok = model.tokenizer
    for n in (100, 700):
        text = soak.make_document(tok, random.Random(n), n)
        got = len(tok(text)["input_ids"])
        longest = max(len(tok(x)["input_ids"]) for x in text.split(". "))
        assert n <= got <= n + 8 * (longest + 2), (n, got, longest)


def test_cover_and_a_counted_phase_then_everything_is_back_after_a_restart(model, tmp_path, monkeypatch):
    monkeypatch.setattr(soak, "IDLE_S", 0.0)
    settings = ServerSettings(store=str(tmp_path / "store"), adapter_memory_mb=1.0)  # a few adapters resident
    app = create_app(model, settings)
    srv = app.state.d2l
    with BackgroundServer(app) as server:
        probe_id = httpx.post(server.url + "/v1/documents", json={"text": soak.PROBE_DOC}, timeout=120).json()["id"]
        before = soak.probe(server.url, srv.model_name, probe_id)
        s = soak.Soak(server.url, srv.model_name, model.tokenizer, max_requests=40)
        s.cover()
        actions = {k.split(":")[0] for k in s.status}
        assert actions == {"upload", "chat", "stream", "abandon", "malformed", "delete"}, s.status
        sizes = list(soak.COVER_SIZES) + [soak.COVER_SIZES[-1]] * soak.N_THREADS
        assert len(s.upload_tokens) == len(sizes) and all(t >= n for t, n in zip(s.upload_tokens, sizes))
        assert s.status["malformed:400"] + s.status["malformed:404"] == len(soak.MALFORMED)
        s.phase(600.0, seed=3)  # ends by count, not by time
        assert s.requests >= 40 and not s.unexpected, s.unexpected
        snap = soak.memory_snapshot(srv)
        assert snap["documents_stored"] == len(set(s.acked) - s.deleted) + 1
        assert snap["adapters_resident_mb"] <= 1.0 + max(s.acked.values()) and snap["engine_adapters"] == 0
        assert snap["live_tensor_mb"] > 0 and snap["rss_mb"] > 0
    restart = soak.restart_check(model, settings, (set(s.acked) - s.deleted) | {probe_id}, probe_id)
    assert not restart["missing"] and not restart["unusable"] and restart["probe"] == before


def test_rss_sampler_sees_a_peak_that_the_settled_level_gives_back():
    sampler = _common.RssSampler(interval_s=60.0)
    base = sampler.sample()
    big = torch.ones(96 * 2**20 // 4)  # 96 MiB, touched
    sampler.sample()
    del big
    gc.collect()
    _common.malloc_trim()
    assert sampler.peak_mb >= base + 80 and sampler.sample() < sampler.peak_mb - 80
    stats = _common.malloc_stats_mb()
    assert stats is None or set(stats) == {"heap", "in_use", "free", "mmapped"}
    with pytest.raises(ValueError, match="interval_s and keep_every_s must be > 0"):
        _common.RssSampler(interval_s=0)


def test_the_contract_names_each_failure():
    ok = dict(unexpected=[], rss_after_warmup_mb=1000.0, rss_end_mb=1090.0, restart_missing=[], restart_unusable=[],
              probe_before="catfish", probe_after="catfish", probe_after_restart="catfish")
    assert soak.contract_failures(ok) == []
    assert soak.contract_failures(dict(ok, rss_end_mb=900.0)) == []  # within 10 % both ways
    bad = soak.contract_failures(dict(ok, rss_end_mb=1101.0, unexpected=["chat:500 boom"], restart_missing=["doc-x"],
                                      probe_after_restart="Barnacle"))
    assert len(bad) == 4 and "+10.1 %" in bad[1] and "doc-x" in bad[2] and "Barnacle" in bad[3]
