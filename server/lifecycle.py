"""The process's lifetime: its exit codes, signals, the drain, and the exit itself.

The first SIGTERM drains: readiness fails at once (a flag, set in the signal handler itself), then
`drain` refuses new and waiting work with 503 + Retry-After, lets in-flight requests run for
`server.drain_timeout_seconds`, aborts what is left, and only then asks uvicorn to exit (which
closes the listener, waits `GRACEFUL_SHUTDOWN_SECONDS` for connections, and shuts the engine down).
SIGINT, or a second SIGTERM, stops without waiting for the drain.

uvicorn re-raises the signal it caught once it has shut down, so a SIGTERM'd server died with -15
whatever happened; `DrainingServer` does not, so the exit code is the one `run_server` returns
(`ExitCode`: 0 after a drain, non-zero after an engine failure), and `exit_now` ends the process with
it. With several API processes, `server/engine/api_processes.py` runs one of these per process and
its supervisor exits with the same codes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import uvicorn

from server.app import AppState, Fatal, create_app

if TYPE_CHECKING:
    from server.engine.interface import EngineClient
    from server.pipeline.admission import AdmissionCounts
    from server.settings import Settings

log = logging.getLogger(__name__)

# uvicorn's wait for open connections after the drain (or after a fatal engine error).
GRACEFUL_SHUTDOWN_SECONDS = 10
# After the drain window, aborted requests get this long to send their error before the exit.
ABORT_GRACE_SECONDS = 5.0


class ExitCode(enum.IntEnum):
    """What the server process exits with; an orchestrator restarts it on anything but OK."""

    OK = 0  # stopped, after a drain if SIGTERM asked for one
    FAILED = 1  # the server could not start serving (e.g. the port was taken)
    INVALID_CONFIGURATION = 2
    ENGINE_STARTUP_FAILED = 3  # the engine did not come up (or failed its self-test) in time
    ENGINE_DIED = 4


EXIT_CODE_OF = {Fatal.ENGINE_STARTUP_FAILED: ExitCode.ENGINE_STARTUP_FAILED, Fatal.ENGINE_DIED: ExitCode.ENGINE_DIED}


async def drain(state: AppState) -> None:
    """The SIGTERM path: refuse new and waiting work (503 + Retry-After), let in-flight requests
    finish within `server.drain_timeout_seconds`, then abort the rest in the engine (streams end with
    their protocol's error event). Returns when nothing is in flight (or the grace ran out)."""
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


def exit_now(code: int) -> NoReturn:
    """Ends the server process once everything is closed (the engine processes are stopped by then).

    The interpreter's own teardown of torch and vLLM took a further 10 s or more on a busy 2-core
    machine: time an orchestrator counts against the grace period for nothing."""
    log.info("exiting with code %d", code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


ServerFactory = Callable[..., "DrainingServer"]


def run_server(
    settings: Settings,
    *,
    engine: EngineClient | None = None,
    sockets: list[socket.socket] | None = None,
    server_factory: ServerFactory | None = None,
    shared_admission_counts: AdmissionCounts | None = None,
) -> int:
    """Serves the app until SIGTERM's drain ends or the engine fails; returns the exit code.

    Without arguments: one process, listening on `server.host:server.port`, the engine in it. An API
    process of `server.api_processes` passes its engine client, the shared listening socket, a
    server class that accepts from it and the admission counts shared with its siblings
    (`server/engine/api_processes.py`)."""
    exit_code = ExitCode.OK
    server: DrainingServer | None = None

    def on_fatal(fatal: Fatal, reason: str) -> None:
        nonlocal exit_code
        exit_code = EXIT_CODE_OF[fatal]
        log.critical("%s: shutting down with exit code %d", reason, exit_code)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, engine=engine, on_fatal=on_fatal, shared_admission_counts=shared_admission_counts)
    state = app.state.gemma
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        access_log=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        http=http_protocol(settings.server.max_header_bytes, settings.server.max_header_count),
        h11_max_incomplete_event_size=settings.server.max_header_bytes,
    )
    factory = server_factory or DrainingServer
    server = factory(config, begin_draining=state.begin_draining, drain=lambda: drain(state))
    if sockets is None:
        log.info("serving %s on http://%s:%d", settings.model.served_name, settings.server.host, settings.server.port)
    server.run(sockets=sockets)
    if exit_code == ExitCode.OK and not server.started:
        return ExitCode.FAILED
    return exit_code


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        *,
        begin_draining: Callable[[], None],
        drain: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(config)
        self._begin_draining = begin_draining
        self._drain = drain
        self.draining = False
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes of the event loop: set flags, schedule work.
        if sig == signal.SIGTERM and not self.draining and not self.should_exit and self._loop is not None:
            log.info("SIGTERM: draining")
            self.draining = True
            self._begin_draining()  # readiness fails from this instant
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True  # unlike uvicorn, the signal is not recorded to be re-raised

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        except Exception:
            log.exception("drain failed")
        finally:
            self.should_exit = True


def http_protocol(max_header_bytes: int, max_header_count: int) -> Any:
    """httptools with a bounded request head; h11 (bounded by its own option) without httptools."""
    try:
        from server.edge.limits import header_limited_httptools_protocol

        return header_limited_httptools_protocol(max_header_bytes, max_header_count)
    except ImportError:
        return "h11"
