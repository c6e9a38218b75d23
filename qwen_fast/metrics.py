"""Prometheus metrics of the HTTP server (``GET /metrics``; needs ``prometheus_client``, part of
the server extra).

Each app has its own registry (two servers in one process never mix their counts). Names follow
Prometheus' conventions (``_seconds``, ``_total``); the engine's state is read when scraped,
from ``Engine.stats()``, so a gauge is never stale:

======================================================  =====================================
qwen_fast_http_requests_total{endpoint,method,status}    every HTTP response (unknown paths
                                                         counted as endpoint="other")
qwen_fast_time_to_first_token_seconds                    submit -> first sampled token
qwen_fast_inter_token_latency_seconds                    between two sampled tokens of a request
qwen_fast_e2e_request_latency_seconds                    submit -> last token (or cancellation)
qwen_fast_request_queue_time_seconds                     submit -> first admitted to the batch
qwen_fast_prompt_tokens_total                            prompt tokens of finished requests
qwen_fast_generation_tokens_total                        tokens they sampled (stop tokens too)
qwen_fast_request_finished_total{finish_reason}          stop / length / abort / error
qwen_fast_requests_rejected_total{reason}                overloaded (queue full), timeout
qwen_fast_num_requests_running / _waiting / _preempted   the batch and the queue now
qwen_fast_kv_pages_total / _used / _free / _cached       the paged KV pool now
qwen_fast_preemptions_total                              requests preempted (recomputed later)
qwen_fast_prefix_cache_hits_total                        requests that started from cached pages
qwen_fast_prefix_cache_hit_tokens_total                  prompt tokens those pages spared
======================================================  =====================================
"""
from __future__ import annotations

from typing import Iterable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["ServerMetrics", "CONTENT_TYPE_LATEST"]

# Latency buckets: a CPU decode step is 10-100 ms, a long prefill seconds, a request minutes.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector:
    """The engine's queue, batch and page pool, read at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self) -> Iterable:
        s = self.engine.stats()
        for name, key, doc in (
                ("num_requests_running", "running", "Requests in the batch now."),
                ("num_requests_waiting", "waiting", "Requests waiting for a batch row now "
                                                    "(preempted ones included)."),
                ("num_requests_preempted", "preempted", "Waiting requests that were preempted and "
                                                        "will be recomputed."),
                ("kv_pages_total", "kv_pages_total", "Pages of the paged KV cache."),
                ("kv_pages_used", "kv_pages_used", "KV pages held by requests."),
                ("kv_pages_free", "kv_pages_free", "KV pages a request can take now (free, or "
                                                   "cached and held by nobody)."),
                ("kv_pages_cached", "kv_pages_cached", "KV pages indexed by the prefix cache.")):
            yield GaugeMetricFamily("qwen_fast_" + name, doc, value=s[key])
        for name, key, doc in (
                ("preemptions", "preemptions", "Requests preempted to free KV pages."),
                ("prefix_cache_hits", "prefix_cache_hits", "Requests admitted with prompt pages "
                                                           "found in the prefix cache."),
                ("prefix_cache_hit_tokens", "prefix_cache_hit_tokens", "Prompt tokens the prefix "
                                                                       "cache supplied."),
                ("engine_steps", "steps", "Forward steps planned.")):
            yield CounterMetricFamily("qwen_fast_" + name, doc, value=s[key])


class ServerMetrics:
    """The metrics of one app; ``observe_request`` is called once per finished engine request,
    from any thread (prometheus_client's metrics are thread-safe)."""

    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("qwen_fast_http_requests", "HTTP responses by endpoint, method "
                                     "and status.", ["endpoint", "method", "status"], registry=r)
        self.ttft = Histogram("qwen_fast_time_to_first_token_seconds", "Time from submission to the "
                              "first sampled token.", buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("qwen_fast_inter_token_latency_seconds", "Time between two sampled "
                             "tokens of one request.", buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("qwen_fast_e2e_request_latency_seconds", "Time from submission to "
                             "the request's end.", buckets=_E2E_BUCKETS, registry=r)
        self.queue = Histogram("qwen_fast_request_queue_time_seconds", "Time from submission to "
                               "admission to the batch (the wait for a row).",
                               buckets=_TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qwen_fast_prompt_tokens", "Prompt tokens of finished "
                                     "requests.", registry=r)
        self.generation_tokens = Counter("qwen_fast_generation_tokens", "Tokens sampled by "
                                         "finished requests.", registry=r)
        self.finished = Counter("qwen_fast_request_finished", "Engine requests by how they "
                                "ended.", ["finish_reason"], registry=r)
        self.rejected = Counter("qwen_fast_requests_rejected", "Requests refused or dropped "
                                "before an answer: overloaded (queue full), timeout (deadline).",
                                ["reason"], registry=r)
        self.spec_draft = Counter("qwen_fast_spec_decode_num_draft_tokens", "Draft tokens "
                                  "verified by prompt-lookup speculation (finished requests).",
                                  registry=r)
        self.spec_accepted = Counter("qwen_fast_spec_decode_num_accepted_tokens", "Of them, the "
                                     "tokens that were output.", registry=r)
        for reason in ("stop", "length", "abort", "error"):
            self.finished.labels(reason)
        for reason in ("overloaded", "timeout"):
            self.rejected.labels(reason)
        r.register(_EngineCollector(engine))

    def observe_request(self, req, finish_reason: Optional[str]) -> None:
        """Timings and token counts of a finished engine Request (qwen_fast.request.Request)."""
        if req is None:
            return
        self.finished.labels(finish_reason or "abort").inc()
        self.prompt_tokens.inc(len(req.prompt_ids))
        times = list(req.t_tokens)
        self.generation_tokens.inc(len(times))
        spec = getattr(req, "spec", None)
        if spec is not None:
            self.spec_draft.inc(spec.drafted)
            self.spec_accepted.inc(spec.accepted)
        end = req.t_done if req.t_done is not None else (times[-1] if times else None)
        if req.t_admitted is not None:
            self.queue.observe(max(0.0, req.t_admitted - req.t_submit))
        if end is not None:
            self.e2e.observe(max(0.0, end - req.t_submit))
        if times:
            self.ttft.observe(max(0.0, times[0] - req.t_submit))
            for a, b in zip(times, times[1:]):
                self.itl.observe(b - a)

    def render(self) -> bytes:
        return generate_latest(self.registry)
