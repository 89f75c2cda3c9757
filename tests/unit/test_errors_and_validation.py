from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from server import errors
from server.errors import BadRequestError, RateLimitError, sanitize_message
from server.protocols.openai.wire import ChatCompletionRequest
from server.protocols.validation import validation_error_to_api_error


def test_error_body_has_openai_shape() -> None:
    error = BadRequestError("nope", param="messages", code="x")
    assert orjson.loads(error.to_json()) == {
        "error": {"message": "nope", "type": "invalid_request_error", "param": "messages", "code": "x"}
    }
    assert RateLimitError("busy").status_code == 429


@pytest.mark.parametrize(
    "raw",
    [
        "failed at 0x7f3a9c0d1e20 in handler",
        "cannot open /usr/lib/python3.11/site-packages/vllm/x.py",
        "Traceback (most recent call last):\n  File ...\nValueError: boom",
    ],
)
def test_messages_are_sanitized(raw: str) -> None:
    cleaned = sanitize_message(raw)
    assert "0x7f3a" not in cleaned
    assert "/usr/lib" not in cleaned
    assert "Traceback" not in cleaned


def test_messages_are_bounded() -> None:
    assert len(sanitize_message("x" * 100_000)) <= 1000


def test_sse_error_event() -> None:
    event = errors.sse_event(BadRequestError("bad"))
    assert event.startswith(b"data: {") and event.endswith(b"\n\n")


def _error_for(body: dict) -> BadRequestError:
    try:
        ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        return validation_error_to_api_error(errors)
    raise AssertionError("expected a validation error")


def test_param_names_the_offending_field() -> None:
    assert _error_for({"model": "m", "messages": []}).param == "messages"
    assert _error_for({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}).param == "n"
    error = _error_for(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    )
    assert error.param == "messages[0].content[0].image_url.url"


def test_unsupported_part_type_is_named() -> None:
    error = _error_for({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]})
    assert "input_audio" in error.message


def test_nan_is_rejected() -> None:
    error = _error_for({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": float("nan")})
    assert error.param == "temperature"


def test_thousands_of_errors_give_a_small_body() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": 1}] * 2000}
    error = _error_for(body)
    assert len(error.to_json()) < 600
    assert "more problems" in error.message


def test_bare_string_image_url_is_accepted() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "http://x/y.png"}]}],
        }
    )
    assert request.messages[0].content[0].image_url.url == "http://x/y.png"  # type: ignore[union-attr]
