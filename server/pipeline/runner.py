"""The one place serving code hands work to the engine: `EngineRunner.prepare` and `EngineRunner.start`.

Chat completions, text completions and the tokenizer routes all go through here, so what must
happen around every engine call happens once: timing of the multimodal processor, in-flight and
token metrics, time to first token, the count of generations that ended early. (The admission slot
a generation request holds is taken one level up, by the route, before any of this work starts.)

`start` waits for the generation's first step before returning: errors the engine raises for a
request (a bad parameter, a grammar it cannot compile, capacity) surface before any response byte
is sent, so a stream never starts with a 200 only to fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import TypeVar

from server.engine.interface import EngineClient, EnginePrompt, EngineStep, PreparedPrompt, SamplingOptions
from server.metrics import Metrics
from server.pipeline.models import ServedModel

T = TypeVar("T")
_Generation = AsyncGenerator[EngineStep, None]


class Steps:
    """A generation's steps, the first already received. `aclose()` always reaches the engine
    (aborting the request if it still runs), even when iteration never began.
    """

    __slots__ = ("_first", "_rest", "first_step")

    def __init__(self, first: EngineStep | None, rest: _Generation) -> None:
        self._first = first
        self._rest = rest
        self.first_step = first  # kept: the prompt's logprobs come with it

    def __aiter__(self) -> Steps:
        return self

    async def __anext__(self) -> EngineStep:
        first = self._first
        if first is not None:
            self._first = None
            return first
        return await self._rest.__anext__()

    async def aclose(self) -> None:
        self._first = None
        await self._rest.aclose()


class EngineRunner:
    def __init__(self, engine: EngineClient, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._vocab_size: int | None = None

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer knows (prompt ids, logit_bias and stop_token_ids are checked against it)."""
        if self._vocab_size is None:
            self._vocab_size = len(self.engine.tokenizer)
        return self._vocab_size

    async def prepare(self, prompt: EnginePrompt, *, started: float | None = None) -> PreparedPrompt:
        """Runs the engine's multimodal processor (image tokens expanded) on a tokenized prompt.

        `started`: when prompt building began (template, tokenization), for the preprocessing metric.
        """
        started = started if started is not None else time.perf_counter()
        prepared = await self.engine.prepare(prompt)
        self.metrics.preprocess_seconds.observe(time.perf_counter() - started)
        return prepared

    async def start(
        self, prepared: PreparedPrompt, options: SamplingOptions, request_id: str, received: float, served: ServedModel
    ) -> Steps:
        """Starts a generation on `served` (the base model or an adapter) and returns its steps once
        the first one has arrived."""
        steps = self._generate(prepared, options, request_id, received, served)
        try:
            first = await anext(steps)
        except StopAsyncIteration:
            return Steps(None, steps)
        except BaseException:
            await steps.aclose()
            raise
        return Steps(first, steps)

    async def _generate(
        self, prepared: PreparedPrompt, options: SamplingOptions, request_id: str, received: float, served: ServedModel
    ) -> _Generation:
        metrics = self.metrics
        metrics.in_flight.inc()
        completion_tokens = 0
        finished = False
        adapter = served.adapter
        if adapter is not None:
            adapter.began()  # an unload waits for this generation to end
        generation = self.engine.generate(prepared, options, request_id, adapter)
        try:
            async for step in generation:
                for choice in step.choices:
                    if not completion_tokens and choice.token_ids:
                        metrics.time_to_first_token.labels(served.name).observe(time.perf_counter() - received)
                    completion_tokens += len(choice.token_ids)
                yield step
            finished = True
        finally:
            metrics.in_flight.dec()
            if adapter is not None:
                adapter.ended()
            metrics.generations.labels(served.name, "finished" if finished else "ended_early").inc()
            metrics.generation_seconds.labels(served.name).observe(time.perf_counter() - received)
            if finished:
                metrics.prompt_tokens.labels(served.name).inc(len(prepared.token_ids))
                metrics.completion_tokens.labels(served.name).inc(completion_tokens)
            else:
                metrics.aborted.labels("stream_ended_early" if options.stream else "request_ended_early").inc()
            # Closing the engine's generator now (not when it is garbage collected) aborts the request.
            close = getattr(generation, "aclose", None)
            if close is not None:
                await close()


async def start_all(
    runner: EngineRunner, jobs: list[tuple[PreparedPrompt, SamplingOptions, str]], received: float, served: ServedModel
) -> list[Steps]:
    """Starts several generations (a batch of prompts); if one fails to start, none is left running."""
    results = await asyncio.gather(
        *(runner.start(prepared, options, request_id, received, served) for prepared, options, request_id in jobs),
        return_exceptions=True,
    )
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    started = [r for r in results if not isinstance(r, BaseException)]
    if failure is not None:
        for steps in started:
            await steps.aclose()
        raise failure
    return started


async def merge(iterators: list[Steps]) -> AsyncGenerator[tuple[int, EngineStep], None]:
    """The steps of several generations as they come, tagged with the generation's index."""
    pending: dict[asyncio.Task[EngineStep], int] = {}

    def schedule(index: int) -> None:
        pending[asyncio.ensure_future(iterators[index].__anext__())] = index

    for index in range(len(iterators)):
        schedule(index)
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                schedule(index)
                yield index, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for iterator in iterators:
            with contextlib.suppress(Exception):
                await iterator.aclose()
