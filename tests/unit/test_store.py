"""The stored-Responses database (server/store), every behaviour against both real backends.

Each test that takes `backend` or `store` runs twice: on a fresh SQLite file, and on a real
PostgreSQL server (Debian's binaries, started once per session by tests/support/postgres.py into
/tmp, its tables dropped before each test). Nothing is mocked; some tests read the tables
directly, so that "stored once" is checked on the database rather than on the store's own account.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import os
import random
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

from server.settings import ResponsesStoreSettings, Settings
from server.store import ResponseStore, StoredResponse, open_store
from server.store.base import extract_blobs, holds_blob_data
from server.store.factory import sqlite_path
from server.store.postgres import PostgresResponseStore
from server.store.sql import SqlResponseStore
from server.store.sqlite import SqliteResponseStore
from tests.support.postgres import PostgresServer, running_postgres

ROOT = Path(__file__).resolve().parents[2]
DAY = 24 * 3600.0
TABLES = ("background_leases", "response_blobs", "blobs", "responses")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@dataclass
class Backend:
    """One empty database, and ways to open stores on it and to read its tables behind the store's back."""

    name: str
    url: str

    async def open(self, **limits: Any) -> ResponseStore:
        return await open_store(ResponsesStoreSettings(url=self.url, **limits))

    async def table_rows(self, table: str) -> int:
        assert table in TABLES
        if self.name == "sqlite":
            with sqlite3.connect(sqlite_path(self.url)) as connection:
                count: int = connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                return count
        connection = await asyncpg.connect(self.url)
        try:
            return int(await connection.fetchval(f"SELECT COUNT(*) FROM {table}"))
        finally:
            await connection.close()

    async def drop_table(self, table: str) -> None:
        assert table in TABLES
        if self.name == "sqlite":
            with sqlite3.connect(sqlite_path(self.url)) as connection:
                connection.execute(f"DROP TABLE {table}")
            return
        connection = await asyncpg.connect(self.url)
        try:
            await connection.execute(f"DROP TABLE {table}")
        finally:
            await connection.close()


async def _empty_postgres(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"DROP TABLE IF EXISTS {', '.join(TABLES)}")
    finally:
        await connection.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp_path}/responses.db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    await _empty_postgres(server.url)
    return Backend("postgres", server.url)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[ResponseStore]:
    opened = await backend.open()
    yield opened
    await opened.close()


def message(item_id: str, text: str, *, image: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "input_text", "text": text}]
    if image is not None:
        content.append({"type": "input_image", "image_url": image, "detail": "auto"})
    return {"id": item_id, "type": "message", "role": "user", "content": content}


