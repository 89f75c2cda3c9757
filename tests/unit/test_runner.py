"""The engine runner: errors before the first byte, merged batches, cancellation on disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.engine.interface import ChoiceDelta, EngineStep, PreparedPrompt, SamplingOptions
from server.errors import BadRequestError, ClientClosedRequestError
from server.metrics import Metrics
from server.pipeline.disconnect import cancel_on_disconnect
from server.pipeline.models import ServedModel
from server.pipeline.runner import EngineRunner, merge, start_all

BASE = ServedModel("fake-gemma")


class ScriptedEngine:
    """Yields `steps` steps per request, or fails at the first one for request ids starting with "bad"."""

    def __init__(self, steps: int = 3, delay: float = 0.0) -> None:
        self.steps = steps
        self.delay = delay
        self.closed: list[str] = []

    async def generate(
        self, prompt: PreparedPrompt, options: SamplingOptions, request_id: str, adapter: Any = None
    ) -> AsyncIterator[EngineStep]:
        try:
            if request_id.startswith("bad"):
                raise BadRequestError("refused", param="n")
            for index in range(self.steps):
                await asyncio.sleep(self.delay)
                yield EngineStep([ChoiceDelta(0, f"{request_id}:{index}", [index])], finished=index == self.steps - 1)
        finally:
            self.closed.append(request_id)


PROMPT = PreparedPrompt(token_ids=[2, 3], num_image_tokens=0, engine_input=None)


def _runner(engine: Any) -> EngineRunner:
    return EngineRunner(engine, Metrics())


async def test_start_raises_request_errors_before_any_output() -> None:
    engine = ScriptedEngine()
    with pytest.raises(BadRequestError):
        await _runner(engine).start(PROMPT, SamplingOptions(max_tokens=3), "bad-1", 0.0, BASE)
    assert engine.closed == ["bad-1"]


async def test_start_returns_every_step_including_the_first() -> None:
    steps = await _runner(ScriptedEngine()).start(PROMPT, SamplingOptions(max_tokens=3), "r", 0.0, BASE)
    assert [step.choices[0].text async for step in steps] == ["r:0", "r:1", "r:2"]


async def test_start_all_leaves_nothing_running_when_one_fails() -> None:
    engine = ScriptedEngine()
    runner = _runner(engine)
    options = SamplingOptions(max_tokens=3)
    with pytest.raises(BadRequestError):
        await start_all(runner, [(PROMPT, options, "ok-1"), (PROMPT, options, "bad-2")], 0.0, BASE)
    assert sorted(engine.closed) == ["bad-2", "ok-1"]


async def test_merge_interleaves_and_tags_items() -> None:
    runner = _runner(ScriptedEngine(delay=0.001))
    options = SamplingOptions(max_tokens=3)
    started = await start_all(runner, [(PROMPT, options, "a"), (PROMPT, options, "b")], 0.0, BASE)
    seen = [(index, step.choices[0].text) async for index, step in merge(started)]
    assert sorted(seen) == [(0, "a:0"), (0, "a:1"), (0, "a:2"), (1, "b:0"), (1, "b:1"), (1, "b:2")]
    assert [text for index, text in seen if index == 0] == ["a:0", "a:1", "a:2"]


class DisconnectingRequest:
    async def receive(self) -> dict[str, str]:
        await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}


async def test_disconnect_cancels_the_work() -> None:
    engine = ScriptedEngine(steps=1000, delay=0.01)
    runner = _runner(engine)

    async def consume() -> None:
        steps = await runner.start(PROMPT, SamplingOptions(max_tokens=1000), "slow", 0.0, BASE)
        async for _ in steps:
            pass

    with pytest.raises(ClientClosedRequestError) as caught:
        await cancel_on_disconnect(DisconnectingRequest(), consume())  # type: ignore[arg-type]
    assert caught.value.status_code == 499
    assert engine.closed == ["slow"]
