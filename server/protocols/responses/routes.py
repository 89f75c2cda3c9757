"""The Responses API routes: create, retrieve (also streamed again), delete, input items, cancel.

Creating needs a ready server, like every generation route; reading, deleting and cancelling stored
responses need only the store. Every route sees only the caller's own responses (404 otherwise).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from server.edge.auth import caller_of
from server.protocols.openai.wire import ErrorResponse
from server.protocols.ready import ReadyPipeline
from server.protocols.responses.service import ResponsesService
from server.protocols.responses.wire import DeletedResponse, InputItemList, ResponseObject, ResponsesRequest

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)
}
router = APIRouter(tags=["responses"])


def _service(request: Request) -> ResponsesService:
    service: ResponsesService = request.app.state.responses
    return service


@router.post(
    "/v1/responses",
    response_model=ResponseObject,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def create_response(body: ResponsesRequest, request: Request, pipeline: ReadyPipeline) -> Response:
    return await _service(request).create(body, request, pipeline, caller_of(request.scope))


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=ERROR_RESPONSES)
async def retrieve_response(
    response_id: str,
    request: Request,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=-1)] = None,
) -> Response:
    return await _service(request).retrieve(
        response_id, caller_of(request.scope), stream=stream, starting_after=starting_after
    )


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=ERROR_RESPONSES)
async def delete_response(response_id: str, request: Request) -> Response:
    return await _service(request).delete(response_id, caller_of(request.scope))


@router.get("/v1/responses/{response_id}/input_items", response_model=InputItemList, responses=ERROR_RESPONSES)
async def list_input_items(
    response_id: str,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    return await _service(request).input_items(
        response_id, caller_of(request.scope), after=after, limit=limit, order=order
    )


@router.post("/v1/responses/{response_id}/cancel", response_model=ResponseObject, responses=ERROR_RESPONSES)
async def cancel_response(response_id: str, request: Request) -> Response:
    return await _service(request).cancel(response_id, caller_of(request.scope))
