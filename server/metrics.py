"""Prometheus metrics: the server's own, plus vLLM's `vllm:*` engine metrics, on one page.

Our metrics live in a registry owned by the app (so several apps in one test process do not clash);
vLLM records its engine metrics (running/waiting requests, KV cache usage, TTFT, TPOT, ...) into
prometheus_client's default registry. `/metrics` renders both.

With several API processes (`server.api_processes`), prometheus_client runs in multi-process mode
(`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor): every process writes its samples to files there,
and `/metrics`, whichever process answers, renders the aggregate of all of them. Counters and
histograms add up; our gauges say how to combine (`livesum`: in flight and waiting add up over the
live processes; `livemin`: the engine counts as ready only if every process can serve).

Routers read this page: the inference gateway's Endpoint Picker (llm-d's router), vLLM's
production-stack router, KEDA and the HPA pick or scale replicas on vLLM's names. So the page is
rendered through `RouterView`, which makes those names mean what the routers assume:
`vllm:num_requests_waiting` counts every request waiting on this replica, the ones in our admission
queue included (`gemma_server_requests_waiting` still shows that part alone), and the old
`vllm:gpu_cache_usage_perc` (production-stack's) mirrors `vllm:kv_cache_usage_perc`. Changing the
meaning of vLLM's gauge rather than adding one of ours: every router then works unconfigured, and
scale-out (KEDA, HPA) and routing read one number.
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
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

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
        # `model`: the served name (the base model or a LoRA adapter). Names come from the configuration
        # and admin-loaded adapters only, never from what a client sends, so the label stays bounded.
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from receiving a generation request to its first output token, by served model.",
            ["model"],
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
            f"{PREFIX}_prompt_tokens",
            "Prompt tokens of finished generations (images included), by served model.",
            ["model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens",
            "Generated tokens of finished generations, by served model.",
            ["model"],
            registry=r,
        )
        self.generations = Counter(
            f"{PREFIX}_generations",
            "Engine generations (one per choice of n greedy ones), by served model and outcome "
            "(finished, ended_early).",
            ["model", "outcome"],
            registry=r,
        )
        self.generation_seconds = Histogram(
            f"{PREFIX}_generation_duration_seconds",
            "Time from receiving a generation request to its generation's end, by served model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
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
            return generate_latest(RouterView(everything))
        return generate_latest(RouterView(self.registry, REGISTRY))


FRONT_END_WAITING = f"{PREFIX}_requests_waiting"
ENGINE_WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
OLD_KV_CACHE_USAGE = "vllm:gpu_cache_usage_perc"  # vLLM's name before 0.10; production-stack's router reads it


class RouterView:
    """The metric families of some registries, with vLLM's router-facing names made whole (see the
    module's docstring); everything else passes through unchanged."""

    def __init__(self, *sources: Collector) -> None:
        self.sources = sources

    def collect(self) -> list[Metric]:
        families = [family for source in self.sources for family in source.collect()]
        by_name = {family.name: family for family in families}
        front_end = by_name.get(FRONT_END_WAITING)
        waiting = by_name.get(ENGINE_WAITING)
        if front_end is not None and waiting is not None and waiting.samples:
            # One engine core per server (data parallel is vLLM's, across replicas here): its sample
            # takes the whole front-end queue, so a sum over the page's samples is the replica's.
            queued = sum(sample.value for sample in front_end.samples)
            first = waiting.samples[0]
            waiting.samples = [first._replace(value=first.value + queued), *waiting.samples[1:]]
        usage = by_name.get(KV_CACHE_USAGE)
        if usage is not None and OLD_KV_CACHE_USAGE not in by_name:
            old = Metric(OLD_KV_CACHE_USAGE, usage.documentation + " (the old name, kept for routers)", "gauge")
            old.samples = [sample._replace(name=OLD_KV_CACHE_USAGE) for sample in usage.samples]
            families.append(old)
        return families
