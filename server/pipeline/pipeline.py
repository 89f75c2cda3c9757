"""The one request pipeline every protocol runs: it owns the order of the steps.

    admit -> normalize (Gemma 3 rules) -> fetch/decode images -> build the prompt -> run on the engine
          -> events (text deltas, tool calls, finish; usage) -> the protocol's JSON body or SSE stream

A protocol adapter (`server/protocols/...`) parses its wire request into a `GenerationRequest` and
hands it to `Pipeline.respond` with a `ResponseEncoder`, its own way of writing events. Everything
else happens here, once, for every protocol:
- the model name is resolved (`models.py`: the base, an alias or a LoRA adapter, within the caller's
  key scope), then an admission slot is taken before any expensive work (429/503);
- chat turns are normalized for Gemma 3 (`normalize.py`), tools planned (`tools.py`), images fetched
  and decoded concurrently (`server/media/`), the model's template rendered and tokenized
  (`prompt.py`), and the engine's multimodal processor expands the image tokens;
- the context length and the sampling fields are checked (`sampling.py`); n greedy choices (temperature
  0) run as n engine requests (vLLM refuses n > 1 when greedy; the prefix cache makes the copies cheap);
- generation starts through `runner.py`, which waits for the first step, so errors surface before any
  response byte is sent; a client that goes away cancels the work and aborts the engine request;
- `Run.events()` turns engine steps into events, recognizing Gemma 3's tool calls in the text;
- a stream that fails after it started ends with the encoder's error event, then its end marker.

`/tokenize` uses `prepare` alone: a dry run of the prompt, with no slot and no generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.engine.interface import EngineClient, EnginePrompt, PreparedPrompt, SamplingOptions, TokenLogprob
from server.errors import APIError, BadRequestError, ContextLengthExceededError
from server.media.images import ImageLoader, LoadedImage
from server.metrics import Metrics
from server.pipeline.admission import Admission
from server.pipeline.disconnect import cancel_on_disconnect
from server.pipeline.events import ChoiceResult, Event, TextDelta, ToolCalls, Usage
from server.pipeline.models import ServedModel, ServedModels, grant_of
from server.pipeline.normalize import Conversation
from server.pipeline.prompt import conversation_for_template, render_prompt
from server.pipeline.request import ChatInput, GenerationRequest, Image, RawPrompt, Text
from server.pipeline.runner import EngineRunner, Steps, merge, start_all
from server.pipeline.sampling import check_token_ids, is_greedy, max_tokens_for, sampling_options
from server.pipeline.tools import ToolCallExtractor, ToolPlan, plan_tools
from server.settings import Settings

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Until the prompt is built, its size is estimated for admission: about 3 characters per token (an
# over-estimate for most text with Gemma's tokenizer) and Gemma 3's 256 soft tokens plus markers per image.
CHARS_PER_TOKEN = 3
TOKENS_PER_IMAGE = 260
NO_TOOLS = ToolPlan("none")


class ResponseEncoder(Protocol):
    """A protocol's way of writing one answer: a JSON body, or SSE events for a stream."""

    def headers(self, run: Run) -> dict[str, str]: ...

    async def body(self, run: Run, choices: list[ChoiceResult]) -> bytes:
        """The whole answer, once generation has ended (async: a protocol may store it first)."""
        ...

    def opening(self, run: Run) -> list[bytes]:
        """Events before the first generated token (e.g. the role chunk)."""
        ...

    def event(self, run: Run, event: Event) -> bytes | None: ...

    async def closing(self, run: Run) -> list[bytes]:
        """Events once generation has ended (e.g. the usage chunk; async: a protocol may store first)."""
        ...

    async def error(self, run: Run, error: APIError) -> bytes:
        """The stream's error event, for an error after the stream started."""
        ...

    def end(self) -> bytes:
        """What ends a stream, however it ended (OpenAI's `data: [DONE]`); may be empty."""
        ...


