"""The web page at `/` in a real headless Chromium (selenium) against a real server with a tiny model: layout on a
phone (390×844) and a desktop (1280×900), accessible names, two independent histories in compare mode, stop,
cut-off marker, stale documents, numeric validation, delete confirmation, upload elapsed time + cancel, upload
progress (polled) reaching done and cancel deleting the upload on the server, auto-scroll, and the API-key flow.

A pure-ASGI wrapper around the app records the chat request bodies the page sends, can slow the streamed response
down (so that Stop and auto-scroll have a stream to act on) and can hold a document upload until the client goes
away (so that Cancel has an upload to cancel). Screenshots go to tmp_path, and also to $D2L_SCREENSHOT_DIR if set.
"""

import asyncio
import json
import os
import re
import shutil

import pytest

from d2l_fast import D2LModel
from d2l_fast.concurrency import model_lock
from d2l_fast.hf import decoder_of

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
PHONE, DESKTOP = (390, 844), (1280, 900)

pytestmark = needs_chromium


class Recorder:
    """ASGI wrapper: records chat bodies, optionally throttles response bodies, optionally holds uploads."""

    def __init__(self, app):
        self.app = app
        self.reset()

    def reset(self):
        self.chats = []      # JSON bodies of POST /v1/chat/completions, in arrival order
        self.streams = []    # per chat response: {"done": [DONE] was sent, "ended": the app returned}
        self.throttle_s = 0.0
        self.hold_uploads = False
        self.uploads = []    # held uploads: "held", then "disconnected" when the client went away

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            if scope["path"] == "/v1/chat/completions":
                return await self._chat(scope, receive, send)
            if scope["path"] == "/v1/documents" and self.hold_uploads:
                return await self._hold(receive, send)
        return await self.app(scope, receive, send)

    async def _chat(self, scope, receive, send):
        chunks, state = [], {"done": False, "ended": False}
        self.streams.append(state)

        async def rec():
            msg = await receive()
            if msg["type"] == "http.request":
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    self.chats.append(json.loads(b"".join(chunks)))
            return msg

        async def snd(msg):
            if msg["type"] == "http.response.body":
                state["done"] |= b"[DONE]" in msg.get("body", b"")
                if self.throttle_s:
                    await asyncio.sleep(self.throttle_s)
            await send(msg)

        try:
            await self.app(scope, rec, snd)
        finally:
            state["ended"] = True

    async def _hold(self, receive, send):
        while True:  # read the whole body, then wait for the client to go away
            msg = await receive()
            if msg["type"] != "http.request" or not msg.get("more_body"):
                break
        self.uploads.append("held")
        try:
            msg = await asyncio.wait_for(receive(), timeout=30)
        except asyncio.TimeoutError:
            msg = {"type": "timeout"}
        if msg["type"] == "http.disconnect":
            self.uploads[-1] = "disconnected"
            return
        body = json.dumps({"error": {"message": "held upload timed out", "type": "server_error"}}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def model():
    base, tok = tiny_pair("llama")
    return D2LModel.from_base(base, tok, seed=0, init_scaler_B=6.0, max_chunk_len=24, latent_size=32, num_blocks=1,
                              n_heads=4, head_dim=16, n_kv_heads=2)


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model)
    rec = Recorder(app)
    with BackgroundServer(rec) as srv:
        srv.rec, srv.name, srv.d2l = rec, app.state.d2l.model_name, app.state.d2l
        srv.client = httpx.Client(base_url=srv.url, timeout=60)
        yield srv
        srv.client.close()


@pytest.fixture(scope="module")
def browser():
    drv = start_chromium()
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture
def page(browser, server):
    """The page freshly loaded at desktop size, connected to the server; the recorder reset."""
    server.rec.reset()
    size(browser, DESKTOP)
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: server.name in d.find_element(By.ID, "model-name").text)
    yield browser
    server.rec.reset()
    size(browser, DESKTOP)


def size(browser, wh):
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": wh[0], "height": wh[1], "deviceScaleFactor": 1, "mobile": wh == PHONE})


def by_id(d, i):
    return d.find_element(By.ID, i)


