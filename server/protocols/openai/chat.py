"""`POST /v1/chat/completions`, OpenAI's chat protocol: wire request -> pipeline request, events -> wire.

`chat_request` maps the validated `ChatCompletionRequest` onto `server.pipeline.request` (messages
become turns of text and image parts; each image keeps its wire path, e.g.
`messages[1].content[0].image_url`, for errors). `ChatEncoder` writes what the pipeline produces as
a `chat.completion` body or as `chat.completion.chunk` SSE events ending in `data: [DONE]`, with tool
calls as `message.tool_calls` / `delta.tool_calls` and what normalization changed in the
`X-Gemma-Normalized` header. The order of the work, admission and errors are the pipeline's.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from server import errors
from server.errors import APIError
from server.pipeline.events import ChoiceResult, Event, ParsedCall, ToolCallDelta, ToolCalls, ToolCallStart
from server.pipeline.normalize import NORMALIZED_HEADER
from server.pipeline.pipeline import Run
from server.pipeline.request import (
    ChatInput,
    Function,
    GenerationRequest,
    Image,
    Output,
    Part,
    PastToolCall,
    Text,
    Tools,
    Turn,
)
from server.protocols.openai.common import SSE_DONE, logprobs_content, sampling_of, usage_dict
from server.protocols.openai.validation import check_request_fields
from server.protocols.openai.wire import (
    AssistantMessage,
    ChatCompletionRequest,
    ImagePart,
    Message,
    NamedToolChoice,
    SystemMessage,
    TextPart,
    Tool,
    UserMessage,
)

# ---- wire -> pipeline -----------------------------------------------------------------------


def chat_request(body: ChatCompletionRequest) -> GenerationRequest:
    check_request_fields(body)
    response_format = body.response_format
    json_schema = None
    if response_format is not None and response_format.json_schema is not None:
        json_schema = response_format.json_schema.schema_
    output = Output(
        max_tokens=body.requested_max_tokens,
        max_tokens_param=body.max_tokens_param,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        json_schema=json_schema,
        json_object=response_format is not None and response_format.type == "json_object",
        stream=body.stream,
    )
    chat = ChatInput(turns_of(body.messages), tools_of(body.tools, body.tool_choice, body.parallel_tool_calls))
    return GenerationRequest(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        route="chat",
        model=body.model,
        sampling=sampling_of(body),
        output=output,
        chat=chat,
    )


def turns_of(messages: list[Message]) -> list[Turn]:
    """OpenAI messages as the pipeline's turns (also for `/tokenize`)."""
    turns = []
    for index, message in enumerate(messages):
        if isinstance(message, SystemMessage):
            turns.append(Turn(message.role, _texts(message.content)))
        elif isinstance(message, UserMessage):
            turns.append(Turn("user", _user_parts(message.content, f"messages[{index}]")))
        elif isinstance(message, AssistantMessage):
            calls = [PastToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()]
            content = None if message.content is None else _texts(message.content)
            turns.append(Turn("assistant", content, tool_calls=calls))
        else:
            turns.append(Turn("tool", _texts(message.content), tool_call_id=message.tool_call_id, name=message.name))
    return turns


def tools_of(
    tools: list[Tool] | None, tool_choice: str | NamedToolChoice | None, parallel: bool = True
) -> Tools | None:
    if not tools:
        return None
    functions = [Function(t.function.name, t.function.description, t.function.parameters) for t in tools]
    if isinstance(tool_choice, NamedToolChoice):
        return Tools(functions, "function", tool_choice.function.name, parallel=parallel)
    return Tools(functions, tool_choice or "auto", parallel=parallel)  # type: ignore[arg-type]


def _texts(content: str | list[TextPart]) -> str | list[Part]:
    return content if isinstance(content, str) else [Text(part.text) for part in content]


def _user_parts(content: str | list[TextPart | ImagePart], param: str) -> str | list[Part]:
    if isinstance(content, str):
        return content
    parts: list[Part] = []
    for index, part in enumerate(content):
        if isinstance(part, TextPart):
            parts.append(Text(part.text))
        else:
            url = part.image_url
            parts.append(Image(url.url, url.detail, f"{param}.content[{index}].image_url"))
    return parts


# ---- pipeline -> wire -----------------------------------------------------------------------


