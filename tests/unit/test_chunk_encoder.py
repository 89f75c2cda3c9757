"""The streamed chunk encoder: its pre-serialized fast path gives the same JSON as the general one."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from server.protocols.openai.chat import ChunkEncoder


def _general_event(encoder: ChunkEncoder, index: int, text: str) -> dict[str, Any]:
    choice = {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    return orjson.loads(encoder._event([choice])[len(b"data: ") :])


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", ["hello", ' "quoted" \\ back', "line\nbreak\t", "ünï 😀 \u2028", "</s>"])
def test_text_fast_path_matches_the_general_encoding(include_usage: bool, text: str) -> None:
    encoder = ChunkEncoder('chatcmpl-"x"', "tiny/gemma", include_usage=include_usage, return_token_ids=False)
    event = encoder.delta(3, text)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert orjson.loads(event[len(b"data: ") : -2]) == _general_event(encoder, 3, text)


def test_events_with_more_than_text_take_the_general_path() -> None:
    encoder = ChunkEncoder("chatcmpl-1", "m", include_usage=False, return_token_ids=True)
    event = orjson.loads(encoder.delta(0, "a", token_ids=[7])[len(b"data: ") :])
    assert event["choices"][0]["token_ids"] == [7]
    final = orjson.loads(encoder.delta(0, "", finish_reason="stop")[len(b"data: ") :])
    assert final["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