def js(d, script, *args):
    return d.execute_script(script, *args)


def shot(browser, tmp_path, name):
    path = tmp_path / name
    assert browser.save_screenshot(str(path)) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = os.environ.get("D2L_SCREENSHOT_DIR")
    if out:
        os.makedirs(out, exist_ok=True)
        shutil.copy(path, os.path.join(out, name))


def new_doc(server, name, text=DOC):
    r = server.client.post("/v1/documents", json={"text": text, "name": name})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def ask(d, question, max_tokens=None):
    """Types `question`, presses Send; returns the number n of the turn (the answer's id is answer-n)."""
    if max_tokens is not None:
        box = by_id(d, "max-tokens")
        box.clear()
        box.send_keys(str(max_tokens))
    n = js(d, "return history.length + 1")
    by_id(d, "chat-input").send_keys(question)
    by_id(d, "send-btn").click()
    return n


def wait_done(d, css_id, timeout=60):
    return WebDriverWait(d, timeout).until(
        lambda d: d.find_element(By.ID, css_id) if d.find_elements(By.CSS_SELECTOR, f"#{css_id}[data-done]") and
        d.find_element(By.ID, css_id).get_attribute("data-done") else False)


def text_of(el):
    return el.find_element(By.CLASS_NAME, "text").get_property("textContent")


def tick(d, doc_id):
    box = WebDriverWait(d, 20).until(lambda d: d.find_element(By.CSS_SELECTOR, f"#doc-list input[value='{doc_id}']"))
    if not box.is_selected():
        box.click()
    assert box.is_selected()


def layout(d):
    return js(d, """const r = (id) => document.getElementById(id).getBoundingClientRect();
        return {sw: document.documentElement.scrollWidth, iw: innerWidth, ih: innerHeight, chat: r('chat-col').width,
                input: r('chat-input'), send: r('send-btn'), side: r('side'), form: r('chat'),
                sideShown: getComputedStyle(document.getElementById('side')).display !== 'none'};""")


def test_layout_phone_and_desktop(page, server, tmp_path):
    d = page
    for wh in (PHONE, DESKTOP):  # an empty conversation: the chat form sits at the bottom of the screen
        size(d, wh)
        lay = layout(d)
        assert lay["ih"] - 40 <= lay["form"]["bottom"] <= lay["ih"] and lay["sw"] <= lay["iw"] == wh[0], (wh, lay)
    doc_id = new_doc(server, "mill")
    by_id(d, "refresh-docs-btn").click()
    tick(d, doc_id)
    by_id(d, "compare-toggle").click()
    n = ask(d, "Where did the fox live?", max_tokens=24)
    wait_done(d, f"answer-{n}"), wait_done(d, f"base-answer-{n}")
    lay = layout(d)
    assert lay["iw"] == DESKTOP[0] and lay["sw"] <= lay["iw"], lay  # no sideways scrolling
    assert lay["sideShown"] and lay["chat"] >= 700, lay  # sidebar beside a wide chat column
    assert lay["send"]["right"] <= lay["iw"] and lay["input"]["bottom"] <= lay["ih"], lay
    assert not by_id(d, "panel-toggle").is_displayed()
    shot(d, tmp_path, "page_desktop_1280x900.png")

    size(d, PHONE)
    lay = layout(d)
    assert lay["iw"] == PHONE[0] and lay["sw"] <= lay["iw"], lay
    assert lay["chat"] >= 300 and not lay["sideShown"], lay  # the sidebar is behind the toggle
    for k in ("input", "send"):  # the chat input and Send are on screen
        assert 0 <= lay[k]["left"] and lay[k]["right"] <= lay["iw"] and lay[k]["bottom"] <= lay["ih"], (k, lay)
    assert lay["input"]["width"] >= 150, lay
    # compare answers are stacked on a phone, each as wide as the chat
    widths = js(d, f"return [...document.querySelectorAll('#answer-{n}, #base-answer-{n}')]"
                   ".map((e) => e.getBoundingClientRect().width)")
    assert len(widths) == 2 and min(widths) >= 300, widths
    shot(d, tmp_path, "page_phone_390x844.png")

    toggle = by_id(d, "panel-toggle")
    assert toggle.is_displayed() and toggle.get_attribute("aria-expanded") == "false" and "1 ticked" in toggle.text
    toggle.click()
    lay = layout(d)
    assert lay["sideShown"] and toggle.get_attribute("aria-expanded") == "true", lay
    assert lay["sw"] <= lay["iw"] and lay["chat"] >= 300 and lay["side"]["right"] <= lay["iw"], lay
    assert lay["input"]["bottom"] <= lay["ih"], lay  # the chat stays usable with the panel open
    assert by_id(d, "doc-text").is_displayed() and by_id(d, "internalize-btn").is_displayed()
    shot(d, tmp_path, "page_phone_390x844_panel.png")
    assert server.client.delete(f"/v1/documents/{doc_id}").status_code == 200


