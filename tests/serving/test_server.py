"""The document server (d2l_fast.serving): a real uvicorn server on a free localhost port, the official `openai`
client and httpx, a tiny random model whose untrained hypernetwork has a visible effect (init_scaler_B)."""

import json
import pathlib
import threading
import time

import pytest
import torch

from d2l_fast import D2LModel
from d2l_fast.cli import main
from d2l_fast.concurrency import model_lock
from d2l_fast.hf import decoder_of

from .._tiny import tiny_pair

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from d2l_fast.serving import BackgroundServer, create_app  # noqa: E402

KW = dict(latent_size=32, num_blocks=1, n_heads=4, head_dim=16, n_kv_heads=2)
DOCS = ["The keeper of the old mill wrote every storm into a blue ledger, and the river rose twice that spring "
        "while the fox watched the boats from under the bridge near the bakery.",
        "The council met on the first Monday.",
        "Bread rose in the warm kitchen.",
        "The lighthouse keeper counted ships.",
        "Snow fell on the quiet harbor town."]
QUESTIONS = ["Where did the fox live?", "When did the council meet?", "What rose?", "Who counted ships?",
             "Where did snow fall?"]


@pytest.fixture(scope="module")
def model():
    base, tok = tiny_pair("llama")
    return D2LModel.from_base(base, tok, seed=0, init_scaler_B=6.0, max_chunk_len=24, **KW)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    app = create_app(model, store=str(tmp_path_factory.mktemp("store")), batch_window_ms=20.0)
    with BackgroundServer(app) as srv:
        srv.d2l = app.state.d2l
        srv.http = httpx.Client(base_url=srv.url, timeout=60)
        srv.oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield srv


