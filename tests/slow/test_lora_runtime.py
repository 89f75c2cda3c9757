"""LoRA adapters at runtime and keys scoped to names, on a real engine (the drain server: API keys,
the two tiny adapters, `lora.runtime_loading` on, one key for adapter a only and one admin key).

- A scoped key sees and uses only its names, in every route of every protocol; the rest is 404.
- An admin loads, serves, unloads and reloads an adapter while clients keep sending requests to
  the base model, a configured adapter and the one being swapped: no request fails (the swapped
  name, while unloaded, is answered by the base: this server has `model.accept_any_name`), and a
  stream running on it when it is unloaded finishes.
- Bad adapters are 400s, whether this server's checks or the engine's refuse them, and leave the
  engine serving.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.support.live_plugin import FAULT_KEY_ENV, LORA_ADMIN_KEY, LORA_SCOPED_KEY
from tests.support.live_server import SERVED_MODEL, LiveServer

EVERY = {"Authorization": f"Bearer {FAULT_KEY_ENV}"}
SCOPED = {"Authorization": f"Bearer {LORA_SCOPED_KEY}"}
ADMIN = {"Authorization": f"Bearer {LORA_ADMIN_KEY}"}
USER = [{"role": "user", "content": "Say something."}]
SWAPPED = "hot-swap"


def _chat(model: str, max_tokens: int = 4, **extra: object) -> dict:
    return {"model": model, "messages": USER, "max_tokens": max_tokens, "temperature": 0, **extra}


@pytest.mark.late(0.7)
def test_a_scoped_key_sees_and_uses_only_its_adapter_on_every_route(drain_server: LiveServer) -> None:
    base = drain_server.base_url
    with httpx.Client(base_url=base, timeout=120) as http:
        assert [m["id"] for m in http.get("/v1/models", headers=SCOPED).json()["data"]] == ["tiny-lora-a"]
        everything = [m["id"] for m in http.get("/v1/models", headers=EVERY).json()["data"]]
        assert everything == [SERVED_MODEL, "tiny-lora-a", "tiny-lora-b"]
        allowed = http.post("/v1/chat/completions", json=_chat("tiny-lora-a"), headers=SCOPED)
        assert allowed.status_code == 200 and allowed.json()["model"] == "tiny-lora-a"
        for other in (SERVED_MODEL, "tiny-lora-b", "claude-sonnet-4-5"):  # the last: any name = the base here
            refused = {
                "/v1/models/" + other: None,
                "/v1/chat/completions": _chat(other),
                "/v1/completions": {"model": other, "prompt": "hi", "max_tokens": 2},
                "/tokenize": {"model": other, "prompt": "hi"},
                "/v1/responses": {"model": other, "input": "hi", "max_output_tokens": 4},
                "/v1/messages": {"model": other, "max_tokens": 4, "messages": USER},
                "/v1/messages/count_tokens": {"model": other, "messages": USER},
            }
            for path, body in refused.items():
                answer = http.get(path, headers=SCOPED) if body is None else http.post(path, json=body, headers=SCOPED)
                assert answer.status_code == 404, (path, other, answer.text)
                assert "tiny-lora-b" not in answer.text or other == "tiny-lora-b", answer.text
        ordinary = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"}, headers=EVERY)
        assert ordinary.status_code == 403


@pytest.mark.late(0.7)
def test_bad_adapters_are_400s_and_the_engine_keeps_serving(
    drain_server: LiveServer, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    source = tiny_adapters["tiny-lora-a"]
    wrong_shapes = tmp_path / "wrong-shapes"  # made for a model twice as wide: only the engine can tell
    shutil.copytree(source, wrong_shapes)
    tensors = load_file(str(source / "adapter_model.safetensors"))
    widened = {name: np.concatenate([t, t], axis=1 if "lora_A" in name else 0) for name, t in tensors.items()}
    save_file(widened, str(wrong_shapes / "adapter_model.safetensors"))
    truncated = tmp_path / "truncated"
    shutil.copytree(source, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with httpx.Client(base_url=drain_server.base_url, timeout=120) as http:
        for path, code in ((wrong_shapes, "adapter_invalid"), (truncated, "adapter_corrupt")):
            answer = http.post(
                "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(path)}, headers=ADMIN
            )
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["code"] == code, answer.text
        assert http.get("/ready").status_code == 200
        for model in (SERVED_MODEL, "tiny-lora-a"):
            assert http.post("/v1/chat/completions", json=_chat(model), headers=EVERY).status_code == 200
        assert "bad" not in [m["id"] for m in http.get("/v1/models", headers=EVERY).json()["data"]]


@pytest.mark.late(0.7)
def test_load_serve_unload_reload_under_traffic_fails_no_request(
    drain_server: LiveServer, tiny_adapters: dict[str, Path], report
) -> None:  # type: ignore[no-untyped-def]
    outcomes: Counter[str] = Counter()
    failures: list[str] = []

    async def run() -> None:
        async with httpx.AsyncClient(base_url=drain_server.base_url, timeout=300) as http:
            stop = asyncio.Event()
            # When the swapped adapter was last loaded (None while it is not): a 404 for it is
            # expected for a request sent before that.
            loaded_since: list[float | None] = [None]

            async def client(model: str) -> None:
                while not stop.is_set():
                    sent = time.monotonic()
                    answer = await http.post("/v1/chat/completions", json=_chat(model, 8), headers=EVERY)
                    since = loaded_since[0]
                    if answer.status_code == 200:
                        outcomes[f"{model} -> {answer.json()['model']}"] += 1
                    elif answer.status_code == 404 and model == SWAPPED and (since is None or sent < since):
                        outcomes[f"{model} 404 while unloaded"] += 1
                    else:
                        failures.append(f"{model}: {answer.status_code} {answer.text[:200]}")
                    await asyncio.sleep(0.05)

            async def long_stream_on_swapped() -> str:
                body = _chat(SWAPPED, 400, stream=True, ignore_eos=True)
                async with http.stream("POST", "/v1/chat/completions", json=body, headers=EVERY) as stream:
                    assert stream.status_code == 200
                    return "".join([chunk async for chunk in stream.aiter_text()])

            async def admin() -> float:
                path = str(tiny_adapters["tiny-lora-b"])
                unload_seconds = 0.0
                for round_ in range(2):  # load, serve, unload; then reload and unload again
                    loaded = await http.post(
                        "/v1/load_lora_adapter", json={"lora_name": SWAPPED, "lora_path": path}, headers=ADMIN
                    )
                    assert loaded.status_code == 200, loaded.text
                    loaded_since[0] = time.monotonic()
                    await asyncio.sleep(3)
                    stream = asyncio.create_task(long_stream_on_swapped()) if round_ == 0 else None
                    await asyncio.sleep(1)
                    loaded_since[0] = None  # from here on a 404 for it is expected
                    started = time.monotonic()
                    unloaded = await http.post("/v1/unload_lora_adapter", json={"lora_name": SWAPPED}, headers=ADMIN)
                    assert unloaded.status_code == 200, unloaded.text
                    if stream is not None:
                        unload_seconds = time.monotonic() - started
                        text = await stream
                        assert "[DONE]" in text and '"finish_reason":"length"' in text, text[-300:]
                    await asyncio.sleep(2)
                return unload_seconds

            clients = [asyncio.create_task(client(m)) for m in (SERVED_MODEL, "tiny-lora-a", SWAPPED, SWAPPED)]
            try:
                unload_seconds = await admin()
            finally:
                stop.set()
                await asyncio.gather(*clients)
            report(
                f"LoRA runtime: load/unload/reload of {SWAPPED!r} under traffic: {dict(outcomes)}; "
                f"an unload waited {unload_seconds:.1f} s for a 400-token stream on it to finish"
            )

    asyncio.run(run())
    assert not failures, failures
    assert outcomes[f"{SERVED_MODEL} -> {SERVED_MODEL}"] > 0 and outcomes["tiny-lora-a -> tiny-lora-a"] > 0
    assert outcomes[f"{SWAPPED} -> {SWAPPED}"] > 0
    # This server takes any name for the base model (model.accept_any_name, for Claude Code), so the
    # unloaded name is answered by the base: proof the unload took effect (404 without that setting:
    # tests/unit/test_lora_fake_engine.py).
    assert outcomes[f"{SWAPPED} -> {SERVED_MODEL}"] > 0
    assert set(outcomes) <= {f"{m} -> {m}" for m in (SERVED_MODEL, "tiny-lora-a", SWAPPED)} | {
        f"{SWAPPED} -> {SERVED_MODEL}",
        f"{SWAPPED} 404 while unloaded",
    }, outcomes
