"""The app factory: routes, error mapping, metrics middleware, and the engine's lifetime.

`create_app(settings)` returns a FastAPI app whose lifespan starts the engine in the background:
`/health` answers at once (the process is alive), `/ready` says 503 until the engine can serve.
If the engine fails to start, or dies later, `/ready` fails at once and `on_fatal` is called so the
process can exit non-zero and the orchestrator restarts it.

Middleware, outermost first: metrics (sees every answer, refusals included), request limits
(`server/limits.py`: header size/count, body size), CORS (only if origins are configured), API keys
(`server/auth.py`). Generation routes take an admission slot (`server/admission.py`) before any
expensive work. `drain` is the SIGTERM path: readiness fails, new work is refused, in-flight work
gets `server.drain_timeout_seconds`, the rest is aborted.

Nothing is loaded at import time; the engine is injected (tests may pass their own).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.chat import ChatService
from server.completions import CompletionService
from server.edge.auth import ApiKeys, AuthMiddleware, OpenAICORSMiddleware, cors_options, public_paths
from server.edge.limits import RequestLimitsMiddleware
from server.engine.interface import EngineClient
from server.errors import (
    APIError,
    BadRequestError,
    MethodNotAllowedError,
    NotFoundError,
    ServiceUnavailableError,
)
from server.media.images import ImageLoader
from server.metrics import CONTENT_TYPE, Metrics
from server.pipeline.admission import (
    Admission,
    AdmissionCounts,
    estimate_chat_prompt_tokens,
    estimate_completion_prompt_tokens,
)
from server.pipeline.runner import EngineRunner
from server.protocols.openai.validation import validation_error_to_api_error
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
from server.selftest import run_self_test
from server.settings import Settings
from server.tokenization import TokenizationService

log = logging.getLogger(__name__)

ENGINE_WATCH_INTERVAL_SECONDS = 1.0
# After the drain window, aborted requests get this long to send their error before the exit.
ABORT_GRACE_SECONDS = 5.0
FatalHandler = Callable[[int, str], None]

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 431, 500, 503)
}


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
        self.runner = EngineRunner(engine, self.metrics)
        self.chat = ChatService(settings, self.runner, self.images)
        self.completions = CompletionService(settings, self.runner)
        self.tokenization = TokenizationService(self.chat)
        self.admission = Admission(settings.admission, self.metrics, shared_admission_counts)
        self.api_keys = ApiKeys(settings.auth)
        self.started_at = int(time.time())
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
        handler may call it; `drain` does the rest."""
        self.draining = True


async def drain(state: AppState) -> None:
    """The SIGTERM path: refuse new and waiting work (503 + Retry-After), let in-flight requests
    finish within `server.drain_timeout_seconds`, then abort the rest in the engine (streams end with
    an error event and `data: [DONE]`). Returns when nothing is in flight (or the grace ran out)."""
    started = time.monotonic()
    state.begin_draining()
    state.admission.start_draining()
    window = state.settings.server.drain_timeout_seconds
    log.info("draining: %d request(s) in flight, %.0f s to finish", state.admission.in_flight, window)
    if await state.admission.wait_idle(window):
        log.info("drained in %.1f s", time.monotonic() - started)
        return
    aborted = await state.engine.abort_all()
    state.metrics.aborted.labels("drain_timeout").inc(aborted)
    log.warning("drain window over: aborted %d engine request(s)", aborted)
    if not await state.admission.wait_idle(ABORT_GRACE_SECONDS):
        log.warning("%d request(s) still in flight after the abort", state.admission.in_flight)


def _default_engine(settings: Settings) -> EngineClient:
    from server.engine.vllm_engine import VllmEngine  # imported here: vLLM takes seconds to import

    return VllmEngine(settings)


def _log_fatal(code: int, reason: str) -> None:
    log.critical("fatal: %s (exit code %d)", reason, code)


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
    _install_middleware(app, state)
    _install_error_handlers(app)
    _add_routes(app, state)
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
    await run_self_test(state.chat)


async def _run_startup(state: AppState, starter: Callable[[], Awaitable[None]]) -> None:
    timeout = state.settings.server.engine_startup_timeout_seconds
    try:
        async with asyncio.timeout(timeout):
            await starter()
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        reason = f"engine failed to start: {type(exc).__name__}: {exc}"
        state.startup_error = reason
        log.exception("engine failed to start")
        state.on_fatal(3, reason)
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
            state.on_fatal(4, "the inference engine died")
            return


async def _require_ready(request: Request) -> AppState:
    # async: FastAPI runs a plain `def` dependency in a worker thread, one thread hop per request.
    state: AppState = request.app.state.gemma
    if state.draining:
        state.metrics.rejected.labels("draining").inc()
        raise ServiceUnavailableError(
            "the server is shutting down; retry on another replica",
            code="server_shutting_down",
            headers=state.retry_after,
        )
    if state.startup_error is not None:
        raise ServiceUnavailableError("the inference engine has stopped; the server is restarting")
    if not state.engine.is_ready:  # requests may arrive before the self-test has finished: fine
        raise ServiceUnavailableError("the model is still loading; retry shortly", headers=state.retry_after)
    return state


ReadyState = Annotated[AppState, Depends(_require_ready)]


def _add_routes(app: FastAPI, state: AppState) -> None:
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

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES, tags=["models"])
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != state.engine.model_name:
            raise NotFoundError(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return _model_card(state)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
        tags=["chat"],
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request, ready: ReadyState) -> Response:
        async with ready.admission.slot(estimate_chat_prompt_tokens(body), request) as slot:
            return slot.hold(await ready.chat.create(body, request))

    @app.post(
        "/v1/completions",
        response_model=Completion,
        responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
        tags=["completions"],
    )
    async def completions(body: CompletionRequest, request: Request, ready: ReadyState) -> Response:
        async with ready.admission.slot(estimate_completion_prompt_tokens(body), request) as slot:
            return slot.hold(await ready.completions.create(body, request))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES, tags=["tokenizer"])
    async def tokenize(body: TokenizeRequest, ready: ReadyState) -> Response:
        return await ready.tokenization.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES, tags=["tokenizer"])
    async def detokenize(body: DetokenizeRequest, ready: ReadyState) -> Response:
        return await ready.tokenization.detokenize(body)


def _model_card(state: AppState) -> dict[str, Any]:
    return {
        "id": state.engine.model_name,
        "object": "model",
        "created": state.started_at,
        "owned_by": "google",
        "max_model_len": state.engine.max_model_len,
    }


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> Response:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return _error_response(validation_error_to_api_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        error: APIError
        if exc.status_code == 404:
            error = NotFoundError("no such route")
        elif exc.status_code == 405:
            error = MethodNotAllowedError("method not allowed on this route")
        elif exc.status_code < 500:
            error = BadRequestError(str(exc.detail))
            error.status_code = exc.status_code
        else:
            error = APIError("internal error")
        return _error_response(error, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return _error_response(APIError("internal error"))


def _error_response(error: APIError, extra_headers: Mapping[str, str] | None = None) -> Response:
    headers = {**error.headers, **(extra_headers or {})}
    return Response(error.to_json(), status_code=error.status_code, media_type="application/json", headers=headers)


class MetricsMiddleware:
    """Counts every HTTP request by route template and status, and times it to the last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.request_seconds.labels(label).observe(time.perf_counter() - started)
