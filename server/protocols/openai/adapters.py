"""Runtime LoRA adapter loading: `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`.

vLLM's endpoint names and bodies (`{"lora_name", "lora_path"}`), so tools written for vLLM's server
(the production-stack's LoRA controller, KServe) work unchanged. Only with `lora.runtime_loading`
(404 otherwise, as from vLLM's server without it; the routes stay in the OpenAPI document) and only
for admin keys (`auth.keys[].admin`); any other key gets 403.

Loading checks the adapter first (`server/pipeline/adapter_check.py`), then has the engine load it,
and only then serves its name: a bad adapter is a 400 and disturbs nothing already served.
Unloading takes the name out of service at once (new requests get 404), lets the generations
running on it finish (up to `server.drain_timeout_seconds`), then frees it in the engine. One load
or unload at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from server.errors import BadRequestError, NotFoundError, PermissionDeniedError
from server.pipeline.adapter_check import check_adapter
from server.pipeline.models import grant_of
from server.pipeline.pipeline import Pipeline
from server.protocols.openai.wire import ErrorResponse
from server.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(tags=["lora"])
_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 503)}


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's clients may send lora_int_id too
    lora_name: str = Field(min_length=1, max_length=128)


def _for_admin(request: Request) -> tuple[Settings, Pipeline]:
    """The settings and the ready pipeline, for an admin key only (403 for any other)."""
    state = request.app.state.gemma
    if not state.settings.lora.runtime_loading:
        raise NotFoundError("runtime adapter loading is off on this server (lora.runtime_loading)")
    if not grant_of(request.scope).admin:
        raise PermissionDeniedError("loading and unloading adapters needs an admin key")
    return state.settings, state.require_ready()


@router.post("/v1/load_lora_adapter", responses=_ERRORS)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> dict[str, Any]:
    settings, pipeline = _for_admin(request)
    models = pipeline.models
    async with models.changing:
        if models.taken(body.lora_name):
            raise BadRequestError(
                f"the name '{body.lora_name}' is already served", param="lora_name", code="adapter_exists"
            )
        await asyncio.to_thread(
            check_adapter,
            body.lora_path,
            max_rank=settings.lora.max_lora_rank,
            base_model=settings.model.resolved_path,
        )
        adapter = models.new_adapter(body.lora_name, body.lora_path, int(time.time()))
        await pipeline.engine.add_adapter(adapter)
        models.serve(adapter)
    log.info("LoRA adapter %r loaded from %s (engine id %d)", adapter.name, adapter.path, adapter.lora_id)
    return {"object": "model", "id": adapter.name, "parent": models.base.name, "root": adapter.path}


@router.post("/v1/unload_lora_adapter", responses=_ERRORS)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> dict[str, Any]:
    settings, pipeline = _for_admin(request)
    models = pipeline.models
    async with models.changing:
        adapter = models.withdraw(body.lora_name)
        if adapter is None:
            raise NotFoundError(
                f"no adapter named '{body.lora_name}' is loaded", param="lora_name", code="adapter_not_found"
            )
        try:
            await asyncio.wait_for(adapter.idle(), settings.server.drain_timeout_seconds)
        except TimeoutError:
            log.warning("adapter %r unloaded with %d generation(s) still running", adapter.name, adapter.in_flight)
        await pipeline.engine.remove_adapter(adapter)
    log.info("LoRA adapter %r unloaded", adapter.name)
    return {"object": "model", "id": adapter.name, "deleted": True}
