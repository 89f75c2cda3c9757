"""The protocol-neutral request: what every wire protocol's request becomes before the pipeline runs it.

A protocol adapter (`server/protocols/...`) parses its wire request, checks what only that protocol
defines (its field names, its unknown-field policy), and builds a `GenerationRequest`: either a
conversation (`ChatInput`: turns of text and image parts, tool definitions and earlier calls) or raw
prompts (text or token ids), the sampling fields, and what the output must look like. Every field
that can be wrong keeps the name the client used (`param`), so an error raised deep in the pipeline
still names the wire field.

This module imports nothing from the server but plain types: it is the contract between the
protocols and the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "developer", "user", "assistant", "tool"]
ToolChoiceMode = Literal["auto", "none", "required", "function"]


@dataclass(slots=True)
class Text:
    text: str


@dataclass(slots=True)
class Image:
    url: str  # an http(s) URL or a data: URI
    detail: str = "auto"  # "low", "high" or "auto" (OpenAI's `detail`; see pipeline.pipeline._processor_options)
    param: str = "messages"  # the request field it came from, e.g. "messages[1].content[2].image_url"


Part = Text | Image


@dataclass(slots=True)
class PastToolCall:
    """A call the model made earlier in the conversation (written back into its turn)."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass(slots=True)
class Turn:
    role: Role
    content: str | list[Part] | None  # system/developer/assistant/tool turns hold only Text parts
    tool_calls: list[PastToolCall] = field(default_factory=list)  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this result answers
    name: str | None = None  # tool turns: the function's name, when the client sent it


@dataclass(slots=True)
class Function:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments, already checked


@dataclass(slots=True)
class Tools:
    functions: list[Function]
    choice: ToolChoiceMode = "auto"
    function: str | None = None  # with choice "function": the one to call
    parallel: bool = True


@dataclass(slots=True)
class ChatInput:
    turns: list[Turn]
    tools: Tools | None = None
    add_generation_prompt: bool = True
    param: str = "messages"  # where the conversation is in the wire request (context-length errors name it)


@dataclass(slots=True)
class RawPrompt:
    """A prompt given without a chat template: text (the tokenizer adds <bos>) or token ids."""

    value: str | list[int]
    param: str = "prompt"


@dataclass(slots=True)
class Sampling:
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


@dataclass(slots=True)
class Output:
    """What the output must look like and how long it may be."""

    max_tokens: int | None = None  # None: the server's default, else the rest of the context
    max_tokens_param: str = "max_tokens"
    logprobs: int | None = None  # alternatives per generated token; None: no logprobs
    prompt_logprobs: int | None = None
    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    format_param: str = "response_format"  # the field that asked for json_schema/json_object
    stream: bool = False


@dataclass(slots=True)
class GenerationRequest:
    """One client request, in the pipeline's terms. Exactly one of `chat` and `prompts` is set."""

    request_id: str  # the protocol's own id ("chatcmpl-...", "cmpl-..."); engine requests derive from it
    route: str  # what the metrics and logs call it: "chat", "completions", ...
    model: str | None
    sampling: Sampling
    output: Output
    chat: ChatInput | None = None
    prompts: list[RawPrompt] = field(default_factory=list)
    # A chat that does not fit the context loses its oldest turns until it does (the Responses API's
    # truncation "auto"); otherwise it is a 400 context_length_exceeded.
    truncate_oldest: bool = False
