"""The data viewer (/view): its API over a real uvicorn server on a tmp folder of eval outputs and data records
(grouping of methods, the join to documents, bin / attribute / method filters, pagination, path traversal refused),
the `serve --data-dir` mount, the `d2l-fast view` command's argument errors, and the page in a real headless
Chromium (pick a file, filter by bin, read the rows shown; screenshot to tmp_path)."""

import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from d2l_fast.serving import BackgroundServer  # noqa: E402
from d2l_fast.serving.viewer import DataViewer, create_viewer_app  # noqa: E402

from ._browser import needs_chromium, start_chromium  # noqa: E402

METHODS = ("d2l", "base", "in_prompt")
BINS = ("0-512", "512-1024")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    ev = root / "eval"
    ev.mkdir()
    records, samples = [], []
    for i in range(5):
        rid, b = f"r{i}", BINS[i % 2]
        lo, hi = map(int, b.split("-"))
        records.append({"id": rid, "context": f"Document number {i}: the lamp is color{i}.", "task": "qa",
                        "qas": [{"question": f"What color is lamp {i}?", "answers": [f"color{i}"]},
                                {"question": f"Which number is document {i}?", "answers": [str(i)]}],
                        "meta": {"bin": [lo, hi], "source": "even" if i % 2 == 0 else "odd"}})
        for j in range(2):
            for k, m in enumerate(METHODS):
                samples.append({"sample_id": f"{rid}/{j}", "record_id": rid, "method": m, "task": "qa",
                                "question": records[-1]["qas"][j]["question"],
                                "answers": records[-1]["qas"][j]["answers"], "prediction": f"{m} says {i}.{j}",
                                "n_ctx_tokens": 100 + i, "bin": b, "qa_f1": k / 2, "exact_match": float(k == 2)})
    _write(ev / "records.jsonl", records)
    _write(ev / "samples.jsonl", samples)
    _write(root / "gen.jsonl", records[:3])
    return root


@pytest.fixture(scope="module")
def server(data):
    with BackgroundServer(create_viewer_app(data)) as srv:
        srv.client = httpx.Client(base_url=srv.url, timeout=30)
        yield srv
        srv.client.close()


