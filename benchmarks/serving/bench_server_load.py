"""Load test of the document server (issue 9): 16 concurrent OpenAI clients, 16 distinct documents, on loopback.

    python -m pytest benchmarks/serving/bench_server_load.py --benchmark-only -q

The real server (``create_app`` + uvicorn on a free 127.0.0.1 port, in a background thread of this process, as
``d2l-fast serve`` runs it) with the real SmolLM2-135M-Instruct and a seeded random hypernetwork,
``D2LModel.from_base(base, tok, seed=0, latent_size=64, num_blocks=2, init_scaler_B=6)`` (fp32; the scaler makes
the adapters change the answers). Every client is a thread with its own official ``openai`` client; client k posts
document k (``POST /v1/documents``, untimed, all 16 at once: packed by the server) and asks question k about it
(``chat.completions``, greedy, ``max_tokens=32``, ``documents=[id_k]``).

Per round, adjacent on the same warm server: (b) the 16 requests one at a time (pytest-benchmark's untimed setup
of the round), then (a) the 16 requests at once, a barrier releasing the threads together (the timed call).
``D2L_BENCH_LOAD_ROUNDS`` rounds (default 2) after one untimed warm-up request. Measured per mode over all rounds:
aggregate generated tokens/s (completion tokens / wall time of the phase), p50/p99 request latency (client side,
``numpy.percentile``, linear interpolation), failed requests. Checked: every answer of both modes and every round,
stripped as ``generate_text`` strips, equals offline
``D2LModel.generate_text([question], internalize([document]), [0], max_new_tokens=32)`` (greedy, one row: no padding).
~5 min on the 2-core box under load (the offline answers ~1.5 min, each round ~1.5 min). When other jobs hold the
cores, run it with ``D2L_BENCH_THREADS=1``: two OpenMP threads on oversubscribed cores made internalize and decode
5-12x slower there.

Targets (issue 9): (a) ≥ 4x the aggregate tokens/s of (b); answers identical; zero failures; p99 ≤ 2x p50 in (a).
They are recorded (``targets`` in extra_info), not asserted, except the two correctness ones (no failure, no
differing answer), which fail the benchmark. The numbers also go to ``benchmarks/results/server_load_cpu.json``
(``D2L_BENCH_LOAD_JSON`` overrides the path; empty: not written). The 2-core CPU box is shared: the load average
and the CPU used by other processes during the rounds (``other_cores``) are recorded.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading
import time

import numpy as np
import pytest
import torch

from .._common import CpuMonitor

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

N_CLIENTS = 16
MAX_TOKENS = 32
ROUNDS = int(os.environ.get("D2L_BENCH_LOAD_ROUNDS", "2"))
INIT_SCALER_B = 6.0  # as bench_e2e's generation hypernet: the adapters visibly change the greedy answers
HYPERNET = dict(latent_size=64, num_blocks=2)
RESULTS = os.environ.get("D2L_BENCH_LOAD_JSON",
                         str(pathlib.Path(__file__).parents[1] / "results" / "server_load_cpu.json"))
TARGETS = "(a) >= 4x the tokens/s of (b); identical answers; zero failures; (a) p99 <= 2x p50"

# 16 short made-up documents and one question each (the answer is in the document)
DOCS = [
    ("The Harrow Bridge over the Lune river was finished in 1871. It has seven arches of grey granite, and a toll "
     "of one penny was charged until 1902.", "How many arches does the Harrow Bridge have?"),
    ("Mira Santos keeps bees on the roof of the Calder Street library. Her hives produce about forty jars of "
     "lavender honey every summer.", "Where does Mira Santos keep her bees?"),
    ("The research vessel Kestrel carries a crew of twelve and a small yellow submarine called Pip, which can dive "
     "to nine hundred metres.", "What is the name of the Kestrel's submarine?"),
    ("In the village of Tollesby the annual pumpkin contest was won by Arthur Benn, whose pumpkin weighed 312 "
     "kilograms.", "Who won the Tollesby pumpkin contest?"),
    ("The Orrin Observatory stands on Mount Casko at 2,400 metres. Its main telescope has a mirror of 1.8 metres "
     "and was built in Leiden.", "On which mountain is the Orrin Observatory?"),
    ("Quenby Tea Company sells a smoky black tea called Ember Road. It is blended from leaves grown in Assam and "
     "Yunnan.", "What is Quenby's smoky black tea called?"),
    ("The Fernhill chess club meets every Thursday evening in the back room of the Red Lion inn. Its champion is "
     "a retired postman named Walter Ike.", "On which day does the Fernhill chess club meet?"),
    ("Lake Varna freezes over most winters. In 1963 the ice was so thick that a bus drove across it from Osk to "
     "the island of Vel.", "What drove across Lake Varna in 1963?"),
    ("The robot vacuum Dustwise 3 has a battery that lasts ninety minutes and a bin that holds half a litre. It "
     "is sold in green and white.", "How long does the Dustwise 3 battery last?"),
    ("Captain Ilse Marr sailed the schooner Albatross around Cape Horn in 1911 with a cargo of copper and a "
     "parrot named Doctor.", "What was the name of the parrot on the Albatross?"),
    ("The bakery on Pell Lane opens at five in the morning. Its most popular loaf is a rye bread with caraway "
     "seeds, baked by Nora Quill.", "What time does the bakery on Pell Lane open?"),
    ("Glenmoor Castle has a library of 14,000 books and a ghost, the locals say, called the Grey Piper, who plays "
     "at midnight in October.", "How many books are in the Glenmoor Castle library?"),
    ("The Ostrander marathon starts at the harbour and ends at the old mill. The course record, 2 hours 9 "
     "minutes, belongs to Jonas Elm.", "Who holds the Ostrander marathon course record?"),
    ("Saltmarsh School has 340 pupils and a school orchestra of 45 players. Its head teacher is Ms Adaeze Obi.",
     "Who is the head teacher of Saltmarsh School?"),
    ("The Vantor 9 rocket is 42 metres tall and burns liquid methane. Its first flight, from Kiruna, carried a "
     "weather satellite.", "What fuel does the Vantor 9 rocket burn?"),
    ("Bellweather Farm grows purple carrots and raises Jacob sheep. The farm shop sells wool, eggs and carrot "
     "cake on Saturdays.", "What colour are the carrots grown at Bellweather Farm?"),
]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def load_model():
    from d2l_fast import D2LModel
    from d2l_fast.demo import load_smollm2

    base, tok = load_smollm2()
    with torch.no_grad():  # library initialisation outside the timing
        base(input_ids=torch.ones(1, 8, dtype=torch.long))
    return D2LModel.from_base(base, tok, seed=0, init_scaler_B=INIT_SCALER_B, **HYPERNET)


@pytest.fixture(scope="module")
def offline(load_model):
    """Greedy answers of the library itself, one (document, question) at a time (one row: no padding)."""
    model = load_model
    answers = []
    for doc, q in DOCS:
        answers.append(model.generate_text([q], model.internalize([doc]), [0], max_new_tokens=MAX_TOKENS)[0])
    base_answers = model.generate_text([q for _, q in DOCS[:4]], max_new_tokens=MAX_TOKENS)
    assert base_answers != answers[:4], "the adapters should change the answers (init_scaler_B too small?)"
    return answers


# ------------------------------------------------------------------------------------------- clients
class Client:
    """One simulated user: its own openai client, document and question."""

    def __init__(self, url: str, model_name: str, k: int):
        self.k, self.url = k, url
        self.model_name = model_name
        self.oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        self.doc_id = None

    def post_document(self) -> None:
        r = httpx.post(self.url + "/v1/documents", json={"text": DOCS[self.k][0], "name": f"doc{self.k}"}, timeout=600)
        r.raise_for_status()
        self.doc_id = r.json()["id"]

    def ask(self) -> dict:
        t = time.perf_counter()
        try:
            resp = self.oa.chat.completions.create(
                model=self.model_name, messages=[{"role": "user", "content": DOCS[self.k][1]}], max_tokens=MAX_TOKENS,
                temperature=0, extra_body={"documents": [self.doc_id]})
        except Exception as e:  # noqa: BLE001 - a failed request is counted, not raised
            return dict(k=self.k, ok=False, error=f"{type(e).__name__}: {e}", latency=time.perf_counter() - t)
        return dict(k=self.k, ok=True, text=resp.choices[0].message.content, tokens=resp.usage.completion_tokens,
                    latency=time.perf_counter() - t)


def run_concurrent(clients: list[Client]) -> dict:
    """All clients at once (threads released together by a barrier)."""
    results: list[dict | None] = [None] * len(clients)
    barrier = threading.Barrier(len(clients) + 1)

    def work(c: Client):
        barrier.wait()
        results[c.k] = c.ask()

    threads = [threading.Thread(target=work, args=(c,), name=f"client{c.k}") for c in clients]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    return dict(wall=time.perf_counter() - t0, results=results)


def run_sequential(clients: list[Client]) -> dict:
    """The same requests, one at a time."""
    t0 = time.perf_counter()
    results = [c.ask() for c in clients]
    return dict(wall=time.perf_counter() - t0, results=results)


def summarize(phases: list[dict]) -> dict:
    res = [r for p in phases for r in p["results"]]
    ok = [r for r in res if r["ok"]]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([float("nan")])
    tokens = sum(r["tokens"] for r in ok)
    wall = sum(p["wall"] for p in phases)
    return dict(requests=len(res), failed=len(res) - len(ok), completion_tokens=tokens,
                wall_s=round(wall, 3), tokens_per_s=round(tokens / wall, 2),
                latency_p50_s=round(float(np.percentile(lat, 50)), 3),
                latency_p99_s=round(float(np.percentile(lat, 99)), 3),
                latency_max_s=round(float(lat.max()), 3), latency_min_s=round(float(lat.min()), 3),
                tokens_per_s_per_round=[round(sum(r["tokens"] for r in p["results"] if r["ok"]) / p["wall"], 2)
                                        for p in phases],
                errors=sorted({r["error"][:200] for r in res if not r["ok"]}))


def mismatches(phases: list[dict], answers: list[str], mode: str) -> list[dict]:
    """Answers that differ from the offline ones (generate_text strips the answer; so is the server's here)."""
    return [dict(mode=mode, round=i, client=r["k"], server=r["text"], offline=answers[r["k"]])
            for i, p in enumerate(phases) for r in p["results"] if r["ok"] and r["text"].strip() != answers[r["k"]]]


# ------------------------------------------------------------------------------------------- benchmark
def test_server_load_16_clients(benchmark, env_info, load_model, offline):
    from d2l_fast.serving import BackgroundServer, create_app

    model = load_model
    load_start = os.getloadavg()
    app = create_app(model)
    srv = app.state.d2l
    with BackgroundServer(app) as server:
        clients = [Client(server.url, srv.model_name, k) for k in range(N_CLIENTS)]
        t = time.perf_counter()
        posters = [threading.Thread(target=c.post_document) for c in clients]
        for th in posters:
            th.start()
        for th in posters:
            th.join()
        post_s = time.perf_counter() - t
        assert all(c.doc_id for c in clients), "a document post failed"
        clients[0].ask()  # warm-up (untimed): first chat template / tokenizer / forward of the server
        conc, seq = [], []
        cpu = CpuMonitor()

        def one_at_a_time():
            cpu.start()
            seq.append(run_sequential(clients))
            cpu.stop()

        def concurrent():
            cpu.start()
            conc.append(run_concurrent(clients))
            cpu.stop()

        benchmark.pedantic(concurrent, setup=one_at_a_time, rounds=ROUNDS, warmup_rounds=0, iterations=1)
        engine = dict(steps=srv.engine.steps, max_rows_seen=srv.engine.max_rows_seen,
                      joins_mid_batch=srv.engine.joins_mid_batch, internalize_calls=list(srv.batcher.call_sizes))
    a, b = summarize(conc), summarize(seq)
    bad = mismatches(conc, offline, "concurrent") + mismatches(seq, offline, "one_at_a_time")
    speedup = a["tokens_per_s"] / b["tokens_per_s"]
    p99_p50 = a["latency_p99_s"] / a["latency_p50_s"]
    info = dict(
        env_info, date=time.strftime("%Y-%m-%d %H:%M"), model="SmolLM2-135M-Instruct fp32",
        hypernet=dict(HYPERNET, init_scaler_B=INIT_SCALER_B),
        clients=N_CLIENTS, distinct_documents=len(DOCS), max_tokens=MAX_TOKENS, rounds=ROUNDS,
        concurrent=a, one_at_a_time=b, speedup_tokens_per_s=round(speedup, 2),
        concurrent_p99_over_p50=round(p99_p50, 2),
        answers_checked=sum(len(p["results"]) for p in conc + seq), answer_mismatches=bad,
        documents_post_s=round(post_s, 3), engine=engine, loadavg_at_start=[round(x, 2) for x in load_start],
        loadavg_at_end=[round(x, 2) for x in os.getloadavg()], other_cores=cpu.other_cores,
        targets=dict(goal=TARGETS, speedup_ge_4x=speedup >= 4.0, answers_identical=not bad,
                     zero_failures=a["failed"] + b["failed"] == 0, p99_le_2x_p50=p99_p50 <= 2.0),
    )
    benchmark.extra_info.update(info)
    if RESULTS:
        pathlib.Path(RESULTS).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(RESULTS).write_text(json.dumps(info, indent=2) + "\n")
    assert a["failed"] == 0 and b["failed"] == 0, (a["errors"], b["errors"])
    assert not bad, f"{len(bad)} answers differ from offline generate_text: {bad[:3]}"
