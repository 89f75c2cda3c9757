"""Coalesced streams (`server.stream_interval`), live on the sacrificial "engine_death" server, which
runs with a stream interval of 4 (tests/support/live_plugin.py) before the engine-death test ends it.

Each protocol's stream, read with its official SDK, must carry exactly what the same server answers
without streaming (greedy, so the answer is one): the same text, the same usage, the same finish
reason, and, for chat with logprobs, one logprob per token. It must do so in fewer events (about one
per four tokens), and the first token must come alone, in the first event, so that time-to-first-token
does not wait for a group.
"""

from __future__ import annotations

import math

import anthropic
import openai
import pytest

from tests.support.live_plugin import FAULT_KEY_ENV
from tests.support.live_server import SERVED_MODEL, LiveServer

INTERVAL = 4  # SACRIFICIAL_SERVER_ENV["engine_death"]
TOKENS = 30
PROMPT = "Write a long story about a lighthouse keeper."
pytestmark = pytest.mark.late(3.3)  # after the stored-responses restart check's setup, before engine death


def most_events(tokens: int) -> int:
    """The first token alone, then groups of INTERVAL, then (with some protocols) a last event with
    the finish and one with usage."""
    return 1 + math.ceil((tokens - 1) / INTERVAL) + 2


@pytest.fixture(scope="module")
def openai_client(engine_death_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{engine_death_server.base_url}/v1", api_key=FAULT_KEY_ENV, max_retries=0, timeout=300
    )


def test_chat_stream_is_the_answer_in_groups_of_four_tokens(openai_client: openai.OpenAI) -> None:
    request = {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "logprobs": True,
    }
    whole = openai_client.chat.completions.create(**request)  # type: ignore[call-overload]
    for _attempt in range(2):
        chunks = list(
            openai_client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
        )
        text_chunks = [c for c in chunks if c.choices and (c.choices[0].delta.content or c.choices[0].logprobs)]
        # The first token alone. (A CPU stall right after it would let vLLM merge it with the next
        # group, as it merges any deltas a slow reader has not taken yet: one more try then.)
        if len(text_chunks[0].choices[0].logprobs.content) == 1:  # type: ignore[union-attr]
            break
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == whole.choices[0].message.content
    streamed_logprobs = [entry for c in text_chunks for entry in (c.choices[0].logprobs.content or [])]  # type: ignore[union-attr]
    assert [e.token for e in streamed_logprobs] == [e.token for e in whole.choices[0].logprobs.content]  # type: ignore[union-attr]
    assert len(text_chunks[0].choices[0].logprobs.content) == 1  # type: ignore[union-attr]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].usage == whole.usage
    tokens = whole.usage.completion_tokens  # type: ignore[union-attr]
    assert tokens > INTERVAL * 2
    assert len(text_chunks) <= most_events(tokens) and len(text_chunks) < tokens, (len(text_chunks), tokens)


def test_completions_and_responses_streams_are_their_answers(openai_client: openai.OpenAI) -> None:
    request = {"model": SERVED_MODEL, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
    whole = openai_client.completions.create(**request)  # type: ignore[call-overload]
    chunks = list(openai_client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == whole.choices[0].text and chunks[-1].usage == whole.usage
    assert len(texts) <= most_events(whole.usage.completion_tokens)  # type: ignore[union-attr]

    asked = {"model": SERVED_MODEL, "input": PROMPT, "max_output_tokens": TOKENS, "temperature": 0, "store": False}
    answer = openai_client.responses.create(**asked)  # type: ignore[call-overload]
    events = list(openai_client.responses.create(**asked, stream=True))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    (done,) = [e.response for e in events if e.type in ("response.completed", "response.incomplete")]
    assert "".join(deltas) == answer.output_text == done.output_text
    assert done.usage == answer.usage and done.status == answer.status
    assert len(deltas) <= most_events(answer.usage.output_tokens)  # type: ignore[union-attr]


def test_messages_stream_is_the_answer(engine_death_server: LiveServer) -> None:
    client = anthropic.Anthropic(
        base_url=engine_death_server.base_url, api_key=FAULT_KEY_ENV, max_retries=0, timeout=300
    )
    # anthropic 2.x's methods have no `temperature` argument; the API field still exists.
    asked = {
        "model": SERVED_MODEL,
        "max_tokens": TOKENS,
        "messages": [{"role": "user", "content": PROMPT}],
        "extra_body": {"temperature": 0},
    }
    whole = client.messages.create(**asked)  # type: ignore[call-overload]
    with client.messages.stream(**asked) as stream:  # type: ignore[call-overload]
        deltas = [e.delta.text for e in stream if e.type == "content_block_delta" and e.delta.type == "text_delta"]
        final = stream.get_final_message()
    assert "".join(deltas) == whole.content[0].text == final.content[0].text  # type: ignore[union-attr]
    assert final.usage.output_tokens == whole.usage.output_tokens and final.stop_reason == whole.stop_reason
    assert len(deltas) <= most_events(whole.usage.output_tokens)