def test_every_control_has_an_accessible_name(page, server):
    d = page
    doc_id = new_doc(server, "ledger notes")
    by_id(d, "refresh-docs-btn").click()
    tick(d, doc_id)
    controls = [e for e in d.find_elements(By.CSS_SELECTOR, "input, button, textarea, select, [role=button]")
                if e.is_displayed()]
    assert len(controls) >= 14
    unnamed = [e.get_attribute("outerHTML")[:90] for e in controls if not (e.accessible_name or "").strip()]
    assert not unnamed, unnamed
    box = d.find_element(By.CSS_SELECTOR, f"#doc-list input[value='{doc_id}']")
    assert "ledger notes" in box.accessible_name
    delete = box.find_element(By.XPATH, "..").find_element(By.TAG_NAME, "button")
    assert "delete" in delete.accessible_name.lower() and "ledger notes" in delete.accessible_name
    for i in ("doc-status", "chat-status", "api-status", "messages"):  # status and answers are announced
        assert by_id(d, i).get_attribute("aria-live") == "polite", i
    assert by_id(d, "messages").get_attribute("role") == "log"
    assert by_id(d, "stop-btn").get_attribute("textContent").strip() == "Stop"  # hidden until an answer streams
    assert server.client.delete(f"/v1/documents/{doc_id}").status_code == 200


def test_compare_mode_keeps_two_independent_histories(page, server):
    d = page
    doc_id = new_doc(server, "mill")
    by_id(d, "refresh-docs-btn").click()
    tick(d, doc_id)
    qs = ["Where did the fox live?", "And the river?", "Who kept the ledger?"]
    main_answers, base_answers = [], []
    for k, q in enumerate(qs):
        if k == 1:
            by_id(d, "compare-toggle").click()  # turn 1 with the adapter only; turns 2 and 3 compared
        n = ask(d, q, max_tokens=10)
        main_answers.append(text_of(wait_done(d, f"answer-{n}")))
        if k >= 1:
            base_answers.append(text_of(wait_done(d, f"base-answer-{n}")))
    with_doc = [b["messages"] for b in server.rec.chats if b.get("documents")]
    base = [b["messages"] for b in server.rec.chats if not b.get("documents")]
    assert all(b["documents"] == [doc_id] and b["max_tokens"] == 10 for b in server.rec.chats if b.get("documents"))

    def conv(questions, answers):
        out = []
        for q, a in zip(questions, answers + [None]):
            out.append({"role": "user", "content": q})
            if a is not None:
                out.append({"role": "assistant", "content": a})
        return out

    assert with_doc == [conv(qs[:1], []), conv(qs[:2], main_answers[:1]), conv(qs, main_answers[:2])]
    # the base model sees only its own turns: never the question of the adapter-only turn, never an adapter answer
    assert base == [conv(qs[1:2], []), conv(qs[1:], base_answers[:1])]
    assert all(m["content"] != main_answers[0] for conv_ in base for m in conv_)
    assert server.client.delete(f"/v1/documents/{doc_id}").status_code == 200


