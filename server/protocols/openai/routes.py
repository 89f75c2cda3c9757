"""The OpenAI routes on the app: each parses its wire body, then hands it to its adapter and the pipeline.

A route is a few lines: FastAPI validates the body against `wire.py` (a failure is an OpenAI 400,
`validation.py`), the readiness dependency refuses work while the server loads or drains, the
adapter builds the pipeline request and its encoder, and `Pipeline.respond` does the rest.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.errors import NotFoundError
from server.pipeline.models import ServedModel, ServedModels, grant_of
from server.protocols.openai import tokenize as tokenizer_routes
from server.protocols.openai.chat import ChatEncoder, chat_request
from server.protocols.openai.completions import CompletionEncoder, completion_request
from server.protocols.openai.wire import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.protocols.ready import ReadyPipeline

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 431, 500, 503)
}
STREAMED = {**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}}


router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAMED, tags=["chat"])
async def chat_completions(body: ChatCompletionRequest, request: Request, pipeline: ReadyPipeline) -> Response:
    served = pipeline.resolve_model(body.model, request)
    return await pipeline.respond(chat_request(body), request, ChatEncoder(body, served.name), served)


@router.post("/v1/completions", response_model=Completion, responses=STREAMED, tags=["completions"])
async def completions(body: CompletionRequest, request: Request, pipeline: ReadyPipeline) -> Response:
    served = pipeline.resolve_model(body.model, request)
    encoder = CompletionEncoder(body, served.name, pipeline.tokenizer)
    return await pipeline.respond(completion_request(body), request, encoder, served)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES, tags=["tokenizer"])
async def tokenize(body: TokenizeRequest, request: Request, pipeline: ReadyPipeline) -> Response:
    return await tokenizer_routes.tokenize(body, pipeline, request)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES, tags=["tokenizer"])
async def detokenize(body: DetokenizeRequest, request: Request, pipeline: ReadyPipeline) -> Response:
    return await tokenizer_routes.detokenize(body, pipeline, request)


@router.get("/v1/models", response_model=ModelList, tags=["models"])
async def list_models(request: Request) -> dict[str, Any]:
    """The base model and each LoRA adapter the caller's key may use (vLLM's shape: `parent`, `root`)."""
    state = request.app.state.gemma
    models: ServedModels = state.pipeline.models
    return {"object": "list", "data": [_model_card(state, m) for m in models.visible(grant_of(request.scope))]}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES, tags=["models"])
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = request.app.state.gemma
    models: ServedModels = state.pipeline.models
    for model in models.visible(grant_of(request.scope)):
        if model.name == model_id:
            return _model_card(state, model)
    raise NotFoundError(f"The model '{model_id}' does not exist", param="model", code="model_not_found")


def _model_card(state: Any, model: ServedModel) -> dict[str, Any]:
    base = state.pipeline.models.base.name
    adapter = model.adapter
    return {
        "id": model.name,
        "object": "model",
        "created": adapter.created if adapter is not None else state.started_at,
        "owned_by": "google",
        "root": adapter.path if adapter is not None else state.settings.model.path,
        "parent": base if adapter is not None else None,
        "max_model_len": state.engine.max_model_len,
    }
