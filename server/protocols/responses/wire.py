"""Wire types of OpenAI's Responses API (`/v1/responses`).

The request's top level is a pydantic model (every field bounded). Input items are many kinds; each
is validated by its own model in `items.py` (`ITEM_MODELS`), so an error names `input[3].content[0]`
exactly. Tools are kept as objects: function tools are validated (`FunctionTool`), every other type
(web_search, image_generation, mcp, custom, namespace, ...) is skipped, and the response says which
(`skipped_tools`), as Codex CLI sends them and must not be refused.

This module imports neither vLLM nor FastAPI.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from server.protocols.wire_base import JsonSchema, _Wire

MAX_INPUT_ITEMS = 4096
MAX_TOOLS = 256
MAX_METADATA_KEYS = 16

# Fields the Responses API has that mean nothing for a self-hosted Gemma: accepted, logged once, ignored.
IGNORED_RESPONSES_FIELDS = frozenset(
    {
        "reasoning",
        "prompt_cache_key",
        "prompt_cache_retention",
        "service_tier",
        "safety_identifier",
        "client_metadata",
        "max_tool_calls",
        "stream_options",
        "conversation",
        "prompt",
        "top_logprobs",
    }
)
REFUSED_RESPONSES_FIELDS = {
    "chat_template": "client-supplied chat templates are not rendered; the model's own template is always used",
}


class FunctionTool(_Wire):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=100_000)
    parameters: JsonSchema | None = None
    strict: bool | None = None


class NamedFunction(_Wire):
    type: Literal["function"]
    name: str


class TextFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(None, max_length=64)
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Wire):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_Wire):
    model: str | None = Field(None, max_length=256)
    input: str | list[dict[str, Any]] = Field(max_length=MAX_INPUT_ITEMS)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, max_length=512)
    store: bool = True
    previous_response_id: str | None = Field(None, max_length=128)
    include: list[str] | None = Field(None, max_length=32)
    truncation: Literal["auto", "disabled"] = "disabled"
    stream: bool = False
    background: bool = False

    @field_validator("metadata")
    @classmethod
    def _bound_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (
            len(value) > MAX_METADATA_KEYS or any(len(k) > 64 or len(v) > 512 for k, v in value.items())
        ):
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys of up to 64 characters, values up to 512")
        return value

    @field_validator("background")
    @classmethod
    def _background_needs_store(cls, value: bool, info: Any) -> bool:
        if value and info.data.get("store") is False:
            raise ValueError("background responses must be stored (store: true)")
        return value


# ---- responses (documentation; built as dicts by encoder.py) --------------------------------


class ResponseObject(BaseModel):
    """The response object; see OpenAI's API reference for every field (`output` holds `message`
    items with `output_text` parts and `function_call` items)."""

    id: str
    object: Literal["response"] = "response"
    created_at: float
    status: Literal["completed", "incomplete", "failed", "in_progress", "queued", "cancelled"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    skipped_tools: list[str] | None = Field(None, description="Extension: tool types this server does not run.")


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool
