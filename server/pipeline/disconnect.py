"""The client going away: noticed while a request waits or runs, so its work stops at once.

A client that disconnects cancels what its request is doing (which aborts the engine request) and
gets a 499 that nobody reads. Used by admission (a waiting request leaves the queue) and by the
pipeline (a request being prepared or generated is cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request

from server.errors import ClientClosedRequestError

T = TypeVar("T")


async def cancel_on_disconnect(http_request: Request | None, work: Awaitable[T]) -> T:
    """Runs `work`; if the client disconnects first, cancels it (which aborts the engine request)."""
    if http_request is None:
        return await work
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    watcher: asyncio.Future[None] = asyncio.ensure_future(wait_for_disconnect(http_request))
    racers: set[asyncio.Future[Any]] = {task, watcher}
    try:
        done, _ = await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientClosedRequestError("the client closed the connection")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def wait_for_disconnect(http_request: Request) -> None:
    """Returns when the client has gone away (reads and drops the rest of the request body)."""
    while True:
        message: Any = await http_request.receive()
        if message["type"] == "http.disconnect":
            return
