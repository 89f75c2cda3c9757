"""The live tier's machinery, registered by the root conftest (`pytest_plugins`): one live server for
the session, the references it is compared with (vLLM's offline `LLM.chat`, the "oracle", and vLLM's
own OpenAI server, the "peer"), the sacrificial servers that tests stop or break, the measured
figures, and the machine's memory and CPU stall reports. Fixtures start nothing until a test asks
for them, so a run of the fast tier (tests/unit) starts no engine and reads no kernel log.

Tests that stop or break a server use `sacrificial` servers of their own: started in the background
one at a time, the first once the offline oracle has exited and vLLM's server is stopped. Tests
marked `late(n)` run after all the others, in the order of n (the root conftest sorts them), so the
sacrificial servers start while the ordinary tests run.

Memory is the constraint: one server on the tiny model holds about 7 GB (API process 2.6, engine
core 1.6, worker 2.3), and the machine has 24 GB and no swap; three at once left little room. So
servers are stopped after the last test that uses them (`after_last_use`), and no more than two run
at once after start-up. Once a live process has started, the run's memory-pressure stall (Linux
PSI) is printed with the measured figures, and so are the kernel's reports of CPUs frozen for 30 s
or more, which this machine (a VM) has under sustained load: tests that wait leave room for such
stalls.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.tiny_adapter import tiny_adapter_dir
from tests.support.image_host import ImageHost
from tests.support.live_server import ROOT, SERVED_MODEL, LiveServer
from tests.support.oracle_cases import LORA_ADAPTERS, LORA_MAX_RANK
from tests.support.postgres import PostgresServer, running_postgres
from tests.support.vllm_peer import VllmPeer

# Settings of the shared live server that differ from config/tiny.yaml, also given to the offline
# oracle so both build prompts alike: detail high/auto run Gemma 3's pan-and-scan; the two tiny LoRA
# adapters are served (the engine runs with LoRA on, as a deployment with adapters does).
LORA_ADAPTERS_SETTING = json.dumps([{"name": name, "path": str(tiny_adapter_dir(name))} for name in LORA_ADAPTERS])
LIVE_SERVER_SETTINGS_ENV = {
    "GEMMA_SERVER_IMAGES__PAN_AND_SCAN": "true",
    "GEMMA_SERVER_LORA__ADAPTERS": LORA_ADAPTERS_SETTING,
    "GEMMA_SERVER_LORA__MAX_LORAS": str(len(LORA_ADAPTERS)),
    "GEMMA_SERVER_LORA__MAX_LORA_RANK": str(LORA_MAX_RANK),
}


_AFTER_LAST_USE: dict[str, list[Callable[[], object]]] = {}


def after_last_use(fixture: str, action: Callable[[], object]) -> None:
    """Runs `action` once no remaining test of the session uses `fixture` (directly or not)."""
    _AFTER_LAST_USE.setdefault(fixture, []).append(action)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if not _AFTER_LAST_USE:
        return
    remaining = item.session.items[item.session.items.index(item) + 1 :]
    for fixture in list(_AFTER_LAST_USE):
        if not any(fixture in getattr(later, "fixturenames", ()) for later in remaining):
            for action in _AFTER_LAST_USE.pop(fixture):
                action()


@pytest.fixture(scope="session")
def offline_oracle_process(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """vLLM's offline LLM.chat on the oracle cases, started early so it overlaps the server's start."""
    folder = tmp_path_factory.mktemp("oracle")
    out_path, log_path = folder / "oracle.json", folder / "oracle.log"
    live_process_starting()
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


def _selected(request: pytest.FixtureRequest, fixture: str) -> bool:
    """Whether any test of this run uses `fixture` (directly or through other fixtures)."""
    return any(fixture in getattr(item, "fixturenames", ()) for item in request.session.items)


@pytest.fixture(scope="session")
def vllm_peer_process(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmPeer]:
    """vLLM's own OpenAI server on the tiny model (and its adapters: `--lora-modules`), started early
    so it overlaps the server's start."""
    live_process_starting()
    log_path = tmp_path_factory.mktemp("vllm-peer") / "peer.log"
    peer = VllmPeer(tiny_model_dir, SERVED_MODEL, log_path, lora=(tiny_adapters, LORA_MAX_RANK)).start()
    after_last_use("vllm_peer", peer.stop)
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
    request: pytest.FixtureRequest,
    tiny_model_dir: Path,
    tiny_adapters: dict[str, Path],
    image_host: ImageHost,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """The server on the tiny model, reachable image host allow-listed (private networks otherwise off).

    The references the selected tests need (the offline oracle, vLLM's server) start first, so their
    start-up overlaps ours; the others are not started at all (each engine costs 3-5 GB of RAM).
    """
    if _selected(request, "oracle_results"):
        request.getfixturevalue("offline_oracle_process")
    if _selected(request, "vllm_peer"):
        request.getfixturevalue("vllm_peer_process")
    log_path = tmp_path_factory.mktemp("live-server") / "server.log"
    env = {
        "GEMMA_SERVER_IMAGES__PRIVATE_NETWORK_ALLOWLIST": f'["127.0.0.1:{image_host.port}"]',
        "GEMMA_SERVER_SERVER__LOG_LEVEL": "info",
        # 60 s, not 10: the soak's 500 URL images must not fail when this machine stalls (see below).
        "GEMMA_SERVER_IMAGES__FETCH_TIMEOUT_SECONDS": "60",
        "GEMMA_SERVER_IMAGES__FETCH_CONNECT_TIMEOUT_SECONDS": "30",
        "GEMMA_SERVER_IMAGES__FETCH_READ_TIMEOUT_SECONDS": "30",
        # Stored responses in a file of this run (the embedded default's SQLite backend); the
        # sacrificial servers use a PostgreSQL.
        "GEMMA_SERVER_RESPONSES__URL": f"sqlite:///{log_path.parent / 'responses.db'}",
        **LIVE_SERVER_SETTINGS_ENV,
    }
    live_process_starting()
    server = LiveServer(log_path, env).start()
    after_last_use("live_server", server.stop)
    try:
        server.wait_ready()
        print(f"\nlive server ready in {server.ready_after:.1f} s (log: {log_path})")
        if _selected(request, "sacrificial"):
            request.getfixturevalue("sacrificial")  # starts the first one in the background
        yield server
    finally:
        code = server.stop()
        print(f"\nlive server stopped with exit code {code}")


