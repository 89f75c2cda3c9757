"""In-process stand-ins for `server.engine.interface.EngineClient`, for fast tests of one layer.

- `ScriptedEngine`: the real tokenizer of the tiny checkpoint, so prompts are real; `reply(prompt_text,
  options)` gives the text each choice "generates", streamed token by token when the request streams.
  It records every `SamplingOptions` it was asked to use. For the API surface (chat, completions,
  tools, logprobs) without vLLM.
- `PacedEngine` (with `running_app`): no tokenizer, no model; every generated token is "tok " and
  takes `token_seconds`; `fail_after` makes generation raise after that many tokens (an engine error
  mid-stream); `abort_all` ends running generations the way `server/engine/vllm_engine.py` does.
  For what sits in front of the engine: auth, CORS, limits, admission, drain, error shapes.

The live tests never use these: they run the real engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from server.app import create_app
from server.engine.interface import ChoiceDelta, EnginePrompt, EngineStep, PreparedPrompt, SamplingOptions, TokenLogprob
from server.errors import BadRequestError, EngineError, ServiceUnavailableError
from server.settings import Settings

Reply = Callable[[str, SamplingOptions], str]


class Scripted:
    """The text the scripted engine's model writes (a `Reply`); tests set `text`."""

    def __init__(self) -> None:
        self.text = "Hello there."

    def __call__(self, _prompt: str, _options: SamplingOptions) -> str:
        return self.text


class ScriptedEngine:
    model_name = "fake-gemma"
    max_model_len = 1024

    def __init__(self, tokenizer: Any, reply: Reply) -> None:
        self._tokenizer = tokenizer
        self.reply = reply
        self.seen: list[SamplingOptions] = []
        self.prompts: list[str] = []
        self.token_seconds = 0.0  # streamed tokens are this far apart (for tests that act mid-stream)
        self.adapters: dict[int, str] = {}  # LoRA adapters loaded: engine id -> name
        self.adapter_used: list[str | None] = []  # per generation, the adapter's name (None: the base)
        self.refuse_adapters = False  # add_adapter fails like vLLM's worker refusing one

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def is_ready(self) -> bool:
        return True

    @property
    def is_dead(self) -> bool:
        return False

    def default_sampling(self) -> dict[str, Any]:
        return {}

    async def prepare(self, prompt: EnginePrompt) -> PreparedPrompt:
        return PreparedPrompt(token_ids=list(prompt.token_ids), num_image_tokens=0, engine_input=None)

    async def generate(
        self, prompt: PreparedPrompt, options: SamplingOptions, request_id: str, adapter: Any = None
    ) -> AsyncIterator[EngineStep]:
        self.seen.append(options)
        self.adapter_used.append(adapter.name if adapter is not None else None)
        prompt_text = self._tokenizer.decode(prompt.token_ids)
        self.prompts.append(prompt_text)
        text = self.reply(prompt_text, options)
        ids = self._tokenizer.encode(text, add_special_tokens=False)[: options.max_tokens]
        finish = "stop" if len(ids) < options.max_tokens else "length"
        pieces = [self._tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
        texts = [b[len(a) :] for a, b in zip(["", *pieces], pieces, strict=False)]
        if not options.stream:
            yield EngineStep(
                choices=[
                    ChoiceDelta(index, "".join(texts), list(ids), finish, logprobs=self._logprobs(ids, texts, options))
                    for index in range(options.n)
                ],
                finished=True,
            )
            return
        for position, (token, piece) in enumerate(zip(ids, texts, strict=True)):
            if self.token_seconds:
                await asyncio.sleep(self.token_seconds)
            last = position == len(ids) - 1
            yield EngineStep(
                choices=[
                    ChoiceDelta(
                        index,
                        piece,
                        [token],
                        finish if last else None,
                        logprobs=self._logprobs([token], [piece], options),
                    )
                    for index in range(options.n)
                ],
                finished=last,
            )

    def _logprobs(self, ids: list[int], texts: list[str], options: SamplingOptions) -> list[TokenLogprob] | None:
        if options.logprobs is None:
            return None
        return [TokenLogprob(i, t, -0.5, [(i, t, -0.5), (0, "<pad>", -3.0)]) for i, t in zip(ids, texts, strict=True)]

    async def add_adapter(self, adapter: Any) -> None:
        if self.refuse_adapters:
            raise BadRequestError(f"the engine could not load adapter '{adapter.name}': bad shapes", param="lora_path")
        self.adapters[adapter.lora_id] = adapter.name

    async def remove_adapter(self, adapter: Any) -> None:
        self.adapters.pop(adapter.lora_id, None)

    async def abort(self, request_id: str) -> None:
        pass

    async def abort_all(self) -> int:
        return 0

    async def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


# ---- the paced engine, for the front door --------------------------------------------------

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

    def decode(self, token_ids: list[int], **_: Any) -> str:
        return "".join(chr(token) for token in token_ids)

    def __len__(self) -> int:
        return 1000


class PacedEngine:
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
        self, prompt: PreparedPrompt, options: SamplingOptions, request_id: str, adapter: Any = None
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
    settings: Settings, engine: PacedEngine | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, PacedEngine]]:
    """The real app on the fake engine, served in process (no sockets)."""
    engine = engine or PacedEngine()
    app = create_app(settings, engine=engine, start_engine=engine.start)
    async with LifespanManager(app) as manager:
        for _ in range(100):
            if app.state.gemma.ready:
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client:
            yield app, client, engine