def rows(server, **params):
    r = server.client.get("/view/api/rows", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_files_listed(server):
    r = server.client.get("/view/api/files")
    assert r.status_code == 200
    files = {f["file"]: f["kind"] for f in r.json()["files"]}
    assert files == {"eval/records.jsonl": "records", "eval/samples.jsonl": "samples", "gen.jsonl": "records"}


def test_samples_grouped_and_joined(server):
    j = rows(server, file="eval/samples.jsonl", limit=200)
    assert j["kind"] == "samples" and j["total"] == 10 and j["bins"] == list(BINS)
    assert j["methods"] == sorted(METHODS)
    first = j["rows"][0]
    assert first["sample_id"] == "r0/0" and first["answers"] == ["color0"] and first["bin"] == "0-512"
    assert set(first["methods"]) == set(METHODS)
    assert first["methods"]["in_prompt"] == {"prediction": "in_prompt says 0.0",
                                             "scores": {"qa_f1": 1.0, "exact_match": 1.0}}
    assert first["document"] == "Document number 0: the lamp is color0." and first["meta"]["source"] == "even"


def test_filters_and_pagination(server):
    j = rows(server, file="eval/samples.jsonl", bin="512-1024", limit=200)
    assert j["total"] == 4 and {r["record_id"] for r in j["rows"]} == {"r1", "r3"}
    j = rows(server, file="eval/samples.jsonl", method="d2l", attribute="source=even")
    assert j["total"] == 6 and all(list(r["methods"]) == ["d2l"] for r in j["rows"])
    assert {r["record_id"] for r in j["rows"]} == {"r0", "r2", "r4"}
    pages = [rows(server, file="eval/samples.jsonl", offset=o, limit=3) for o in (0, 3, 6, 9)]
    ids = [r["sample_id"] for p in pages for r in p["rows"]]
    assert [len(p["rows"]) for p in pages] == [3, 3, 3, 1] and len(set(ids)) == 10
    j = rows(server, file="gen.jsonl", bin="0-512")
    assert j["kind"] == "records" and [r["record_id"] for r in j["rows"]] == ["r0", "r2"]
    assert j["rows"][0]["qas"][1] == {"question": "Which number is document 0?", "answers": ["0"]}


@pytest.mark.parametrize("params,status,fragment", [
    ({"file": "../outside.jsonl"}, 400, "inside the data folder"),
    ({"file": "/etc/passwd"}, 400, "inside the data folder"),
    ({"file": "eval/../../x.jsonl"}, 400, "inside the data folder"),
    ({"file": "eval/samples.json"}, 400, ".jsonl"),
    ({"file": "missing.jsonl"}, 404, "no file"),
    ({}, 400, "required"),
    ({"file": "gen.jsonl", "limit": "0"}, 400, "limit"),
    ({"file": "gen.jsonl", "offset": "-1"}, 400, "offset"),
    ({"file": "gen.jsonl", "attribute": "novalue"}, 400, "key=value"),
    ({"file": "gen.jsonl", "method": "d2l"}, 400, "samples.jsonl"),
])
def test_bad_requests(server, params, status, fragment):
    r = server.client.get("/view/api/rows", params=params)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


def test_symlink_out_of_folder_refused(data, tmp_path):
    (tmp_path / "out.jsonl").write_text('{"context": "x", "qas": [{"question": "q"}]}\n')
    (data / "link.jsonl").symlink_to(tmp_path / "out.jsonl")
    try:
        v = DataViewer(data)
        assert "link.jsonl" not in {f["file"] for f in v.files()}
        with pytest.raises(Exception, match="outside the data folder"):
            v.rows("link.jsonl")
    finally:
        (data / "link.jsonl").unlink()


def test_viewer_validates_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        DataViewer(tmp_path / "nope")
    with pytest.raises(TypeError, match="must be a path"):
        DataViewer(3)


def test_view_command_errors(tmp_path, capsys):
    from d2l_fast.cli import main

    assert main(["view", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_serve_data_dir_mounts_viewer(data):
    from d2l_fast import D2LModel
    from d2l_fast.serving import ServerSettings, create_app

    from .._tiny import tiny_pair

    base, tok = tiny_pair("llama")
    model = D2LModel.from_base(base, tok, seed=0, max_chunk_len=24, latent_size=32, num_blocks=1, n_heads=4,
                               head_dim=16, n_kv_heads=2)
    with BackgroundServer(create_app(model, ServerSettings(data_dir=str(data)))) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/view").status_code == 200 and "data viewer" in c.get("/view").text
            assert c.get("/view/api/rows", params={"file": "gen.jsonl"}).json()["total"] == 3
            assert c.get("/health").status_code == 200


@needs_chromium
def test_page_in_chromium(server, tmp_path):
    pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = start_chromium()
    try:
        d.get(server.url + "/view")
        wait = WebDriverWait(d, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#file-select option")) == 4)
        for i in ("file-select", "bin-select", "method-select", "attribute-input"):
            label = d.execute_script("return arguments[0].labels[0].textContent", d.find_element(By.ID, i))
            assert label.strip() and d.find_element(By.ID, i).get_attribute("aria-label")
        Select(d.find_element(By.ID, "file-select")).select_by_value("eval/samples.jsonl")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.row")) == 10)
        stamp = d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded")
        Select(d.find_element(By.ID, "bin-select")).select_by_value("512-1024")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") != stamp)
        arts = d.find_elements(By.CSS_SELECTOR, "article.row")
        assert [a.get_attribute("data-sample-id") for a in arts] == ["r1/0", "r1/1", "r3/0", "r3/1"]
        assert {a.get_attribute("data-bin") for a in arts} == {"512-1024"}
        cells = arts[0].find_elements(By.CSS_SELECTOR, "section.method")
        assert [c.get_attribute("data-method") for c in cells] == list(METHODS)
        assert "d2l says 1.0" in cells[0].text and "Gold: color1" in arts[0].text
        assert "4 row(s) match" in d.find_element(By.ID, "status").text
        path = tmp_path / "viewer.png"
        assert d.save_screenshot(str(path)) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        d.quit()


def test_data_dir_refused_with_an_api_key(tmp_path):
    from d2l_fast.serving import ServerSettings

    with pytest.raises(ValueError, match="does not check the API key"):
        ServerSettings(data_dir=str(tmp_path), api_key="sesame")
    assert ServerSettings(data_dir=str(tmp_path)).data_dir == str(tmp_path)
