"""server.metrics.RouterView: the names routers read from /metrics mean what they assume (the live
check, on the real engine's gauges, is tests/slow/test_router_metrics.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from server.metrics import Metrics, RouterView
from tests.support.probes import metric_in


def _engine_registry(waiting: float, usage: float) -> CollectorRegistry:
    """Gauges named and labelled as vLLM's engine exports them."""
    registry = CollectorRegistry()
    labels = ["engine", "model_name"]
    Gauge("vllm:num_requests_waiting", "Requests waiting", labels, registry=registry).labels("0", "m").set(waiting)
    Gauge("vllm:kv_cache_usage_perc", "KV-cache usage", labels, registry=registry).labels("0", "m").set(usage)
    return registry


def test_requests_queued_in_the_front_end_count_as_waiting_on_the_replica() -> None:
    ours = Metrics()
    ours.requests_waiting.set(4)
    page = generate_latest(RouterView(ours.registry, _engine_registry(waiting=2, usage=0.25))).decode()
    assert metric_in(page, "vllm:num_requests_waiting") == 6
    assert metric_in(page, "gemma_server_requests_waiting") == 4  # the front end's part, still on its own
    assert 'vllm:num_requests_waiting{engine="0",model_name="m"} 6.0' in page


def test_the_old_kv_cache_name_mirrors_the_new_one() -> None:
    page = generate_latest(RouterView(Metrics().registry, _engine_registry(waiting=0, usage=0.25))).decode()
    assert metric_in(page, "vllm:gpu_cache_usage_perc") == metric_in(page, "vllm:kv_cache_usage_perc") == 0.25
    assert "# TYPE vllm:gpu_cache_usage_perc gauge" in page


def test_a_page_without_engine_gauges_passes_through_unchanged() -> None:
    ours = Metrics()
    ours.requests_waiting.set(3)
    assert generate_latest(RouterView(ours.registry)) == generate_latest(ours.registry)
