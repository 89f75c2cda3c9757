"""Responses API items: input items -> the pipeline's turns, and the output items a response holds.

Input items, each validated by its own model so an error names its place (`input[2].content[0]`):
- `message` (the `type` may be left out): roles developer, system, user, assistant; content a
  string or parts `input_text`, `input_image` (`image_url` as a URL or data: URI, `detail`),
  `output_text`/`refusal` (earlier assistant text); `file_id` images and `input_file` get a 400;
- `function_call` (an earlier call of the model) and `function_call_output` (its result; a
  `call_id` no earlier call has is a 400);
- `reasoning` items are accepted and dropped (Gemma 3 has no separate reasoning channel).
Every other item type is a 400 naming it.

`with_ids` gives each input item the id the store lists it under (`/input_items`).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field, ValidationError

from server.errors import BadRequestError
from server.pipeline.events import ParsedCall
from server.pipeline.request import Image, Part, PastToolCall, Text, Turn
from server.protocols.validation import validation_error_to_api_error
from server.protocols.wire_base import _Wire


class _InputText(_Wire):
    type: Literal["input_text", "output_text", "text"]
    text: str


class _Refusal(_Wire):
    type: Literal["refusal"]
    refusal: str


class _InputImage(_Wire):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["low", "high", "auto", "original"] = "auto"


class _MessageItem(_Wire):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[dict[str, Any]] = Field(max_length=1024)


class _FunctionCallItem(_Wire):
    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str = Field(max_length=128)
    arguments: str = ""


class _FunctionCallOutputItem(_Wire):
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=256)
    output: str | list[dict[str, Any]]


PART_MODELS: dict[str, type[_Wire]] = {
    "input_text": _InputText,
    "output_text": _InputText,
    "text": _InputText,
    "refusal": _Refusal,
    "input_image": _InputImage,
}
ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def _validated(model: type[_Wire], value: Any, param: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        error = validation_error_to_api_error([dict(e) for e in exc.errors()])
        inner = error.param
        error.param = f"{param}.{inner}" if inner else param
        error.message = f"{error.param}: {error.message.split(': ', 1)[-1]}"
        raise error from None


def item_type(item: dict[str, Any]) -> str:
    kind = item.get("type")
    if kind is None and "role" in item:
        return "message"
    return str(kind)


def turns_of(items: list[dict[str, Any]], calls: dict[str, str], base: str = "input") -> list[Turn]:
    """The conversation in `items`; `calls` (call_id -> function name) carries earlier calls across
    a previous_response_id chain and is filled in as calls are read."""
    turns: list[Turn] = []
    for index, item in enumerate(items):
        param = f"{base}[{index}]"
        if not isinstance(item, dict):
            raise BadRequestError(f"{param}: must be an object", param=param)
        kind = item_type(item)
        if kind == "message":
            message = _validated(_MessageItem, item, param)
            turns.append(Turn(message.role, _parts(message.content, f"{param}.content", message.role)))
        elif kind == "function_call":
            call = _validated(_FunctionCallItem, item, param)
            calls[call.call_id] = call.name
            turns.append(Turn("assistant", "", tool_calls=[PastToolCall(call.call_id, call.name, call.arguments)]))
        elif kind == "function_call_output":
            result = _validated(_FunctionCallOutputItem, item, param)
            if result.call_id not in calls:
                raise BadRequestError(
                    f"{param}.call_id: no earlier function_call has the call_id {result.call_id!r}",
                    param=f"{param}.call_id",
                )
            text, images = _output_parts(result.output, f"{param}.output")
            turns.append(Turn("tool", text, tool_call_id=result.call_id, name=calls[result.call_id]))
            if images:
                turns.append(Turn("user", images))
        elif kind == "reasoning":
            continue
        else:
            raise BadRequestError(
                f"{param}.type: unsupported input item type {kind!r}; expected message, function_call, "
                "function_call_output or reasoning",
                param=f"{param}.type",
            )
    return turns


def _parts(content: str | list[dict[str, Any]], param: str, role: str) -> str | list[Part]:
    if isinstance(content, str):
        return content
    parts: list[Part] = []
    for index, raw in enumerate(content):
        where = f"{param}[{index}]"
        kind = raw.get("type") if isinstance(raw, dict) else None
        model = PART_MODELS.get(str(kind))
        if model is None:
            reason = "file inputs are not supported: Gemma 3 reads text and images" if kind == "input_file" else ""
            raise BadRequestError(
                f"{where}.type: {reason or f'unsupported content part type {kind!r}'}", param=f"{where}.type"
            )
        part = _validated(model, raw, where)
        if isinstance(part, _InputText):
            parts.append(Text(part.text))
        elif isinstance(part, _Refusal):
            parts.append(Text(part.refusal))
        else:
            if role != "user":
                raise BadRequestError(f"{where}: images are only allowed in user messages", param=where)
            parts.append(_image(part, where))
    return parts


def _image(part: _InputImage, param: str) -> Image:
    if part.image_url is None:
        reason = "file_id images are not supported (no file store here)" if part.file_id else "image_url is required"
        raise BadRequestError(f"{param}: {reason}; send the image as image_url (a URL or data: URI)", param=param)
    return Image(part.image_url, "high" if part.detail == "original" else part.detail, f"{param}.image_url")


def _output_parts(output: str | list[dict[str, Any]], param: str) -> tuple[str, list[Part]]:
    if isinstance(output, str):
        return output, []
    parts = _parts(output, param, "user")
    assert not isinstance(parts, str)
    text = "\n\n".join(part.text for part in parts if isinstance(part, Text))
    return text, [part for part in parts if isinstance(part, Image)]


def with_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input items as stored and listed: each with an `id` (kept if the client sent one)."""
    listed = []
    for item in items:
        kind = item_type(item)
        entry = {"type": kind, **item}
        entry.setdefault("id", f"{ID_PREFIX.get(kind, 'item')}_{uuid.uuid4().hex[:24]}")
        listed.append(entry)
    return listed


def text_input(text: str) -> list[dict[str, Any]]:
    """`input` given as a string: one user message."""
    return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]


# ---- output items -----------------------------------------------------------------------------


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def function_call_item(call: ParsedCall, status: str = "completed") -> dict[str, Any]:
    return {
        "id": "fc_" + call.id.removeprefix("call_"),
        "type": "function_call",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": status,
    }
