"""LoRA adapters and scoped keys in process, on the scripted engine: which model each route runs on,
what each key sees, the admin endpoints and the checks an adapter passes before the engine sees it.

The real engine's side (outputs per adapter equal vLLM's, load/unload under traffic) is in
tests/integration/test_adapters.py and tests/slow/test_lora_runtime.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from asgi_lifespan import LifespanManager
from pydantic import ValidationError
from safetensors.numpy import save_file

from server.app import create_app
from server.cli import main
from server.errors import BadRequestError
from server.pipeline.adapter_check import check_adapter
from server.settings import Settings
from tests.support.fake_engine import Scripted, ScriptedEngine

BASE = "fake-gemma"
KEYS = {"all": "sk-all-0123456789", "sql": "sk-sql-0123456789", "admin": "sk-admin-0123456789"}


def make_adapter(folder: Path, *, rank: int = 8, module: str = "q_proj", part: str = "language_model") -> Path:
    """A PEFT-layout adapter folder (the tensors' values do not matter to the checks)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 16,
        "target_modules": [module],
        "base_model_name_or_path": "x/tiny-gemma3",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = f"base_model.model.model.{part}.layers.0.self_attn.{module}"
    tensors = {
        f"{prefix}.lora_A.weight": np.ones((rank, 64), np.float32),
        f"{prefix}.lora_B.weight": np.ones((64, rank), np.float32),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def lora_settings(tmp_path: Path, **lora: Any) -> Settings:
    return Settings(
        model={"served_name": BASE, "path": str(tmp_path / "tiny-gemma3")},
        lora={
            "adapters": [
                {"name": "sql-expert", "path": str(make_adapter(tmp_path / "sql"))},
                {"name": "support-bot", "path": str(make_adapter(tmp_path / "support"))},
            ],
            **lora,
        },
        auth={
            "api_keys": [KEYS["all"]],
            "keys": [
                {"sha256": hashlib.sha256(KEYS["sql"].encode()).hexdigest(), "models": ["sql-expert"]},
                {"key": KEYS["admin"], "admin": True},
            ],
        },
    )


@pytest.fixture
async def served(tmp_path: Path, tokenizer: Any) -> AsyncIterator[tuple[httpx.AsyncClient, ScriptedEngine, Path]]:
    engine = ScriptedEngine(tokenizer, Scripted())

    async def start() -> None:
        pass

    app = create_app(lora_settings(tmp_path, runtime_loading=True), engine=engine, start_engine=start)  # type: ignore[arg-type]
    async with LifespanManager(app):
        for _ in range(200):
            if app.state.gemma.ready:
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:
            yield http, engine, tmp_path


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


async def test_models_lists_the_base_and_each_adapter_with_parent_and_root(served) -> None:  # type: ignore[no-untyped-def]
    http, engine, tmp_path = served
    client = openai.AsyncOpenAI(base_url="http://test/v1", api_key=KEYS["all"], http_client=http, max_retries=0)
    models = {m.id: m for m in (await client.models.list()).data}
    assert list(models) == [BASE, "sql-expert", "support-bot"]
    assert models["sql-expert"].model_extra == {
        "root": str((tmp_path / "sql").resolve()),
        "parent": BASE,
        "max_model_len": 1024,
    }
    assert models[BASE].model_extra["parent"] is None
    assert sorted(engine.adapters.values()) == ["sql-expert", "support-bot"]  # loaded before ready


async def test_every_protocol_runs_the_adapter_its_model_names(served) -> None:  # type: ignore[no-untyped-def]
    http, engine, _ = served
    oa = openai.AsyncOpenAI(base_url="http://test/v1", api_key=KEYS["all"], http_client=http, max_retries=0)
    chat = await oa.chat.completions.create(model="sql-expert", messages=[{"role": "user", "content": "hi"}])
    completion = await oa.completions.create(model="support-bot", prompt="hi", max_tokens=4)
    response = await oa.responses.create(model="sql-expert", input="hi", store=False)
    message = await http.post(
        "/v1/messages",
        json={"model": "support-bot", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        headers=auth("all"),
    )
    base = await oa.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}])
    assert (chat.model, completion.model, response.model, base.model) == (
        "sql-expert",
        "support-bot",
        "sql-expert",
        BASE,
    )
    assert message.json()["model"] == "support-bot"
    assert engine.adapter_used == ["sql-expert", "support-bot", "sql-expert", "support-bot", None]


