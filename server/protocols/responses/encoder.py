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
from server.pipeline.events import ChoiceResult, Event, ParsedCall, TextDelta, ToolCallDelta, ToolCallStart, Usage
from server.pipeline.pipeline import Run
from server.protocols.responses.items import function_call_item, message_item
from server.protocols.sse import named_event

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
        self._message: tuple[int, dict[str, Any]] | None = None  # the message item being streamed, and its index
        self._text = ""
        self._calls: list[int] = []  # the output indexes of the calls being streamed, by position
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
        self.output += [function_call_item(call) for call in choice.tool_calls]
        self._finish = choice.finish_reason
        final = self._final(run)
        await self.on_finished(final, self.output)
        return orjson.dumps(final)

    # ---- the stream: one method per step of the sequence, driven by the pipeline's events ---------

    def _event(self, kind: str, **fields: Any) -> bytes:
        chunk = named_event(kind, {"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        if self.record is not None:
            self.record(chunk)
        return chunk

    def opening(self, run: Run) -> list[bytes]:
        return self._started()

    def _started(self) -> list[bytes]:
        started = self.response("in_progress", usage=None)
        return [
            self._event("response.created", response=started),
            self._event("response.in_progress", response=started),
        ]

    def _open_message(self, item_id: str | None = None) -> list[bytes]:
        item = message_item(item_id or _item_id("msg"), "", "in_progress")
        item["content"] = []
        self._message = (len(self.output), item)
        self.output.append(item)
        self._text = ""
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        at = {"output_index": self._message[0], "item_id": item["id"]}
        return [
            self._event("response.output_item.added", output_index=at["output_index"], item=item),
            self._event("response.content_part.added", **at, content_index=0, part=part),
        ]

    def _text_delta(self, text: str) -> list[bytes]:
        out = [] if self._message is not None else self._open_message()
        assert self._message is not None
        self._text += text
        at = {"output_index": self._message[0], "item_id": self._message[1]["id"]}
        return [*out, self._event("response.output_text.delta", **at, content_index=0, delta=text, logprobs=[])]

    def _close_message(self) -> list[bytes]:
        if self._message is None:
            return []
        index, open_item = self._message
        item = self.output[index] = message_item(open_item["id"], self._text, "completed")
        self._message = None
        at = {"output_index": index, "item_id": item["id"]}
        return [
            self._event("response.output_text.done", **at, content_index=0, text=self._text, logprobs=[]),
            self._event("response.content_part.done", **at, content_index=0, part=item["content"][0]),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _start_call(self, call: ParsedCall) -> list[bytes]:
        out = self._close_message()
        item = function_call_item(ParsedCall(call.name, "", call.id), "in_progress")
        self._calls.append(len(self.output))
        self.output.append(item)
        return [*out, self._event("response.output_item.added", output_index=self._calls[-1], item=item)]

    def _call_delta(self, position: int, arguments: str) -> bytes:
        index = self._calls[position]
        self.output[index]["arguments"] += arguments
        return self._event(
            "response.function_call_arguments.delta",
            output_index=index,
            item_id=self.output[index]["id"],
            delta=arguments,
        )

    def _end_calls(self, calls: list[ParsedCall]) -> list[bytes]:
        out: list[bytes] = []
        for index, call in zip(self._calls, calls, strict=True):
            item = self.output[index] = function_call_item(call)
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    output_index=index,
                    item_id=item["id"],
                    arguments=call.arguments,
                    name=call.name,
                )
            )
            out.append(self._event("response.output_item.done", output_index=index, item=item))
        self._calls = []
        return out

    def _ended(self, final: dict[str, Any]) -> bytes:
        kinds = {"completed": "response.completed", "incomplete": "response.incomplete"}
        return self._event(kinds.get(final["status"], "response.failed"), response=final)

    def event(self, run: Run, event: Event) -> bytes | None:
        out: list[bytes] = []
        if isinstance(event, TextDelta):
            if event.text:
                out += self._text_delta(event.text)
            if event.finish_reason is not None:
                self._finish = event.finish_reason
        elif isinstance(event, ToolCallStart):
            out += self._start_call(ParsedCall(event.name, "", event.id))
        elif isinstance(event, ToolCallDelta):
            out.append(self._call_delta(event.position, event.arguments))
        else:
            out += self._end_calls(event.calls)
        return b"".join(out) or None

    async def closing(self, run: Run) -> list[bytes]:
        out: list[bytes] = []
        if self._message is None and not self.output:
            out += self._open_message()  # nothing was generated: still one (empty) message
        out += self._close_message()
        final = self._final(run)
        await self.on_finished(final, self.output)
        out.append(self._ended(final))
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


async def _nothing_to_store(final: dict[str, Any], output: list[dict[str, Any]]) -> None:
    return None


def replay(response: dict[str, Any], after: int | None = None) -> list[bytes]:
    """A finished response's stream, made again from the stored object (any process, any time):
    the same sequence as the live one, with each item's text and arguments in one delta (and so its
    own numbering: `after` is a sequence number of this replay)."""
    skeleton = {**response, "output": [], "usage": None, "error": None, "incomplete_details": None}
    encoder = ResponsesEncoder(skeleton, _nothing_to_store)
    out = encoder._started()
    for item in response.get("output", []):
        if item.get("type") == "message":
            out += encoder._open_message(item["id"])
            out += encoder._text_delta("".join(part.get("text", "") for part in item.get("content", [])))
            out += encoder._close_message()
        elif item.get("type") == "function_call":
            call = ParsedCall(item["name"], item.get("arguments", ""), item["call_id"])
            out += encoder._start_call(call)
            out.append(encoder._call_delta(0, call.arguments))
            out += encoder._end_calls([call])
    out.append(encoder._ended(response))
    return out[after + 1 :] if after is not None else out
