"""Every parameter problem is a 400 naming the offending `param` (checked without an engine).

The same table runs against the live server in tests/integration/test_parameters.py, followed each
time by a request that succeeds.
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from server.errors import BadRequestError, ContextLengthExceededError
from server.pipeline.sampling import max_tokens_for
from server.protocols.openai.validation import check_request_fields
from server.protocols.openai.wire import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from server.protocols.validation import validation_error_to_api_error
from tests.support.bad_requests import BAD_CHAT_FIELDS, BAD_COMPLETION_FIELDS

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def _error(model: type[BaseModel], body: dict) -> BadRequestError:
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        return validation_error_to_api_error(errors)
    try:
        check_request_fields(request)
    except BadRequestError as exc:
        return exc
    raise AssertionError(f"expected a 400 for {body}")


@pytest.mark.parametrize(("name", "extra", "param"), BAD_CHAT_FIELDS, ids=[case[0] for case in BAD_CHAT_FIELDS])
def test_bad_chat_parameter_names_its_param(name: str, extra: dict, param: str | None) -> None:
    if param is None:
        pytest.fail("cases needing the engine are in the integration table only")
    error = _error(ChatCompletionRequest, {**CHAT, **extra})
    assert error.status_code == 400
    assert error.param == param, error.message
    assert len(error.to_json()) < 1500


@pytest.mark.parametrize(
    ("name", "extra", "param"), BAD_COMPLETION_FIELDS, ids=[case[0] for case in BAD_COMPLETION_FIELDS]
)
def test_bad_completion_parameter_names_its_param(name: str, extra: dict, param: str) -> None:
    error = _error(CompletionRequest, {"model": "m", "prompt": "Hi", **extra})
    assert error.param == param, error.message


def test_known_openai_fields_are_accepted_and_ignored() -> None:
    request = ChatCompletionRequest.model_validate(
        {**CHAT, "store": True, "metadata": {"a": "b"}, "service_tier": "auto", "suffix": None}
    )
    assert sorted(check_request_fields(request)) == ["metadata", "service_tier", "store", "suffix"]


def test_unknown_fields_in_nested_objects_are_ignored() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}],
        }
    )
    assert check_request_fields(request) == []


def test_tokenize_needs_exactly_one_of_prompt_and_messages() -> None:
    assert _error(TokenizeRequest, {"model": "m"}).param == "messages"
    assert _error(TokenizeRequest, {"prompt": "x", "messages": CHAT["messages"]}).param == "messages"
    TokenizeRequest.model_validate({"prompt": "x"})


def test_context_budget() -> None:
    common = {"requested_param": "max_tokens", "image_tokens": 0, "max_model_len": 100, "prompt_param": "messages"}
    assert max_tokens_for(requested=None, prompt_tokens=40, default_max_tokens=None, **common) == 60
    assert max_tokens_for(requested=None, prompt_tokens=40, default_max_tokens=16, **common) == 16
    assert max_tokens_for(requested=60, prompt_tokens=40, default_max_tokens=None, **common) == 60
    with pytest.raises(ContextLengthExceededError) as caught:
        max_tokens_for(requested=61, prompt_tokens=40, default_max_tokens=None, **common)
    assert caught.value.param == "messages" and caught.value.code == "context_length_exceeded"
    with pytest.raises(ContextLengthExceededError):
        max_tokens_for(requested=None, prompt_tokens=100, default_max_tokens=None, **common)
    with pytest.raises(BadRequestError) as too_many:
        max_tokens_for(requested=10**12, prompt_tokens=1, default_max_tokens=None, **common)
    assert too_many.value.param == "max_tokens" and too_many.value.code == "invalid_value"
