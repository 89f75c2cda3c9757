"""The store's interface, and what both backends share that is not SQL: images kept once, the limits.

`ResponseStore` is what the Responses adapter calls. Beneath it, every backend stores a response
the same way (see `encode_record`):

- Every `data:` URI string anywhere in `response`, `input_items` and `history` is replaced by a
  reference `gemma-blob:sha256:<hex>`, and the URI itself goes once into a blobs table keyed by that
  hash. A conversation repeats its images in every turn's history; this keeps each image once, not
  once per turn. The URI is kept as the client sent it (not base64-decoded) so it comes back
  byte-identical. A string that happens to start with the reference prefix is stored as a blob too,
  so no client text can be mistaken for a reference on the way back.
- The size of a stored response is its JSON's bytes (with references, not images); the total the
  cap limits is the rows' sizes plus each blob once (`choose_evictions`).

This module imports no database driver: it is plain Python on JSON-shaped values.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from server.store.records import StoredResponse

BLOB_REF_PREFIX = "gemma-blob:sha256:"
DATA_URI_PREFIX = "data:"


@dataclass
class StoreUsage:
    """What the store holds, as the size cap counts it."""

    responses: int
    blobs: int
    total_bytes: int
    """Row JSON bytes plus each blob once."""


class ResponseStore(ABC):
    """Stored Responses, by id and owner. Every method is one short transaction."""

    def __init__(self, *, retention_seconds: float, max_bytes: int, lease_seconds: float = 120.0) -> None:
        self.retention_seconds = retention_seconds
        self.max_bytes = max_bytes
        self.lease_seconds = lease_seconds
        """How long a put of an unfinished background response, or a heartbeat, vouches for it."""

    @abstractmethod
    async def open(self) -> None:
        """Connects and creates the tables if missing (idempotent; safe when several processes open at once)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def put(self, record: StoredResponse) -> None:
        """Inserts, or replaces the row of the same id (a background response's status updates).
        An unfinished background response is leased to the caller for `lease_seconds`."""

    @abstractmethod
    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """None if missing or owned by someone else (the two are not told apart, on purpose)."""

    @abstractmethod
    async def history(self, response_id: str, owner: str) -> list[dict[str, Any]] | None:
        """The conversation a response ended (what `previous_response_id` continues), or None.
        Cheaper than `get`: one statement, and the response object itself is not decoded."""

    @abstractmethod
    async def delete(self, response_id: str, owner: str) -> bool:
        """False if missing or not the owner's."""

    @abstractmethod
    async def list_input_items(
        self, response_id: str, owner: str, *, after: str | None, limit: int, order: Literal["asc", "desc"]
    ) -> tuple[list[dict[str, Any]], bool] | None:
        """One page of the response's input items and whether more follow; None if the response is
        missing or not the owner's. `after` is an item id, as in OpenAI's cursor pagination."""

    @abstractmethod
    async def heartbeat(self, running: Sequence[str]) -> set[str]:
        """Renews the leases of the background responses this process is running. Returns those of
        them it should stop: deleted, or cancelled (by any process: the request may have reached
        another API process or replica)."""

    @abstractmethod
    async def fail_abandoned(self, reason: str) -> int:
        """Every queued/in_progress response whose lease has lapsed (the process running it died, or
        it was left by a server without leases) becomes failed, with a server_error carrying
        `reason`. Responses other live processes are running are untouched. Returns how many."""

    @abstractmethod
    async def enforce_limits(self) -> int:
        """Deletes responses older than the retention, then the oldest until the total size is within
        `max_bytes`, then the blobs nothing references. Returns how many responses were deleted."""

    @abstractmethod
    async def usage(self) -> StoreUsage:
        """Counts and sizes, as `enforce_limits` sees them (for tests and operators)."""


# --- Images kept once -------------------------------------------------------------------------


def _must_be_blob(text: str) -> bool:
    return text.startswith(DATA_URI_PREFIX) or text.startswith(BLOB_REF_PREFIX)


def extract_blobs(value: Any, blobs: dict[str, bytes]) -> Any:
    """`value` with every data URI replaced by its reference; the URIs are added to `blobs` by hash."""
    if isinstance(value, str):
        if not _must_be_blob(value):
            return value
        data = value.encode()
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return BLOB_REF_PREFIX + digest
    if isinstance(value, dict):
        return {key: extract_blobs(item, blobs) for key, item in value.items()}
    if isinstance(value, list):
        return [extract_blobs(item, blobs) for item in value]
    return value


