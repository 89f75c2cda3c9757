"""What `/v1/responses` does around one generation: stored responses, chains, background work.

- `create` builds the pipeline request from the input items (and, with `previous_response_id`, the
  stored conversation it continues; `instructions` are not inherited, as in OpenAI's API), then
  answers like any protocol through `Pipeline.respond`. With `store` (the default) the finished
  response, its input items and the whole conversation are written before the answer's last byte.
- `background: true` answers at once with a `queued` response and runs the generation in a task
  that takes an admission slot like any request; `retrieve` polls it, `retrieve(stream=True)`
  follows its events (from `starting_after`), `cancel` stops it. The process running background
  responses renews their leases in the store (`_keep_leases`), and stops any of them that another
  API process or replica cancelled or deleted; one whose lease lapsed (its process died) is marked
  failed by whichever process sweeps next, so it never stays `in_progress`.
- Every stored response belongs to the caller that made it (`server.edge.auth.caller_of`): another
  key gets 404 for it on every route.

The store itself (SQLite by default, PostgreSQL for several replicas) is `server/store/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError
from server.pipeline.models import ServedModel
from server.pipeline.pipeline import SSE_HEADERS, Pipeline, estimate_prompt_tokens
from server.pipeline.request import ChatInput, Function, GenerationRequest, Output, Sampling, Tools, Turn
from server.protocols.responses.encoder import ResponsesEncoder, replay
from server.protocols.responses.items import text_input, turns_of, with_ids
from server.protocols.responses.wire import (
    IGNORED_RESPONSES_FIELDS,
    REFUSED_RESPONSES_FIELDS,
    FunctionTool,
    NamedFunction,
    ResponsesRequest,
)
from server.protocols.validation import check_unknown_fields
from server.store.records import ACTIVE_STATUSES, StoredResponse

log = logging.getLogger(__name__)

StoreOpener = Callable[[], Awaitable[Any]]  # -> server.store.base.ResponseStore
FOLLOW_POLL_SECONDS = 0.5  # how often a stream of a response running elsewhere checks whether it has finished
INTERRUPTED = "the server process running this response stopped before it finished (restarted or died)"


class _EventLog:
    """A background response's SSE events as they are made, for streams that follow or resume it."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done = False
        self._changed = asyncio.Event()

    def append(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self._changed.set()

    def close(self) -> None:
        self.done = True
        self._changed.set()

    async def follow(self, after: int | None) -> AsyncIterator[bytes]:
        position = 0 if after is None else after + 1  # events are numbered from 0 in order
        while True:
            while position < len(self.chunks):
                yield self.chunks[position]
                position += 1
            if self.done:
                return
            self._changed.clear()
            await self._changed.wait()


class ResponsesService:
    def __init__(self, open_store: StoreOpener) -> None:
        self._open_store = open_store
        self._store: Any = None
        self._opening = asyncio.Lock()
        self._background: dict[str, tuple[asyncio.Task[None], _EventLog]] = {}
        self._lease_keeper: asyncio.Task[None] | None = None
        self._closing = False  # set at shutdown: a background response cut short then failed, not cancelled

    async def store(self) -> Any:
        """The store, opened on first use (background responses whose process died are failed then)."""
        async with self._opening:
            if self._store is None:
                try:
                    store = await self._open_store()
                except Exception as error:  # any driver's failure: a path not writable, a database down
                    # Not opened for good: the next request tries again (the database may come back).
                    log.error("the stored-responses database (responses.url) could not be opened: %r", error)
                    raise ServiceUnavailableError(
                        "stored responses are unavailable: the server could not open its database (its log "
                        "says why); a request with store: false and no previous_response_id still works",
                        code="response_store_unavailable",
                    ) from error
                await _fail_abandoned(store)
                self._store = store
                self._lease_keeper = asyncio.create_task(self._keep_leases(store))
        return self._store

    async def _keep_leases(self, store: Any) -> None:
        """Every quarter of the lease: renew the leases of this process's background responses, stop
        those cancelled or deleted elsewhere, and fail those whose process died."""
        while True:
            await asyncio.sleep(store.lease_seconds / 4)
            try:
                for response_id in await store.heartbeat(list(self._background)):
                    job = self._background.get(response_id)
                    if job is not None:
                        job[0].cancel()
                await _fail_abandoned(store)
            except Exception:  # a database briefly down: the next beat tries again
                log.exception("renewing background responses' leases failed")

    async def aclose(self) -> None:
        self._closing = True
        if self._lease_keeper is not None:
            self._lease_keeper.cancel()
        for task, _ in list(self._background.values()):
            task.cancel()
        await asyncio.gather(*(task for task, _ in self._background.values()), return_exceptions=True)
        if self._store is not None:
            await self._store.close()

    # ---- create -----------------------------------------------------------------------------

    async def create(self, body: ResponsesRequest, http: Request, pipeline: Pipeline, caller: str) -> Response:
        check_unknown_fields(
            body, ignored=IGNORED_RESPONSES_FIELDS, refused=REFUSED_RESPONSES_FIELDS, protocol="Responses"
        )
        served = pipeline.resolve_model(body.model, http)
        if body.store:
            await self.store()  # a store that cannot open fails the request now, before it generates
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            previous = await (await self.store()).history(body.previous_response_id, caller)
            if previous is None:
                raise NotFoundError(
                    f"Previous response with id '{body.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            history = previous
        raw_input = text_input(body.input) if isinstance(body.input, str) else body.input
        calls: dict[str, str] = {}
        turns = [Turn("system", body.instructions)] if body.instructions else []
        turns += turns_of(history, calls, base="previous_response")
        turns += turns_of(raw_input, calls)
        tools, skipped = _tools(body)
        response_id = f"resp_{uuid.uuid4().hex}"
        request = GenerationRequest(
            request_id=response_id,
            route="responses",
            model=body.model,
            sampling=Sampling(temperature=body.temperature, top_p=body.top_p),
            output=_output(body, forced_call=_forces_a_call(tools)),
            chat=ChatInput(turns, tools, param="input"),
            truncate_oldest=body.truncation == "auto",
        )
        created_at = time.time()
        skeleton = _skeleton(body, response_id, created_at, served.name, tools, skipped)
        input_items = with_ids(raw_input)

        async def on_finished(final: dict[str, Any], output: list[dict[str, Any]]) -> None:
            if not body.store:
                return
            store = await self.store()
            if body.background:
                current = await store.get(response_id, caller)
                if current is None or current.status == "cancelled":
                    return  # deleted or cancelled meanwhile: that stands
            record = StoredResponse(
                response_id, caller, created_at, final["status"], final, input_items, [*history, *input_items, *output]
            )
            record.background = body.background
            await store.put(record)

        if body.background:
            return await self._start_background(
                pipeline, request, served, skeleton, on_finished, caller, body, input_items
            )
        return await pipeline.respond(request, http, ResponsesEncoder(skeleton, on_finished), served)

    async def _start_background(
        self,
        pipeline: Pipeline,
        request: GenerationRequest,
        served: ServedModel,
        skeleton: dict[str, Any],
        on_finished: Callable[[dict[str, Any], list[dict[str, Any]]], Awaitable[None]],
        caller: str,
        body: ResponsesRequest,
        input_items: list[dict[str, Any]],
    ) -> Response:
        queued = {**skeleton, "status": "queued"}
        record = StoredResponse(request.request_id, caller, skeleton["created_at"], "queued", queued, input_items, [])
        record.background = True
        await (await self.store()).put(record)
        request.output.stream = True  # events go to the log, for streams that follow it
        events = _EventLog()
        encoder = ResponsesEncoder(skeleton, on_finished, record=events.append)
        store = await self.store()

        async def started() -> None:
            current = await store.get(request.request_id, caller)
            if current is not None and current.status == "queued":  # not cancelled or deleted meanwhile
                current.status = "in_progress"
                current.response = {**current.response, "status": "in_progress"}
                await store.put(current)

        task = asyncio.create_task(self._run_background(pipeline, request, served, encoder, events, started))
        self._background[request.request_id] = (task, events)
        if body.stream:
            return StreamingResponse(events.follow(None), media_type="text/event-stream", headers=SSE_HEADERS)
        return Response(orjson.dumps(queued), media_type="application/json")

    async def _run_background(
        self,
        pipeline: Pipeline,
        request: GenerationRequest,
        served: ServedModel,
        encoder: ResponsesEncoder,
        events: _EventLog,
        started: Callable[[], Awaitable[None]],
    ) -> None:
        try:
            async with pipeline.admission.slot(estimate_prompt_tokens(request), None):
                run = await pipeline.start(request, served=served)
                await started()  # queued -> in_progress in the store, for pollers on any process
                async for _chunk in pipeline.stream(run, encoder):
                    pass  # the encoder records every chunk in the log
        except asyncio.CancelledError:
            stopped = (
                encoder.response("failed", error={"code": "server_error", "message": INTERRUPTED})
                if self._closing
                else encoder.response("cancelled")
            )
            with contextlib.suppress(Exception):
                await encoder.on_finished(stopped, encoder.output)
        except APIError as error:
            with contextlib.suppress(Exception):
                failed = encoder.response(
                    "failed", error={"code": error.code or error.error_type, "message": error.message}
                )
                await encoder.on_finished(failed, encoder.output)
        except Exception:
            log.exception("background response %s failed", request.request_id)
            with contextlib.suppress(Exception):
                failed = encoder.response("failed", error={"code": "server_error", "message": "internal error"})
                await encoder.on_finished(failed, encoder.output)
        finally:
            events.close()
            self._background.pop(request.request_id, None)

    # ---- stored responses -------------------------------------------------------------------

    async def _owned(self, response_id: str, caller: str) -> StoredResponse:
        record = await (await self.store()).get(response_id, caller)
        if record is None:
            raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id", code="not_found")
        return record  # type: ignore[no-any-return]

    async def retrieve(self, response_id: str, caller: str, *, stream: bool, starting_after: int | None) -> Response:
        record = await self._owned(response_id, caller)
        if not stream:
            return Response(orjson.dumps(record.response), media_type="application/json")
        if not record.background:
            raise BadRequestError("only background responses can be streamed again", param="stream")
        job = self._background.get(response_id)
        if job is not None:
            chunks = job[1].follow(starting_after)
        else:  # finished, or running on another API process or replica
            chunks = self._replayed_when_finished(record, starting_after)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)

    async def _replayed_when_finished(self, record: StoredResponse, after: int | None) -> AsyncIterator[bytes]:
        """The stored events once the response has finished: the process running it is the only one
        with its live events, so elsewhere a follower waits for the end, then gets the whole sequence."""
        store = await self.store()
        while record.status in ACTIVE_STATUSES:
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
            found = await store.get(record.id, record.owner)
            if found is None:  # deleted meanwhile: the stream ends with what was stored
                break
            record = found
        for chunk in replay(record.response, after):
            yield chunk

    async def delete(self, response_id: str, caller: str) -> Response:
        if not await (await self.store()).delete(response_id, caller):
            raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id", code="not_found")
        job = self._background.get(response_id)
        if job is not None:
            job[0].cancel()
        return Response(
            orjson.dumps({"id": response_id, "object": "response", "deleted": True}), media_type="application/json"
        )

    async def input_items(
        self, response_id: str, caller: str, *, after: str | None, limit: int, order: str
    ) -> Response:
        listed = await (await self.store()).list_input_items(response_id, caller, after=after, limit=limit, order=order)
        if listed is None:
            raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id", code="not_found")
        items, has_more = listed
        page = {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": has_more,
        }
        return Response(orjson.dumps(page), media_type="application/json")

    async def cancel(self, response_id: str, caller: str) -> Response:
        record = await self._owned(response_id, caller)
        if not record.background:
            raise BadRequestError("only background responses can be cancelled", param="response_id")
        if record.status in ACTIVE_STATUSES:
            record.status = "cancelled"
            record.response = {**record.response, "status": "cancelled"}
            await (await self.store()).put(record)
            job = self._background.get(response_id)
            if job is not None:
                job[0].cancel()
                with contextlib.suppress(BaseException):
                    await job[0]
        return Response(orjson.dumps(record.response), media_type="application/json")


async def _fail_abandoned(store: Any) -> None:
    failed = await store.fail_abandoned(INTERRUPTED)
    if failed:
        log.warning("%d background response(s) whose server process stopped were marked failed", failed)


# ---- the request's parts ------------------------------------------------------------------------


def _tools(body: ResponsesRequest) -> tuple[Tools | None, list[str]]:
    """Function tools; every other type is skipped (and named in the response), not refused."""
    functions: list[Function] = []
    skipped: list[str] = []
    for index, raw in enumerate(body.tools or ()):
        kind = str(raw.get("type", ""))
        if kind != "function":
            if kind not in skipped:
                skipped.append(kind)
            continue
        try:
            tool = FunctionTool.model_validate(raw)
        except ValueError as exc:
            raise BadRequestError(
                f"tools[{index}]: {str(exc).splitlines()[-1].strip()}", param=f"tools[{index}]"
            ) from None
        functions.append(Function(tool.name, tool.description, tool.parameters))
    choice = body.tool_choice
    names = {function.name for function in functions}
    if isinstance(choice, NamedFunction) and choice.name not in names:
        raise BadRequestError(
            f"tool_choice names {choice.name!r}, which is not one of the function tools", param="tool_choice"
        )
    if choice == "required" and not functions:
        raise BadRequestError("tool_choice 'required' needs at least one function tool", param="tool_choice")
    if not functions:
        return None, skipped
    if isinstance(choice, NamedFunction):
        return Tools(functions, "function", choice.name, parallel=body.parallel_tool_calls), skipped
    return Tools(functions, choice or "auto", parallel=body.parallel_tool_calls), skipped


def _forces_a_call(tools: Tools | None) -> bool:
    return tools is not None and tools.choice in ("required", "function")


def _output(body: ResponsesRequest, *, forced_call: bool) -> Output:
    """`text.format` shapes the message text; a turn forced to call a function writes none, so the
    format waits for a later turn (the Agents SDK sends both: the call first, the final output after)."""
    text_format = body.text.format if body.text is not None and not forced_call else None
    json_schema = None
    if text_format is not None and text_format.type == "json_schema":
        if text_format.schema_ is None:
            raise BadRequestError("text.format json_schema needs a `schema`", param="text.format.schema")
        json_schema = text_format.schema_
    return Output(
        max_tokens=body.max_output_tokens,
        max_tokens_param="max_output_tokens",
        json_schema=json_schema,
        json_object=text_format is not None and text_format.type == "json_object",
        format_param="text.format",
        stream=body.stream,
    )


def _skeleton(
    body: ResponsesRequest,
    response_id: str,
    created_at: float,
    served: str,
    tools: Tools | None,
    skipped: list[str],
) -> dict[str, Any]:
    choice: Any = body.tool_choice or "auto"
    if isinstance(choice, NamedFunction):
        choice = {"type": "function", "name": choice.name}
    text_format: dict[str, Any] = {"type": "text"}
    if body.text is not None and body.text.format is not None:
        text_format = body.text.format.model_dump(by_alias=True, exclude_none=True)
    skeleton: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": body.background,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "model": body.model or served,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": body.store,
        "temperature": body.temperature,
        "text": {"format": text_format},
        "tool_choice": choice,
        "tools": [
            {
                "type": "function",
                "name": f.name,
                "description": f.description,
                "parameters": f.parameters,
                "strict": True,
            }
            for f in (tools.functions if tools is not None else ())
        ],
        "top_p": body.top_p,
        "truncation": body.truncation,
        "usage": None,
        "user": body.user,
    }
    if skipped:
        skeleton["skipped_tools"] = skipped
    return skeleton
