"""The supervisor of several API processes (`server/engine/api_processes.py`), with real child processes.

The children here are small stand-ins that behave as an API process does at its edges (drain on
SIGTERM and exit 0; exit 4 when the supervisor's pipe closes), so the supervisor's decisions are
checked in seconds: the whole set on a real engine is tested live in tests/integration/test_faults.py.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from multiprocessing import connection
from typing import Any

import pytest

from server.engine.api_processes import _Supervisor
from server.lifecycle import ExitCode
from tests.support.fake_engine import fake_settings

SPAWN = multiprocessing.get_context("spawn")


def _api_process_stand_in(
    alive: connection.Connection, exit_code: int, after_seconds: float | None, started: Any = None
) -> None:
    """Drains for 0.2 s on SIGTERM and exits 0; exits 4 when the pipe closes; or exits `exit_code`
    after `after_seconds` by itself."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if started is not None:
        started.release()

    def watch_pipe() -> None:
        try:
            alive.recv()
        except EOFError:
            os._exit(ExitCode.ENGINE_DIED)

    threading.Thread(target=watch_pipe, daemon=True).start()
    if stop.wait(after_seconds):
        time.sleep(0.2)  # the drain
        os._exit(0)
    os._exit(exit_code)


def _engine_stand_in(seconds: float) -> None:
    time.sleep(seconds)
    os._exit(1)


def _start(target: Any, *args: Any) -> Any:
    process = SPAWN.Process(target=target, args=args, daemon=True)
    process.start()
    return process


@pytest.fixture
def pipe() -> Any:
    reader, writer = connection.Pipe(duplex=False)
    yield reader, writer
    reader.close()
    writer.close()


def _supervisor(children: list[Any]) -> _Supervisor:
    supervisor = _Supervisor(fake_settings(server={"drain_timeout_seconds": 5}))
    supervisor.api_processes = children
    return supervisor


def _supervise_and_send_sigterm(supervisor: _Supervisor, engine: Any, writer: connection.Connection) -> int:
    """Supervises with the real signal handlers while this process gets a SIGTERM after 0.5 s."""
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    supervisor.install_signal_handlers()
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return supervisor.supervise([engine], writer)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        engine.kill()


def test_sigterm_drains_every_api_process_and_exits_zero(pipe: Any) -> None:
    reader, writer = pipe
    started = SPAWN.Semaphore(0)
    children = [_start(_api_process_stand_in, reader, 9, None, started) for _ in range(3)]
    engine = _start(_engine_stand_in, 60)
    for _ in children:  # each has its SIGTERM handler (a SIGTERM before it is tested below)
        assert started.acquire(timeout=60)
    code = _supervise_and_send_sigterm(_supervisor(children), engine, writer)
    assert code == 0
    assert [child.exitcode for child in children] == [0, 0, 0]


def test_an_api_process_stopped_by_the_passed_on_sigterm_before_its_handler_is_a_clean_stop(pipe: Any) -> None:
    _, writer = pipe
    child = SPAWN.Process(target=time.sleep, args=(60,), daemon=True)  # no handler: SIGTERM kills it
    child.start()
    engine = _start(_engine_stand_in, 60)
    code = _supervise_and_send_sigterm(_supervisor([child]), engine, writer)
    assert child.exitcode == -signal.SIGTERM
    assert code == 0


def test_a_failed_api_process_drains_the_others_and_its_code_is_the_exit_code(pipe: Any) -> None:
    reader, writer = pipe
    started = SPAWN.Semaphore(0)
    others = [_start(_api_process_stand_in, reader, 9, None, started) for _ in range(2)]
    for _ in others:  # a SIGTERM before a stand-in's handler kills it (-15): a slow spawn, not a bug
        assert started.acquire(timeout=60)
    failing = _start(_api_process_stand_in, reader, 3, 1.0)
    engine = _start(_engine_stand_in, 60)
    try:
        code = _supervisor([failing, *others]).supervise([engine], writer)
    finally:
        engine.kill()
    assert code == 3
    assert failing.exitcode == 3
    assert [child.exitcode for child in others] == [0, 0]  # drained (SIGTERM), not killed


def test_engine_core_death_closes_the_pipe_and_the_set_exits_4(pipe: Any) -> None:
    reader, writer = pipe
    children = [_start(_api_process_stand_in, reader, 9, None) for _ in range(2)]
    engine = _start(_engine_stand_in, 1.0)
    code = _supervisor(children).supervise([engine], writer)
    assert code == ExitCode.ENGINE_DIED
    assert [child.exitcode for child in children] == [ExitCode.ENGINE_DIED] * 2  # told through the pipe
