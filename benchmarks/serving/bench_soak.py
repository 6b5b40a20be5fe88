"""Soak test of the document server (issue 17, item 8): mixed traffic for a bounded time against one server with
``--store``, on loopback.

    D2L_SOAK_SECONDS=600 python -m pytest benchmarks/serving/bench_soak.py --benchmark-only -q -x -s

The real server (``create_app`` + uvicorn on a free 127.0.0.1 port in a background thread of this process, as
``d2l-fast serve`` runs it) with the real SmolLM2-135M-Instruct and the bundled ``smollm2-135m`` hypernetwork
(``d2l_fast.pretrained``), ``ServerSettings(store=<temp dir>, adapter_memory_mb=D2L_SOAK_ADAPTER_MB)`` (default
64 MiB: adapters beyond it are dropped from memory and reread from the store, so the cache is full after the
warm-up instead of growing into the default 1 GiB budget). ``N_THREADS`` client threads, each with its own official
``openai`` client and seeded random stream of actions: uploads of 100-5,000 tokens of varied filler, deletes of
acknowledged documents, non-streamed and streamed chats with 1-3 documents, streamed chats abandoned after two
chunks (the response is closed: a client disconnect), and malformed requests that must be answered 4xx.

Phases: a fixed probe (greedy chat about a fixed document, never deleted) → coverage (every first-time
allocation once: uploads of ``COVER_SIZES`` tokens one by one, then ``N_THREADS`` uploads of the largest size at
once; ``N_THREADS`` streamed chats with 3 documents at once; chats with 1, 2 and 3 documents; an abandoned stream;
each malformed request; a delete) → random warm-up (``WARMUP_FRACTION`` of the duration) → settle, memory
snapshot → the rest of the duration (or until ``D2L_SOAK_MAX_REQUESTS`` requests), RSS sampled every second (the
peak) → settle, memory snapshot → the probe again → server stopped, a new app over the same store: every
acknowledged, not deleted document is listed and answers a one-token chat; the probe a third time. Settle: ``IDLE_S``
idle seconds (the server trims its heap itself when idle) and ``gc.collect()``; a snapshot is the RSS and what
explains it (glibc heap in use / free / mmapped, the bytes of live CPU tensors, the adapters resident in the
store, the records kept), and the RSS after one more ``malloc_trim(0)`` by the harness.

Contract (asserted, :func:`contract_failures`): RSS at the end within 10 % of its level after warm-up (both
settled); no 5xx and no transport error (other than the abandoned streams, closed by the client); every 4xx is an
expected one (malformed requests; a chat whose document another thread deleted meanwhile, 404); every acknowledged
document back after the restart; the probe's answer unchanged. The peak RSS of the main phase is reported, not
asserted. Numbers in extra_info and ``benchmarks/results/soak_cpu.json`` (``D2L_SOAK_JSON`` overrides the path;
empty: not written), with the load average (the 2-core box is shared).
"""

from __future__ import annotations

import collections
import gc
import json
import os
import pathlib
import random
import threading
import time
import warnings

import pytest
import torch

from .._common import RssSampler, malloc_stats_mb, malloc_trim, proc_status_kb

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SECONDS = float(os.environ.get("D2L_SOAK_SECONDS", "600"))
MAX_REQUESTS = int(os.environ.get("D2L_SOAK_MAX_REQUESTS", "5000"))
ADAPTER_MB = float(os.environ.get("D2L_SOAK_ADAPTER_MB", "64"))
SERVER_TRIM = os.environ.get("D2L_SOAK_SERVER_TRIM", "1") != "0"  # 0: the server never trims its heap (A/B)
N_THREADS = 3
WARMUP_FRACTION = 0.2
IDLE_S = 8.0  # > the server's HeapTrimmer settle_s + min_interval_s
COVER_SIZES = (100, 1000, 2500, 5000)  # upload sizes of the coverage pass (tokens)
MAX_TOKENS = 12
RSS_TOLERANCE = 0.10
RESULTS = os.environ.get("D2L_SOAK_JSON", str(pathlib.Path(__file__).parents[1] / "results" / "soak_cpu.json"))
# action -> weight of the random mix
MIX = {"upload": 3, "delete": 1, "chat": 2, "stream": 2, "abandon": 1, "malformed": 1}

