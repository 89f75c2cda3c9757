"""Admission control: how many generation requests run at once, how many may wait, and draining.

vLLM's own waiting queue is unbounded; this is the bound in front of it. A generation request asks
for a slot before any expensive work (image fetching and decoding, the multimodal processor,
generation):

    async with admission.slot(estimated_prompt_tokens, http_request) as slot:
        return slot.hold(await answer(request))      # as server/pipeline/pipeline.py does

- fewer than `max_in_flight` slots taken and nobody waiting: admitted at once;
- otherwise it waits in FIFO order, if fewer than `max_waiting` requests and at most
  `max_waiting_prompt_tokens` prompt tokens (an estimate from the request's size, since the prompt
  is not built yet) are waiting; beyond either bound it gets 429 with Retry-After at once;
- while draining (SIGTERM), new and still-waiting requests get 503 with Retry-After.

A slot is released when the `async with` block ends, or, for a streamed response handed to
`slot.hold`, when the stream has been sent (or the client went away). A client that disconnects
while waiting leaves the queue at once and never reaches the engine. Time spent waiting is exported
as `gemma_server_queue_time_seconds`; the waiting count as `gemma_server_requests_waiting`;
refusals as `gemma_server_rejected_requests_total{reason}`.

With several API processes (`server.api_processes`), every bound is over all of them: they keep the
in-flight and waiting counts in one `AdmissionCounts.shared()`, in shared memory. A waiting request
lives in the process that received it; a process with waiting requests looks for slots freed by the
others every `SHARED_POLL_SECONDS`, and a new request does not jump the queue while any process has
requests waiting. So order is first come first served within a process and, to within that poll,
across processes.

This module imports neither vLLM nor the engine; it only counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server import errors
from server.errors import ClientClosedRequestError, RateLimitError
from server.metrics import Metrics
from server.pipeline.disconnect import wait_for_disconnect
from server.settings import AdmissionSettings

# How often a process with waiting requests checks for slots freed by other API processes.
SHARED_POLL_SECONDS = 0.005


@dataclass(eq=False)
class _Waiter:
    tokens: int
    future: asyncio.Future[None]
    arrived: float = field(default_factory=time.perf_counter)


class AdmissionCounts:
    """How many generation requests are in flight and waiting (and their estimated prompt tokens),
    checked against the bounds and changed in one step.

    `AdmissionCounts()` is one API process's, in plain integers. `AdmissionCounts.shared()` keeps
    them in shared memory for all API processes of one server: the supervisor creates it and hands
    it to each process when it is spawned, and every change holds one lock for a few instructions.
    Reads without the lock may be a moment stale, which only moves a decision to the next poll."""

    _IN_FLIGHT, _WAITING, _WAITING_TOKENS = range(3)

    def __init__(self) -> None:
        self._lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        self._values: Any = [0, 0, 0]

    @classmethod
    def shared(cls) -> AdmissionCounts:
        counts = cls()
        context = multiprocessing.get_context("spawn")
        counts._lock = context.Lock()
        counts._values = context.RawArray("q", 3)
        return counts

    @property
    def in_flight(self) -> int:
        return int(self._values[self._IN_FLIGHT])

    @property
    def waiting(self) -> int:
        return int(self._values[self._WAITING])

    @property
    def waiting_tokens(self) -> int:
        return int(self._values[self._WAITING_TOKENS])

    def try_take(self, max_in_flight: int) -> bool:
        with self._lock:
            if self._values[self._IN_FLIGHT] >= max_in_flight:
                return False
            self._values[self._IN_FLIGHT] += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._values[self._IN_FLIGHT] -= 1

    def try_join_queue(self, tokens: int, max_waiting: int, max_waiting_tokens: int) -> bool:
        with self._lock:
            if (
                self._values[self._WAITING] >= max_waiting
                or self._values[self._WAITING_TOKENS] + tokens > max_waiting_tokens
            ):
                return False
            self._values[self._WAITING] += 1
            self._values[self._WAITING_TOKENS] += tokens
            return True

    def leave_queue(self, tokens: int) -> None:
        with self._lock:
            self._values[self._WAITING] -= 1
            self._values[self._WAITING_TOKENS] -= tokens


class Admission:
    def __init__(self, settings: AdmissionSettings, metrics: Metrics, shared: AdmissionCounts | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        # The bounds apply to these counts: this process's, or those of all API processes.
        self._counts = shared or AdmissionCounts()
        self._counts_are_shared = shared is not None
        self._poller: asyncio.Task[None] | None = None
        self._in_flight = 0  # this process's own slots (the drain waits for them)
        self._waiting: deque[_Waiter] = deque()  # this process's own waiting requests, in order
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting_tokens(self) -> int:
        return sum(waiter.tokens for waiter in self._waiting)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_seconds)}

    @contextlib.asynccontextmanager
    async def slot(self, prompt_tokens: int, http_request: Request | None = None) -> AsyncIterator[Slot]:
        """Holds one in-flight slot for the block (or, via `Slot.hold`, for a streamed response)."""
        try:
            await self._acquire(prompt_tokens, http_request)
        except asyncio.CancelledError as exc:
            raise _client_gone(self.metrics, "client_disconnected_while_waiting", exc) from None
        slot = Slot(self)
        try:
            yield slot
        except asyncio.CancelledError as exc:
            slot.release()
            raise _client_gone(self.metrics, "client_disconnected", exc) from None
        except BaseException:
            slot.release()
            raise
        if not slot.held:
            slot.release()

    async def _acquire(self, tokens: int, http_request: Request | None) -> None:
        if self._draining:
            self.metrics.rejected.labels("draining").inc()
            raise errors.draining(self.retry_after)
        if not self._counts.waiting and self._try_take():  # nobody queued anywhere: no one to overtake
            self.metrics.queue_time.observe(0.0)
            return
        limits = self.settings
        if not self._counts.try_join_queue(tokens, limits.max_waiting, limits.max_waiting_prompt_tokens):
            self.metrics.rejected.labels("capacity").inc()
            raise RateLimitError(
                "the server is at capacity; retry after a moment",
                headers=self.retry_after,
            )
        waiter = _Waiter(tokens, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._publish_waiting()
        if self._counts_are_shared and self._poller is None:
            self._poller = asyncio.create_task(self._poll_for_free_slots())
        try:
            await _wait_unless_disconnected(waiter.future, http_request)
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._release()  # admitted at the same moment it gave up: give the slot back
            self._forget(waiter)
            raise
        self.metrics.queue_time.observe(time.perf_counter() - waiter.arrived)

    def _try_take(self) -> bool:
        if not self._counts.try_take(self.settings.max_in_flight):
            return False
        self._in_flight += 1
        self._idle.clear()
        return True

    def _release(self) -> None:
        self._in_flight -= 1
        self._counts.give_back()
        self._admit_waiters()
        if self._in_flight == 0:
            self._idle.set()

    def _admit_waiters(self) -> None:
        """Hands free slots to waiting requests, first come first served."""
        while self._waiting:
            waiter = self._waiting[0]
            if not waiter.future.done() and not self._try_take():
                break
            self._dequeue(waiter)
            if not waiter.future.done():
                waiter.future.set_result(None)
        self._publish_waiting()

    async def _poll_for_free_slots(self) -> None:
        """While requests wait here, takes slots that other API processes have freed. (In one
        process every freed slot reaches a waiter in `_release`.)"""
        try:
            while self._waiting:
                await asyncio.sleep(SHARED_POLL_SECONDS)
                self._admit_waiters()
        finally:
            self._poller = None

    def _forget(self, waiter: _Waiter) -> None:
        if waiter in self._waiting:
            self._dequeue(waiter)
            self._publish_waiting()

    def _dequeue(self, waiter: _Waiter) -> None:
        self._waiting.remove(waiter)  # the first one, except when a client gave up
        self._counts.leave_queue(waiter.tokens)

    def _publish_waiting(self) -> None:
        self.metrics.requests_waiting.set(len(self._waiting))

    def start_draining(self) -> None:
        """Refuses new requests and sends every waiting one away with 503; in-flight ones go on."""
        self._draining = True
        while self._waiting:
            waiter = self._waiting[0]
            self._dequeue(waiter)
            if not waiter.future.done():
                self.metrics.rejected.labels("draining").inc()
                waiter.future.set_exception(errors.draining(self.retry_after))
        self._publish_waiting()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no slot is taken; False if `timeout` seconds pass first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


class Slot:
    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._released = False
        self.held = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release()

    def hold(self, response: Response) -> Response:
        """Keeps the slot until a streamed response has been sent; other responses release it at once."""
        if not isinstance(response, StreamingResponse):
            return response
        self.held = True
        return _SlotHoldingStreamingResponse(response, self)


class _SlotHoldingStreamingResponse(StreamingResponse):
    """The same streamed response, releasing its admission slot when sending ends, however it ends."""

    def __init__(self, inner: StreamingResponse, slot: Slot) -> None:
        self.__dict__.update(inner.__dict__)
        self._slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()


def _client_gone(metrics: Metrics, reason: str, exc: asyncio.CancelledError) -> BaseException:
    """What to raise for a CancelledError: itself if the task is really being cancelled (shutdown);
    otherwise it came from a disconnect watcher and the client is gone: 499, which nobody reads."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return exc
    metrics.aborted.labels(reason).inc()
    return ClientClosedRequestError("the client closed the connection")


async def _wait_unless_disconnected(future: asyncio.Future[None], http_request: Request | None) -> None:
    if http_request is None:
        await future
        return
    watcher = asyncio.ensure_future(wait_for_disconnect(http_request))
    try:
        done, _ = await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if future in done:
        future.result()
        return
    raise asyncio.CancelledError("client disconnected while waiting for admission")
