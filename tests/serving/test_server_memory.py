"""What a long-running server keeps: every record that grows with the number of requests is bounded, and the decode
engine keeps no adapter in memory once its batch has drained (the soak benchmark's memory contract, piece by
piece; asserted by sizes and state, never by time)."""

import gc
import threading
import weakref

import pytest
import torch

from d2l_fast import D2LModel
from d2l_fast.serving.engine import DecodeEngine, GenRequest, InternalizeBatcher
from d2l_fast.serving.heap import HeapTrimmer
from d2l_fast.serving.uploads import UploadProgress, UploadRegistry

from .._tiny import tiny_model, tiny_tokenizer

KW = dict(latent_size=32, num_blocks=1, n_heads=4, head_dim=16, n_kv_heads=2)


@pytest.fixture(scope="module")
def model():
    return D2LModel.from_base(tiny_model("llama"), tiny_tokenizer("llama"), seed=0, max_chunk_len=64, **KW)


def test_upload_registry_keeps_at_most_keep_finished_records():
    reg = UploadRegistry(keep=4)
    running = reg.add(UploadProgress("doc-running", chunks_total=1))
    for k in range(20):
        reg.add(UploadProgress(f"doc-{k}", chunks_total=1)).finish("ready")
    # the oldest record is still running: it is never dropped, and it holds the ones behind it until it ends
    assert reg.get("doc-running") is running and reg.active() == 1
    running.finish("ready")
    reg.add(UploadProgress("doc-last", chunks_total=1)).finish("ready")
    assert len(reg._items) == 4 and reg.get("doc-running") is None and reg.get("doc-last") is not None


def test_internalize_batcher_keeps_the_sizes_of_the_latest_calls_only(model):
    with pytest.raises(ValueError, match="keep_calls must be a positive int, got 0"):
        InternalizeBatcher(model, keep_calls=0)
    batcher = InternalizeBatcher(model, window_s=0.0, keep_calls=3)
    batcher.start()
    try:
        for k in range(7):
            (fut,) = batcher.submit([f"Document {k}: the mill by the river was painted blue in {1900 + k}."])
            fut.result(timeout=120)
    finally:
        batcher.stop()
    assert batcher.calls == 7 and list(batcher.call_sizes) == [1, 1, 1]


def test_the_engine_keeps_no_adapter_once_its_batch_drains(model):
    """Rows with bf16 adapters on an fp32 model leave at different steps: the bindings make cast / compact copies
    of the running batch's adapters, and none of them (nor the batch) stays alive after the last row is done."""
    docs = [f"Note {k}: the ferry to Orla leaves at {k + 2} o'clock from pier {k * 7}." for k in range(3)]
    adapters = [a.to(torch.bfloat16) for a in (model.internalize(docs).select([k]) for k in range(3))]
    refs = [weakref.ref(a) for a in adapters]
    engine, finished = DecodeEngine(model, max_batch=4), []
    lock, all_done = threading.Lock(), threading.Event()

    def sink(kind, payload):
        if kind != "delta":
            with lock:
                finished.append(kind)
                if len(finished) == 3:
                    all_done.set()

    prompt = model.tokenizer("Where does the ferry go?")["input_ids"]
    reqs = [GenRequest(prompt_ids=prompt, adapter=a, max_new_tokens=n, sink=sink)
            for a, n in zip(adapters, (6, 2, 9))]
    engine.start()
    try:
        for r in reqs:
            engine.submit(r)
        assert all_done.wait(120), "the requests did not finish"
    finally:
        engine.stop()
    assert finished == ["done"] * 3 and engine._ad is None and engine._rows == []
    del reqs, adapters, r
    gc.collect()
    assert [w() for w in refs] == [None] * 3, "an adapter of a finished request is still referenced"
    assert not model._compact_cache and not model._cast_cache


def test_heap_trimmer_trims_once_per_burst_of_work_after_it_settles():
    for bad in (dict(settle_s=-1), dict(min_interval_s="5"), dict(settle_s=True)):
        with pytest.raises(ValueError, match="must be a non-negative number"):
            HeapTrimmer(**bad)
    h = HeapTrimmer(settle_s=0, min_interval_s=0)
    if not h.available:
        pytest.skip("no glibc malloc_trim here")
    assert h.idle() is None and h.trims == 0  # no work yet: nothing to give back
    h.note_work()
    assert h.idle() is None and h.trims == 1
    assert h.idle() is None and h.trims == 1  # nothing new since
    slow = HeapTrimmer(settle_s=3600, min_interval_s=0)
    slow.note_work()
    wait = slow.idle()
    assert wait is not None and 0 < wait <= 3600 and slow.trims == 0  # work too recent: wait, then come back
    off = HeapTrimmer(settle_s=0, min_interval_s=0, enabled=False)
    off.note_work()
    assert off.idle() is None and off.trims == 0


def test_the_server_trims_its_heap_once_idle_after_a_request(model):
    from d2l_fast.serving import BackgroundServer, create_app

    httpx = pytest.importorskip("httpx")
    app = create_app(model)
    srv = app.state.d2l
    if not srv.heap.available:
        pytest.skip("no glibc malloc_trim here")
    srv.heap.settle_s = srv.heap.min_interval_s = 0.0
    with BackgroundServer(app) as server:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": srv.model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200
        for _ in range(600):  # the engine thread trims as soon as it is idle again
            if srv.heap.trims:
                break
            threading.Event().wait(0.05)
        assert srv.heap.trims >= 1
        metrics = httpx.get(server.url + "/metrics", timeout=60).text
        assert "d2l_heap_trims" in metrics
