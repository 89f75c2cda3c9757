"""Admission control on its own: slots, the waiting bounds, FIFO order, disconnects, draining."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from server.errors import ClientClosedRequestError, RateLimitError, ServiceUnavailableError
from server.metrics import Metrics
from server.pipeline.admission import Admission, AdmissionCounts
from server.pipeline.pipeline import estimate_prompt_tokens
from server.protocols.openai.chat import chat_request
from server.protocols.openai.wire import ChatCompletionRequest
from server.settings import AdmissionSettings


def _admission(**settings: int) -> tuple[Admission, Metrics]:
    metrics = Metrics()
    values = {"max_in_flight": 2, "max_waiting": 2, "max_waiting_prompt_tokens": 1000, "retry_after_seconds": 3}
    values.update(settings)
    return Admission(AdmissionSettings(**values), metrics), metrics


def _value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


async def _hold(admission: Admission, release: asyncio.Event, tokens: int = 10, log: list[str] | None = None) -> None:
    async with admission.slot(tokens):
        if log is not None:
            log.append(f"in:{tokens}")
        await release.wait()


async def test_in_flight_then_waiting_then_429_with_retry_after() -> None:
    admission, metrics = _admission()
    release = asyncio.Event()
    holders = [asyncio.create_task(_hold(admission, release)) for _ in range(4)]
    await asyncio.sleep(0.01)
    assert (admission.in_flight, admission.waiting) == (2, 2)
    assert _value(metrics, "gemma_server_requests_waiting") == 2
    with pytest.raises(RateLimitError) as caught:
        async with admission.slot(10):
            pass
    assert caught.value.status_code == 429
    assert caught.value.headers == {"Retry-After": "3"}
    assert _value(metrics, "gemma_server_rejected_requests_total", {"reason": "capacity"}) == 1
    release.set()
    await asyncio.gather(*holders)
    assert (admission.in_flight, admission.waiting, admission.waiting_tokens) == (0, 0, 0)
    assert _value(metrics, "gemma_server_queue_time_seconds_count") == 4


async def test_waiting_prompt_tokens_are_bounded() -> None:
    admission, _ = _admission(max_waiting=10, max_waiting_prompt_tokens=100)
    release = asyncio.Event()
    holders = [asyncio.create_task(_hold(admission, release, tokens=5)) for _ in range(2)]
    waiter = asyncio.create_task(_hold(admission, release, tokens=80))
    await asyncio.sleep(0.01)
    assert admission.waiting_tokens == 80
    with pytest.raises(RateLimitError):
        async with admission.slot(30):
            pass
    release.set()
    await asyncio.gather(*holders, waiter)


async def test_a_free_slot_admits_even_a_huge_prompt() -> None:
    admission, _ = _admission(max_waiting_prompt_tokens=10)
    async with admission.slot(10**9):
        assert admission.in_flight == 1


async def test_waiters_are_admitted_in_arrival_order() -> None:
    admission, _ = _admission(max_in_flight=1, max_waiting=5)
    release = asyncio.Event()
    order: list[str] = []
    first = asyncio.create_task(_hold(admission, release, tokens=1, log=order))
    await asyncio.sleep(0.01)
    later = []
    for tokens in (2, 3, 4):
        later.append(asyncio.create_task(_hold(admission, release, tokens=tokens, log=order)))
        await asyncio.sleep(0.001)
    release.set()
    await asyncio.gather(first, *later)
    assert order == ["in:1", "in:2", "in:3", "in:4"]


async def test_exceptions_release_the_slot() -> None:
    admission, _ = _admission(max_in_flight=1)
    with pytest.raises(ValueError):
        async with admission.slot(1):
            raise ValueError("boom")
    assert admission.in_flight == 0
    async with admission.slot(1):
        assert admission.in_flight == 1


class _FakeRequest:
    """Just enough of starlette's Request: `receive` returns a disconnect when told to."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, str]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_a_client_that_disconnects_while_waiting_leaves_the_queue() -> None:
    admission, metrics = _admission(max_in_flight=1)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(admission, release))
    await asyncio.sleep(0.01)
    request = _FakeRequest()
    entered = []

    async def queued() -> None:
        async with admission.slot(50, request):  # type: ignore[arg-type]
            entered.append(True)

    waiter = asyncio.create_task(queued())
    await asyncio.sleep(0.01)
    assert (admission.waiting, admission.waiting_tokens) == (1, 50)
    request.gone.set()
    with pytest.raises(ClientClosedRequestError):
        await waiter
    assert (admission.waiting, admission.waiting_tokens) == (0, 0)
    assert _value(metrics, "gemma_server_aborted_requests_total", {"reason": "client_disconnected_while_waiting"}) == 1
    release.set()
    await holder
    assert entered == [] and admission.in_flight == 0


async def test_a_cancelled_waiter_does_not_leak_a_slot() -> None:
    admission, _ = _admission(max_in_flight=1)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(admission, release))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(_hold(admission, release))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await holder
    assert (admission.in_flight, admission.waiting) == (0, 0)


