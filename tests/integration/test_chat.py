"""Chat completions through the real server and the real vLLM engine, driven by the openai client."""

from __future__ import annotations

import openai
import pytest

from tests.support.images import encode, jpeg_bytes, make_image
from tests.support.live_server import SERVED_MODEL
from tests.support.oracle_cases import BLUE_JPEG, RED_PNG, WIDE_PNG


def _image(url: str, detail: str = "auto") -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


def test_text_completion_has_content_usage_and_finish_reason(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0
    )
    choice = response.choices[0]
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 6
    assert response.usage.prompt_tokens > 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + 6


def test_image_by_data_uri_counts_image_tokens(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, _image(RED_PNG)]}],
        max_tokens=4,
        temperature=0,
    )
    assert response.choices[0].message.content
    details = response.usage.prompt_tokens_details
    assert details is not None
    # The tiny model has gemma-3-4b-it's geometry: one view of an image is 256 soft tokens between
    # <start_of_image> and <end_of_image> (a 320x240 picture is too small for pan-and-scan crops).
    assert details.image_tokens >= 256


def test_image_by_http_url_gives_the_same_tokens_as_by_data_uri(openai_client: openai.OpenAI, image_host) -> None:  # type: ignore[no-untyped-def]
    jpeg = jpeg_bytes(800, 600)
    url = image_host.add("photo.jpg", jpeg, "image/jpeg")
    from tests.support.images import data_uri

    def ask(image_url: str) -> dict:
        response = openai_client.chat.completions.create(
            model=SERVED_MODEL,
            messages=[{"role": "user", "content": [_image(image_url), {"type": "text", "text": "Caption:"}]}],
            max_tokens=6,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        return response.model_dump()

    by_url = ask(url)
    by_data = ask(data_uri(jpeg, "image/jpeg"))
    assert any(path == "/img/photo.jpg" for path in image_host.requests)
    assert by_url["prompt_token_ids"] == by_data["prompt_token_ids"]
    assert by_url["choices"][0]["token_ids"] == by_data["choices"][0]["token_ids"]


def test_two_images_in_one_message(openai_client: openai.OpenAI) -> None:
    one = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Compare"}, _image(RED_PNG)]}],
        max_tokens=2,
    )
    two = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Compare"}, _image(RED_PNG), _image(WIDE_PNG)]}
        ],
        max_tokens=2,
    )
    image_tokens_one = one.usage.prompt_tokens_details.image_tokens
    image_tokens_two = two.usage.prompt_tokens_details.image_tokens
    assert image_tokens_two == 2 * image_tokens_one
    assert two.usage.prompt_tokens > one.usage.prompt_tokens


def test_system_prompt_and_multi_turn_history_change_the_prompt(openai_client: openai.OpenAI) -> None:
    plain = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
    )
    with_system = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=1,
    )
    multi_turn = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "Again"}, _image(BLUE_JPEG)]},
        ],
        max_tokens=1,
    )
    assert with_system.usage.prompt_tokens > plain.usage.prompt_tokens
    assert multi_turn.usage.prompt_tokens > plain.usage.prompt_tokens


def test_streamed_text_joined_equals_non_streamed_text(openai_client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell a story"}, _image(RED_PNG)]}]
    full = openai_client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=24, temperature=0)
    stream = openai_client.chat.completions.create(
        model=SERVED_MODEL,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert finish_reasons == ["length"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 24
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_has_no_usage_chunk(openai_client: openai.OpenAI) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            model=SERVED_MODEL, messages=[{"role": "user", "content": "Go"}], max_tokens=3, stream=True
        )
    )
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_ends_generation_with_finish_reason_stop(openai_client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Count to ten."}]
    reference = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=messages, max_tokens=16, temperature=0
    )
    text = reference.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3].strip() or text[-3:]
    stopped = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=messages, max_tokens=16, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].message.content
    assert text.startswith(stopped.choices[0].message.content)


def test_same_seed_same_output_at_temperature_one(openai_client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        response = openai_client.chat.completions.create(
            model=SERVED_MODEL,
            messages=[{"role": "user", "content": "Improvise."}],
            max_tokens=16,
            temperature=1.0,
            top_p=1.0,
            seed=seed,
        )
        return response.choices[0].message.content or ""

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_max_completion_tokens_and_its_alias(openai_client: openai.OpenAI) -> None:
    a = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=3
    )
    b = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    assert a.usage.completion_tokens == 3
    assert b.usage.completion_tokens == 5


def test_unknown_model_is_404(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"


def test_bad_request_is_400_and_the_server_stays_healthy(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model=SERVED_MODEL, messages=[])
    assert caught.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model=SERVED_MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=5
        )
    assert caught.value.body["param"] == "temperature"
    ok = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
    )
    assert ok.choices[0].finish_reason == "length"


def test_image_that_is_not_an_image_is_400(openai_client: openai.OpenAI, image_host) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model=SERVED_MODEL,
            messages=[{"role": "user", "content": [_image(f"{image_host.base_url}/html")]}],
            max_tokens=1,
        )
    assert caught.value.body["param"] == "messages[0].content[0].image_url"
    png = encode(make_image(64, 64), "PNG")
    with pytest.raises(openai.BadRequestError):
        from tests.support.images import data_uri

        openai_client.chat.completions.create(
            model=SERVED_MODEL,
            messages=[{"role": "user", "content": [_image(data_uri(png[: len(png) // 2]))]}],
            max_tokens=1,
        )