def answer(item_id: str, text: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def record(
    response_id: str,
    *,
    owner: str = "alice",
    status: str = "completed",
    created_at: float | None = None,
    input_items: list[dict[str, Any]] | None = None,
    history: list[dict[str, Any]] | None = None,
    output_text: str = "Hello.",
    background: bool = False,
) -> StoredResponse:
    created_at = time.time() if created_at is None else created_at
    items = input_items if input_items is not None else [message(f"msg_{response_id}", "Hi")]
    output = [answer(f"out_{response_id}", output_text)]
    return StoredResponse(
        id=response_id,
        owner=owner,
        created_at=created_at,
        status=status,
        response={
            "id": response_id,
            "object": "response",
            "created_at": int(created_at),
            "status": status,
            "model": "gemma-3-4b-it",
            "output": output,
            "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
            "metadata": {"z-last": "keys keep their order", "a-first": 1.5},
        },
        input_items=items,
        history=(history if history is not None else items) + output,
        background=background,
    )


def png_data_uri(size: int, seed: int = 0) -> str:
    payload = random.Random(seed).randbytes(size)
    return "data:image/png;base64," + base64.b64encode(payload).decode()


async def test_a_stored_response_comes_back_as_it_was_put(store: ResponseStore) -> None:
    original = record("resp_1", background=True, status="in_progress")
    await store.put(original)
    fetched = await store.get("resp_1", "alice")
    assert fetched == original
    assert fetched is not None and list(fetched.response["metadata"]) == ["z-last", "a-first"]
    assert await store.get("resp_missing", "alice") is None


async def test_another_owner_neither_sees_it_nor_deletes_it_nor_lists_its_items(store: ResponseStore) -> None:
    await store.put(record("resp_1", owner="alice"))
    assert await store.get("resp_1", "mallory") is None
    assert await store.delete("resp_1", "mallory") is False
    assert await store.list_input_items("resp_1", "mallory", after=None, limit=20, order="asc") is None
    assert await store.get("resp_1", "alice") is not None


async def test_delete_removes_the_response_once(store: ResponseStore) -> None:
    await store.put(record("resp_1"))
    await store.put(record("resp_2"))
    assert await store.delete("resp_1", "alice") is True
    assert await store.delete("resp_1", "alice") is False
    assert await store.get("resp_1", "alice") is None
    assert await store.list_input_items("resp_1", "alice", after=None, limit=20, order="asc") is None
    assert await store.get("resp_2", "alice") is not None


async def test_input_items_are_paged_by_cursor_in_both_orders(store: ResponseStore) -> None:
    items = [message(f"msg_{i:02d}", f"turn {i}") for i in range(25)]
    await store.put(record("resp_1", input_items=items))
    ids = [item["id"] for item in items]

    async def page(after: str | None, limit: int, order: Any) -> tuple[list[str], bool]:
        listed = await store.list_input_items("resp_1", "alice", after=after, limit=limit, order=order)
        assert listed is not None
        return [item["id"] for item in listed[0]], listed[1]

    assert await page(None, 10, "asc") == (ids[:10], True)
    assert await page("msg_09", 10, "asc") == (ids[10:20], True)
    assert await page("msg_19", 10, "asc") == (ids[20:], False)
    assert await page(None, 25, "asc") == (ids, False)
    assert await page(None, 10, "desc") == (ids[::-1][:10], True)
    assert await page("msg_05", 10, "desc") == (ids[4::-1], False)
    assert await page("msg_24", 10, "asc") == ([], False)
    assert await page("msg_unknown", 10, "asc") == ([], False)
    listed = await store.list_input_items("resp_1", "alice", after=None, limit=100, order="asc")
    assert listed == (items, False)


async def test_a_put_of_the_same_id_replaces_the_row(backend: Backend, store: ResponseStore) -> None:
    queued = record("resp_bg", status="queued", background=True, output_text="")
    await store.put(queued)
    done = record("resp_bg", status="completed", background=True, output_text="Done.")
    await store.put(done)
    assert await store.get("resp_bg", "alice") == done
    assert await backend.table_rows("responses") == 1


async def test_a_response_running_elsewhere_is_failed_only_once_its_lease_lapses(backend: Backend) -> None:
    """Two stores on one database are two API processes (or replicas): one opening or sweeping must
    not fail what the other is running; once the runner stops renewing, the next sweep does."""
    runner, sweeper = await backend.open(), await backend.open()
    try:
        for response_id, status in [("resp_q", "queued"), ("resp_p", "in_progress"), ("resp_c", "completed")]:
            await runner.put(record(response_id, status=status, background=True))
        size_before = (await sweeper.usage()).total_bytes
        assert await backend.table_rows("background_leases") == 2
        assert await sweeper.fail_abandoned("the process stopped") == 0
        assert (await sweeper.get("resp_p", "alice")).status == "in_progress"  # type: ignore[union-attr]

        runner.lease_seconds = 0  # its last heartbeat vouches for no time at all: the runner "died"
        assert await runner.heartbeat(["resp_q", "resp_p"]) == set()
        await asyncio.sleep(0.01)
        assert await sweeper.fail_abandoned("the process stopped") == 2

        for response_id in ("resp_q", "resp_p"):
            failed = await sweeper.get(response_id, "alice")
            assert failed is not None and failed.status == "failed"
            assert failed.response["status"] == "failed"
            assert failed.response["error"] == {"code": "server_error", "message": "the process stopped"}
            assert failed.response["output"] == record(response_id).response["output"]
        completed = await sweeper.get("resp_c", "alice")
        assert completed is not None and completed.status == "completed" and "error" not in completed.response
        assert (await sweeper.usage()).total_bytes > size_before
        assert await backend.table_rows("background_leases") == 0
        assert await sweeper.fail_abandoned("again") == 0
    finally:
        await runner.close()
        await sweeper.close()


async def test_a_heartbeat_renews_leases_and_names_what_was_stopped_elsewhere(backend: Backend) -> None:
    runner, other = await backend.open(), await backend.open()
    try:
        runner.lease_seconds = 0
        for response_id in ("resp_a", "resp_b", "resp_c"):
            await runner.put(record(response_id, status="in_progress", background=True))
        runner.lease_seconds = 3600
        assert await runner.heartbeat(["resp_a", "resp_b", "resp_c"]) == set()
        await asyncio.sleep(0.01)
        assert await other.fail_abandoned("the process stopped") == 0  # renewed, so not lapsed

        cancelled = record("resp_b", status="cancelled", background=True)
        await other.put(cancelled)
        assert await other.delete("resp_c", "alice") is True
        assert await runner.heartbeat(["resp_a", "resp_b", "resp_c"]) == {"resp_b", "resp_c"}
        assert await backend.table_rows("background_leases") == 1  # resp_a's; finished and deleted ones hold none
        assert await runner.heartbeat([]) == set()
    finally:
        await runner.close()
        await other.close()


async def test_a_database_from_before_leases_gains_them_and_fails_its_orphans(backend: Backend) -> None:
    """A response left in progress by a server that kept no leases has none: the first sweep fails it."""
    store = await backend.open()
    await store.put(record("resp_old", status="in_progress", background=True))
    await store.close()
    await backend.drop_table("background_leases")
    reopened = await backend.open()
    try:
        assert await reopened.fail_abandoned("the process stopped") == 1
        assert await backend.table_rows("background_leases") == 0
    finally:
        await reopened.close()


async def test_retention_deletes_responses_older_than_it(backend: Backend) -> None:
    store = await backend.open(retention_seconds=30 * DAY)
    try:
        now = time.time()
        await store.put(record("resp_old", created_at=now - 31 * DAY))
        await store.put(record("resp_young", created_at=now - 29 * DAY))
        await store.put(record("resp_new", created_at=now))
        assert await store.enforce_limits() == 1
        assert await store.get("resp_old", "alice") is None
        assert await store.get("resp_young", "alice") is not None
        assert await store.get("resp_new", "alice") is not None
        assert await store.enforce_limits() == 0
    finally:
        await store.close()


async def test_the_size_cap_evicts_the_oldest_first(backend: Backend) -> None:
    """Eight rows of ~200 kB against a 1 MiB cap, and two ~100 kB images: image A only in the three
    oldest rows (its bytes are freed with the last of them), image B in the oldest and a young row
    (still referenced, so still counted)."""
    store = await backend.open(max_bytes=2**20)
    try:
        now = time.time()
        image_a, image_b = png_data_uri(75_000, seed=1), png_data_uri(75_000, seed=2)
        images = {7: [image_a, image_b], 6: [image_a], 5: [image_a], 1: [image_b]}
        for age in [5, 2, 7, 0, 3, 6, 1, 4]:  # put in an order other than their age
            items = [message(f"msg_{age}_{i}", "look", image=uri) for i, uri in enumerate(images.get(age, []))]
            # The text is in the response's output and again in the history: ~200 kB a row.
            text = "x" * 100_000
            await store.put(record(f"resp_{age}", created_at=now - age, input_items=items, output_text=text))
        assert (await store.usage()).total_bytes > 1_700_000

        # 7, 6, 5 go (image A with them: 1.1 MB left, still over), then 4.
        assert await store.enforce_limits() == 4

        for age in range(8):
            kept = await store.get(f"resp_{age}", "alice")
            assert (kept is None) == (age >= 4), age
        assert await backend.table_rows("blobs") == 1
        usage = await store.usage()
        assert usage.responses == 4 and 850_000 < usage.total_bytes <= 2**20
        assert await store.enforce_limits() == 0
    finally:
        await store.close()


async def test_an_image_in_three_turns_is_stored_once(backend: Backend, store: ResponseStore) -> None:
    image = png_data_uri(120_000)
    history: list[dict[str, Any]] = []
    turns = []
    for turn in range(1, 4):
        # Each turn sends the image again, and its history repeats every earlier turn's image too.
        items = [message(f"msg_{turn}", f"And now? ({turn})", image=image)]
        turns.append(record(f"resp_{turn}", input_items=items, history=history + items))
        history = turns[-1].history
        await store.put(turns[-1])

    assert await backend.table_rows("blobs") == 1
    usage = await store.usage()
    # Nine copies of the image across the three rows, counted once.
    assert len(image) < usage.total_bytes < len(image) + 10_000
    for stored in turns:
        assert await store.get(stored.id, "alice") == stored
    listed = await store.list_input_items("resp_3", "alice", after=None, limit=5, order="asc")
    assert listed is not None and listed[0][0]["content"][1]["image_url"] == image

    # The blob lives while any row refers to it, and goes with the last one.
    await store.delete("resp_1", "alice")
    await store.delete("resp_2", "alice")
    await store.enforce_limits()
    assert await backend.table_rows("blobs") == 1
    assert await store.get("resp_3", "alice") == turns[2]
    await store.delete("resp_3", "alice")
    await store.enforce_limits()
    assert await backend.table_rows("blobs") == 0
    assert (await store.usage()).total_bytes == 0


async def test_the_history_a_chain_continues_comes_back_with_its_images(store: ResponseStore) -> None:
    image = png_data_uri(2_000, seed=3)
    first = record("resp_a", input_items=[message("msg_a", "Look", image=image)])
    second = record("resp_b", input_items=[message("msg_b", "Text only")], history=[*first.history, message("m", "x")])
    await store.put(first)
    await store.put(second)
    assert await store.history("resp_a", "alice") == first.history
    assert await store.history("resp_b", "alice") == second.history
    assert await store.history("resp_a", "bob") is None  # another owner's: not found, like every route
    assert await store.history("resp_missing", "alice") is None


def test_a_put_hands_encoding_to_a_thread_exactly_when_there_is_image_data_to_hash() -> None:
    with_image = [message("msg_i", "Look", image=png_data_uri(100))]
    by_url = [message("msg_u", "Look", image="https://example.com/cat.png")]
    for items in (with_image, by_url, [message("msg_t", "Text only")]):
        blobs: dict[str, bytes] = {}
        extract_blobs(items, blobs)
        assert holds_blob_data(items) == bool(blobs)


async def test_text_that_looks_like_a_blob_reference_comes_back_as_text(store: ResponseStore) -> None:
    tricky = ["gemma-blob:sha256:" + "0" * 64, "gemma-blob:sha256:not-hex", "data:", "data: not an image"]
    items = [message(f"msg_{i}", text) for i, text in enumerate(tricky)]
    stored = record("resp_1", input_items=items)
    await store.put(stored)
    assert await store.get("resp_1", "alice") == stored


async def test_two_stores_on_one_database_see_each_others_writes(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    try:
        started = record("resp_a", status="in_progress", background=True)
        await first.put(started)
        assert await second.get("resp_a", "alice") == started
        update = replace(started, status="completed", response={**started.response, "status": "completed"})
        await second.put(update)
        assert await first.get("resp_a", "alice") == update
        assert await first.delete("resp_a", "alice") is True
        assert await second.get("resp_a", "alice") is None
    finally:
        await first.close()
        await second.close()


async def test_a_sweep_waits_for_a_write_in_progress(backend: Backend) -> None:
    """A write may have found a blob present and be about to link to it: a sweep (which deletes the
    blobs nothing links to) of another process must not run until that write commits."""
    writer, sweeper = await backend.open(), await backend.open()
    assert isinstance(writer, SqlResponseStore)
    try:
        async with writer.transaction("write") as tx:
            await tx.execute("SELECT 1")
            sweep = asyncio.create_task(sweeper.enforce_limits())
            await asyncio.sleep(0.3)
            assert not sweep.done()
        assert await asyncio.wait_for(sweep, 5) == 0
    finally:
        await writer.close()
        await sweeper.close()


async def test_stores_opened_at_once_on_a_new_database_all_work(backend: Backend) -> None:
    stores = await asyncio.gather(*(backend.open() for _ in range(4)))
    try:
        await asyncio.gather(*(s.put(record(f"resp_{i}")) for i, s in enumerate(stores)))
        assert all([await stores[0].get(f"resp_{i}", "alice") for i in range(4)])
    finally:
        await asyncio.gather(*(s.close() for s in stores))


CHILD_WRITER = """
import asyncio, sys, time
from server.settings import ResponsesStoreSettings
from server.store import StoredResponse, open_store

async def main(url, prefix, count):
    store = await open_store(ResponsesStoreSettings(url=url))
    for i in range(count):
        item = {"id": f"msg_{prefix}{i}", "type": "message", "role": "user", "content": []}
        await store.put(StoredResponse(f"resp_{prefix}{i}", "alice", time.time(), "completed",
                                       {"id": f"resp_{prefix}{i}"}, [item], [item]))
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_processes_writing_at_once_lose_nothing(backend: Backend, store: ResponseStore) -> None:
    """What several API processes do: two child processes and this one write at the same moment."""
    count = 30
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD_WRITER, backend.url, prefix, str(count), cwd=ROOT
        )
        for prefix in ("a", "b")
    ]
    await asyncio.gather(*(store.put(record(f"resp_c{i}")) for i in range(count)))
    assert [await child.wait() for child in children] == [0, 0]
    for prefix in "abc":
        for i in range(count):
            assert await store.get(f"resp_{prefix}{i}", "alice") is not None, f"resp_{prefix}{i}"
    assert (await store.usage()).responses == 3 * count


# --- Settings and the factory -------------------------------------------------------------------


def test_the_settings_default_to_an_sqlite_file_in_the_cache() -> None:
    settings = Settings().responses
    assert settings.url == "sqlite:///~/.cache/gemma-server/responses.db"
    assert sqlite_path(settings.url) == Path.home() / ".cache" / "gemma-server" / "responses.db"
    assert settings.retention_seconds == 30 * DAY and settings.max_bytes == 2**30
    assert sqlite_path("sqlite:////var/lib/gemma/r.db") == Path("/var/lib/gemma/r.db")


@pytest.mark.parametrize(
    "bad",
    [{"url": "mysql://db/x"}, {"url": "/tmp/r.db"}, {"retention_seconds": 0}, {"max_bytes": 2**20 - 1}],
)
def test_the_settings_refuse_what_no_backend_can_do(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ResponsesStoreSettings(**bad)


async def test_the_url_scheme_chooses_the_backend(backend: Backend) -> None:
    store = await backend.open()
    try:
        expected = SqliteResponseStore if backend.name == "sqlite" else PostgresResponseStore
        assert type(store) is expected
    finally:
        await store.close()


def test_the_store_imports_no_engine_web_framework_or_protocol() -> None:
    forbidden = ("vllm", "fastapi", "starlette", "server.protocols", "server.pipeline", "server.engine")
    for path in sorted((ROOT / "server" / "store").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] in forbidden or n.startswith(forbidden)], path.name


def test_postgres_starts_fast_enough_for_the_unit_tier(postgres_server: PostgresServer) -> None:
    assert postgres_server.startup_seconds < 10, postgres_server.startup_seconds
    assert os.path.isdir(postgres_server.data_dir)