def test_stop_button_aborts_the_stream(page, server):
    d = page
    server.rec.throttle_s = 0.2  # a slow stream: 200 tokens would take ~40 s
    n = ask(d, "Tell me a long story.", max_tokens=200)
    stop = by_id(d, "stop-btn")
    WebDriverWait(d, 30).until(lambda d: stop.is_displayed() and text_of(d.find_element(By.ID, f"answer-{n}")))
    assert not by_id(d, "send-btn").is_enabled()
    stop.click()
    ans = wait_done(d, f"answer-{n}", timeout=10)
    assert ans.get_attribute("data-done") == "stopped" and "stopped" in ans.text
    assert not stop.is_displayed() and by_id(d, "send-btn").is_enabled()
    WebDriverWait(d, 10).until(lambda d: server.rec.streams[-1]["ended"])
    assert not server.rec.streams[-1]["done"]  # the server's stream ended early: the client went away


def test_cut_off_marker_when_max_tokens_is_reached(page, server):
    d = page
    n = ask(d, "Where did the fox live?", max_tokens=2)
    ans = wait_done(d, f"answer-{n}")
    assert ans.get_attribute("data-finish") == "length"
    marker = ans.find_element(By.CSS_SELECTOR, ".marker.cutoff")
    assert marker.is_displayed() and marker.text == "cut off (max tokens)"
    assert server.rec.chats[-1]["max_tokens"] == 2


def test_stale_document_is_unticked_with_a_notice(page, server):
    d = page
    keep, gone = new_doc(server, "keeper"), new_doc(server, "doomed doc")
    by_id(d, "refresh-docs-btn").click()
    tick(d, keep), tick(d, gone)
    assert server.client.delete(f"/v1/documents/{gone}").status_code == 200  # deleted elsewhere
    ask(d, "Where did the fox live?", max_tokens=4)
    notice = WebDriverWait(d, 20).until(lambda d: by_id(d, "notice") if by_id(d, "notice").is_displayed() else False)
    assert "doomed doc" in notice.text and "Unticked" in notice.text
    assert js(d, "return checkedDocuments()") == [keep]
    assert not d.find_elements(By.CSS_SELECTOR, f"#doc-list input[value='{gone}']")
    assert server.rec.chats == []  # nothing was asked with a missing document
    assert by_id(d, "chat-input").get_attribute("value") == "Where did the fox live?"  # the question is kept
    by_id(d, "send-btn").click()  # asked again: with the documents that are left
    wait_done(d, "answer-1")
    assert [b["documents"] for b in server.rec.chats] == [[keep]]
    assert server.client.delete(f"/v1/documents/{keep}").status_code == 200


def test_invalid_max_tokens_is_rejected_with_a_reason(page, server):
    d = page
    box, err = by_id(d, "max-tokens"), by_id(d, "max-tokens-error")
    for bad, why in (("abc", "not a whole number"), ("1.5", "not a whole number"), ("0", "at least 1")):
        box.clear()
        box.send_keys(bad)
        by_id(d, "chat-input").clear()
        by_id(d, "chat-input").send_keys("Where?")
        by_id(d, "send-btn").click()
        WebDriverWait(d, 10).until(lambda d, w=why: w in err.text)
        assert bad in err.text and box.get_attribute("aria-invalid") == "true"
        assert "max tokens" in by_id(d, "chat-status").text
    assert server.rec.chats == [] and not d.find_elements(By.CSS_SELECTOR, "#messages .msg")
    box.clear()
    box.send_keys("3")
    assert err.text == "" and box.get_attribute("aria-invalid") == "false"
    by_id(d, "send-btn").click()
    wait_done(d, "answer-1")
    assert [b["max_tokens"] for b in server.rec.chats] == [3]


