"""The app factory: what the routes share, the middleware order, the engine's lifetime, the probes.

`create_app(settings)` returns a FastAPI app whose lifespan starts the engine in the background:
`/health` answers at once (the process is alive), `/ready` says 503 until the engine has loaded and
passed the self-test. If the engine fails to start, or dies later, `/ready` fails at once and
`on_fatal` is told (`Fatal`) so the process can exit non-zero (`server/lifecycle.py` picks the code)
and the orchestrator restart it.

A request's path through the server:
- middleware, outermost first (`server/edge/`): request metrics, request limits (header size and
  count, body size), CORS (only if origins are configured), API keys;
- a protocol's routes (`server/protocols/openai/`, `anthropic/`, `responses/`) parse the wire
  request and hand it to the one pipeline (`server/pipeline/pipeline.py`): admission, Gemma 3
  normalization, images, prompt, engine, events, the protocol's answer;
- every error, wherever it is raised, is written by `server/errors.py`.

Nothing is loaded at import time; the engine is injected (tests may pass their own).
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import errors
from server.edge.auth import ApiKeys, AuthMiddleware, OpenAICORSMiddleware, cors_options, public_paths
from server.edge.limits import RequestLimitsMiddleware
from server.edge.request_metrics import MetricsMiddleware
from server.engine.interface import EngineClient
from server.errors import APIError
from server.media.images import ImageLoader
from server.metrics import CONTENT_TYPE, Metrics
from server.pipeline.adapter_check import check_adapter
from server.pipeline.admission import Admission, AdmissionCounts
from server.pipeline.models import ServedModels
from server.pipeline.pipeline import Pipeline
from server.protocols.anthropic import routes as anthropic_routes
from server.protocols.openai import adapters as adapter_routes
from server.protocols.openai import routes as openai_routes
from server.protocols.responses import routes as responses_routes
from server.protocols.responses.service import ResponsesService
from server.protocols.validation import validation_error_to_api_error
from server.selftest import run_self_test
from server.settings import Settings

log = logging.getLogger(__name__)

ENGINE_WATCH_INTERVAL_SECONDS = 1.0


class Fatal(enum.Enum):
    """What ends serving for good; the process's lifetime (`server/lifecycle.py`) picks the exit code."""

    ENGINE_STARTUP_FAILED = "the engine failed to start"
    ENGINE_DIED = "the engine died"


FatalHandler = Callable[[Fatal, str], None]


