"""Documents and runtime-loaded PEFT adapters as models (vLLM's LoRA conventions): a real uvicorn server on a free
loopback port, the official `openai` client, and PEFT folders written by d2l_fast.export.export_peft."""

import json

import pytest
import torch

from d2l_fast import D2LModel
from d2l_fast.export import export_peft
from d2l_fast.peft_import import PeftFormatError, load_peft_adapter

from .._tiny import tiny_pair

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from d2l_fast.serving import BackgroundServer, create_app  # noqa: E402

KW = dict(latent_size=32, num_blocks=1, n_heads=4, head_dim=16, n_kv_heads=2)
DOC = ("The keeper of the old mill wrote every storm into a blue ledger, and the river rose twice that spring "
       "while the fox watched the boats from under the bridge near the bakery.")
DOC2 = "The council met on the first Monday in the stone hall by the harbor."
Q = [{"role": "user", "content": "Where did the fox live?"}]


@pytest.fixture(scope="module")
def model():
    base, tok = tiny_pair("llama")
    return D2LModel.from_base(base, tok, seed=0, init_scaler_B=6.0, max_chunk_len=24, **KW)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    app = create_app(model, store=str(tmp_path_factory.mktemp("store")), batch_window_ms=5.0,
                     allow_runtime_lora_loading=True)
    with BackgroundServer(app) as srv:
        srv.d2l = app.state.d2l
        srv.http = httpx.Client(base_url=srv.url, timeout=60)
        srv.oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield srv


@pytest.fixture(scope="module")
def docs(server):
    out = []
    for text, name in ((DOC, "mill"), (DOC2, "council")):
        r = server.http.post("/v1/documents", json={"text": text, "name": name})
        assert r.status_code == 200, r.text
        out.append(r.json()["id"])
    return out


def chat(server, model, **extra):
    r = server.oa.chat.completions.create(model=model, messages=Q, max_tokens=12, temperature=0, **extra)
    return r


def test_documents_are_listed_as_models_with_parent(server, docs):
    base = server.d2l.model_name
    cards = {m.id: m for m in server.oa.models.list().data}
    assert set(docs) <= set(cards) and base in cards
    b = cards[base].model_dump()
    assert b["parent"] is None and b["object"] == "model" and b["owned_by"] == "d2l_fast"
    assert b["root"] == str(server.d2l.model.spec.base_model_name_or_path)
    for d in docs:
        c = cards[d].model_dump()
        assert c["parent"] == base and c["object"] == "model" and c["owned_by"] == "d2l_fast" and c["root"] == d
    assert cards[docs[0]].model_dump()["name"] == "mill"
    one = server.oa.models.retrieve(docs[0]).model_dump()
    assert one == cards[docs[0]].model_dump()
    assert server.oa.models.retrieve(base).model_dump()["parent"] is None


def test_unknown_model_is_404_in_openai_shape(server):
    with pytest.raises(openai.NotFoundError):
        server.oa.models.retrieve("no-such-model")
    r = server.http.get("/v1/models/doc-000000000000000000000000")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["type"] == "not_found_error" and "doc-0000" in err["message"]
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        chat(server, "no-such-model")


def test_model_doc_id_is_documents_of_that_id(server, docs):
    base = server.d2l.model_name
    via_docs = chat(server, base, extra_body={"documents": [docs[0]]})
    via_model = chat(server, docs[0])
    plain = chat(server, base)
    assert via_model.choices[0].message.content == via_docs.choices[0].message.content
    assert via_model.choices[0].message.content != plain.choices[0].message.content  # the adapter is applied
    assert via_model.model == docs[0] and via_docs.model == base  # the response names the model asked for
    stream = server.oa.chat.completions.create(model=docs[0], messages=Q, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        via_docs.choices[0].message.content and {c.model for c in chunks} == {docs[0]}
    comp = server.oa.completions.create(model=docs[0], prompt="The fox", max_tokens=8, temperature=0)
    comp_docs = server.oa.completions.create(model=base, prompt="The fox", max_tokens=8, temperature=0,
                                             extra_body={"documents": [docs[0]]})
    assert comp.choices[0].text == comp_docs.choices[0].text and comp.model == docs[0]


def test_model_doc_id_composes_with_documents(server, docs):
    both = chat(server, server.d2l.model_name, extra_body={"documents": docs})
    composed = chat(server, docs[0], extra_body={"documents": [docs[1]]})
    assert composed.choices[0].message.content == both.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="both the model and one of 'documents'"):
        chat(server, docs[0], extra_body={"documents": [docs[0]]})


def load(server, name, path, **extra):
    return server.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra})


