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
from tests.support.vllm_peer import VllmPeer

TINY_MODEL_DIR = Path(os.path.expanduser("~/.cache/gemma-server/tiny-gemma3"))
SERVED_MODEL = "tiny-gemma3"
# Settings of the shared live server that differ from config/tiny.yaml, also given to the offline
# oracle so both build prompts alike: detail high/auto run Gemma 3's pan-and-scan.
LIVE_SERVER_SETTINGS_ENV = {"GEMMA_SERVER_IMAGES__PAN_AND_SCAN": "true"}


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
            env={**os.environ, **LIVE_SERVER_SETTINGS_ENV},
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
def vllm_peer_process(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmPeer]:
    """vLLM's own OpenAI server on the tiny model, started early so it overlaps the server's start."""
    peer = VllmPeer(tiny_model_dir, SERVED_MODEL, tmp_path_factory.mktemp("vllm-peer") / "peer.log").start()
    yield peer
    peer.stop()


@pytest.fixture(scope="session")
def vllm_peer(vllm_peer_process: VllmPeer) -> str:
    """The base URL of vLLM's server, once it answers."""
    vllm_peer_process.wait_ready()
    print(f"\nvLLM's server ready in {vllm_peer_process.ready_after:.1f} s (log: {vllm_peer_process.log_path})")
    return vllm_peer_process.base_url


@pytest.fixture(scope="session")
def live_server(
    tiny_model_dir: Path,
    image_host: ImageHost,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[LiveServer]:
    """The server on the tiny model, reachable image host allow-listed (private networks otherwise off).

    The references the selected tests need (the offline oracle, vLLM's server) start first, so their
    start-up overlaps ours; the others are not started at all (each engine costs 3-5 GB of RAM).
    """
    selected = {name for item in request.session.items for name in item.fixturenames}
    if "oracle_results" in selected:
        request.getfixturevalue("offline_oracle_process")
    if "vllm_peer" in selected:
        request.getfixturevalue("vllm_peer_process")
    log_path = tmp_path_factory.mktemp("live-server") / "server.log"
    env = {
        "GEMMA_SERVER_IMAGES__PRIVATE_NETWORK_ALLOWLIST": f'["127.0.0.1:{image_host.port}"]',
        "GEMMA_SERVER_SERVER__LOG_LEVEL": "info",
        **LIVE_SERVER_SETTINGS_ENV,
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