def test_delete_asks_for_confirmation(page, server):
    d = page
    doc_id = new_doc(server, "precious")
    by_id(d, "refresh-docs-btn").click()
    delete = WebDriverWait(d, 20).until(lambda d: d.find_element(By.CSS_SELECTOR, f"#doc-list input[value='{doc_id}']"
                                                                                   " ~ button"))
    delete.click()
    alert = WebDriverWait(d, 10).until(lambda d: d.switch_to.alert)
    assert "precious" in alert.text and "stored files" in alert.text
    alert.dismiss()
    WebDriverWait(d, 10).until(lambda d: "kept" in by_id(d, "doc-status").text)
    assert server.client.get(f"/v1/documents/{doc_id}").status_code == 200  # dismissed: nothing deleted
    d.find_element(By.CSS_SELECTOR, f"#doc-list input[value='{doc_id}'] ~ button").click()
    WebDriverWait(d, 10).until(lambda d: d.switch_to.alert).accept()
    WebDriverWait(d, 20).until(lambda d: not d.find_elements(By.CSS_SELECTOR, f"#doc-list input[value='{doc_id}']"))
    assert server.client.get(f"/v1/documents/{doc_id}").status_code == 404


def test_upload_shows_elapsed_time_and_can_be_cancelled(page, server):
    d = page
    server.rec.hold_uploads = True  # the upload stays pending until the page gives up on it
    by_id(d, "doc-text").send_keys(DOC)
    by_id(d, "internalize-btn").click()
    cancel, elapsed = by_id(d, "cancel-upload-btn"), by_id(d, "upload-elapsed-text")
    WebDriverWait(d, 20).until(lambda d: cancel.is_displayed() and re.fullmatch(r"\d+\.\d s", elapsed.text))
    first = elapsed.text
    WebDriverWait(d, 20).until(lambda d: elapsed.text != first)  # the clock runs
    assert not by_id(d, "internalize-btn").is_enabled() and "internalizing" in by_id(d, "doc-status").text
    assert server.rec.uploads == ["held"]
    cancel.click()
    WebDriverWait(d, 10).until(lambda d: "cancelled" in by_id(d, "doc-status").text)
    assert not cancel.is_displayed() and by_id(d, "internalize-btn").is_enabled()
    WebDriverWait(d, 10).until(lambda d: server.rec.uploads == ["disconnected"])  # the request really went away
    js(d, "onUploadProgress(2, 5)")  # the hook for the server's progress reports
    bar = by_id(d, "upload-progress")
    assert bar.is_displayed() and bar.get_attribute("value") == "2" and bar.get_attribute("max") == "5"


RECORD_PROGRESS = """window.__progress = [];
    const orig = window.onUploadProgress;
    window.onUploadProgress = (done, total) => { window.__progress.push([done, total]); orig(done, total); };"""


def test_upload_progress_reaches_done_and_cancel_deletes_on_the_server(page, server, model):
    d = page
    long_doc = " ".join([DOC] * 6)  # many chunks of max_chunk_len=24 tokens
    js(d, RECORD_PROGRESS)
    by_id(d, "doc-text").send_keys(long_doc)
    by_id(d, "internalize-btn").click()
    WebDriverWait(d, 60).until(lambda d: "internalized in" in by_id(d, "doc-status").text)
    calls = js(d, "return window.__progress")
    totals = {t for _, t in calls if t > 0}
    assert len(totals) == 1 and totals.pop() >= 3, calls  # one document of several chunks
    n = max(t for _, t in calls)
    assert [n, n] in calls, calls  # the bar reached done
    seen = [c for c, t in calls if t > 0]
    assert seen == sorted(seen), calls  # never goes backwards
    doc_id = by_id(d, "doc-status").get_attribute("data-doc-id")
    assert server.client.get(f"/v1/documents/{doc_id}").json()["chunks"] == n

    # cancel: the encoder is held (the model's decoder lock), so the upload is still running when Cancel is pressed
    js(d, RECORD_PROGRESS)
    by_id(d, "doc-text").clear()
    by_id(d, "doc-text").send_keys(long_doc.replace("fox", "owl"))
    before = {x["id"] for x in server.client.get("/v1/documents").json()["data"]}
    with model_lock(decoder_of(model.base_model)).exclusive():
        by_id(d, "internalize-btn").click()
        WebDriverWait(d, 30).until(lambda d: "chunk(s)" in by_id(d, "doc-status").text)  # acknowledged, polling
        assert by_id(d, "upload-progress").is_displayed()
        ups = [p for p in server.d2l.uploads._items.values() if p.finished is None]
        assert len(ups) == 1
        up_id = ups[0].doc_id
        by_id(d, "cancel-upload-btn").click()
        WebDriverWait(d, 20).until(lambda d: "cancelled" in by_id(d, "doc-status").text)
        prog = server.client.get(f"/v1/documents/{up_id}/progress").json()
        assert prog["status"] == "cancelled" and "DELETE" in prog["error"]  # the page's DELETE reached the server
    assert by_id(d, "internalize-btn").is_enabled() and not by_id(d, "cancel-upload-btn").is_displayed()
    WebDriverWait(d, 30).until(lambda d: server.client.get(f"/v1/documents/{up_id}/progress").json()["status"]
                               == "cancelled")
    assert server.client.get(f"/v1/documents/{up_id}").status_code == 404  # never stored
    assert {x["id"] for x in server.client.get("/v1/documents").json()["data"]} == before


