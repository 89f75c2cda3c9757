"""The embedded default backend: one SQLite file, shared by the API processes of one machine.

Several API processes (server.api_processes) open the same file, so:
- WAL journal: readers never wait for the writer, and a reader sees a consistent snapshot;
- a busy timeout: a writer that finds another process writing waits for it instead of failing;
- writes begin with BEGIN IMMEDIATE, taking the write lock at the start of the transaction; a
  deferred transaction that reads then writes could fail with "database is locked" mid-way instead
  of waiting. SQLite so serializes all writers, which is what keeps a sweep from deleting a blob
  that a concurrent write is about to link to (see sql.py).

Each store object holds one aiosqlite connection (its own thread); a lock keeps one transaction at
a time on it, since coroutines of the same process would otherwise interleave inside one another's
transactions.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from server.store.sql import SqlResponseStore, TransactionKind, schema

BUSY_TIMEOUT_SECONDS = 10.0

_BEGIN = {"read": "BEGIN", "write": "BEGIN IMMEDIATE", "sweep": "BEGIN IMMEDIATE"}


class _SqliteTransaction:
    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return list(await self._connection.execute_fetchall(sql, args))  # one trip to its thread, not three

    async def execute(self, sql: str, *args: Any) -> None:
        await self._connection.execute(sql, args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._connection.executemany(sql, rows)


class SqliteResponseStore(SqlResponseStore):
    def __init__(self, path: Path, *, retention_seconds: float, max_bytes: int, lease_seconds: float = 120.0) -> None:
        super().__init__(retention_seconds=retention_seconds, max_bytes=max_bytes, lease_seconds=lease_seconds)
        self.path = path
        self._connection: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        if self._connection is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the module's implicit transactions off, so BEGIN/COMMIT are ours.
        connection = await aiosqlite.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            await connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            await _use_wal(connection)
            # NORMAL is durable across process crashes in WAL mode; only a power cut may lose the last commits.
            await connection.execute("PRAGMA synchronous = NORMAL")
            await connection.execute("PRAGMA foreign_keys = ON")
            self._connection = connection
            async with self.transaction("write") as tx:
                for statement in schema(float_type="REAL", blob_type="BLOB"):
                    await tx.execute(statement)
        except BaseException:
            self._connection = None
            await connection.close()
            raise

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()

    async def query(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        if self._connection is None:
            raise RuntimeError("the response store is not open")
        async with self._lock:
            return list(await self._connection.execute_fetchall(sql, args))

    @asynccontextmanager
    async def transaction(self, kind: TransactionKind) -> AsyncIterator[_SqliteTransaction]:
        if self._connection is None:
            raise RuntimeError("the response store is not open")
        async with self._lock:
            connection = self._connection
            await connection.execute(_BEGIN[kind])
            try:
                yield _SqliteTransaction(connection)
            except BaseException:
                await connection.execute("ROLLBACK")
                raise
            await connection.execute("COMMIT")


async def _use_wal(connection: aiosqlite.Connection) -> None:
    # Switching a new file to WAL needs an exclusive lock, and SQLite answers "database is locked" at
    # once, without the busy handler, when another connection holds the file (API processes opening a
    # new database together): retry within the busy timeout, as a writer would wait.
    deadline = asyncio.get_running_loop().time() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            async with connection.execute("PRAGMA journal_mode = WAL") as cursor:
                row = await cursor.fetchone()
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
    if row is None or str(row[0]).lower() != "wal":
        # e.g. a file system without shared memory: several processes could not share the file safely.
        raise RuntimeError(f"SQLite refused WAL mode (journal_mode={row[0] if row else None})")