def test_load_exported_document_then_chat_then_unload(server, model, docs, tmp_path):
    _, ad = server.d2l.store.get(docs[0])
    folder = export_peft(model, ad, 0, tmp_path / "mill-lora")[0]
    r = load(server, "mill-lora", folder)
    assert r.status_code == 200, r.text
    assert "mill-lora" in r.text
    cards = {m.id: m.model_dump() for m in server.oa.models.list().data}
    assert cards["mill-lora"]["parent"] == server.d2l.model_name and cards["mill-lora"]["root"] == str(folder)
    assert server.oa.models.retrieve("mill-lora").id == "mill-lora"
    want = chat(server, docs[0]).choices[0].message.content
    got = chat(server, "mill-lora")
    assert got.choices[0].message.content == want and got.model == "mill-lora"
    # loaded again under the same name: refused (as vLLM), or replaced with load_inplace
    r = load(server, "mill-lora", folder)
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    assert load(server, "mill-lora", folder, load_inplace=True).status_code == 200
    r = server.http.post("/v1/unload_lora_adapter", json={"lora_name": "mill-lora"})
    assert r.status_code == 200, r.text
    assert "mill-lora" not in {m.id for m in server.oa.models.list().data}
    with pytest.raises(openai.NotFoundError):
        chat(server, "mill-lora")
    r = server.http.post("/v1/unload_lora_adapter", json={"lora_name": "mill-lora"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def _exported(model, server, docs, folder):
    _, ad = server.d2l.store.get(docs[0])
    return export_peft(model, ad, 0, folder)[0]


def test_load_refusals_name_the_problem(server, model, docs, tmp_path):
    good = _exported(model, server, docs, tmp_path / "good")
    missing = load(server, "x1", tmp_path / "nope")
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]["message"]
    assert missing.json()["error"]["param"] == "lora_path"
    f = tmp_path / "file.txt"
    f.write_text("hi")
    assert "is not a folder" in load(server, "x2", f).json()["error"]["message"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    r = load(server, "x3", bad)
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    for field, value in (("r", 3), ("target_modules", ["q_proj"]), ("base_model_name_or_path", "other/model"),
                         ("use_dora", True)):
        folder = tmp_path / f"cfg-{field}"
        folder.mkdir()
        cfg = json.loads((good / "adapter_config.json").read_text())
        cfg[field] = value
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        (folder / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
        r = load(server, "x4", folder)
        assert r.status_code == 400, (field, r.text)
        assert repr(field) in r.json()["error"]["message"] or f"{field}=" in r.json()["error"]["message"], r.text
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (trunc / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes()[:100])
    r = load(server, "x5", trunc)
    assert r.status_code == 400 and "adapter_model.safetensors" in r.json()["error"]["message"]
    for name, why in ((docs[0], "reserved for stored documents"), (server.d2l.model_name, "base model"),
                      ("bad name", "is not allowed")):
        r = load(server, name, good)
        assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
    r = server.http.post("/v1/load_lora_adapter", json={"lora_name": "x6", "lora_path": str(good), "extra": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "extra"
    assert {m.id for m in server.oa.models.list().data}.isdisjoint({"x1", "x2", "x3", "x4", "x5", "x6"})


def test_load_respects_flag_key_and_memory_budget(server, model, docs, tmp_path, monkeypatch):
    good = _exported(model, server, docs, tmp_path / "good")
    monkeypatch.setattr(server.d2l.settings, "allow_runtime_lora_loading", False)
    r = load(server, "y1", good)
    assert r.status_code == 403 and "--allow-runtime-lora-loading" in r.json()["error"]["message"]
    assert server.http.post("/v1/unload_lora_adapter", json={"lora_name": "y1"}).status_code == 403
    monkeypatch.setattr(server.d2l.settings, "allow_runtime_lora_loading", True)
    monkeypatch.setattr(server.d2l.settings, "api_key", "sekret")
    assert load(server, "y1", good).status_code == 401
    assert server.http.get("/v1/models").status_code == 401
    assert server.http.get(f"/v1/models/{docs[0]}").status_code == 401
    r = server.http.post("/v1/load_lora_adapter", json={"lora_name": "y1", "lora_path": str(good)},
                         headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 200, r.text
    monkeypatch.setattr(server.d2l.settings, "api_key", None)
    monkeypatch.setattr(server.d2l.loras, "memory_bytes", server.d2l.loras.nbytes + 10)
    r = load(server, "y2", good)
    assert r.status_code == 413 and "--adapter-memory-mb" in r.json()["error"]["message"]
    assert server.http.post("/v1/unload_lora_adapter", json={"lora_name": "y1"}).status_code == 200


def test_load_peft_adapter_round_trip_and_field_errors(model, tmp_path):
    ad = model.internalize([DOC])
    folder = export_peft(model, ad, 0, tmp_path / "a")[0]
    back = load_peft_adapter(folder, model, name="a")
    assert back.ranks == ad.ranks and back.alpha == ad.alpha and back.model_id == model.model_id
    assert all(torch.equal(back.A[m], ad.A[m]) and torch.equal(back.B[m], ad.B[m]) for m in ad.A)
    assert back.names == ["a"]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(cfg, lora_alpha=cfg["lora_alpha"] * 2)))
    doubled = load_peft_adapter(folder, model)  # another alpha: folded into B
    assert all(torch.allclose(doubled.B[m], 2 * ad.B[m]) for m in ad.B) and doubled.alpha == ad.alpha
    (folder / "adapter_config.json").write_text(json.dumps(dict(cfg, layers_to_transform=[0])))
    with pytest.raises(PeftFormatError, match="layers_to_transform"):
        load_peft_adapter(folder, model)
    (folder / "adapter_config.json").write_text(json.dumps(dict(cfg, r=0)))
    with pytest.raises(PeftFormatError, match="'r'"):
        load_peft_adapter(folder, model)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PeftFormatError, match="at most 10 are accepted"):
        load_peft_adapter(folder, model, max_bytes=10)
    with pytest.raises(TypeError, match="name must be a string"):
        load_peft_adapter(folder, model, name=3)
