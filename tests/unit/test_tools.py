"""Gemma 3 function calling: prompt, constraint schemas, and parsing calls out of crafted model text.

The random tiny model almost never writes a call by itself ("auto"), so the parser is tested here on
text written the way a real Gemma 3 answers; the end-to-end path is tested with constrained
decoding ("required", named) in the integration tests.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.pipeline.events import ParsedCall, ToolCallDelta, ToolCallStart
from server.pipeline.tools import CallPiece, ToolCallExtractor, ToolPlan, call_schema, parse_tool_calls, plan_tools
from server.protocols.openai.chat import tools_of
from server.protocols.openai.wire import NamedToolChoice, Tool

WEATHER = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
)
TIME = Tool.model_validate({"type": "function", "function": {"name": "get-time"}})


def _plan(tools: list[Tool] | None, choice: str | NamedToolChoice | None, *, parallel: bool = True) -> ToolPlan:
    return plan_tools(tools_of(tools, choice, parallel))


FUNCTIONS = {function.name: function for function in tools_of([WEATHER, TIME], None).functions}  # type: ignore[union-attr]
AUTO = _plan([WEATHER, TIME], "auto")


def _calls(text: str) -> list[tuple[str, dict]] | None:
    calls = parse_tool_calls(text, FUNCTIONS)
    return None if calls is None else [(call.name, json.loads(call.arguments)) for call in calls]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
        ('  {"name": "get-time", "parameters": {}}\n', [("get-time", {})]),
        ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}', [("get_weather", {"city": "Oslo"})]),
        (
            '[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get-time", "arguments": {}}]',
            [("get_weather", {"city": "A"}), ("get-time", {})],
        ),
        ('get_weather(city="Paris", unit="c")', [("get_weather", {"city": "Paris", "unit": "c"})]),
        ("get_weather('Rome', 'f')", [("get_weather", {"city": "Rome", "unit": "f"})]),
        (
            "[get_weather(city='A'), get_weather(city='B')]",
            [("get_weather", {"city": "A"}), ("get_weather", {"city": "B"})],
        ),
        ('print(get_weather(city="Paris"))', [("get_weather", {"city": "Paris"})]),
        (
            "get_weather(city='x', unit=null, extra={'a': [1, 2.5, true, -3]})",
            [("get_weather", {"city": "x", "unit": None, "extra": {"a": [1, 2.5, True, -3]}})],
        ),
    ],
)
def test_calls_are_recognized(text: str, expected: list) -> None:
    assert _calls(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The weather is nice.",
        '{"name": "delete_everything", "arguments": {}}',  # not a declared function
        '{"name": "get_weather", "arguments": {"city": "A"}, "note": "x"}',  # not only a call
        '{"answer": 42}',
        "get_weather(city=os.system('rm -rf /'))",  # only literals are arguments
        "get_weather(**{'city': 'x'})",
        "get_weather('a', 'b', 'c')",  # more positional arguments than parameters
        "get_weather(city='x') + 1",
        '{"name": "get_weather", "arguments": [1]}',
        "[" * 5000,
    ],
)
def test_other_text_is_not_a_call(text: str) -> None:
    assert _calls(text) is None


def _run(text: str, chunks: list[str], plan=AUTO) -> tuple[str, list[tuple[str, str]]]:  # type: ignore[no-untyped-def]
    """The content and the calls; also checks that the streamed pieces of each call make the call."""
    content, calls, _ = _stream(chunks, plan)
    return content, calls


def _stream(chunks: list[str], plan=AUTO) -> tuple[str, list[tuple[str, str]], list[int]]:  # type: ignore[no-untyped-def]
    """(content, calls, how many chunks each call's arguments came in) of the text fed in `chunks`."""
    extractor = ToolCallExtractor(plan, index=3)
    content = ""
    pieces: list[CallPiece] = []
    for chunk in chunks:
        text, new = extractor.feed(chunk)
        content += text
        pieces += new
    rest, last, calls = extractor.finish()
    pieces += last
    streamed: list[tuple[str, str, str]] = []  # id, name, arguments
    deltas: list[int] = []
    for piece in pieces:
        assert piece.index == 3
        if isinstance(piece, ToolCallStart):
            assert piece.position == len(streamed)
            streamed.append((piece.id, piece.name, ""))
            deltas.append(0)
        else:
            call_id, name, arguments = streamed[piece.position]
            streamed[piece.position] = (call_id, name, arguments + piece.arguments)
            deltas[piece.position] += 1
    assert streamed == [(call.id, call.name, call.arguments) for call in calls]
    return content + rest, [(call.name, call.arguments) for call in calls], deltas


def _fed(extractor: ToolCallExtractor, text: str) -> str:
    content, pieces = extractor.feed(text)
    assert pieces == []
    return content


def test_extractor_streams_plain_text_at_once() -> None:
    extractor = ToolCallExtractor(AUTO)
    assert _fed(extractor, "Hello") == "Hello"
    assert _fed(extractor, " world, `code` here") == " world, `code` here"
    assert _fed(extractor, " and ``") == " and "  # a fence may be starting: wait
    assert _fed(extractor, "x") == "``x"


def test_extractor_holds_a_possible_call_until_the_end() -> None:
    extractor = ToolCallExtractor(AUTO)
    assert _fed(extractor, "get_wea") == ""  # could be the start of get_weather(...)
    assert _fed(extractor, 'ther(city="Paris")') == ""
    rest, pieces, calls = extractor.finish()
    assert rest == "" and [c.name for c in calls] == ["get_weather"]
    assert [type(piece) for piece in pieces] == [ToolCallStart, ToolCallDelta]  # sent whole at the end


def test_extractor_releases_a_name_that_turns_out_to_be_prose() -> None:
    extractor = ToolCallExtractor(AUTO)
    assert _fed(extractor, "get") == ""
    assert _fed(extractor, " the weather") == "get the weather"


def test_json_call_arguments_stream_as_they_are_written() -> None:
    text = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
    extractor = ToolCallExtractor(AUTO)
    pieces = [piece for char in text for piece in extractor.feed(char)[1]]
    start = text.index('{"city"')
    assert pieces[0] == ToolCallStart(0, 0, pieces[0].id, "get_weather")  # type: ignore[union-attr]
    assert len(pieces) == 1 + len(text) - 1 - start  # then one delta per character, to the object's end
    assert "".join(piece.arguments for piece in pieces[1:]) == '{"city": "Paris", "unit": "c"}'  # type: ignore[union-attr]
    assert extractor.finish()[1:] == ([], [ParsedCall("get_weather", '{"city": "Paris", "unit": "c"}', pieces[0].id)])
    assert extractor.complete


@pytest.mark.parametrize("plan", [AUTO, _plan([WEATHER, TIME], "required")])
def test_each_call_of_a_list_streams_in_turn(plan: ToolPlan) -> None:
    text = '[{"name":"get_weather","arguments":{"city":"Lima"}}, {"name":"get-time","arguments":{}}]'
    content, calls, deltas = _stream(list(text), plan)
    assert content == "" and calls == [("get_weather", '{"city":"Lima"}'), ("get-time", "{}")]
    assert deltas == [len('{"city":"Lima"}'), 2]


def test_a_fenced_json_call_streams_and_the_prose_before_it_is_content() -> None:
    text = 'Checking.\n```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```'
    content, calls, deltas = _stream(list(text))
    assert content == "Checking.\n" and calls == [("get_weather", '{"city": "Oslo"}')]
    assert deltas == [len('{"city": "Oslo"}')]


def test_a_call_cut_by_the_limit_ends_with_what_was_written() -> None:
    extractor = ToolCallExtractor(_plan([WEATHER], "required"))
    text = '{"name": "get_weather", "arguments": {"city": "Par'
    assert extractor.feed(text)[0] == ""
    content, pieces, calls = extractor.finish()
    assert content == "" and pieces == [] and [c.arguments for c in calls] == ['{"city": "Par']
    assert not extractor.complete


def test_calls_that_cannot_stream_go_whole_at_the_end() -> None:
    # Arguments before the name, arguments as a string: recognized once the text is complete.
    for text in (
        '{"arguments": {"city": "Rome"}, "name": "get_weather"}',
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}',
    ):
        content, calls, deltas = _stream(list(text))
        assert (content, calls, deltas) == ("", [("get_weather", '{"city": "Rome"}')], [1])


