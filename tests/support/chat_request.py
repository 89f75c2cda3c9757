"""The chat route, a minimal valid request on the tiny model, and the check that the server still
answers it: shared by the live tests that try to break something and then look."""

from __future__ import annotations

import httpx

from tests.support.live_server import SERVED_MODEL

CHAT = "/v1/chat/completions"
GOOD = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def assert_healthy(base_url: str, headers: dict[str, str] | None = None) -> None:
    """A normal request succeeds right after whatever the test did."""
    response = httpx.post(base_url + CHAT, json=GOOD, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")
