"""The Responses API on the live server and the real vLLM engine: the official openai SDK and the OpenAI Agents SDK."""

from __future__ import annotations

import json
import time
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from tests.support.live_server import SERVED_MODEL
from tests.support.oracle_cases import RED_PNG

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    # An enum: a constrained call is then a few tokens (a free string may run past max_output_tokens).
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lima"]}}, "required": ["city"]},
    "strict": True,
}
HAIKU = "Write a haiku about the sea."


class Forecast(BaseModel):
    """The agent's structured final answer: its output is constrained, so it ends by itself."""

    sky: Literal["sunny", "rainy"]


def test_greedy_output_equals_chat_completions_on_the_same_conversation(openai_client: openai.OpenAI) -> None:
    response = openai_client.responses.create(
        model=SERVED_MODEL, instructions="You are a poet.", input=HAIKU, max_output_tokens=12, temperature=0
    )
    chat = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=[{"role": "system", "content": "You are a poet."}, {"role": "user", "content": HAIKU}],
        max_tokens=12,
        temperature=0,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage is not None and chat.usage is not None
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]


def test_stream_retrieve_input_items_delete(openai_client: openai.OpenAI) -> None:
    stream = openai_client.responses.create(
        model=SERVED_MODEL, input=HAIKU, max_output_tokens=8, temperature=0, stream=True
    )
    events = list(stream)  # (the SDK's stream helper insists on response.completed; this one is cut at 8)
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert "response.output_text.delta" in kinds
    final = events[-1].response  # type: ignore[union-attr]
    stored = openai_client.responses.retrieve(final.id)
    assert stored.output_text == final.output_text and stored.usage.output_tokens == 8  # type: ignore[union-attr]
    items = openai_client.responses.input_items.list(final.id)
    assert [item.type for item in items.data] == ["message"]
    follow = openai_client.responses.create(
        model=SERVED_MODEL, input="And another.", previous_response_id=final.id, max_output_tokens=4
    )
    assert follow.usage is not None and stored.usage is not None
    assert follow.usage.input_tokens > stored.usage.input_tokens + 8  # the earlier turn is in the prompt
    openai_client.responses.delete(final.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(final.id)


def test_an_image_input_counts_its_tokens(openai_client: openai.OpenAI) -> None:
    plain = openai_client.responses.create(model=SERVED_MODEL, input="What is this?", max_output_tokens=2)
    pictured = openai_client.responses.create(
        model=SERVED_MODEL,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": RED_PNG, "detail": "low"},
                ],
            }
        ],
        max_output_tokens=2,
    )
    assert pictured.usage.input_tokens > plain.usage.input_tokens + 4  # type: ignore[union-attr]


def test_a_forced_function_call_and_its_result(openai_client: openai.OpenAI) -> None:
    response = openai_client.responses.create(
        model=SERVED_MODEL,
        input="Weather in Paris?",
        tools=[WEATHER, {"type": "web_search"}],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
    )
    call = response.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments)["city"] in ("Paris", "Lima")  # constrained to the schema
    assert response.model_extra is not None and response.model_extra["skipped_tools"] == ["web_search"]
    with openai_client.responses.stream(
        model=SERVED_MODEL,
        input="Weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        # One call, greedy: a bounded length (at temperature 1 with parallel calls allowed, the tiny
        # model may write several calls and run past the limit, and then the stream is incomplete).
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=64,
    ) as stream:
        events = list(stream)
        streamed = stream.get_final_response()
    # The arguments stream as they are generated; the pieces make the final arguments.
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]  # type: ignore[union-attr]
    assert len(deltas) > 1 and "".join(deltas) == streamed.output[-1].arguments  # type: ignore[union-attr]
    answer = openai_client.responses.create(
        model=SERVED_MODEL,
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}],
        max_output_tokens=4,
    )
    assert answer.status in ("completed", "incomplete")


def test_background_poll_and_cancel(openai_client: openai.OpenAI) -> None:
    queued = openai_client.responses.create(model=SERVED_MODEL, input=HAIKU, background=True, max_output_tokens=8)
    deadline = time.monotonic() + 300  # a hang bound: the CPU engine makes these 8 tokens in well under a second
    while (polled := openai_client.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, polled
        time.sleep(0.2)
    assert polled.status == "incomplete" and polled.usage.output_tokens == 8  # type: ignore[union-attr]
    long = openai_client.responses.create(model=SERVED_MODEL, input=HAIKU, background=True, max_output_tokens=6000)
    cancelled = openai_client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert openai_client.responses.retrieve(long.id).status == "cancelled"


def test_the_agents_sdk_runs_an_agent_with_a_function_tool(base_url: str) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool

    calls: list[str] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Lima"]) -> str:
        """Weather in a city."""
        calls.append(city)
        return f"Sunny in {city}"

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    agent = Agent(
        name="weather",
        instructions="Answer questions about the weather.",
        tools=[get_weather],
        output_type=Forecast,
        # Forced to call the tool first; the SDK then lets the model answer (in the output type's schema).
        model_settings=ModelSettings(tool_choice="get_weather", max_tokens=200, temperature=0),
        model=OpenAIResponsesModel(model=SERVED_MODEL, openai_client=client),
    )
    result = Runner.run_sync(agent, "Weather in Paris?", max_turns=4, run_config=RunConfig(tracing_disabled=True))
    assert calls, "the tool was never called"
    assert isinstance(result.final_output, Forecast)
    kinds = [item.type for item in result.new_items]
    assert "tool_call_item" in kinds and "tool_call_output_item" in kinds and kinds[-1] == "message_output_item"
