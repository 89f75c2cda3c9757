"""The front end's own CPU per unit of work: per request, per streamed token and per image, ours
against vLLM's OpenAI server, side by side in one run (issue 15).

    python -m bench.cost                  # ~25 min: 3 trials of ours, vLLM's server and the coalescing variants
    python -m bench.cost --trials 1 --targets ours,vllm
    make bench-cost

Why the API process alone: on these 2 cores the CPU engine bounds end-to-end throughput for every
front end alike (docs/benchmarks.md), while on a GPU the engine is fast and the API process's CPU is
what runs out first. So this measures the CPU seconds (user + system, from psutil) of the process that
serves HTTP and runs vLLM's input and output processing; the engine core is another process and is
left out. One API process per target.

Method. In each trial every target is started once and serves every cell in turn; targets run one at
a time, in an order that rotates from trial to trial. A cell is a warm-up (one request per
connection) and then `--requests` chat requests, each with its own short prompt (greedy,
`ignore_eos`, exactly L output tokens), at concurrency 16 or 64, streamed or not, at two output
lengths: SHORT and LONG tokens. The API CPU per request at length L is modelled as
c(L) = R + L * T, two unknowns from two lengths:

    T (per output token)  = (c(LONG) - c(SHORT)) / (LONG - SHORT)
    R (per request)       = c(SHORT) - SHORT * T

Per image: the cell "image" sends the SHORT streamed request at concurrency 16 with one distinct
1920x1080 photo-like JPEG (q85, ~200-300 KB, as a data URI) each, `detail: low` (one 896x896 view,
which is also what vLLM's server does by default: no pan-and-scan); I = c(image) - c(SHORT, streamed,
c=16). Images differ within a start of a target (nothing is served from a processor or prefix
cache); every trial restarts the targets, so trials reuse the same images.

Ratios ours / vLLM are taken within a trial, then the median and range over trials are reported.
Targets: `ours`, `vllm` (defaults of both: one SSE event per token), and the coalescing variants
`ours-si4` (`server.stream_interval: 4`) and `vllm-si4` (`--stream-interval 4`), which run the
streamed cells only.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop

from bench.client import run_requests
from bench.images import photo_like
from bench.procs import cpu_by_role
from bench.targets import ROOT, HttpTarget, ours, peer
from bench.workload import SYSTEM_PROMPT, prompt_text

SHORT, LONG = 4, 68  # output tokens: 64 apart, so T is read over 64 tokens per request
IMAGE_SIZE = (1920, 1080)
COALESCING = 4  # the stream interval of the *-si4 variants


@dataclass(frozen=True)
class Cell:
    name: str
    concurrency: int
    stream: bool
    tokens: int
    image: bool = False


def cells_for(concurrencies: list[int], streamed_only: bool) -> list[Cell]:
    cells = []
    for concurrency in concurrencies:
        for stream in (False, True):
            if streamed_only and not stream:
                continue
            for tokens in (SHORT, LONG):
                kind = "stream" if stream else "plain"
                cells.append(Cell(f"{kind}-{tokens}t c={concurrency}", concurrency, stream, tokens))
    cells.append(Cell(f"image-stream-{SHORT}t c=16", 16, True, SHORT, image=True))
    return cells


def jpeg_uris(count: int, seed: int) -> list[str]:
    """`count` distinct 1920x1080 photo-like JPEGs (q85) as data URIs, the same for a given seed."""
    import base64

    uris = []
    for index in range(count):
        buffer = io.BytesIO()
        photo_like(*IMAGE_SIZE, np.random.default_rng([seed, 15, index])).save(buffer, "JPEG", quality=85)
        uris.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris


def body(model: str, text: str, cell: Cell, image_uri: str | None) -> bytes:
    user: object = text
    if image_uri is not None:
        user = [{"type": "image_url", "image_url": {"url": image_uri, "detail": "low"}}, {"type": "text", "text": text}]
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
        "max_tokens": cell.tokens,
        "min_tokens": cell.tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": cell.stream,
    }
    if cell.stream:
        request["stream_options"] = {"include_usage": True}
    return orjson.dumps(request)


def bodies_for(
    cells: list[Cell], model: str, requests: int, words: int, seed: int, images: list[str]
) -> dict[str, Any]:
    """Each cell's warm-up and measured bodies, with prompt numbers unique across the cells."""
    out: dict[str, Any] = {}
    index = 0
    for cell in cells:
        count = cell.concurrency + requests
        texts = [prompt_text(index + i, seed, words) for i in range(count)]
        index += count
        uris: list[str | None] = list(images[:count]) if cell.image else [None] * count
        made = [body(model, text, cell, uri) for text, uri in zip(texts, uris, strict=True)]
        out[cell.name] = (made[: cell.concurrency], made[cell.concurrency :])
    return out


