"""The serving logic in process, on a scripted engine: tool calls the way a real Gemma 3 writes them.

The tiny random model almost never writes a call in "auto" mode, so here the engine "writes" exactly
what a real model would, and the official `openai` client parses every response and stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from asgi_lifespan import LifespanManager

from server.app import create_app
from server.protocols.openai.wire import (
    ChatCompletion,
    Completion,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    TokenizeResponse,
)
from server.settings import Settings
from tests.support.fake_engine import Scripted, ScriptedEngine

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
async def served(
    tokenizer: Any,
) -> AsyncIterator[tuple[openai.AsyncOpenAI, ScriptedEngine, Scripted, httpx.AsyncClient]]:
    script = Scripted()
    engine = ScriptedEngine(tokenizer, script)

    async def start() -> None:
        pass

    app = create_app(Settings(), engine=engine, start_engine=start)  # type: ignore[arg-type]
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)
            yield client, engine, script, http


async def test_auto_call_in_python_style_is_a_tool_call(served) -> None:  # type: ignore[no-untyped-def]
    client, engine, script, _ = served
    script.text = 'get_weather(city="Paris")'
    response = await client.chat.completions.create(model="fake-gemma", messages=USER, tools=[WEATHER])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert engine.seen[-1].json_schema is None  # auto: the model is free
    assert "You can call the functions described below" in engine.prompts[-1]


def _streamed_calls(chunks: list) -> list[tuple[int, str, str, int]]:  # type: ignore[type-arg]
    """(index, name, arguments, number of argument deltas) of each streamed call, as a client joins them."""
    calls: dict[int, list] = {}  # type: ignore[type-arg]
    for chunk in chunks:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if tc.id is not None:
                assert tc.index not in calls and tc.function.arguments == ""
                calls[tc.index] = [tc.index, tc.function.name, "", 0]
            else:
                assert tc.function.name is None
                calls[tc.index][2] += tc.function.arguments
                calls[tc.index][3] += 1
    return [tuple(call) for call in calls.values()]  # type: ignore[misc]


async def test_auto_call_streams_as_tool_call_deltas(served) -> None:  # type: ignore[no-untyped-def]
    client, _, script, _ = served
    script.text = 'Let me check.\n```tool_code\nget_weather(city="Paris")\n```'
    stream = await client.chat.completions.create(model="fake-gemma", messages=USER, tools=[WEATHER], stream=True)
    chunks = [chunk async for chunk in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == "Let me check.\n"
    # A Python-style call is recognized once the text is complete: its arguments come in one piece.
    assert _streamed_calls(chunks) == [(0, "get_weather", '{"city": "Paris"}', 1)]
    assert finish == ["tool_calls"]
    whole = await client.chat.completions.create(model="fake-gemma", messages=USER, tools=[WEATHER])
    assert whole.choices[0].message.content == "Let me check.\n"


async def test_json_call_arguments_stream_as_they_are_generated(served) -> None:  # type: ignore[no-untyped-def]
    client, _, script, _ = served
    arguments = '{"city": "Paris", "unit": "c"}'
    script.text = '{"name": "get_weather", "arguments": ' + arguments + "}"
    stream = await client.chat.completions.create(model="fake-gemma", messages=USER, tools=[WEATHER], stream=True)
    chunks = [chunk async for chunk in stream]
    [(index, name, streamed, deltas)] = _streamed_calls(chunks)
    assert (index, name, streamed) == (0, "get_weather", arguments) and deltas > 3  # piece by piece
    whole = await client.chat.completions.create(model="fake-gemma", messages=USER, tools=[WEATHER])
    assert whole.choices[0].message.tool_calls[0].function.arguments == arguments  # the same text


async def test_prose_stays_content_even_with_tools(served) -> None:  # type: ignore[no-untyped-def]
    client, _, script, _ = served
    script.text = "It is sunny in Paris."
    response = await client.chat.completions.create(model="fake-gemma", messages=USER, tools=[WEATHER])
    assert response.choices[0].message.content == "It is sunny in Paris."
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason == "stop"


async def test_required_and_named_constrain_the_output(served) -> None:  # type: ignore[no-untyped-def]
    client, engine, script, _ = served
    script.text = '[{"name":"get_weather","arguments":{"city":"Oslo"}}]'
    response = await client.chat.completions.create(
        model="fake-gemma", messages=USER, tools=[WEATHER], tool_choice="required", n=2
    )
    assert engine.seen[-1].json_schema is not None and "anyOf" in engine.seen[-1].json_schema
    assert [c.finish_reason for c in response.choices] == ["tool_calls", "tool_calls"]
    script.text = '{"name":"get_weather","arguments":{"city":"Oslo"}}'
    stream = await client.chat.completions.create(
        model="fake-gemma",
        messages=USER,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    schema = engine.seen[-1].json_schema
    assert schema is not None and schema["properties"]["name"] == {"const": "get_weather"}
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # constrained text is never content
    [(_, name, arguments, _)] = _streamed_calls(chunks)
    assert name == "get_weather" and json.loads(arguments) == {"city": "Oslo"}


async def test_tool_history_round_trip_and_normalization_header(served) -> None:  # type: ignore[no-untyped-def]
    _, engine, script, http = served
    script.text = "It is 18 C."
    messages = [
        {"role": "system", "content": "Be brief."},
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
    ]
    raw = await http.post(
        "/v1/chat/completions", json={"model": "fake-gemma", "messages": messages, "tools": [WEATHER]}
    )
    assert raw.status_code == 200
    assert raw.headers["x-gemma-normalized"] == "tool-calls-rendered,tool-results-folded,tools-rendered,system-folded"
    assert 'Result of get_weather:\n```tool_output\n{"temp": 18}\n```' in engine.prompts[-1]
    plain = await http.post("/v1/chat/completions", json={"model": "fake-gemma", "messages": USER})
    assert "x-gemma-normalized" not in plain.headers


async def test_continuous_usage_and_logprobs_in_a_stream(served) -> None:  # type: ignore[no-untyped-def]
    client, _, script, _ = served
    script.text = "One two three"
    stream = await client.chat.completions.create(
        model="fake-gemma",
        messages=USER,
        stream=True,
        logprobs=True,
        top_logprobs=2,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
    )
    chunks = [chunk async for chunk in stream]
    with_choices = [c for c in chunks if c.choices]
    assert all(c.usage is not None for c in chunks)
    completion_counts = [c.usage.completion_tokens for c in with_choices]
    assert completion_counts == sorted(completion_counts) and completion_counts[-1] == 3
    tops = [c.choices[0].logprobs.content[0].top_logprobs for c in with_choices if c.choices[0].logprobs]
    assert tops and all(len(top) == 2 for top in tops)


async def test_completions_batch_echo_and_indices(served) -> None:  # type: ignore[no-untyped-def]
    client, _, script, _ = served
    script.text = " world"
    response = await client.completions.create(
        model="fake-gemma", prompt=["Hello", "Bye"], n=2, echo=True, max_tokens=5
    )
    assert [(c.index, c.text) for c in response.choices] == [
        (0, "Hello world"),
        (1, "Hello world"),
        (2, "Bye world"),
        (3, "Bye world"),
    ]
    stream = await client.completions.create(model="fake-gemma", prompt=[[2, 9259]], stream=True, max_tokens=5)
    texts = [c.choices[0].text async for c in stream if c.choices]
    assert "".join(texts) == " world"


async def test_n_greedy_choices_run_as_n_engine_requests(served) -> None:  # type: ignore[no-untyped-def]
    """OpenAI answers n > 1 at temperature 0 with n choices; vLLM refuses n > 1 when greedy, so the
    pipeline runs n requests of one choice each."""
    client, engine, script, _ = served
    script.text = "Same answer"
    before = len(engine.seen)
    response = await client.chat.completions.create(model="fake-gemma", messages=USER, n=3, temperature=0)
    assert [(c.index, c.message.content, c.finish_reason) for c in response.choices] == [
        (i, "Same answer", "stop") for i in range(3)
    ]
    assert [options.n for options in engine.seen[before:]] == [1, 1, 1]
    assert response.usage.completion_tokens == 3 * len(engine.tokenizer.encode("Same answer", add_special_tokens=False))
    stream = await client.chat.completions.create(
        model="fake-gemma", messages=USER, n=2, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert texts == {0: "Same answer", 1: "Same answer"} and finishes == {0: ["stop"], 1: ["stop"]}
    batch = await client.completions.create(model="fake-gemma", prompt=["a", "b"], n=2, temperature=0, max_tokens=5)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    sampled = len(engine.seen)
    await client.chat.completions.create(model="fake-gemma", messages=USER, n=2, temperature=0.7)
    assert [options.n for options in engine.seen[sampled:]] == [2]  # sampled choices stay one request


async def test_bodies_match_the_documented_response_models(served) -> None:  # type: ignore[no-untyped-def]
    """What the server sends validates against the wire models the OpenAPI document is built from."""
    _, _, script, http = served
    script.text = "Hi"
    chat = await http.post("/v1/chat/completions", json={"model": "fake-gemma", "messages": USER, "logprobs": True})
    ChatCompletion.model_validate(chat.json())
    completion = await http.post("/v1/completions", json={"model": "fake-gemma", "prompt": "x", "logprobs": 1})
    Completion.model_validate(completion.json())
    tokens = await http.post("/tokenize", json={"messages": USER})
    TokenizeResponse.model_validate(tokens.json())
    DetokenizeResponse.model_validate((await http.post("/detokenize", json={"tokens": [2, 9259]})).json())
    ModelList.model_validate((await http.get("/v1/models")).json())
    error = await http.post("/v1/chat/completions", json={"model": "fake-gemma", "messages": []})
    assert error.status_code == 400
    ErrorResponse.model_validate(error.json())


async def test_request_field_policy(served) -> None:  # type: ignore[no-untyped-def]
    _, _, _, http = served
    ok = await http.post(
        "/v1/chat/completions", json={"model": "fake-gemma", "messages": USER, "store": False, "metadata": {}}
    )
    assert ok.status_code == 200
    typo = await http.post("/v1/chat/completions", json={"model": "fake-gemma", "messages": USER, "max_token": 3})
    assert typo.status_code == 400
    assert typo.json()["error"]["param"] == "max_token"


async def test_strict_messages_setting_refuses_repairs(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, Scripted())

    async def start() -> None:
        pass

    settings = Settings(server={"strict_messages": True})  # type: ignore[arg-type]
    app = create_app(settings, engine=engine, start_engine=start)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with LifespanManager(app), httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        merged = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        refused = await http.post("/v1/chat/completions", json={"model": "fake-gemma", "messages": merged})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "invalid_conversation"
        folded = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}]
        ok = await http.post("/v1/chat/completions", json={"model": "fake-gemma", "messages": folded})
        assert ok.status_code == 200 and ok.headers["x-gemma-normalized"] == "system-folded"