def test_auto_scroll_follows_a_streaming_answer(page, server):
    d = page
    by_id(d, "max-tokens").clear()
    by_id(d, "max-tokens").send_keys("200")
    size(d, PHONE)  # the settings are behind the toggle now
    server.rec.throttle_s = 0.05
    js(d, "const s = document.createElement('div'); s.style.height = '3000px'; "
          "document.getElementById('messages').append(s);")  # earlier conversation, far taller than the screen
    n = ask(d, "Tell me a long story.")
    gap = "const m = document.getElementById('messages'); return m.scrollHeight - m.scrollTop - m.clientHeight;"
    seen = set()

    def grown(d):  # the answer's text once it differs from every text seen so far
        t = text_of(d.find_element(By.ID, f"answer-{n}"))
        return t if t and t not in seen else False

    fast = dict(timeout=30, poll_frequency=0.1)
    while len(seen) < 4:  # sample while tokens arrive: always at the bottom
        seen.add(WebDriverWait(d, **fast).until(grown))
        assert js(d, gap) <= 2
    js(d, "document.getElementById('messages').scrollTop = 0")  # the user scrolls up to read
    seen.add(text_of(by_id(d, f"answer-{n}")))
    WebDriverWait(d, **fast).until(grown)
    assert js(d, "return document.getElementById('messages').scrollTop") <= 2  # not yanked back down
    js(d, "stop()")  # no need to wait for the rest
    assert wait_done(d, f"answer-{n}").get_attribute("data-done") in ("1", "stopped")


def test_api_key_flow_loads_models_and_shows_errors(browser, model):
    app = create_app(model, api_key="sesame")
    name = app.state.d2l.model_name
    d = browser
    size(d, DESKTOP)
    with BackgroundServer(app) as srv:
        d.get(srv.url + "/")
        status = by_id(d, "api-status")
        WebDriverWait(d, 20).until(lambda d: "401" in status.text)  # no key: the refusal is shown
        assert "API key" in status.text and "error" in status.get_attribute("class")
        by_id(d, "chat-input").send_keys("Hello?")
        by_id(d, "send-btn").click()  # never a silent no-op
        WebDriverWait(d, 20).until(lambda d: "401" in by_id(d, "chat-status").text)
        key = by_id(d, "api-key")
        key.send_keys("wrong")
        by_id(d, "api-key-btn").click()
        WebDriverWait(d, 20).until(lambda d: "401" in status.text and "wrong API key" in status.text)
        assert name not in by_id(d, "model-name").text
        key.clear()
        key.send_keys("sesame\n")  # Enter in the key field connects too
        WebDriverWait(d, 20).until(lambda d: name in by_id(d, "model-name").text)
        assert "connected" in status.text and "error" not in status.get_attribute("class")
        with httpx.Client(base_url=srv.url, timeout=60, headers={"Authorization": "Bearer sesame"}) as c:
            doc_id = c.post("/v1/documents", json={"text": DOC, "name": "locked"}).json()["id"]
        by_id(d, "refresh-docs-btn").click()
        tick(d, doc_id)  # the document list loads with the key
        n = ask(d, "Where did the fox live?", max_tokens=4)
        ans = wait_done(d, f"answer-{n}")
        assert ans.get_attribute("data-done") == "1" and text_of(ans)