def holds_blob_data(value: Any) -> bool:
    """Whether `extract_blobs` would hash anything in `value` (a data URI): then encoding is worth a thread."""
    if isinstance(value, str):
        return value.startswith(DATA_URI_PREFIX)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return any(holds_blob_data(item) for item in value)
    return False


def referenced_blobs(value: Any) -> set[str]:
    """The blob hashes `value` (as stored, with references) refers to."""
    if isinstance(value, str):
        return {value[len(BLOB_REF_PREFIX) :]} if value.startswith(BLOB_REF_PREFIX) else set()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return set().union(*(referenced_blobs(item) for item in value))
    return set()


def restore_blobs(value: Any, blobs: Mapping[str, bytes]) -> Any:
    """`value` with every reference replaced by the data URI it stands for."""
    if isinstance(value, str):
        if not value.startswith(BLOB_REF_PREFIX):
            return value
        digest = value[len(BLOB_REF_PREFIX) :]
        if digest not in blobs:
            raise LookupError(f"stored response refers to a missing blob sha256:{digest}")
        return blobs[digest].decode()
    if isinstance(value, dict):
        return {key: restore_blobs(item, blobs) for key, item in value.items()}
    if isinstance(value, list):
        return [restore_blobs(item, blobs) for item in value]
    return value


@dataclass
class EncodedRecord:
    """A StoredResponse as the tables hold it: JSON text with references, and the blobs apart."""

    record: StoredResponse
    response_json: str
    input_items_json: str
    history_json: str
    blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(len(text.encode()) for text in (self.response_json, self.input_items_json, self.history_json))


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def encode_record(record: StoredResponse) -> EncodedRecord:
    """JSON text kept as text, not jsonb, in both backends: it comes back exactly as written (key order,
    numbers), its size is what the cap counts, and a NUL escape (which jsonb refuses) is just text."""
    blobs: dict[str, bytes] = {}
    return EncodedRecord(
        record=record,
        response_json=_dumps(extract_blobs(record.response, blobs)),
        input_items_json=_dumps(extract_blobs(record.input_items, blobs)),
        history_json=_dumps(extract_blobs(record.history, blobs)),
        blobs=blobs,
    )


def decode_json(text: str, blobs: Mapping[str, bytes]) -> Any:
    return restore_blobs(orjson.loads(text), blobs)


def interrupted_response(response_json: str, reason: str) -> str:
    """The stored Response JSON of a response whose process died before it finished."""
    response = orjson.loads(response_json)
    response["status"] = "failed"
    response["error"] = {"code": "server_error", "message": reason}
    return _dumps(response)


# --- Pagination -------------------------------------------------------------------------------


def page_of_items(
    items: list[dict[str, Any]], *, after: str | None, limit: int, order: Literal["asc", "desc"]
) -> tuple[list[dict[str, Any]], bool]:
    """OpenAI's cursor pagination over a list: the `limit` items following the item whose id is
    `after` (in `order`), and whether more follow. An `after` that names no item gives an empty page."""
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        position = next((i for i, item in enumerate(ordered) if item.get("id") == after), None)
        if position is None:
            return [], False
        start = position + 1
    page = ordered[start : start + limit]
    return page, start + limit < len(ordered)


# --- The size cap -----------------------------------------------------------------------------


@dataclass
class RowUsage:
    response_id: str
    size_bytes: int
    blob_hashes: list[str]


def choose_evictions(oldest_first: Iterable[RowUsage], blob_sizes: Mapping[str, int], max_bytes: int) -> list[str]:
    """The ids of the oldest responses to delete so that rows plus the blobs still referenced fit in
    `max_bytes`. A blob frees its bytes only when the last response referring to it goes."""
    rows = list(oldest_first)
    references: dict[str, int] = {}
    for row in rows:
        for digest in row.blob_hashes:
            references[digest] = references.get(digest, 0) + 1
    total = sum(row.size_bytes for row in rows) + sum(blob_sizes.get(digest, 0) for digest in references)
    evicted: list[str] = []
    for row in rows:
        if total <= max_bytes:
            break
        evicted.append(row.response_id)
        total -= row.size_bytes
        for digest in row.blob_hashes:
            references[digest] -= 1
            if references[digest] == 0:
                total -= blob_sizes.get(digest, 0)
    return evicted
