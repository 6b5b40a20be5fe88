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
