"""The HTTP contract seen with a raw client: probes, models, metrics, SSE framing, disconnects."""

from __future__ import annotations

import contextlib
import json
import time

import httpx

from tests.support.live_server import SERVED_MODEL
from tests.support.oracle_cases import LORA_ADAPTERS
from tests.support.probes import metric


def test_health_and_ready(base_url: str) -> None:
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{base_url}/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


def test_models_list_and_card(base_url: str, openai_client) -> None:  # type: ignore[no-untyped-def]
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [SERVED_MODEL, *LORA_ADAPTERS]  # the live server's adapters
    card = httpx.get(f"{base_url}/v1/models/{SERVED_MODEL}").json()
    assert card["id"] == SERVED_MODEL and card["object"] == "model"
    missing = httpx.get(f"{base_url}/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_metrics_has_engine_and_server_series(base_url: str) -> None:
    httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        timeout=60,
    ).raise_for_status()
    text = httpx.get(f"{base_url}/metrics").text
    assert "vllm:num_requests_running" in text
    assert "vllm:num_requests_waiting" in text
    assert 'gemma_server_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "gemma_server_request_duration_seconds_bucket" in text


def test_sse_framing(base_url: str) -> None:
    body = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [block for block in raw.split("\n\n") if block]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[len("data: ") :]) for event in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunks[0]


def test_malformed_json_and_wrong_body_types_are_openai_shaped_400s(base_url: str) -> None:
    url = f"{base_url}/v1/chat/completions"
    for content in (b"{bad", b"[]", b"42", b"null"):
        response = httpx.post(url, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, content
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"


def _running_requests(base_url: str) -> float:
    return metric(base_url, "vllm:num_requests_running")


def test_client_disconnect_aborts_the_engine_request(base_url: str) -> None:
    body = {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": "Go on forever"}],
        "max_tokens": 4000,
        "stream": True,
    }
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {") and '"role"' not in line:
                break
        # The engine's gauges are refreshed with its output batches: keep reading until it shows.
        deadline = time.monotonic() + 10
        while _running_requests(base_url) < 1 and time.monotonic() < deadline:
            next(lines)
        assert _running_requests(base_url) >= 1
    deadline = time.monotonic() + 10
    while _running_requests(base_url) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running_requests(base_url) == 0


def test_non_streaming_disconnect_aborts_the_engine_request(base_url: str) -> None:
    body = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Go on forever"}], "max_tokens": 4000}
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 10
    while _running_requests(base_url) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running_requests(base_url) == 0
