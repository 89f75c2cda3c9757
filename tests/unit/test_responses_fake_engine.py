"""The Responses API in process, on a scripted engine and a real SQLite store, through the official openai SDK.

The scripted engine "writes" what a real model would (Gemma's JSON tool call, prose), so the SDK's
own parsing of response objects and event streams checks the wire format. The live tier runs the
same routes on the real engine (and Codex CLI, the Agents SDK and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from asgi_lifespan import LifespanManager

from server.app import create_app
from server.protocols.responses.encoder import replay
from server.settings import Settings
from tests.support.fake_engine import MODEL, PacedEngine, Scripted, ScriptedEngine, fake_settings, running_app

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
KEYS = ["sk-one", "sk-two"]


@pytest.fixture
async def served(
    tokenizer: Any, tmp_path: Path
) -> AsyncIterator[tuple[openai.AsyncOpenAI, openai.AsyncOpenAI, ScriptedEngine, Scripted]]:
    script = Scripted()
    engine = ScriptedEngine(tokenizer, script)

    async def start() -> None:
        pass

    settings = Settings.model_validate(
        {
            "model": {"served_name": "fake-gemma"},
            "auth": {"api_keys": KEYS},
            "responses": {"url": f"sqlite:///{tmp_path / 'responses.db'}"},
        }
    )
    app = create_app(settings, engine=engine, start_engine=start)  # type: ignore[arg-type]
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            one = openai.AsyncOpenAI(base_url="http://test/v1", api_key=KEYS[0], http_client=http, max_retries=0)
            two = openai.AsyncOpenAI(base_url="http://test/v1", api_key=KEYS[1], http_client=http, max_retries=0)
            yield one, two, engine, script


async def test_create_retrieve_input_items_delete(served) -> None:  # type: ignore[no-untyped-def]
    client, other, engine, _ = served
    response = await client.responses.create(model="fake-gemma", input="Say hello", instructions="Be brief.")
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == "Hello there."
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert "Be brief.\n\nSay hello" in engine.prompts[-1]  # instructions are the system text
    again = await client.responses.retrieve(response.id)
    assert again.output_text == "Hello there." and again.id == response.id
    items = await client.responses.input_items.list(response.id)
    assert [item.type for item in items.data] == ["message"]
    with pytest.raises(openai.NotFoundError):  # another key does not see it, on any route
        await other.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        await other.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        await other.responses.create(model="fake-gemma", input="x", previous_response_id=response.id)
    await client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)


async def test_previous_response_id_continues_the_conversation(served) -> None:  # type: ignore[no-untyped-def]
    client, _, engine, script = served
    script.text = "Paris."
    first = await client.responses.create(model="fake-gemma", input="Capital of France?")
    script.text = "About two million."
    second = await client.responses.create(model="fake-gemma", input="Its population?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    prompt = engine.prompts[-1]
    assert "Capital of France?" in prompt and "Paris." in prompt and "Its population?" in prompt
    unstored = await client.responses.create(model="fake-gemma", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)


async def test_a_function_call_round_trip_streamed(served) -> None:  # type: ignore[no-untyped-def]
    client, _, engine, script = served
    script.text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    async with client.responses.stream(
        model="fake-gemma", input="Weather in Paris?", tools=[WEATHER], tool_choice="required"
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    call = final.output[-1]
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
    # The arguments stream as they are generated, and the pieces make the final arguments.
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]  # type: ignore[union-attr]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 3 and "".join(deltas) == done.arguments == call.arguments  # type: ignore[union-attr]
    assert engine.seen[-1].json_schema is not None  # "required": decoding constrained to a call
    script.text = "It is sunny."
    answer = await client.responses.create(
        model="fake-gemma",
        previous_response_id=final.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
        tools=[WEATHER],
    )
    assert answer.output_text == "It is sunny." and "Sunny, 21 C" in engine.prompts[-1]


def _sse_events(body: str) -> list[dict[str, Any]]:
    """A Responses stream's events, each checked: `event:` is its type, numbered from 0 in order."""
    events = []
    for number, block in enumerate(block for block in body.split("\n\n") if block.strip()):
        event_line, data_line = block.split("\n", 1)
        data = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {data['type']}" and data["sequence_number"] == number
        events.append(data)
    return events


async def test_stream_events_are_numbered_and_named_by_their_type(served) -> None:  # type: ignore[no-untyped-def]
    client, _, _, script = served
    script.text = "Streaming words here"
    async with client.responses.with_streaming_response.create(model="fake-gemma", input="Hi", stream=True) as raw:
        body = (await raw.read()).decode()
    events = [block for block in body.split("\n\n") if block.strip()]
    _sse_events(body)
    deltas = [json.loads(b.split("\n", 1)[1][6:]) for b in events if b.startswith("event: response.output_text.delta")]
    assert "".join(d["delta"] for d in deltas) == "Streaming words here"
    assert all(d["item_id"].startswith("msg_") and d["output_index"] == 0 and d["content_index"] == 0 for d in deltas)


async def test_skipped_tools_and_bad_items(served) -> None:  # type: ignore[no-untyped-def]
    client, _, _, _ = served
    response = await client.responses.create(
        model="fake-gemma", input="Hi", tools=[WEATHER, {"type": "web_search"}, {"type": "image_generation"}]
    )
    assert response.model_extra is not None and response.model_extra["skipped_tools"] == [
        "web_search",
        "image_generation",
    ]
    for item, param in [
        ({"type": "function_call_output", "call_id": "call_nope", "output": "x"}, "input[0].call_id"),
        ({"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}, "input[0].content[0]"),
        ({"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}, "input[0].content[0].type"),
        ({"type": "computer_call", "id": "x"}, "input[0].type"),
        ({"role": "wizard", "content": "x"}, "input[0].role"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(model="fake-gemma", input=[item])
        assert caught.value.body["param"] == param, caught.value.body  # type: ignore[index]
    reasoning = await client.responses.create(
        model="fake-gemma",
        input=[{"type": "reasoning", "id": "rs_1", "summary": []}, {"role": "user", "content": "Hi"}],
    )
    assert reasoning.status == "completed"  # reasoning items are accepted and dropped


async def test_max_output_tokens_makes_it_incomplete(served) -> None:  # type: ignore[no-untyped-def]
    client, _, _, script = served
    script.text = "one two three four five six seven"
    response = await client.responses.create(model="fake-gemma", input="Count", max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


async def test_background_create_poll_and_cancel(served) -> None:  # type: ignore[no-untyped-def]
    client, other, engine, script = served
    script.text = "Done in the background."
    queued = await client.responses.create(model="fake-gemma", input="Work", background=True)
    assert queued.status in ("queued", "in_progress", "completed")
    for _ in range(100):
        polled = await client.responses.retrieve(queued.id)
        if polled.status == "completed":
            break
        await asyncio.sleep(0.05)
    assert polled.status == "completed" and polled.output_text == "Done in the background."
    resumed = await client.responses.retrieve(queued.id, stream=True, starting_after=1)
    kinds = [event.type async for event in resumed]
    assert kinds[0] != "response.created" and kinds[-1] == "response.completed"
    with pytest.raises(openai.NotFoundError):
        await other.responses.cancel(queued.id)
    engine.token_seconds = 0.05  # slow enough to be cancelled while it runs
    script.text = " ".join(["word"] * 200)
    slow = await client.responses.create(model="fake-gemma", input="Work slowly", background=True)
    await asyncio.sleep(0.2)
    cancelled = await client.responses.cancel(slow.id)
    assert cancelled.status == "cancelled"
    assert (await client.responses.retrieve(slow.id)).status == "cancelled"


@pytest.mark.parametrize(
    "text",
    [
        "Some prose, in words.",
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "Hi ```tool_code\nget_weather('x')\n```",
    ],
)
async def test_a_replayed_stream_is_the_live_sequence(served, text: str) -> None:  # type: ignore[no-untyped-def]
    """A finished response streamed again from the store (another process, after a restart) goes
    through the same events as it did live, each item's text and arguments in one delta."""
    client, _, _, script = served
    script.text = text
    async with client.responses.with_streaming_response.create(
        model="fake-gemma", input="Hi", tools=[WEATHER], stream=True
    ) as raw:
        live = _sse_events((await raw.read()).decode())
    stored = live[-1]["response"]
    replayed = _sse_events(b"".join(replay(stored)).decode())

    def collapsed(events: list[dict[str, Any]]) -> list[str]:
        kinds = [event["type"] for event in events]
        return [kind for i, kind in enumerate(kinds) if i == 0 or kind != kinds[i - 1] or not kind.endswith(".delta")]

    assert collapsed(replayed) == collapsed(live)
    assert replayed[-1]["response"] == stored
    for kind in ("response.output_item.done", "response.function_call_arguments.done", "response.output_text.done"):
        assert [e for e in replayed if e["type"] == kind] == [
            {**e, "sequence_number": r["sequence_number"]}
            for e, r in zip(
                [e for e in live if e["type"] == kind], [e for e in replayed if e["type"] == kind], strict=True
            )
        ]


async def test_a_store_that_cannot_open_is_a_503_before_generating(tokenizer: Any, tmp_path: Path) -> None:
    """A read-only place for the SQLite file (the image's read-only root filesystem once did this):
    stored requests get a clear 503 before anything is generated; store: false still works."""
    script = Scripted()
    engine = ScriptedEngine(tokenizer, script)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the database's folder should be")

    async def start() -> None:
        pass

    settings = Settings.model_validate(
        {"model": {"served_name": "fake-gemma"}, "responses": {"url": f"sqlite:///{blocker / 'db' / 'r.db'}"}}
    )
    app = create_app(settings, engine=engine, start_engine=start)  # type: ignore[arg-type]
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=http, max_retries=0)
            script.text = "Hello there."
            with pytest.raises(openai.InternalServerError) as refused:
                await client.responses.create(model="fake-gemma", input="hi", stream=True)
            assert refused.value.status_code == 503
            assert refused.value.body["code"] == "response_store_unavailable"  # type: ignore[index]
            assert engine.seen == []  # nothing was generated for it
            answer = await client.responses.create(model="fake-gemma", input="hi", store=False)
            assert answer.status == "completed" and answer.output_text == "Hello there."


async def _poll(http: httpx.AsyncClient, response_id: str, until: Any, seconds: float = 10) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        body = (await http.get(f"/v1/responses/{response_id}")).json()
        if until(body) or asyncio.get_running_loop().time() > deadline:
            return body  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)


async def test_api_processes_on_one_store_share_background_responses(tmp_path: Path) -> None:
    """Two apps on one store file are what two API processes of a server are (and, on PostgreSQL,
    two replicas): one opening the store must not fail the other's running background response, a
    cancel that reaches the other process stops the generation, and a process that shuts down
    leaves its unfinished response failed with a reason, not in progress and not "cancelled"; a
    stream of a response that runs elsewhere follows it to its end."""
    settings = fake_settings(responses={"url": f"sqlite:///{tmp_path / 'responses.db'}", "background_lease_seconds": 5})
    slow = {"model": MODEL, "input": "Work slowly", "background": True, "max_output_tokens": 2000}
    async with running_app(settings, PacedEngine()) as (_, other, _):
        async with running_app(settings, PacedEngine(token_seconds=0.02)) as (_, runner, runner_engine):
            running = (await runner.post("/v1/responses", json=slow)).json()
            await _poll(runner, running["id"], lambda body: body["status"] == "in_progress")
            assert (await other.post("/v1/responses", json={"model": MODEL, "input": "Hi"})).status_code == 200
            assert (await other.get(f"/v1/responses/{running['id']}")).json()["status"] == "in_progress"

            # A stream of it from the other process follows it to the end (there, it waits, then replays).
            short = (await runner.post("/v1/responses", json={**slow, "max_output_tokens": 20})).json()
            followed = await other.get(f"/v1/responses/{short['id']}", params={"stream": "true"})
            events = _sse_events(followed.text)
            assert events[-1]["type"] == "response.incomplete", events[-1]
            assert events[-1]["response"]["usage"]["output_tokens"] == 20

            assert (await other.post(f"/v1/responses/{running['id']}/cancel")).json()["status"] == "cancelled"
            for _ in range(200):  # the runner sees it at its next heartbeat (a quarter of the lease)
                if runner_engine.generating == 0:
                    break
                await asyncio.sleep(0.05)
            assert runner_engine.generating == 0
            assert (await runner.get(f"/v1/responses/{running['id']}")).json()["status"] == "cancelled"

            unfinished = (await runner.post("/v1/responses", json=slow)).json()
            await _poll(runner, unfinished["id"], lambda body: body["status"] == "in_progress")
        stopped = (await other.get(f"/v1/responses/{unfinished['id']}")).json()
        assert stopped["status"] == "failed", stopped
        assert stopped["error"]["code"] == "server_error"
        assert "stopped before it finished" in stopped["error"]["message"]
