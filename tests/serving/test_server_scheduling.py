"""Uploads never stall running streams: the model lock hands over to queued forwards, encoder passes yield between
decoder layers, and upload progress is visible (and cancellable) through the API."""

import threading
import time

import pytest
import torch

from d2l_fast import D2LModel
from d2l_fast.concurrency import ModelLock, model_lock
from d2l_fast.encoder import encode_in_slices
from d2l_fast.hf import decoder_of

from .._numerics import SLICED
from .._tiny import tiny_model, tiny_tokenizer

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from d2l_fast.serving import BackgroundServer, DecodeEngine, GenRequest, create_app  # noqa: E402

KW = dict(latent_size=32, num_blocks=1, n_heads=4, head_dim=16, n_kv_heads=2)
LONG = " ".join(f"Line {i}: the keeper of the mill wrote storm number {i} into the blue ledger." for i in range(40))


def wait_until(cond, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for: {what}")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def model():
    base = tiny_model("llama", num_hidden_layers=4)  # the encoder keeps 3 layers: 2 yield points per packed row
    return D2LModel.from_base(base, tiny_tokenizer("llama"), seed=0, init_scaler_B=6.0, max_chunk_len=64, **KW)


def test_a_writer_that_reacquires_at_once_lets_queued_readers_in_first():
    lock, order = ModelLock(), []
    entered = threading.Event()

    def reader():
        with lock.shared():
            order.append("reader")
            entered.set()

    with lock.exclusive():
        t = threading.Thread(target=reader)
        t.start()
        wait_until(lambda: lock.readers_waiting == 1, "the reader queued behind the writer")
        order.append("writer 1")
    with lock.exclusive():  # the same thread at once: the queued reader goes first
        order.append("writer 2")
        assert entered.is_set()
    t.join(10)
    assert order == ["writer 1", "reader", "writer 2"]
    assert lock.handovers == 1


def test_yield_to_readers_runs_queued_readers_then_holds_again():
    lock, order = ModelLock(), []

    def reader(k):
        with lock.shared():
            order.append(k)

    with lock.exclusive():
        assert lock.yield_to_readers() is False  # nobody waits: nothing happens
        readers = [threading.Thread(target=reader, args=(k,)) for k in range(2)]
        for t in readers:
            t.start()
        wait_until(lambda: lock.readers_waiting == 2, "two readers queued")
        assert lock.yield_to_readers(lambda: order.append("pause"), lambda: order.append("resume")) is True
        assert lock.writer_active
    for t in readers:
        t.join(10)
    assert order[0] == "pause" and order[-1] == "resume" and sorted(order[1:3]) == [0, 1]
    with pytest.raises(RuntimeError, match="exclusive hold"):
        lock.yield_to_readers()


def test_decode_steps_run_between_encoder_slices_and_the_adapter_is_unchanged(model):
    """A stream decodes while a long document is internalized: decode steps appear between the decoder layers of
    one encoder pass (not only before or after it), and the adapter is the one made with nobody else running."""
    expected = model.internalize([LONG])
    dec = decoder_of(model.base_model)
    lock = model_lock(dec)
    events, enc_thread = [], []

    def record(mod, args, kwargs):
        me = threading.current_thread()
        if enc_thread and me is enc_thread[0]:
            if mod is dec.layers[1] and "waited" not in events:  # make the stream queue behind this pass
                wait_until(lambda: lock.readers_waiting > 0, "a decode step queued behind the encoder")
                events.append("waited")
            events.append(("enc", list(dec.layers).index(mod)))
        elif me.name == "d2l-decode" and mod is dec.layers[0]:
            events.append(("dec", 0))

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in dec.layers]
    engine, done = DecodeEngine(model, max_batch=2), threading.Event()
    req = GenRequest(prompt_ids=model.tokenizer("Tell me a story")["input_ids"], adapter=None, max_new_tokens=1500,
                     sink=lambda kind, payload: done.set() if kind != "delta" else None)
    result = []
    try:
        engine.start()
        engine.submit(req)
        wait_until(lambda: len(req.out_ids) >= 2, "the stream running")
        t = threading.Thread(target=lambda: result.append(model.internalize([LONG])))
        enc_thread.append(t)
        t.start()
        t.join(120)
    finally:
        req.cancelled = True
        for h in handles:
            h.remove()
        engine.stop()
    assert result, "internalize did not finish"
    enc = [k for k, e in enumerate(events) if isinstance(e, tuple) and e[0] == "enc"]
    between = [e for e in events[enc[0]:enc[-1]] if e == ("dec", 0)]
    assert between, f"no decode step ran during the encoder pass: {events[:40]}"
    assert lock.handovers > 0
    got = result[0]
    assert all(torch.equal(got.A[m], expected.A[m]) and torch.equal(got.B[m], expected.B[m]) for m in got.A)


