"""Serving logic of `POST /v1/chat/completions`: one validated request in, a response or a stream out.

The steps, in order (`ChatService.create`):
1. check the model name;
2. turn messages into the template's conversation and fetch/decode the images concurrently;
3. render the model's chat template and tokenize (`server/prompt.py`);
4. let the engine's multimodal processor expand the image tokens, then check the context length;
5. generate, and either collect the result or stream `chat.completion.chunk` events.

A client that goes away cancels the generation, which aborts the engine request (vLLM aborts on
cancellation, once). Errors before the first byte are ordinary HTTP errors; errors after a stream
started are sent as an SSE error event followed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from PIL.Image import Image

from server.errors import APIError, BadRequestError, ContextLengthExceededError, ModelNotFoundError, sse_error_event
from server.generation import EngineClient, EnginePrompt, PreparedPrompt, SamplingOptions
from server.media import ImageLoader
from server.metrics import Metrics
from server.prompt import Conversation, conversation_for_template, render_prompt
from server.protocol import ChatCompletionRequest
from server.responses import (
    SSE_DONE,
    ChatChoiceResult,
    ChunkEncoder,
    UsageCounter,
    chat_completion_body,
    logprobs_content,
)
from server.settings import Settings

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ChatService:
    def __init__(self, settings: Settings, engine: EngineClient, images: ImageLoader, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.images = images
        self.metrics = metrics

    async def create(self, request: ChatCompletionRequest, http_request: Request | None) -> Response:
        """`http_request` lets a non-streaming request be cancelled when its client goes away."""
        received = time.perf_counter()
        if request.model != self.engine.model_name:
            raise ModelNotFoundError(
                f"The model '{request.model}' does not exist; this server serves '{self.engine.model_name}'.",
                param="model",
            )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        prepared = await self._prepare(request)
        options = self._sampling_options(request, prepared)
        usage = UsageCounter(prompt_tokens=len(prepared.token_ids), image_tokens=prepared.num_image_tokens)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            encoder = ChunkEncoder(
                request_id,
                self.engine.model_name,
                include_usage=include_usage,
                return_token_ids=request.return_token_ids,
            )
            stream = self._stream(request, prepared, options, encoder, usage, received)
            return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
        work = self._complete(request, request_id, prepared, options, usage, received)
        body = await (work if http_request is None else _cancel_on_disconnect(http_request, work))
        return Response(body, media_type="application/json")

    # ---- preparation ----------------------------------------------------------------------

    async def _prepare(self, request: ChatCompletionRequest) -> PreparedPrompt:
        conversation = conversation_for_template(request.messages)
        limit = self.settings.images.max_per_request
        if len(conversation.images) > limit:
            raise BadRequestError(
                f"{len(conversation.images)} images were sent; at most {limit} are allowed per request",
                param="messages",
                code="too_many_images",
            )
        images = await self._load_images(conversation)
        started = time.perf_counter()
        _text, token_ids = render_prompt(self.engine.tokenizer, conversation)
        prepared = await self.engine.prepare(
            EnginePrompt(token_ids=token_ids, images=images, mm_processor_kwargs=self._mm_kwargs(conversation))
        )
        self.metrics.preprocess_seconds.observe(time.perf_counter() - started)
        return prepared

    async def _load_images(self, conversation: Conversation) -> list[Image]:
        self.metrics.images_per_request.observe(len(conversation.images))
        if not conversation.images:
            return []
        started = time.perf_counter()
        images = await asyncio.gather(*(self.images.load(ref.url, ref.param) for ref in conversation.images))
        self.metrics.image_load_seconds.observe(time.perf_counter() - started)
        for ref in conversation.images:
            self.metrics.images.labels("data" if ref.url[:5].lower() == "data:" else "url").inc()
        return list(images)

    def _mm_kwargs(self, conversation: Conversation) -> dict[str, Any] | None:
        if not conversation.images:
            return None
        # detail "low" asks for one view per image; "high"/"auto" allow Gemma 3's pan-and-scan
        # crops when the configuration enables them. vLLM takes one setting per prompt, so a
        # request mixing "low" with other details gets pan-and-scan for all of its images.
        wants_crops = any(ref.detail != "low" for ref in conversation.images)
        return {"do_pan_and_scan": self.settings.images.pan_and_scan and wants_crops}

    def _sampling_options(self, request: ChatCompletionRequest, prepared: PreparedPrompt) -> SamplingOptions:
        prompt_len = len(prepared.token_ids)
        room = self.engine.max_model_len - prompt_len
        requested = request.requested_max_tokens
        if room < 1 or (requested is not None and requested > room):
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.engine.max_model_len} tokens. "
                f"The prompt has {prompt_len} tokens ({prepared.num_image_tokens} of them for images) "
                f"and {requested or 1} completion tokens were requested.",
                param="messages",
            )
        max_tokens = requested or min(room, self.settings.server.default_max_tokens or room)
        return SamplingOptions(
            max_tokens=max_tokens,
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop_sequences,
            stream=request.stream,
        )

    # ---- generation -----------------------------------------------------------------------

    async def _complete(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        prepared: PreparedPrompt,
        options: SamplingOptions,
        usage: UsageCounter,
        received: float,
    ) -> bytes:
        results: dict[int, ChatChoiceResult] = {}
        self.metrics.in_flight.inc()
        try:
            async for step in self.engine.generate(prepared, options, request_id):
                if step.num_cached_tokens:
                    usage.cached_tokens = step.num_cached_tokens
                for delta in step.choices:
                    result = results.setdefault(
                        delta.index, ChatChoiceResult(index=delta.index, text="", finish_reason=None)
                    )
                    result.text += delta.text
                    result.token_ids.extend(delta.token_ids)
                    result.finish_reason = delta.finish_reason or result.finish_reason
                    if delta.logprobs is not None:
                        result.logprobs = (result.logprobs or []) + delta.logprobs
        finally:
            self.metrics.in_flight.dec()
        for result in results.values():
            usage.add_completion(result.index, len(result.token_ids))
        self._count_tokens(usage)
        return chat_completion_body(
            request_id=request_id,
            model=self.engine.model_name,
            created=int(time.time()),
            choices=list(results.values()),
            usage=usage,
            top_logprobs=None,
            prompt_token_ids=prepared.token_ids if request.return_token_ids else None,
        )

    async def _stream(
        self,
        request: ChatCompletionRequest,
        prepared: PreparedPrompt,
        options: SamplingOptions,
        encoder: ChunkEncoder,
        usage: UsageCounter,
        received: float,
    ) -> AsyncIterator[bytes]:
        self.metrics.in_flight.inc()
        first_token_seen = False
        finished = False
        try:
            for index in range(request.n):
                yield encoder.role(index)
            async for step in self.engine.generate(prepared, options, encoder.request_id):
                if step.num_cached_tokens:
                    usage.cached_tokens = step.num_cached_tokens
                for delta in step.choices:
                    if not first_token_seen and delta.token_ids:
                        first_token_seen = True
                        self.metrics.time_to_first_token.observe(time.perf_counter() - received)
                    usage.add_completion(delta.index, len(delta.token_ids))
                    if not delta.text and not delta.finish_reason and not delta.token_ids:
                        continue
                    yield encoder.delta(
                        delta.index,
                        delta.text,
                        token_ids=delta.token_ids,
                        finish_reason=delta.finish_reason,
                        logprobs=logprobs_content(delta.logprobs, 0) if delta.logprobs is not None else None,
                    )
            if encoder.include_usage:
                yield encoder.usage(usage)
            finished = True
            self._count_tokens(usage)
        except APIError as error:
            log.warning("stream %s failed: %s", encoder.request_id, error.message)
            yield sse_error_event(error)
        except Exception:
            log.exception("stream %s failed", encoder.request_id)
            yield sse_error_event(APIError("internal error while streaming"))
        finally:
            self.metrics.in_flight.dec()
            if not finished:
                self.metrics.aborted.labels("stream_ended_early").inc()
        yield SSE_DONE

    def _count_tokens(self, usage: UsageCounter) -> None:
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.completion_tokens.inc(usage.completion_tokens)


async def _cancel_on_disconnect(http_request: Request, work: Any) -> Any:
    """Runs `work`; if the client disconnects first, cancels it (which aborts the engine request)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(http_request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_for_disconnect(http_request: Request) -> None:
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return
