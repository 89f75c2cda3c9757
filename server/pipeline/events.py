"""What a running generation produces, in the pipeline's terms: events, usage, and the collected result.

`Run.events()` (`server/pipeline/pipeline.py`) yields, per choice and in order:
- `TextDelta`: text that can be sent as content now, the token ids it came from, their logprobs,
  and on the last one the finish reason (`"stop"`, `"length"`, or `"tool_calls"`);
- `ToolCallStart` and `ToolCallDelta`: a call as it is generated (Gemma 3's calls are recognized in
  its text, `server/pipeline/tools.py`): its id and name once known, then its arguments' JSON text
  piece by piece; the deltas of a call joined are exactly its final `arguments`;
- `ToolCalls`: all the calls a choice made, once the choice has ended (each already started and
  streamed by the events above), followed by the choice's final `TextDelta`.
Errors are raised as `server.errors.APIError`; the pipeline turns one raised mid-stream into the
protocol's own error event. `Usage` counts as the events go; `ChoiceResult` is a whole choice, for
answers that are not streamed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from server.engine.interface import TokenLogprob


@dataclass(slots=True)
class ParsedCall:
    """A function call the model made."""

    name: str
    arguments: str  # JSON text, as the model wrote it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(slots=True)
class TextDelta:
    index: int  # the choice: prompt_index * n + choice, as in OpenAI's batched completions
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # with finish "stop": the stop string (or token id) that matched


@dataclass(slots=True)
class ToolCallStart:
    index: int
    position: int  # the call's place among the choice's calls
    id: str
    name: str


@dataclass(slots=True)
class ToolCallDelta:
    index: int
    position: int
    arguments: str  # the next piece of the arguments' JSON text


@dataclass(slots=True)
class ToolCalls:
    index: int
    calls: list[ParsedCall]


Event = TextDelta | ToolCallStart | ToolCallDelta | ToolCalls


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    image_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the engine found in its prefix cache
    completion_tokens_by_choice: dict[int, int] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return sum(self.completion_tokens_by_choice.values())

    def add_completion(self, index: int, count: int) -> None:
        self.completion_tokens_by_choice[index] = self.completion_tokens_by_choice.get(index, 0) + count


@dataclass(slots=True)
class ChoiceResult:
    """One choice, whole: what a non-streamed answer is built from."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ParsedCall] = field(default_factory=list)

    def add(self, event: Event) -> None:
        if isinstance(event, ToolCalls):
            self.tool_calls.extend(event.calls)
            return
        if not isinstance(event, TextDelta):
            return  # a call's pieces: the whole call comes in ToolCalls
        self.text += event.text
        self.token_ids.extend(event.token_ids)
        if event.finish_reason is not None:
            self.finish_reason, self.stop_reason = event.finish_reason, event.stop_reason
        if event.logprobs is not None:
            self.logprobs = (self.logprobs or []) + event.logprobs