FAULT_KEY_ENV = "sk-fault-env-0123456789"
FAULT_KEY_FILE = "sk-fault-file-abcdefghij"
FAULT_ORIGIN = "https://app.example"
FAULT_CAPACITY = {"max_in_flight": 10, "max_waiting": 6}
FAULT_DRAIN_SECONDS = 20
FAULT_MAX_MODEL_LEN = 131072  # Gemma 3's full context: "long" requests last over ten minutes
# Scoped keys of the drain server (tests/slow/test_lora_runtime.py): one for adapter a only, one admin.
LORA_SCOPED_KEY = "sk-lora-a-only-0123456789"
LORA_ADMIN_KEY = "sk-lora-admin-0123456789"
# The engine-death server runs two API processes: engine death is the supervisor's hardest case
# (and runtime adapter loading needs one API process). It also coalesces streamed tokens by four
# (tests/slow/test_coalescing.py).
SACRIFICIAL_SERVER_ENV = {
    "engine_death": {
        "GEMMA_SERVER_SERVER__API_PROCESSES": "2",
        "GEMMA_SERVER_LORA__RUNTIME_LOADING": "false",
        "GEMMA_SERVER_SERVER__STREAM_INTERVAL": "4",
    }
}


class SacrificialServers:
    """Servers that tests stop or break, configured alike: small admission capacity (10 in flight,
    6 waiting), API keys (from the environment and from a file), CORS for one origin, a 20 s drain
    window, a small KV cache and one PostgreSQL database for stored responses. `launch(name)` starts
    one in the background; `ready(name)` waits."""

    def __init__(self, folder: Path, image_host: ImageHost, wanted: set[str], responses_url: str) -> None:
        self.folder = folder
        self.wanted = wanted  # servers some selected test uses (through a `<name>_server` fixture)
        key_file = folder / "api-keys"
        key_file.write_text(f"# keys, one per line\n{FAULT_KEY_FILE}\n")
        self.env = {
            "GEMMA_SERVER_IMAGES__PRIVATE_NETWORK_ALLOWLIST": f'["127.0.0.1:{image_host.port}"]',
            "GEMMA_SERVER_ADMISSION__MAX_IN_FLIGHT": str(FAULT_CAPACITY["max_in_flight"]),
            "GEMMA_SERVER_ADMISSION__MAX_WAITING": str(FAULT_CAPACITY["max_waiting"]),
            "GEMMA_SERVER_ADMISSION__RETRY_AFTER_SECONDS": "2",
            "GEMMA_SERVER_AUTH__API_KEYS": json.dumps([FAULT_KEY_ENV]),
            "GEMMA_SERVER_AUTH__API_KEYS_FILE": str(key_file),
            "GEMMA_SERVER_AUTH__CORS_ALLOW_ORIGINS": json.dumps([FAULT_ORIGIN]),
            "GEMMA_SERVER_SERVER__DRAIN_TIMEOUT_SECONDS": str(FAULT_DRAIN_SECONDS),
            "GEMMA_SERVER_ENGINE__KV_CACHE_MEMORY_BYTES": str(64 * 2**20),  # ~477k tokens of the tiny model
            # Room for requests that outlast the drain window (and a stalled test client): the tiny
            # model makes ~150-300 tokens/s per stream.
            "GEMMA_SERVER_ENGINE__MAX_MODEL_LEN": str(FAULT_MAX_MODEL_LEN),
            # Image fetches held open by the image host's /gate keep admission slots busy.
            "GEMMA_SERVER_IMAGES__FETCH_TIMEOUT_SECONDS": "120",
            "GEMMA_SERVER_IMAGES__FETCH_READ_TIMEOUT_SECONDS": "120",
            # Claude Code asks for Claude model names: any name means the served model here.
            "GEMMA_SERVER_MODEL__ACCEPT_ANY_NAME": "true",
            # Codex CLI sets no output limit: without this default its turn would run to the context's end.
            "GEMMA_SERVER_SERVER__DEFAULT_MAX_TOKENS": "48",
            # One PostgreSQL for both: the engine-death server starts after the drain server has
            # stopped, so it is that server restarted (and two replicas of it) for stored responses.
            "GEMMA_SERVER_RESPONSES__URL": responses_url,
            # The tiny adapters, runtime loading and keys scoped to names.
            **{k: v for k, v in LIVE_SERVER_SETTINGS_ENV.items() if k.startswith("GEMMA_SERVER_LORA__")},
            "GEMMA_SERVER_LORA__RUNTIME_LOADING": "true",
            "GEMMA_SERVER_AUTH__KEYS": json.dumps(
                [
                    {"sha256": hashlib.sha256(LORA_SCOPED_KEY.encode()).hexdigest(), "models": ["tiny-lora-a"]},
                    {"sha256": hashlib.sha256(LORA_ADMIN_KEY.encode()).hexdigest(), "admin": True},
                ]
            ),
        }
        self.servers: dict[str, LiveServer] = {}
        self._launchers: dict[str, threading.Thread] = {}

    def launch(self, name: str, after: subprocess.Popen[bytes] | None = None) -> None:
        """Starts server `name` in the background (once `after` has exited, if given)."""

        def start() -> None:
            if after is not None:
                after.wait()
            env = {**self.env, **SACRIFICIAL_SERVER_ENV.get(name, {})}
            live_process_starting()
            self.servers[name] = LiveServer(self.folder / f"{name}.log", env).start()

        if name in self.wanted and name not in self._launchers:
            self._launchers[name] = threading.Thread(target=start, daemon=True)
            self._launchers[name].start()

    def ready(self, name: str) -> LiveServer:
        assert name in self.wanted, f"use the {name}_server fixture"
        self.launch(name)
        self._launchers[name].join()
        server = self.servers[name].wait_ready()
        print(f"\nsacrificial server {name!r} ready in {server.ready_after:.1f} s")
        return server

    def stop_all(self) -> None:
        for launcher in self._launchers.values():
            launcher.join()
        for name, server in self.servers.items():
            print(f"\nsacrificial server {name!r} ended with exit code {server.stop(timeout=30)}")