def post_doc(srv, text, **extra):
    r = srv.http.post("/v1/documents", json={"text": text, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def reference(model, prompt_ids, adapters, max_new_tokens):
    """Greedy tokens of the library's own D2LModel.generate (eos excluded) and their text."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, torch.ones_like(ids), adapters=adapters, adapter_index=[0] if adapters else None,
                         max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = model.base_model.generation_config.eos_token_id
    n = out.index(eos) + 1 if eos in out else len(out)
    return out[:n], model.tokenizer.decode(out[:n], skip_special_tokens=True)


def chat_ids(model, messages):
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def wait_until(cond, what):
    """Poll ``cond`` (a state reached by the server's threads); fail rather than hang if it never comes."""
    deadline = time.monotonic() + 60
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for: {what}")
        time.sleep(0.01)


def user(q):
    return [{"role": "user", "content": q}]


def test_chat_with_document_equals_library_generate(server, model):
    models = server.oa.models.list()
    assert [m.id for m in models.data] == [server.d2l.model_name]
    doc = post_doc(server, DOCS[0], name="mill")
    assert doc["chunks"] >= 2 and doc["rank"] == doc["chunks"] * model.spec.lora_r + model.spec.lora_r
    assert doc["tokens"] == sum(model.pack([DOCS[0]]).lengths) and doc["name"] == "mill"
    resp = server.oa.chat.completions.create(model=server.d2l.model_name, messages=user(QUESTIONS[0]), max_tokens=10,
                                             extra_body={"documents": [doc["id"]]})
    _, ad = server.d2l.store.get(doc["id"])
    ad_lib = model.internalize([DOCS[0]])
    assert all(torch.equal(ad.A[m], ad_lib.A[m]) for m in ad.A)  # the stored adapter is the library's
    toks, text = reference(model, chat_ids(model, user(QUESTIONS[0])), ad_lib, 10)
    assert resp.choices[0].message.content == text and resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens == len(toks) and resp.usage.prompt_tokens == len(chat_ids(model, user(
        QUESTIONS[0])))
    assert resp.choices[0].finish_reason == ("stop" if len(toks) < 10 else "length")
    base = server.oa.chat.completions.create(model=server.d2l.model_name, messages=user(QUESTIONS[0]), max_tokens=10)
    assert base.choices[0].message.content == reference(model, chat_ids(model, user(QUESTIONS[0])), None, 10)[1]
    assert base.choices[0].message.content != text  # the adapter changes the answer


def test_stream_equals_non_stream_and_multi_turn(server, model):
    doc = post_doc(server, DOCS[1])
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."},
            {"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]}]}]
    kw = dict(model=server.d2l.model_name, messages=msgs, max_tokens=12, extra_body={"documents": [doc["id"]]})
    full = server.oa.chat.completions.create(**kw)
    chunks = list(server.oa.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    conv = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else QUESTIONS[1]}
            for m in msgs]
    assert text == reference(model, chat_ids(model, conv), model.internalize([DOCS[1]]), 12)[1]


def test_completions_endpoint(server, model):
    doc = post_doc(server, DOCS[2])
    prompt = "Bread rose in the"
    resp = server.oa.completions.create(model=server.d2l.model_name, prompt=prompt, max_tokens=8,
                                        extra_body={"documents": [doc["id"]]})
    ids = model.tokenizer(prompt)["input_ids"]
    assert resp.choices[0].text == reference(model, ids, model.internalize([DOCS[2]]), 8)[1]
    streamed = "".join(c.choices[0].text for c in server.oa.completions.create(
        model=server.d2l.model_name, prompt=prompt, max_tokens=8, stream=True, extra_body={"documents": [doc["id"]]}))
    assert streamed == resp.choices[0].text


def test_document_on_the_fly_scaling_and_composition(server, model):
    n_docs = len(server.http.get("/v1/documents").json()["data"])
    q = chat_ids(model, user(QUESTIONS[3]))
    resp = server.oa.chat.completions.create(
        model=server.d2l.model_name, messages=user(QUESTIONS[3]), max_tokens=10,
        extra_body={"document": DOCS[0], "context_scaling": 0.5, "bias_scaling": 2.0})
    ad = model.internalize([DOCS[0]], scalers=0.5, bias_scaler=2.0)
    assert resp.choices[0].message.content == reference(model, q, ad, 10)[1]
    plain = model.internalize([DOCS[0]])
    assert reference(model, q, ad, 10)[0] != reference(model, q, plain, 10)[0]  # the scaling matters
    assert len(server.http.get("/v1/documents").json()["data"]) == n_docs  # an on-the-fly document is not stored
    a, b = post_doc(server, DOCS[3]), post_doc(server, DOCS[4])
    resp = server.oa.chat.completions.create(model=server.d2l.model_name, messages=user(QUESTIONS[3]), max_tokens=10,
                                             extra_body={"documents": [a["id"], b["id"]]})
    composed = model.internalize([DOCS[3], DOCS[4]]).compose([0, 1])
    assert resp.choices[0].message.content == reference(model, q, composed, 10)[1]


def test_documents_posted_together_or_concurrently_share_one_internalize_call(server, model):
    batcher = server.d2l.batcher
    r = server.http.post("/v1/documents", json={"texts": DOCS[:3], "names": ["a", "b", "c"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["name"] for d in data] == ["a", "b", "c"] and batcher.call_sizes[-1] == 3
    assert [d["tokens"] for d in data] == [sum(model.pack([t]).lengths) for t in DOCS[:3]]
    for d, t in zip(data, DOCS[:3]):  # packed together, each adapter equals the one made alone
        ad, alone = server.d2l.store.get(d["id"])[1], model.internalize([t])
        assert all(torch.allclose(ad.A[m], alone.A[m], atol=1e-5) for m in ad.A)
    calls0, results = batcher.calls, [None] * 4
    lock = model_lock(decoder_of(model.base_model))

    def post(i):
        results[i] = server.http.post("/v1/documents", json={"text": DOCS[i]})

    with lock.exclusive():  # the internalize worker blocks in its first call; the other posts queue up meanwhile
        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: batcher.pending == 4, "4 documents queued")
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    assert batcher.calls - calls0 <= 2  # 4 concurrent posts: at most 2 packed calls (the first may run alone)


def test_concurrent_requests_batched_each_equal_to_its_single_result(server, model, monkeypatch):
    """Five requests decoded together. The schedule is pinned by server-side state, not by timing: the first request
    is admitted alone and blocks in its prefill (the test holds the decoder), the other four are submitted one by one
    behind it, and join its batch in one admission when the decoder is released."""
    docs = [post_doc(server, t) for t in DOCS]
    lens = [6, 14, 9, 3, 11]
    singles = [reference(model, chat_ids(model, user(q)), server.d2l.store.get(d["id"])[1], n)[1]
               for d, q, n in zip(docs, QUESTIONS, lens)]
    engine = server.d2l.engine
    rows0, joins0 = engine.max_rows_seen, engine.joins_mid_batch
    engine.max_rows_seen = 0
    out, errors = [None] * 6, [None]
    submitted, admitted = [], []  # what the real engine was given, and each admission's rows (engine thread)
    submit, admit = engine.submit, engine._admit
    monkeypatch.setattr(engine, "submit", lambda req: submit(req) or submitted.append(req))
    monkeypatch.setattr(engine, "_admit", lambda new: admitted.append(list(new)) or admit(new))

    def ask(i):
        if i == 5:  # an unknown document among them fails alone
            try:
                server.oa.chat.completions.create(model=server.d2l.model_name, messages=user("x"), max_tokens=4,
                                                  extra_body={"documents": ["doc-" + "0" * 24]})
            except openai.NotFoundError as e:
                errors[0] = e
            return
        out[i] = server.oa.chat.completions.create(model=server.d2l.model_name, messages=user(QUESTIONS[i]),
                                                   max_tokens=lens[i], extra_body={"documents": [docs[i]["id"]]})

    lock = model_lock(decoder_of(model.base_model))
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    with lock.exclusive():  # hold the decoder: the first request blocks in its prefill, the others queue up
        threads[0].start()
        wait_until(lambda: len(admitted) == 1, "the first request to be admitted (alone)")
        for i in range(1, 5):  # one at a time: the queue order (hence the rows' order in the batch) is fixed
            threads[i].start()
            wait_until(lambda n=i + 1: len(submitted) == n, f"request {i} to be queued")
        threads[5].start()
        threads[5].join()
        assert engine.in_flight == 5 and len(admitted) == 1
    for t in threads:
        t.join()
    assert [[id(r) for r in rows] for rows in admitted] == [[id(submitted[0])], [id(r) for r in submitted[1:]]]
    assert [o.choices[0].message.content for o in out[:5]] == singles
    assert "doc-" + "0" * 24 in str(errors[0])
    assert engine.max_rows_seen == 5 and engine.joins_mid_batch == joins0 + 4  # decoded together, joined mid-batch
    engine.max_rows_seen = max(rows0, engine.max_rows_seen)


def run_engine(model, jobs, max_batch, on_step=None):
    """(prompt ids, adapter, max_new_tokens) jobs through a fresh DecodeEngine, submitted while the decoder is held:
    the first request blocks in its prefill, the others queue up and join it mid-batch."""
    from d2l_fast.serving import DecodeEngine, GenRequest

    engine, finished, errors = DecodeEngine(model, max_batch=max_batch), threading.Semaphore(0), []

    def sink(kind, payload):
        if kind == "error":
            errors.append(payload)
        if kind != "delta":
            finished.release()

    step = engine._step

    def traced_step():
        if on_step:
            on_step(engine, "before")
        step()
        if on_step:
            on_step(engine, "after")

    engine._step = traced_step
    reqs = [GenRequest(prompt_ids=p, adapter=a, max_new_tokens=n, sink=sink) for p, a, n in jobs]
    engine.start()
    try:
        with model_lock(decoder_of(model.base_model)).exclusive():
            engine.submit(reqs[0])
            wait_until(lambda: engine._admitting, "the first request in its prefill")
            for r in reqs[1:]:
                engine.submit(r)
        for _ in reqs:
            assert finished.acquire(timeout=120), "the engine did not finish every request"
    finally:
        engine.stop()
    assert not errors, errors
    return engine, reqs


def test_engine_steps_reuse_the_bound_adapters(model, monkeypatch):
    """A decode step binds the running rows' adapters as they are (no per-step concatenation, also after rows
    leave); every row still decodes with its own adapter: shared adapters, a base-model row."""
    from d2l_fast import AdapterBatch

    ads = model.internalize(DOCS[:3])
    parts = [ads.select([k]) for k in range(3)]
    adapters, lens = [parts[0], parts[1], None, parts[1], parts[2]], [3, 9, 5, 12, 7]  # rows leave at different steps
    prompts = [chat_ids(model, user(q)) for q in QUESTIONS]
    concat, in_step, step_concats = AdapterBatch.concat, [False], []

    def counting_concat(batches):
        if in_step[0]:
            step_concats.append(len(batches))
        return concat(batches)

    monkeypatch.setattr(AdapterBatch, "concat", staticmethod(counting_concat))
    engine, reqs = run_engine(model, list(zip(prompts, adapters, lens)), max_batch=8,
                              on_step=lambda eng, when: in_step.__setitem__(0, when == "before"))
    for r, p, a, n in zip(reqs, prompts, adapters, lens):
        assert r.out_ids == reference(model, p, a, n)[0] and r.finish_reason == "length"
    assert engine.max_rows_seen >= 4 and engine.joins_mid_batch >= 1 and engine.steps >= 11
    assert step_concats == []  # old engine: one concatenation of every row's adapter per step


def test_engine_drops_adapters_of_rows_that_left(model):
    """Rows keep joining a batch that never drains: the bound adapters of rows that left are dropped (at most
    2 * max_batch adapters stay bound) and every row's tokens stay those of its own adapter."""
    ads = model.internalize(DOCS)
    adapters = [ads.select([k % 5]) for k in range(8)]  # 8 distinct objects (3 with equal values)
    lens = [20, 2, 3, 2, 4, 2, 3, 2]  # row 0 runs while the others join one after the other
    prompts = [chat_ids(model, user(QUESTIONS[k % 5])) for k in range(8)]
    seen = []

    def record(eng, when):
        if when == "before":
            seen.append((len(eng._ad), len(eng._rows)))

    engine, reqs = run_engine(model, list(zip(prompts, adapters, lens)), max_batch=2, on_step=record)
    for r, p, a, n in zip(reqs, prompts, adapters, lens):
        assert r.out_ids == reference(model, p, a, n)[0]
    assert engine.joins_mid_batch >= 5
    assert max(n for n, _ in seen) <= 4 and all(n >= rows for n, rows in seen)
    assert any(b < a for (a, _), (b, _) in zip(seen, seen[1:]))  # a compaction happened


def test_sampling_seed_and_stop(server, model):
    kw = dict(model=server.d2l.model_name, messages=user(QUESTIONS[0]), max_tokens=12, temperature=1.5, top_p=0.9)
    a = server.oa.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = server.oa.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == b
    others = {server.oa.chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(8, 12)}
    assert others - {a}  # sampling does depend on the seed
    full = server.oa.chat.completions.create(model=server.d2l.model_name, messages=user(QUESTIONS[0]),
                                             max_tokens=12).choices[0].message.content
    stop = full[3:5]
    cut = server.oa.chat.completions.create(model=server.d2l.model_name, messages=user(QUESTIONS[0]), max_tokens=12,
                                            stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in server.oa.chat.completions.create(
        model=server.d2l.model_name, messages=user(QUESTIONS[0]), max_tokens=12, stop=[stop], stream=True))
    assert streamed == cut.choices[0].message.content


def test_client_disconnect_mid_stream_drops_its_row(server, model, monkeypatch):
    """The client leaves while its row waits for the decoder (held by the test), so the row cannot finish first
    whatever the scheduling: the server notices the disconnect, and the engine drops the row before its first step."""
    engine = server.d2l.engine
    body = {"model": server.d2l.model_name, "messages": user(QUESTIONS[0]), "max_tokens": 400, "stream": True}
    steps0, cancelled0 = engine.steps, engine.cancelled_rows
    admitted, admit = [], engine._admit
    monkeypatch.setattr(engine, "_admit", lambda new: admitted.append(list(new)) or admit(new))
    with model_lock(decoder_of(model.base_model)).exclusive():
        with server.http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk, sent before any token
            # leave once the row is in the batch (blocked in its prefill); a request cancelled while still queued
            # is skipped without a prefill instead
            wait_until(lambda: len(admitted) == 1, "the request to be admitted")
        submitted = admitted[0]
        wait_until(lambda: submitted[0].cancelled, "the server to notice the disconnect")
        assert engine.in_flight == 1 and not submitted[0].out_ids
    wait_until(lambda: engine.in_flight == 0, "the abandoned row to leave")
    assert engine.cancelled_rows == cancelled0 + 1 and engine.steps == steps0  # dropped after its prefill
    ok = server.oa.chat.completions.create(model=server.d2l.model_name, messages=user(QUESTIONS[1]), max_tokens=5)
    assert ok.choices[0].message.content == reference(model, chat_ids(model, user(QUESTIONS[1])), None, 5)[1]


def test_documents_crud_and_restart_keeps_everything(model, tmp_path):
    store = tmp_path / "store"
    app = create_app(model, store=str(store))
    with BackgroundServer(app) as srv:
        c = httpx.Client(base_url=srv.url, timeout=60)
        keep = c.post("/v1/documents", json={"text": DOCS[0], "name": "keep"}).json()
        gone = c.post("/v1/documents", json={"text": DOCS[1]}).json()
        assert c.get(f"/v1/documents/{keep['id']}").json()["name"] == "keep"
        assert c.delete(f"/v1/documents/{gone['id']}").json()["deleted"] is True
        assert c.get(f"/v1/documents/{gone['id']}").status_code == 404
        assert c.delete(f"/v1/documents/{gone['id']}").status_code == 404
        before = c.post("/v1/chat/completions", json={"model": app.state.d2l.model_name, "messages": user(
            QUESTIONS[0]), "max_tokens": 10, "documents": [keep["id"]]}).json()["choices"][0]["message"]["content"]
    assert sorted(p.name for p in store.iterdir()) == [f"{keep['id']}.json", f"{keep['id']}.safetensors"]
    app2 = create_app(model, store=str(store))  # a restarted server on the same folder
    with BackgroundServer(app2) as srv:
        c = httpx.Client(base_url=srv.url, timeout=60)
        listed = c.get("/v1/documents").json()["data"]
        assert [d["id"] for d in listed] == [keep["id"]] and listed[0]["resident"] is False
        assert {k: listed[0][k] for k in ("name", "tokens", "chunks", "rank")} == {
            k: keep[k] for k in ("name", "tokens", "chunks", "rank")}
        after = c.post("/v1/chat/completions", json={"model": app2.state.d2l.model_name, "messages": user(
            QUESTIONS[0]), "max_tokens": 10, "documents": [keep["id"]]}).json()["choices"][0]["message"]["content"]
    assert after == before


def test_lru_budget_evicts_and_reloads_from_store(model, tmp_path):
    one = model.internalize([DOCS[1]])
    nbytes = sum(t.numel() * t.element_size() for d in (one.A, one.B) for t in d.values())
    app = create_app(model, store=str(tmp_path), adapter_memory_mb=1.5 * nbytes / 2**20)
    with BackgroundServer(app) as srv:
        c, store = httpx.Client(base_url=srv.url, timeout=60), app.state.d2l.store
        ids = [c.post("/v1/documents", json={"text": t}).json()["id"] for t in DOCS[1:4]]
        assert [store.is_resident(i) for i in ids] == [False, False, True] and store.evictions == 2
        assert store.resident_bytes <= 1.5 * nbytes
        loads = store.loads
        ans = c.post("/v1/chat/completions", json={"model": app.state.d2l.model_name, "messages": user(QUESTIONS[1]),
                                                   "max_tokens": 8, "documents": [ids[0]]}).json()
        assert store.loads == loads + 1 and store.is_resident(ids[0]) and not store.is_resident(ids[2])
        assert ans["choices"][0]["message"]["content"] == reference(
            model, chat_ids(model, user(QUESTIONS[1])), one, 8)[1]
    app = create_app(model, adapter_memory_mb=1.5 * nbytes / 2**20)  # no store: evicted documents are gone
    with BackgroundServer(app) as srv:
        c = httpx.Client(base_url=srv.url, timeout=60)
        ids = [c.post("/v1/documents", json={"text": t}).json()["id"] for t in DOCS[1:3]]
        r = c.post("/v1/chat/completions", json={"model": app.state.d2l.model_name, "messages": user("q"),
                                                 "documents": [ids[0]]})
        assert r.status_code == 404 and ids[0] in r.json()["error"]["message"]
        big = c.post("/v1/documents", json={"text": DOCS[0]})  # more rank rows than the whole budget
        assert big.status_code == 413 and "budget" in big.json()["error"]["message"]
        assert [d["id"] for d in c.get("/v1/documents").json()["data"]] == ids[1:]


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, model):
    c, name = server.http, server.d2l.model_name
    doc = post_doc(server, DOCS[2])

    def err(r, status, *words):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) >= {"message", "type", "param", "code"}
        for w in words:
            assert w in e["message"], e["message"]

    chat = {"model": name, "messages": user("hi")}
    err(c.post("/v1/chat/completions", content=b'{"model": '), 400, "not valid JSON")
    err(c.post("/v1/chat/completions", content=b"[1, 2]"), 400, "JSON object")
    err(c.post("/v1/chat/completions", json={**chat, "max_tokens": "5"}), 400, "max_tokens", "integer")
    err(c.post("/v1/chat/completions", json={**chat, "max_tokens": 0}), 400, "max_tokens")
    err(c.post("/v1/chat/completions", json={**chat, "max_tokens": 10**6}), 400, "--max-new-tokens")
    err(c.post("/v1/chat/completions", json={**chat, "temperature": "hot"}), 400, "temperature")
    err(c.post("/v1/chat/completions", json={**chat, "temperature": 3}), 400, "temperature")
    err(c.post("/v1/chat/completions", json={**chat, "stream": "yes"}), 400, "stream")
    err(c.post("/v1/chat/completions", json={**chat, "n": 2}), 400, "n=2")
    err(c.post("/v1/chat/completions", json={"model": name, "messages": "hi"}), 400, "messages")
    err(c.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "robot", "content": "x"}]}), 400,
        "role")
    err(c.post("/v1/chat/completions", json={**chat, "model": "gpt-4"}), 404, "gpt-4")
    err(c.post("/v1/chat/completions", json={**chat, "documents": ["doc-nope"]}), 404, "doc-nope")
    err(c.post("/v1/chat/completions", json={**chat, "documents": [doc["id"], "doc-" + "f" * 24]}), 404, "f" * 24)
    err(c.post("/v1/chat/completions", json={**chat, "documents": [1]}), 400, "documents")
    err(c.post("/v1/chat/completions", json={**chat, "context_scaling": "big", "documents": [doc["id"]]}), 400,
        "context_scaling")
    err(c.post("/v1/chat/completions", json={**chat, "document": "   "}), 400, "empty")
    long_prompt = "word " * 2100
    err(c.post("/v1/chat/completions", json={"model": name, "messages": user(long_prompt), "max_tokens": 5}), 400,
        "context window")
    err(c.post("/v1/completions", json={"model": name, "prompt": ""}), 400, "prompt")
    err(c.post("/v1/documents", json={"text": ""}), 400, "empty")
    err(c.post("/v1/documents", json={"text": 5}), 400, "text", "string")
    err(c.post("/v1/documents", json={"text": "a", "texts": ["b"]}), 400, "exactly one")
    err(c.post("/v1/documents", json={"texts": ["ok", "  "]}), 400, "#1")
    err(c.get("/v1/documents/doc-" + "1" * 24), 404, "doc-" + "1" * 24)
    err(c.get("/v1/nothing"), 404)
    with pytest.raises(openai.NotFoundError, match="doc-nope"):
        server.oa.chat.completions.create(model=name, messages=user("hi"), extra_body={"documents": ["doc-nope"]})
    with pytest.raises(openai.BadRequestError):
        server.oa.chat.completions.create(model=name, messages=user("hi"), max_tokens=-1)
    # an error in the middle of a stream cannot change the status any more: it arrives as an SSE error event
    ok = server.oa.chat.completions.create(model=name, messages=user(QUESTIONS[2]), max_tokens=6,
                                           extra_body={"documents": [doc["id"]]})
    assert ok.choices[0].message.content == reference(model, chat_ids(model, user(QUESTIONS[2])),
                                                      model.internalize([DOCS[2]]), 6)[1]


