"""Chooses the backend from `responses.url` and opens it.

    sqlite:///relative/path.db     (relative to the working directory)
    sqlite:////absolute/path.db
    sqlite:///~/path.db            (`~` expanded; the default is ~/.cache/gemma-server/responses.db)
    postgresql://user:password@host:port/database   (postgres:// too, as libpq accepts)

The sqlite forms are SQLAlchemy's, which operators already know.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from server.settings import ResponsesStoreSettings
from server.store.base import ResponseStore
from server.store.postgres import PostgresResponseStore
from server.store.sqlite import SqliteResponseStore

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def sqlite_path(url: str) -> Path:
    """The file a sqlite:/// URL names, `~` expanded."""
    return Path(os.path.expanduser(url[len(SQLITE_PREFIX) :]))


def store_for(settings: ResponsesStoreSettings) -> ResponseStore:
    """The backend `settings.url` names, not yet opened."""
    limits: dict[str, Any] = {
        "retention_seconds": settings.retention_seconds,
        "max_bytes": settings.max_bytes,
        "lease_seconds": settings.background_lease_seconds,
    }
    if settings.url.startswith(SQLITE_PREFIX):
        return SqliteResponseStore(sqlite_path(settings.url), **limits)
    if settings.url.startswith(POSTGRES_PREFIXES):
        return PostgresResponseStore(settings.url, **limits)
    raise ValueError(f"responses.url must start with sqlite:/// or postgresql:// (got {settings.url!r})")


async def open_store(settings: ResponsesStoreSettings) -> ResponseStore:
    """The configured store, opened (tables created if missing)."""
    store = store_for(settings)
    await store.open()
    return store
