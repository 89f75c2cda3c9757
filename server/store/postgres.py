"""The backend for several replicas: one PostgreSQL database they all configure (`postgresql://...`).

A small asyncpg pool per process; each operation borrows one connection for one transaction.
- Reads run REPEATABLE READ, read-only: a row and its blobs come from the same snapshot, even if a
  sweep deletes the row in between.
- Writes and sweeps take one transaction-scoped advisory lock, shared by writes and exclusive for
  sweeps. Under READ COMMITTED a write that found a blob present could otherwise link to it just
  after a concurrent sweep decided nobody referenced it and deleted it; the lock orders the two,
  while writes still run side by side.
- Creating the tables takes another advisory lock: `CREATE TABLE IF NOT EXISTS` is not safe when
  two processes run it at the same moment (both may try to create the row type).

JSON is stored as text, not jsonb, for the reasons in base.encode_record.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from server.store.sql import SqlResponseStore, TransactionKind, schema

POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 4
COMMAND_TIMEOUT_SECONDS = 30.0

# Advisory lock keys: arbitrary, fixed, and the same in every process ("gemm" and "gems" in ASCII).
SCHEMA_LOCK = 0x67656D6D
BLOB_SWEEP_LOCK = 0x67656D73


@functools.lru_cache(maxsize=256)
def numbered(sql: str) -> str:
    """sql.py's `?` placeholders as PostgreSQL's `$1, $2, ...` (none of our SQL has a literal `?`)."""
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


class _PostgresTransaction:
    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return list(await self._connection.fetch(numbered(sql), *args))

    async def execute(self, sql: str, *args: Any) -> None:
        await self._connection.execute(numbered(sql), *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            await self._connection.executemany(numbered(sql), rows)


class PostgresResponseStore(SqlResponseStore):
    def __init__(self, url: str, *, retention_seconds: float, max_bytes: int, lease_seconds: float = 120.0) -> None:
        super().__init__(retention_seconds=retention_seconds, max_bytes=max_bytes, lease_seconds=lease_seconds)
        self.url = url
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool = await asyncpg.create_pool(
            self.url, min_size=POOL_MIN_SIZE, max_size=POOL_MAX_SIZE, command_timeout=COMMAND_TIMEOUT_SECONDS
        )
        try:
            async with pool.acquire() as connection, connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                for statement in schema(float_type="DOUBLE PRECISION", blob_type="BYTEA"):
                    await connection.execute(statement)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def query(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        if self._pool is None:
            raise RuntimeError("the response store is not open")
        return list(await self._pool.fetch(numbered(sql), *args))

    @asynccontextmanager
    async def transaction(self, kind: TransactionKind) -> AsyncIterator[_PostgresTransaction]:
        if self._pool is None:
            raise RuntimeError("the response store is not open")
        async with self._pool.acquire() as connection:
            if kind == "read":
                async with connection.transaction(isolation="repeatable_read", readonly=True):
                    yield _PostgresTransaction(connection)
                return
            async with connection.transaction():
                lock = "pg_advisory_xact_lock" if kind == "sweep" else "pg_advisory_xact_lock_shared"
                await connection.execute(f"SELECT {lock}($1)", BLOB_SWEEP_LOCK)
                yield _PostgresTransaction(connection)
