"""The ceiling: vLLM's `AsyncLLM` driven in-process, without HTTP, on the same engine arguments.

Run by the harness as a subprocess: `python -m bench.ceiling SPEC.json OUT.json`. It builds the
engine from the same configuration file as our server, renders every request of the plan to engine
inputs BEFORE the clock starts (chat template, tokenization, image decode and vLLM's multimodal
processor), then drives each cell with the same closed loop and concurrency as the HTTP client.
What it measures is therefore the engine core plus AsyncLLM's output path (detokenization, output
queues): the most any front end on this engine could deliver.

The results use the client's record type, so the harness summarizes all targets the same way.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from bench.client import CellRun, RequestResult
from bench.images import load_images
from bench.procs import cpu_by_role, cpu_delta
from bench.workload import BenchRequest, Cell, Plan, build_cells, chat_messages


def _template_messages(request: BenchRequest) -> list[dict[str, Any]]:
    """The OpenAI messages as Gemma 3's chat template reads them (an image part is a placeholder)."""
    messages = chat_messages(request, image_uri="unused")
    for message in messages:
        if isinstance(message["content"], list):
            message["content"] = [
                {"type": "image"} if part["type"] == "image_url" else part for part in message["content"]
            ]
    return messages


async def _render(llm: Any, request: BenchRequest) -> Any:
    from PIL import Image
    from vllm.inputs import TokensPrompt

    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(_template_messages(request), tokenize=False, add_generation_prompt=True)
    prompt = TokensPrompt(prompt_token_ids=tokenizer.encode(text, add_special_tokens=False))
    if request.image is not None:
        image = Image.open(io.BytesIO(request.image.data)).convert("RGB")
        prompt["multi_modal_data"] = {"image": [image]}
        prompt["mm_processor_kwargs"] = {"do_pan_and_scan": False}
    return await llm.renderer.process_for_engine_async(prompt, arrival_time=time.time())


def _params(cell: Cell, output_tokens: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        temperature=0.0,
        max_tokens=output_tokens,
        min_tokens=output_tokens,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA if cell.stream else RequestOutputKind.FINAL_ONLY,
    )


async def _one(llm: Any, engine_input: Any, params: Any, request_id: str, stream: bool) -> RequestResult:
    result = RequestResult(started=time.perf_counter())
    last: float | None = None
    try:
        async for output in llm.generate(engine_input, params, request_id):
            now = time.perf_counter()
            completion = output.outputs[0]
            result.output_tokens += len(completion.token_ids) if stream else 0
            if stream and completion.text:
                result.events += 1
                if last is None:
                    result.ttft = now - result.started
                else:
                    result.itl.append(now - last)
                last = now
                result.latency = now - result.started
            if output.finished and not stream:
                result.output_tokens = len(completion.token_ids)
                result.ttft = result.latency = now - result.started
        # As in the HTTP client: a finished request that produced no text still succeeded.
        result.ok = True
    except Exception as exc:  # a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    return result


async def _drive(llm: Any, inputs: list[Any], params: Any, concurrency: int, stream: bool, tag: str) -> CellRun:
    pending = list(reversed(list(enumerate(inputs))))
    results: list[RequestResult] = []

    async def worker() -> None:
        while pending:
            index, engine_input = pending.pop()
            results.append(await _one(llm, engine_input, params, f"{tag}-{index}", stream))

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return CellRun(results, time.perf_counter() - wall0, time.process_time() - cpu0)


async def run(spec: dict[str, Any], out_path: Path) -> None:
    started = time.monotonic()
    milestones: dict[str, float] = {}
    from vllm.v1.engine.async_llm import AsyncLLM

    from server.engine.vllm_engine import engine_args_from_settings
    from server.settings import load_settings

    milestones["imports done"] = time.monotonic() - started
    settings = load_settings(spec["config"])
    llm = AsyncLLM.from_engine_args(engine_args_from_settings(settings))
    milestones["engine ready (AsyncLLM built)"] = time.monotonic() - started

    plan = Plan(
        **{**spec["plan"], "requests_per_cell": {int(k): v for k, v in spec["plan"]["requests_per_cell"].items()}}
    )
    cells = build_cells(plan, load_images(plan.images_needed(), plan.seed))
    render_cpu0 = time.process_time()
    rendered = [([await _render(llm, r) for r in c.warmup], [await _render(llm, r) for r in c.requests]) for c in cells]
    milestones["all requests pre-rendered (not timed)"] = time.monotonic() - started
    prerender_cpu = time.process_time() - render_cpu0

    me = psutil.Process().pid
    cells_out = []
    try:
        for number, (cell, (warmup, measured)) in enumerate(zip(cells, rendered, strict=True)):
            params = _params(cell, plan.output_tokens)
            if warmup:
                await _drive(llm, warmup, params, cell.concurrency, cell.stream, f"w{number}")
            before = cpu_by_role(me)
            run_ = await _drive(llm, measured, params, cell.concurrency, cell.stream, f"m{number}")
            server_cpu = cpu_delta(before, cpu_by_role(me))
            cells_out.append(
                {
                    "kind": cell.kind,
                    "concurrency": cell.concurrency,
                    "round": cell.round,
                    "wall_s": run_.wall_seconds,
                    "driver_cpu_s": run_.client_cpu_seconds,
                    "server_cpu_s": server_cpu,
                    "results": [asdict(r) for r in run_.results],
                }
            )
            print(f"ceiling: {cell.name} done in {run_.wall_seconds:.1f} s", flush=True)
    finally:
        llm.shutdown()
    out_path.write_text(json.dumps({"startup": milestones, "prerender_cpu_s": prerender_cpu, "cells": cells_out}))


def main() -> None:
    import uvloop  # the servers run on uvloop too

    spec = json.loads(Path(sys.argv[1]).read_text())
    uvloop.run(run(spec, Path(sys.argv[2])))


if __name__ == "__main__":
    main()
