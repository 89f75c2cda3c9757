"""Gemma 3 message normalization, rendered with the tiny checkpoint's real chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import BadRequestError
from server.pipeline.normalize import normalize
from server.pipeline.prompt import render_prompt
from server.protocols.openai.chat import turns_of
from server.protocols.openai.wire import ChatCompletionRequest


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _messages(*messages: dict) -> list:
    return turns_of(ChatCompletionRequest.model_validate({"model": "m", "messages": list(messages)}).messages)


def _render(tokenizer: Any, *messages: dict, strict: bool = False, tools_text: str | None = None) -> tuple[str, list]:
    conversation = normalize(_messages(*messages), strict=strict, tools_text=tools_text)
    text, _ids = render_prompt(tokenizer, conversation)
    return text, conversation.changes


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_a_conversation_that_fits_is_left_alone(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text, changes = _render(
        tokenizer,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    )
    assert changes == []
    assert text == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )


def test_leading_system_is_folded_by_the_template(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text, changes = _render(tokenizer, {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    assert changes == ["system-folded"]
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_developer_and_late_system_messages_join_the_front(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text, changes = _render(
        tokenizer,
        {"role": "developer", "content": "Rule one."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "system", "content": "Rule two."},
        {"role": "user", "content": "Bye"},
    )
    assert changes == ["developer-as-system", "system-moved", "systems-merged", "system-folded"]
    assert text.startswith("<bos><start_of_turn>user\nRule one.\n\nRule two.\n\nHi<end_of_turn>\n")
    assert text.count("<start_of_turn>user") == 2


def test_system_text_parts_are_all_kept(tokenizer) -> None:  # type: ignore[no-untyped-def]
    # Gemma 3's template alone would keep only the first part of a list-valued system message.
    text, _ = _render(
        tokenizer,
        {"role": "system", "content": [{"type": "text", "text": "A."}, {"type": "text", "text": "B."}]},
        {"role": "user", "content": "Hi"},
    )
    assert "A.\n\nB.\n\nHi" in text


def test_consecutive_user_turns_merge_and_images_keep_their_order(tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = _messages(
        {"role": "user", "content": [{"type": "text", "text": "First"}, _image("data:a")]},
        {"role": "user", "content": "Second"},
        {"role": "user", "content": [_image("data:b"), {"type": "text", "text": "Third"}]},
    )
    conversation = normalize(messages)
    assert conversation.changes == ["merged-user-turns"]
    assert [ref.url for ref in conversation.images] == ["data:a", "data:b"]
    assert [ref.param for ref in conversation.images] == [
        "messages[0].content[1].image_url",
        "messages[2].content[0].image_url",
    ]
    text, _ = render_prompt(tokenizer, conversation)
    assert text == (
        "<bos><start_of_turn>user\nFirst<start_of_image>Second<start_of_image>Third<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_consecutive_text_turns_are_joined_with_a_blank_line(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text, changes = _render(
        tokenizer,
        {"role": "user", "content": "One"},
        {"role": "user", "content": [{"type": "text", "text": "Two"}]},
        {"role": "assistant", "content": "A"},
        {"role": "assistant", "content": "B"},
    )
    assert changes == ["merged-user-turns", "merged-assistant-turns"]
    assert "<start_of_turn>user\nOne\n\nTwo<end_of_turn>" in text
    assert "<start_of_turn>model\nA\n\nB<end_of_turn>" in text


def test_a_conversation_starting_with_the_model_gets_an_empty_user_turn(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text, changes = _render(
        tokenizer, {"role": "system", "content": "S"}, {"role": "assistant", "content": "Hi, how can I help?"}
    )
    assert changes == ["user-turn-inserted", "system-folded"]
    assert text.startswith("<bos><start_of_turn>user\nS\n\n<end_of_turn>\n<start_of_turn>model\nHi, how can I help?")


def test_a_system_message_alone_is_not_lost(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text, changes = _render(tokenizer, {"role": "system", "content": "Summarize the rules."})
    assert "Summarize the rules." in text
    assert "user-turn-inserted" in changes


def test_tool_calls_and_results_are_rendered_into_the_turns(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text, changes = _render(
        tokenizer,
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "25 C"}]},
        tools_text="TOOLS",
    )
    assert changes == ["tool-calls-rendered", "tool-results-folded", "tools-rendered", "system-folded"]
    assert text.startswith("<bos><start_of_turn>user\nTOOLS\n\nWeather in Paris and Rome?<end_of_turn>")
    assert (
        '<start_of_turn>model\n[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_weather", "arguments": {"city": "Rome"}}]<end_of_turn>' in text
    )
    assert (
        "<start_of_turn>user\nResult of get_weather:\n```tool_output\n18 C\n```\n\n"
        "Result of get_weather:\n```tool_output\n25 C\n```<end_of_turn>\n<start_of_turn>model\n"
    ) in text


def test_strict_mode_refuses_repairs_but_not_the_template_s_own_folding(tokenizer) -> None:  # type: ignore[no-untyped-def]
    _render(tokenizer, {"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, strict=True)
    with pytest.raises(BadRequestError) as caught:
        _render(tokenizer, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}, strict=True)
    assert caught.value.param == "messages"
    assert caught.value.code == "invalid_conversation"
    assert "merged-user-turns" in caught.value.message


_ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "user_image", "assistant_calls"])


def _message(kind: str, index: int) -> dict:
    if kind == "user_image":
        return {"role": "user", "content": [{"type": "text", "text": f"u{index}"}, _image(f"data:{index}")]}
    if kind == "assistant_calls":
        call = {"id": f"c{index}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if kind == "tool":
        return {"role": "tool", "tool_call_id": f"c{index}", "content": f"r{index}"}
    return {"role": kind, "content": f"{kind[0]}{index}"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(_ROLES, min_size=1, max_size=8))
def test_any_message_sequence_renders_with_every_text_and_image(tokenizer, kinds: list[str]) -> None:  # type: ignore[no-untyped-def]
    messages = [_message(kind, index) for index, kind in enumerate(kinds)]
    conversation = normalize(_messages(*messages))
    text, _ = render_prompt(tokenizer, conversation)  # the template raises if roles do not alternate
    assert len(conversation.images) == kinds.count("user_image")
    assert text.count("<start_of_image>") == len(conversation.images)
    for index, kind in enumerate(kinds):
        if kind not in ("assistant_calls", "tool", "user_image"):
            assert f"{kind[0]}{index}" in text
