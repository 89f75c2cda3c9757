"""What sits in front of the engine, in process on a fake engine: auth, CORS, limits, admission,
drain, and errors mid-stream. The same rows are proven against the live server in
tests/integration; here every route and branch is walked quickly."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

import server.edge.auth as auth
from server.lifecycle import drain
from server.settings import load_settings
from tests.support.checks import (
    assert_anthropic_error,
    assert_openai_error,
    assert_stream_ends_with_error_then_done,
    sse_events,
)
from tests.support.fake_engine import MODEL, PacedEngine, fake_settings, running_app

KEY = "sk-test-0123456789abcdef"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def _every_route(app: FastAPI) -> list[tuple[str, str, str]]:
    """(method, concrete path, template) for every route the app serves."""
    found = []
    for route in app.routes:
        methods = sorted(getattr(route, "methods", None) or {"GET"})
        path = getattr(route, "path", None)
        assert path is not None, route
        found.extend((method, _concrete(path), path) for method in methods)
    return found


async def _normal_request_succeeds(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> None:
    response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"


# ---- auth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("metrics_public", [True, False])
async def test_walk_every_route_only_probes_answer_without_a_key(metrics_public: bool) -> None:
    settings = fake_settings(auth={"api_keys": [KEY], "metrics_public": metrics_public})
    public = {"/health", "/ready"} | ({"/metrics"} if metrics_public else set())
    async with running_app(settings) as (app, client, _):
        routes = _every_route(app)
        assert {template for _, _, template in routes} >= {
            "/v1/chat/completions",
            "/v1/models",
            "/docs",
            "/openapi.json",
        }
        for method, path, template in routes:
            anonymous = await client.request(method, path, json=CHAT if method == "POST" else None)
            if template in public:
                assert anonymous.status_code != 401, (method, path)
            elif method == "HEAD":
                assert anonymous.status_code == 401, path  # no body to check
            elif template.startswith("/v1/messages"):  # Anthropic's routes answer in Anthropic's shape
                assert_anthropic_error(anonymous, 401, "authentication_error")
            else:
                error = assert_openai_error(anonymous, 401, "invalid_api_key")
                assert anonymous.headers["www-authenticate"] == "Bearer", (method, path)
                assert error["type"] == "authentication_error"
            keyed = await client.request(
                method, path, json=CHAT if method == "POST" else None, headers={"Authorization": f"Bearer {KEY}"}
            )
            assert keyed.status_code not in (401, 500), (method, path, keyed.text)
        # Paths no route matches need the key too (and then get an OpenAI-shaped 404).
        assert_openai_error(await client.get("/admin"), 401)
        assert_openai_error(await client.get("/admin", headers={"Authorization": f"Bearer {KEY}"}), 404)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {KEY}",
        f"Token {KEY}",
        "Bearer wrong-key-of-the-same-length!!",
        "Bearer x",
        "Bearer " + "k" * 10_000,
        f"Bearer {KEY[:-1]}",
        f"Bearer {KEY}x",
    ],
)
async def test_missing_malformed_wrong_and_wrong_length_keys_are_401(header: str | None) -> None:
    async with running_app(fake_settings(auth={"api_keys": [KEY]})) as (_, client, _engine):
        headers = {"Authorization": header} if header is not None else {}
        assert_openai_error(await client.post("/v1/chat/completions", json=CHAT, headers=headers), 401)
        await _normal_request_succeeds(client, {"Authorization": f"bearer {KEY}"})


@pytest.mark.parametrize(
    ("path", "host"),
    [
        ("/v1/models", "localhost/health?"),
        ("/v1/models", "localhost/health#"),
        ("/v1/models", "example.com:8000/ready"),
        ("/health/../v1/models", "localhost"),
        ("//v1/models", "localhost"),
        ("/v1/models?/health", "localhost"),
        ("/v1/models;/health", "localhost"),
        ("/HEALTH/../v1/models", "localhost"),
    ],
)
async def test_host_header_and_path_tricks_do_not_bypass_auth(path: str, host: str) -> None:
    async with running_app(fake_settings(auth={"api_keys": [KEY]})) as (_, client, _engine):
        response = await client.get(path, headers={"Host": host})
        assert_openai_error(response, 401)


async def test_keys_from_config_environment_and_file_with_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# one key per line\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("GEMMA_SERVER_AUTH__API_KEYS", '["env-key-1", "env-key-2"]')
    monkeypatch.setenv("GEMMA_SERVER_AUTH__API_KEYS_FILE", str(key_file))
    monkeypatch.setenv("GEMMA_SERVER_MODEL__SERVED_NAME", MODEL)
    monkeypatch.setattr(auth, "KEY_FILE_RECHECK_SECONDS", 0.0)
    settings = load_settings()
    async with running_app(settings) as (_, client, _engine):
        for key in ("env-key-1", "env-key-2", "file-key-1", "file-key-2"):
            await _normal_request_succeeds(client, {"Authorization": f"Bearer {key}"})
        key_file.write_text("file-key-3\n")
        assert_openai_error(await client.get("/v1/models", headers={"Authorization": "Bearer file-key-1"}), 401)
        await _normal_request_succeeds(client, {"Authorization": "Bearer file-key-3"})
        await _normal_request_succeeds(client, {"Authorization": "Bearer env-key-1"})


async def test_an_empty_key_file_keeps_auth_on(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("\n# nothing yet\n")
    async with running_app(fake_settings(auth={"api_keys_file": str(key_file)})) as (_, client, _engine):
        assert_openai_error(await client.get("/v1/models"), 401)
        assert (await client.get("/health")).status_code == 200


def test_key_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured key is compared, always as two 32-byte digests, with compare_digest."""
    calls: list[tuple[int, int]] = []
    real = auth.hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    keys = auth.ApiKeys(fake_settings(auth={"api_keys": ["first-key", "second-key-longer", "k3"]}).auth)
    for presented in ("first-key", "k3", "nope", "x" * 5000, ""):
        calls.clear()
        keys.accepts(presented)
        assert calls == [(32, 32)] * 3, presented


