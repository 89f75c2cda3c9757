"""A local HTTP server that hosts test images (and misbehaves on purpose on some paths).

Paths: /img/<name> serves a registered image; /redirect?to=<url> answers 302; /status/<code>;
/html (a web page, not an image); /slow (drips bytes forever); /big (endless bytes);
/endless (a PNG signature, then endless bytes, no Content-Length); /gzip (a gzip-encoded body);
/gate/<name> (serves a registered image once the test opens `gate`: fetches that stay in flight).
Every request is recorded in `requests`, so SSRF tests can assert that a canary got nothing.
"""

from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops connections when the soak fetches in bursts


class ImageHost:
    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                host.requests.append(self.path)
                parts = urlsplit(self.path)
                if parts.path.startswith("/img/") and parts.path[5:] in host.files:
                    data, mime = host.files[parts.path[5:]]
                    self._send(200, data, mime)
                elif parts.path.startswith("/gate/") and parts.path[6:] in host.files:
                    host.gate.wait(300)
                    data, mime = host.files[parts.path[6:]]
                    self._send(200, data, mime)
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

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, name: str, data: bytes, mime: str = "image/png") -> str:
        self.files[name] = (data, mime)
        return f"{self.base_url}/img/{name}"

    def start(self) -> ImageHost:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
