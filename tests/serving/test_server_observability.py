"""Observability of the document server: Prometheus /metrics (one registry per app), /version, request ids and
structured request logs; the OpenAI contract for parameters the server does not implement."""

import logging

import pytest

from d2l_fast import D2LModel

from .._tiny import tiny_pair

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

from d2l_fast.serving import BackgroundServer, create_app  # noqa: E402

KW = dict(latent_size=32, num_blocks=1, n_heads=4, head_dim=16, n_kv_heads=2)
DOC = "The keeper of the old mill wrote every storm into a blue ledger, and the river rose twice that spring."


@pytest.fixture(scope="module")
def model():
    base, tok = tiny_pair("llama")
    return D2LModel.from_base(base, tok, seed=0, init_scaler_B=6.0, max_chunk_len=24, **KW)


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model)
    other = create_app(model)  # a second app in the same process: its own registry, no clash
    assert other.state.d2l.metrics.registry is not app.state.d2l.metrics.registry
    with BackgroundServer(app) as srv:
        srv.d2l = app.state.d2l
        srv.http = httpx.Client(base_url=srv.url, timeout=60)
        srv.oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield srv


def samples(srv) -> dict:
    r = srv.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in parser.text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_tokens_documents_and_internalize(server, model):
    before = samples(server)
    doc = server.http.post("/v1/documents", json={"text": DOC}).json()
    total = 0
    for stream in (False, True):
        kw = dict(model=server.d2l.model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                  extra_body={"documents": [doc["id"]]})
        if stream:
            chunks = list(server.oa.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                            **kw))
            total += chunks[-1].usage.completion_tokens
        else:
            total += server.oa.chat.completions.create(**kw).usage.completion_tokens
    assert server.http.get("/v1/documents/doc-000000000000000000000000").status_code == 404
    m = samples(server)
    chat = dict(route="/v1/chat/completions", method="POST", status="200")
    assert value(m, "d2l_http_requests_total", **chat) - value(before, "d2l_http_requests_total", **chat) == 2
    nf = dict(route="/v1/documents/{doc_id}", method="GET", status="404")
    assert value(m, "d2l_http_requests_total", **nf) - value(before, "d2l_http_requests_total", **nf) == 1
    assert value(m, "d2l_generated_tokens_total") - value(before, "d2l_generated_tokens_total") == total
    ttft = "d2l_time_to_first_token_seconds_count"
    assert value(m, ttft, kind="chat") - value(before, ttft, kind="chat") == 2
    assert value(m, "d2l_internalized_tokens_total") - value(before, "d2l_internalized_tokens_total") == doc["tokens"]
    assert value(m, "d2l_internalize_seconds_count") - value(before, "d2l_internalize_seconds_count") == 1
    assert value(m, "d2l_documents_stored") == len(server.d2l.store) >= 1
    assert value(m, "d2l_adapter_memory_bytes") == server.d2l.store.resident_bytes > 0
    assert value(m, "d2l_queue_depth") == 0 and value(m, "d2l_running_rows") == 0
    assert value(m, "d2l_http_request_duration_seconds_count", route="/v1/chat/completions", method="POST") >= 2


def test_version_and_request_ids(server, caplog):
    v = server.http.get("/version").json()
    import torch

    import d2l_fast

    assert v["version"] == d2l_fast.__version__ and v["torch"] == torch.__version__
    assert v["model"] == server.d2l.model_name
    with caplog.at_level(logging.INFO, logger="d2l_fast.serving.access"):
        r = server.http.get("/health", headers={"X-Request-ID": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        r2 = server.http.get("/health", headers={"X-Request-ID": "bad id with spaces"})
        new = r2.headers["x-request-id"]
        assert new != "bad id with spaces" and len(new) == 32
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "d2l_fast.serving.access"]
    assert any("request_id=abc-123" in s and "path=/health" in s and "status=200" in s for s in lines), lines
    assert any(f"request_id={new}" in s for s in lines)


@pytest.mark.parametrize("extra", [{"tools": [{"type": "function", "function": {"name": "f"}}]},
                                   {"response_format": {"type": "json_object"}}, {"logit_bias": {"1": 5}},
                                   {"tool_choice": "auto"}, {"functions": [{"name": "f"}]}, {"top_k": 5}])
def test_unsupported_parameters_are_a_400_naming_them(server, extra):
    with pytest.raises(openai.BadRequestError) as e:
        server.oa.chat.completions.create(model=server.d2l.model_name, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2, extra_body=extra)
    (name,) = extra
    assert e.value.body["param"] == name and name in e.value.body["message"]


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_penalties_outside_openai_range_are_a_400(server, name):
    with pytest.raises(openai.BadRequestError) as e:
        server.oa.chat.completions.create(model=server.d2l.model_name, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2, **{name: 2.5})
    assert e.value.body["param"] == name


def manual_penalized_greedy(model, ids, n, presence, frequency):
    """Greedy decoding with OpenAI's penalties, one full forward per token (no cache, no server)."""
    import torch

    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model.base_model(torch.tensor([ids + out])).logits[0, -1].float()
        count = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[-1]).float()
        t = int((logits - frequency * count - presence * (count > 0).float()).argmax())
        out.append(t)
        if t == model.base_model.generation_config.eos_token_id:
            break
    return out


def test_penalties_follow_openai_semantics(server, model):
    prompt = "the the the the the the"
    ids = list(model.tokenizer(prompt)["input_ids"])
    plain = server.oa.completions.create(model=server.d2l.model_name, prompt=ids, max_tokens=8)
    pen = server.oa.completions.create(model=server.d2l.model_name, prompt=ids, max_tokens=8, frequency_penalty=2.0,
                                       presence_penalty=1.5)
    want = manual_penalized_greedy(model, ids, 8, 1.5, 2.0)
    eos = model.base_model.generation_config.eos_token_id
    assert pen.choices[0].text == model.tokenizer.decode([t for t in want if t != eos], skip_special_tokens=True)
    assert pen.choices[0].text != plain.choices[0].text  # the penalties changed the answer


def test_completions_accept_lists_of_prompts_and_token_ids(server, model):
    name, prompts = server.d2l.model_name, ["The river", "Bread rose in"]
    singles = [server.oa.completions.create(model=name, prompt=p, max_tokens=5).choices[0].text for p in prompts]
    both = server.oa.completions.create(model=name, prompt=prompts, max_tokens=5)
    assert [c.index for c in both.choices] == [0, 1] and [c.text for c in both.choices] == singles
    ids = [list(model.tokenizer(p)["input_ids"]) for p in prompts]
    assert server.oa.completions.create(model=name, prompt=ids[0], max_tokens=5).choices[0].text == singles[0]
    as_ids = server.oa.completions.create(model=name, prompt=ids, max_tokens=5)
    assert [c.text for c in as_ids.choices] == singles
    assert as_ids.usage.prompt_tokens == sum(map(len, ids))
    streamed = {0: "", 1: ""}
    for c in server.oa.completions.create(model=name, prompt=prompts, max_tokens=5, stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.text
    assert [streamed[0], streamed[1]] == singles
    with pytest.raises(openai.BadRequestError) as e:
        server.oa.completions.create(model=name, prompt=[[1, 2], [10**9]], max_tokens=2)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        server.oa.completions.create(model=name, prompt="x", max_tokens=2, n=2)
