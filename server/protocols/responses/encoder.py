"""How a Responses API answer is written: the response object, and its stream of typed events.

The stream, every event an SSE `event:` line equal to its `type` and a `sequence_number`:
response.created (the whole response, in progress), response.in_progress; for a text answer
output_item.added (a `message`), content_part.added (`output_text`), output_text.delta...,
output_text.done, content_part.done, output_item.done; for each tool call output_item.added (a
`function_call`), function_call_arguments.delta, function_call_arguments.done, output_item.done;
then response.completed, or response.incomplete (`incomplete_details.reason: max_output_tokens`).
An error after the stream started is an `error` event, then response.failed.

`on_finished` (the service's) is awaited with the final response object before the last event or
the body is sent: that is where a stored response is written, so a client that reads it back at
once finds it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from server import errors
from server.errors import APIError
from server.pipeline.events import ChoiceResult, Event, TextDelta, Usage
from server.pipeline.pipeline import Run
from server.pipeline.tools import ParsedCall
from server.protocols.responses.items import arguments_json, function_call_item, message_item

Finished = Callable[[dict[str, Any], list[dict[str, Any]]], Awaitable[None]]


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def finish_status(finish_reason: str | None) -> tuple[str, dict[str, str] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


class ResponsesEncoder:
    """One response (a `server.pipeline.pipeline.ResponseEncoder`). `skeleton` is the response object
    without its outcome: the request's echoed fields, as the service builds them."""

    def __init__(
        self, skeleton: dict[str, Any], on_finished: Finished, *, record: Callable[[bytes], None] | None = None
    ):
        self.skeleton = skeleton
        self.on_finished = on_finished
        self.record = record  # a background stream's log, which resumed streams replay
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None  # the message item being streamed
        self._text = ""
        self._finish: str | None = None

    # ---- the response object ----------------------------------------------------------------

    def response(self, status: str, **outcome: Any) -> dict[str, Any]:
        return {**self.skeleton, "status": status, "output": list(self.output), **outcome}

    def _final(self, run: Run) -> dict[str, Any]:
        status, incomplete = finish_status(self._finish)
        return self.response(
            status, incomplete_details=incomplete, usage=usage_dict(run.usage), completed_at=time.time()
        )

    def headers(self, run: Run) -> dict[str, str]:
        skipped = self.skeleton.get("skipped_tools")
        return {"X-Gemma-Skipped-Tools": ",".join(skipped)} if skipped else {}

    async def body(self, run: Run, choices: list[ChoiceResult]) -> bytes:
        choice = choices[0]
        if choice.text.strip() or not choice.tool_calls:
            self.output.append(message_item(_item_id("msg"), choice.text, "completed"))
        self.output += [function_call_item(_compact(call)) for call in choice.tool_calls]
        self._finish = choice.finish_reason
        final = self._final(run)
        await self.on_finished(final, self.output)
        return orjson.dumps(final)

    # ---- the stream -------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        chunk = b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
        if self.record is not None:
            self.record(chunk)
        return chunk

    def opening(self, run: Run) -> list[bytes]:
        started = self.response("in_progress", usage=None)
        return [
            self._event("response.created", response=started),
            self._event("response.in_progress", response=started),
        ]

    def _open_message(self) -> list[bytes]:
        self._message = message_item(_item_id("msg"), "", "in_progress")
        self._message["content"] = []
        self._text = ""
        index = len(self.output)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._event("response.output_item.added", output_index=index, item=self._message),
            self._event(
                "response.content_part.added",
                output_index=index,
                item_id=self._message["id"],
                content_index=0,
                part=part,
            ),
        ]

    def _close_message(self) -> list[bytes]:
        assert self._message is not None
        item = message_item(self._message["id"], self._text, "completed")
        index, item_id = len(self.output), item["id"]
        part = item["content"][0]
        self.output.append(item)
        self._message = None
        return [
            self._event(
                "response.output_text.done",
                output_index=index,
                item_id=item_id,
                content_index=0,
                text=self._text,
                logprobs=[],
            ),
            self._event("response.content_part.done", output_index=index, item_id=item_id, content_index=0, part=part),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def event(self, run: Run, event: Event) -> bytes | None:
        out: list[bytes] = []
        if isinstance(event, TextDelta):
            if event.text:
                if self._message is None:
                    out += self._open_message()
                self._text += event.text
                assert self._message is not None
                out.append(
                    self._event(
                        "response.output_text.delta",
                        output_index=len(self.output),
                        item_id=self._message["id"],
                        content_index=0,
                        delta=event.text,
                        logprobs=[],
                    )
                )
            if event.finish_reason is not None:
                self._finish = event.finish_reason
            return b"".join(out) or None
        if self._message is not None:
            out += self._close_message()
        for call in event.calls:
            out += self._function_call(_compact(call))
        return b"".join(out)

    def _function_call(self, call: ParsedCall) -> list[bytes]:
        index = len(self.output)
        item = function_call_item(call)
        started = {**item, "arguments": "", "status": "in_progress"}
        self.output.append(item)
        item_id = item["id"]
        return [
            self._event("response.output_item.added", output_index=index, item=started),
            self._event(
                "response.function_call_arguments.delta", output_index=index, item_id=item_id, delta=call.arguments
            ),
            self._event(
                "response.function_call_arguments.done",
                output_index=index,
                item_id=item_id,
                arguments=call.arguments,
                name=call.name,
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    async def closing(self, run: Run) -> list[bytes]:
        out: list[bytes] = []
        if self._message is None and not self.output:
            out += self._open_message()  # nothing was generated: still one (empty) message
        if self._message is not None:
            out += self._close_message()
        final = self._final(run)
        await self.on_finished(final, self.output)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        out.append(self._event(kind, response=final))
        return out

    async def error(self, run: Run, error: APIError) -> bytes:
        failed = self.response(
            "failed",
            error={"code": error.code or error.error_type, "message": error.message},
            usage=usage_dict(run.usage),
        )
        await self.on_finished(failed, self.output)
        detail = errors.responses_stream_error(error)
        return self._event("error", **detail) + self._event("response.failed", response=failed)

    def end(self) -> bytes:
        return b""


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _compact(call: ParsedCall) -> ParsedCall:
    return ParsedCall(call.name, arguments_json(call.arguments), call.id)
