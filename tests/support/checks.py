"""Assertions shared by the hardening tests: every error is in its protocol's shape (OpenAI's or
Anthropic's), sanitized and small."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_ERROR_BODY_BYTES = 2048
_LEAKS = re.compile(r"Traceback|0x[0-9a-fA-F]{4,}|(?<![\w.])(?:/[\w.\-+@]+){2,}|site-packages|\.py\b")


def assert_openai_error(response: Any, status: int | tuple[int, ...], code: str | None = None) -> dict[str, Any]:
    """`response` is an httpx.Response; returns the error object."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert len(response.content) <= MAX_ERROR_BODY_BYTES, len(response.content)
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    return assert_error_object(response.json(), code)


def assert_error_object(body: Any, code: str | None = None) -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert not _LEAKS.search(error["message"]), error["message"]
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


def assert_anthropic_error(response: Any, status: int, kind: str) -> dict[str, Any]:
    """An Anthropic-shaped error: `{"type": "error", "error": {"type", "message"}}`, with a request-id."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert len(response.content) <= MAX_ERROR_BODY_BYTES, len(response.content)
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    error = body["error"]
    assert set(error) == {"type", "message"} and error["type"] == kind, error
    assert not _LEAKS.search(error["message"]), error["message"]
    assert response.headers.get("request-id", "").startswith("req_"), response.headers
    return dict(error)


def sse_events(raw: str) -> list[str]:
    return [block[len("data: ") :] for block in raw.split("\n\n") if block.startswith("data: ")]


def assert_stream_ends_with_error_then_done(raw: str, code: str | None = None) -> dict[str, Any]:
    events = sse_events(raw)
    assert events and events[-1] == "[DONE]", raw[-500:]
    assert len(events) >= 2, raw
    return assert_error_object(json.loads(events[-2]), code)
