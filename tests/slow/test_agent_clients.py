"""The agent clients people point at this server, run for real against a live server on the real engine.

Claude Code (`@anthropic-ai/claude-code`, pinned in tests/clients) in print mode sends what it
sends every user: a ~50 KB `/v1/messages?beta=true` stream request with its system blocks, a
`system` message among the turns, a dozen tool definitions, `thinking`, `context_management` and
`output_config`. Its prompt is over 8K tokens, so it runs on the sacrificial "drain" server (128K
context, API keys, any model name accepted) before the drain test. The tiny model's words are
meaningless: what is tested is that a turn completes without a protocol error.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.live_plugin import FAULT_KEY_ENV
from tests.support.live_server import ROOT, LiveServer

CLAUDE = ROOT / "tests" / "clients" / "node_modules" / ".bin" / "claude"


def _offline_env(home: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        **extra,
    }


@pytest.mark.late(0.5)
def test_claude_code_completes_a_turn(drain_server: LiveServer, tmp_path: Path) -> None:
    assert CLAUDE.exists(), "run `make test-clients`"
    home = tmp_path / "home"
    home.mkdir()
    env = _offline_env(
        home,
        ANTHROPIC_BASE_URL=drain_server.base_url,
        ANTHROPIC_API_KEY=FAULT_KEY_ENV,  # sent as x-api-key
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        CLAUDE_CODE_MAX_RETRIES="1",  # a failing server must fail the test, not make it retry for minutes
        # The client's own output limit, as users of local models set it: the random tiny model rarely
        # ends a turn by itself, and 32K tokens would take minutes here.
        CLAUDE_CODE_MAX_OUTPUT_TOKENS="48",
    )
    done = subprocess.run(
        [str(CLAUDE), "-p", "Say hi", "--output-format", "json", "--max-turns", "1"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,  # a hang bound, far above the ~1 minute a turn takes here
    )
    result = json.loads(done.stdout)
    assert result["type"] == "result", result
    # The tiny random model almost never samples <end_of_turn>, so every turn ends at Claude Code's
    # output limit; Claude Code reports that as its own error ("exceeded the 48 output token
    # maximum", exit code 1) after the turns completed. Anything else is a failure: an HTTP error
    # (api_error_status), a stream it could not parse, a refused request.
    if result["is_error"]:
        assert result.get("api_error") == "max_output_tokens" and result.get("api_error_status") is None, result
        assert done.returncode == 1, done.returncode
    else:
        assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert result["num_turns"] >= 1, result
    usage = result["usage"]
    # The whole prompt (system blocks, tools, the system message) reached the model, and it answered.
    assert usage["input_tokens"] + usage.get("cache_read_input_tokens", 0) > 2000, usage
    assert usage["output_tokens"] > 0, usage
