"""The checklist's Streaming rows on the live server: clients that drop mid-stream (50 at once), the
engine's running and KV gauges back to baseline, exactly one abort per dropped request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from tests.support.chat_request import CHAT, assert_healthy
from tests.support.live_server import SERVED_MODEL, LiveServer
from tests.support.probes import metric, rss_mb, wait_for

DROPS = 50


async def _drop_after_first_token(client: httpx.AsyncClient, index: int) -> bool:
    body = {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": f"Client {index}: go on forever"}],
        "max_tokens": 4000,
        "stream": True,
    }
    async with client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"role"' not in line:
                return True  # leaving the block closes the connection mid-stream
    return False


def test_fifty_clients_dropping_mid_stream_leave_nothing_running(
    live_server: LiveServer, report: Callable[[str], None]
) -> None:
    base = live_server.base_url
    assert_healthy(base)
    assert wait_for(lambda: metric(base, "vllm:num_requests_running") == 0, 30)
    kv_baseline = metric(base, "vllm:kv_cache_usage_perc")
    aborted_before = metric(base, "gemma_server_aborted_requests_total", {"reason": "stream_ended_early"})
    rss_before = rss_mb(live_server.process.pid)  # type: ignore[union-attr]

    async def drop_all() -> list[bool]:
        limits = httpx.Limits(max_connections=DROPS)
        async with httpx.AsyncClient(base_url=base, timeout=180, limits=limits) as client:
            return await asyncio.gather(*(_drop_after_first_token(client, i) for i in range(DROPS)))

    assert all(asyncio.run(drop_all()))
    assert wait_for(lambda: metric(base, "vllm:num_requests_running") == 0, 30)
    assert wait_for(lambda: metric(base, "vllm:num_requests_waiting") == 0, 10)
    assert wait_for(lambda: metric(base, "vllm:kv_cache_usage_perc") <= kv_baseline, 10)
    assert wait_for(lambda: metric(base, "gemma_server_requests_in_flight") == 0, 10)
    aborted = metric(base, "gemma_server_aborted_requests_total", {"reason": "stream_ended_early"}) - aborted_before
    assert aborted == DROPS  # each dropped request was aborted once, none twice
    report(f"{DROPS} dropped streams: RSS {rss_before:.0f} -> {rss_mb(live_server.process.pid):.0f} MiB")  # type: ignore[union-attr]
    assert_healthy(base)