# ---- CORS ---------------------------------------------------------------------------------------


async def test_cors_is_off_by_default_and_options_is_an_openai_405() -> None:
    async with running_app(fake_settings()) as (_, client, _engine):
        preflight = await client.options(
            "/v1/chat/completions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert_openai_error(preflight, 405)
        assert "access-control-allow-origin" not in preflight.headers
        response = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


async def test_cors_when_configured_allows_listed_origins_and_refuses_others_in_openai_shape() -> None:
    settings = fake_settings(auth={"api_keys": [KEY], "cors_allow_origins": ["https://app.example"]})
    async with running_app(settings) as (_, client, _engine):
        preflight = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
            },
        )
        assert preflight.status_code == 200  # preflights carry no credentials: no key needed
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        refused = await client.options(
            "/v1/chat/completions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert_openai_error(refused, 400, "cors_preflight_refused")
        denied = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"})
        assert_openai_error(denied, 401)
        assert denied.headers["access-control-allow-origin"] == "https://app.example"
        ok = await client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"Origin": "https://app.example", "Authorization": f"Bearer {KEY}"},
        )
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"


# ---- limits -------------------------------------------------------------------------------------


async def test_body_over_the_limit_is_413_from_content_length_without_reading_it() -> None:
    received: list[int] = []
    async with running_app(fake_settings(server={"max_body_bytes": 4096})) as (_app, client, _engine):

        async def body() -> Any:
            for _ in range(100):
                received.append(1)
                yield b"x" * 1024

        declared = await client.post(
            "/v1/chat/completions", content=b"x" * 5000, headers={"content-type": "application/json"}
        )
        assert_openai_error(declared, 413, "request_too_large")
        assert declared.headers["connection"] == "close"
        streamed = await client.post(
            "/v1/chat/completions", content=body(), headers={"content-type": "application/json"}
        )
        assert_openai_error(streamed, 413, "request_too_large")
        assert len(received) <= 6  # stopped reading right after the limit
        await _normal_request_succeeds(client)


