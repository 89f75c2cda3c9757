"""`POST /v1/messages` and `/v1/messages/count_tokens`, Anthropic's Messages API, on the one pipeline.

`messages_request` maps a validated `MessagesRequest` onto `server.pipeline.request`:
- `system` (a string or text blocks) and `system` messages become system turns;
- text and image blocks become the turn's parts (a base64 source becomes a data: URI, so the image
  goes through the same fetch/decode limits as any other); `tool_use` blocks become the assistant's
  earlier calls; each `tool_result` becomes a tool turn (an error result says so), its images a user
  turn after it; a `tool_result` whose `tool_use_id` no earlier `tool_use` has is a 400;
  `thinking`/`redacted_thinking` blocks are dropped (the `document` type is refused by the wire types);
- `tools` become functions (Anthropic's server tools, which have a `type`, are skipped), and
  `tool_choice` auto/any/tool/none the pipeline's auto/required/function/none.
`MessagesEncoder` writes a `message` body, or the SSE events Anthropic sends: message_start,
content_block_start, ping, content_block_delta (text_delta; input_json_delta for a tool's input),
content_block_stop, message_delta (stop_reason, usage), message_stop; an `error` event mid-stream.

Usage follows Anthropic: `input_tokens` are the prompt tokens not read from the prefix cache,
`cache_read_input_tokens` those that were (their sum is what count_tokens answers).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson

from server import errors
from server.errors import APIError, BadRequestError
from server.pipeline.events import ChoiceResult, Event, ParsedCall, TextDelta, ToolCallDelta, ToolCallStart, Usage
from server.pipeline.pipeline import Run
from server.pipeline.request import (
    ChatInput,
    Function,
    GenerationRequest,
    Image,
    Output,
    Part,
    PastToolCall,
    Sampling,
    Text,
    ToolChoiceMode,
    Tools,
    Turn,
)
from server.protocols.anthropic.wire import (
    IGNORED_ANTHROPIC_FIELDS,
    REFUSED_ANTHROPIC_FIELDS,
    ImageBlock,
    MessageParam,
    MessagesRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolChoice,
    ToolParam,
    ToolResultBlock,
    ToolUseBlock,
    _MessagesBase,
)
from server.protocols.sse import named_event
from server.protocols.validation import check_unknown_fields

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}
TOOL_CHOICE_MODES: dict[str, ToolChoiceMode] = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}

# ---- wire -> pipeline -----------------------------------------------------------------------


def check_fields(body: _MessagesBase) -> None:
    check_unknown_fields(body, ignored=IGNORED_ANTHROPIC_FIELDS, refused=REFUSED_ANTHROPIC_FIELDS, protocol="Anthropic")


def chat_input(body: _MessagesBase) -> ChatInput:
    """The conversation, tools and tool choice of a messages or count_tokens request."""
    turns: list[Turn] = []
    if body.system is not None:
        turns.append(Turn("system", _texts(body.system)))
    calls: dict[str, str] = {}  # tool_use id -> function name, from the assistant turns so far
    for index, message in enumerate(body.messages):
        turns.extend(_turns_of(message, f"messages[{index}]", calls))
    return ChatInput(turns, _tools(body.tools, body.tool_choice))


def messages_request(body: MessagesRequest) -> GenerationRequest:
    check_fields(body)
    sampling = Sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k if body.top_k else None,
        stop=list(body.stop_sequences or ()),
    )
    return GenerationRequest(
        request_id=f"msg_{uuid.uuid4().hex[:24]}",
        route="messages",
        model=body.model,
        sampling=sampling,
        output=Output(max_tokens=body.max_tokens, max_tokens_param="max_tokens", stream=body.stream),
        chat=chat_input(body),
    )


def _texts(content: str | list[TextBlock]) -> str | list[Part]:
    return content if isinstance(content, str) else [Text(block.text) for block in content]


def _image(block: ImageBlock, param: str) -> Image:
    source = block.source
    url = source.url if source.type == "url" else f"data:{source.media_type};base64,{source.data}"
    return Image(url, "auto", f"{param}.source")


def _turns_of(message: MessageParam, param: str, calls: dict[str, str]) -> list[Turn]:
    content = message.content
    if message.role == "system":
        if isinstance(content, str):
            return [Turn("system", content)]
        return [Turn("system", [Text(b.text) for b in content if isinstance(b, TextBlock)])]
    if isinstance(content, str):
        return [Turn(message.role, content)]
    if message.role == "assistant":
        return [_assistant_turn(content, param, calls)]
    turns: list[Turn] = []
    parts: list[Part] = []
    for index, block in enumerate(content):
        where = f"{param}.content[{index}]"
        if isinstance(block, TextBlock):
            parts.append(Text(block.text))
        elif isinstance(block, ImageBlock):
            parts.append(_image(block, where))
        elif isinstance(block, ToolResultBlock):
            if parts:
                turns.append(Turn("user", parts))
                parts = []
            turns.extend(_tool_result_turns(block, where, calls))
        elif isinstance(block, ToolUseBlock):
            raise BadRequestError("tool_use blocks belong in assistant messages", param=where)
        # thinking blocks: dropped
    if parts or not turns:
        turns.append(Turn("user", parts))
    return turns


def _assistant_turn(content: list[Any], param: str, calls: dict[str, str]) -> Turn:
    parts: list[Part] = []
    past: list[PastToolCall] = []
    for index, block in enumerate(content):
        if isinstance(block, TextBlock):
            parts.append(Text(block.text))
        elif isinstance(block, ToolUseBlock):
            calls[block.id] = block.name
            past.append(PastToolCall(block.id, block.name, json.dumps(block.input, ensure_ascii=False)))
        elif not isinstance(block, (ThinkingBlock, RedactedThinkingBlock)):
            raise BadRequestError(
                f"{block.type} blocks cannot be in assistant messages", param=f"{param}.content[{index}]"
            )
    return Turn("assistant", parts, tool_calls=past)


def _tool_result_turns(block: ToolResultBlock, param: str, calls: dict[str, str]) -> list[Turn]:
    name = calls.get(block.tool_use_id)
    if name is None:
        raise BadRequestError(
            f"tool_result refers to tool_use_id {block.tool_use_id!r}, which no earlier tool_use block has",
            param=f"{param}.tool_use_id",
        )
    content = block.content
    images: list[Part] = []
    if isinstance(content, str):
        text = content
    else:
        text = "\n\n".join(part.text for part in content if isinstance(part, TextBlock))
        images = [
            _image(part, f"{param}.content[{i}]") for i, part in enumerate(content) if isinstance(part, ImageBlock)
        ]
    if block.is_error:
        text = f"(the call failed) {text}"
    turns = [Turn("tool", text, tool_call_id=block.tool_use_id, name=name)]
    if images:
        turns.append(Turn("user", images))
    return turns


def _tools(tools: list[ToolParam] | None, choice: ToolChoice | None) -> Tools | None:
    functions = [
        Function(tool.name, tool.description, tool.input_schema)
        for tool in tools or ()
        if tool.type in (None, "custom")  # server tools (web search, bash, ...) are Anthropic's to run
    ]
    if not functions:
        return None
    if choice is None:
        return Tools(functions)
    parallel = not choice.disable_parallel_tool_use
    return Tools(functions, TOOL_CHOICE_MODES[choice.type], choice.name, parallel=parallel)


# ---- pipeline -> wire -----------------------------------------------------------------------


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
    }


def stop_of(finish_reason: str | None, stop_reason: int | str | None) -> tuple[str | None, str | None]:
    """(stop_reason, stop_sequence) in Anthropic's terms."""
    if finish_reason == "stop" and isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    if finish_reason is None:
        return None, None
    return STOP_REASONS.get(finish_reason, "end_turn"), None