def measure_target(
    target: HttpTarget, cells: list[Cell], bodies: dict[str, Any], say: Callable[[str], None]
) -> list[dict[str, Any]]:
    out = []
    for cell in cells:
        warmup, measured = bodies[cell.name]
        uvloop.run(run_requests("127.0.0.1", target.port, warmup, concurrency=cell.concurrency, stream=cell.stream))
        before = cpu_by_role(target.pid).get("api", 0.0)
        run = uvloop.run(
            run_requests("127.0.0.1", target.port, measured, concurrency=cell.concurrency, stream=cell.stream)
        )
        api_cpu = cpu_by_role(target.pid).get("api", 0.0) - before
        ok = [r for r in run.results if r.ok]
        wrong_length = sum(1 for r in ok if r.output_tokens != cell.tokens)
        errors = len(run.results) - len(ok)
        ttfts = sorted(r.ttft for r in ok if r.ttft is not None)
        events = statistics.mean(r.events for r in ok) if ok and cell.stream else None
        out.append(
            {"cell": cell.name, "requests": len(measured), "errors": errors, "wrong_length": wrong_length,
             "api_cpu_ms_per_request": 1000 * api_cpu / len(measured), "wall_s": run.wall_seconds,
             "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2] if ttfts else None, "events_per_request": events}
        )  # fmt: skip
        say(
            f"  {target.name:>9} {cell.name:<22} {1000 * api_cpu / len(measured):7.2f} ms API CPU/request"
            f"  {run.wall_seconds:5.1f} s  errors {errors}  wrong length {wrong_length}"
        )
    return out


def fit(cells: dict[str, float], concurrency: int, stream: bool) -> tuple[float, float]:
    """(R ms per request, T us per token) from the two output lengths of one cell shape."""
    kind = "stream" if stream else "plain"
    short, long = cells[f"{kind}-{SHORT}t c={concurrency}"], cells[f"{kind}-{LONG}t c={concurrency}"]
    per_token_ms = (long - short) / (LONG - SHORT)
    return short - SHORT * per_token_ms, 1000 * per_token_ms


def figures(trial_cells: list[dict[str, Any]], concurrencies: list[int]) -> dict[str, float]:
    """One target's figures in one trial: R and T per shape, I per image."""
    ms = {c["cell"]: c["api_cpu_ms_per_request"] for c in trial_cells}
    out: dict[str, float] = {}
    for concurrency in concurrencies:
        for stream in (False, True):
            kind = "stream" if stream else "plain"
            if f"{kind}-{SHORT}t c={concurrency}" not in ms:
                continue
            per_request, per_token = fit(ms, concurrency, stream)
            out[f"{kind} c={concurrency}: per request (ms)"] = per_request
            out[f"{kind} c={concurrency}: per token (us)"] = per_token
    out["per image (ms)"] = ms[f"image-stream-{SHORT}t c=16"] - ms[f"stream-{SHORT}t c=16"]
    return out


def line(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """results: target -> per-trial figures. Figures: median (range); ratios to vLLM's server within each
    trial (ours-si4 also to vllm-si4), then median (range)."""
    summary: dict[str, Any] = {"figures": {}, "ratios": {}}
    for target, trials in results.items():
        names = trials[0].keys()
        summary["figures"][target] = {name: line([t[name] for t in trials]) for name in names}
    pairs = [("ours", "vllm"), ("ours-si4", "vllm"), ("ours-si4", "vllm-si4"), ("vllm-si4", "vllm")]
    for top, bottom in pairs:
        if top not in results or bottom not in results:
            continue
        names = [n for n in results[top][0] if n in results[bottom][0]]
        summary["ratios"][f"{top} / {bottom}"] = {
            name: line([a[name] / b[name] for a, b in zip(results[top], results[bottom], strict=True)])
            for name in names
        }
    return summary


def table(summary: dict[str, Any]) -> str:
    def fmt(figure: dict[str, float], digits: int) -> str:
        return f"{figure['median']:.{digits}f} ({figure['min']:.{digits}f}-{figure['max']:.{digits}f})"

    targets = list(summary["figures"])
    names = list(summary["figures"][targets[0]])
    rows = ["| API process CPU | " + " | ".join(targets) + " |", "|---|" + "---:|" * len(targets)]
    for name in names:
        cells = [fmt(summary["figures"][t][name], 2) if name in summary["figures"][t] else "" for t in targets]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    ratio_names = list(summary["ratios"])
    if ratio_names:
        rows += [
            "",
            "| ratio, within each trial | " + " | ".join(ratio_names) + " |",
            "|---|" + "---:|" * len(ratio_names),
        ]
        for name in names:
            cells = [fmt(summary["ratios"][r][name], 2) if name in summary["ratios"][r] else "" for r in ratio_names]
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def build_target(name: str, settings: Any, config: Path, log_dir: Path) -> HttpTarget:
    if name == "ours":
        return ours(config, log_dir)
    if name == "ours-si4":
        return ours(config, log_dir, name=name, env={"GEMMA_SERVER_SERVER__STREAM_INTERVAL": str(COALESCING)})
    if name == "vllm":
        return peer(settings, log_dir)
    if name == "vllm-si4":
        return peer(settings, log_dir, extra_args=["--stream-interval", str(COALESCING)], name=name)
    raise SystemExit(f"unknown target {name!r}: ours, ours-si4, vllm, vllm-si4")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "tiny.yaml")
    parser.add_argument("--targets", default="ours,vllm,ours-si4,vllm-si4")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--requests", type=int, default=128, help="measured requests per cell")
    parser.add_argument("--prompt-words", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, help="also write every cell and the summary here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, say: Callable[[str], None] = lambda text: print(text, flush=True)) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds through `finally`, which stops the running target (its own process group).
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    from server.settings import load_settings

    settings = load_settings(args.config)
    names = args.targets.split(",")
    started = time.monotonic()
    images = jpeg_uris(16 + args.requests, args.seed)
    say(f"{len(images)} distinct {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEGs made ({time.monotonic() - started:.0f} s)")
    cells: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    errors = 0
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as folder:
        for trial in range(args.trials):
            order = names[trial % len(names) :] + names[: trial % len(names)]
            for name in order:
                target = build_target(name, settings, args.config, Path(folder))
                shape = cells_for(args.concurrency, streamed_only=name.endswith("-si4"))
                bodies = bodies_for(
                    shape, settings.model.served_name, args.requests, args.prompt_words, args.seed, images
                )
                say(f"trial {trial}: {name}")
                startup = target.start(trial)
                try:
                    if startup.ready is None:
                        raise SystemExit(startup.error or f"{name} did not become ready")
                    measured = measure_target(target, shape, bodies, say)
                finally:
                    target.stop()
                errors += sum(c["errors"] + c["wrong_length"] for c in measured)
                cells[name].append({"trial": trial, "cells": measured})
                results[name].append(figures(measured, args.concurrency))
    summary = summarize(results)
    say(table(summary))
    say(f"({time.monotonic() - started:.0f} s in all; {errors} failed or wrong-length requests)")
    if args.write:
        args.write.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cells": cells,
                                          "figures": results, "summary": summary}, indent=1))  # fmt: skip
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
