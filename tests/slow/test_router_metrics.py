"""What an inference router reads from a replica's `/metrics`, live on the sacrificial "drain" server
(10 requests in flight, 6 waiting; tests/support/live_plugin.py).

The Gateway API Inference Extension's Endpoint Picker, llm-d's router, vLLM's production-stack
router, KEDA and the HPA pick or scale replicas on `vllm:num_requests_waiting`,
`vllm:num_requests_running` and `vllm:kv_cache_usage_perc` (production-stack: the old
`vllm:gpu_cache_usage_perc`). A request waiting in this server's admission queue is waiting on this
replica, so `vllm:num_requests_waiting` counts it (server/metrics.py): with the engine's slots full
and requests queued in front of it, one scrape must say so, and the gauges must go back to zero
once the clients leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import httpx
import pytest
import yaml

from tests.support.live_plugin import FAULT_CAPACITY, FAULT_KEY_ENV, FAULT_MAX_MODEL_LEN
from tests.support.live_server import ROOT, SERVED_MODEL, LiveServer
from tests.support.probes import metric_in

KEY = {"Authorization": f"Bearer {FAULT_KEY_ENV}"}
GAUGES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "gemma_server_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
)


PICKER = ROOT / "deploy" / "kubernetes" / "components" / "inference-gateway" / "endpoint-picker.yaml"


def _picker_metric_names() -> dict[str, str]:
    """The metric names the gateway's Endpoint Picker is configured to read (its vllm engine config)."""
    config_map = next(doc for doc in yaml.safe_load_all(PICKER.read_text()) if doc["kind"] == "ConfigMap")
    config = yaml.safe_load(config_map["data"]["endpoint-picker.yaml"])
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")
    engine = next(e for e in extractor["parameters"]["engineConfigs"] if e["name"] == "vllm")
    return {key: value for key, value in engine.items() if key.endswith("Spec")}


async def _scrape(client: httpx.AsyncClient, base: str) -> dict[str, float | None]:
    page = (await client.get(f"{base}/metrics")).text
    return {name: metric_in(page, name) for name in GAUGES} | {
        "cache_config_info": metric_in(page, "vllm:cache_config_info")
    }


async def _hold(client: httpx.AsyncClient, base: str, index: int, opened: list[int]) -> None:
    """A stream that would run for minutes, read until the test cancels it (the client leaving)."""
    body = {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": f"Go on {index}"}],
        "max_tokens": FAULT_MAX_MODEL_LEN - 1000,
        "ignore_eos": True,
        "stream": True,
    }
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body, headers=KEY) as response:
        opened.append(response.status_code)
        async for _ in response.aiter_bytes():
            pass


@pytest.mark.late(1.85)
async def test_one_scrape_counts_the_requests_queued_in_front_of_the_engine(
    drain_server: LiveServer, report: Callable[[str], None]
) -> None:
    base = drain_server.base_url
    running, queued = FAULT_CAPACITY["max_in_flight"], 4
    limits = httpx.Limits(max_connections=running + queued + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=limits) as client:
        opened: list[int] = []
        holders = [asyncio.create_task(_hold(client, base, i, opened)) for i in range(running)]
        waiters: list[asyncio.Task[None]] = []
        try:
            # A hang bound: this machine has frozen for 30-120 s under load.
            deadline = time.monotonic() + 300
            while (await _scrape(client, base))["vllm:num_requests_running"] != running:
                assert time.monotonic() < deadline, await _scrape(client, base)
                await asyncio.sleep(0.2)
            waiters = [asyncio.create_task(_hold(client, base, running + i, opened)) for i in range(queued)]
            while (await _scrape(client, base))["gemma_server_requests_waiting"] != queued:
                assert time.monotonic() < deadline, await _scrape(client, base)
                await asyncio.sleep(0.2)
            busy = await _scrape(client, base)  # the one scrape a router would take now
            page = (await client.get(f"{base}/metrics")).text
        finally:
            for task in holders + waiters:
                task.cancel()
            for task in holders + waiters:
                with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                    await task
        left_at = time.monotonic()
        while (idle := await _scrape(client, base))["vllm:num_requests_running"] or idle["vllm:num_requests_waiting"]:
            assert time.monotonic() - left_at < 120, idle
            await asyncio.sleep(0.2)
        idle_after = time.monotonic() - left_at
    report(f"router gauges: busy {busy}; all zero {idle_after:.1f} s after the clients left")
    assert busy["vllm:num_requests_running"] == running, busy
    assert busy["vllm:num_requests_waiting"] == queued, busy  # the front end's queue, the engine's own (none)
    assert busy["vllm:kv_cache_usage_perc"] and busy["vllm:kv_cache_usage_perc"] > 0, busy
    assert busy["vllm:gpu_cache_usage_perc"] == busy["vllm:kv_cache_usage_perc"], busy
    assert busy["cache_config_info"] is not None, busy
    assert idle["gemma_server_requests_waiting"] == 0 and idle["vllm:kv_cache_usage_perc"] == 0, idle
    assert opened.count(200) == running, opened  # the queued ones never got their headers
    # Every name the Endpoint Picker reads is on the page, the LoRA gauge too (the live server serves
    # the tiny adapters).
    missing = {key: name for key, name in _picker_metric_names().items() if metric_in(page, name) is None}
    assert missing == {}, missing
