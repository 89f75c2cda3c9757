"""Serving logic of `POST /v1/chat/completions`: one validated request in, a response or a stream out.

The steps, in order (`ChatService.create`):
1. check the model name and the request's top-level fields (`server/validation.py`);
2. plan tools (`server/tools.py`) and normalize the messages for Gemma 3 (`server/normalize.py`);
3. fetch/decode the images concurrently, render the model's chat template and tokenize
   (`server/prompt.py`), and let the engine's multimodal processor expand the image tokens;
4. check the context length and build the sampling options (`server/sampling.py`);
5. start the generation through `server/runner.py` (errors surface before any byte is sent), then
   collect the result or stream `chat.completion.chunk` events; tool calls are extracted from the
   text in both cases by the same `ToolCallExtractor`.

What normalization changed is reported in the `X-Gemma-Normalized` response header. A client that
goes away cancels the generation, which aborts the engine request. Errors before the first byte are
ordinary HTTP errors; errors after a stream started are sent as an SSE error event followed by
`data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from PIL.Image import Image

from server.engine.interface import EngineClient, EnginePrompt, PreparedPrompt, SamplingOptions
from server.errors import APIError, BadRequestError, ModelNotFoundError, sse_error_event
from server.media.images import ImageLoader
from server.pipeline.normalize import NORMALIZED_HEADER, ChatMessage
from server.pipeline.prompt import Conversation, conversation_for_template, render_prompt
from server.pipeline.runner import EngineRunner, Steps, cancel_on_disconnect
from server.pipeline.sampling import max_tokens_for, sampling_options
from server.pipeline.tools import ToolCallExtractor, ToolPlan, plan_for_request
from server.protocols.openai.validation import check_request_fields
from server.protocols.openai.wire import ChatCompletionRequest
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


def check_model(engine: EngineClient, model: str | None) -> None:
    if model is not None and model != engine.model_name:
        raise ModelNotFoundError(
            f"The model '{model}' does not exist; this server serves '{engine.model_name}'.", param="model"
        )


def normalization_headers(conversation: Conversation) -> dict[str, str]:
    return {NORMALIZED_HEADER: ",".join(conversation.changes)} if conversation.changes else {}


class ChatService:
    def __init__(self, settings: Settings, runner: EngineRunner, images: ImageLoader) -> None:
        self.settings = settings
        self.runner = runner
        self.engine = runner.engine
        self.metrics = runner.metrics
        self.images = images

    async def create(self, request: ChatCompletionRequest, http_request: Request | None) -> Response:
        """`http_request` lets a request be cancelled when its client goes away."""
        received = time.perf_counter()
        check_model(self.engine, request.model)
        check_request_fields(request)
        plan = plan_for_request(request)
        conversation = self.conversation(request.messages, plan)
        prepared = await self.prepare(conversation)
        options = self._sampling_options(request, prepared, plan)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        headers = normalization_headers(conversation)
        usage = UsageCounter(prompt_tokens=len(prepared.token_ids), image_tokens=prepared.num_image_tokens)
        steps = await cancel_on_disconnect(
            http_request, self._start(request, plan, prepared, options, request_id, received)
        )
        if request.stream:
            encoder = ChunkEncoder(
                request_id,
                self.engine.model_name,
                include_usage=request.include_usage,
                return_token_ids=request.return_token_ids,
                usage=usage,
                continuous_usage=request.continuous_usage,
            )
            stream = self._stream(request, plan, prepared, steps, encoder, usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        try:
            body = await cancel_on_disconnect(
                http_request, self._complete(request, plan, prepared, steps, request_id, usage)
            )
        finally:
            await steps.aclose()  # aborts the engine request if the client went away first
        return Response(body, media_type="application/json", headers=headers)

    # ---- preparation (also used by /tokenize) ----------------------------------------------

    def conversation(self, messages: list[ChatMessage], plan: ToolPlan) -> Conversation:
        return conversation_for_template(
            messages, tools_text=plan.prompt_text, strict=self.settings.server.strict_messages
        )

    async def prepare(self, conversation: Conversation, *, add_generation_prompt: bool = True) -> PreparedPrompt:
        limit = self.settings.images.max_per_request
        if len(conversation.images) > limit:
            raise BadRequestError(
                f"{len(conversation.images)} images were sent; at most {limit} are allowed per request",
                param="messages",
                code="too_many_images",
            )
        images = await self._load_images(conversation)
        started = time.perf_counter()
        _text, token_ids = render_prompt(
            self.engine.tokenizer, conversation, add_generation_prompt=add_generation_prompt
        )
        prompt = EnginePrompt(token_ids=token_ids, images=images, mm_processor_kwargs=self._mm_kwargs(conversation))
        return await self.runner.prepare(prompt, started=started)

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
        """OpenAI's `detail` -> Gemma 3's processor options.

        "low" asks for one view of the image at the model's size; "high" and "auto" allow Gemma 3's
        pan-and-scan crops (only large or elongated images get any), when `images.pan_and_scan` is
        on, up to `images.pan_and_scan_max_crops` crops per image. vLLM takes these options once per
        prompt, so a request that mixes "low" with "high"/"auto" gets pan-and-scan for all of its
        images: the quality asked for wins over the saving.
        """
        settings = self.settings.images
        if not conversation.images or not settings.pan_and_scan:
            return None
        if all(ref.detail == "low" for ref in conversation.images):
            return {"do_pan_and_scan": False}
        return {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": settings.pan_and_scan_max_crops}

    def _sampling_options(
        self, request: ChatCompletionRequest, prepared: PreparedPrompt, plan: ToolPlan
    ) -> SamplingOptions:
        max_tokens = max_tokens_for(
            requested=request.requested_max_tokens,
            requested_param=request.max_tokens_param,
            prompt_tokens=len(prepared.token_ids),
            image_tokens=prepared.num_image_tokens,
            max_model_len=self.engine.max_model_len,
            default_max_tokens=self.settings.server.default_max_tokens,
            prompt_param="messages",
        )
        json_schema, json_object = plan.constraint, False
        response_format = request.response_format
        if response_format is not None and response_format.type != "text":
            if plan.constraint is not None:
                raise BadRequestError(
                    "response_format cannot be combined with tool_choice 'required' or a named function: "
                    "both constrain the output",
                    param="response_format",
                )
            if response_format.json_schema is not None:
                json_schema = response_format.json_schema.schema_
            else:
                json_object = True
        return sampling_options(
            request,
            max_tokens=max_tokens,
            vocab_size=self.runner.vocab_size,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            json_schema=json_schema,
            json_object=json_object,
        )

    # ---- generation -----------------------------------------------------------------------

    async def _start(
        self,
        request: ChatCompletionRequest,
        plan: ToolPlan,
        prepared: PreparedPrompt,
        options: SamplingOptions,
        request_id: str,
        received: float,
    ) -> Steps:
        try:
            return await self.runner.start(prepared, options, request_id, received)
        except BadRequestError as error:
            # The engine refuses a schema it cannot compile without saying which field it came from.
            if error.param is None and (options.json_schema is not None or options.json_object):
                error.param = "tools" if plan.constraint is not None else "response_format"
            raise

    async def _complete(
        self,
        request: ChatCompletionRequest,
        plan: ToolPlan,
        prepared: PreparedPrompt,
        steps: Steps,
        request_id: str,
        usage: UsageCounter,
    ) -> bytes:
        results: dict[int, ChatChoiceResult] = {}
        async for step in steps:
            if step.num_cached_tokens:
                usage.cached_tokens = step.num_cached_tokens
            for delta in step.choices:
                result = results.get(delta.index)
                if result is None:
                    result = results[delta.index] = ChatChoiceResult(index=delta.index, text="", finish_reason=None)
                result.text += delta.text
                result.token_ids.extend(delta.token_ids)
                result.finish_reason = delta.finish_reason or result.finish_reason
                if delta.logprobs is not None:
                    result.logprobs = (result.logprobs or []) + delta.logprobs
        for result in results.values():
            usage.add_completion(result.index, len(result.token_ids))
            if plan.active:
                _extract_tool_calls(result, plan)
        return chat_completion_body(
            request_id=request_id,
            model=self.engine.model_name,
            created=int(time.time()),
            choices=list(results.values()),
            usage=usage,
            top_logprobs=request.top_logprobs,
            prompt_token_ids=prepared.token_ids if request.return_token_ids else None,
        )

    async def _stream(
        self,
        request: ChatCompletionRequest,
        plan: ToolPlan,
        prepared: PreparedPrompt,
        steps: Steps,
        encoder: ChunkEncoder,
        usage: UsageCounter,
    ) -> AsyncIterator[bytes]:
        top_n = request.top_logprobs or 0
        extractors = {index: ToolCallExtractor(plan) for index in range(request.n)} if plan.active else None
        keep_empty = request.return_token_ids or request.logprobs
        try:
            for index in range(request.n):
                yield encoder.role(index, prepared.token_ids if request.return_token_ids and index == 0 else None)
            async for step in steps:
                if step.num_cached_tokens:
                    usage.cached_tokens = step.num_cached_tokens
                for delta in step.choices:
                    usage.add_completion(delta.index, len(delta.token_ids))
                    logprobs = logprobs_content(delta.logprobs, top_n) if delta.logprobs is not None else None
                    text, finish_reason = delta.text, delta.finish_reason
                    if extractors is not None:
                        extractor = extractors[delta.index]
                        text = extractor.feed(text)
                        if finish_reason is not None:
                            rest, calls = extractor.finish()
                            if calls:
                                if text or rest.strip() or keep_empty:
                                    content = text + rest if rest.strip() else text
                                    yield encoder.delta(
                                        delta.index, content, token_ids=delta.token_ids, logprobs=logprobs
                                    )
                                yield encoder.tool_calls(delta.index, [call.to_dict() for call in calls])
                                yield encoder.delta(delta.index, "", finish_reason="tool_calls")
                                continue
                            text += rest
                    if not text and finish_reason is None and not (keep_empty and delta.token_ids):
                        continue
                    yield encoder.delta(
                        delta.index, text, token_ids=delta.token_ids, finish_reason=finish_reason, logprobs=logprobs
                    )
            if encoder.include_usage:
                yield encoder.usage(usage)
        except APIError as error:
            log.warning("stream %s failed: %s", encoder.request_id, error.message)
            yield sse_error_event(error)
        except Exception:
            log.exception("stream %s failed", encoder.request_id)
            yield sse_error_event(APIError("internal error while streaming"))
        finally:
            await steps.aclose()
        yield SSE_DONE


def _extract_tool_calls(result: ChatChoiceResult, plan: ToolPlan) -> None:
    extractor = ToolCallExtractor(plan)
    content = extractor.feed(result.text)
    rest, calls = extractor.finish()
    if calls:
        result.text = content + rest
        result.tool_calls = [call.to_dict() for call in calls]
        result.finish_reason = "tool_calls"
