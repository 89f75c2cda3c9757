"""Child processes of the benchmark: start with a timestamped log, watch CPU time, stop the whole group.

Every line a target writes is stamped with the time (since the process was started) at which the
harness read it, so the start-up breakdown uses one clock for our logs, vLLM's logs and the probes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass
class LogLine:
    at: float  # seconds since the process was started
    text: str


@dataclass
class Child:
    """A process group started by the harness, with its output captured line by line."""

    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    lines: list[LogLine] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env={**os.environ, **(self.env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches the engine's children
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with self.log_path.open("w") as log:
            for raw in self.process.stdout:
                at = time.monotonic() - self.started
                text = raw.decode(errors="replace").rstrip("\n")
                self.lines.append(LogLine(at, text))
                log.write(f"[{at:8.3f}] {text}\n")
                log.flush()

    def since_start(self) -> float:
        return time.monotonic() - self.started

    def first(self, pattern: str) -> tuple[float, re.Match[str]] | None:
        """The first log line matching `pattern`: when it was read, and the match."""
        regex = re.compile(pattern)
        for line in list(self.lines):
            match = regex.search(line.text)
            if match:
                return line.at, match
        return None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, count: int = 30) -> str:
        return "\n".join(line.text for line in self.lines[-count:])

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the group, then SIGKILL what is left (engine cores included)."""
        if self.process is None:
            return
        pgid = self.process.pid
        members = _group_members(pgid)
        if self.process.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        _signal_group(pgid, signal.SIGKILL)
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
                member.wait(5)
        if self.process.poll() is None:
            self.process.wait(10)
        if self._reader is not None:
            self._reader.join(5)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def role_of(proc: psutil.Process, root_pid: int) -> str:
    """A short name for a process of a target: the API server, the engine core, its worker..."""
    if proc.pid == root_pid:
        return "api"
    try:
        name = proc.name()
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    if "ApiServer" in name or "ApiServer" in cmdline:  # one of several API processes
        return "api"
    if "EngineCore" in name or "EngineCore" in cmdline:
        return "engine-core"
    if "Worker" in name or "Worker" in cmdline:
        return "engine-worker"
    if "spawn_main" in cmdline or "multiprocessing" in cmdline:
        return "engine-worker"
    return name or "other"


def cpu_by_role(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by a process and its descendants, by role."""
    totals: dict[str, float] = {}
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return totals
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        role = role_of(proc, root_pid)
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: after[role] - before.get(role, 0.0) for role in after}