def test_limits_auth_and_queue(model):
    app = create_app(model, api_key="s3cret", max_body_bytes=4096, max_document_tokens=40, max_queue=1)
    with BackgroundServer(app) as srv:
        c = httpx.Client(base_url=srv.url, timeout=60)
        auth = {"Authorization": "Bearer s3cret"}
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert oa.models.list().data[0].id == app.state.d2l.model_name
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        r = c.post("/v1/documents", headers=auth, content=json.dumps({"text": "x" * 5000}))
        assert r.status_code == 413 and "4096" in r.json()["error"]["message"]
        r = c.post("/v1/documents", headers=auth, json={"text": DOCS[0]})
        assert r.status_code == 413 and "--max-document-tokens" in r.json()["error"]["message"]
        assert len(app.state.d2l.store) == 0
        name, lock, res = app.state.d2l.model_name, model_lock(decoder_of(model.base_model)), [None]
        body = {"model": name, "messages": user("hi"), "max_tokens": 3}
        t = threading.Thread(target=lambda: res.__setitem__(0, c.post("/v1/chat/completions", headers=auth,
                                                                      json=body)))
        with lock.exclusive():  # one request in flight (blocked in its prefill): the queue is full
            t.start()
            wait_until(lambda: app.state.d2l.engine.in_flight == 1, "1 request in flight")
            r = c.post("/v1/chat/completions", headers=auth, json=body)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        t.join()
        assert res[0].status_code == 200


