"""The first SIGTERM drains (and the exit code stays ours); SIGINT or a second SIGTERM stops now."""

from __future__ import annotations

import argparse
import asyncio
import signal

import pytest
import uvicorn

from server.lifecycle import DrainingServer


async def _app(scope: object, receive: object, send: object) -> None:  # pragma: no cover - never called
    raise AssertionError


def _server(events: list[str]) -> DrainingServer:
    async def drain() -> None:
        events.append("drain started")
        await asyncio.sleep(0.05)
        events.append("drain done")

    server = DrainingServer(uvicorn.Config(_app), begin_draining=lambda: events.append("not ready"), drain=drain)
    return server


async def test_sigterm_drains_first_then_asks_uvicorn_to_exit_without_re_raising() -> None:
    events: list[str] = []
    server = _server(events)
    server._loop = asyncio.get_running_loop()
    server.handle_exit(signal.SIGTERM, None)
    assert events == ["not ready"]  # at once, inside the signal handler
    assert not server.should_exit
    await asyncio.sleep(0.2)
    assert events == ["not ready", "drain started", "drain done"]
    assert server.should_exit and not server.force_exit
    assert server._captured_signals == []  # uvicorn would re-raise these: the process died with -15


async def test_a_second_sigterm_or_sigint_stops_without_waiting() -> None:
    events: list[str] = []
    server = _server(events)
    server._loop = asyncio.get_running_loop()
    server.handle_exit(signal.SIGTERM, None)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit
    server.handle_exit(signal.SIGINT, None)
    assert server.force_exit
    await asyncio.sleep(0.1)


def test_sigint_alone_exits_at_once() -> None:
    events: list[str] = []
    server = _server(events)
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and events == []


def test_without_a_device_for_vllm_serve_exits_3_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CUDA build on a machine without a GPU: vLLM detects no platform. The GPU image is run so
    for real in tests/gpu_image; here vLLM's detection is made to find nothing."""
    import vllm.platforms
    from vllm.platforms.interface import UnspecifiedPlatform

    from server import cli
    from server.lifecycle import ExitCode

    monkeypatch.setattr(vllm.platforms, "_current_platform", UnspecifiedPlatform())
    code = cli.serve(argparse.Namespace(config="config/tiny.yaml", host=None, port=None))
    assert code == ExitCode.ENGINE_STARTUP_FAILED
    err = capsys.readouterr().err  # vLLM's import may log before it, never a traceback
    ours = [line for line in err.splitlines() if line.startswith("gemma-server:")]
    assert len(ours) == 1 and ours[0].startswith("gemma-server: cannot start the engine: vLLM sees no GPU"), err
    assert "Traceback" not in err


def test_a_list_setting_given_as_plain_text_is_refused_with_the_json_form(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from server import cli
    from server.lifecycle import ExitCode

    monkeypatch.setenv("GEMMA_SERVER_AUTH__API_KEYS", "sk-plain")  # seen in a compose env file
    code = cli.serve(argparse.Namespace(config="config/tiny.yaml", host=None, port=None))
    assert code == ExitCode.INVALID_CONFIGURATION
    assert "lists and mappings are JSON, e.g. GEMMA_SERVER_AUTH__API_KEYS='[" in capsys.readouterr().err
