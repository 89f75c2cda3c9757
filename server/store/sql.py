"""The store's operations, written once in the SQL that SQLite and PostgreSQL both speak.

A backend supplies only a connection, its column types (`schema`) and `transaction(kind)`: an async
context manager around one short transaction, yielding a `Transaction` that runs `?`-parameterized
SQL. Every operation below is one such transaction, and every value goes in as a parameter.

The kind tells the backend how to isolate it:
- "read": a consistent snapshot (a row and its blobs are read from the same moment);
- "write": changes rows and may add blobs;
- "sweep": deletes rows and the blobs nothing references any more. A sweep must not run while a
  write is between finding a blob present and linking to it, or the blob could vanish in between;
  SQLite serializes all writers anyway, PostgreSQL takes an advisory lock (postgres.py).

Tables: `responses` (one row per response: JSON text with blob references, and its size),
`blobs` (each image once, by hash), `response_blobs` (which rows refer to which blobs; a blob no
row refers to is deleted by the next sweep) and `background_leases` (until when the process running
a background response vouches for it; see `ResponseStore.heartbeat`). The leases are a table of
their own so that a database made before them gains them with CREATE TABLE IF NOT EXISTS.
"""

from __future__ import annotations

import asyncio
import time
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

import orjson

from server.store.base import (
    EncodedRecord,
    ResponseStore,
    RowUsage,
    StoreUsage,
    choose_evictions,
    decode_json,
    encode_record,
    holds_blob_data,
    interrupted_response,
    page_of_items,
    referenced_blobs,
    restore_blobs,
)
from server.store.records import ACTIVE_STATUSES, StoredResponse

TransactionKind = Literal["read", "write", "sweep"]

# Both engines accept far more parameters in one statement; this keeps IN lists modest.
_IN_CHUNK = 500

_COLUMNS = "id, owner, created_at, status, background, response, input_items, history"
INLINE_DECODE_CHARS = 64 * 1024  # larger JSON (or any with images) is decoded off the event loop