async def test_draining_refuses_new_and_waiting_requests_with_503_and_lets_running_ones_finish() -> None:
    admission, metrics = _admission(max_in_flight=1)
    release = asyncio.Event()
    running = asyncio.create_task(_hold(admission, release))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(_hold(admission, release))
    await asyncio.sleep(0.01)
    admission.start_draining()
    with pytest.raises(ServiceUnavailableError) as caught:
        await waiting
    assert caught.value.status_code == 503 and caught.value.headers == {"Retry-After": "3"}
    with pytest.raises(ServiceUnavailableError):
        async with admission.slot(1):
            pass
    assert not await admission.wait_idle(0.05)
    release.set()
    await running
    assert await admission.wait_idle(0.05)
    assert _value(metrics, "gemma_server_rejected_requests_total", {"reason": "draining"}) == 2


def test_prompt_estimate_counts_text_and_images() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "x" * 300},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "y" * 30},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}},
                    ],
                },
            ],
        }
    )
    assert estimate_prompt_tokens(chat_request(request)) == 1 + 330 // 3 + 260


# ---- several API processes: the bounds are over all of them ----------------------------------------------


def _siblings(max_in_flight: int, max_waiting: int = 4) -> tuple[Admission, Admission, AdmissionCounts]:
    """Two API processes' admissions on one shared count (in one process here: the count is shared
    memory either way; tests/unit/test_api_processes.py and the live suite run real processes)."""
    shared = AdmissionCounts.shared()
    settings = AdmissionSettings(
        max_in_flight=max_in_flight, max_waiting=max_waiting, max_waiting_prompt_tokens=1000, retry_after_seconds=3
    )
    return Admission(settings, Metrics(), shared), Admission(settings, Metrics(), shared), shared


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition did not hold within 1 s")


async def test_max_in_flight_bounds_the_sum_over_api_processes() -> None:
    first, second, shared = _siblings(max_in_flight=3)
    release = asyncio.Event()
    holders = [asyncio.create_task(_hold(first, release)) for _ in range(2)]
    holders.append(asyncio.create_task(_hold(second, release)))
    queued = asyncio.create_task(_hold(second, release))
    await asyncio.sleep(0.02)
    assert (first.in_flight, second.in_flight, shared.in_flight) == (2, 1, 3)
    assert second.waiting == 1  # room in a process of its own would have let it in: the sum is full
    release.set()
    await asyncio.gather(*holders, queued)
    assert (first.in_flight, second.in_flight, shared.in_flight, shared.waiting) == (0, 0, 0, 0)


async def test_max_waiting_bounds_the_sum_over_api_processes() -> None:
    first, second, shared = _siblings(max_in_flight=1, max_waiting=2)
    release = asyncio.Event()
    tasks = [asyncio.create_task(_hold(first, release, tokens=10))]
    tasks.append(asyncio.create_task(_hold(first, release, tokens=20)))
    tasks.append(asyncio.create_task(_hold(second, release, tokens=30)))
    await asyncio.sleep(0.02)
    assert (first.waiting, second.waiting, shared.waiting, shared.waiting_tokens) == (1, 1, 2, 50)
    for admission in (first, second):  # each process has room of its own, but the sum is full
        with pytest.raises(RateLimitError) as refused:
            async with admission.slot(10):
                pass
        assert refused.value.headers == {"Retry-After": "3"}
    release.set()
    await asyncio.gather(*tasks)
    assert (shared.in_flight, shared.waiting, shared.waiting_tokens) == (0, 0, 0)


async def test_a_slot_freed_in_one_process_reaches_a_request_waiting_in_another() -> None:
    first, second, shared = _siblings(max_in_flight=2)
    release_first, release_second = asyncio.Event(), asyncio.Event()
    holders = [asyncio.create_task(_hold(first, release_first)) for _ in range(2)]
    await asyncio.sleep(0.01)
    log: list[str] = []
    waiting = asyncio.create_task(_hold(second, release_second, tokens=7, log=log))
    await asyncio.sleep(0.02)
    assert log == [] and second.waiting == 1
    release_first.set()  # the first process frees both slots; nothing happens in the second one
    await asyncio.gather(*holders)
    await _until(lambda: bool(log))
    assert log == ["in:7"] and second.in_flight == 1 and shared.in_flight == 1
    release_second.set()
    await waiting
    assert (shared.in_flight, shared.waiting) == (0, 0)


async def test_a_new_request_does_not_overtake_one_waiting_in_another_process() -> None:
    first, second, shared = _siblings(max_in_flight=1)
    release_holder, release_rest = asyncio.Event(), asyncio.Event()
    log: list[str] = []
    holder = asyncio.create_task(_hold(first, release_holder, tokens=1, log=log))
    await asyncio.sleep(0.01)
    earlier = asyncio.create_task(_hold(second, release_rest, tokens=2, log=log))
    await asyncio.sleep(0.01)
    release_holder.set()
    await holder  # a slot is free now, and a request waits for it in the second process
    later = asyncio.create_task(_hold(first, release_rest, tokens=3, log=log))
    await asyncio.sleep(0)  # the later request's own process has nobody waiting, and a free slot
    assert first.waiting == 1, "it took the free slot ahead of the request waiting in the other process"
    await _until(lambda: len(log) == 2)
    assert log == ["in:1", "in:2"]
    release_rest.set()
    await asyncio.gather(earlier, later)
    assert log == ["in:1", "in:2", "in:3"] and (shared.in_flight, shared.waiting) == (0, 0)
