"""Request size limits, enforced before the application reads a request.

Two layers:
- `header_limited_httptools_protocol` (the HTTP protocol uvicorn runs): counts the bytes of a
  request's head as they arrive and the header fields as they are parsed; past
  `server.max_header_bytes` or `server.max_header_count` it answers 431 (OpenAI-shaped) and closes
  the connection, so an 8 MB header is never buffered whole. Requests that are not valid HTTP get
  an OpenAI-shaped 400 instead of uvicorn's plain-text one.
- `RequestLimitsMiddleware` (pure ASGI, for any server): the same header checks on the parsed
  scope, then the body: a Content-Length above `server.max_body_bytes` gets 413 at once, without
  reading the body; a body without Content-Length is counted while the application reads it and
  cut off with 413 as soon as it passes the limit. Both answers close the connection.

This module imports neither FastAPI's routing nor vLLM.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import errors
from server.errors import APIError, BadRequestError, HeadersTooLargeError, PayloadTooLargeError


def _headers_error(max_bytes: int, max_count: int, *, count: int, size: int) -> HeadersTooLargeError | None:
    if count > max_count:
        return HeadersTooLargeError(f"the request has {count} header fields; at most {max_count} are allowed")
    if size > max_bytes:
        return HeadersTooLargeError(f"the request's headers are larger than the {max_bytes} bytes allowed")
    return None


async def send_error(send: Send, error: APIError, path: str = "") -> None:
    headers, body = errors.raw_response(error, path=path, close=True)
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class RequestLimitsMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_header_bytes: int, max_header_count: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.max_header_count = max_header_count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        size += sum(len(name) + len(value) + 4 for name, value in headers)
        path = scope.get("path", "")  # the error's shape is the protocol's served there
        error = _headers_error(self.max_header_bytes, self.max_header_count, count=len(headers), size=size)
        if error is not None:
            await send_error(send, error, path)
            return
        lengths = {value.strip() for name, value in headers if name == b"content-length"}
        if len(lengths) > 1 or any(not length.isdigit() for length in lengths):
            await send_error(send, BadRequestError("the Content-Length header is invalid"), path)
            return
        if lengths and int(next(iter(lengths))) > self.max_body_bytes:
            await send_error(send, self._too_large(), path)
            return
        await _LimitedBody(self, receive, send).run(scope)

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"the request body is larger than the {self.max_body_bytes} bytes allowed")


class _LimitedBody:
    """Counts body bytes as the application reads them; past the limit, answers 413 itself and tells
    the application the client went away (its own answer, if any, is dropped)."""

    def __init__(self, owner: RequestLimitsMiddleware, receive: Receive, send: Send) -> None:
        self.owner = owner
        self._receive = receive
        self._send = send
        self.path = ""
        self.received = 0
        self.rejected = False
        self.response_started = False

    async def run(self, scope: Scope) -> None:
        self.path = scope.get("path", "")
        await self.owner.app(scope, self.receive, self.send)

    async def receive(self) -> Message:
        if self.rejected:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.owner.max_body_bytes:
                self.rejected = True
                if not self.response_started:
                    self.response_started = True
                    await send_error(self._send, self.owner._too_large(), self.path)
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.rejected:
            return
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)


def header_limited_httptools_protocol(max_header_bytes: int, max_header_count: int) -> type[Any]:
    """uvicorn's httptools protocol with a bound on the request head, checked as bytes arrive."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class _HeadTooLarge(Exception):
        pass

    class HeaderLimitedHttpToolsProtocol(HttpToolsProtocol):
        _in_head = True
        _raw_head_bytes = 0  # bytes received since the head began
        _parsed_head_bytes = 0  # URL and header fields parsed so far
        _head_count = 0
        _head_error: HeadersTooLargeError | None = None

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._raw_head_bytes += len(data)
            super().data_received(data)  # a parser error (ours included) ends in send_400_response
            # Still in the head after the whole chunk: every byte of it belonged to the head.
            if self._in_head and not self.transport.is_closing() and self._over(self._raw_head_bytes):
                self.send_400_response("")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_count = 0
            self._parsed_head_bytes = 0

        def on_url(self, url: bytes) -> None:
            self._parsed_head_bytes += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_count += 1
            self._parsed_head_bytes += len(name) + len(value) + 4
            if self._over(self._parsed_head_bytes):
                raise _HeadTooLarge  # httptools turns it into a parser error
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True
            self._raw_head_bytes = 0

        def _over(self, size: int) -> bool:
            self._head_error = _headers_error(max_header_bytes, max_header_count, count=self._head_count, size=size)
            return self._head_error is not None

        def send_400_response(self, msg: str) -> None:
            # uvicorn's own answer to a request it cannot parse is plain text; ours is OpenAI's shape.
            error: APIError = self._head_error or BadRequestError("the request is not valid HTTP/1.1")
            headers, body = errors.raw_response(error, close=True)
            reason = b"Request Header Fields Too Large" if error.status_code == 431 else b"Bad Request"
            status = b"HTTP/1.1 %d %s\r\n" % (error.status_code, reason)
            head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            self.transport.write(status + head + b"\r\n" + body)
            self.transport.close()

    return HeaderLimitedHttpToolsProtocol
