"""The dependency every protocol's generation routes take: the pipeline, once the server can serve."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.pipeline.pipeline import Pipeline


async def ready_pipeline(request: Request) -> Pipeline:
    """The pipeline (503 while loading, draining or after engine death, in the path's protocol shape)."""
    # async: FastAPI runs a plain `def` dependency in a worker thread, one thread hop per request.
    pipeline: Pipeline = request.app.state.gemma.require_ready()
    return pipeline


ReadyPipeline = Annotated[Pipeline, Depends(ready_pipeline)]
