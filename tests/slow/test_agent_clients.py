"""The agent clients people point at this server, run for real against a live server on the real engine.

Claude Code (`@anthropic-ai/claude-code`, pinned in tests/clients) in print mode sends what it
sends every user: a ~50 KB `/v1/messages?beta=true` stream request with its system blocks, a
`system` message among the turns, a dozen tool definitions, `thinking`, `context_management` and
`output_config`. Codex CLI (`@openai/codex`) in `codex exec` mode streams a `/v1/responses` request
with its instructions, tools, `reasoning`, `include`, `prompt_cache_key` and no output limit: the
server's `server.default_max_tokens` bounds it. Their prompts are over 6K tokens, so they run on the
sacrificial "drain" server (128K context, API keys, any model name accepted) before the drain test.
The tiny model's words are meaningless: what is tested is that a turn completes without a protocol
error.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.live_plugin import FAULT_KEY_ENV, FAULT_MAX_MODEL_LEN
from tests.support.live_server import ROOT, SERVED_MODEL, LiveServer
from tests.support.probes import metric

KEY = {"Authorization": f"Bearer {FAULT_KEY_ENV}"}

CLIENTS = ROOT / "tests" / "clients" / "node_modules" / ".bin"
CLAUDE = CLIENTS / "claude"
CODEX = CLIENTS / "codex"


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


def _codex_config(base_url: str) -> str:
    """A custom model provider speaking the Responses API, as a user of a self-hosted model writes it."""
    return f"""\
model = "{SERVED_MODEL}"
model_provider = "gemma"
model_context_window = {FAULT_MAX_MODEL_LEN}
check_for_update_on_startup = false

[model_providers.gemma]
name = "gemma-server"
base_url = "{base_url}/v1"
wire_api = "responses"
env_key = "GEMMA_API_KEY"
# A failing server must fail the test, not make Codex retry for minutes.
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 300000
"""


@pytest.mark.late(0.5)
def test_codex_cli_completes_a_turn(drain_server: LiveServer, tmp_path: Path) -> None:
    assert CODEX.exists(), "run `make test-clients`"
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(_codex_config(drain_server.base_url))
    responses_200 = {"route": "/v1/responses", "status": "200"}
    before = metric(drain_server.base_url, "gemma_server_requests_total", responses_200, KEY)
    done = subprocess.run(
        [str(CODEX), "exec", "--json", "--skip-git-repo-check", "--ephemeral", "--strict-config", "Say hi"],
        cwd=work,
        env=_offline_env(home, CODEX_HOME=str(home), GEMMA_API_KEY=FAULT_KEY_ENV),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,  # a hang bound, far above the few seconds a turn takes here
    )
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    kinds = [event["type"] for event in events]
    assert "turn.started" in kinds, (kinds, done.stderr[-3000:])
    messages = [e["item"] for e in events if e["type"] == "item.completed" and e["item"]["type"] == "agent_message"]
    assert messages and messages[0]["text"], events
    # The tiny random model almost never samples <end_of_turn>, so the turn ends at the server's
    # default output limit: a response.incomplete, which Codex reports as the turn's failure (exit
    # code 1). Anything else (an HTTP error, a stream it could not parse) is a failure here.
    if kinds[-1] == "turn.failed":
        assert events[-1]["error"]["message"] == "Incomplete response returned, reason: max_output_tokens", events
        assert done.returncode == 1, done.returncode
    else:
        assert kinds[-1] == "turn.completed" and done.returncode == 0, (events, done.stderr[-3000:])
    errors = [e for e in events if e["type"] == "error" or e.get("item", {}).get("type") == "error"]
    # Codex has no metadata (context window, tool support) for a model name it does not know: a warning.
    unexpected = [e for e in errors if "Incomplete response" not in str(e) and "Model metadata" not in str(e)]
    assert not unexpected, unexpected
    after = metric(drain_server.base_url, "gemma_server_requests_total", responses_200, KEY)
    assert after - before >= 1, (before, after)