PROBE_DOC = ("The lighthouse on Skerry Point was built in 1887 by the engineer Agnes Rowe. Its lamp is visible for "
             "twenty-two nautical miles, and its keeper's cat is called Barnacle.")
PROBE_Q = "What is the name of the keeper's cat?"
NAMES = ["Ines Varga", "Tomas Hale", "Ruth Okafor", "Pell Danner", "Mina Sato", "Olek Brandt", "Yara Nunez"]
PLACES = ["Orla", "Tessel", "Brackwater", "Kell", "Sundby", "Marrow Hill", "Ostend Lane", "Varn"]
THINGS = ["pears", "copper wire", "wool", "barley", "lamp oil", "slate", "herring", "violins"]
TEMPLATES = [
    "The ferry to {p} leaves at {h} o'clock from pier {k}, and its captain, {n}, logs the weather in a green book.",
    "In year {y} the market of {p} sold {k} crates of {t}, most of them to the shops on Mill Road.",
    "Station {k} of the northern railway near {p} was painted blue in {y}, after a vote of the town council.",
    "{n} repaired the clock tower of {p} in {y}; it has run {h} minutes fast ever since.",
    "A storm in {y} sank {k} boats carrying {t} off the coast of {p}, and {n} wrote a song about it.",
]
MALFORMED = [  # (path, raw body): each must be answered 4xx
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", json.dumps({"model": "x", "messages": "hello"}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                         "documents": ["doc-does-not-exist"]}).encode()),
    ("/v1/documents", json.dumps({"text": 5}).encode()),
    ("/v1/documents", b"[1, 2, 3]"),
]


def make_document(tokenizer, rng: random.Random, n_tokens: int) -> str:
    """Varied filler of about ``n_tokens`` tokens (checked every 8 sentences; overshoots by < 8 sentences)."""
    parts: list[str] = []
    while True:
        parts.append(rng.choice(TEMPLATES).format(p=rng.choice(PLACES), n=rng.choice(NAMES), t=rng.choice(THINGS),
                                                  h=rng.randint(1, 12), k=rng.randint(2, 900),
                                                  y=rng.randint(1700, 2020)))
        if len(parts) % 8 == 0 and len(tokenizer(" ".join(parts))["input_ids"]) >= n_tokens:
            return " ".join(parts)


def live_tensor_mb() -> float:
    """MiB of the distinct storages of the live CPU tensors that the garbage collector tracks (model included)."""
    seen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some deprecated torch module attributes warns
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                try:
                    st = o.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
                except (RuntimeError, NotImplementedError):  # no real storage (fake / meta / traced tensors)
                    continue
    return round(sum(seen.values()) / 2**20, 1)


def memory_snapshot(srv) -> dict:
    """Settle (``IDLE_S`` idle: the server gives freed heap memory back itself once idle, :mod:`d2l_fast.serving.heap`;
    then ``gc``): ``rss_mb`` of this process (server + clients), what explains it, and ``rss_trimmed_mb`` after one
    more ``malloc_trim(0)`` by this harness (what the server's own trimming left to take)."""
    time.sleep(IDLE_S)
    gc.collect()
    rss = round(proc_status_kb("VmRSS") / 1024, 1)
    malloc_trim()
    return dict(rss_mb=rss, rss_trimmed_mb=round(proc_status_kb("VmRSS") / 1024, 1), heap_trims=srv.heap.trims,
                heap_trim_s=round(srv.heap.seconds, 3), malloc=malloc_stats_mb(),
                live_tensor_mb=live_tensor_mb(), adapters_resident_mb=round(srv.store.resident_bytes / 2**20, 1),
                documents_resident=srv.store.resident_count, documents_stored=len(srv.store),
                upload_records=len(srv.uploads._items), internalize_call_records=len(srv.batcher.call_sizes),
                engine_adapters=0 if srv.engine._ad is None else len(srv.engine._ad))


