"""Structured output and function calling end to end, on the real engine's constrained decoding.

The random tiny model writes nonsense, but constrained decoding leaves it no choice: with
`response_format` json_schema the text parses and validates; with tool_choice "required" or a named
function the output is always a valid call of a declared function, arguments valid against its
schema. Schemas here bound every string and number, so the nonsense also ends.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.support.live_server import SERVED_MODEL

USER = [{"role": "user", "content": "What's the weather like?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}, "precise": {"type": "boolean"}},
    "required": ["zone", "precise"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER_PARAMETERS},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMETERS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "where": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}},
            "required": ["x"],
            "additionalProperties": False,
        },
    },
    "required": ["colour", "count", "ok", "tags", "where"],
    "additionalProperties": False,
}


def _valid_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_parses_and_validates(openai_client: openai.OpenAI, temperature: float) -> None:
    response = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=USER,
        max_tokens=200,
        temperature=temperature,
        seed=1,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True},
        },
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content or ""), ANSWER_SCHEMA)


def test_json_schema_streamed(openai_client: openai.OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=USER,
        max_tokens=200,
        temperature=0,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), ANSWER_SCHEMA)


def test_json_object_output_is_an_object(openai_client: openai.OpenAI, base_url: str) -> None:
    # Free-form JSON from a random model rarely ends; a bias towards "}" and "{}" makes the object
    # close. ("}" alone is not enough: after a first token `{"` it only fills the key's string.)
    def token(text: str) -> str:
        tokens = httpx.post(f"{base_url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        (only,) = tokens["tokens"]
        return str(only)

    response = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=USER,
        max_tokens=50,
        temperature=0,
        response_format={"type": "json_object"},
        logit_bias={token("}"): 100, token("{}"): 100},
    )
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content or ""), dict)


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_required_always_calls_a_declared_function(openai_client: openai.OpenAI, parallel: bool) -> None:
    response = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=USER,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=parallel,
        max_tokens=300,
        temperature=1.0,
        seed=4,
        n=3,
    )
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        calls = choice.message.tool_calls or []
        assert calls and (parallel or len(calls) == 1)
        assert len({call.id for call in calls}) == len(calls)
        for call in calls:
            _valid_call(call.function.name, call.function.arguments)


def test_named_tool_choice_calls_that_function(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=USER,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=100,
        temperature=0,
    )
    calls = response.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls] == ["get_time"]
    _valid_call("get_time", calls[0].function.arguments)


def test_tool_calls_stream_as_deltas(openai_client: openai.OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=USER,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        max_tokens=300,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert deltas and finish == ["tool_calls"]
    # As OpenAI streams them: a call's first delta has its id, type and name; the arguments follow
    # in pieces as they are generated.
    streamed: dict[int, list[str]] = {}
    pieces: dict[int, int] = {}
    for delta in deltas:
        assert delta.function is not None and delta.function.arguments is not None
        if delta.id is not None:
            assert delta.type == "function" and delta.function.name and delta.index not in streamed
            streamed[delta.index] = [delta.function.name, delta.function.arguments]
            pieces[delta.index] = 0
        else:
            assert delta.function.name is None
            streamed[delta.index][1] += delta.function.arguments
            pieces[delta.index] += 1
    for name, arguments in streamed.values():
        _valid_call(name, arguments)
    assert max(pieces.values()) > 1, pieces  # not in one piece at the end
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    non_streamed = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=300,
        temperature=0,  # type: ignore[arg-type]
    )
    calls = non_streamed.choices[0].message.tool_calls or []
    assert [[c.function.name, c.function.arguments] for c in calls] == list(streamed.values())


def test_tool_results_go_back_into_the_conversation(openai_client: openai.OpenAI) -> None:
    first = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=USER,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=100,
        temperature=0,
    )
    message = first.choices[0].message
    call = (message.tool_calls or [])[0]
    history = [
        *USER,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18})},
    ]
    raw = openai_client.chat.completions.with_raw_response.create(
        model=SERVED_MODEL,
        messages=history,
        tools=TOOLS,
        max_tokens=5,
        temperature=0,  # type: ignore[arg-type]
    )
    assert raw.headers["x-gemma-normalized"] == "tool-calls-rendered,tool-results-folded,tools-rendered,system-folded"
    answer = raw.parse()
    assert answer.usage is not None and answer.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def test_auto_and_none(openai_client: openai.OpenAI) -> None:
    """ "auto" leaves the random model free: whatever it writes, the response is well formed."""
    plain = openai_client.chat.completions.create(model=SERVED_MODEL, messages=USER, max_tokens=8, temperature=0)
    none = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # type: ignore[union-attr]
    assert none.choices[0].message.content == plain.choices[0].message.content
    auto = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=USER,
        tools=TOOLS,
        max_tokens=16,
        temperature=0,  # type: ignore[arg-type]
    )
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # type: ignore[union-attr]
    choice = auto.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
    else:
        assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
