"""A tiny in-process stand-in for `server.generation.EngineClient`, and an app built on it.

For tests of what sits in front of the engine (auth, CORS, limits, admission, drain, error shapes):
no model, no vLLM, milliseconds per request. Every generated token is "tok " and takes
`token_seconds`; `fail_after` makes generation raise after that many tokens (an engine error
mid-stream); `abort_all` ends running generations the way `server/engine.py` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from server.app import create_app
from server.errors import EngineError, ServiceUnavailableError
from server.generation import ChoiceDelta, EnginePrompt, EngineStep, PreparedPrompt, SamplingOptions
from server.settings import Settings

MODEL = "fake-gemma"


class FakeTokenizer:
    def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> str:
        parts = []
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                content = " ".join(p.get("text", "<image>") for p in content)
            parts.append(f"<{message['role']}>{content}")
        return "".join(parts)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(ch) % 1000 for ch in text[:4000]]


class FakeEngine:
    def __init__(self, token_seconds: float = 0.0, fail_after: int | None = None) -> None:
        self.model_name = MODEL
        self.max_model_len = 8192
        self.token_seconds = token_seconds
        self.fail_after = fail_after
        self.tokenizer = FakeTokenizer()
        self.is_ready = False
        self.is_dead = False
        self.generating = 0
        self.started = 0
        self._aborted: set[str] = set()
        self._active: set[str] = set()

    def default_sampling(self) -> dict[str, Any]:
        return {}

    async def start(self) -> None:
        self.is_ready = True

    def shutdown(self) -> None:
        self.is_ready = False

    async def prepare(self, prompt: EnginePrompt) -> PreparedPrompt:
        return PreparedPrompt(
            token_ids=list(prompt.token_ids), num_image_tokens=4 * len(prompt.images), engine_input=None
        )

    async def generate(
        self, prompt: PreparedPrompt, options: SamplingOptions, request_id: str
    ) -> AsyncIterator[EngineStep]:
        self.started += 1
        self.generating += 1
        self._active.add(request_id)
        try:
            for produced in range(1, options.max_tokens + 1):
                await asyncio.sleep(self.token_seconds)
                if request_id in self._aborted:
                    raise ServiceUnavailableError("the server stopped this request while shutting down")
                if self.fail_after is not None and produced > self.fail_after:
                    raise EngineError("the engine failed to generate a response")
                last = produced == options.max_tokens
                choices = [
                    ChoiceDelta(index=i, text="tok ", token_ids=[7], finish_reason="length" if last else None)
                    for i in range(options.n)
                ]
                if options.stream or last:
                    yield EngineStep(choices=choices, finished=last)
        finally:
            self.generating -= 1
            self._active.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def abort_all(self) -> int:
        self._aborted |= self._active
        return len(self._active)


def fake_settings(**sections: dict[str, Any]) -> Settings:
    base: dict[str, dict[str, Any]] = {"model": {"served_name": MODEL}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return Settings(**base)


@asynccontextmanager
async def running_app(
    settings: Settings, engine: FakeEngine | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, FakeEngine]]:
    """The real app on the fake engine, served in process (no sockets)."""
    engine = engine or FakeEngine()
    app = create_app(settings, engine=engine, start_engine=engine.start)
    async with LifespanManager(app) as manager:
        for _ in range(100):
            if app.state.gemma.ready:
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client:
            yield app, client, engine
