"""`POST /v1/completions`, OpenAI's text completions: raw text or token ids in, text out, no chat template.

A batch (a list of prompts) is one pipeline request with several prompts; choice `i` of prompt `p`
has index `p * n + i`, as in OpenAI's API. `echo` puts the prompt before the completion (with
`logprobs`, the prompt tokens' logprobs too; the first prompt token has none). `CompletionEncoder`
writes the `text_completion` body or its SSE chunks ending in `data: [DONE]`.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import orjson

from server import errors
from server.engine.interface import TokenLogprob
from server.errors import APIError
from server.pipeline.events import ChoiceResult, Event, TextDelta
from server.pipeline.pipeline import Run
from server.pipeline.request import GenerationRequest, Output, RawPrompt
from server.protocols.openai.common import SSE_DONE, completion_logprobs, sampling_of, usage_dict
from server.protocols.openai.validation import check_request_fields
from server.protocols.openai.wire import CompletionRequest

# ---- wire -> pipeline -----------------------------------------------------------------------


def completion_request(body: CompletionRequest) -> GenerationRequest:
    check_request_fields(body)
    prompts = body.prompts
    params = ["prompt"] if len(prompts) == 1 else [f"prompt[{i}]" for i in range(len(prompts))]
    output = Output(
        max_tokens=body.max_tokens,
        max_tokens_param="max_tokens",
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
        stream=body.stream,
    )
    return GenerationRequest(
        request_id=f"cmpl-{uuid.uuid4().hex}",
        route="completions",
        model=body.model,
        sampling=sampling_of(body),
        output=output,
        prompts=[RawPrompt(prompt, param) for prompt, param in zip(prompts, params, strict=True)],
    )


# ---- pipeline -> wire -----------------------------------------------------------------------


class CompletionEncoder:
    """One text completion's answer (a `server.pipeline.pipeline.ResponseEncoder`)."""

    def __init__(self, body: CompletionRequest, model: str, tokenizer: Any) -> None:
        self.wire = body
        self.model = model
        self.tokenizer = tokenizer
        self.n = body.n
        self._zero_width: frozenset[str] | None = None
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # streaming: each choice's text so far, for text_offset

    def headers(self, run: Run) -> dict[str, str]:
        return {}

    @property
    def zero_width(self) -> frozenset[str]:
        """Special tokens, which the returned text leaves out (unless skip_special_tokens is false)."""
        if self._zero_width is None:
            special = self.tokenizer.all_special_tokens if self.wire.skip_special_tokens else ()
            self._zero_width = frozenset(special)
        return self._zero_width

    def _echo_text(self, run: Run, prompt_index: int) -> str:
        prompt = self.wire.prompts[prompt_index]
        if isinstance(prompt, str):
            return prompt
        return str(self.tokenizer.decode(run.prompts[prompt_index].token_ids, skip_special_tokens=True))

    def _prompt_entries(self, run: Run, prompt_index: int) -> list[TokenLogprob | None]:
        entries = run.prompt_logprobs(prompt_index) or []
        if entries and entries[0] is None:
            first = run.prompts[prompt_index].token_ids[0]
            return [TokenLogprob(first, str(self.tokenizer.decode([first])), math.nan), *entries[1:]]
        return entries

    async def body(self, run: Run, choices: list[ChoiceResult]) -> bytes:
        body, top_n = self.wire, self.wire.logprobs
        body_choices = []
        for choice in choices:
            prompt_index = choice.index // self.n
            text = self._echo_text(run, prompt_index) + choice.text if body.echo else choice.text
            entry: dict[str, Any] = {"index": choice.index, "text": text, "logprobs": None}
            entry["finish_reason"] = choice.finish_reason
            if top_n is not None:
                entries = self._prompt_entries(run, prompt_index) if body.echo else []
                entries += choice.logprobs or []
                entry["logprobs"] = completion_logprobs(entries, top_n, 0, self.zero_width)
            if body.return_token_ids:
                entry["token_ids"] = choice.token_ids
                entry["prompt_token_ids"] = run.prompts[prompt_index].token_ids
            body_choices.append(entry)
        return orjson.dumps(
            {
                "id": run.request_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": body_choices,
                "usage": usage_dict(run.usage),
                "system_fingerprint": None,
            }
        )

    def _chunk(self, run: Run, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": run.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.wire.include_usage:
            continuous = usage is None and self.wire.continuous_usage
            chunk["usage"] = usage_dict(run.usage) if continuous else usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def opening(self, run: Run) -> list[bytes]:
        return []

    def event(self, run: Run, event: Event) -> bytes | None:
        if not isinstance(event, TextDelta):  # no tools in text completions
            return None
        body, index = self.wire, event.index
        prompt_index = index // self.n
        first = index not in self._offsets
        text = event.text
        entries: list[TokenLogprob | None] | None = event.logprobs  # type: ignore[assignment]
        if first:
            self._offsets[index] = 0
            if body.echo:
                text = self._echo_text(run, prompt_index) + text
                if body.logprobs is not None:
                    entries = self._prompt_entries(run, prompt_index) + (event.logprobs or [])
        logprobs: dict[str, Any] | None = None
        if body.logprobs is not None and entries is not None:
            logprobs = completion_logprobs(entries, body.logprobs, self._offsets[index], self.zero_width)
            self._offsets[index] += sum(
                len(e.token) for e in entries if e is not None and e.token not in self.zero_width
            )
        if not text and event.finish_reason is None and not event.token_ids:
            return None
        choice: dict[str, Any] = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": event.finish_reason,
        }
        if body.return_token_ids:
            choice["token_ids"] = event.token_ids
            if first:
                choice["prompt_token_ids"] = run.prompts[prompt_index].token_ids
        return self._chunk(run, [choice])

    async def closing(self, run: Run) -> list[bytes]:
        return [self._chunk(run, [], usage_dict(run.usage))] if self.wire.include_usage else []

    async def error(self, run: Run, error: APIError) -> bytes:
        return errors.OPENAI.sse_event(error)

    def end(self) -> bytes:
        return SSE_DONE