async def test_a_scoped_key_sees_and_uses_only_its_names_and_others_are_404(served) -> None:  # type: ignore[no-untyped-def]
    http, engine, _ = served
    models = (await http.get("/v1/models", headers=auth("sql"))).json()["data"]
    assert [m["id"] for m in models] == ["sql-expert"]
    assert (await http.get("/v1/models/support-bot", headers=auth("sql"))).status_code == 404
    assert (await http.get("/v1/models/sql-expert", headers=auth("sql"))).status_code == 200
    user = [{"role": "user", "content": "hi"}]
    refused = {
        "/v1/chat/completions": {"model": "support-bot", "messages": user},
        "/v1/completions": {"model": BASE, "prompt": "hi"},
        "/tokenize": {"model": "support-bot", "prompt": "hi"},
        "/detokenize": {"model": BASE, "tokens": [2]},
        "/v1/responses": {"model": "support-bot", "input": "hi"},
        "/v1/messages": {"model": BASE, "max_tokens": 4, "messages": user},
        "/v1/messages/count_tokens": {"model": "support-bot", "messages": user},
    }
    for path, body in refused.items():
        answer = await http.post(path, json=body, headers=auth("sql"))
        assert answer.status_code == 404, (path, answer.text)
        assert "support-bot" not in answer.text.replace(f"'{body['model']}'", ""), answer.text  # no other names leak
    ok = await http.post("/v1/chat/completions", json={"model": "sql-expert", "messages": user}, headers=auth("sql"))
    assert ok.status_code == 200
    assert (
        await http.post("/tokenize", json={"model": "sql-expert", "prompt": "hi"}, headers=auth("sql"))
    ).status_code == 200
    assert engine.adapter_used == ["sql-expert"]


