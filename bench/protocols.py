"""The protocol benchmark: what the front end costs per request in each protocol, on the same
conversations, side by side on one server.

    python -m bench.protocols               # ~5 min: 3 rounds of every workload
    make bench-protocols

One server (ours, on the given configuration, one API process) serves every workload in turn,
round after round, in an order that rotates each round, so the machine's drift (these machines
stall) falls on all of them alike. Every request is greedy with a fixed output length; each
workload's requests are the same conversations, so the engine does the same work and the
difference in the API process's CPU is the protocol's. Workloads:

- chat, chat-stream: `/v1/chat/completions` (system message + user message);
- responses, responses-stream: `/v1/responses` with the same text (`instructions` + `input`),
  `store: false`;
- stored, stored-stream: the same with `store: true` (the default): one database write each;
- inline: the last turn of a `--turns`-turn conversation, its history sent whole as input items;
- chained: that same turn with `previous_response_id`, the history read from the store.

The figures (API CPU ms per request, median over rounds, with the range) go to stdout and to
`--write` as JSON. The ratios the Responses API is held to (issue 17): responses/chat within 1.1x,
chained/inline at most 1.0x.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop

from bench.client import run_requests
from bench.procs import cpu_by_role
from bench.targets import ROOT, HttpTarget, ours
from bench.workload import SYSTEM_PROMPT, prompt_text

CHAT, RESPONSES = "/v1/chat/completions", "/v1/responses"


def chat_body(text: str, model: str, tokens: int, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def responses_body(text: str, model: str, tokens: int, stream: bool, store: bool) -> bytes:
    body = {"model": model, "instructions": SYSTEM_PROMPT, "input": text, "max_output_tokens": tokens}
    return orjson.dumps({**body, "temperature": 0.0, "stream": stream, "store": store})


def build_chains(base: str, model: str, texts: list[str], turns: int, tokens: int) -> list[tuple[str, list[Any]]]:
    """Stores a `turns`-turn conversation per text (each turn chained to the one before) and returns,
    per conversation, the last response's id and the whole history as input items."""
    chains = []
    with httpx.Client(base_url=base, timeout=600, trust_env=False) as client:
        for text in texts:
            history: list[Any] = []
            previous = None
            for turn in range(turns):
                said = {"role": "user", "content": f"{text} (turn {turn})"}
                body = {"model": model, "instructions": SYSTEM_PROMPT, "input": [said], "max_output_tokens": tokens}
                answer = client.post(RESPONSES, json={**body, "temperature": 0.0, "previous_response_id": previous})
                answer.raise_for_status()
                made = answer.json()
                history += [said, *made["output"]]
                previous = made["id"]
            assert previous is not None
            chains.append((previous, history))
    return chains


def workloads(
    base: str, model: str, requests: int, tokens: int, turns: int, seed: int
) -> dict[str, tuple[str, list[bytes], bool]]:
    """Each workload's route, request bodies and whether it streams."""
    texts = [prompt_text(index, seed, 150) for index in range(requests)]
    chains = build_chains(base, model, [prompt_text(10_000 + i, seed, 40) for i in range(requests)], turns, tokens)
    last_turn = {"role": "user", "content": "And now the last turn."}
    common = {"model": model, "instructions": SYSTEM_PROMPT, "max_output_tokens": tokens, "temperature": 0.0}
    return {
        "chat": (CHAT, [chat_body(t, model, tokens, False) for t in texts], False),
        "chat-stream": (CHAT, [chat_body(t, model, tokens, True) for t in texts], True),
        "responses": (RESPONSES, [responses_body(t, model, tokens, False, False) for t in texts], False),
        "responses-stream": (RESPONSES, [responses_body(t, model, tokens, True, False) for t in texts], True),
        "stored": (RESPONSES, [responses_body(t, model, tokens, False, True) for t in texts], False),
        "stored-stream": (RESPONSES, [responses_body(t, model, tokens, True, True) for t in texts], True),
        "inline": (
            RESPONSES,
            [orjson.dumps({**common, "input": [*history, last_turn], "store": False}) for _, history in chains],
            False,
        ),
        "chained": (
            RESPONSES,
            [
                orjson.dumps({**common, "input": [last_turn], "previous_response_id": last, "store": False})
                for last, _ in chains
            ],
            False,
        ),
    }


