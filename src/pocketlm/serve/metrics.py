"""Prometheus metrics under llama.cpp's names (so its dashboards work), plus TTFT / inter-token histograms
and pocketlm's own counters (escalations, rejected requests). One registry per server."""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self.prompt_tokens = Counter("llamacpp:prompt_tokens", "Number of prompt tokens processed.", registry=r)
        self.prompt_seconds = Counter("llamacpp:prompt_seconds", "Prompt process time", registry=r)
        self.tokens_predicted = Counter("llamacpp:tokens_predicted", "Number of generation tokens processed.",
                                        registry=r)
        self.predicted_seconds = Counter("llamacpp:tokens_predicted_seconds", "Predict process time", registry=r)
        self.n_decode = Counter("llamacpp:n_decode", "Total number of llama_decode() calls", registry=r)
        self.prompt_tps = Gauge("llamacpp:prompt_tokens_seconds", "Average prompt throughput in tokens/s.",
                                registry=r)
        self.predicted_tps = Gauge("llamacpp:predicted_tokens_seconds", "Average generation throughput in tokens/s.",
                                   registry=r)
        self.busy_per_decode = Gauge("llamacpp:n_busy_slots_per_decode", "Average number of busy slots per decode.",
                                     registry=r)
        self.kv_ratio = Gauge("llamacpp:kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage.",
                              registry=r)
        self.kv_tokens = Gauge("llamacpp:kv_cache_tokens", "KV-cache tokens.", registry=r)
        self.processing = Gauge("llamacpp:requests_processing", "Number of requests processing.", registry=r)
        self.deferred = Gauge("llamacpp:requests_deferred", "Number of requests deferred.", registry=r)
        self.ttft = Histogram("pocketlm:time_to_first_token_seconds", "From request arrival to its first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pocketlm:inter_token_latency_seconds", "Between two tokens of one request.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("pocketlm:requests", "Finished requests by outcome.", ["outcome"], registry=r)
        self.escalations = Counter("pocketlm:escalations", "Requests sent to the --escalate-to server, by outcome "
                                   "(ok, fallback: answered locally after the remote failed).", ["outcome"], registry=r)
        self.candidate = Counter("pocketlm:candidate_requests", "Requests the --canary / --shadow candidate answered, "
                                 "by role (canary: its answer was sent; shadow: compared only) and agreement with "
                                 "the incumbent (match, differ; skipped: its queue was full; error).",
                                 ["role", "agreement"], registry=r)
        self._busy_sum = 0
        self._decodes = 0
        self._prompt = [0, 0.0]
        self._predicted = [0, 0.0]

    # called by the engine thread
    def prompt(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens.inc(tokens)
            self.prompt_seconds.inc(seconds)
            self._prompt[0] += tokens
            self._prompt[1] += seconds
            self.prompt_tps.set(self._prompt[0] / max(self._prompt[1], 1e-9))

    def decode(self, busy: int, seconds: float) -> None:
        with self._lock:
            self.n_decode.inc()
            self.tokens_predicted.inc(busy)
            self.predicted_seconds.inc(seconds)
            self._decodes += 1
            self._busy_sum += busy
            self._predicted[0] += busy
            self._predicted[1] += seconds
            self.busy_per_decode.set(self._busy_sum / self._decodes)
            self.predicted_tps.set(self._predicted[0] / max(self._predicted[1], 1e-9))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def count(self, outcome: str) -> None:
        """A finished request: ok, error, cancelled, rejected (queue full) or invalid (4xx)."""
        self.requests.labels(outcome).inc()

    def load(self, processing: int, deferred: int, kv_tokens: int, kv_capacity: int) -> None:
        self.processing.set(processing)
        self.deferred.set(deferred)
        self.kv_tokens.set(kv_tokens)
        self.kv_ratio.set(kv_tokens / max(kv_capacity, 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
