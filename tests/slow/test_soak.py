"""A bounded soak on the shared live server: 2,000 mixed requests (text, streaming, images by data URI
and by URL, varied so no cache flattens them), after a warm-up; every answer must be a 200, and the
API server's resident memory drift is reported and bounded."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable

import httpx
import psutil
import pytest

from tests.support.chat_request import CHAT
from tests.support.checks import sse_events
from tests.support.image_host import ImageHost
from tests.support.images import data_uri, encode, make_image
from tests.support.live_server import SERVED_MODEL, LiveServer
from tests.support.probes import MB, rss_mb

REQUESTS = 2000
WARM_UP = 100
CONCURRENCY = 16
RSS_DRIFT_BOUND_MB = 150


def _images(image_host: ImageHost) -> tuple[list[str], list[str]]:
    rng = random.Random(4)
    uris, urls = [], []
    for i in range(24):
        size = (rng.randrange(16, 400), rng.randrange(16, 400))
        color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        data = encode(make_image(*size, color=color), "PNG" if i % 2 else "JPEG")
        uris.append(data_uri(data, "image/png" if i % 2 else "image/jpeg"))
        urls.append(image_host.add(f"soak-{i}.img", data, "image/png" if i % 2 else "image/jpeg"))
    return uris, urls


def _request(index: int, uris: list[str], urls: list[str]) -> dict:
    rng = random.Random(index)
    text = f"Request {index}: " + " ".join(rng.choice(["red", "blue", "cat", "sky", "why", "how"]) for _ in range(8))
    kind = index % 4
    content: str | list[dict] = text
    if kind == 2:
        content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": rng.choice(uris)}}]
    elif kind == 3:
        content = [{"type": "image_url", "image_url": {"url": rng.choice(urls)}}, {"type": "text", "text": text}]
    return {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": rng.randrange(1, 8),
        "temperature": rng.choice([0, 0.7, 1.0]),
        "stream": kind == 1,
    }


async def _run(base: str, bodies: list[dict]) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(client: httpx.AsyncClient, body: dict) -> None:
        async with gate:
            response = await client.post(CHAT, json=body)
        if response.status_code != 200:
            outcomes[f"http {response.status_code}: {response.text[:200]}"] += 1
        elif body["stream"]:
            events = sse_events(response.text)
            last = json.loads(events[-2]) if len(events) > 1 else {}
            ok = events[-1] == "[DONE]" and last.get("choices", [{}])[0].get("finish_reason") in ("length", "stop")
            outcomes["ok" if ok else f"bad stream: {response.text[-200:]}"] += 1
        else:
            outcomes["ok" if response.json()["choices"][0]["finish_reason"] in ("length", "stop") else "bad"] += 1

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=180, limits=limits) as client:
        await asyncio.gather(*(one(client, body) for body in bodies))
    return outcomes


def _engine_rss_mb(pid: int) -> float:
    return sum(child.memory_info().rss for child in psutil.Process(pid).children(recursive=True)) / MB


# After the tests that wait for the drain server (late 1), so no server is starting, and before the
# drain test (late 1.9), which starts the next sacrificial server (an engine core and two API
# processes) in the background: on 2 cores that start-up once starved the soak's image host past
# the 10 s fetch limit (28 of 2,000 requests in a CI run).
@pytest.mark.late(1.5)
def test_soak_2000_mixed_requests(
    live_server: LiveServer, image_host: ImageHost, report: Callable[[str], None]
) -> None:
    uris, urls = _images(image_host)
    pid = live_server.process.pid  # type: ignore[union-attr]
    warm = asyncio.run(_run(live_server.base_url, [_request(-i - 1, uris, urls) for i in range(WARM_UP)]))
    assert warm == Counter({"ok": WARM_UP}), warm
    rss_start, engine_start = rss_mb(pid), _engine_rss_mb(pid)
    started = time.monotonic()
    outcomes = asyncio.run(_run(live_server.base_url, [_request(i, uris, urls) for i in range(REQUESTS)]))
    seconds = time.monotonic() - started
    rss_end, engine_end = rss_mb(pid), _engine_rss_mb(pid)
    report(
        f"soak: {REQUESTS} requests (1/4 each text, streaming, data-URI image, URL image) in {seconds:.0f} s "
        f"({REQUESTS / seconds:.1f} req/s, concurrency {CONCURRENCY}); API server RSS {rss_start:.0f} -> "
        f"{rss_end:.0f} MiB (drift {rss_end - rss_start:+.0f} MiB); engine processes {engine_start:.0f} -> "
        f"{engine_end:.0f} MiB; outcomes {dict(outcomes)}"
    )
    assert outcomes == Counter({"ok": REQUESTS}), outcomes
    assert rss_end - rss_start < RSS_DRIFT_BOUND_MB
