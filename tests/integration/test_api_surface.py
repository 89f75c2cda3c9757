"""The rest of the OpenAI surface on the live server: text completions, the tokenizer routes,
`detail` and image token accounting, sampling extras, continuous usage. The official `openai` client
parses everything.
"""

from __future__ import annotations

import httpx
import openai

from tests.support.differential_cases import TALL_PNG, image
from tests.support.live_server import SERVED_MODEL
from tests.support.oracle_cases import RED_PNG, WIDE_PNG

USER = [{"role": "user", "content": "Hi"}]


def test_text_completion_with_echo_and_logprobs(openai_client: openai.OpenAI) -> None:
    response = openai_client.completions.create(
        model=SERVED_MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, echo=True, logprobs=2
    )
    choice = response.choices[0]
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert choice.text.startswith("Once upon a time") and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.token_logprobs is not None
    prompt_tokens = response.usage.prompt_tokens  # type: ignore[union-attr]
    assert len(logprobs.tokens) == prompt_tokens + 5
    assert logprobs.token_logprobs[0] is None and all(lp is not None for lp in logprobs.token_logprobs[1:])
    assert logprobs.text_offset is not None and logprobs.text_offset[1] == 0  # <bos> takes no room in the text
    text = choice.text
    for token, offset in zip(logprobs.tokens[1:], logprobs.text_offset[1:], strict=True):
        assert text[offset : offset + len(token)] == token


def test_text_completion_from_token_ids_streamed_with_usage(openai_client: openai.OpenAI) -> None:
    whole = openai_client.completions.create(model=SERVED_MODEL, prompt=[2, 9259, 1902], max_tokens=8, temperature=0)
    chunks = list(
        openai_client.completions.create(
            model=SERVED_MODEL,
            prompt=[2, 9259, 1902],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert whole.usage is not None and whole.usage.prompt_tokens == 3


def test_tokenize_counts_exactly_what_a_chat_request_uses(base_url: str, openai_client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, image(RED_PNG), image(TALL_PNG)]},
    ]
    counted = httpx.post(f"{base_url}/tokenize", json={"model": SERVED_MODEL, "messages": messages}, timeout=60)
    assert counted.status_code == 200
    body = counted.json()
    chat = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=messages, max_tokens=1, extra_body={"return_token_ids": True}
    )
    assert body["tokens"] == (chat.model_extra or {})["prompt_token_ids"]
    assert body["count"] == chat.usage.prompt_tokens  # type: ignore[union-attr]
    assert body["image_tokens"] == chat.usage.prompt_tokens_details.image_tokens  # type: ignore[union-attr]
    assert body["max_model_len"] == 8192
    assert counted.headers["x-gemma-normalized"] == "system-folded"


def test_tokenize_and_detokenize_text(base_url: str) -> None:
    tokens = httpx.post(
        f"{base_url}/tokenize", json={"prompt": "Hello world", "return_token_strs": True}, timeout=30
    ).json()
    assert tokens["tokens"][0] == 2 and tokens["count"] == len(tokens["tokens"])  # <bos> added
    assert tokens["token_strs"][0] == "<bos>"
    text = httpx.post(f"{base_url}/detokenize", json={"tokens": tokens["tokens"]}, timeout=30).json()
    assert text == {"prompt": "<bos>Hello world"}
    bare = httpx.post(f"{base_url}/tokenize", json={"prompt": "Hello", "add_special_tokens": False}).json()
    assert 2 not in bare["tokens"]
    missing = httpx.post(f"{base_url}/detokenize", json={"model": "other", "tokens": [2]})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    bad = httpx.post(f"{base_url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_detail_low_is_one_view_and_high_adds_pan_and_scan_crops(openai_client: openai.OpenAI) -> None:
    def image_tokens(*details: str) -> int:
        response = openai_client.chat.completions.create(
            model=SERVED_MODEL,
            messages=[{"role": "user", "content": [image(TALL_PNG, d) for d in details]}],
            max_tokens=1,
        )
        return response.usage.prompt_tokens_details.image_tokens  # type: ignore[union-attr]

    low, high, auto = image_tokens("low"), image_tokens("high"), image_tokens("auto")
    assert high == auto > low  # 300x1000: three extra crops
    assert image_tokens("low", "low") == 2 * low
    assert image_tokens("low", "high") == 2 * high  # one setting per prompt: the request gets pan-and-scan

    def small(detail: str) -> int:
        response = openai_client.chat.completions.create(
            model=SERVED_MODEL, messages=[{"role": "user", "content": [image(WIDE_PNG, detail)]}], max_tokens=1
        )
        return response.usage.prompt_tokens_details.image_tokens  # type: ignore[union-attr]

    assert small("low") == small("high")  # too small for any crop


def test_n_greedy_choices_are_n_copies_of_the_greedy_answer(openai_client: openai.OpenAI) -> None:
    """Temperature 0 with n > 1: OpenAI returns n choices; vLLM would refuse (the pipeline runs n requests)."""
    one = openai_client.chat.completions.create(model=SERVED_MODEL, messages=USER, max_tokens=6, temperature=0)
    three = openai_client.chat.completions.create(model=SERVED_MODEL, messages=USER, max_tokens=6, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage is not None and one.usage is not None
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.prompt_tokens == one.usage.prompt_tokens


def test_n_choices_and_continuous_usage(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(model=SERVED_MODEL, messages=USER, max_tokens=4, n=3, seed=5)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage is not None and response.usage.completion_tokens == 12
    chunks = list(
        openai_client.chat.completions.create(
            model=SERVED_MODEL,
            messages=USER,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        )
    )
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].usage.completion_tokens == 4  # type: ignore[union-attr]


def test_ignored_openai_fields_and_refused_typos(base_url: str) -> None:
    url = f"{base_url}/v1/chat/completions"
    ok = httpx.post(
        url,
        json={"model": SERVED_MODEL, "messages": USER, "max_tokens": 1, "store": True, "service_tier": "auto"},
        timeout=60,
    )
    assert ok.status_code == 200
    typo = httpx.post(url, json={"model": SERVED_MODEL, "messages": USER, "max_tokns": 1}, timeout=60)
    assert typo.status_code == 400 and typo.json()["error"]["param"] == "max_tokns"