class AppState:
    """What the routes share; one per app (no module-level globals)."""

    def __init__(
        self,
        settings: Settings,
        engine: EngineClient,
        on_fatal: FatalHandler,
        shared_admission_counts: AdmissionCounts | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.on_fatal = on_fatal
        self.metrics = Metrics()
        self.images = ImageLoader(settings.images)
        self.admission = Admission(settings.admission, self.metrics, shared_admission_counts)
        self.started_at = int(time.time())
        self.models = ServedModels(settings, engine.model_name, created=self.started_at)
        self.pipeline = Pipeline(settings, engine, self.metrics, self.admission, self.images, self.models)
        self.responses = ResponsesService(lambda: _open_response_store(settings))
        self.api_keys = ApiKeys(settings.auth)
        self.startup_error: str | None = None
        self.self_tested = False
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.self_tested and self.engine.is_ready and not self.draining and self.startup_error is None

    @property
    def retry_after(self) -> dict[str, str]:
        return self.admission.retry_after

    def begin_draining(self) -> None:
        """Readiness fails and new requests are refused from now on. Only sets a flag, so a signal
        handler may call it; `server.lifecycle.drain` does the rest."""
        self.draining = True

    def require_ready(self) -> Pipeline:
        """The pipeline, or the 503 that says why there is none to serve with."""
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise errors.draining(self.retry_after)
        if self.startup_error is not None:
            raise errors.engine_stopped()
        if not self.engine.is_ready:  # requests may arrive before the self-test has finished: fine
            raise errors.not_ready(self.retry_after)
        return self.pipeline


async def _open_response_store(settings: Settings) -> object:
    from server.store.factory import open_store  # the database drivers load on first use

    return await open_store(settings.responses)


def _default_engine(settings: Settings) -> EngineClient:
    from server.engine.vllm_engine import VllmEngine  # imported here: vLLM takes seconds to import

    return VllmEngine(settings)


def _log_fatal(fatal: Fatal, reason: str) -> None:
    log.critical("fatal: %s (%s)", reason, fatal.value)


def create_app(
    settings: Settings,
    *,
    engine: EngineClient | None = None,
    start_engine: Callable[[], Awaitable[None]] | None = None,
    on_fatal: FatalHandler | None = None,
    shared_admission_counts: AdmissionCounts | None = None,
) -> FastAPI:
    """`shared_admission_counts`: in one of several API processes, the admission counts they share."""
    engine = engine if engine is not None else _default_engine(settings)
    state = AppState(settings, engine, on_fatal or _log_fatal, shared_admission_counts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starter = start_engine or (lambda: _start_engine(state))
        startup = asyncio.create_task(_run_startup(state, starter))
        watcher = asyncio.create_task(_watch_engine(state))
        try:
            yield
        finally:
            state.draining = True
            startup.cancel()
            watcher.cancel()
            await state.images.aclose()
            await state.responses.aclose()
            engine.shutdown()

    app = FastAPI(
        title="gemma-server",
        summary="OpenAI-compatible API for Gemma 3 (text and images) on vLLM",
        version="0.1.0",
        lifespan=lifespan,
        # No 307 to the slash-less URL: Starlette builds that URL from the Host header (an open
        # redirect), and clients should see one OpenAI-shaped 404 instead.
        redirect_slashes=False,
    )
    app.state.gemma = state
    app.state.responses = state.responses
    _install_middleware(app, state)
    _install_error_handlers(app)
    _add_probes(app, state)
    app.include_router(openai_routes.router)
    app.include_router(anthropic_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(adapter_routes.router)
    return app


def _install_middleware(app: FastAPI, state: AppState) -> None:
    """Added innermost first: the last one added runs first."""
    auth = state.settings.auth
    app.add_middleware(AuthMiddleware, routes=app.router.routes, keys=state.api_keys, public=public_paths(auth))
    if auth.cors_allow_origins:
        app.add_middleware(OpenAICORSMiddleware, **cors_options(auth))  # type: ignore[arg-type]
    server = state.settings.server
    app.add_middleware(
        RequestLimitsMiddleware,
        max_body_bytes=server.max_body_bytes,
        max_header_bytes=server.max_header_bytes,
        max_header_count=server.max_header_count,
    )
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)


async def _start_engine(state: AppState) -> None:
    model = state.settings.model
    if model.build_tiny_if_missing:
        from server import tiny_model

        await asyncio.to_thread(tiny_model.build_tiny_model, model.resolved_path)  # returns at once once built
    await state.engine.start()
    await run_self_test(state.pipeline)


async def _load_configured_adapters(state: AppState) -> None:
    """Checks and loads `lora.adapters` into the engine before the server is ready: a bad one fails
    start-up with its reason (a bad adapter that first reached the engine with a request would kill
    the engine), and no first request waits for an adapter's weights."""
    for adapter in state.models.adapters:
        check_adapter(
            adapter.path,
            max_rank=state.settings.lora.max_lora_rank,
            base_model=state.settings.model.resolved_path,
            param=f"lora.adapters[{adapter.name}]",
        )
        await state.engine.add_adapter(adapter)
        adapter.loaded = True
        log.info("LoRA adapter %r loaded from %s", adapter.name, adapter.path)


async def _run_startup(state: AppState, starter: Callable[[], Awaitable[None]]) -> None:
    timeout = state.settings.server.engine_startup_timeout_seconds
    try:
        async with asyncio.timeout(timeout):
            await starter()
            await _load_configured_adapters(state)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        reason = f"engine failed to start: {type(exc).__name__}: {exc}"
        state.startup_error = reason
        log.exception("engine failed to start")
        state.on_fatal(Fatal.ENGINE_STARTUP_FAILED, reason)
        return
    state.self_tested = True
    state.metrics.engine_ready.set(1)
    # What start-up loaded (vLLM, torch, transformers: millions of objects) lives as long as the
    # process. Freezing it keeps every later full collection from walking all of it (a pause of a
    # second or more under load), as vLLM's own server does.
    gc.collect()
    gc.freeze()


async def _watch_engine(state: AppState) -> None:
    """Polls the engine; a dead engine makes /ready fail and the process exit non-zero."""
    while True:
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_SECONDS)
        if state.engine.is_dead:
            state.metrics.engine_ready.set(0)
            state.startup_error = "the inference engine died"
            state.on_fatal(Fatal.ENGINE_DIED, "the inference engine died")
            return


def _add_probes(app: FastAPI, state: AppState) -> None:
    @app.get("/health", tags=["probes"], summary="Liveness: the process is up (also while loading).")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["probes"], summary="Readiness: 200 once the engine can serve, 503 otherwise.")
    async def ready() -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ready"})
        reason = state.startup_error or ("draining" if state.draining else "loading")
        return JSONResponse({"status": "not_ready", "reason": reason}, status_code=503)

    @app.get("/metrics", tags=["probes"], summary="Prometheus metrics (server and vLLM engine).")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return errors.response(exc, path=request.scope.get("path", ""))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return errors.response(validation_error_to_api_error(exc.errors()), path=request.scope.get("path", ""))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = errors.from_http_status(exc.status_code, str(exc.detail))
        return errors.response(error, path=request.scope.get("path", ""), extra_headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return errors.response(APIError("internal error"), path=request.scope.get("path", ""))