def contract_failures(info: dict, tolerance: float = RSS_TOLERANCE) -> list[str]:
    """What the soak's contract finds wrong in its results ``info`` (empty: it holds)."""
    bad = []
    if info["unexpected"]:
        bad.append(f"{len(info['unexpected'])} unexpected responses: {info['unexpected'][:5]}")
    w, e = info["rss_after_warmup_mb"], info["rss_end_mb"]
    if abs(e - w) > tolerance * w:
        bad.append(f"RSS {w} MB after warm-up -> {e} MB at the end ({100 * (e - w) / w:+.1f} %, limit "
                   f"{100 * tolerance:.0f} %)")
    if info["restart_missing"] or info["restart_unusable"]:
        bad.append(f"after the restart: missing {info['restart_missing'][:5]}, unusable {info['restart_unusable'][:5]}")
    probes = (info["probe_before"], info["probe_after"], info["probe_after_restart"])
    if len(set(probes)) != 1:
        bad.append(f"the probe's answer changed: {probes}")
    return bad


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def soak_model():
    from d2l_fast import pretrained
    from d2l_fast.zoo import PretrainedNotAvailableError

    try:
        return pretrained("smollm2-135m")
    except PretrainedNotAvailableError as e:
        pytest.skip(str(e))


# ------------------------------------------------------------------------------------------- traffic
class Soak:
    """Shared state of the client threads: acknowledged / deleted document ids and the counts."""

    def __init__(self, url: str, model_name: str, tokenizer, max_requests: int = MAX_REQUESTS):
        self.url, self.model_name, self.tokenizer = url, model_name, tokenizer
        self.max_requests = max_requests
        self.lock = threading.Lock()
        self.pool: list[str] = []  # acknowledged, not deleted, deletable
        self.acked: dict[str, int] = {}  # id -> tokens
        self.deleted: set[str] = set()
        self.status = collections.Counter()  # "action:code"
        self.unexpected: list[str] = []
        self.requests = 0
        self.abandoned = 0
        self.upload_tokens: list[int] = []

    def note(self, action: str, code, expected: bool = True, detail: str = "") -> None:
        with self.lock:
            self.requests += 1
            self.status[f"{action}:{code}"] += 1
            if not expected:
                self.unexpected.append(f"{action}:{code} {detail}"[:300])

    def pick_docs(self, rng: random.Random, k: int | None = None) -> list[str]:
        with self.lock:
            return rng.sample(self.pool, min(len(self.pool), k or rng.randint(1, 3)))

    # each action: one request
    def upload(self, rng, http, oa, n: int | None = None):
        n = n or rng.randint(100, 5000)
        text = make_document(self.tokenizer, rng, n)
        r = http.post(self.url + "/v1/documents", json={"text": text})
        self.note("upload", r.status_code, r.status_code == 200, r.text[:200])
        if r.status_code == 200:
            info = r.json()
            with self.lock:
                self.pool.append(info["id"])
                self.acked[info["id"]] = info.get("tokens", n)
                self.upload_tokens.append(info.get("tokens", n))

    def delete(self, rng, http, oa):
        with self.lock:
            if len(self.pool) < 4:
                return
            doc = self.pool.pop(rng.randrange(len(self.pool)))
            self.deleted.add(doc)
        r = http.delete(self.url + f"/v1/documents/{doc}")
        self.note("delete", r.status_code, r.status_code == 200, r.text[:200])

    def _chat(self, action, rng, oa, stream: bool, abandon: bool = False, k: int | None = None):
        docs = self.pick_docs(rng, k)
        if not docs:
            return
        q = rng.choice(["Who repaired the clock tower?", "What did the market sell?", "Summarize the document.",
                        "When does the ferry leave?"])
        try:
            resp = oa.chat.completions.create(model=self.model_name, messages=[{"role": "user", "content": q}],
                                              max_tokens=MAX_TOKENS if not abandon else 64, temperature=0,
                                              stream=stream, extra_body={"documents": docs})
            if stream:
                n = 0
                for _ in resp:
                    n += 1
                    if abandon and n >= 2:
                        resp.close()  # client disconnect mid-stream
                        with self.lock:
                            self.abandoned += 1
                        break
            self.note(action, 200)
        except openai.APIStatusError as e:
            with self.lock:
                gone = bool(set(docs) & self.deleted)
            # 404: another thread deleted one of the documents meanwhile
            self.note(action, e.status_code, e.status_code == 404 and gone, str(e)[:200])
        except openai.APIError as e:  # transport error
            self.note(action, type(e).__name__, False, str(e)[:200])

    def chat(self, rng, http, oa):
        self._chat("chat", rng, oa, stream=False)

    def stream(self, rng, http, oa):
        self._chat("stream", rng, oa, stream=True)

    def abandon(self, rng, http, oa):
        self._chat("abandon", rng, oa, stream=True, abandon=True)

    def malformed(self, rng, http, oa, request: tuple[str, bytes] | None = None):
        path, body = request or rng.choice(MALFORMED)
        r = http.post(self.url + path, content=body, headers={"content-type": "application/json"})
        self.note("malformed", r.status_code, 400 <= r.status_code < 500, f"{path} {body[:60]!r} -> {r.text[:120]}")

    def clients(self):
        return (httpx.Client(timeout=600),
                openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=600))

    def together(self, action, seed: int, **kw) -> None:
        """``action`` from ``N_THREADS`` threads at once (each with its own clients): the largest batches."""
        def one(i):
            http, oa = self.clients()
            with http:
                action(random.Random(seed * 100 + i), http, oa, **kw)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(N_THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    def cover(self, seed: int = 0) -> None:
        """Every first-time allocation once, before the warm-up: upload sizes, packed-call and decode-batch shapes,
        each chat kind, an abandoned stream, each malformed request, a delete."""
        rng = random.Random(seed)
        http, oa = self.clients()
        with http:
            for n in COVER_SIZES:
                self.upload(rng, http, oa, n=n)
            self.together(self.upload, seed, n=COVER_SIZES[-1])  # the largest packed internalize call
            self.together(lambda r, h, o: self._chat("stream", r, o, stream=True, k=3), seed)  # 3 rows x 3 docs
            for k in (1, 2, 3):
                self._chat("chat", rng, oa, stream=False, k=k)
            self.abandon(rng, http, oa)
            for request in MALFORMED:
                self.malformed(rng, http, oa, request)
            self.delete(rng, http, oa)

    def run(self, seed: int, until: float) -> None:
        rng = random.Random(seed)
        actions, weights = zip(*MIX.items())
        http, oa = self.clients()
        with http:
            while time.monotonic() < until and self.requests < self.max_requests:
                action = rng.choices(actions, weights)[0]
                try:
                    getattr(self, action)(rng, http, oa)
                except httpx.HTTPError as e:
                    self.note(action, type(e).__name__, False, str(e)[:200])

    def phase(self, seconds: float, seed: int) -> float:
        until = time.monotonic() + seconds
        t0 = time.perf_counter()
        threads = [threading.Thread(target=self.run, args=(seed * 100 + i, until), name=f"soak{i}")
                   for i in range(N_THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.perf_counter() - t0


def probe(url: str, model_name: str, doc_id: str) -> str:
    oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    r = oa.chat.completions.create(model=model_name, messages=[{"role": "user", "content": PROBE_Q}], max_tokens=24,
                                   temperature=0, extra_body={"documents": [doc_id]})
    return r.choices[0].message.content


def restart_check(model, settings, acked: set[str], probe_id: str) -> dict:
    """A new app over the same store: every acknowledged document listed and usable; the probe's answer."""
    from d2l_fast.serving import BackgroundServer, create_app

    app = create_app(model, settings)
    with BackgroundServer(app) as server:
        name = app.state.d2l.model_name
        listed = {d["id"] for d in httpx.get(server.url + "/v1/documents", timeout=600).json()["data"]}
        missing = sorted(acked - listed)
        oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        unusable = []
        for doc in sorted(acked & listed):
            try:
                oa.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                           temperature=0, extra_body={"documents": [doc]})
            except openai.APIError as e:
                unusable.append(f"{doc}: {e}"[:200])
        answer = probe(server.url, name, probe_id)
    return dict(listed=len(listed), missing=missing, unusable=unusable, probe=answer)


# ------------------------------------------------------------------------------------------- benchmark
def test_soak_mixed_traffic(benchmark, env_info, soak_model, tmp_path):
    from d2l_fast.serving import BackgroundServer, ServerSettings, create_app

    model = soak_model
    settings = ServerSettings(store=str(tmp_path / "store"), adapter_memory_mb=ADAPTER_MB)
    load_start = os.getloadavg()
    out: dict = {}

    def soak():
        app = create_app(model, settings)
        srv = app.state.d2l
        srv.heap.enabled = SERVER_TRIM
        with BackgroundServer(app) as server:
            name = srv.model_name
            r = httpx.post(server.url + "/v1/documents", json={"text": PROBE_DOC, "name": "probe"}, timeout=600)
            r.raise_for_status()
            out["probe_id"] = probe_id = r.json()["id"]
            out["probe_before"] = probe(server.url, name, probe_id)
            s = out["soak"] = Soak(server.url, name, model.tokenizer)
            t0 = time.perf_counter()
            s.cover()
            out["cover_s"], out["cover_requests"] = time.perf_counter() - t0, s.requests
            out["warmup_s"] = s.phase(SECONDS * WARMUP_FRACTION, seed=1)
            out["warmup_requests"] = s.requests
            out["after_warmup"] = memory_snapshot(srv)
            sampler = RssSampler().start()
            try:
                out["main_s"] = s.phase(SECONDS * (1 - WARMUP_FRACTION), seed=2)
            finally:
                sampler.stop()
            out["sampler"] = sampler
            out["end"] = memory_snapshot(srv)
            out["probe_after"] = probe(server.url, name, probe_id)
            out["hwm_mb"] = round(proc_status_kb("VmHWM") / 1024, 1)
        del app, srv

    benchmark.pedantic(soak, rounds=1, warmup_rounds=0, iterations=1)
    s: Soak = out["soak"]
    acked = (set(s.acked) - s.deleted) | {out["probe_id"]}
    load_soak_end = os.getloadavg()
    restart = restart_check(model, settings, acked, out["probe_id"])
    codes = collections.Counter()
    for k, v in s.status.items():
        codes[k.split(":", 1)[1]] += v
    w, e, sampler = out["after_warmup"]["rss_mb"], out["end"]["rss_mb"], out["sampler"]
    info = dict(
        env_info, date=time.strftime("%Y-%m-%d %H:%M"), model="SmolLM2-135M-Instruct fp32 + pretrained smollm2-135m",
        seconds_requested=SECONDS, max_requests=MAX_REQUESTS, client_threads=N_THREADS, mix=MIX,
        max_tokens=MAX_TOKENS, adapter_memory_mb=ADAPTER_MB, server_trim=SERVER_TRIM, idle_s=IDLE_S,
        cover_sizes=COVER_SIZES,
        cover_s=round(out["cover_s"], 1), cover_requests=out["cover_requests"], warmup_s=round(out["warmup_s"], 1),
        warmup_requests=out["warmup_requests"], main_s=round(out["main_s"], 1), requests=s.requests,
        main_requests=s.requests - out["warmup_requests"], status_by_action=dict(sorted(s.status.items())),
        status_codes=dict(sorted(codes.items())), unexpected=s.unexpected, abandoned_streams=s.abandoned,
        uploads=len(s.upload_tokens), upload_tokens_min=min(s.upload_tokens, default=None),
        upload_tokens_max=max(s.upload_tokens, default=None), upload_tokens_total=sum(s.upload_tokens),
        deleted=len(s.deleted), acknowledged_kept=len(acked),
        rss_after_warmup_mb=w, rss_end_mb=e, rss_growth_pct=round(100 * (e - w) / w, 2),
        rss_peak_main_mb=round(sampler.peak_mb, 1), rss_peak_growth_pct=round(100 * (sampler.peak_mb - w) / w, 2),
        rss_hwm_whole_run_mb=out["hwm_mb"], rss_tolerance_pct=100 * RSS_TOLERANCE,
        memory_after_warmup=out["after_warmup"], memory_end=out["end"], rss_series_main=sampler.series,
        probe_before=out["probe_before"], probe_after=out["probe_after"], probe_after_restart=restart["probe"],
        restart_listed=restart["listed"], restart_missing=restart["missing"], restart_unusable=restart["unusable"],
        loadavg_at_start=[round(x, 2) for x in load_start], loadavg_at_soak_end=[round(x, 2) for x in load_soak_end],
    )
    benchmark.extra_info.update(info)
    if RESULTS:
        pathlib.Path(RESULTS).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(RESULTS).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in ("requests", "status_codes", "rss_after_warmup_mb", "rss_peak_main_mb",
                                           "rss_end_mb", "rss_growth_pct", "acknowledged_kept", "restart_missing",
                                           "probe_before", "probe_after_restart")}))
    failures = contract_failures(info)
    assert not failures, failures
