"""Schema-based fuzzing (schemathesis, positive and negative cases) of every operation in the live
server's /openapi.json: no answer may be a 5xx, and every 4xx must be OpenAI-shaped.

Generation requests are kept cheap (the served model's name in most cases, and at most a few tokens),
so the fuzzer spends its time on request shapes, not on generating text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import SERVED_MODEL
from tests.support.checks import assert_error_object
from tests.support.live_server import LiveServer

EXAMPLES_PER_OPERATION = 120
MAX_FUZZ_TOKENS = 4
seen: dict[str, int] = {}


@pytest.fixture(scope="session")
def api_schema(live_server: LiveServer) -> Any:
    return schemathesis.openapi.from_url(f"{live_server.base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def _cheapen(body: Any, example: int) -> None:
    """Served model for 3 cases in 4; generated token counts capped (the parameter rows that test
    huge values belong to the API-surface suite)."""
    if not isinstance(body, dict):
        return
    if example % 4 and "model" in body:
        body["model"] = SERVED_MODEL
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_FUZZ_TOKENS:
            body[field] = MAX_FUZZ_TOKENS
    if "max_tokens" not in body and "max_completion_tokens" not in body and "messages" in body:
        body["max_tokens"] = MAX_FUZZ_TOKENS
    if isinstance(body.get("n"), int) and body["n"] > 2:
        body["n"] = 2


@pytest.mark.late(3)
@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzzed_requests_never_get_a_5xx(case: Any, live_server: LiveServer) -> None:
    key = f"{case.method} {case.path}"
    seen[key] = seen.get(key, 0) + 1
    _cheapen(case.body, seen[key])
    response = case.call(base_url=live_server.base_url, timeout=120)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        assert_error_object(response.json())


@pytest.fixture(scope="module", autouse=True)
def _report_examples(report: Callable[[str], None]) -> Iterator[None]:
    yield
    if seen:
        report(f"fuzz: {sum(seen.values())} schemathesis examples, no 5xx: {dict(sorted(seen.items()))}")
