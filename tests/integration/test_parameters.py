"""Hardening checklist, "Parameters" row, on the live server: each bad request is a 400 naming its
`param`, in OpenAI's error shape, and a normal request succeeds right after it.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.bad_requests import BAD_CHAT_FIELDS, BAD_CHAT_FIELDS_SERVER_ONLY, BAD_COMPLETION_FIELDS
from tests.support.live_server import SERVED_MODEL

CHAT = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
GOOD = {**CHAT, "temperature": 0}
CHAT_TABLE = BAD_CHAT_FIELDS + BAD_CHAT_FIELDS_SERVER_ONLY


def _assert_400(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert "Traceback" not in error["message"] and "0x" not in error["message"]


def _still_healthy(base_url: str) -> None:
    response = httpx.post(f"{base_url}/v1/chat/completions", json=GOOD, timeout=60)
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("name", "extra", "param"), CHAT_TABLE, ids=[case[0] for case in CHAT_TABLE])
def test_bad_chat_parameter_is_a_400_and_the_server_stays_healthy(
    name: str, extra: dict, param: str, base_url: str
) -> None:
    body = {**CHAT, **extra}
    if "max_completion_tokens" in extra:
        body.pop("max_tokens")
    content = json.dumps(body).encode()  # json.dumps writes NaN, as some clients do (httpx refuses to)
    response = httpx.post(
        f"{base_url}/v1/chat/completions", content=content, headers={"content-type": "application/json"}, timeout=60
    )
    _assert_400(response, param)
    if name == "prompt_plus_max_tokens_over_context":
        assert response.json()["error"]["code"] == "context_length_exceeded"
    _still_healthy(base_url)


@pytest.mark.parametrize(
    ("name", "extra", "param"), BAD_COMPLETION_FIELDS, ids=[case[0] for case in BAD_COMPLETION_FIELDS]
)
def test_bad_completion_parameter_is_a_400(name: str, extra: dict, param: str, base_url: str) -> None:
    body = {"model": SERVED_MODEL, "prompt": "Hi", "max_tokens": 2, **extra}
    _assert_400(httpx.post(f"{base_url}/v1/completions", json=body, timeout=60), param)
    _still_healthy(base_url)


def test_completion_context_and_vocabulary_checks(base_url: str) -> None:
    url = f"{base_url}/v1/completions"
    over = httpx.post(url, json={"model": SERVED_MODEL, "prompt": "Hi", "max_tokens": 8191}, timeout=60)
    _assert_400(over, "prompt")
    assert over.json()["error"]["code"] == "context_length_exceeded"
    batch = httpx.post(url, json={"model": SERVED_MODEL, "prompt": [[2, 5], [2, 10**7]], "max_tokens": 2}, timeout=60)
    _assert_400(batch, "prompt[1]")
    _still_healthy(base_url)


def test_schemas_the_grammar_compiler_refuses_are_400s(base_url: str) -> None:
    """Valid JSON Schema that xgrammar cannot compile: refused before generation, engine unharmed."""
    url = f"{base_url}/v1/chat/completions"
    broken_ref = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    as_format = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": broken_ref}}}
    _assert_400(httpx.post(url, json=as_format, timeout=60), "response_format")
    tool = {"type": "function", "function": {"name": "f", "parameters": broken_ref}}
    as_tool = {**CHAT, "tools": [tool], "tool_choice": "required"}
    _assert_400(httpx.post(url, json=as_tool, timeout=60), "tools")
    streamed = {**as_tool, "stream": True}
    _assert_400(httpx.post(url, json=streamed, timeout=60), "tools")  # before the stream starts
    _still_healthy(base_url)


def test_too_many_images_is_a_400(base_url: str) -> None:
    from tests.support.oracle_cases import RED_PNG

    parts = [{"type": "image_url", "image_url": {"url": RED_PNG}}] * 9  # images.max_per_request is 8
    body = {**CHAT, "messages": [{"role": "user", "content": parts}]}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    _assert_400(response, "messages")
    assert response.json()["error"]["code"] == "too_many_images"
    _still_healthy(base_url)
