"""Prometheus metrics of one server (``GET /metrics``), kept in a registry of its own (several apps per process).

Request counts and latencies by route template, method and status; time to first token; generated and prompt
tokens; each finished completion's decode speed; the decode queue (waiting requests) and running rows; documents
stored and resident; adapter memory; uploads in progress; internalize seconds, documents and tokens; how often
an encoder pass handed the model over to waiting decode steps. Needs ``prometheus_client`` (the ``serve`` extra).
"""

from __future__ import annotations

import time

from ..concurrency import model_lock
from ..hf import decoder_of

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def available() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class ServerMetrics:
    """The metrics of the :class:`~d2l_fast.serving.server.DocumentServer` ``srv``; ``render()`` is the
    exposition text."""

    def __init__(self, srv):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("d2l_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("d2l_http_request_duration_seconds", "time until the response starts (streams: "
                                 "until the headers)", ["route", "method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("d2l_time_to_first_token_seconds", "request arrival to its first generated text",
                              ["kind"], buckets=_LATENCY_BUCKETS, registry=r)
        self.generated = Counter("d2l_generated_tokens", "completion tokens generated", registry=r)
        self.prompt = Counter("d2l_prompt_tokens", "prompt tokens of finished completions", registry=r)
        self.tps = Histogram("d2l_request_tokens_per_second", "completion tokens per second of decoding, per request",
                             buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r)
        self.completions = Counter("d2l_completions", "finished completions by finish reason", ["finish_reason"],
                                   registry=r)
        self.internalize_s = Histogram("d2l_internalize_seconds", "wall time of the packed internalize call a "
                                       "document was part of", buckets=_LATENCY_BUCKETS, registry=r)
        self.internalized_docs = Counter("d2l_internalized_documents", "documents internalized", registry=r)
        self.internalized_tokens = Counter("d2l_internalized_tokens", "templated document tokens internalized",
                                           registry=r)
        eng, store = srv.engine, srv.store
        lock = model_lock(decoder_of(srv.model.base_model))
        gauges = {
            "d2l_queue_depth": ("requests waiting to join the decode batch", lambda: len(eng._waiting)),
            "d2l_running_rows": ("rows in the decode batch", lambda: len(eng._rows)),
            "d2l_requests_in_flight": ("requests waiting or running", lambda: eng.in_flight),
            "d2l_documents_stored": ("documents in the store", lambda: len(store)),
            "d2l_documents_resident": ("documents whose adapter is in memory", lambda: store.resident_count),
            "d2l_adapter_memory_bytes": ("bytes of the adapters in memory", lambda: store.resident_bytes),
            "d2l_adapter_memory_budget_bytes": ("the adapter memory budget", lambda: store.memory_bytes),
            "d2l_uploads_in_progress": ("documents being internalized", lambda: srv.uploads.active()),
            "d2l_encoder_handovers": ("times an encoder pass let waiting forwards run (counter)",
                                      lambda: lock.handovers),
            "d2l_decode_steps": ("batched decode steps (counter)", lambda: eng.steps),
            "d2l_heap_trims": ("times the idle server gave freed C-heap memory back to the OS (counter)",
                               lambda: srv.heap.trims),
        }
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(fn)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def observe_internalized(self, tokens: int, seconds: float) -> None:
        self.internalized_docs.inc()
        self.internalized_tokens.inc(tokens)
        self.internalize_s.observe(seconds)

    def observe_completion(self, kind: str, req, t_arrival: float, t_first: float | None) -> None:
        now = time.perf_counter()
        n = len(req.out_ids)
        self.generated.inc(n)
        self.prompt.inc(len(req.prompt_ids))
        if req.finish_reason:
            self.completions.labels(req.finish_reason).inc()
        if t_first is not None:
            self.ttft.labels(kind).observe(t_first - t_arrival)
            if n > 1 and now > t_first:
                self.tps.observe((n - 1) / (now - t_first))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["ServerMetrics", "available"]
