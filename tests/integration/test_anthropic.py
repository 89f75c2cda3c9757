"""Anthropic's Messages API on the live server and the real vLLM engine, through the official `anthropic` SDK."""

from __future__ import annotations

import base64
import json

import anthropic
import httpx
import openai
import pytest

from tests.support.chat_request import assert_healthy
from tests.support.image_host import ImageHost
from tests.support.images import encode, make_image
from tests.support.live_server import SERVED_MODEL

WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    # An enum: a constrained call is then a few tokens (a free string may run past max_tokens).
    "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lima"]}}, "required": ["city"]},
}
HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]
GREEDY = {"temperature": 0}
NOT_AN_IMAGE = base64.b64encode(b"not an image").decode()
PNG = base64.b64encode(encode(make_image(320, 240, (200, 40, 40)), "PNG")).decode()


@pytest.fixture(scope="module")
def client(base_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def test_greedy_text_equals_chat_completions_on_the_same_conversation(
    client: anthropic.Anthropic, openai_client: openai.OpenAI
) -> None:
    system = "You are a poet."
    # anthropic 2.x's create() has no `temperature` argument any more; the API field still exists.
    message = client.messages.create(
        model=SERVED_MODEL,
        max_tokens=12,
        system=system,
        messages=HAIKU,  # type: ignore[arg-type]
        extra_body=GREEDY,
    )
    chat = openai_client.chat.completions.create(
        model=SERVED_MODEL, max_tokens=12, temperature=0, messages=[{"role": "system", "content": system}, *HAIKU]
    )
    assert message.content[0].text == chat.choices[0].message.content  # type: ignore[union-attr]
    assert message.usage.output_tokens == chat.usage.completion_tokens  # type: ignore[union-attr]
    prompt = message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    assert prompt == chat.usage.prompt_tokens  # type: ignore[union-attr]
    assert message.stop_reason == "max_tokens"
    counted = client.messages.count_tokens(model=SERVED_MODEL, system=system, messages=HAIKU)  # type: ignore[arg-type]
    assert counted.input_tokens == prompt


def test_streamed_text_joins_to_the_unstreamed_text(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model=SERVED_MODEL, max_tokens=10, messages=HAIKU, extra_body=GREEDY)  # type: ignore[arg-type]
    with client.messages.stream(model=SERVED_MODEL, max_tokens=10, messages=HAIKU, extra_body=GREEDY) as stream:  # type: ignore[arg-type]
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds and "message_delta" in kinds
    assert final.content[0].text == whole.content[0].text  # type: ignore[union-attr]
    assert final.usage.output_tokens == whole.usage.output_tokens == 10


def test_images_by_base64_and_by_url_count_in_count_tokens(client: anthropic.Anthropic, image_host: ImageHost) -> None:
    url = image_host.add("anthropic-red.png", base64.b64decode(PNG))
    for source in (
        {"type": "base64", "media_type": "image/png", "data": PNG},
        {"type": "url", "url": url},
    ):
        content = [{"type": "image", "source": source}, {"type": "text", "text": "What is this?"}]
        messages = [{"role": "user", "content": content}]
        message = client.messages.create(model=SERVED_MODEL, max_tokens=3, messages=messages)  # type: ignore[arg-type]
        counted = client.messages.count_tokens(model=SERVED_MODEL, messages=messages)  # type: ignore[arg-type]
        text_only = client.messages.count_tokens(
            model=SERVED_MODEL, messages=[{"role": "user", "content": "What is this?"}]
        )
        assert counted.input_tokens == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
        assert counted.input_tokens > text_only.input_tokens + 4  # the image's tokens are counted


def test_a_forced_tool_call_round_trip(client: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    message = client.messages.create(
        model=SERVED_MODEL,
        max_tokens=64,
        messages=ask,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert message.stop_reason == "tool_use"
    call = message.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather" and isinstance(call.input, dict)
    assert call.input == {"city": "Paris"} or call.input == {"city": "Lima"}  # constrained to the schema
    with client.messages.stream(
        model=SERVED_MODEL,
        max_tokens=64,
        messages=ask,
        tools=[WEATHER],
        # One call, greedy: a bounded length (parallel calls at temperature 1 may run past max_tokens).
        tool_choice={"type": "any", "disable_parallel_tool_use": True},  # type: ignore[arg-type,list-item]
        extra_body={"temperature": 0},  # this SDK's stream() no longer takes sampling parameters
    ) as stream:
        events = list(stream)
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use" and streamed.content[-1].type == "tool_use"
    # The tool input streams as it is generated (input_json_delta), not in one piece.
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta"]  # type: ignore[union-attr]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == streamed.content[-1].input  # type: ignore[union-attr]
    history = [
        *ask,
        {"role": "assistant", "content": [block.model_dump() for block in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}]},
    ]
    answer = client.messages.create(model=SERVED_MODEL, max_tokens=4, messages=history, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert answer.stop_reason in ("max_tokens", "end_turn", "tool_use")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ([{"type": "tool_result", "tool_use_id": "toolu_missing", "content": "r"}], "tool_use_id"),
        ([{"type": "document", "source": {"type": "text", "data": "x"}}], "document"),
        ([{"type": "image", "source": {"type": "url", "url": "http://127.0.0.1:1/x.png"}}], "image"),
        ([{"type": "image", "source": {"type": "url", "url": "file:///etc/passwd"}}], "image"),
        (
            [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "bm90IGFuIGltYWdl"}}],
            "image",
        ),
        ([{"type": "text"}], "text"),
    ],
)
def test_bad_input_is_a_400_in_anthropic_shape_and_the_server_stays_healthy(
    client: anthropic.Anthropic, base_url: str, content: list[dict], needle: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=SERVED_MODEL, max_tokens=3, messages=[{"role": "user", "content": content}])  # type: ignore[arg-type,typeddict-item]
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and needle in body["error"]["message"]
    assert "Traceback" not in body["error"]["message"]
    assert_healthy(base_url)


def test_unknown_model_is_not_found_and_every_answer_has_a_request_id(base_url: str) -> None:
    response = httpx.post(
        base_url + "/v1/messages?beta=true",
        json={"model": "claude-nonexistent", "max_tokens": 3, "messages": HAIKU},
        headers={"anthropic-version": "2023-06-01"},
        timeout=60,
    )
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    assert response.headers["request-id"].startswith("req_")
