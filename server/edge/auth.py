"""API keys and CORS.

Keys come from `auth.api_keys` (the YAML file or `GEMMA_SERVER_AUTH__API_KEYS='["k1","k2"]'`)
and from `auth.api_keys_file` (one key per line, `#` comments; re-read when it changes, so a
rotated Kubernetes Secret takes effect without a restart); both see every model. `auth.keys` adds
keys with scopes, given by their SHA-256 so the configuration need not hold them: the model and
adapter names a key may use, and `admin` for loading adapters. Auth is on when any is set; a
configured file that is empty still turns it on (fail closed).

The request's `Grant` (server/pipeline/models.py) is put on its scope for the routes: a name a key
may not use is resolved as a name that does not exist (404), so names do not leak.

`AuthMiddleware` decides on the route the request will actually be dispatched to: it runs the
app's own route matching on the request's path (never on a URL rebuilt from the Host header).
Only `/health`, `/ready` and (if `auth.metrics_public`) `/metrics` answer without a key; every other
route, and every path no route matches, needs `Authorization: Bearer <key>` (or `x-api-key: <key>`,
as Anthropic's clients send it). The presented key is
hashed and compared with every configured key's hash by `hmac.compare_digest`, without stopping at
the first match: neither its content nor its length changes the timing.

CORS is off unless `auth.cors_allow_origins` is set; then Starlette's CORSMiddleware runs outside
the auth check (browsers send preflights without credentials), with refusals in OpenAI's shape.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from server import errors
from server.errors import AuthenticationError, BadRequestError
from server.pipeline.models import EVERYTHING, Grant
from server.pipeline.normalize import NORMALIZED_HEADER
from server.settings import AuthSettings

log = logging.getLogger(__name__)

PROBE_PATHS = frozenset({"/health", "/ready"})
KEY_FILE_RECHECK_SECONDS = 2.0


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_key_file(path: Path) -> list[str]:
    keys = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


class ApiKeys:
    def __init__(self, settings: AuthSettings) -> None:
        self._static = [(_digest(key.strip()), EVERYTHING) for key in settings.api_keys if key.strip()]
        for scoped in settings.keys:
            digest = bytes.fromhex(scoped.sha256) if scoped.sha256 is not None else _digest(scoped.key or "")
            models = frozenset(scoped.models) if scoped.models is not None else None
            self._static.append((digest, Grant(models, scoped.admin)))
        self._file = Path(os.path.expanduser(settings.api_keys_file)) if settings.api_keys_file else None
        self.enabled = bool(self._static) or self._file is not None
        self._from_file: list[bytes] = []
        self._file_stamp: tuple[float, int] | None = None
        self._checked_at = 0.0
        if self._file is not None:
            self._load_file()  # an unreadable key file at start-up is a configuration error

    def _load_file(self) -> None:
        assert self._file is not None
        stat = self._file.stat()
        self._from_file = [_digest(key) for key in read_key_file(self._file)]
        self._file_stamp = (stat.st_mtime, stat.st_size)
        if not self._from_file:
            log.warning("the API key file has no keys: only keys from the configuration are accepted")

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._file is None or now - self._checked_at < KEY_FILE_RECHECK_SECONDS:
            return
        self._checked_at = now
        try:
            stat = self._file.stat()
            if (stat.st_mtime, stat.st_size) != self._file_stamp:
                self._load_file()
                log.info("API key file changed: %d key(s) loaded", len(self._from_file))
        except OSError:
            log.warning("the API key file cannot be read; keeping the keys loaded before")

    def grant_for(self, presented: str) -> Grant | None:
        """What the presented key may do, or None if it is no key of ours. Every known key is
        compared (no early exit), so the timing says nothing about which one matched."""
        self._maybe_reload()
        digest = _digest(presented)
        grant: Grant | None = None
        for known, known_grant in (*self._static, *((key, EVERYTHING) for key in self._from_file)):
            if hmac.compare_digest(digest, known) and grant is None:
                grant = known_grant
        return grant

    def accepts(self, presented: str) -> bool:
        return self.grant_for(presented) is not None


ANONYMOUS = "anonymous"  # the caller when auth is off


def caller_id(key: str) -> str:
    return "key:" + _digest(key)[:16].hex()


def caller_of(scope: Scope) -> str:
    """The caller a request was authenticated as (`anonymous` when auth is off)."""
    return str(scope.get("state", {}).get("caller", ANONYMOUS))


def presented_key(headers: Headers) -> str | None:
    """The key from `Authorization: Bearer <key>` (OpenAI's SDKs) or `x-api-key: <key>` (Anthropic's)."""
    value = headers.get("authorization")
    if value is not None:
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    api_key = headers.get("x-api-key", "").strip()
    return api_key or None


def public_paths(settings: AuthSettings) -> frozenset[str]:
    return PROBE_PATHS | ({"/metrics"} if settings.metrics_public else set())


class AuthMiddleware:
    """Requires an API key for every route but the public ones, decided on the matched route."""

    def __init__(self, app: ASGIApp, *, routes: Iterable[BaseRoute], keys: ApiKeys, public: frozenset[str]) -> None:
        self.app = app
        self.routes = routes  # the app's live route list: routes added later count too
        self.keys = keys
        self.public = public

    def route_path(self, scope: Scope) -> str | None:
        """The path template of the route Starlette will dispatch this request to (or one that
        matches the path with another method), or None if no route matches."""
        partial: str | None = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "path", None)
            if match is Match.PARTIAL and partial is None:
                partial = getattr(route, "path", None)
        return partial

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        if self.route_path(scope) in self.public:
            await self.app(scope, receive, send)
            return
        token = presented_key(Headers(scope=scope))
        grant = self.keys.grant_for(token) if token is not None else None
        if token is not None and grant is not None:
            state = scope.setdefault("state", {})
            # Who is asking, for what is owned per key (stored responses): a digest, never the key.
            state["caller"] = caller_id(token)
            state["grant"] = grant
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        message = (
            "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            if token is None
            else "Incorrect API key provided"
        )
        response = errors.response(
            AuthenticationError(message), path=scope.get("path", ""), extra_headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)


class OpenAICORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware; a refused preflight gets an OpenAI-shaped body."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        error = BadRequestError(bytes(response.body).decode(errors="replace"), code="cors_preflight_refused")
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return errors.response(error, extra_headers=headers)


def cors_options(settings: AuthSettings) -> dict[str, object]:
    return {
        "allow_origins": list(settings.cors_allow_origins),
        "allow_methods": ["GET", "POST", "OPTIONS"],
        "allow_headers": ["*"],  # the OpenAI SDKs send many x-stainless-* headers
        "expose_headers": ["Retry-After", NORMALIZED_HEADER, "request-id"],  # readable by browser code
        "allow_credentials": False,
        "max_age": 600,
    }
