"""The web demo at `/` driven by a real headless Chromium (Debian's chromium + chromium-driver, via selenium):
paste a document, internalize it, ask two questions, compare the streamed answers with the API's own."""

import os
import shutil

import pytest

from d2l_fast import D2LModel

from .._tiny import tiny_pair
from ._browser import needs_chromium, start_chromium

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from d2l_fast.serving import BackgroundServer, create_app  # noqa: E402

DOC = ("The keeper of the old mill wrote every storm into a blue ledger, and the river rose twice that spring "
       "while the fox watched the boats from under the bridge near the bakery.")

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def browser():
    drv = start_chromium()
    try:
        yield drv
    finally:
        drv.quit()


def answer(client, body):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_web_demo_internalize_and_chat_matches_api(browser, tmp_path):
    base, tok = tiny_pair("llama")
    model = D2LModel.from_base(base, tok, seed=0, init_scaler_B=6.0, max_chunk_len=24, latent_size=32, num_blocks=1,
                               n_heads=4, head_dim=16, n_kv_heads=2)
    app = create_app(model)
    with BackgroundServer(app) as srv:
        c = httpx.Client(base_url=srv.url, timeout=60)
        page = c.get("/")
        assert page.status_code == 200 and "<script" in page.text
        assert "http://" not in page.text and "https://" not in page.text  # no CDN: every asset comes from here
        wait = WebDriverWait(browser, 60)
        browser.get(srv.url + "/")
        wait.until(lambda d: app.state.d2l.model_name in d.find_element(By.ID, "model-name").text)
        browser.find_element(By.ID, "doc-name").send_keys("mill")
        browser.find_element(By.ID, "doc-text").send_keys(DOC)
        browser.find_element(By.ID, "internalize-btn").click()
        status = wait.until(lambda d: d.find_element(By.ID, "doc-status").get_attribute("data-doc-id") and
                            d.find_element(By.ID, "doc-status"))
        doc_id = status.get_attribute("data-doc-id")
        info = c.get(f"/v1/documents/{doc_id}").json()
        assert f"{info['tokens']} tokens, {info['chunks']} chunk(s)" in status.text and " ms" in status.text
        assert info["name"] == "mill" and info["chunks"] >= 2
        box = browser.find_element(By.CSS_SELECTOR, f"#doc-list input[value='{doc_id}']")
        assert box.is_selected()  # the new document is used for the chat
        browser.find_element(By.ID, "compare-toggle").click()
        name = app.state.d2l.model_name
        history, base_history = [], []  # each side of the page keeps its own conversation
        for turn, q in enumerate(["Where did the fox live?", "And the river?"], 1):
            browser.find_element(By.ID, "chat-input").send_keys(q)
            browser.find_element(By.ID, "send-btn").click()
            mine = wait.until(lambda d, t=turn: d.find_element(By.ID, f"answer-{2 * t - 1}")
                              if d.find_elements(By.CSS_SELECTOR, f"#answer-{2 * t - 1}[data-done='1']") else False)
            base_div = wait.until(lambda d, t=turn: d.find_element(By.ID, f"base-answer-{2 * t - 1}")
                                  if d.find_elements(By.CSS_SELECTOR, f"#base-answer-{2 * t - 1}[data-done='1']")
                                  else False)
            history.append({"role": "user", "content": q})
            base_history.append({"role": "user", "content": q})
            api = answer(c, {"model": name, "messages": history, "max_tokens": 128, "documents": [doc_id]})
            api_base = answer(c, {"model": name, "messages": base_history, "max_tokens": 128})
            shown = mine.find_element(By.CLASS_NAME, "text").get_property("textContent")
            shown_base = base_div.find_element(By.CLASS_NAME, "text").get_property("textContent")
            assert shown == api and shown_base == api_base and api != api_base
            history.append({"role": "assistant", "content": api})
            base_history.append({"role": "assistant", "content": api_base})
        shot = tmp_path / "web_demo.png"
        assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        out = os.environ.get("D2L_SCREENSHOT_DIR")
        if out:
            shutil.copy(shot, os.path.join(out, "web_demo.png"))