def test_serve_cli_errors(capsys, tmp_path):
    assert main(["serve", "--untrained"]) == 1
    assert "--base-model" in capsys.readouterr().err
    assert main(["serve", "--untrained", "--base-model", str(tmp_path / "missing")]) == 1
    assert "not a local folder" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["serve", "--checkpoint", "c", "--store", str(tmp_path / "f")]) == 1
    assert "is a file" in capsys.readouterr().err


def test_serve_cli_busy_port_version_and_defaults(capsys, tmp_path):
    import socket

    from d2l_fast import __version__
    from d2l_fast.cli import build_parser

    with socket.socket() as s:  # a busy port: one line, before any model is read (the base model is missing)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--untrained", "--base-model", str(tmp_path / "missing"), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err and "not a local folder" not in err
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"d2l-fast {__version__}"
    serve = next(a for a in build_parser()._actions if a.dest == "cmd").choices["serve"]
    for a in serve._actions:
        if a.dest != "help":
            assert a.help and ("default" in a.help or a.default in (None, False)), a.dest
    assert "smollm2-135m" in next(a.help for a in serve._actions if a.dest == "checkpoint")


def test_serve_cli_runs_a_real_server(model, tmp_path):
    """`d2l-fast serve --checkpoint FOLDER --base-model FOLDER` in a subprocess answers like the in-process model."""
    import os
    import socket
    import subprocess
    import sys

    model.base_model.save_pretrained(tmp_path / "base")
    model.tokenizer.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import d2l_fast

    root = str(pathlib.Path(d2l_fast.__file__).resolve().parents[1])  # this checkout's d2l_fast, not an installed one
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH")] if p))
    proc = subprocess.Popen([sys.executable, "-m", "d2l_fast.cli", "serve", "--checkpoint", str(tmp_path / "ckpt"),
                             "--base-model", str(tmp_path / "base"), "--port", str(port), "--max-chunk-len", "24",
                             "--store", str(tmp_path / "store"), "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

        def up():
            if proc.poll() is not None:
                pytest.fail(f"d2l-fast serve exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                return c.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, "d2l-fast serve to answer /health")
        name = c.get("/v1/models").json()["data"][0]["id"]
        doc = c.post("/v1/documents", json={"text": DOCS[0]}).json()
        r = c.post("/v1/chat/completions", json={"model": name, "messages": user(QUESTIONS[0]), "max_tokens": 8,
                                                 "documents": [doc["id"]]})
        assert r.status_code == 200, r.text
        want = reference(model, chat_ids(model, user(QUESTIONS[0])), model.internalize([DOCS[0]]), 8)[1]
        assert r.json()["choices"][0]["message"]["content"] == want
        assert (tmp_path / "store" / f"{doc['id']}.safetensors").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------- request path costs
def test_deeply_nested_json_body_is_a_400_not_a_500(server):
    for body in ("[" * 100000 + "]" * 100000, '{"a":' * 100000 + "1" + "}" * 100000):
        for path in ("/v1/chat/completions", "/v1/documents", "/v1/completions"):
            r = server.http.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert "too deeply" in err["message"] and err["type"] == "invalid_request_error"
    assert server.http.get("/health").json()["status"] == "ok"  # still serving


def test_a_posted_document_is_tokenized_once(server, monkeypatch):
    import d2l_fast.packing as packing

    real, seen = packing.tokenize_context, []
    text = DOCS[0] + " Tokenized once."
    packed = server.d2l.model.pack([text])  # what a document's tokens and chunks are

    def counting(tokenizer, doc, **kw):
        seen.append(doc)
        return real(tokenizer, doc, **kw)

    monkeypatch.setattr(packing, "tokenize_context", counting)  # every tokenization of a document text goes here
    doc = post_doc(server, text)
    assert seen == [text]
    assert (doc["tokens"], doc["chunks"]) == (sum(packed.lengths), packed.n_chunks[0]) and doc["chunks"] > 1


class _FreshAdapterTensors:
    """Counts tensors that ops create in new memory with an adapter's shape [layers, rank rows, features], in every
    thread started while installed (torch dispatch modes are per thread, so one is entered in each new thread)."""

    def __init__(self, spec):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        self.shapes = {(spec.num_layers, d) for m in spec.target_modules for d in (spec.d_in[m], spec.d_out[m])}
        self.r, self.count, self.on, self.lock = spec.lora_r, 0, False, threading.Lock()
        probe = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if probe.on:
                    ins = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                           if isinstance(t, torch.Tensor)}
                    n = sum(1 for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dim() == 3
                            and (t.shape[0], t.shape[2]) in probe.shapes and t.shape[1] >= probe.r
                            and t.shape[1] % probe.r == 0 and t.untyped_storage().data_ptr() not in ins)
                    with probe.lock:
                        probe.count += n
                return out

        self.mode_cls = Mode

    def _hook(self, frame, event, arg):
        import sys

        sys.setprofile(None)  # once per thread: enter a counting mode, then stop profiling
        self.mode_cls().__enter__()

    def __enter__(self):
        threading.setprofile(self._hook)
        return self

    def __exit__(self, *exc):
        threading.setprofile(None)


def test_a_request_copies_its_adapters_at_most_once(model, tmp_path):
    """One document as it is: no copy. Two documents scaled: one concatenation (scaled in place), not the clones,
    concatenation and composition (select) of before. Counted over the whole real path: HTTP handler, store
    reads in worker threads, the decode engine's admission and the bound forward passes."""
    n_mod = len(model.spec.target_modules)
    with _FreshAdapterTensors(model.spec) as probe:
        app = create_app(model, store=str(tmp_path / "store"))
        with BackgroundServer(app) as srv:
            c = httpx.Client(base_url=srv.url, timeout=60)
            ids = [c.post("/v1/documents", json={"text": t}).json()["id"] for t in DOCS[3:5]]
            name = app.state.d2l.model_name
            q = chat_ids(model, user(QUESTIONS[3]))
            cases = [({"documents": ids[:1]}, 0, model.internalize([DOCS[3]])),
                     ({"documents": ids, "context_scaling": 0.5, "bias_scaling": 2.0}, 2 * n_mod,
                      model.internalize(DOCS[3:5], scalers=0.5, bias_scaler=2.0).compose([0, 1]))]
            for extra, copies, ad in cases:
                probe.count, probe.on = 0, True
                r = c.post("/v1/chat/completions", json={"model": name, "messages": user(QUESTIONS[3]),
                                                         "max_tokens": 6, **extra})
                probe.on = False
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == reference(model, q, ad, 6)[1]
                # 2 tensors (A, B) per module = one copy of the request's adapter
                assert probe.count == copies, (extra, probe.count, copies)
