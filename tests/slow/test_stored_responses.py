"""Stored responses across a restart and across API processes, on the sacrificial servers and the
real PostgreSQL they share (tests/support/live_plugin.py).

The "drain" server stores responses before its drain test stops it; the "engine_death" server starts
after that on the same database: the same server restarted, now with two API processes (two
replicas' worth of writers on one store). It must give back every response and its input items
byte for byte, continue a `previous_response_id` chain exactly as the first server would have,
keep them from another key (404 on every route), and let each API process read, chain and cancel
what the other made. Connections are not reused (`Connection: close`), so the kernel spreads the
requests over both processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support.images import png_data_uri
from tests.support.live_plugin import FAULT_KEY_ENV, FAULT_KEY_FILE
from tests.support.live_server import SERVED_MODEL, LiveServer
from tests.support.probes import metric, wait_for

OWNER = {"Authorization": f"Bearer {FAULT_KEY_ENV}", "Connection": "close"}
STRANGER = {"Authorization": f"Bearer {FAULT_KEY_FILE}", "Connection": "close"}
POEM = "Write a haiku about the sea."


def _create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    answer = client.post("/v1/responses", json={"model": SERVED_MODEL, "temperature": 0, **body}, headers=OWNER)
    assert answer.status_code == 200, answer.text
    created: dict[str, Any] = answer.json()
    return created


def _finished(client: httpx.Client, response_id: str, timeout: float = 300) -> dict[str, Any]:
    """Polls a background response until it is no longer queued or in progress (a hang bound: the
    tiny model's few tokens take well under a second, a machine stall up to two minutes)."""
    deadline = time.monotonic() + timeout
    while (polled := client.get(f"/v1/responses/{response_id}", headers=OWNER).json())["status"] in (
        "queued",
        "in_progress",
    ):
        assert time.monotonic() < deadline, polled
        time.sleep(0.2)
    return polled


def _as_stored(client: httpx.Client, response_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    response = client.get(f"/v1/responses/{response_id}", headers=OWNER)
    items = client.get(f"/v1/responses/{response_id}/input_items", params={"limit": 100}, headers=OWNER)
    assert response.status_code == 200 and items.status_code == 200, (response.text, items.text)
    return response.json(), items.json()


@pytest.fixture(scope="session")  # not module: the late tests of other modules run in between
def stored_before_restart() -> dict[str, Any]:
    """What the drain server stored, for the restarted server's test to read back."""
    return {}


@pytest.mark.late(1.8)
def test_the_drain_server_stores_responses_in_postgresql(
    drain_server: LiveServer, stored_before_restart: dict[str, Any]
) -> None:
    with httpx.Client(base_url=drain_server.base_url, timeout=300) as client:
        poem = _create(client, instructions="You are a poet.", input=POEM, max_output_tokens=8)
        picture = [
            {"type": "input_text", "text": "Describe"},
            {"type": "input_image", "image_url": png_data_uri(64, 48)},
        ]
        image = _create(client, input=[{"role": "user", "content": picture}], max_output_tokens=4)
        follow = _create(client, previous_response_id=poem["id"], input="Another, please.", max_output_tokens=6)
        queued = _create(client, input=POEM, background=True, max_output_tokens=8)
        background = _finished(client, queued["id"])
        assert background["status"] == "incomplete", background
        deleted = _create(client, input=POEM, max_output_tokens=2)
        assert client.delete(f"/v1/responses/{deleted['id']}", headers=OWNER).status_code == 200
        # What a next turn on the chain says, without storing it: the restarted server must say the same.
        next_turn = _create(
            client, previous_response_id=follow["id"], input="And again.", max_output_tokens=6, store=False
        )
        stored_before_restart.update(
            records={r["id"]: _as_stored(client, r["id"]) for r in (poem, image, follow, background)},
            deleted=deleted["id"],
            chain_end=follow["id"],
            next_turn=next_turn["output"],
        )
    image_items = stored_before_restart["records"][image["id"]][1]["data"]
    assert [part["type"] for part in image_items[0]["content"]] == ["input_text", "input_image"], image_items


@pytest.mark.late(3.4)
def test_the_restarted_server_gives_them_back_to_their_owner_only_on_both_api_processes(
    engine_death_server: LiveServer, stored_before_restart: dict[str, Any], report: Callable[[str], None]
) -> None:
    assert stored_before_restart, "test_the_drain_server_stores_responses_in_postgresql (late 1.8) runs first"
    base = engine_death_server.base_url
    with httpx.Client(base_url=base, timeout=300) as client:
        for response_id, (response, items) in stored_before_restart["records"].items():
            assert _as_stored(client, response_id) == (response, items)
            for method, path in (
                ("GET", f"/v1/responses/{response_id}"),
                ("GET", f"/v1/responses/{response_id}/input_items"),
                ("POST", f"/v1/responses/{response_id}/cancel"),
                ("DELETE", f"/v1/responses/{response_id}"),
            ):
                refused = client.request(method, path, headers=STRANGER)
                assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found", refused.text
        chained_by_stranger = client.post(
            "/v1/responses",
            json={"model": SERVED_MODEL, "previous_response_id": stored_before_restart["chain_end"], "input": "Hi"},
            headers=STRANGER,
        )
        assert chained_by_stranger.status_code == 404, chained_by_stranger.text
        assert client.get(f"/v1/responses/{stored_before_restart['deleted']}", headers=OWNER).status_code == 404
        next_turn = _create(
            client, previous_response_id=stored_before_restart["chain_end"], input="And again.", max_output_tokens=6
        )
        assert next_turn["output"][0]["content"] == stored_before_restart["next_turn"][0]["content"]

        # Each request on a new connection, so either API process answers it: a chain of turns, each
        # read back at once.
        previous = next_turn["id"]
        for turn in range(8):
            made = _create(client, previous_response_id=previous, input=f"Turn {turn}", max_output_tokens=2)
            assert client.get(f"/v1/responses/{made['id']}", headers=OWNER).json() == made
            previous = made["id"]
        items = client.get(f"/v1/responses/{previous}/input_items", params={"limit": 100}, headers=OWNER).json()
        assert len(items["data"]) == 1 and items["data"][0]["content"][0]["text"] == "Turn 7", items

        # A long background response, cancelled by whichever process gets the request: the one running
        # it stops its engine request within a quarter of the lease (responses.background_lease_seconds).
        long = _create(client, input=POEM, background=True, max_output_tokens=20000)
        assert wait_for(lambda: metric(base, "vllm:num_requests_running", None, OWNER) >= 1, 120)
        for _ in range(4):
            assert client.get(f"/v1/responses/{long['id']}", headers=OWNER).json()["status"] in (
                "queued",
                "in_progress",
            )
        cancelled_at = time.monotonic()
        cancelled = client.post(f"/v1/responses/{long['id']}/cancel", headers=OWNER)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        # A hang bound: the lease keeper beats every 30 s by default; a machine stall adds up to two minutes.
        stopped = wait_for(lambda: metric(base, "vllm:num_requests_running", None, OWNER) == 0, 180)
        stop_seconds = time.monotonic() - cancelled_at
        assert stopped, "the cancelled background response still runs on the engine"
        assert client.get(f"/v1/responses/{long['id']}", headers=OWNER).json()["status"] == "cancelled"
    report(
        f"stored responses on PostgreSQL: {len(stored_before_restart['records'])} read back whole after the "
        f"restart; a background response cancelled through either API process left the engine "
        f"{stop_seconds:.1f} s after the cancel"
    )