def test_an_undeclared_function_does_not_stream_and_stays_content() -> None:
    text = '{"name": "rm_rf", "arguments": {"path": "/"}}'
    assert _stream(list(text)) == (text, [], [])


def test_fenced_call_after_prose() -> None:
    text = 'Let me look.\n```tool_code\nget_weather(city="Paris")\n```\nOne moment.'
    content, calls = _run(text, [text])
    assert content == "Let me look.\n\nOne moment."
    assert calls == [("get_weather", '{"city": "Paris"}')]


def test_fence_that_is_not_a_call_comes_back_as_content() -> None:
    text = "Here:\n```python\nprint('hi')\n```"
    assert _run(text, [text]) == (text, [])


@given(
    text=st.one_of(
        st.text(alphabet=st.sampled_from(list('ab `{}[]()"=\n,get_weather:')), max_size=60),
        st.sampled_from(
            [
                '{"name": "get_weather", "arguments": {"city": "Paris"}}',
                'Sure.\n```json\n{"name": "get-time", "arguments": {}}\n```',
                "get_weather(city='x')",
                "getaway ``` not closed",
            ]
        ),
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=10),
)
def test_streaming_and_whole_text_agree(text: str, cuts: list[int]) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert _run(text, chunks) == _run(text, [text])
    content, calls = _run(text, chunks)
    if not calls:
        assert content == text  # nothing is ever lost