@dataclass(slots=True)
class Prompt:
    """One prompt, ready for the engine, and what was done to build it."""

    prepared: PreparedPrompt
    param: str  # the request field it came from ("messages", "prompt[2]")
    changes: list[str] = field(default_factory=list)  # what normalization changed (chat)

    @property
    def token_ids(self) -> list[int]:
        return self.prepared.token_ids


@dataclass(slots=True)
class _Job:
    """One engine request: a prompt, and where its choices go among the answer's."""

    prompt_index: int
    first_choice: int
    copy: int  # > 0: another greedy copy of the same prompt


class Run:
    """A started generation: its prompts, its engine requests, its usage; `events()` or `collect()` it once."""

    def __init__(
        self,
        request: GenerationRequest,
        prompts: list[Prompt],
        plan: ToolPlan,
        jobs: list[_Job],
        steps: list[Steps],
    ) -> None:
        self.request = request
        self.prompts = prompts
        self.plan = plan
        self.created = int(time.time())
        self.usage = Usage(
            prompt_tokens=sum(len(p.token_ids) for p in prompts),
            image_tokens=sum(p.prepared.num_image_tokens for p in prompts),
        )
        self._jobs = jobs
        self._steps = steps
        self._cached_by_prompt: dict[int, int] = {}
        self._extractors: dict[int, ToolCallExtractor] = {}

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def changes(self) -> list[str]:
        return [change for prompt in self.prompts for change in prompt.changes]

    def prompt_logprobs(self, prompt_index: int) -> list[TokenLogprob | None] | None:
        """With `Output.prompt_logprobs`: one entry per prompt token (None for the first)."""
        for job, steps in zip(self._jobs, self._steps, strict=True):
            if job.prompt_index == prompt_index and steps.first_step is not None:
                return steps.first_step.prompt_logprobs
        return None

    async def events(self) -> AsyncIterator[Event]:
        if len(self._steps) == 1:  # the common case: no task per step
            async for step in self._steps[0]:
                for event in self._step_events(0, step):
                    yield event
            return
        merged = merge(self._steps)
        try:
            async for job_index, step in merged:
                for event in self._step_events(job_index, step):
                    yield event
        finally:
            await merged.aclose()

    def _step_events(self, job_index: int, step: Any) -> list[Event]:
        job = self._jobs[job_index]
        if step.num_cached_tokens and job.copy == 0:
            self._cached_by_prompt[job.prompt_index] = step.num_cached_tokens
            self.usage.cached_tokens = sum(self._cached_by_prompt.values())
        events: list[Event] = []
        for delta in step.choices:
            index = job.first_choice + delta.index
            self.usage.add_completion(index, len(delta.token_ids))
            if not self.plan.active:
                events.append(
                    TextDelta(
                        index, delta.text, delta.token_ids, delta.logprobs, delta.finish_reason, delta.stop_reason
                    )
                )
                continue
            extractor = self._extractors.get(index)
            if extractor is None:
                extractor = self._extractors[index] = ToolCallExtractor(self.plan, index)
            text, pieces = extractor.feed(delta.text)
            if delta.finish_reason is None:
                events.append(TextDelta(index, text, delta.token_ids, delta.logprobs))
                events += pieces
                continue
            rest, last_pieces, calls = extractor.finish()
            if not calls:
                events.append(
                    TextDelta(
                        index, text + rest, delta.token_ids, delta.logprobs, delta.finish_reason, delta.stop_reason
                    )
                )
                continue
            content = text + rest if rest.strip() else text
            events.append(TextDelta(index, content, delta.token_ids, delta.logprobs))
            events += pieces + last_pieces
            events.append(ToolCalls(index, calls))
            # A call cut by the output limit is reported as cut, as OpenAI does.
            cut = delta.finish_reason == "length" and not extractor.complete
            events.append(TextDelta(index, "", [], None, "length" if cut else "tool_calls"))
        return events

    async def collect(self) -> list[ChoiceResult]:
        results: dict[int, ChoiceResult] = {}
        async for event in self.events():
            result = results.get(event.index)
            if result is None:
                result = results[event.index] = ChoiceResult(event.index)
            result.add(event)
        return [results[index] for index in sorted(results)]

    async def aclose(self) -> None:
        """Ends every engine request still running (a no-op for finished ones)."""
        for steps in self._steps:
            await steps.aclose()


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        engine: EngineClient,
        metrics: Metrics,
        admission: Admission,
        images: ImageLoader,
        models: ServedModels | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.admission = admission
        self.images = images
        self.models = models if models is not None else ServedModels(settings, engine.model_name)
        self.runner = EngineRunner(engine, metrics)

    @property
    def model_name(self) -> str:
        """The base model's name."""
        return self.models.base.name

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def resolve_model(self, model: str | None, http: Request | None = None) -> ServedModel:
        """The model (base or adapter) a request's `model` names, if the caller's key may use it;
        404 model_not_found otherwise. Every route calls this first."""
        return self.models.resolve(model, grant_of(http.scope) if http is not None else None)

    # ---- the whole request ----------------------------------------------------------------

    async def respond(
        self,
        request: GenerationRequest,
        http: Request | None,
        encoder: ResponseEncoder,
        served: ServedModel | None = None,
    ) -> Response:
        """Admits, runs and answers one request; `http` lets it be cancelled when its client goes away.
        `served`: the request's model if the route resolved it already (for its encoder)."""
        served = served if served is not None else self.resolve_model(request.model, http)
        async with self.admission.slot(estimate_prompt_tokens(request), http) as slot:
            run = await self.start(request, http, served)
            headers = encoder.headers(run)
            if request.output.stream:
                stream = self.stream(run, encoder)
                response = StreamingResponse(stream, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
                return slot.hold(response)
            try:
                choices = await cancel_on_disconnect(http, run.collect())
            finally:
                await run.aclose()  # aborts the engine requests if the client went away first
            return Response(await encoder.body(run, choices), media_type="application/json", headers=headers)

    async def stream(self, run: Run, encoder: ResponseEncoder) -> AsyncIterator[bytes]:
        """A started run's events as the encoder writes them; an error ends it with the encoder's error event."""
        try:
            for chunk in encoder.opening(run):
                yield chunk
            async for event in run.events():
                encoded = encoder.event(run, event)
                if encoded:
                    yield encoded
            for chunk in await encoder.closing(run):
                yield chunk
        except APIError as error:
            log.warning("stream %s failed: %s", run.request_id, error.message)
            yield await encoder.error(run, error)
        except Exception:
            log.exception("stream %s failed", run.request_id)
            yield await encoder.error(run, APIError("internal error while streaming"))
        finally:
            await run.aclose()
        end = encoder.end()
        if end:
            yield end

    async def start(
        self, request: GenerationRequest, http: Request | None = None, served: ServedModel | None = None
    ) -> Run:
        """Prepares the prompts and starts their generations; returns once each has its first step.
        `served`: the resolved model (resolved here, with no key scope, when not given)."""
        served = served if served is not None else self.models.resolve(request.model)
        received = time.perf_counter()
        plan = plan_tools(request.chat.tools) if request.chat is not None else NO_TOOLS
        if request.chat is not None:
            prompts = [await self._fitting_chat(request, request.chat, plan)]
        else:
            prompts = [await self.prepare_raw(prompt) for prompt in request.prompts]
        n = request.sampling.n
        copies = n if n > 1 and is_greedy(request.sampling) else 1
        jobs: list[_Job] = []
        engine_jobs: list[tuple[PreparedPrompt, SamplingOptions, str]] = []
        for prompt_index, prompt in enumerate(prompts):
            options = self._sampling_options(request, prompt, plan, n // copies)
            for copy in range(copies):
                jobs.append(_Job(prompt_index, prompt_index * n + copy, copy))
                engine_jobs.append((prompt.prepared, options, request.request_id))
        if len(engine_jobs) > 1:
            engine_jobs = [(p, o, f"{rid}-{i}") for i, (p, o, rid) in enumerate(engine_jobs)]
        try:
            steps = await cancel_on_disconnect(http, start_all(self.runner, engine_jobs, received, served))
        except BadRequestError as error:
            # The engine refuses a schema it cannot compile without saying which field it came from.
            options = engine_jobs[0][1]
            if error.param is None and (options.json_schema is not None or options.json_object):
                error.param = "tools" if plan.constraint is not None else request.output.format_param
            raise
        return Run(request, prompts, plan, jobs, steps)

    def _sampling_options(self, request: GenerationRequest, prompt: Prompt, plan: ToolPlan, n: int) -> SamplingOptions:
        output = request.output
        max_tokens = self._max_tokens(request, prompt)
        json_schema, json_object = plan.constraint, False
        if output.json_schema is not None or output.json_object:
            if plan.constraint is not None:
                raise BadRequestError(
                    f"{output.format_param} cannot be combined with tool_choice 'required' or a named function: "
                    "both constrain the output",
                    param=output.format_param,
                )
            json_schema, json_object = output.json_schema, output.json_object
        return sampling_options(
            request.sampling,
            output,
            max_tokens=max_tokens,
            vocab_size=self.runner.vocab_size,
            n=n,
            json_schema=json_schema,
            json_object=json_object,
        )

    # ---- prompts ------------------------------------------------------------------------------

    def conversation(self, chat: ChatInput, plan: ToolPlan) -> Conversation:
        return conversation_for_template(
            chat.turns, tools_text=plan.prompt_text, strict=self.settings.server.strict_messages
        )

    async def prepare_chat(self, chat: ChatInput, plan: ToolPlan) -> Prompt:
        """Normalize -> images -> template -> tokens -> the engine's multimodal processor."""
        conversation = self.conversation(chat, plan)
        limit = self.settings.images.max_per_request
        if len(conversation.images) > limit:
            raise BadRequestError(
                f"{len(conversation.images)} images were sent; at most {limit} are allowed per request",
                param=chat.param,
                code="too_many_images",
            )
        images = await self._load_images(conversation.images)
        started = time.perf_counter()
        _text, token_ids = render_prompt(
            self.engine.tokenizer, conversation, add_generation_prompt=chat.add_generation_prompt
        )
        options = self._processor_options(conversation.images)
        engine_prompt = EnginePrompt(
            token_ids=token_ids,
            images=[image.pixels for image in images],
            image_ids=[image.content_id for image in images],
            mm_processor_kwargs=options,
        )
        prepared = await self.runner.prepare(engine_prompt, started=started)
        return Prompt(prepared, chat.param, conversation.changes)

    async def _fitting_chat(self, request: GenerationRequest, chat: ChatInput, plan: ToolPlan) -> Prompt:
        """The chat's prompt; with `truncate_oldest`, its oldest turns are dropped (system text kept)
        until the prompt and the completion fit the context."""
        while True:
            prompt = await self.prepare_chat(chat, plan)
            if not request.truncate_oldest or self._fits(request, prompt):
                return prompt
            shorter = _without_oldest_turn(chat)
            if shorter is None:
                return prompt  # nothing left to drop: the context check gives its 400
            chat = shorter

    def _max_tokens(self, request: GenerationRequest, prompt: Prompt) -> int:
        """The completion budget of `prompt` (`sampling.max_tokens_for`: the request's limit, the
        operator's default and cap, the context); a 400 when they cannot fit."""
        return max_tokens_for(
            requested=request.output.max_tokens,
            requested_param=request.output.max_tokens_param,
            prompt_tokens=len(prompt.token_ids),
            image_tokens=prompt.prepared.num_image_tokens,
            max_model_len=self.engine.max_model_len,
            default_max_tokens=self.settings.server.default_max_tokens,
            max_tokens_cap=self.settings.server.max_tokens_cap,
            prompt_param=prompt.param,
        )

    def _fits(self, request: GenerationRequest, prompt: Prompt) -> bool:
        try:
            self._max_tokens(request, prompt)
        except ContextLengthExceededError:
            return False
        return True

    async def prepare_raw(self, prompt: RawPrompt) -> Prompt:
        """Text is tokenized as it is (Gemma's tokenizer adds <bos>); token ids must exist."""
        if isinstance(prompt.value, str):
            token_ids = list(self.engine.tokenizer.encode(prompt.value))
        else:
            check_token_ids(prompt.value, self.runner.vocab_size, prompt.param)
            token_ids = list(prompt.value)
        try:
            prepared = await self.runner.prepare(EnginePrompt(token_ids=token_ids))
        except BadRequestError as error:
            error.param = prompt.param
            raise
        return Prompt(prepared, prompt.param)

    def tokenize_text(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: list[int], param: str) -> str:
        check_token_ids(token_ids, self.runner.vocab_size, param)
        return str(self.engine.tokenizer.decode(token_ids))

    async def _load_images(self, refs: list[Image]) -> list[LoadedImage]:
        self.metrics.images_per_request.observe(len(refs))
        if not refs:
            return []
        started = time.perf_counter()
        images = await asyncio.gather(*(self.images.load(ref.url, ref.param) for ref in refs))
        self.metrics.image_load_seconds.observe(time.perf_counter() - started)
        for ref in refs:
            self.metrics.images.labels("data" if ref.url[:5].lower() == "data:" else "url").inc()
        return list(images)

    def _processor_options(self, refs: list[Image]) -> dict[str, Any] | None:
        """OpenAI's `detail` -> Gemma 3's processor options.

        "low" asks for one view of the image at the model's size; "high" and "auto" allow Gemma 3's
        pan-and-scan crops (only large or elongated images get any), when `images.pan_and_scan` is
        on, up to `images.pan_and_scan_max_crops` crops per image. vLLM takes these options once per
        prompt, so a request that mixes "low" with "high"/"auto" gets pan-and-scan for all of its
        images: the quality asked for wins over the saving.
        """
        settings = self.settings.images
        if not refs or not settings.pan_and_scan:
            return None
        if all(ref.detail == "low" for ref in refs):
            return {"do_pan_and_scan": False}
        return {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": settings.pan_and_scan_max_crops}


def _without_oldest_turn(chat: ChatInput) -> ChatInput | None:
    """The chat without its oldest non-system turn (and the tool results that answered it)."""
    turns = chat.turns
    talk = [i for i, turn in enumerate(turns) if turn.role not in ("system", "developer")]
    if len(talk) < 2:
        return None
    first = talk[0]
    end = first + 1
    while end < len(turns) and turns[end].role == "tool":
        end += 1
    return ChatInput(turns[:first] + turns[end:], chat.tools, chat.add_generation_prompt, chat.param)


def estimate_prompt_tokens(request: GenerationRequest) -> int:
    """A request's prompt size before its prompt is built (admission bounds the tokens waiting).

    Token id prompts count exactly; text is estimated."""
    if request.chat is None:
        total = 0
        for prompt in request.prompts:
            value = prompt.value
            total += len(value) if isinstance(value, list) else 1 + len(value) // CHARS_PER_TOKEN
        return max(total, 1)
    chars = images = 0
    for turn in request.chat.turns:
        content = turn.content
        if isinstance(content, str):
            chars += len(content)
            continue
        for part in content or ():
            if isinstance(part, Text):
                chars += len(part.text)
            else:
                images += 1
    return 1 + chars // CHARS_PER_TOKEN + images * TOKENS_PER_IMAGE