RATIOS: list[tuple[str, str, str]] = [  # (name, numerator, denominator)
    ("responses / chat", "responses", "chat"),
    ("responses-stream / chat-stream", "responses-stream", "chat-stream"),
    ("stored / chat", "stored", "chat"),
    ("stored-stream / chat-stream", "stored-stream", "chat-stream"),
    ("chained / inline", "chained", "inline"),
]


def measure(
    target: HttpTarget, plan: dict[str, tuple[str, list[bytes], bool]], rounds: int, concurrency: int
) -> list[dict[str, Any]]:
    names = list(plan)
    cells = []
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            path, bodies, stream = plan[name]
            before = cpu_by_role(target.pid).get("api", 0.0)
            run = uvloop.run(
                run_requests("127.0.0.1", target.port, bodies, concurrency=concurrency, stream=stream, path=path)
            )
            api_cpu = cpu_by_role(target.pid).get("api", 0.0) - before
            failed = [r.error for r in run.results if not r.ok]
            tokens = sum(r.output_tokens for r in run.results)
            cells.append(
                {"round": round_, "workload": name, "requests": len(bodies), "errors": len(failed),
                 "first_error": failed[0] if failed else None, "output_tokens": tokens,
                 "wall_s": run.wall_seconds, "api_cpu_s": api_cpu,
                 "api_cpu_ms_per_request": 1000 * api_cpu / len(bodies)}
            )  # fmt: skip
            print(
                f"  round {round_} {name:<17} {1000 * api_cpu / len(bodies):6.2f} ms API CPU/request, "
                f"{tokens / len(bodies):5.1f} tokens/request, {run.wall_seconds:5.1f} s, errors {len(failed)}",
                flush=True,
            )
    return cells


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    def per_round(name: str) -> list[float]:
        return [c["api_cpu_ms_per_request"] for c in sorted(cells, key=lambda c: c["round"]) if c["workload"] == name]

    def line(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    workloads = {c["workload"] for c in cells}
    ratios = {}
    for label, top, bottom in RATIOS:
        if top in workloads and bottom in workloads:
            # Within a round, side by side; then the median over rounds.
            ratios[label] = line([a / b for a, b in zip(per_round(top), per_round(bottom), strict=True)])
    return {"api_cpu_ms_per_request": {name: line(per_round(name)) for name in sorted(workloads)}, "ratios": ratios}


def _table(summary: dict[str, Any]) -> str:
    def fmt(figure: dict[str, float], digits: int) -> str:
        return f"{figure['median']:.{digits}f} ({figure['min']:.{digits}f}-{figure['max']:.{digits}f})"

    rows = ["API CPU per request, ms: median (range) over rounds"]
    rows += [f"  {name:<17} {fmt(figure, 2)}" for name, figure in summary["api_cpu_ms_per_request"].items()]
    rows += ["ratios of API CPU per request, within each round: median (range)"]
    rows += [f"  {name:<31} {fmt(figure, 3)}" for name, figure in summary["ratios"].items()]
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.protocols", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "tiny.yaml")
    parser.add_argument("--requests", type=int, default=48, help="requests per workload per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--turns", type=int, default=8, help="turns of history in the inline and chained workloads")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, help="also write the cells and the summary here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, say: Callable[[str], None] = lambda line: print(line, flush=True)) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds through `finally`, which stops the server (its own process group).
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    from server.settings import load_settings

    model = load_settings(args.config).model.served_name
    with tempfile.TemporaryDirectory(prefix="bench-protocols-") as folder:
        env = {"GEMMA_SERVER_RESPONSES__URL": f"sqlite:///{folder}/responses.db"}
        target = ours(args.config, Path(folder), name="ours", env=env)
        started = time.monotonic()
        startup = target.start(0)
        try:
            if startup.ready is None:
                raise SystemExit(startup.error or "the server did not become ready")
            say(f"server ready after {startup.ready:.0f} s; storing {args.requests} chains of {args.turns} turns")
            base = f"http://127.0.0.1:{target.port}"
            plan = workloads(base, model, args.requests, args.output_tokens, args.turns, args.seed)
            measure(target, plan, 1, args.concurrency)  # warm-up: prefix caches, code paths
            cells = measure(target, plan, args.rounds, args.concurrency)
        finally:
            target.stop()
    summary = summarize(cells)
    say(_table(summary))
    say(f"({time.monotonic() - started:.0f} s in all)")
    errors = sum(c["errors"] for c in cells)
    if args.write:
        args.write.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "cells": cells, "summary": summary}, indent=1
            )
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