def test_constrained_output_is_held_and_parsed() -> None:
    plan = _plan([WEATHER, TIME], "required")
    text = '[{"name":"get_weather","arguments":{"city":"Lima"}}]'
    assert _run(text, list(text), plan) == ("", [("get_weather", '{"city":"Lima"}')])
    truncated = '{"name":"get_weather","argu'  # no argument written yet: not a call
    assert _run(truncated, [truncated], plan) == (truncated, [])


def test_plans() -> None:
    assert not _plan(None, None).active
    assert not _plan([WEATHER], "none").active
    auto = _plan([WEATHER], None)
    assert auto.mode == "auto" and auto.constraint is None
    assert "If no function is needed, answer normally." in (auto.prompt_text or "")
    required = _plan([WEATHER, TIME], "required", parallel=False)
    assert "You must call at least one function now." in (required.prompt_text or "")
    named = _plan([WEATHER, TIME], NamedToolChoice.model_validate({"function": {"name": "get-time"}}))
    assert named.mode == "named" and "You must call the function get-time now." in (named.prompt_text or "")
    assert '"name": "get_weather"' in (named.prompt_text or "")  # every tool is described


def test_constraint_schemas_admit_exactly_valid_calls() -> None:
    one = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}
    two = {"name": "get-time", "arguments": {}}
    parallel = call_schema([WEATHER.function, TIME.function], parallel=True)
    single = call_schema([WEATHER.function, TIME.function], parallel=False)
    named = call_schema([TIME.function], parallel=False)
    for schema in (parallel, single, named):
        jsonschema.Draft202012Validator.check_schema(schema)
    assert _valid(parallel, one) and _valid(parallel, [one, two]) and not _valid(parallel, [])
    assert _valid(single, one) and not _valid(single, [one])
    assert _valid(named, two) and not _valid(named, one)
    assert not _valid(single, {"name": "get_weather", "arguments": {"unit": "c"}})  # city is required
    assert not _valid(single, {"name": "get_weather", "arguments": {"city": "x", "unit": "k"}})
    assert not _valid(single, {"name": "other", "arguments": {}})


def test_definitions_move_to_the_root_with_their_references() -> None:
    tool = Tool.model_validate(
        {
            "function": {
                "name": "book",
                "parameters": {
                    "type": "object",
                    "properties": {"guest": {"$ref": "#/$defs/person"}},
                    "required": ["guest"],
                    "$defs": {
                        "person": {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
                    },
                },
            }
        }
    )
    schema = call_schema([WEATHER.function, tool.function], parallel=False)
    assert "f1_person" in schema["$defs"]
    assert _valid(schema, {"name": "book", "arguments": {"guest": {"age": 3}}})
    assert not _valid(schema, {"name": "book", "arguments": {"guest": {"age": "old"}}})


def _valid(schema: dict, value: object) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)
