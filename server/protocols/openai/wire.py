"""Wire types of the OpenAI-compatible API: what clients send, and (for the OpenAPI document) what
they get back.

Requests are validated by these pydantic models; responses are built as plain dicts by the adapters
(`chat.py`, `completions.py`) for speed and described here so `/openapi.json` (committed as
docs/openapi.json) documents them; the fast tests validate real bodies against them. This module
imports neither vLLM nor FastAPI.

Every request field is bounded (vLLM CVE-2026-34756 was an unbounded `n`); a field that fails
validation becomes a 400 whose `param` names it (`validation.py`).

Unknown fields: nested objects (messages, content parts, tools) keep unknown fields and ignore them.
At the top level of a request the policy is OpenAI's own: a field that is neither implemented nor in
`IGNORED_OPENAI_FIELDS` is refused with a 400 naming it (`validation.check_request_fields`),
so a typo such as `max_token` does not silently change the request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from server.protocols.wire_base import JsonSchema, _Wire

# Bounds on request fields. They keep one request from asking for unbounded work; the server's
# admission control bounds the rest.
MAX_N = 16
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 512
MAX_MESSAGES = 2048
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_TOOLS = 128
MAX_PROMPTS = 16

# OpenAI request fields that mean nothing for a self-hosted Gemma: accepted, logged once, ignored.
IGNORED_OPENAI_FIELDS = frozenset(
    {
        "store",
        "metadata",
        "service_tier",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
        "reasoning_effort",
        "verbosity",
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
    }
)
# OpenAI fields this server refuses with an explanation instead of ignoring them.
REFUSED_OPENAI_FIELDS = {
    "functions": "the deprecated `functions` parameter is not supported; use `tools`",
    "function_call": "the deprecated `function_call` parameter is not supported; use `tool_choice`",
    "suffix": "`suffix` (insertion) is not supported by Gemma 3",
    # vLLM's extensions that render a client-supplied Jinja template (GHSA-542m-9234-8gvf): this
    # server only ever renders the model's own template, in a sandbox.
    "chat_template": "client-supplied chat templates are not rendered; the model's own template is always used",
    "chat_template_kwargs": "chat template arguments are not accepted; the model's own template is always used",
}


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
    name: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


# ---- request: tools and response formats ----------------------------------------------------

_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(_Wire):
    name: str = Field(pattern=_NAME_PATTERN, description="a-z, A-Z, 0-9, _ and -, at most 64 characters.")
    description: str | None = Field(None, max_length=8192)
    parameters: JsonSchema | None = Field(None, description="A JSON Schema of the arguments (an object).")
    strict: bool | None = Field(None, description="Accepted; constrained calls always follow the schema.")

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        if value.get("type", "object") != "object":
            raise ValueError("function parameters must be a JSON Schema of type 'object'")
        return value


class Tool(_Wire):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Wire):
    name: str = Field("response", pattern=_NAME_PATTERN)
    description: str | None = None
    schema_: JsonSchema = Field(alias="schema", description="The JSON Schema the output must follow.")
    strict: bool | None = Field(None, description="Accepted; the output is always constrained to the schema.")


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _only_with_json_schema(cls, value: JsonSchemaFormat | None, info: ValidationInfo) -> JsonSchemaFormat | None:
        kind = info.data.get("type")
        if value is None and kind == "json_schema":
            raise ValueError("type 'json_schema' needs `json_schema` with a `schema` to follow")
        if value is not None and kind != "json_schema":
            raise ValueError("json_schema is only allowed with type 'json_schema'")
        return value


# ---- request: shared sampling fields --------------------------------------------------------


class StreamOptions(_Wire):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="Extension (as in vLLM): with include_usage, every chunk carries the usage so far."
    )


class _GenerationRequest(_Wire):
    """Fields shared by chat and text completions. Order matters: validators read earlier fields."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit."
    )
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    user: str | None = Field(None, max_length=512, description="Accepted for compatibility; not used.")
    # Extensions, named and defined as in vLLM's OpenAI server.
    top_k: int | None = Field(None, ge=-1, description="Extension: sample from the k most likely tokens (-1/0: all).")
    min_p: float | None = Field(None, ge=0, le=1, description="Extension: drop tokens below min_p x the top prob.")
    repetition_penalty: float | None = Field(
        None, gt=0, le=10, description="Extension: >1 discourages tokens already in the prompt or output."
    )
    ignore_eos: bool = Field(False, description="Extension: keep generating past <eos>/<end_of_turn>.")
    min_tokens: int = Field(0, ge=0, description="Extension: generate at least this many tokens.")
    stop_token_ids: list[int] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="Extension: further token ids that end generation."
    )
    skip_special_tokens: bool = Field(True, description="Extension: leave special tokens out of the text.")
    include_stop_str_in_output: bool = Field(False, description="Extension: keep the matched stop string.")
    return_token_ids: bool = Field(
        False, description="Extension (as in vLLM): return prompt_token_ids and per-choice token_ids."
    )

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bound_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} logit_bias entries are allowed")
        for key, bias in value.items():
            if not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), not {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias values must be between -100 and 100, not {bias}")
        return value

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

    @field_validator("stop_token_ids")
    @classmethod
    def _non_negative_ids(cls, value: list[int] | None) -> list[int] | None:
        if value and min(value) < 0:
            raise ValueError("token ids must not be negative")
        return value

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def logit_bias_ids(self) -> dict[int, float] | None:
        return {int(key): bias for key, bias in self.logit_bias.items()} if self.logit_bias else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(
            self.stream_options and self.stream_options.include_usage and self.stream_options.continuous_usage_stats
        )


# ---- request: chat completion ---------------------------------------------------------------


class ChatCompletionRequest(_GenerationRequest):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_tool_names(cls, value: list[Tool] | None) -> list[Tool] | None:
        if value is not None:
            names = [tool.function.name for tool in value]
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise ValueError(f"tool names must be unique; repeated: {', '.join(duplicates)}")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_needs_tools(cls, value: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        if value is None or value == "none":
            return value
        tools: list[Tool] | None = info.data.get("tools")
        if not tools:
            raise ValueError("tool_choice needs `tools`")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names '{value.function.name}', which is not one of the tools")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


# ---- request: text completion ---------------------------------------------------------------

Prompt = str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[Annotated[int, Field(ge=0)]]]


class CompletionRequest(_GenerationRequest):
    prompt: Prompt = Field(
        description="Raw text (the tokenizer adds <bos>; no chat template) or token ids; a list of up to "
        f"{MAX_PROMPTS} of either for a batch."
    )
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = Field(False, description="Put the prompt before the completion in `text`.")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = Field(None, ge=1, description="Accepted only when equal to n (no server-side reranking).")

    @field_validator("prompt")
    @classmethod
    def _bound_prompts(cls, value: Prompt) -> Prompt:
        if isinstance(value, list):
            if not value:
                raise ValueError("the prompt must not be empty")
            if isinstance(value[0], (str, list)) and len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed in one request")
            if any(isinstance(item, list) and not item for item in value):
                raise ValueError("a token id prompt must not be empty")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt as a batch: strings or token id lists."""
        value: Any = self.prompt
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [list(value)]
        return list(value)


# ---- request: tokenizer routes (as in vLLM's /tokenize and /detokenize) ---------------------


class TokenizeRequest(_Wire):
    model: str | None = None
    prompt: str | None = Field(None, description="Raw text; or send `messages` instead.")
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES, validate_default=True)
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    add_special_tokens: bool | None = Field(None, description="Default: true for prompt, false for messages.")
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @field_validator("messages")
    @classmethod
    def _one_of_prompt_or_messages(cls, value: list[Message] | None, info: ValidationInfo) -> list[Message] | None:
        if (value is None) == (info.data.get("prompt") is None):
            raise ValueError("send exactly one of `prompt` and `messages`")
        return value


class DetokenizeRequest(_Wire):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# ---- responses (documentation; built as dicts by the adapters) -----------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = Field(
        None, description="cached_tokens, image_tokens (Gemma's image soft tokens and markers), text_tokens."
    )


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


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: dict[str, Any] | None = None
    token_ids: list[int] | None = Field(None, description="Extension: with return_token_ids.")
    prompt_token_ids: list[int] | None = Field(None, description="Extension: with return_token_ids.")


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None
    image_tokens: int = Field(0, description="Extension: how many of the tokens the images took.")


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = Field(None, description="The checkpoint, or the adapter's path (vLLM's field).")
    parent: str | None = Field(None, description="For a LoRA adapter, the base model it runs on.")
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