def tool_call_dict(call: ParsedCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class ChatEncoder:
    """One chat completion's answer (a `server.pipeline.pipeline.ResponseEncoder`)."""

    def __init__(self, body: ChatCompletionRequest, model: str) -> None:
        self.wire = body
        self.model = model
        self.top_n = body.top_logprobs or 0
        # Empty deltas still carry token ids or logprobs when those were asked for.
        self.keep_empty = body.return_token_ids or body.logprobs
        self.chunks: ChunkEncoder | None = None

    def headers(self, run: Run) -> dict[str, str]:
        changes = run.changes
        return {NORMALIZED_HEADER: ",".join(changes)} if changes else {}

    async def body(self, run: Run, choices: list[ChoiceResult]) -> bytes:
        return_token_ids = self.wire.return_token_ids
        body_choices = []
        for choice in choices:
            message: dict[str, Any] = {"role": "assistant", "content": choice.text}
            if choice.tool_calls:
                message["content"] = choice.text if choice.text.strip() else None
                message["tool_calls"] = [tool_call_dict(call) for call in choice.tool_calls]
            entry: dict[str, Any] = {
                "index": choice.index,
                "message": message,
                "logprobs": None,
                "finish_reason": choice.finish_reason,
            }
            if choice.logprobs is not None:
                entry["logprobs"] = {"content": logprobs_content(choice.logprobs, self.top_n)}
            if return_token_ids:
                entry["token_ids"] = choice.token_ids
            body_choices.append(entry)
        body: dict[str, Any] = {
            "id": run.request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": body_choices,
            "usage": usage_dict(run.usage),
            "system_fingerprint": None,
        }
        if return_token_ids:
            body["prompt_token_ids"] = run.prompts[0].token_ids
        return orjson.dumps(body)

    def opening(self, run: Run) -> list[bytes]:
        body = self.wire
        self.chunks = ChunkEncoder(
            run.request_id,
            self.model,
            include_usage=body.include_usage,
            return_token_ids=body.return_token_ids,
            usage=run,
            continuous_usage=body.continuous_usage,
        )
        prompt_ids = run.prompts[0].token_ids if body.return_token_ids else None
        return [self.chunks.role(index, prompt_ids if index == 0 else None) for index in range(body.n)]

    def event(self, run: Run, event: Event) -> bytes | None:
        assert self.chunks is not None
        if isinstance(event, ToolCallStart):
            start = {"id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}}
            return self.chunks.tool_call(event.index, event.position, start)
        if isinstance(event, ToolCallDelta):
            return self.chunks.tool_call(event.index, event.position, {"function": {"arguments": event.arguments}})
        if isinstance(event, ToolCalls):
            return None  # each call was streamed as it was generated
        text, finish_reason = event.text, event.finish_reason
        if not text and finish_reason is None and not (self.keep_empty and event.token_ids):
            return None
        logprobs = logprobs_content(event.logprobs, self.top_n) if event.logprobs is not None else None
        return self.chunks.delta(
            event.index, text, token_ids=event.token_ids, finish_reason=finish_reason, logprobs=logprobs
        )

    async def closing(self, run: Run) -> list[bytes]:
        assert self.chunks is not None
        return [self.chunks.usage(usage_dict(run.usage))] if self.wire.include_usage else []

    async def error(self, run: Run, error: APIError) -> bytes:
        return errors.OPENAI.sse_event(error)

    def end(self) -> bytes:
        return SSE_DONE


class ChunkEncoder:
    """The bytes of one streamed chat completion's `chat.completion.chunk` events.

    With `include_usage`, every chunk has a `usage` key (null but in the last one, as OpenAI does);
    with `continuous_usage` (a vLLM extension) every chunk carries the usage so far, read from `usage`.
    """

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        include_usage: bool,
        return_token_ids: bool,
        usage: Run | None = None,
        continuous_usage: bool = False,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.return_token_ids = return_token_ids
        self.run = usage
        self.continuous_usage = continuous_usage and usage is not None
        # Most events carry one choice with a piece of text and nothing else: the same bytes around
        # the text every time. The frame is serialized once; per token only the text goes to orjson.
        head = orjson.dumps(
            {"id": request_id, "object": "chat.completion.chunk", "created": self.created, "model": model}
        )
        self._text_prefix = b"data: " + head[:-1] + b',"system_fingerprint":null,"choices":[{"index":'
        self._text_suffix = b'},"logprobs":null,"finish_reason":null}]'
        if include_usage:
            self._text_suffix += b',"usage":null'
        self._text_suffix += b"}\n\n"

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None, **extra: Any) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            if usage is None and self.continuous_usage:
                usage = usage_dict(self.run.usage)  # type: ignore[union-attr]
            chunk["usage"] = usage
        chunk.update(extra)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def role(self, index: int, prompt_token_ids: list[int] | None = None) -> bytes:
        choice = {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        if prompt_token_ids is not None:
            return self._event([choice], prompt_token_ids=prompt_token_ids)
        return self._event([choice])

    def delta(
        self,
        index: int,
        text: str,
        *,
        token_ids: list[int] | None = None,
        finish_reason: str | None = None,
        logprobs: list[dict[str, Any]] | None = None,
    ) -> bytes:
        if (
            text
            and finish_reason is None
            and logprobs is None
            and not self.return_token_ids
            and not self.continuous_usage
        ):
            return b'%s%d,"delta":{"content":%s%s' % (self._text_prefix, index, orjson.dumps(text), self._text_suffix)
        delta: dict[str, Any] = {"content": text} if text or finish_reason is None else {}
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": {"content": logprobs} if logprobs is not None else None,
            "finish_reason": finish_reason,
        }
        if self.return_token_ids and token_ids is not None:
            choice["token_ids"] = token_ids
        return self._event([choice])

    def tool_call(self, index: int, position: int, piece: dict[str, Any]) -> bytes:
        """A piece of a tool call: its start (id, name) or the next piece of its arguments."""
        delta = {"tool_calls": [{"index": position, **piece}]}
        return self._event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])

    def usage(self, usage: dict[str, Any]) -> bytes:
        return self._event([], usage)
