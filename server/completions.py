"""Serving logic of `POST /v1/completions`: raw text or token ids in, text out, no chat template.

A text prompt is tokenized as it is (Gemma's tokenizer adds `<bos>`); a token id prompt is sent as
it is, after checking every id exists. A batch (a list of prompts) runs as one generation per
prompt, concurrently; choice `i` of prompt `p` has index `p * n + i`, as in OpenAI's API. `echo`
puts the prompt before the completion (with `logprobs`, the prompt tokens' logprobs too; the first
prompt token has none). Generations go through `server/runner.py`, like chat.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from server.chat import SSE_HEADERS, check_model
from server.engine.interface import EnginePrompt, EngineStep, PreparedPrompt, SamplingOptions, TokenLogprob
from server.errors import APIError, BadRequestError, sse_error_event
from server.pipeline.runner import EngineRunner, Steps, cancel_on_disconnect, merge, start_all
from server.pipeline.sampling import check_token_ids, max_tokens_for, sampling_options
from server.protocols.openai.validation import check_request_fields
from server.protocols.openai.wire import CompletionRequest
from server.responses import (
    SSE_DONE,
    CompletionChoiceResult,
    CompletionChunkEncoder,
    UsageCounter,
    completion_body,
    completion_logprobs,
)
from server.settings import Settings

log = logging.getLogger(__name__)


class CompletionService:
    def __init__(self, settings: Settings, runner: EngineRunner) -> None:
        self.settings = settings
        self.runner = runner
        self.engine = runner.engine
        self._special_tokens: frozenset[str] | None = None

    async def create(self, request: CompletionRequest, http_request: Request | None) -> Response:
        received = time.perf_counter()
        check_model(self.engine, request.model)
        check_request_fields(request)
        prompts = request.prompts
        params = ["prompt"] if len(prompts) == 1 else [f"prompt[{i}]" for i in range(len(prompts))]
        prepared = [await self._prepare(p, param) for p, param in zip(prompts, params, strict=True)]
        options = [self._sampling_options(request, p, param) for p, param in zip(prepared, params, strict=True)]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        jobs = [(p, o, f"{request_id}-{i}") for i, (p, o) in enumerate(zip(prepared, options, strict=True))]
        usage = UsageCounter(prompt_tokens=sum(len(p.token_ids) for p in prepared))
        echo = (
            [self._echo_text(prompt, p) for prompt, p in zip(prompts, prepared, strict=True)] if request.echo else None
        )
        all_steps = await cancel_on_disconnect(http_request, start_all(self.runner, jobs, received))
        if request.stream:
            stream = self._stream(request, request_id, prepared, all_steps, usage, echo)
            return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            body = await cancel_on_disconnect(
                http_request, self._complete(request, request_id, prepared, all_steps, usage, echo)
            )
        finally:
            for steps in all_steps:
                await steps.aclose()
        return Response(body, media_type="application/json")

    async def _prepare(self, prompt: str | list[int], param: str) -> PreparedPrompt:
        try:
            return await self.runner.prepare(EnginePrompt(token_ids=self._token_ids(prompt, param)))
        except BadRequestError as error:
            error.param = param
            raise

    def _token_ids(self, prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, str):
            return list(self.engine.tokenizer.encode(prompt))
        check_token_ids(prompt, self.runner.vocab_size, param)
        return list(prompt)

    def _echo_text(self, prompt: str | list[int], prepared: PreparedPrompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return str(self.engine.tokenizer.decode(prepared.token_ids, skip_special_tokens=True))

    def _sampling_options(self, request: CompletionRequest, prepared: PreparedPrompt, param: str) -> SamplingOptions:
        max_tokens = max_tokens_for(
            requested=request.max_tokens,
            requested_param="max_tokens",
            prompt_tokens=len(prepared.token_ids),
            image_tokens=0,
            max_model_len=self.engine.max_model_len,
            default_max_tokens=self.settings.server.default_max_tokens,
            prompt_param=param,
        )
        return sampling_options(
            request,
            max_tokens=max_tokens,
            vocab_size=self.runner.vocab_size,
            logprobs=request.logprobs,
            prompt_logprobs=request.logprobs if request.echo and request.logprobs is not None else None,
        )

    def _zero_width(self, request: CompletionRequest) -> frozenset[str]:
        """Special tokens, which the returned text leaves out (unless skip_special_tokens is false)."""
        if not request.skip_special_tokens:
            return frozenset()
        if self._special_tokens is None:
            self._special_tokens = frozenset(self.engine.tokenizer.all_special_tokens)
        return self._special_tokens

    def _prompt_entries(self, step: EngineStep, prepared: PreparedPrompt) -> list[TokenLogprob | None]:
        entries = step.prompt_logprobs or []
        if entries and entries[0] is None:
            first = prepared.token_ids[0]
            token = str(self.engine.tokenizer.decode([first]))
            return [TokenLogprob(first, token, math.nan), *entries[1:]]
        return entries

    async def _complete(
        self,
        request: CompletionRequest,
        request_id: str,
        prepared: list[PreparedPrompt],
        all_steps: list[Steps],
        usage: UsageCounter,
        echo: list[str] | None,
    ) -> bytes:
        n = request.n
        results: dict[int, CompletionChoiceResult] = {}
        merged = merge(all_steps)
        try:
            async for prompt_index, step in merged:
                for delta in step.choices:
                    index = prompt_index * n + delta.index
                    result = results.get(index)
                    if result is None:
                        result = results[index] = CompletionChoiceResult(
                            index=index, text=echo[prompt_index] if echo else ""
                        )
                        if request.logprobs is not None:
                            result.logprobs = self._prompt_entries(step, prepared[prompt_index]) if echo else []
                    result.text += delta.text
                    result.token_ids.extend(delta.token_ids)
                    result.finish_reason = delta.finish_reason or result.finish_reason
                    if delta.logprobs is not None and result.logprobs is not None:
                        result.logprobs.extend(delta.logprobs)
        finally:
            await merged.aclose()
        for result in results.values():
            usage.add_completion(result.index, len(result.token_ids))
        return completion_body(
            request_id=request_id,
            model=self.engine.model_name,
            created=int(time.time()),
            choices=list(results.values()),
            usage=usage,
            top_logprobs=request.logprobs,
            prompt_token_ids=[p.token_ids for p in prepared] if request.return_token_ids else None,
            n=n,
            text_offsets=[0] * len(prepared),
            zero_width=self._zero_width(request),
        )

    async def _stream(
        self,
        request: CompletionRequest,
        request_id: str,
        prepared: list[PreparedPrompt],
        all_steps: list[Steps],
        usage: UsageCounter,
        echo: list[str] | None,
    ) -> AsyncIterator[bytes]:
        n = request.n
        encoder = CompletionChunkEncoder(
            request_id,
            self.engine.model_name,
            include_usage=request.include_usage,
            usage=usage,
            continuous=request.continuous_usage,
        )
        offsets: dict[int, int] = {}
        merged = merge(all_steps)
        try:
            async for prompt_index, step in merged:
                for delta in step.choices:
                    index = prompt_index * n + delta.index
                    usage.add_completion(index, len(delta.token_ids))
                    first = index not in offsets
                    text = delta.text
                    entries: list[TokenLogprob | None] | None = delta.logprobs  # type: ignore[assignment]
                    if first:
                        offsets[index] = 0
                        if echo:
                            text = echo[prompt_index] + text
                            if request.logprobs is not None:
                                entries = self._prompt_entries(step, prepared[prompt_index]) + (delta.logprobs or [])
                    logprobs: dict[str, Any] | None = None
                    if request.logprobs is not None and entries is not None:
                        zero_width = self._zero_width(request)
                        logprobs = completion_logprobs(entries, request.logprobs, offsets[index], zero_width)
                        offsets[index] += sum(
                            len(e.token) for e in entries if e is not None and e.token not in zero_width
                        )
                    if not text and delta.finish_reason is None and not delta.token_ids:
                        continue
                    yield encoder.delta(
                        index,
                        text,
                        finish_reason=delta.finish_reason,
                        logprobs=logprobs,
                        token_ids=delta.token_ids if request.return_token_ids else None,
                        prompt_token_ids=prepared[prompt_index].token_ids
                        if request.return_token_ids and first
                        else None,
                    )
            if request.include_usage:
                yield encoder.usage()
        except APIError as error:
            yield sse_error_event(error)
        except Exception:
            log.exception("stream %s failed", request_id)
            yield sse_error_event(APIError("internal error while streaming"))
        finally:
            await merged.aclose()
        yield SSE_DONE
