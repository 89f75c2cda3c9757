"""Wire types of the OpenAI-compatible API: what clients send, and (for the OpenAPI document) what
they get back.

Requests are validated by these pydantic models; responses are built as plain dicts in
`server/responses.py` for speed and described here so `/openapi.json` documents them. This module
imports neither vLLM nor FastAPI.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Bounds on request fields. They keep one request from asking for unbounded work (vLLM
# CVE-2026-34756 was an unbounded `n`); the server's admission control bounds the rest.
MAX_N = 16
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 512
MAX_MESSAGES = 2048


class _Wire(BaseModel):
    # Unknown fields are accepted and ignored: clients and SDKs send fields newer than this server.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _no_non_finite_extras(self) -> Any:
        # Python's JSON parser reads NaN and Infinity; declared fields refuse them (allow_inf_nan),
        # and so do the ignored unknown ones: such a body is not JSON.
        for name, value in (self.__pydantic_extra__ or {}).items():
            if not _all_finite(value):
                raise ValueError(f"{name}: must be a finite number (NaN and Infinity are not allowed)")
        return self


def _all_finite(value: Any, depth: int = 0) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if depth > 64:
        return True
    if isinstance(value, dict):
        return all(_all_finite(item, depth + 1) for item in value.values())
    if isinstance(value, list):
        return all(_all_finite(item, depth + 1) for item in value)
    return True


# ---- request: content parts -----------------------------------------------------------------


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ImageURL(_Wire):
    url: str = Field(description="An http(s) URL or a data: URI (base64) of a PNG/JPEG/WebP/GIF image.")
    detail: Literal["auto", "low", "high"] = Field(
        "auto",
        description="low: one view at the model's image size; high/auto: Gemma 3 pan-and-scan "
        "crops for large or elongated images (when enabled).",
    )


class ImagePart(_Wire):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _accept_bare_string(cls, value: Any) -> Any:
        # Some clients send `"image_url": "https://..."`; accept it as the URL.
        if isinstance(value, str):
            return {"url": value}
        return value


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


# ---- request: messages ----------------------------------------------------------------------


class SystemMessage(_Wire):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Wire):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class FunctionCall(_Wire):
    name: str
    arguments: str


class ToolCall(_Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Wire):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Wire):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


# ---- request: chat completion ---------------------------------------------------------------


class StreamOptions(_Wire):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ChatCompletionRequest(_Wire):
    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    user: str | None = None
    # vLLM-compatible extension: return the prompt and output token ids.
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _bound_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        sequences = [value] if isinstance(value, str) else (value or [])
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        for sequence in sequences:
            if not sequence:
                raise ValueError("stop sequences must not be empty")
            if len(sequence) > MAX_STOP_SEQUENCE_CHARS:
                raise ValueError(f"a stop sequence may have at most {MAX_STOP_SEQUENCE_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses (documentation; built as dicts in server/responses.py) -----------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: dict[str, Any] | None = None
    token_ids: list[int] | None = Field(None, description="Extension: with return_token_ids.")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    prompt_token_ids: list[int] | None = Field(None, description="Extension: with return_token_ids.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
