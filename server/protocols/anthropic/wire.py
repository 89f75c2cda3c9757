"""Wire types of Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`).

Requests are validated by these pydantic models (every field bounded); responses are built as dicts
by `messages.py` and described here for the OpenAPI page. Content blocks are discriminated by their
`type`: an unknown or unsupported type is a 400 naming the block (`document` gets its own reason).
Nested objects keep unknown fields and ignore them; unknown top-level fields follow
`IGNORED_ANTHROPIC_FIELDS` (`server/protocols/validation.check_unknown_fields`).

This module imports neither vLLM nor FastAPI.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from server.protocols.wire_base import JsonSchema, _Wire

MAX_MESSAGES = 2048
MAX_TOOLS = 128

MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 512

# Fields Anthropic's clients send that mean nothing for a self-hosted Gemma: accepted, logged once,
# ignored. Claude Code sends thinking, context_management and output_config on every request.
IGNORED_ANTHROPIC_FIELDS = frozenset(
    {
        "thinking",
        "context_management",
        "output_config",
        "service_tier",
        "container",
        "mcp_servers",
        "betas",
        "inference_geo",
    }
)
REFUSED_ANTHROPIC_FIELDS: dict[str, str] = {}


class CacheControl(_Wire):
    type: str = "ephemeral"


class TextBlock(_Wire):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = Field(None, description="Accepted; the engine's prefix cache does the work.")


class Base64Source(_Wire):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class URLSource(_Wire):
    type: Literal["url"]
    url: str


class ImageBlock(_Wire):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]
    cache_control: CacheControl | None = None


class ToolUseBlock(_Wire):
    type: Literal["tool_use"]
    id: str = Field(max_length=256)
    name: str = Field(max_length=128)
    input: dict[str, Any]
    cache_control: CacheControl | None = None


ToolResultContent = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]


class ToolResultBlock(_Wire):
    type: Literal["tool_result"]
    tool_use_id: str = Field(max_length=256)
    content: str | list[ToolResultContent] = ""
    is_error: bool = False
    cache_control: CacheControl | None = None


class ThinkingBlock(_Wire):
    """Accepted in the history and dropped: Gemma 3 does not think in a separate channel."""

    type: Literal["thinking"]
    thinking: str = ""
    signature: str | None = None


class RedactedThinkingBlock(_Wire):
    type: Literal["redacted_thinking"]
    data: str = ""


class DocumentBlock(_Wire):
    """Refused with a reason (PDFs and text documents are not something Gemma 3 reads)."""

    type: Literal["document"]

    @field_validator("type")
    @classmethod
    def _refused(cls, value: str) -> str:
        raise ValueError("document blocks are not supported: Gemma 3 reads text and images; send the text instead")


ContentBlock = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock | DocumentBlock,
    Field(discriminator="type"),
]


class MessageParam(_Wire):
    # Claude Code also puts "system" messages among the turns; they are system text, as any other.
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class ToolParam(_Wire):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    description: str | None = Field(None, max_length=100_000)
    input_schema: JsonSchema | None = None
    type: str | None = Field(None, description="'custom' or absent; Anthropic's server tools are skipped.")
    cache_control: CacheControl | None = None


class ToolChoice(_Wire):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Metadata(_Wire):
    user_id: str | None = Field(None, max_length=4096)


class _MessagesBase(_Wire):
    model: str = Field(max_length=256)
    messages: list[MessageParam] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None

    @field_validator("tool_choice")
    @classmethod
    def _named_tool_exists(cls, value: ToolChoice | None, info: Any) -> ToolChoice | None:
        if value is None or value.type in ("auto", "none"):
            return value
        tools: list[ToolParam] | None = info.data.get("tools")
        if not tools:
            raise ValueError(f"tool_choice {value.type!r} needs `tools`")
        if value.type == "tool" and value.name not in {tool.name for tool in tools}:
            raise ValueError(f"tool_choice names {value.name!r}, which is not one of the tools")
        return value


class MessagesRequest(_MessagesBase):
    max_tokens: int = Field(ge=1, description="Required, as in Anthropic's API.")
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: Metadata | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _bound_stop(cls, value: list[str] | None) -> list[str] | None:
        for sequence in value or ():
            if not sequence or len(sequence) > MAX_STOP_SEQUENCE_CHARS:
                raise ValueError(f"stop sequences must have 1 to {MAX_STOP_SEQUENCE_CHARS} characters")
        return value


class CountTokensRequest(_MessagesBase):
    pass


# ---- responses (documentation; built as dicts by messages.py) -------------------------------


class MessageUsage(BaseModel):
    input_tokens: int = Field(description="Prompt tokens not read from the prefix cache.")
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = Field(0, description="Prompt tokens the engine found in its prefix cache.")


class ResponseTextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ResponseToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class AnthropicMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[Annotated[ResponseTextBlock | ResponseToolUseBlock, Field(discriminator="type")]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: MessageUsage


class CountTokensResponse(BaseModel):
    input_tokens: int


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail
