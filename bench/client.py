"""The load client: a closed loop of N concurrent keep-alive HTTP/1.1 connections, in one process.

It must cost much less CPU than the servers it measures (they share this machine's two cores), so
it is built from the cheapest parts available: asyncio streams on uvloop, the `httptools` C parser
for responses, request bodies serialized once before the clock starts, and one `orjson.loads` per
SSE event. No HTTP client library, no pydantic per chunk. `run_cell` reports the client's own CPU
seconds so the report can show what it cost.

Timing follows `vllm bench serve`: TTFT is the time from sending the request to the first event that
carries generated text; inter-token latency (ITL) is the gap between successive such events; the
latency ends at the last one. Output tokens come from the server's `usage` (include_usage). Responses
API streams (`bench.protocols`) are read the same way: `output_text.delta` events carry the text,
the final `response.completed`/`response.incomplete` the usage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httptools
import orjson

READ_SIZE = 1 << 16


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    error: str | None = None
    started: float = 0.0
    ttft: float | None = None  # seconds; for a non-streamed request, the whole latency
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    events: int = 0  # SSE events that carried generated text (tokens may be coalesced into one)


class _Response:
    """httptools callbacks for one response; SSE events are timed as their bytes arrive."""

    def __init__(self, stream: bool, started: float) -> None:
        self.stream = stream
        self.result = RequestResult(started=started)
        self.status = 0
        self.body = bytearray()
        self.complete = False
        self.keep_alive = True
        self._last_token_at: float | None = None
        self.finished = False  # a finish_reason arrived

    # httptools callbacks
    def on_body(self, data: bytes) -> None:
        self.body += data
        if self.stream:
            self._consume_events(time.perf_counter())

    def on_message_complete(self) -> None:
        self.complete = True

    def _consume_events(self, now: float) -> None:
        while True:
            end = self.body.find(b"\n\n")
            if end < 0:
                return
            event = bytes(self.body[:end])
            del self.body[: end + 2]
            if event.startswith(b"event: "):  # the Responses API names each event on a line of its own
                event = event[event.find(b"\n") + 1 :]
            if event.startswith(b"data: "):
                self._on_data(event[6:], now)

    def _on_data(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            return
        chunk = orjson.loads(payload)
        if "type" in chunk:  # a Responses API event
            self._on_responses_event(chunk, now)
            return
        if "error" in chunk:
            self.result.error = str(chunk["error"].get("message", chunk["error"]))[:200]
            return
        usage = chunk.get("usage")
        if usage:
            self.result.output_tokens = usage.get("completion_tokens", 0)
        for choice in chunk.get("choices") or ():
            if choice.get("delta", {}).get("content"):
                self._token_event(now)
            if choice.get("finish_reason"):
                self.finished = True

    def _on_responses_event(self, event: dict, now: float) -> None:
        kind = event["type"]
        if kind == "response.output_text.delta":
            self._token_event(now)
        elif kind in ("response.completed", "response.incomplete"):
            self.result.output_tokens = event["response"]["usage"]["output_tokens"]
            self.finished = True
        elif kind in ("error", "response.failed"):
            self.result.error = str(event)[:200]

    def _token_event(self, now: float) -> None:
        result = self.result
        result.events += 1
        if self._last_token_at is None:
            result.ttft = now - result.started
        else:
            result.itl.append(now - self._last_token_at)
        self._last_token_at = now
        result.latency = now - result.started

    def finish(self, now: float) -> RequestResult:
        result = self.result
        if self.status != 200:
            result.error = f"HTTP {self.status}: {bytes(self.body[:200]).decode(errors='replace')}"
            result.latency = now - result.started
            return result
        if not self.stream:
            body = orjson.loads(self.body)
            usage = body.get("usage") or {}
            result.output_tokens = usage.get("completion_tokens", usage.get("output_tokens", 0))  # chat | Responses
            result.ttft = result.latency = now - result.started
        elif result.ttft is None and result.error is None and not self.finished:
            # A finished stream may carry no text at all: random weights sometimes generate only
            # special tokens, which are not detokenized. That is a success without a TTFT.
            result.error = "the stream ended without text or a finish_reason"
        result.ok = result.error is None
        return result


class Connection:
    """One keep-alive HTTP/1.1 connection that sends one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, *, stream: bool) -> RequestResult:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Accept: {'text/event-stream' if stream else 'application/json'}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        response = _Response(stream, time.perf_counter())
        parser = httptools.HttpResponseParser(response)
        self._writer.write(head)
        self._writer.write(body)
        while not response.complete:
            data = await self._reader.read(READ_SIZE)
            if not data:
                raise ConnectionError("the server closed the connection mid-response")
            parser.feed_data(data)
        response.status = parser.get_status_code()
        if not parser.should_keep_alive():
            await self.close()
        return response.finish(time.perf_counter())

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._reader = None


@dataclass(slots=True)
class CellRun:
    results: list[RequestResult]
    wall_seconds: float
    client_cpu_seconds: float


async def run_requests(
    host: str, port: int, bodies: Sequence[bytes], *, concurrency: int, stream: bool, path: str = "/v1/chat/completions"
) -> CellRun:
    """Sends every body, `concurrency` at a time (closed loop), and times each request."""
    queue = list(reversed(bodies))
    results: list[RequestResult] = []

    async def worker() -> None:
        connection = Connection(host, port)
        try:
            while queue:
                body = queue.pop()
                try:
                    results.append(await connection.post(path, body, stream=stream))
                except (OSError, ConnectionError, httptools.HttpParserError, ValueError) as exc:
                    results.append(RequestResult(error=f"{type(exc).__name__}: {exc}"[:200]))
                    await connection.close()
        finally:
            await connection.close()

    cpu_before = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return CellRun(results, wall, time.process_time() - cpu_before)