def test_a_stream_waits_at_most_one_slice_of_a_sliced_upload(model):
    """Checked by state, not time: a one-chunk document is encoded in windows of SLICE tokens while a stream decodes.
    The first slices each wait until a decode step has queued (so the stream contends at every one of them): every
    encoder pass holds at most SLICE tokens, a decode step enters at the end of each of those slices
    (the lock's ``max_slices_waited`` stays at most 1), and the adapter is the one the same slicing gives alone."""
    slice_n, forced = 24, 12
    doc = LONG[:1500]
    with encode_in_slices(slice_n):
        expected = model.internalize([doc], max_chunk_len=0)  # one chunk, several windows
    dec = decoder_of(model.base_model)
    lock = model_lock(dec)
    lock.max_slices_waited = 0
    events, enc_thread = [], []

    def record(mod, args, kwargs, out=None):  # encoder: after each layer (a slice); decode: entering layer 0
        me = threading.current_thread()
        if enc_thread and me is enc_thread[0] and out is not None:
            n = (args[0] if args else kwargs["hidden_states"]).shape[1]
            if len([e for e in events if e[0] == "enc"]) < forced:
                wait_until(lambda: lock.readers_waiting > 0, "a decode step queued behind the encoder slice")
            events.append(("enc", list(dec.layers).index(mod), n))
        elif me.name == "d2l-decode" and mod is dec.layers[0] and out is None:
            events.append(("dec", 0, 1))

    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in dec.layers]
    handles += [dec.layers[0].register_forward_pre_hook(record, with_kwargs=True)]
    engine, result = DecodeEngine(model, max_batch=2), []
    req = GenRequest(prompt_ids=model.tokenizer("Tell me a story")["input_ids"], adapter=None, max_new_tokens=3000,
                     sink=lambda kind, payload: None)

    def upload():
        with encode_in_slices(slice_n):
            result.append(model.internalize([doc], max_chunk_len=0))

    try:
        engine.eos_ids = set()  # the stream outlasts the upload
        engine.start()
        engine.submit(req)
        wait_until(lambda: len(req.out_ids) >= 2, "the stream running")
        t = threading.Thread(target=upload)
        enc_thread.append(t)
        steps0 = engine.steps
        t.start()
        t.join(300)
        steps = engine.steps - steps0
    finally:
        req.cancelled = True
        for h in handles:
            h.remove()
        engine.stop()
    assert result, "internalize did not finish"
    enc = [e for e in events if e[0] == "enc"]
    assert enc and max(n for _, _, n in enc) <= slice_n  # every encoder pass: at most one window of tokens
    assert len([e for e in enc if e[1] == 0]) > 2  # several windows
    first = [k for k, e in enumerate(events) if e[0] == "enc"][:forced]
    for a, b in zip(first[:-1], first[1:]):  # a decode step between every two of the forced slices
        assert ("dec", 0, 1) in events[a:b], f"no decode step between encoder slices: {events[a:b + 1]}"
    assert steps >= forced - 1 and 1 >= lock.max_slices_waited
    got = result[0]
    assert all(torch.equal(got.A[m], expected.A[m]) and torch.equal(got.B[m], expected.B[m]) for m in got.A)
    whole = model.internalize([doc], max_chunk_len=0)
    assert all(torch.allclose(got.A[m], whole.A[m], **SLICED) for m in got.A)


