"""Looking at a live server from outside: its resident memory, its metrics, and raw HTTP exchanges."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import httpx
import psutil

MB = 2**20


def rss_mb(pid: int) -> float:
    """Resident memory of the API server process (the engine core is a separate process)."""
    return psutil.Process(pid).memory_info().rss / MB


@contextmanager
def peak_rss(pid: int, interval: float = 0.02) -> Iterator[dict[str, float]]:
    """Samples the process's RSS while the block runs: {"before", "peak", "after"} in MiB."""
    result = {"before": rss_mb(pid), "peak": 0.0, "after": 0.0}
    result["peak"] = result["before"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], rss_mb(pid))
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result["after"] = rss_mb(pid)
        result["peak"] = max(result["peak"], result["after"])


def metric_in(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The sum of the samples of `name` (with these labels, if given) in a /metrics page; None if
    there are none."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#") or not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if labels and not all(f'{key}="{value}"' in line for key, value in labels.items()):
            continue
        total += float(line.rsplit(" ", 1)[1])
        found = True
    return total if found else None


def metric(
    base_url: str, name: str, labels: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> float:
    """The sum of the samples of `name` (with these labels, if given) on /metrics."""
    total = metric_in(httpx.get(f"{base_url}/metrics", headers=headers, timeout=30).text, name, labels)
    if total is None and labels is None:
        raise AssertionError(f"{name} is not on /metrics")
    return total or 0.0


def wait_for(condition, timeout: float, interval: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def raw_exchange(port: int, chunks: Iterable[bytes], timeout: float = 20) -> tuple[bytes, int, bool]:
    """Sends `chunks` on one connection, reading whatever the server answers as soon as it does.

    Stops sending once the server has answered (or closed). Returns (response bytes, bytes sent,
    whether the server closed the connection)."""
    sent = 0
    response = b""
    closed = False
    deadline = time.monotonic() + timeout
    pending = iter(chunks)
    buffer = next(pending, b"")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setblocking(False)
        while time.monotonic() < deadline and not closed:
            sending = bool(buffer) and not response
            readable, writable, _ = select.select([sock], [sock] if sending else [], [], 0.5)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed = True
                    break
                response += data
                if _complete(response):
                    # Did the server close after answering? Give it a moment to say so.
                    more = select.select([sock], [], [], 1.0)[0]
                    closed = bool(more) and _eof(sock)
                    break
            if writable:
                try:
                    count = sock.send(buffer)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                sent += count
                buffer = buffer[count:] or next(pending, b"")
    return response, sent, closed


def _eof(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BlockingIOError):
        return True


def _complete(response: bytes) -> bool:
    if b"\r\n\r\n" not in response:
        return False
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False