@pytest.fixture(scope="session")
def sacrificial_postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL (Debian's package) for the sacrificial servers' stored responses."""
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def sacrificial(
    request: pytest.FixtureRequest,
    tiny_adapters: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    image_host: ImageHost,
    sacrificial_postgres: PostgresServer,
) -> Iterator[SacrificialServers]:
    wanted = {name for name in ("drain", "engine_death") if _selected(request, f"{name}_server")}
    folder = tmp_path_factory.mktemp("sacrificial")
    servers = SacrificialServers(folder, image_host, wanted, sacrificial_postgres.url)
    oracle = request.getfixturevalue("offline_oracle_process")[0] if _selected(request, "oracle_results") else None
    if _selected(request, "vllm_peer"):  # once the oracle's engine and vLLM's server are gone
        after_last_use("vllm_peer", lambda: servers.launch("drain", after=oracle))
    else:
        servers.launch("drain", after=oracle)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def drain_server(sacrificial: SacrificialServers) -> LiveServer:
    """The sacrificial server with a 128K context: the agent clients' tests, then the drain, use it."""
    return sacrificial.ready("drain")


@pytest.fixture(scope="session")
def engine_death_server(sacrificial: SacrificialServers) -> LiveServer:
    return sacrificial.ready("engine_death")


_FIGURES: list[str] = []


@pytest.fixture(scope="session")
def report() -> Callable[[str], None]:
    """Records a measured figure; all of them are printed at the end of the run (captured output
    of passing tests is not shown)."""
    return _FIGURES.append


def _memory_stall_seconds() -> dict[str, float]:
    """Since boot, the seconds in which some / all tasks waited on memory (Linux PSI); {} elsewhere."""
    try:
        lines = Path("/proc/pressure/memory").read_text().splitlines()
    except OSError:
        return {}
    return {line.split()[0]: int(line.rsplit("total=", 1)[1]) / 1e6 for line in lines}


def _kernel_cpu_stalls(since_boot_seconds: float) -> list[str]:
    """The kernel's reports of stalled CPUs (workqueue or soft lockups, RCU stalls) logged since then."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    reports = []
    for line in log.splitlines():
        stamped = re.match(r"\[\s*(\d+\.\d+)\]\s*(.*)", line)
        if stamped and float(stamped[1]) >= since_boot_seconds and re.search(r"lockup|rcu.*stall", stamped[2], re.I):
            reports.append(stamped[2])
    return reports


_STALLS_AT_START: dict[str, float] = {}
_SESSION_START_SINCE_BOOT: list[float] = []
_LIVE_STARTED: list[bool] = []


def live_process_starting() -> None:
    """Called before a live server, vLLM's server or the offline oracle starts: from the first one
    on, the run's memory-pressure stall and the kernel's CPU-stall reports are measured (a run that
    starts no engine, such as the fast tier, reads neither)."""
    if _LIVE_STARTED:
        return
    _LIVE_STARTED.append(True)
    _STALLS_AT_START.update(_memory_stall_seconds())
    with contextlib.suppress(OSError):
        _SESSION_START_SINCE_BOOT.append(float(Path("/proc/uptime").read_text().split()[0]))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    stalls = _memory_stall_seconds() if _STALLS_AT_START else {}
    if stalls:
        some, full = (stalls[kind] - _STALLS_AT_START[kind] for kind in ("some", "full"))
        _FIGURES.append(f"memory pressure over the run (Linux PSI): some tasks stalled {some:.1f} s, all {full:.1f} s")
    if _SESSION_START_SINCE_BOOT:
        # This machine (a VM) has frozen CPUs for 30-120 s under load: the kernel logs "workqueue
        # lockup"; a timing failure next to such reports is the machine's, the report says which.
        reports = _kernel_cpu_stalls(_SESSION_START_SINCE_BOOT[0])
        listed = "".join(f"\n  {report}" for report in reports)
        _FIGURES.append(f"kernel CPU stall reports during the run: {len(reports)}{listed}")
    if _FIGURES:
        terminalreporter.section("measured figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


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
