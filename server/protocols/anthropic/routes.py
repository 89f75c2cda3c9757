"""The Anthropic routes: `POST /v1/messages` (also with `?beta=true`, as Claude Code sends it) and
`POST /v1/messages/count_tokens`. The key may come in `x-api-key` (`server/edge/auth.py`); the
`anthropic-version` and `anthropic-beta` headers are accepted; every answer has a `request-id`.
Errors on these paths are Anthropic-shaped wherever they are raised (`server/errors.py`).
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.pipeline.tools import plan_tools
from server.protocols.anthropic.messages import MessagesEncoder, chat_input, check_fields, messages_request
from server.protocols.anthropic.wire import (
    AnthropicErrorResponse,
    AnthropicMessage,
    CountTokensRequest,
    CountTokensResponse,
    MessagesRequest,
)
from server.protocols.ready import ReadyPipeline

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": AnthropicErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)
}
router = APIRouter()


@router.post(
    "/v1/messages",
    response_model=AnthropicMessage,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
    tags=["anthropic"],
)
async def messages(body: MessagesRequest, request: Request, pipeline: ReadyPipeline) -> Response:
    generation = messages_request(body)
    encoder = MessagesEncoder(body, f"req_{uuid.uuid4().hex[:24]}")
    return await pipeline.respond(generation, request, encoder)


@router.post(
    "/v1/messages/count_tokens", response_model=CountTokensResponse, responses=ERROR_RESPONSES, tags=["anthropic"]
)
async def count_tokens(body: CountTokensRequest, request: Request, pipeline: ReadyPipeline) -> Response:
    """The prompt's input tokens, images included, as a request would report them; nothing is generated."""
    check_fields(body)
    pipeline.resolve_model(body.model, request)
    chat = chat_input(body)
    prompt = await pipeline.prepare_chat(chat, plan_tools(chat.tools))
    body_bytes = b'{"input_tokens":%d}' % len(prompt.token_ids)
    return Response(body_bytes, media_type="application/json", headers={"request-id": f"req_{uuid.uuid4().hex[:24]}"})
