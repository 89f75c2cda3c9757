"""The narrow interface between serving logic and the inference engine, in plain Python types.

The pipeline (`server/pipeline/`) talks to an `EngineClient`: it hands over an `EnginePrompt`
(token ids and decoded images) and `SamplingOptions`, and reads back `EngineStep`s. The vLLM
implementation is `server/engine/vllm_engine.py` (it and `api_processes.py` are the only importers
of vLLM); tests of the pipeline can use any object with this shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass(slots=True)
class EnginePrompt:
    """A chat rendered by the model's template and tokenized; images not yet expanded."""

    token_ids: list[int]
    images: list[Image] = field(default_factory=list)
    # One per image: what identifies its content to the engine's caches (a digest of the encoded
    # bytes); without them the engine hashes the decoded pixels.
    image_ids: list[str] | None = None
    # Per-image processor options (Gemma 3: do_pan_and_scan, pan_and_scan_max_num_crops).
    mm_processor_kwargs: dict[str, Any] | None = None


@dataclass(slots=True)
class PreparedPrompt:
    """An `EnginePrompt` after the multimodal processor: image tokens expanded, pixels ready."""

    token_ids: list[int]
    num_image_tokens: int
    engine_input: Any  # the engine's own object; opaque to serving code


@dataclass(slots=True)
class SamplingOptions:
    max_tokens: int
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
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Constrained decoding: at most one of these.
    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    structural_tag: str | None = None
    stream: bool = False


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice produced since the previous step (or all of it, when not streaming)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class EngineStep:
    choices: list[ChoiceDelta]
    finished: bool
    prompt_token_ids: list[int] | None = None
    num_cached_tokens: int = 0
    # With SamplingOptions.prompt_logprobs: one entry per prompt token (None for the first), in the
    # first step only.
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LoraAdapter(Protocol):
    """A LoRA adapter as the engine needs it (server/pipeline/models.py's `Adapter` is one)."""

    name: str
    path: str
    lora_id: int  # the engine's number for it: one adapter, one number, for the engine's lifetime


class EngineClient(Protocol):
    """What serving code needs from an engine."""

    model_name: str
    max_model_len: int

    @property
    def tokenizer(self) -> Any: ...

    @property
    def is_ready(self) -> bool: ...

    @property
    def is_dead(self) -> bool: ...

    def default_sampling(self) -> dict[str, Any]: ...

    async def prepare(self, prompt: EnginePrompt) -> PreparedPrompt: ...

    def generate(
        self, prompt: PreparedPrompt, options: SamplingOptions, request_id: str, adapter: LoraAdapter | None = None
    ) -> AsyncIterator[EngineStep]: ...

    async def add_adapter(self, adapter: LoraAdapter) -> None:
        """Loads a LoRA adapter's weights into the engine (a bad adapter raises BadRequestError)."""
        ...

    async def remove_adapter(self, adapter: LoraAdapter) -> None: ...

    async def abort(self, request_id: str) -> None: ...

    async def abort_all(self) -> int:
        """Aborts every request being generated (end of a drain); returns how many there were."""
        ...

    async def start(self) -> None:
        """Loads the model; returns once the engine can serve."""
        ...

    def shutdown(self) -> None: ...