@pytest.mark.parametrize(
    "headers",
    [
        {f"x-h-{i}": "v" for i in range(1000)},
        {"x-big": "a" * 70_000},
        {f"x-h-{i}": "v" * 1000 for i in range(80)},
    ],
)
async def test_too_many_or_too_large_headers_are_431(headers: dict[str, str]) -> None:
    async with running_app(fake_settings()) as (_, client, _engine):
        assert_openai_error(await client.post("/v1/chat/completions", json=CHAT, headers=headers), 431)
        await _normal_request_succeeds(client)


async def test_invalid_content_length_is_400() -> None:
    async with running_app(fake_settings()) as (_, client, _engine):
        response = await client.post(
            "/v1/chat/completions", content=b"{}", headers={"content-length": "abc", "content-type": "application/json"}
        )
        assert_openai_error(response, 400)


async def test_trailing_slash_is_a_404_not_a_redirect_built_from_the_host_header() -> None:
    async with running_app(fake_settings()) as (_, client, _engine):
        response = await client.post("/v1/chat/completions/", json=CHAT, headers={"Host": "evil.example"})
        assert_openai_error(response, 404)
        assert "location" not in response.headers
        await _normal_request_succeeds(client)


async def test_every_route_documents_its_error_shape() -> None:
    async with running_app(fake_settings()) as (app, _client, _engine):
        chat = next(r for r in app.routes if isinstance(r, APIRoute) and r.path == "/v1/chat/completions")
        assert {400, 401, 413, 429, 431, 503} <= {int(code) for code in chat.responses}


# ---- admission, drain, engine errors ------------------------------------------------------------


async def test_overload_gives_only_200s_and_429s_with_retry_after() -> None:
    settings = fake_settings(admission={"max_in_flight": 2, "max_waiting": 2, "retry_after_seconds": 2})
    async with running_app(settings, PacedEngine(token_seconds=0.01)) as (_, client, engine):
        body = {**CHAT, "max_tokens": 20}
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(16)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 429}, statuses
        assert statuses.count(200) >= 4
        for response in responses:
            if response.status_code == 429:
                assert_openai_error(response, 429, "server_busy")
                assert response.headers["retry-after"] == "2"
        assert engine.started == statuses.count(200)
        await _normal_request_succeeds(client)


async def test_drain_lets_short_requests_finish_and_aborts_the_rest_with_errors() -> None:
    settings = fake_settings(server={"drain_timeout_seconds": 0.5}, admission={"retry_after_seconds": 4})
    engine = PacedEngine(token_seconds=0.02)
    async with running_app(settings, engine) as (app, client, _):
        state = app.state.gemma
        short = [client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5, "stream": s}) for s in (0, 1)]
        long = [client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5000, "stream": s}) for s in (0, 1)]
        tasks = [asyncio.ensure_future(request) for request in short + long]
        for _ in range(500):
            if engine.generating == 4:
                break
            await asyncio.sleep(0.01)
        assert engine.generating == 4, [task.result().text for task in tasks if task.done()]
        drainer = asyncio.ensure_future(drain(state))
        await asyncio.sleep(0.05)
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["reason"] == "draining"
        refused = await client.post("/v1/chat/completions", json=CHAT)
        assert_openai_error(refused, 503, "server_shutting_down")
        assert refused.headers["retry-after"] == "4"
        await asyncio.wait_for(drainer, 10)
        short_plain, short_stream, long_plain, long_stream = [task.result() for task in tasks]
        assert short_plain.json()["choices"][0]["finish_reason"] == "length"
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in sse_events(short_stream.text)[1:-1]]
        assert finish[-1] == "length"
        assert_openai_error(long_plain, 503)
        assert_stream_ends_with_error_then_done(long_stream.text)
        assert state.admission.in_flight == 0


async def test_an_engine_error_mid_stream_ends_with_an_error_event_then_done() -> None:
    async with running_app(fake_settings(), PacedEngine(fail_after=3)) as (_, client, _engine):
        streamed = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10, "stream": True})
        assert streamed.status_code == 200
        events = sse_events(streamed.text)
        assert len(events) >= 4  # role, three tokens, then the error
        assert_stream_ends_with_error_then_done(streamed.text, "engine_error")
        plain = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10})
        assert_openai_error(plain, 500, "engine_error")
        await _normal_request_succeeds(client)
