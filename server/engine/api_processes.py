"""Several API processes sharing one vLLM engine core (`server.api_processes` > 1).

One Python process spends most of its CPU on HTTP, JSON, image decoding, the multimodal processor,
tokenization and detokenization, all under one GIL: on a big GPU the front end, not the engine,
becomes the limit. This is vLLM's own answer (`vllm serve --api-server-count N`), driven with our
app in each API process:

    supervisor (this module, the process the orchestrator starts)
      |-- engine core process       launch_core_engines: the model, KV cache, scheduler
      |-- API process 0 .. N-1      each: uvicorn + our app; its AsyncLLM a client of the core

The supervisor binds the listening socket and the engine's ZMQ sockets, then starts the engine core
and the API processes together (they answer /health while the model loads). Connections are
accepted by the least loaded API process (vLLM's `NoSignalServer` and its shared load array), so a
few keep-alive clients still spread out. Each API process runs the ordinary single-process server
(`lifecycle.run_server`): its own self-test, readiness, drain and exit code.

What the supervisor adds:
- SIGTERM is passed to every API process, each drains as one server would; the engine core is shut
  down after the last one has exited. SIGINT, or a second SIGTERM, stops without draining.
- If the engine core dies, the API processes are told through a pipe (vLLM only watches an engine
  core it spawned itself): open requests end with an error, each API process exits 4. The pipe also
  closes if the supervisor itself dies, so no API process outlives it.
- If an API process fails, the others are drained and the supervisor exits with its code: the
  orchestrator restarts the whole set, as it would one process.
- The admission bounds (in flight, waiting) are over all the processes: they share the counts in
  shared memory (`AdmissionCounts.shared()`). Prometheus runs in multi-process mode, so any
  process's /metrics shows the sum over all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import tempfile
import threading
from multiprocessing import connection
from types import FrameType
from typing import Any

from server.lifecycle import DrainingServer, ExitCode, exit_now, run_server
from server.pipeline.admission import AdmissionCounts
from server.settings import Settings

log = logging.getLogger(__name__)

# On shutdown, how long API processes get beyond the drain window before they are killed.
EXIT_MARGIN_SECONDS = 20


@dataclasses.dataclass
class _ApiProcessArgs:
    """What every API process receives (vLLM's process manager hands one `args` to all)."""

    settings: Settings
    supervisor_alive: connection.Connection  # EOF: the engine core or the supervisor is gone
    admission_counts: AdmissionCounts  # shared by all API processes: the admission bounds are over their sum


def serve_api_processes(settings: Settings) -> int:
    """The supervisor: starts the engine core and the API processes, returns the exit code."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.utils import bind_engine_zmq_listeners, launch_core_engines
    from vllm.v1.executor import Executor
    from vllm.v1.metrics.prometheus import setup_multiprocess_prometheus
    from vllm.v1.utils import APIServerProcessManager

    from server.engine.vllm_engine import engine_args_from_settings

    count = settings.server.api_processes
    if settings.model.build_tiny_if_missing:  # the engine core reads the checkpoint's config at launch
        from server import tiny_model

        tiny_model.build_tiny_model(settings.model.resolved_path)  # returns at once once built
    # Before any API process starts: prometheus_client picks file-backed values at import.
    metrics_dir = None
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Ours, not vLLM's (whose temporary directory is removed by an exit hook that `exit_now` skips).
        metrics_dir = tempfile.TemporaryDirectory(prefix="gemma-server-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
    setup_multiprocess_prometheus()  # type: ignore[no-untyped-call]
    engine_args = engine_args_from_settings(settings)
    engine_args._api_process_count = count
    engine_args._api_process_rank = -1
    vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)

    host, port = settings.server.host, settings.server.port
    sock = socket.create_server((host, port), reuse_port=False)
    zmq_listeners = bind_engine_zmq_listeners(vllm_config, count)
    alive_reader, alive_writer = connection.Pipe(duplex=False)
    supervisor = _Supervisor(settings)
    supervisor.install_signal_handlers()
    log.info("starting the engine core and %d API processes on http://%s:%d", count, host, port)
    launch = None
    try:
        with launch_core_engines(
            vllm_config, Executor.get_class(vllm_config), not engine_args.disable_log_stats, zmq_listeners.addresses
        ) as launch:
            coordinator = launch.coordinator
            manager = APIServerProcessManager(
                listen_address=f"http://{host}:{port}",
                sock=sock,
                args=_ApiProcessArgs(settings, alive_reader, AdmissionCounts.shared()),  # type: ignore[arg-type]
                num_servers=count,
                input_listeners=zmq_listeners.inputs,
                output_listeners=zmq_listeners.outputs,
                target_server_fn=run_api_process,
                stats_update_address=coordinator.get_stats_publish_address() if coordinator else None,
                tensor_queue=launch.tensor_queue,
            )
            supervisor.api_processes = manager.processes
            # vLLM's start-up wait (on leaving this block) fails fast if an API process dies meanwhile.
            launch.watched_frontend_processes = manager.processes
        sock.close()  # the API processes have their own copies
        engine_processes = getattr(launch.engine_manager, "processes", [])  # local engine cores only
        return supervisor.supervise(engine_processes, alive_writer)
    except _StopDuringStartup:
        return supervisor.exit_code
    except RuntimeError as exc:  # vLLM's start-up wait: the engine core or an API process failed
        log.critical("start-up failed: %s", exc)
        return ExitCode.ENGINE_STARTUP_FAILED
    finally:
        alive_writer.close()  # API processes still running learn that the engine core is going away
        supervisor.stop_api_processes()
        if launch is not None and launch.engine_manager:
            launch.engine_manager.shutdown()
        if launch is not None and launch.coordinator:
            launch.coordinator.shutdown()
        if metrics_dir is not None:
            metrics_dir.cleanup()
        log.info("engine core and API processes stopped")


class _StopDuringStartup(BaseException):
    """SIGTERM/SIGINT before the engine core was up: vLLM's start-up wait is left at once."""


class _Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.api_processes: list[Any] = []
        self.supervising = False
        self.stopping = False
        self.exit_code = 0

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        first = not self.stopping
        self.stopping = True
        # The first SIGTERM drains; SIGINT or a second SIGTERM stops the API processes at once.
        forward = signal.SIGTERM if first and sig == signal.SIGTERM else signal.SIGINT
        action = "draining" if forward == signal.SIGTERM else "stopping"
        log.info("%s: %s %d API process(es)", signal.Signals(sig).name, action, len(self.api_processes))
        self._signal_api_processes(forward)
        if not self.supervising:
            raise _StopDuringStartup

    def _signal_api_processes(self, sig: int) -> None:
        for process in self.api_processes:
            if process.exitcode is None and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    def supervise(self, engine_processes: list[Any], alive_writer: connection.Connection) -> int:
        """Waits until every API process has exited; returns the exit code for the whole set."""
        self.supervising = True
        if self.stopping:  # a signal came just before supervising began
            return self.exit_code
        waiting = {process.sentinel: process for process in self.api_processes}
        engine = {process.sentinel: process for process in engine_processes}
        log.info("engine core up; supervising %d API processes", len(waiting))
        while waiting:
            for sentinel in connection.wait([*waiting, *engine]):
                if sentinel in engine:
                    self._engine_core_died(engine.pop(sentinel), alive_writer)
                    engine.clear()  # one death stops the set; no need to hear of the others
                    continue
                process = waiting.pop(sentinel)
                process.join(timeout=5)  # the sentinel can fire a moment before the exit status exists
                code = process.exitcode
                if code == -signal.SIGTERM and self.stopping:
                    code = 0  # stopped by the SIGTERM passed on before it could install its own handler
                if code != 0 and self.exit_code == 0:
                    log.error("API process %s exited with code %s: stopping the others", process.name, code)
                    self.exit_code = code if code and code > 0 else 1
                if code != 0 and not self.stopping:
                    self.stopping = True
                    self._signal_api_processes(signal.SIGTERM)
        return self.exit_code

    def _engine_core_died(self, process: Any, alive_writer: connection.Connection) -> None:
        process.join(timeout=1)
        log.critical("engine core %s died with exit code %s", process.name, process.exitcode)
        if self.exit_code == 0:
            self.exit_code = ExitCode.ENGINE_DIED
        self.stopping = True
        alive_writer.close()  # each API process ends its open requests and exits

    def stop_api_processes(self) -> None:
        """Waits for the API processes to exit (their drain included), killing those that do not.

        After `supervise` they have all exited; after a failed or interrupted start-up, those still
        running get a SIGTERM first."""
        self._signal_api_processes(signal.SIGTERM)
        deadline_seconds = self.settings.server.drain_timeout_seconds + EXIT_MARGIN_SECONDS
        for process in self.api_processes:
            process.join(timeout=deadline_seconds)
            if process.exitcode is None:
                log.warning("API process %s did not exit in time: killing it", process.name)
                process.kill()
                process.join(timeout=5)


# ---- one API process ---------------------------------------------------------------------------


def run_api_process(
    listen_address: str, sock: socket.socket, args: _ApiProcessArgs, client_config: dict[str, Any]
) -> None:
    """Entry point of one API process (spawned by vLLM's `APIServerProcessManager`)."""
    from vllm.utils.system_utils import set_process_title

    from server.engine.vllm_engine import VllmEngine
    from server.logging_setup import configure_logging

    settings = args.settings
    configure_logging(settings.server.log_level, settings.server.log_format)
    index, count = client_config["client_index"], client_config["client_count"]
    set_process_title("ApiServer", str(index), prefix="gemma-server")  # ps shows gemma-server::ApiServer_0
    peer_loads = (client_config.pop("api_server_loads"), index) if "api_server_loads" in client_config else None
    engine = VllmEngine(settings, shared_core=client_config)
    threading.Thread(
        target=_watch_supervisor, args=(args.supervisor_alive, engine), name="supervisor-watch", daemon=True
    ).start()
    log.info("API process %d of %d (%s) starting", index, count, listen_address)
    code = _serve_on_shared_socket(settings, engine, sock, peer_loads, args.admission_counts)
    exit_now(code)


def _serve_on_shared_socket(
    settings: Settings, engine: Any, sock: socket.socket, peer_loads: Any, admission_counts: AdmissionCounts
) -> int:
    import uvicorn
    from vllm.entrypoints.launchers.launcher import NoSignalServer

    class SharedSocketServer(DrainingServer, NoSignalServer):
        """Accepts from the shared socket when least loaded (vLLM's NoSignalServer) and keeps the
        drain's signal handling (DrainingServer's handlers, not NoSignalServer's none)."""

        capture_signals = uvicorn.Server.capture_signals

        def __init__(self, config: Any, **kwargs: Any) -> None:
            super().__init__(config, **kwargs)
            self.peer_loads = peer_loads

    return run_server(
        settings,
        engine=engine,
        sockets=[sock],
        server_factory=SharedSocketServer,
        shared_admission_counts=admission_counts,
    )


def _watch_supervisor(alive: connection.Connection, engine: Any) -> None:
    """Blocks until the supervisor closes the pipe (engine core dead, or supervisor gone)."""
    with contextlib.suppress(EOFError, OSError):
        alive.recv()
    if not engine.engine_core_died():
        # Not attached to the engine core yet: nothing would ever fail, so stop instead of waiting.
        os.kill(os.getpid(), signal.SIGTERM)
