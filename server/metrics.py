"""Prometheus metrics: the server's own, plus vLLM's `vllm:*` engine metrics, on one page.

Our metrics live in a registry owned by the app (so several apps in one test process do not clash);
vLLM records its engine metrics (running/waiting requests, KV cache usage, TTFT, TPOT, ...) into
prometheus_client's default registry. `/metrics` renders both.

With several API processes (`server.api_processes`), prometheus_client runs in multi-process mode
(`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor): every process writes its samples to files there,
and `/metrics`, whichever process answers, renders the aggregate of all of them. Counters and
histograms add up; our gauges say how to combine (`livesum`: in flight and waiting add up over the
live processes; `livemin`: the engine counts as ready only if every process can serve).
"""

from __future__ import annotations

import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "gemma_server"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from receiving a request to its last byte, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from receiving a generation request to its first output token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "Generation requests admitted and not yet finished (front end and engine).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.requests_waiting = Gauge(
            f"{PREFIX}_requests_waiting",
            "Generation requests waiting in the front end for an engine slot (not yet in vLLM's queue).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_time = Histogram(
            f"{PREFIX}_queue_time_seconds",
            "Time a generation request waited in the front end before reaching the engine.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            f"{PREFIX}_rejected_requests",
            "Requests refused by admission control, by reason (capacity, draining).",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests (images included).", registry=r
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Generated tokens of finished requests.", registry=r
        )
        self.images = Counter(
            f"{PREFIX}_images", "Images received, by source (data URI or URL).", ["source"], registry=r
        )
        self.images_per_request = Histogram(
            f"{PREFIX}_images_per_request",
            "Images in one generation request.",
            buckets=(0, 1, 2, 3, 4, 6, 8, 16, 32),
            registry=r,
        )
        self.image_load_seconds = Histogram(
            f"{PREFIX}_image_load_seconds",
            "Fetching and decoding one request's images.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            f"{PREFIX}_preprocess_seconds",
            "Prompt building: chat template, tokenization and the multimodal processor.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.engine_ready = Gauge(
            f"{PREFIX}_engine_ready",
            "1 when the engine can serve requests, else 0.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.aborted = Counter(
            f"{PREFIX}_aborted_requests",
            "Generation requests aborted before finishing, by reason.",
            ["reason"],
            registry=r,
        )

    def render(self) -> bytes:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            # Ours and vLLM's, from every API process's files (this process's are among them).
            everything = CollectorRegistry()
            multiprocess.MultiProcessCollector(everything)  # type: ignore[no-untyped-call]
            return generate_latest(everything)
        return generate_latest(self.registry) + generate_latest(REGISTRY)
