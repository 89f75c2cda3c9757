"""Shared fixtures: the tiny checkpoint, an image host, and one live server for the whole session.

A skipped test is a test that did not pass: the session fails if anything was skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.image_host import ImageHost
from tests.support.live_server import ROOT, LiveServer

TINY_MODEL_DIR = Path(os.path.expanduser("~/.cache/gemma-server/tiny-gemma3"))
SERVED_MODEL = "tiny-gemma3"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from server.tiny_model import build_tiny_model, is_complete

    if not is_complete(TINY_MODEL_DIR):
        build_tiny_model(TINY_MODEL_DIR)
    return TINY_MODEL_DIR


@pytest.fixture(scope="session")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost().start()
    yield host
    host.stop()


@pytest.fixture(scope="session")
def canary() -> Iterator[ImageHost]:
    """A listener on another loopback port that no image URL may ever reach (SSRF tests)."""
    host = ImageHost().start()
    yield host
    host.stop()


@pytest.fixture(scope="session")
def offline_oracle_process(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """vLLM's offline LLM.chat on the oracle cases, started early so it overlaps the server's start."""
    folder = tmp_path_factory.mktemp("oracle")
    out_path, log_path = folder / "oracle.json", folder / "oracle.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.offline_oracle", str(out_path)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    yield process, out_path, log_path
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@pytest.fixture(scope="session")
def oracle_results(offline_oracle_process: tuple[subprocess.Popen[bytes], Path, Path]) -> dict[str, dict]:
    process, out_path, log_path = offline_oracle_process
    code = process.wait(timeout=600)
    if code != 0:
        raise RuntimeError(f"the offline oracle failed ({code}):\n" + log_path.read_text(errors="replace")[-4000:])
    data = json.loads(out_path.read_text())
    print(f"\noffline oracle answered in {data['seconds']:.1f} s")
    return {result["name"]: result for result in data["results"]}


@pytest.fixture(scope="session")
def live_server(
    tiny_model_dir: Path,
    image_host: ImageHost,
    offline_oracle_process: object,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """The server on the tiny model, reachable image host allow-listed (private networks otherwise off)."""
    log_path = tmp_path_factory.mktemp("live-server") / "server.log"
    env = {
        "GEMMA_SERVER_IMAGES__PRIVATE_NETWORK_ALLOWLIST": f'["127.0.0.1:{image_host.port}"]',
        "GEMMA_SERVER_SERVER__LOG_LEVEL": "info",
    }
    server = LiveServer(log_path, env).start()
    try:
        server.wait_ready()
        print(f"\nlive server ready in {server.ready_after:.1f} s (log: {log_path})")
        yield server
    finally:
        code = server.stop()
        print(f"\nlive server stopped with exit code {code}")


@pytest.fixture(scope="session")
def base_url(live_server: LiveServer) -> str:
    return live_server.base_url


@pytest.fixture(scope="session")
def openai_client(base_url: str):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_openai_client(base_url: str):  # type: ignore[no-untyped-def]
    import openai

    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and exitstatus == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line(f"FAILED: {skipped} test(s) were skipped; a skipped test does not pass.", red=True)
