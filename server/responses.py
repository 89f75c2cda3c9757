"""Response encoding: `chat.completion` bodies and `chat.completion.chunk` SSE events, as bytes.

Responses are built as dicts and serialized with orjson (no pydantic on the hot path). The shapes
follow OpenAI's API reference; `server/protocol.py` documents them for the OpenAPI page.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.generation import TokenLogprob

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


def logprobs_content(entries: list[TokenLogprob], top_n: int) -> list[dict[str, Any]]:
    """OpenAI's `logprobs.content`: one entry per generated token with its top alternatives."""
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


def _finite(value: float) -> float:
    # JSON has no -Infinity; OpenAI reports impossible tokens as -9999.0.
    return value if value > -9999.0 else -9999.0


@dataclass(slots=True)
class ChatChoiceResult:
    index: int
    text: str
    finish_reason: str | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


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
        entry: dict[str, Any] = {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
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
    """Builds the SSE events of one streamed chat completion."""

    def __init__(self, request_id: str, model: str, *, include_usage: bool, return_token_ids: bool) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.return_token_ids = return_token_ids

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def role(self, index: int) -> bytes:
        return self._event(
            [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )

    def delta(
        self,
        index: int,
        text: str,
        *,
        token_ids: list[int] | None = None,
        finish_reason: str | None = None,
        logprobs: list[dict[str, Any]] | None = None,
        usage: dict[str, Any] | None = None,
    ) -> bytes:
        delta: dict[str, Any] = {"content": text} if text or finish_reason is None else {}
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": {"content": logprobs} if logprobs is not None else None,
            "finish_reason": finish_reason,
        }
        if self.return_token_ids and token_ids is not None:
            choice["token_ids"] = token_ids
        return self._event([choice], usage)

    def usage(self, usage: UsageCounter) -> bytes:
        return self._event([], usage.to_dict())
