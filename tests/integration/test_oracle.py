"""At temperature 0 the server must produce exactly vLLM's offline `LLM.chat` tokens, prompt and output."""

from __future__ import annotations

import openai
import pytest

from tests.support.live_server import SERVED_MODEL
from tests.support.oracle_cases import CASES


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_server_tokens_equal_offline_llm_chat(case: dict, openai_client: openai.OpenAI, oracle_results: dict) -> None:
    expected = oracle_results[case["name"]]
    response = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=case["messages"],
        max_tokens=case["max_tokens"],
        temperature=0,
        extra_body={"return_token_ids": True},
    ).model_dump()
    assert response["prompt_token_ids"] == expected["prompt_token_ids"]
    assert response["choices"][0]["token_ids"] == expected["token_ids"]
    assert response["choices"][0]["message"]["content"] == expected["text"]


def test_streamed_tokens_equal_offline_llm_chat(openai_client: openai.OpenAI, oracle_results: dict) -> None:
    case = next(c for c in CASES if c["name"] == "two_images")
    stream = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=case["messages"],
        max_tokens=case["max_tokens"],
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    token_ids: list[int] = []
    text = ""
    for chunk in stream:
        for choice in chunk.choices:
            token_ids.extend((choice.model_extra or {}).get("token_ids") or [])
            text += choice.delta.content or ""
    assert token_ids == oracle_results["two_images"]["token_ids"]
    assert text == oracle_results["two_images"]["text"]
