"""Prompt building with the real Gemma 3 tokenizer and chat template of the tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import BadRequestError
from server.pipeline.prompt import conversation_for_template, render_prompt
from server.protocols.openai.chat import turns_of
from server.protocols.openai.wire import ChatCompletionRequest


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _messages(*messages: dict) -> list:
    return turns_of(ChatCompletionRequest.model_validate({"model": "m", "messages": list(messages)}).messages)


def test_gemma_layout_with_system_folded_into_first_user_turn(tokenizer) -> None:  # type: ignore[no-untyped-def]
    conversation = conversation_for_template(
        _messages({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    )
    text, ids = render_prompt(tokenizer, conversation)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert ids[0] == 2 and ids.count(2) == 1  # exactly one <bos>
    assert ids[1] == 105  # <start_of_turn>


def test_images_become_placeholders_in_order(tokenizer) -> None:  # type: ignore[no-untyped-def]
    conversation = conversation_for_template(
        _messages(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:a"}},
                    {"type": "text", "text": "and"},
                    {"type": "image_url", "image_url": {"url": "data:b", "detail": "low"}},
                ],
            }
        )
    )
    assert [ref.url for ref in conversation.images] == ["data:a", "data:b"]
    assert conversation.images[1].detail == "low"
    assert conversation.images[0].param == "messages[0].content[0].image_url"
    text, ids = render_prompt(tokenizer, conversation)
    assert text.count("<start_of_image>") == 2
    assert ids.count(255999) == 2


def test_assistant_turns_are_model_turns(tokenizer) -> None:  # type: ignore[no-untyped-def]
    conversation = conversation_for_template(
        _messages(
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        )
    )
    text, _ = render_prompt(tokenizer, conversation)
    assert "<start_of_turn>model\nHello<end_of_turn>\n" in text


def test_roles_that_do_not_alternate_are_merged_or_refused_in_strict_mode(tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = _messages({"role": "user", "content": "a"}, {"role": "user", "content": "b"})
    text, _ = render_prompt(tokenizer, conversation_for_template(messages))
    assert "<start_of_turn>user\na\n\nb<end_of_turn>" in text
    with pytest.raises(BadRequestError, match="merged-user-turns"):
        conversation_for_template(messages, strict=True)


def test_images_outside_user_turns_are_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _messages(
            {"role": "user", "content": "y"},
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]},
        )
