"""Schema-based fuzzing (schemathesis, positive and negative cases) of every operation in the live
server's /openapi.json: no answer may be a 5xx, and every 4xx must be OpenAI-shaped.

schemathesis's pytest integration (`from_fixture`) does not work with pytest 9.2 (it sets the
removed `Item._nodeid`), so the operations' hypothesis strategies are driven directly.
Generation requests are kept cheap (the served model's name in most cases, at most a few tokens),
so the fuzzer spends its time on request shapes, not on generating text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from tests.support.checks import assert_error_object
from tests.support.live_server import SERVED_MODEL, LiveServer

# Per operation and mode; a CI-time budget (about 90 ms an example on the live server; derandomized,
# so each run replays the same examples). Was 200/150: cut to make room for the compose stack's tests.
EXAMPLES = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 120}
MAX_FUZZ_TOKENS = 4


def _cheapen(body: Any, example: int) -> None:
    """The served model in 3 cases of 4; generated token counts capped (the parameter rows that
    test huge values belong to the API-surface suite)."""
    if not isinstance(body, dict):
        return
    if example % 4 and "model" in body:
        body["model"] = SERVED_MODEL
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(field)
        # null asks for the rest of the context: thousands of tokens, minutes on a loaded machine
        # (one such case timed out at 120 s, and hypothesis then replayed it while shrinking).
        too_many = value is None and field in body
        if too_many or (isinstance(value, int) and not isinstance(value, bool) and value > MAX_FUZZ_TOKENS):
            body[field] = MAX_FUZZ_TOKENS
    if "max_tokens" not in body and "max_completion_tokens" not in body and ("messages" in body or "prompt" in body):
        body["max_tokens"] = MAX_FUZZ_TOKENS
    if "input" in body and "max_output_tokens" not in body:  # the Responses API
        body["max_output_tokens"] = MAX_FUZZ_TOKENS
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > 2:
        body["n"] = 2


def _fuzz(operation: Any, mode: GenerationMode, base_url: str, examples: Counter[str], statuses: Counter[int]) -> None:
    label = f"{operation.method.upper()} {operation.path} ({mode.value})"

    @settings(max_examples=EXAMPLES[mode], deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        examples[label] += 1
        _cheapen(case.body, examples[label])
        response = case.call(base_url=base_url, timeout=120)
        statuses[response.status_code] += 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        if response.status_code >= 400 and case.path.startswith("/v1/messages"):
            body = response.json()  # Anthropic's routes answer in Anthropic's error shape
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        elif response.status_code >= 400:
            assert_error_object(response.json())

    try:
        run()
    except Unsatisfiable:
        # No way to break an operation that takes nothing (GET /health): no negative cases exist.
        assert mode is GenerationMode.NEGATIVE and examples[label] == 0, label


@pytest.mark.late(3)
def test_fuzzed_requests_never_get_a_5xx(live_server: LiveServer, report: Callable[[str], None]) -> None:
    schema = schemathesis.openapi.from_url(f"{live_server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/chat/completions", "GET /v1/models"}
    examples: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    for operation in operations:
        for mode in EXAMPLES:
            _fuzz(operation, mode, live_server.base_url, examples, statuses)
    report(
        f"fuzz: {sum(examples.values())} schemathesis examples over {len(operations)} operations "
        f"(positive and negative), statuses {dict(sorted(statuses.items()))}, no 5xx; per operation "
        f"{dict(sorted(examples.items()))}"
    )