def _sse(data: dict[str, Any]) -> bytes:
    return named_event(data["type"], data)


class MessagesEncoder:
    """One message's answer (a `server.pipeline.pipeline.ResponseEncoder`)."""

    def __init__(self, body: MessagesRequest, request_id: str) -> None:
        self.model = body.model  # Anthropic's clients see the name they asked for
        self.request_id = request_id
        self._block: int = -1  # index of the content block being streamed
        self._open: str | None = None  # the type of the block open now ("text", "tool_use")
        self._stop: tuple[str | None, str | None] = (None, None)

    def headers(self, run: Run) -> dict[str, str]:
        return {"request-id": self.request_id}

    def _message(self, run: Run, content: list[dict[str, Any]], stop: tuple[str | None, str | None]) -> dict[str, Any]:
        return {
            "id": run.request_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop[0],
            "stop_sequence": stop[1],
            "usage": usage_dict(run.usage),
        }

    async def body(self, run: Run, choices: list[ChoiceResult]) -> bytes:
        choice = choices[0]
        content: list[dict[str, Any]] = []
        if choice.text.strip() or not choice.tool_calls:
            content.append({"type": "text", "text": choice.text})
        for call in choice.tool_calls:
            content.append({"type": "tool_use", "id": tool_use_id(call.id), "name": call.name, "input": _input(call)})
        return orjson.dumps(self._message(run, content, stop_of(choice.finish_reason, choice.stop_reason)))

    def opening(self, run: Run) -> list[bytes]:
        start = self._message(run, [], (None, None))
        start["usage"]["output_tokens"] = 0
        return [_sse({"type": "message_start", "message": start}), _sse({"type": "ping"})]

    def _open_block(self, block: dict[str, Any]) -> list[bytes]:
        out = self._close_block()
        self._block += 1
        self._open = block["type"]
        out.append(_sse({"type": "content_block_start", "index": self._block, "content_block": block}))
        return out

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _sse({"type": "content_block_delta", "index": self._block, "delta": delta})

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [_sse({"type": "content_block_stop", "index": self._block})]

    def event(self, run: Run, event: Event) -> bytes | None:
        out: list[bytes] = []
        if isinstance(event, TextDelta):
            if event.text:
                if self._open != "text":
                    out += self._open_block({"type": "text", "text": ""})
                out.append(self._delta({"type": "text_delta", "text": event.text}))
            if event.finish_reason is not None:
                self._stop = stop_of(event.finish_reason, event.stop_reason)
        elif isinstance(event, ToolCallStart):
            out += self._open_block({"type": "tool_use", "id": tool_use_id(event.id), "name": event.name, "input": {}})
        elif isinstance(event, ToolCallDelta):
            out.append(self._delta({"type": "input_json_delta", "partial_json": event.arguments}))
        else:  # ToolCalls: the choice's calls are all streamed
            out += self._close_block()
        return b"".join(out) or None

    async def closing(self, run: Run) -> list[bytes]:
        out = self._close_block()
        if self._block < 0:  # nothing was generated: still one (empty) text block, as Anthropic sends
            out += self._open_block({"type": "text", "text": ""}) + self._close_block()
        stop_reason, stop_sequence = self._stop
        delta = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}}
        delta["usage"] = {"output_tokens": run.usage.completion_tokens}
        out.append(_sse(delta))
        out.append(_sse({"type": "message_stop"}))
        return out

    async def error(self, run: Run, error: APIError) -> bytes:
        return errors.ANTHROPIC.sse_event(error)

    def end(self) -> bytes:
        return b""


def _input(call: ParsedCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"value": value}