def schema(*, float_type: str, blob_type: str) -> list[str]:
    """The tables and indexes, with the two column types the engines name differently."""
    return [
        f"""CREATE TABLE IF NOT EXISTS responses (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            created_at {float_type} NOT NULL,
            status TEXT NOT NULL,
            background BOOLEAN NOT NULL,
            response TEXT NOT NULL,
            input_items TEXT NOT NULL,
            history TEXT NOT NULL,
            size_bytes BIGINT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at, id)",
        "CREATE INDEX IF NOT EXISTS responses_by_status ON responses (status)",
        f"""CREATE TABLE IF NOT EXISTS blobs (
            hash TEXT PRIMARY KEY,
            data {blob_type} NOT NULL,
            size_bytes BIGINT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS response_blobs (
            response_id TEXT NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
            hash TEXT NOT NULL,
            PRIMARY KEY (response_id, hash)
        )""",
        "CREATE INDEX IF NOT EXISTS response_blobs_by_hash ON response_blobs (hash)",
        f"""CREATE TABLE IF NOT EXISTS background_leases (
            response_id TEXT PRIMARY KEY REFERENCES responses (id) ON DELETE CASCADE,
            expires_at {float_type} NOT NULL
        )""",
    ]


class Transaction(Protocol):
    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]: ...

    async def execute(self, sql: str, *args: Any) -> None: ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


def _chunks(values: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


class SqlResponseStore(ResponseStore):
    """Every operation of `ResponseStore`, over the backend's `transaction`."""

    @abstractmethod
    def transaction(self, kind: TransactionKind) -> AbstractAsyncContextManager[Transaction]: ...

    @abstractmethod
    async def query(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        """One statement on its own, outside an explicit transaction (a statement is atomic by itself):
        the request path's reads, where BEGIN and COMMIT would double the round trips."""

    async def put(self, record: StoredResponse) -> None:
        # Hashing images and writing JSON can take milliseconds for large requests: off the event loop;
        # a conversation without images is cheaper to encode than to hand to a thread.
        if holds_blob_data(record.input_items) or holds_blob_data(record.history):
            encoded = await asyncio.to_thread(encode_record, record)
        else:
            encoded = encode_record(record)
        async with self.transaction("write") as tx:
            await _upsert_row(tx, encoded)
            # Only a background response is put more than once (queued, in progress, finished); a
            # response answered in the request is put once, under a new id: nothing to replace.
            if record.background:
                await tx.execute("DELETE FROM response_blobs WHERE response_id = ?", record.id)
            if encoded.blobs:
                await _insert_missing_blobs(tx, encoded.blobs)
                await tx.executemany(
                    "INSERT INTO response_blobs (response_id, hash) VALUES (?, ?)",
                    [(record.id, digest) for digest in encoded.blobs],
                )
            if record.background:
                await _set_lease(tx, record, time.time() + self.lease_seconds)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        async with self.transaction("read") as tx:
            rows = await tx.fetch(f"SELECT {_COLUMNS} FROM responses WHERE id = ? AND owner = ?", response_id, owner)
            if not rows:
                return None
            blobs = await _blobs_of_row(tx, response_id)
        return await asyncio.to_thread(_decode_row, rows[0], blobs)

    async def history(self, response_id: str, owner: str) -> list[dict[str, Any]] | None:
        rows = await self.query(
            "SELECT r.history, b.hash, b.data FROM responses r "
            "LEFT JOIN response_blobs l ON l.response_id = r.id LEFT JOIN blobs b ON b.hash = l.hash "
            "WHERE r.id = ? AND r.owner = ?",
            response_id,
            owner,
        )
        if not rows:
            return None
        blobs = {digest: bytes(data) for _, digest, data in rows if digest is not None}
        history: list[dict[str, Any]]
        if blobs or len(rows[0][0]) > INLINE_DECODE_CHARS:
            history = await asyncio.to_thread(decode_json, rows[0][0], blobs)
        else:
            history = decode_json(rows[0][0], blobs)
        return history

    async def delete(self, response_id: str, owner: str) -> bool:
        async with self.transaction("write") as tx:
            deleted = await tx.fetch(
                "DELETE FROM responses WHERE id = ? AND owner = ? RETURNING id", response_id, owner
            )
        return bool(deleted)

    async def list_input_items(
        self, response_id: str, owner: str, *, after: str | None, limit: int, order: Literal["asc", "desc"]
    ) -> tuple[list[dict[str, Any]], bool] | None:
        async with self.transaction("read") as tx:
            rows = await tx.fetch("SELECT input_items FROM responses WHERE id = ? AND owner = ?", response_id, owner)
            if not rows:
                return None
            page, has_more = page_of_items(orjson.loads(rows[0][0]), after=after, limit=limit, order=order)
            # Only the page's own images are read back, not every image of the request.
            blobs = await _blobs_by_hash(tx, sorted(referenced_blobs(page)))
        return restore_blobs(page, blobs), has_more

    async def heartbeat(self, running: Sequence[str]) -> set[str]:
        if not running:
            return set()
        until = time.time() + self.lease_seconds
        stopped: set[str] = set()
        async with self.transaction("write") as tx:
            for chunk in _chunks(running):
                marks = _placeholders(len(chunk))
                await tx.execute(
                    f"UPDATE background_leases SET expires_at = ? WHERE response_id IN ({marks})", until, *chunk
                )
                rows = await tx.fetch(f"SELECT id, status FROM responses WHERE id IN ({marks})", *chunk)
                still_there = {response_id for response_id, status in rows if status != "cancelled"}
                stopped.update(response_id for response_id in chunk if response_id not in still_there)
        return stopped

    async def fail_abandoned(self, reason: str) -> int:
        async with self.transaction("write") as tx:
            active = _placeholders(len(ACTIVE_STATUSES))
            rows = await tx.fetch(
                f"""SELECT r.id, r.response, r.size_bytes FROM responses r
                LEFT JOIN background_leases l ON l.response_id = r.id
                WHERE r.status IN ({active}) AND (l.expires_at IS NULL OR l.expires_at < ?)""",
                *ACTIVE_STATUSES,
                time.time(),
            )
            updates = []
            for response_id, response_json, size_bytes in rows:
                failed_json = interrupted_response(response_json, reason)
                new_size = size_bytes - len(response_json.encode()) + len(failed_json.encode())
                updates.append(("failed", failed_json, new_size, response_id))
            await tx.executemany("UPDATE responses SET status = ?, response = ?, size_bytes = ? WHERE id = ?", updates)
            await tx.executemany("DELETE FROM background_leases WHERE response_id = ?", [row[3:] for row in updates])
        return len(updates)

    async def enforce_limits(self) -> int:
        async with self.transaction("sweep") as tx:
            expired = await tx.fetch(
                "DELETE FROM responses WHERE created_at < ? RETURNING id", time.time() - self.retention_seconds
            )
            await _delete_unreferenced_blobs(tx)
            evicted: list[str] = []
            if await _total_bytes(tx) > self.max_bytes:
                evicted = choose_evictions(await _row_usage(tx), await _blob_sizes(tx), self.max_bytes)
                for chunk in _chunks(evicted):
                    await tx.execute(f"DELETE FROM responses WHERE id IN ({_placeholders(len(chunk))})", *chunk)
                await _delete_unreferenced_blobs(tx)
        return len(expired) + len(evicted)

    async def usage(self) -> StoreUsage:
        async with self.transaction("read") as tx:
            rows = await tx.fetch(
                "SELECT (SELECT COUNT(*) FROM responses), (SELECT COUNT(*) FROM blobs), "
                "(SELECT CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) FROM responses), "
                "(SELECT CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) FROM blobs)"
            )
        responses, blobs, row_bytes, blob_bytes = rows[0]
        return StoreUsage(responses=int(responses), blobs=int(blobs), total_bytes=int(row_bytes) + int(blob_bytes))


def _decode_row(row: Sequence[Any], blobs: dict[str, bytes]) -> StoredResponse:
    response_id, owner, created_at, status, background, response, input_items, history = row
    return StoredResponse(
        id=response_id,
        owner=owner,
        created_at=float(created_at),
        status=status,
        response=decode_json(response, blobs),
        input_items=decode_json(input_items, blobs),
        history=decode_json(history, blobs),
        background=bool(background),
    )


async def _upsert_row(tx: Transaction, encoded: EncodedRecord) -> None:
    record = encoded.record
    await tx.execute(
        f"""INSERT INTO responses ({_COLUMNS}, size_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, created_at = excluded.created_at,
            status = excluded.status, background = excluded.background, response = excluded.response,
            input_items = excluded.input_items, history = excluded.history, size_bytes = excluded.size_bytes""",
        record.id,
        record.owner,
        record.created_at,
        record.status,
        record.background,
        encoded.response_json,
        encoded.input_items_json,
        encoded.history_json,
        encoded.size_bytes,
    )


async def _set_lease(tx: Transaction, record: StoredResponse, expires_at: float) -> None:
    """An unfinished background response is leased to the process putting it (which then renews
    the lease with `heartbeat`); a finished one needs none. Only background responses get here."""
    if record.status in ACTIVE_STATUSES:
        await tx.execute(
            "INSERT INTO background_leases (response_id, expires_at) VALUES (?, ?) "
            "ON CONFLICT (response_id) DO UPDATE SET expires_at = excluded.expires_at",
            record.id,
            expires_at,
        )
    else:
        await tx.execute("DELETE FROM background_leases WHERE response_id = ?", record.id)


async def _insert_missing_blobs(tx: Transaction, blobs: dict[str, bytes]) -> None:
    """Sends only the images the database does not have yet: a conversation's images come back in
    every turn's history, and re-sending megabytes per turn to be ignored would be waste."""
    present: set[str] = set()
    for chunk in _chunks(sorted(blobs)):
        rows = await tx.fetch(f"SELECT hash FROM blobs WHERE hash IN ({_placeholders(len(chunk))})", *chunk)
        present.update(row[0] for row in rows)
    await tx.executemany(
        "INSERT INTO blobs (hash, data, size_bytes) VALUES (?, ?, ?) ON CONFLICT (hash) DO NOTHING",
        [(digest, data, len(data)) for digest, data in blobs.items() if digest not in present],
    )


async def _blobs_of_row(tx: Transaction, response_id: str) -> dict[str, bytes]:
    rows = await tx.fetch(
        "SELECT b.hash, b.data FROM blobs b JOIN response_blobs l ON l.hash = b.hash WHERE l.response_id = ?",
        response_id,
    )
    return {digest: bytes(data) for digest, data in rows}


async def _blobs_by_hash(tx: Transaction, hashes: Sequence[str]) -> dict[str, bytes]:
    blobs: dict[str, bytes] = {}
    for chunk in _chunks(hashes):
        rows = await tx.fetch(f"SELECT hash, data FROM blobs WHERE hash IN ({_placeholders(len(chunk))})", *chunk)
        blobs.update((digest, bytes(data)) for digest, data in rows)
    return blobs


async def _delete_unreferenced_blobs(tx: Transaction) -> None:
    await tx.execute("DELETE FROM blobs WHERE NOT EXISTS (SELECT 1 FROM response_blobs l WHERE l.hash = blobs.hash)")


async def _total_bytes(tx: Transaction) -> int:
    rows = await tx.fetch(
        "SELECT (SELECT CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) FROM responses) "
        "+ (SELECT CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) FROM blobs)"
    )
    return int(rows[0][0])


async def _row_usage(tx: Transaction) -> list[RowUsage]:
    rows = await tx.fetch("SELECT id, size_bytes FROM responses ORDER BY created_at, id")
    links: dict[str, list[str]] = {}
    for response_id, digest in await tx.fetch("SELECT response_id, hash FROM response_blobs"):
        links.setdefault(response_id, []).append(digest)
    return [RowUsage(response_id, int(size), links.get(response_id, [])) for response_id, size in rows]


async def _blob_sizes(tx: Transaction) -> dict[str, int]:
    return {digest: int(size) for digest, size in await tx.fetch("SELECT hash, size_bytes FROM blobs")}