async def test_only_an_admin_key_loads_and_a_bad_adapter_is_a_400_that_changes_nothing(served) -> None:  # type: ignore[no-untyped-def]
    http, engine, tmp_path = served
    good = make_adapter(tmp_path / "new")
    body = {"lora_name": "new-one", "lora_path": str(good)}
    assert (await http.post("/v1/load_lora_adapter", json=body, headers=auth("all"))).status_code == 403
    assert (await http.post("/v1/load_lora_adapter", json=body, headers=auth("sql"))).status_code == 403
    truncated = make_adapter(tmp_path / "cut")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    bad = {
        "adapter_rank_too_large": make_adapter(tmp_path / "big", rank=32),
        "adapter_corrupt": truncated,
        "adapter_unsupported_modules": make_adapter(tmp_path / "vision", part="vision_tower.vision_model.encoder"),
        "adapter_not_found": tmp_path / "nowhere",
    }
    for code, path in bad.items():
        answer = await http.post(
            "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(path)}, headers=auth("admin")
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == code
    engine.refuse_adapters = True  # the engine's own refusal (e.g. shapes) is a 400 too
    assert (await http.post("/v1/load_lora_adapter", json=body, headers=auth("admin"))).status_code == 400
    engine.refuse_adapters = False
    names = [m["id"] for m in (await http.get("/v1/models", headers=auth("all"))).json()["data"]]
    assert names == [BASE, "sql-expert", "support-bot"]
    clash = await http.post("/v1/load_lora_adapter", json={**body, "lora_name": "sql-expert"}, headers=auth("admin"))
    assert clash.json()["error"]["code"] == "adapter_exists"
    loaded = await http.post("/v1/load_lora_adapter", json=body, headers=auth("admin"))
    assert loaded.status_code == 200, loaded.text
    user = [{"role": "user", "content": "hi"}]
    chat = await http.post("/v1/chat/completions", json={"model": "new-one", "messages": user}, headers=auth("all"))
    assert chat.json()["model"] == "new-one"
    assert "new-one" in engine.adapters.values()


async def test_unloading_lets_running_generations_finish_and_then_the_name_is_404(served) -> None:  # type: ignore[no-untyped-def]
    http, engine, _ = served
    engine.token_seconds = 0.05
    user = [{"role": "user", "content": "hi"}]
    running = asyncio.create_task(
        http.post(
            "/v1/chat/completions", json={"model": "support-bot", "messages": user, "stream": True}, headers=auth("all")
        )
    )
    await asyncio.sleep(0.1)
    unload = await http.post("/v1/unload_lora_adapter", json={"lora_name": "support-bot"}, headers=auth("admin"))
    assert unload.status_code == 200
    finished = await running
    assert finished.status_code == 200 and "[DONE]" in finished.text
    assert "support-bot" not in engine.adapters.values()
    after = await http.post(
        "/v1/chat/completions", json={"model": "support-bot", "messages": user}, headers=auth("all")
    )
    assert after.status_code == 404
    again = await http.post("/v1/unload_lora_adapter", json={"lora_name": "support-bot"}, headers=auth("admin"))
    assert again.status_code == 404


async def test_without_runtime_loading_the_admin_routes_are_404_even_to_an_admin(
    tmp_path: Path, tokenizer: Any
) -> None:
    engine = ScriptedEngine(tokenizer, Scripted())

    async def start() -> None:
        pass

    app = create_app(lora_settings(tmp_path), engine=engine, start_engine=start)  # type: ignore[arg-type]
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            body = {"lora_name": "x", "lora_path": "/tmp"}
            answer = await http.post("/v1/load_lora_adapter", json=body, headers=auth("admin"))
            assert answer.status_code == 404


def test_settings_refuse_what_could_not_work(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs an admin key"):
        Settings(lora={"runtime_loading": True})
    admin = {"keys": [{"key": KEYS["admin"], "admin": True}]}
    with pytest.raises(ValidationError, match="api_processes: 1"):
        Settings(lora={"runtime_loading": True}, auth=admin, server={"api_processes": 2})
    with pytest.raises(ValidationError, match="already the served model"):
        Settings(lora={"adapters": [{"name": "gemma-3-4b-it", "path": "/a"}]})
    with pytest.raises(ValidationError, match="more than once"):
        Settings(lora={"adapters": [{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]})
    with pytest.raises(ValidationError, match="exactly one of"):
        Settings(auth={"keys": [{"models": ["a"]}]})
    assert not Settings().lora.enabled
    assert Settings(lora={"runtime_loading": True}, auth=admin).lora.enabled


def test_the_check_refuses_another_models_adapter_and_pickles(tmp_path: Path) -> None:
    folder = make_adapter(tmp_path / "llama")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "meta-llama/Llama-3.1-8B"})
    )
    with pytest.raises(BadRequestError, match=re.escape("made for 'meta-llama/Llama-3.1-8B'")):
        check_adapter(str(folder), max_rank=16, base_model="/models/tiny-gemma3")
    pickled = make_adapter(tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(BadRequestError, match="not a pickled"):
        check_adapter(str(pickled), max_rank=16, base_model="tiny-gemma3")
    embed = make_adapter(tmp_path / "embed", module="embed_tokens")
    with pytest.raises(BadRequestError, match="embed_tokens"):
        check_adapter(str(embed), max_rank=16, base_model="tiny-gemma3")
    check_adapter(str(make_adapter(tmp_path / "fine")), max_rank=16, base_model="google/tiny-gemma3")


def test_hash_key_prints_what_auth_keys_sha256_takes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(KEYS["sql"] + "\n"))
    assert main(["hash-key"]) == 0
    digest = capsys.readouterr().out.strip()
    assert digest == hashlib.sha256(KEYS["sql"].encode()).hexdigest()
    assert Settings(auth={"keys": [{"sha256": digest, "models": ["x"]}]}).auth.keys[0].sha256 == digest
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["hash-key"]) == 2