def test_the_server_slices_uploads_without_changing_their_chunks(model):
    app = create_app(model, batch_window_ms=1.0, encode_slice_tokens=96)
    assert app.state.d2l.batcher.slice_tokens == 96
    with BackgroundServer(app) as srv:
        r = httpx.post(srv.url + "/v1/documents", json={"text": LONG}, timeout=120)
        assert r.status_code == 200, r.text
        _, ad = app.state.d2l.store.get(r.json()["id"])
    assert r.json()["chunks"] == model.pack([LONG]).n_chunks[0]  # the model's chunking, not 96-token chunks
    with encode_in_slices(96):
        same = model.internalize([LONG])
    assert all(torch.equal(ad.A[m], same.A[m]) and torch.equal(ad.B[m], same.B[m]) for m in ad.A)
    whole = model.internalize([LONG])
    assert ad.ranks == whole.ranks
    assert all(torch.allclose(ad.A[m], whole.A[m], **SLICED) and torch.allclose(ad.B[m], whole.B[m], **SLICED)
               for m in ad.A)


@pytest.fixture()
def server(model):
    app = create_app(model, batch_window_ms=1.0)
    with BackgroundServer(app) as srv:
        srv.d2l = app.state.d2l
        srv.http = httpx.Client(base_url=srv.url, timeout=60)
        yield srv


def test_async_upload_reports_progress_then_the_document(server, model):
    r = server.http.post("/v1/documents", json={"text": LONG, "name": "long", "async": True})
    assert r.status_code == 202, r.text
    p = r.json()
    chunks = model.pack([LONG]).n_chunks[0]
    assert p["object"] == "document.progress" and p["chunks_total"] == chunks > 2
    assert p["status"] in ("queued", "encoding", "hypernetwork", "ready")
    seen = []

    def ready():
        q = server.http.get(f"/v1/documents/{p['id']}/progress").json()
        seen.append(q)
        return q["status"] == "ready"

    wait_until(ready, "the upload finishing")
    assert seen[-1]["chunks_done"] == seen[-1]["chunks_total"] == chunks and seen[-1]["fraction"] == 1.0
    assert all(0 <= q["chunks_done"] <= chunks for q in seen)
    doc = server.http.get(f"/v1/documents/{p['id']}").json()
    assert doc["name"] == "long" and doc["chunks"] == chunks
    _, ad = server.d2l.store.get(p["id"])
    with encode_in_slices(server.d2l.batcher.slice_tokens):  # the server's slicing (default 256 tokens)
        ref = model.internalize([LONG])
    assert all(torch.equal(ad.A[m], ref.A[m]) for m in ad.A)
    assert server.http.get("/v1/documents/doc-000000000000000000000000/progress").status_code == 404


def test_an_upload_is_cancelled_by_delete_and_never_stored(server, model):
    lock = model_lock(decoder_of(model.base_model))
    with lock.exclusive():  # the upload's encoder pass waits for the lock
        r = server.http.post("/v1/documents", json={"text": LONG, "async": True})
        assert r.status_code == 202, r.text
        doc_id = r.json()["id"]
        wait_until(lambda: server.d2l.batcher.pending == 1 and lock._writers_waiting == 1, "the upload waiting")
        d = server.http.delete(f"/v1/documents/{doc_id}")
        assert d.status_code == 200 and d.json()["cancelled"] is True
    wait_until(lambda: server.d2l.batcher.pending == 0, "the cancelled pass abandoned")
    assert server.http.get(f"/v1/documents/{doc_id}/progress").json()["status"] == "cancelled"
    assert server.http.get(f"/v1/documents/{doc_id}").status_code == 404
    assert doc_id not in server.d2l.store
    ok = server.http.post("/v1/documents", json={"text": "Bread rose in the warm kitchen."})  # the worker goes on
    assert ok.status_code == 200, ok.text
