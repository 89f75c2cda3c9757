"""Every error a client can see, in one place, with one mapping to HTTP and to SSE.

An error body is OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`. The OpenAI SDKs
retry 408/409/429 and every 5xx, so a problem caused by the request must never be a 5xx.
Messages are written for the client: no stack traces, file paths or memory addresses
(`sanitize_message` is applied to anything that came from an exception).

This module must not import vLLM; the engine adapter translates engine exceptions into these.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

MAX_MESSAGE_CHARS = 1000


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    status_code = 500
    error_type = "internal_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = sanitize_message(message)
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


class BadRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(BadRequestError):
    default_code = "context_length_exceeded"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class MethodNotAllowedError(APIError):
    status_code = 405
    error_type = "invalid_request_error"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class HeadersTooLargeError(APIError):
    status_code = 431
    error_type = "invalid_request_error"
    default_code = "request_headers_too_large"


class ClientClosedRequestError(APIError):
    """The client went away before its answer was ready (nginx's 499); nobody reads the body."""

    status_code = 499
    error_type = "invalid_request_error"
    default_code = "client_closed_request"


class RateLimitError(APIError):
    """Admission refused: the server is at capacity. Always carries Retry-After."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "server_busy"


class ServiceUnavailableError(APIError):
    """Not ready yet, draining, or the engine is gone."""

    status_code = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"


class EngineError(APIError):
    """The engine failed while serving a request that was valid."""

    status_code = 500
    error_type = "internal_error"
    default_code = "engine_error"


_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")
_PATH = re.compile(r"(?<![\w.])(?:/[\w.\-+@]+){2,}/?")
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):.*", re.DOTALL)


def sanitize_message(message: str) -> str:
    """Strips what must never reach a client (addresses, file paths, tracebacks) and bounds size."""
    message = _TRACEBACK.sub("", message)
    message = _ADDRESS.sub("0x…", message)
    message = _PATH.sub("<path>", message)
    message = message.strip() or "error"
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return message


def sse_error_event(error: APIError) -> bytes:
    """The SSE form of an error, sent when a stream has already started (then `data: [DONE]`)."""
    return b"data: " + error.to_json() + b"\n\n"
