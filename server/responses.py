"""Response encoding: chat and text completion bodies and their SSE chunks, as bytes.

Responses are built as dicts and serialized with orjson (no pydantic on the hot path). The shapes
follow OpenAI's API reference; `server/protocol.py` documents them for the OpenAPI page.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.engine.interface import TokenLogprob

SSE_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class UsageCounter:
    prompt_tokens: int = 0
    image_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens_by_choice: dict[int, int] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return sum(self.completion_tokens_by_choice.values())

    def add_completion(self, index: int, count: int) -> None:
        self.completion_tokens_by_choice[index] = self.completion_tokens_by_choice.get(index, 0) + count

    def to_dict(self) -> dict[str, Any]:
        completion = self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {
                "cached_tokens": self.cached_tokens,
                "image_tokens": self.image_tokens,
                "text_tokens": self.prompt_tokens - self.image_tokens,
            },
        }


def _finite(value: float) -> float:
    # JSON has no -Infinity; OpenAI reports impossible tokens as -9999.0.
    return value if value > -9999.0 else -9999.0


def logprobs_content(entries: list[TokenLogprob], top_n: int) -> list[dict[str, Any]]:
    """Chat's `logprobs.content`: one entry per generated token with its `top_n` alternatives."""
    content = []
    for entry in entries:
        top = [
            {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode())}
            for _id, token, logprob in entry.top[:top_n]
        ]
        content.append(
            {
                "token": entry.token,
                "logprob": _finite(entry.logprob),
                "bytes": list(entry.token.encode()),
                "top_logprobs": top,
            }
        )
    return content


def completion_logprobs(
    entries: list[TokenLogprob | None], top_n: int, text_offset: int, zero_width: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The legacy completions `logprobs`: parallel lists, top alternatives as {token: logprob}.

    As in OpenAI's (and vLLM's) completions, `top_logprobs` has the `top_n` most likely tokens and the
    chosen one. An entry without a logprob (`None`, or NaN: the first prompt token, with `echo`) has
    null there. `text_offset` is each token's position in the returned text; tokens in `zero_width`
    (special tokens left out of the text) take no room.
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for entry in entries:
        offsets.append(text_offset)
        if entry is None or math.isnan(entry.logprob):
            tokens.append(entry.token if entry is not None else "")
            token_logprobs.append(None)
            top_logprobs.append(None)
            if entry is not None and entry.token not in zero_width:
                text_offset += len(entry.token)
            continue
        tokens.append(entry.token)
        token_logprobs.append(_finite(entry.logprob))
        top = {token: _finite(logprob) for _id, token, logprob in entry.top[:top_n]}
        top.setdefault(entry.token, _finite(entry.logprob))
        top_logprobs.append(top)
        if entry.token not in zero_width:
            text_offset += len(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


# ---- chat -------------------------------------------------------------------------------------


@dataclass(slots=True)
class ChatChoiceResult:
    index: int
    text: str
    finish_reason: str | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[dict[str, Any]] | None = None


def chat_completion_body(
    *,
    request_id: str,
    model: str,
    created: int,
    choices: list[ChatChoiceResult],
    usage: UsageCounter,
    top_logprobs: int | None,
    prompt_token_ids: list[int] | None,
) -> bytes:
    body_choices = []
    for choice in sorted(choices, key=lambda c: c.index):
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        if choice.tool_calls:
            message["content"] = choice.text if choice.text.strip() else None
            message["tool_calls"] = choice.tool_calls
        entry: dict[str, Any] = {
            "index": choice.index,
            "message": message,
            "logprobs": None,
            "finish_reason": choice.finish_reason,
        }
        if choice.logprobs is not None:
            entry["logprobs"] = {"content": logprobs_content(choice.logprobs, top_logprobs or 0)}
        if prompt_token_ids is not None:
            entry["token_ids"] = choice.token_ids
        body_choices.append(entry)
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": body_choices,
        "usage": usage.to_dict(),
        "system_fingerprint": None,
    }
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = prompt_token_ids
    return orjson.dumps(body)


class ChunkEncoder:
    """Builds the SSE events of one streamed chat completion.

    With `include_usage`, every chunk has a `usage` key (null but in the last one, as OpenAI does);
    with `continuous_usage` (a vLLM extension) every chunk carries the usage so far.
    """

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        include_usage: bool,
        return_token_ids: bool,
        usage: UsageCounter | None = None,
        continuous_usage: bool = False,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.return_token_ids = return_token_ids
        self.usage_counter = usage
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
                usage = self.usage_counter.to_dict()  # type: ignore[union-attr]
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

    def tool_calls(self, index: int, calls: list[dict[str, Any]]) -> bytes:
        deltas = [{"index": position, **call} for position, call in enumerate(calls)]
        return self._event([{"index": index, "delta": {"tool_calls": deltas}, "logprobs": None, "finish_reason": None}])

    def usage(self, usage: UsageCounter) -> bytes:
        return self._event([], usage.to_dict())


# ---- text completions -------------------------------------------------------------------------


@dataclass(slots=True)
class CompletionChoiceResult:
    index: int
    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] | None = None


def completion_body(
    *,
    request_id: str,
    model: str,
    created: int,
    choices: list[CompletionChoiceResult],
    usage: UsageCounter,
    top_logprobs: int | None,
    prompt_token_ids: list[list[int]] | None,
    n: int,
    text_offsets: list[int],
    zero_width: frozenset[str] = frozenset(),
) -> bytes:
    body_choices = []
    for choice in sorted(choices, key=lambda c: c.index):
        entry: dict[str, Any] = {
            "index": choice.index,
            "text": choice.text,
            "logprobs": None,
            "finish_reason": choice.finish_reason,
        }
        if choice.logprobs is not None:
            entry["logprobs"] = completion_logprobs(
                choice.logprobs, top_logprobs or 0, text_offsets[choice.index // n], zero_width
            )
        if prompt_token_ids is not None:
            entry["token_ids"] = choice.token_ids
            entry["prompt_token_ids"] = prompt_token_ids[choice.index // n]
        body_choices.append(entry)
    body = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": body_choices,
        "usage": usage.to_dict(),
        "system_fingerprint": None,
    }
    return orjson.dumps(body)


class CompletionChunkEncoder:
    def __init__(self, request_id: str, model: str, *, include_usage: bool, usage: UsageCounter, continuous: bool):
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.usage_counter = usage
        self.continuous = continuous

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage if usage is not None or not self.continuous else self.usage_counter.to_dict()
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def delta(
        self,
        index: int,
        text: str,
        *,
        finish_reason: str | None,
        logprobs: dict[str, Any] | None = None,
        token_ids: list[int] | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> bytes:
        choice: dict[str, Any] = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        if prompt_token_ids is not None:
            choice["prompt_token_ids"] = prompt_token_ids
        return self._event([choice])

    def usage(self) -> bytes:
        return self._event([], self.usage_counter.to_dict())
