"""Faults, on sacrificial live servers (see `SacrificialServers` in tests/support/live_plugin.py): API
keys and CORS as configured, overload past the admission bound, a client leaving while queued, SIGTERM with streams in
flight (the "drain" server); two API processes sharing one engine core, then that engine core killed
(the "engine_death" server, which runs `server.api_processes: 2`).

They run after every other test (`late`), on servers started in the background while the ordinary
tests ran: the "drain" server once the offline oracle has exited, the "engine_death" server once the
drain test has stopped the first one, so at most two engines (the shared one and one of these) are
up at a time.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import psutil
import pytest

from tests.support.chat_request import CHAT, assert_healthy
from tests.support.checks import assert_anthropic_error, assert_error_object, assert_openai_error, sse_events
from tests.support.image_host import ImageHost
from tests.support.images import encode, make_image, png_data_uri
from tests.support.live_plugin import (
    FAULT_CAPACITY,
    FAULT_DRAIN_SECONDS,
    FAULT_KEY_ENV,
    FAULT_KEY_FILE,
    FAULT_MAX_MODEL_LEN,
    FAULT_ORIGIN,
    SacrificialServers,
)
from tests.support.live_server import SERVED_MODEL, LiveServer
from tests.support.probes import metric, metric_in, rss_mb, wait_for

KEY = {"Authorization": f"Bearer {FAULT_KEY_ENV}"}
PUBLIC = {"/health", "/ready", "/metrics"}
CAPACITY = FAULT_CAPACITY["max_in_flight"] + FAULT_CAPACITY["max_waiting"]


def _body(max_tokens: int, stream: bool = False, text: str = "Go on and on") -> dict[str, Any]:
    return {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def _full_length_body(max_tokens: int, stream: bool, text: str) -> dict[str, Any]:
    """A request that runs exactly to max_tokens: the random tiny model often samples an end token
    within a few hundred tokens (which ones depends on the batch), so end tokens are ignored."""
    return {**_body(max_tokens, stream, text), "ignore_eos": True}


LONG_TOKENS = FAULT_MAX_MODEL_LEN - 1000  # over ten minutes at this machine's speed: never done by the drain


def _long_body(stream: bool, text: str) -> dict[str, Any]:
    return _full_length_body(LONG_TOKENS, stream, text)


# ---- API keys and CORS, live ----------------------------------------------------------------------


# A valid body for each POST route other than chat (which takes `_body`).
ROUTE_BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"model": SERVED_MODEL, "prompt": "Hi", "max_tokens": 2},
    "/tokenize": {"model": SERVED_MODEL, "prompt": "Hi"},
    "/detokenize": {"model": SERVED_MODEL, "tokens": [2, 9259]},
    "/v1/messages": {"model": SERVED_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
    "/v1/messages/count_tokens": {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Hi"}]},
}


# The one live test of API keys: every route of the real app, with keys from the environment and from
# a file. The key rules themselves (missing, malformed, wrong and wrong-length keys, Host header and
# path tricks, rotation of the key file) are tests/unit/test_front_door.py's, on the fake engine.
@pytest.mark.late(1)
def test_every_route_needs_a_key_except_the_probes(drain_server: LiveServer) -> None:
    base = drain_server.base_url
    spec = httpx.get(base + "/openapi.json", headers=KEY).json()
    routes = [(method.upper(), path) for path, item in spec["paths"].items() for method in item]
    routes += [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/no/such/route")]
    assert ("POST", CHAT) in routes and ("GET", "/health") in routes
    for method, path in routes:
        concrete = re.sub(r"\{[^}]+\}", SERVED_MODEL, path)
        body = ROUTE_BODIES.get(path, _body(2)) if method == "POST" else None
        anonymous = httpx.request(method, base + concrete, json=body, timeout=120)
        if path in PUBLIC:
            assert anonymous.status_code == 200, (method, path)
            continue
        if path.startswith("/v1/messages"):  # Anthropic's routes answer in Anthropic's shape
            assert_anthropic_error(anonymous, 401, "authentication_error")
        else:
            assert_openai_error(anonymous, 401, "invalid_api_key")
            assert anonymous.headers["www-authenticate"] == "Bearer"
        keyed = httpx.request(method, base + concrete, json=body, headers=KEY, timeout=120)
        if path == "/no/such/route":
            assert keyed.status_code == 404
        elif (method == "GET" and ("{" not in path or path.startswith("/v1/models/"))) or path in (*ROUTE_BODIES, CHAT):
            assert keyed.status_code == 200, (method, path, keyed.text)
        else:  # a route this walk has no valid request for: the key is accepted, nothing breaks
            assert keyed.status_code not in (401, 403) and keyed.status_code < 500, (method, path, keyed.text)
    # The key from the file works as well as the one from the environment (KEY).
    assert_healthy(base, {"Authorization": f"Bearer {FAULT_KEY_FILE}"})


# The one live test of CORS (off by default, and OPTIONS without CORS, are in tests/unit/test_front_door.py).
@pytest.mark.late(1)
def test_cors_as_configured(drain_server: LiveServer) -> None:
    url = drain_server.base_url + CHAT
    preflight = httpx.options(
        url,
        headers={
            "Origin": FAULT_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == FAULT_ORIGIN
    refused = httpx.options(url, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert_openai_error(refused, 400)
    answered = httpx.post(url, json=_body(2), headers={**KEY, "Origin": FAULT_ORIGIN}, timeout=60)
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == FAULT_ORIGIN
    foreign = httpx.post(url, json=_body(2), headers={**KEY, "Origin": "https://evil.example"}, timeout=60)
    assert "access-control-allow-origin" not in foreign.headers


# ---- overload and queued disconnects ----------------------------------------------------------------


@pytest.mark.late(1)
def test_four_times_the_capacity_at_once_gives_only_200s_and_429s(
    drain_server: LiveServer, report: Callable[[str], None]
) -> None:
    base = drain_server.base_url
    pid = drain_server.process.pid  # type: ignore[union-attr]
    assert_healthy(base, KEY)
    rss_before = rss_mb(pid)
    rejected_before = metric(base, "gemma_server_rejected_requests_total", {"reason": "capacity"})

    async def one(client: httpx.AsyncClient, index: int) -> tuple[int, str | None, float]:
        started = time.monotonic()
        stream = index % 2 == 1
        response = await client.post(CHAT, json=_body(120, stream=stream, text=f"Request {index}"), headers=KEY)
        if response.status_code == 200 and stream:
            events = sse_events(response.text)
            assert events[-1] == "[DONE]"
            finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
            assert finish[-1] in ("length", "stop"), response.text[-300:]
        elif response.status_code == 429:
            assert_openai_error(response, 429, "server_busy")
            assert response.headers["retry-after"] == "2"
        return response.status_code, response.headers.get("retry-after"), time.monotonic() - started

    async def burst() -> list[tuple[int, str | None, float]]:
        limits = httpx.Limits(max_connections=4 * CAPACITY)
        async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(4 * CAPACITY)))

    results = asyncio.run(burst())
    statuses = Counter(status for status, _, _ in results)
    rss_after = rss_mb(pid)
    slowest = max(seconds for _, _, seconds in results)
    report(
        f"overload: {4 * CAPACITY} requests at once on capacity {CAPACITY}: {dict(statuses)}; slowest "
        f"{slowest:.1f} s; RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    )
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= CAPACITY and statuses[429] >= 1
    rejected = metric(base, "gemma_server_rejected_requests_total", {"reason": "capacity"}) - rejected_before
    assert rejected == statuses[429]
    assert rss_after - rss_before < 150
    assert_healthy(base, KEY)


@pytest.mark.late(1)
def test_a_client_leaving_while_queued_never_reaches_the_engine(
    drain_server: LiveServer, image_host: ImageHost
) -> None:
    """All slots are held by requests whose image fetch the image host keeps open; two more requests
    queue, their clients give up, and they leave the queue without ever reaching the engine."""
    base = drain_server.base_url
    gated = image_host.add("gated.png", encode(make_image(48, 48), "PNG"))
    url = gated.replace("/img/", "/gate/")
    body = {**_body(2), "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    image_host.gate.clear()
    results: list[int] = []

    def hold() -> None:
        results.append(httpx.post(base + CHAT, json=body, headers=KEY, timeout=300).status_code)

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(FAULT_CAPACITY["max_in_flight"])]
    try:
        for thread in holders:
            thread.start()
        assert wait_for(lambda: image_host.requests.count(url[len(image_host.base_url) :]) == len(holders), 30)
        engine_before = metric(base, "vllm:num_requests_running") + metric(base, "vllm:num_requests_waiting")
        gone = {"reason": "client_disconnected_while_waiting"}
        gone_before = metric(base, "gemma_server_aborted_requests_total", gone)
        for stream in (True, False):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(base + CHAT, json=_body(5, stream), headers=KEY, timeout=httpx.Timeout(60, read=2.5))
        assert wait_for(lambda: metric(base, "gemma_server_requests_waiting") == 0, 10)
        assert metric(base, "gemma_server_aborted_requests_total", gone) - gone_before == 2
        assert metric(base, "vllm:num_requests_running") + metric(base, "vllm:num_requests_waiting") == engine_before
    finally:
        image_host.gate.set()
        for thread in holders:
            thread.join(120)
    assert results == [200] * len(holders)
    assert wait_for(lambda: metric(base, "vllm:num_requests_running") == 0, 30)
    assert_healthy(base, KEY)


# ---- SIGTERM with streams in flight -------------------------------------------------------------------


class _Stream:
    """One streamed chat completion read as an asyncio task, keeping every SSE event.

    All streams of a test run on one event loop in the test's own thread: with one reader thread per
    stream, the pytest process (which also started the server) starved its main thread for minutes
    (measured: a 0.5 s sleep returned after 168 s), so the test could not act while streams ran.
    """

    def __init__(self, base: str, body: dict[str, Any]) -> None:
        self.base = base
        self.body = body
        self.status = 0
        self.events: list[str] = []
        self.first_event = asyncio.Event()
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        # When (time.monotonic) it was started, got its status, and its first event: a failure shows
        # which requests reached the server late.
        self.started_at = self.status_at = self.first_event_at = 0.0

    def start(self, client: httpx.AsyncClient) -> _Stream:
        self.started_at = time.monotonic()
        self.task = asyncio.ensure_future(self._read(client))
        return self

    def timeline(self, since: float) -> str:
        marks = (self.started_at, self.status_at, self.first_event_at)
        return f"{self.status} at " + "/".join(f"{mark - since:.2f}" if mark else "-" for mark in marks) + " s"

    async def join(self, timeout: float) -> None:
        assert self.task is not None
        await asyncio.wait({self.task}, timeout=timeout)

    async def _read(self, client: httpx.AsyncClient) -> None:
        try:
            async with client.stream("POST", self.base + CHAT, json=self.body, headers=KEY) as response:
                self.status, self.status_at = response.status_code, time.monotonic()
                if response.status_code != 200:
                    self.events.append((await response.aread()).decode())
                    return
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: ") :])
                        if not self.first_event.is_set():
                            self.first_event_at = time.monotonic()
                            self.first_event.set()
        except Exception as exc:  # reported by the test
            self.error = exc
        finally:
            self.first_event.set()

    def finish_reason(self) -> str | None:
        chunks = [json.loads(e) for e in self.events if e.startswith("{") and '"choices"' in e]
        reasons = [
            c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
        ]
        assert len(reasons) <= 1, reasons
        return reasons[0] if reasons else None


async def _tokens_per_second_per_stream(client: httpx.AsyncClient, base: str, streams: int, tokens: int = 32) -> float:
    started = time.monotonic()
    await asyncio.gather(
        *(
            client.post(base + CHAT, json=_full_length_body(tokens, False, f"Pace {i}"), headers=KEY)
            for i in range(streams)
        )
    )
    return tokens / (time.monotonic() - started)


async def _metric(client: httpx.AsyncClient, base: str, name: str) -> float:
    """The sum of the samples of `name` on /metrics."""
    return metric_in((await client.get(base + "/metrics", headers=KEY)).text, name) or 0.0


async def _eventually(condition: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.1)
    return await condition()


@pytest.mark.late(1.9)
async def test_sigterm_drains_in_flight_streams_refuses_new_work_and_exits_zero(
    drain_server: LiveServer, sacrificial: SacrificialServers, report: Callable[[str], None]
) -> None:
    base = drain_server.base_url
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        # Short streams should still be running at SIGTERM and end well inside the window: size them
        # from this machine's speed with ten streams at once. Long ones cannot finish inside it.
        began = time.monotonic()
        rate = await _tokens_per_second_per_stream(client, base, streams=FAULT_CAPACITY["max_in_flight"])
        short_tokens = max(20, min(2000, int(rate * FAULT_DRAIN_SECONDS * 0.3)))
        long = [_Stream(base, _long_body(True, f"Long {i}")).start(client) for i in range(2)]
        short = [_Stream(base, _full_length_body(short_tokens, True, f"Short {i}")).start(client) for i in range(8)]

        async def all_streaming() -> bool:
            return all(len(stream.events) > 1 or stream.task.done() for stream in long + short)  # type: ignore[union-attr]

        # Generous: this machine has frozen whole processes for 30-120 s (kernel "workqueue lockup"
        # reports); SIGTERM must not come before every stream is admitted.
        assert await _eventually(all_streaming, 300), [(s.status, s.error, len(s.events)) for s in long + short]
        started_streaming = time.monotonic()
        # The 11th request waits for a slot if all ten still run; short streams may already have
        # ended on a fast machine (then it is admitted): either way it must not be lost. Refusing
        # waiting requests on SIGTERM is covered by tests/unit/test_admission.py.
        queued = _Stream(base, _body(5, True, "Queued")).start(client)
        await asyncio.sleep(0.5)

        drain_server.signal(signal.SIGTERM)
        signalled = time.monotonic()
        ready = await client.get(base + "/ready")
        not_ready_after = time.monotonic() - signalled
        assert ready.status_code == 503 and ready.json()["reason"] == "draining"
        refused = await client.post(base + CHAT, json=_body(2), headers=KEY, timeout=30)
        assert_openai_error(refused, 503, "server_shutting_down")
        assert refused.headers["retry-after"] == "2"
        await queued.join(30)
        if queued.status == 200:  # admitted before SIGTERM: it finished within the window
            assert queued.finish_reason() in ("length", "stop") and queued.events[-1] == "[DONE]"
        else:  # still waiting at SIGTERM: refused
            assert queued.status == 503 and "server_shutting_down" in queued.events[-1]

        for stream in short:
            await stream.join(FAULT_DRAIN_SECONDS + 30)
        short_done = time.monotonic() - signalled
        for stream in long:
            await stream.join(FAULT_DRAIN_SECONDS + 30)
    code = await asyncio.to_thread(drain_server.process.wait, FAULT_DRAIN_SECONDS + 90)  # type: ignore[union-attr]
    exited_after = time.monotonic() - signalled
    sacrificial.launch("engine_death")  # the next sacrificial server starts while other tests run
    report(
        f"drain: not ready {not_ready_after * 1000:.0f} ms after SIGTERM; 8 streams of {short_tokens} tokens "
        f"done {short_done:.1f} s after it, 2 long ones aborted at the window's end; exit code {code} after "
        f"{exited_after:.1f} s (window {FAULT_DRAIN_SECONDS} s); all 10 streaming {started_streaming - began:.1f} s "
        f"after the pace began, SIGTERM {signalled - started_streaming:.1f} s later"
    )
    named = {f"long {i}": s for i, s in enumerate(long)} | {f"short {i}": s for i, s in enumerate(short)}
    timeline = (
        f"status at started/answered/first event, from the pace's start; SIGTERM at {signalled - began:.2f} s: "
        + "; ".join(f"{name} {stream.timeline(began)}" for name, stream in {**named, "queued": queued}.items())
    )
    for stream in short:
        assert stream.error is None and stream.status == 200, (stream.error, stream.events[-1:], timeline)
        assert stream.finish_reason() in ("length", "stop"), timeline
        assert stream.events[-1] == "[DONE]"
    for stream in long:  # still running when the window closed: aborted, with an error event, then [DONE]
        assert stream.error is None and stream.status == 200, (stream.error, stream.events[-1:], timeline)
        assert stream.events[-1] == "[DONE]", timeline
        assert_error_object(json.loads(stream.events[-2]), "server_shutting_down")
    assert code == 0
    # A hang bound, not a speed bound: a drain that did not end at its window would wait for the
    # long streams (over ten minutes). The window plus vLLM's engine shutdown (~5 s), with room for a
    # machine stall (see above).
    assert exited_after < FAULT_DRAIN_SECONDS + 60


# ---- several API processes on one engine core (the "engine_death" server runs two) -----------------------


def _api_processes(server: LiveServer) -> list[psutil.Process]:
    supervisor = psutil.Process(server.process.pid)  # type: ignore[union-attr]
    return [child for child in supervisor.children() if "gemma-server::ApiServer" in " ".join(child.cmdline())]


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


@pytest.mark.late(3.5)
async def test_two_api_processes_share_the_engine_and_the_metrics(
    engine_death_server: LiveServer, report: Callable[[str], None]
) -> None:
    base = engine_death_server.base_url
    processes = _api_processes(engine_death_server)
    assert len(processes) == 2, [p.cmdline() for p in psutil.Process(engine_death_server.process.pid).children()]  # type: ignore[union-attr]
    chat_200 = {"route": CHAT, "status": "200"}
    before = metric(base, "gemma_server_requests_total", chat_200, KEY)
    cpu_before = [_cpu_seconds(p) for p in processes]
    # One connection per request, all at once: the least loaded process accepts each. The 10 slots
    # in flight and the 6 waiting places are shared by both processes, so exactly the capacity at
    # once is all served however the connections are spread (with per-process halves, a 9/3 split
    # of 12 gave a 429).
    requests = CAPACITY
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=requests)) as client:

        async def one(i: int) -> httpx.Response:
            body = _body(8, text=f"Describe {i}")
            image = png_data_uri(1280, 960, color=(20 * i, 100, 200))  # distinct: no cache hits
            body["messages"][0]["content"] = [{"type": "text", "text": f"Describe {i}"}, _image_part(image)]
            return await client.post(base + CHAT, json=body, headers=KEY)

        responses = await asyncio.gather(*(one(i) for i in range(requests)))
    assert [r.status_code for r in responses] == [200] * requests, [r.text for r in responses if r.status_code != 200]
    cpu = [_cpu_seconds(p) - b for p, b in zip(processes, cpu_before, strict=True)]
    # Whichever process answers /metrics shows the sum over both.
    totals = {metric(base, "gemma_server_requests_total", chat_200, KEY) - before for _ in range(4)}
    report(
        f"2 API processes: {requests} image requests at once, API CPU {cpu[0]:.2f} s + {cpu[1]:.2f} s; "
        f"/metrics (4 scrapes) counted {sorted(totals)}"
    )
    assert totals == {requests}
    # Both took part. Not an even split: a process busy decoding images wakes later to accept.
    assert min(cpu) > 0.1 * sum(cpu), cpu


# ---- the engine process dies ----------------------------------------------------------------------------


def _engine_core(server: LiveServer) -> psutil.Process:
    parent = psutil.Process(server.process.pid)  # type: ignore[union-attr]
    for child in parent.children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no EngineCore among {[c.name() for c in parent.children(recursive=True)]}")


@pytest.mark.late(4)
async def test_engine_death_fails_readiness_errors_in_flight_requests_and_exits_non_zero(
    engine_death_server: LiveServer, report: Callable[[str], None]
) -> None:
    server = engine_death_server
    base = server.base_url
    async with httpx.AsyncClient(timeout=120) as client:
        stream = _Stream(base, _long_body(True, "Streaming when the engine dies")).start(client)
        plain = asyncio.ensure_future(
            client.post(base + CHAT, json=_long_body(False, "Waiting when it dies"), headers=KEY)
        )
        await asyncio.wait_for(stream.first_event.wait(), 120)

        async def both_running() -> bool:
            return await _metric(client, base, "vllm:num_requests_running") >= 2

        assert await _eventually(both_running, 30)

        api_processes = _api_processes(server)
        _engine_core(server).kill()
        killed = time.monotonic()
        not_ready_after = None
        # A bound that detects a readiness probe that never fails (not a speed bound: how soon it
        # fails is reported; this machine has frozen for up to 120 s).
        while time.monotonic() - killed < 180:
            try:
                if (await client.get(base + "/ready", timeout=1)).status_code != 200:
                    not_ready_after = time.monotonic() - killed
                    break
            except httpx.HTTPError:
                not_ready_after = time.monotonic() - killed
                break
            await asyncio.sleep(0.1)
        await stream.join(60)
        plain_response = await asyncio.wait_for(plain, 60)
    code = await asyncio.to_thread(server.process.wait, 60)  # type: ignore[union-attr]
    exited_after = time.monotonic() - killed
    report(
        f"engine death (2 API processes): /ready failed after {not_ready_after} s; exit code {code} after "
        f"{exited_after:.1f} s"
    )
    assert not_ready_after is not None
    assert stream.error is None and stream.status == 200
    assert stream.events[-1] == "[DONE]"
    assert_error_object(json.loads(stream.events[-2]))
    assert_openai_error(plain_response, 503)
    assert code == 4
    assert len(api_processes) == 2 and not any(p.is_running() for p in api_processes)
