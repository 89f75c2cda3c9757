"""A local HTTP server that hosts test images (and misbehaves on purpose on some paths).

Paths: /img/<name> serves a registered image; /redirect?to=<url> answers 302; /status/<code>;
/html (a web page, not an image); /slow (drips bytes forever); /big (endless bytes);
/endless (a PNG signature, then endless bytes, no Content-Length); /gzip (a gzip-encoded body);
/gate/<name> (serves a registered image once the test opens `gate`: fetches that stay in flight).
Every request is recorded in `requests`, so SSRF tests can assert that a canary got nothing.

The server runs in its own process, so its answers do not wait for the GIL of the pytest process
and its clients and threads. (A soak once had 1 of 2,000 fetches pass the server's 10 s limit; this
machine's CPU stalls, see tests/support/live_plugin.py, can also do that.) Registered images and the
request log live in a temporary folder that both processes read; `gate` is a process-shared event.
"""

from __future__ import annotations

import gzip
import multiprocessing
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

_SPAWN = multiprocessing.get_context("spawn")  # no fork of the threaded pytest process


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops connections when the soak fetches in bursts


def _is_plain(name: str) -> bool:
    """A name that stays inside its folder and is not a half-written `.partial` file."""
    return bool(name) and "/" not in name and not name.startswith(".")


class _Store:
    """Registered images (bytes in `files/`, media type in `types/`) and the request log, in one
    folder shared by the test process and the server process."""

    def __init__(self, folder: Path) -> None:
        self.files, self.types, self.log = folder / "files", folder / "types", folder / "requests.log"

    def create(self) -> None:
        self.files.mkdir()
        self.types.mkdir()
        self.log.touch()

    def put(self, name: str, data: bytes, mime: str) -> None:
        if not _is_plain(name):
            raise ValueError(f"not a plain file name: {name!r}")
        for folder, content in ((self.types, mime.encode()), (self.files, data)):
            partial = folder / f".{name}.partial"
            partial.write_bytes(content)
            partial.replace(folder / name)  # atomic: a fetch never sees half an image

    def get(self, name: str) -> tuple[bytes, str] | None:
        if not _is_plain(name):
            return None
        try:
            return (self.files / name).read_bytes(), (self.types / name).read_text()
        except FileNotFoundError:
            return None


def _serve(folder: Path, gate: Any, report_port: Connection) -> None:
    """The server process: answers until it is terminated."""
    store = _Store(folder)
    log_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            with log_lock, store.log.open("a") as log:
                log.write(self.path + "\n")  # written before the answer, so a test sees it once answered
            parts = urlsplit(self.path)
            if parts.path.startswith("/img/") and (found := store.get(parts.path[5:])):
                self._send(200, *found)
            elif parts.path.startswith("/gate/") and (found := store.get(parts.path[6:])):
                gate.wait(300)
                self._send(200, *found)
            elif parts.path == "/redirect":
                target = parse_qs(parts.query).get("to", ["/"])[0]
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif parts.path.startswith("/status/"):
                self._send(int(parts.path.rsplit("/", 1)[1]), b"nope", "text/plain")
            elif parts.path == "/html":
                self._send(200, b"<html><body>not an image</body></html>", "text/html")
            elif parts.path == "/slow":
                self._drip(delay=0.5)
            elif parts.path == "/big":
                self._drip(delay=0.0)
            elif parts.path == "/endless":
                self._drip(delay=0.0, head=b"\x89PNG\r\n\x1a\n")
            elif parts.path == "/gzip":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Encoding", "gzip")
                body = gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(1_000_000))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self._send(404, b"not found", "text/plain")

        def _send(self, status: int, data: bytes, mime: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", mime)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _drip(self, delay: float, head: bytes = b"") -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                self.wfile.write(head)
                for _ in range(100_000):
                    self.wfile.write(b"\x89PNG" * 1024 if delay == 0 else b"x")
                    self.wfile.flush()
                    if delay:
                        time.sleep(delay)
            except (BrokenPipeError, ConnectionResetError):
                return

    server = _Server(("127.0.0.1", 0), Handler)
    report_port.send(server.server_address[1])
    server.serve_forever()


class ImageHost:
    def __init__(self) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="image-host-"))
        self._store = _Store(self._folder)
        self._store.create()
        self.gate = _SPAWN.Event()
        self.gate.set()
        self._port_reader, port_writer = _SPAWN.Pipe(duplex=False)
        self._process = _SPAWN.Process(
            target=_serve, args=(self._folder, self.gate, port_writer), name="image-host", daemon=True
        )
        self.port = 0
        self.base_url = ""

    def add(self, name: str, data: bytes, mime: str = "image/png") -> str:
        self._store.put(name, data, mime)
        return f"{self.base_url}/img/{name}"

    @property
    def requests(self) -> list[str]:
        """Every path requested so far, in order."""
        return self._store.log.read_text().splitlines()

    def forget_requests(self) -> None:
        self._store.log.write_text("")

    def start(self) -> ImageHost:
        self._process.start()
        if not self._port_reader.poll(60):
            raise RuntimeError("the image host did not start in 60 s")
        self.port = self._port_reader.recv()
        self.base_url = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self) -> None:
        self._process.terminate()
        self._process.join(10)
        shutil.rmtree(self._folder, ignore_errors=True)
