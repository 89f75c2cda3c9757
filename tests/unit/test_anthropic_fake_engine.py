"""Anthropic's Messages API in process, on a scripted engine, through the official `anthropic` SDK.

The scripted engine "writes" what a real model would (a tool call in Gemma's JSON form, prose), so
the SDK's own parsing of bodies and streams checks the wire format; the live tier runs the same
protocol on the real engine. (anthropic 2.x speaks over `httpx2`, whose ASGI transport runs the app
in process.)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import pytest
from asgi_lifespan import LifespanManager

from server.app import create_app
from server.settings import Settings
from tests.support.fake_engine import Scripted, ScriptedEngine

WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
USER = [{"role": "user", "content": "Weather in Paris?"}]
MODEL = "claude-opus-4-8"  # an alias of the served model in these tests


@pytest.fixture
async def served(tokenizer: Any) -> AsyncIterator[tuple[anthropic.AsyncAnthropic, ScriptedEngine, Scripted]]:
    script = Scripted()
    engine = ScriptedEngine(tokenizer, script)

    async def start() -> None:
        pass

    settings = Settings.model_validate(
        {"model": {"served_name": "fake-gemma", "aliases": {MODEL: "fake-gemma"}}, "auth": {"api_keys": ["sk-a"]}}
    )
    app = create_app(settings, engine=engine, start_engine=start)  # type: ignore[arg-type]
    async with LifespanManager(app):
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://test") as http:
            client = anthropic.AsyncAnthropic(base_url="http://test", api_key="sk-a", http_client=http, max_retries=0)
            yield client, engine, script


async def test_a_message_and_its_usage(served) -> None:  # type: ignore[no-untyped-def]
    client, engine, _ = served
    message = await client.messages.create(
        model=MODEL, max_tokens=50, system=[{"type": "text", "text": "Be brief."}], messages=USER
    )
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == MODEL and message.content[0].type == "text"
    assert message.content[0].text == "Hello there." and message.stop_reason == "end_turn"
    counted = await client.messages.count_tokens(
        model=MODEL, system=[{"type": "text", "text": "Be brief."}], messages=USER
    )
    assert counted.input_tokens == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    assert "Be brief.\n\nWeather in Paris?" in engine.prompts[-1]  # the system text folded, as Gemma does


async def test_max_tokens_and_stop_sequences_give_their_stop_reasons(served) -> None:  # type: ignore[no-untyped-def]
    client, _, script = served
    script.text = "one two three four five six"
    cut = await client.messages.create(model=MODEL, max_tokens=2, messages=USER)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2


async def test_a_tool_call_in_a_body_and_in_a_stream(served) -> None:  # type: ignore[no-untyped-def]
    client, engine, script = served
    script.text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    message = await client.messages.create(model=MODEL, max_tokens=60, messages=USER, tools=[WEATHER])
    assert message.stop_reason == "tool_use"
    call = message.content[-1]
    assert call.type == "tool_use" and call.id.startswith("toolu_") and call.input == {"city": "Paris"}
    async with client.messages.stream(
        model=MODEL, max_tokens=60, messages=USER, tools=[WEATHER], tool_choice={"type": "any"}
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "Paris"}  # type: ignore[union-attr]
    # The tool input streams as it is generated (input_json_delta), and the pieces make the input.
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta"]  # type: ignore[union-attr]
    assert len(pieces) > 3 and json.loads("".join(pieces)) == {"city": "Paris"}
    assert engine.seen[-1].json_schema is not None  # "any": decoding constrained to a call
    history = [
        *USER,
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}]},
    ]
    script.text = "It is sunny."
    answer = await client.messages.create(model=MODEL, max_tokens=60, messages=history, tools=[WEATHER])
    assert answer.content[0].text == "It is sunny."  # type: ignore[union-attr]
    assert "Sunny, 21 C" in engine.prompts[-1]


async def test_text_streams_as_anthropic_events(served) -> None:  # type: ignore[no-untyped-def]
    client, _, script = served
    script.text = "Streaming words here"
    async with client.messages.stream(model=MODEL, max_tokens=50, messages=USER) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Streaming words here" and final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        (
            [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"}]}],
            "tool_use_id",
        ),
        ([{"role": "user", "content": [{"type": "document", "source": {}}]}], "document"),
        ([{"role": "user", "content": [{"type": "video", "url": "x"}]}], "unsupported type"),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/tiff", "data": "x"}}
                    ],
                }
            ],
            "media_type",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "!!"}}
                    ],
                }
            ],
            "base64",
        ),
    ],
)
async def test_bad_blocks_are_400s_in_anthropic_shape(served, messages: list[Any], needle: str) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = served
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(model=MODEL, max_tokens=5, messages=messages)
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert needle in body["error"]["message"]  # type: ignore[index]
    assert caught.value.response.headers["request-id"].startswith("req_")
    ok = await client.messages.create(model=MODEL, max_tokens=5, messages=USER)  # the server is still fine
    assert ok.stop_reason in ("end_turn", "max_tokens")


async def test_errors_map_to_the_sdk_classes(served) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = served
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="no-such-model", max_tokens=5, messages=USER)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    wrong_key = client.with_options(api_key="sk-wrong")
    with pytest.raises(anthropic.AuthenticationError):
        await wrong_key.messages.create(model=MODEL, max_tokens=5, messages=USER)
    with pytest.raises(anthropic.BadRequestError):  # max_tokens is required, as Anthropic requires it
        await client.post("/v1/messages", body={"model": MODEL, "messages": USER}, cast_to=httpx2.Response)
    with pytest.raises(anthropic.BadRequestError, match="unknown_field"):
        await client.post(
            "/v1/messages",
            body={"model": MODEL, "max_tokens": 5, "messages": USER, "unknown_field": 1},
            cast_to=httpx2.Response,
        )
    # What Claude Code sends beside the conversation is accepted: thinking, context_management, ...
    extras = {
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": []},
        "output_config": {"effort": "high"},
    }
    beta = await client.post(
        "/v1/messages?beta=true",
        body={"model": MODEL, "max_tokens": 5, "messages": USER, "metadata": {"user_id": "u"}, **extras},
        cast_to=httpx2.Response,
    )
    assert beta.status_code == 200


async def test_bearer_and_x_api_key_are_the_same_keys(served) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = served
    bearer = client.with_options(api_key=None, auth_token="sk-a")  # Authorization: Bearer
    message = await bearer.messages.create(model=MODEL, max_tokens=5, messages=USER)
    assert message.type == "message"
