"""Every error a client can see, in one place: the error classes, and how each protocol writes them.

An `APIError` carries an HTTP status, a kind (`error_type`), the request field at fault (`param`), a
machine-readable `code` and headers (Retry-After). Whoever notices a problem raises one: the edge
middleware, a protocol adapter, the pipeline, the engine adapter (which translates vLLM's exceptions).
This module alone turns them into bytes, as a JSON body (`response`, `raw_response` for the ASGI
middleware) or as a stream's SSE error event (`sse_event`), in the shape of the protocol the
request spoke (`ErrorFormat`; OpenAI's `{"error": {"message", "type", "param", "code"}}` today).
The errors every protocol shares are built here once: `draining`, `not_ready`, `engine_stopped`,
`from_http_status`.

The OpenAI SDKs retry 408/409/429 and every 5xx, so a problem caused by the request must never be a
5xx. Messages are written for the client: no stack traces, file paths or memory addresses
(`sanitize_message` is applied to anything that came from an exception).

This module must not import vLLM or FastAPI's routing.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from starlette.responses import Response

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


class PermissionDeniedError(APIError):
    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"


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


# ---- the errors every protocol shares ------------------------------------------------------


def draining(retry_after: Mapping[str, str]) -> ServiceUnavailableError:
    """The 503 of a server that got SIGTERM: new and waiting requests are sent to another replica."""
    return ServiceUnavailableError(
        "the server is shutting down; retry on another replica", code="server_shutting_down", headers=dict(retry_after)
    )


def not_ready(retry_after: Mapping[str, str]) -> ServiceUnavailableError:
    return ServiceUnavailableError("the model is still loading; retry shortly", headers=dict(retry_after))


def engine_stopped() -> ServiceUnavailableError:
    return ServiceUnavailableError("the inference engine has stopped; the server is restarting")


def from_http_status(status: int, detail: str) -> APIError:
    """Starlette's own HTTP errors (no route, wrong method) as ours."""
    if status == 404:
        return NotFoundError("no such route")
    if status == 405:
        return MethodNotAllowedError("method not allowed on this route")
    if status < 500:
        error: APIError = BadRequestError(detail)
        error.status_code = status
        return error
    return APIError("internal error")


# ---- how each protocol writes an error ----------------------------------------------------


class ErrorFormat:
    """OpenAI's error shape, for a JSON body and for an SSE event (then the stream's end marker)."""

    def body(self, error: APIError) -> bytes:
        return error.to_json()

    def sse_event(self, error: APIError) -> bytes:
        return b"data: " + self.body(error) + b"\n\n"

    def headers(self) -> dict[str, str]:
        return {}


class AnthropicErrorFormat(ErrorFormat):
    """Anthropic's: `{"type": "error", "error": {"type", "message"}}`, the type chosen by status as its
    SDKs map them to exception classes; an SSE `event: error`."""

    TYPE_BY_STATUS: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        503: "overloaded_error",
        529: "overloaded_error",
    }

    def body(self, error: APIError) -> bytes:
        kind = self.TYPE_BY_STATUS.get(error.status_code)
        if kind is None:
            kind = "invalid_request_error" if error.status_code < 500 else "api_error"
        message = (
            f"{error.param}: {error.message}" if error.param and error.param not in error.message else error.message
        )
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})

    def sse_event(self, error: APIError) -> bytes:
        return b"event: error\ndata: " + self.body(error) + b"\n\n"

    def headers(self) -> dict[str, str]:
        return {"request-id": f"req_{uuid.uuid4().hex[:24]}"}


OPENAI = ErrorFormat()
ANTHROPIC = AnthropicErrorFormat()
ANTHROPIC_PATH_PREFIX = "/v1/messages"


def format_for_path(path: str) -> ErrorFormat:
    """The error shape of the protocol served at `path` (also for errors raised before a route runs:
    a refused key, a body over the limit)."""
    if path == ANTHROPIC_PATH_PREFIX or path.startswith(ANTHROPIC_PATH_PREFIX + "/"):
        return ANTHROPIC
    return OPENAI


def response(error: APIError, *, path: str = "", extra_headers: Mapping[str, str] | None = None) -> Response:
    shape = format_for_path(path)
    headers = {**shape.headers(), **error.headers, **(extra_headers or {})}
    body = shape.body(error)
    return Response(body, status_code=error.status_code, media_type="application/json", headers=headers)


def raw_response(error: APIError, *, path: str = "", close: bool = False) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body for code below Starlette's responses (the HTTP protocol, ASGI middleware)."""
    shape = format_for_path(path)
    body = shape.body(error)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in {**shape.headers(), **error.headers}.items()]
    if close:
        headers.append((b"connection", b"close"))
    return headers, body


def responses_stream_error(error: APIError) -> dict[str, Any]:
    """The fields of the Responses API's `error` stream event (the encoder adds type and sequence)."""
    return {"code": error.code or error.error_type, "message": error.message, "param": error.param}


def sse_event(error: APIError, *, path: str = "") -> bytes:
    """The SSE form of an error, sent when a stream has already started."""
    return format_for_path(path).sse_event(error)
