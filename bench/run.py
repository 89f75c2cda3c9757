"""The benchmark run: for each trial, start each target in turn, drive every cell, stop it.

    python -m bench                 # full: 3 trials, concurrency 1/16/64, all workloads (~45 min)
    python -m bench --quick         # smoke: 1 trial, concurrency 16, fewer requests (~8 min)

Targets run one at a time (they would fight over the two cores otherwise), in an order that rotates
from trial to trial so slow drifts in the machine's load do not always hit the same target. Ratios
are computed within a trial (side by side) and then summarized over trials (median and range).
Raw results go to `RESULTS_DIR/<stamp>/results.json` with every target's log; the report is
rendered into `docs/benchmarks.md` by `bench.report`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench import report
from bench.client import CellRun, RequestResult, run_requests
from bench.images import fingerprint, load_images
from bench.procs import cpu_by_role, cpu_delta
from bench.stats import summarize
from bench.targets import ROOT, CeilingTarget, HttpTarget, Startup, ours, peer
from bench.workload import KINDS, Cell, Plan, build_cells, chat_body

RESULTS_DIR = Path(os.path.expanduser("~/.cache/gemma-server/bench/runs"))


@dataclass(frozen=True)
class Preset:
    concurrencies: tuple[int, ...]
    requests: dict[int, int]  # concurrency -> measured requests per cell (image cells: half)
    trials: int


FULL = Preset(concurrencies=(1, 16, 64), requests={1: 32, 16: 192, 64: 320}, trials=3)
QUICK = Preset(concurrencies=(16,), requests={16: 96}, trials=1)


def make_plan(args: argparse.Namespace) -> Plan:
    preset = QUICK if args.quick else FULL
    concurrencies = tuple(args.concurrency or preset.concurrencies)
    requests = {c: preset.requests.get(c, max(4 * c, 32)) for c in concurrencies}
    if args.requests:
        requests = dict.fromkeys(concurrencies, args.requests)
    return Plan(
        seed=args.seed,
        output_tokens=args.output_tokens,
        prompt_words=args.prompt_words,
        kinds=tuple(args.kinds or KINDS),
        concurrencies=concurrencies,
        requests_per_cell=requests,
        image_requests_scale=0.5,
        rounds=args.rounds,
    )


async def _drive_http(
    target: HttpTarget, cells: list[Cell], bodies: list[tuple[list[bytes], list[bytes]]], plan: Plan, profile: set[str]
) -> list[dict[str, Any]]:
    out = []
    for cell, (warmup, measured) in zip(cells, bodies, strict=True):
        if target.child is None or not target.child.alive():
            raise TargetDied(f"{target.name} died before {cell.name} (killed for memory?)")
        if warmup:
            await run_requests("127.0.0.1", target.port, warmup, concurrency=cell.concurrency, stream=cell.stream)
        profiler = _start_profiler(target, cell) if f"{cell.kind}:{cell.concurrency}" in profile else None
        before = cpu_by_role(target.pid)
        try:
            run = await run_requests(
                "127.0.0.1", target.port, measured, concurrency=cell.concurrency, stream=cell.stream
            )
        finally:
            if profiler is not None:
                _stop_profiler(profiler)
        summary = summarize(run, plan.output_tokens)
        summary.server_cpu_s = cpu_delta(before, cpu_by_role(target.pid))
        if not target.child.alive():
            raise TargetDied(f"{target.name} died during {cell.name} (killed for memory?)")
        out.append({"kind": cell.kind, "concurrency": cell.concurrency, "round": cell.round, **summary.to_dict()})
        print(f"  {target.name:>8} {cell.name:<18} {summary.req_per_s:7.2f} req/s  errors {summary.errors}", flush=True)
    return out


class TargetDied(RuntimeError):
    """The target's process exited during the run; on this shared machine, usually the OOM killer."""


def run_http_target(
    target: HttpTarget, trial: int, cells: list[Cell], bodies: Any, plan: Plan, profile: set[str]
) -> dict[str, Any]:
    print(f"trial {trial}: starting {target.name}", flush=True)
    try:
        startup = target.start(trial)
        print(f"  {target.name} ready after {startup.ready} s", flush=True)
        if startup.ready is None:
            raise TargetDied(startup.error or f"{target.name} did not become ready")
        cells_out = uvloop.run(_drive_http(target, cells, bodies, plan, profile))
        return {"startup": asdict(startup), "cells": cells_out}
    finally:
        target.stop()


def _start_profiler(target: HttpTarget, cell: Cell) -> subprocess.Popen[bytes]:
    """py-spy samples the API process (not the engine core) while the measured requests run.

    --nonblocking: py-spy reads the process's memory without pausing it, so the server runs at
    full speed (a few samples may be torn)."""
    out = target.log_dir / f"{target.name}-{cell.kind}-c{cell.concurrency}.speedscope.json"
    argv = ["py-spy", "record", "--pid", str(target.pid), "--rate", "100", "--nonblocking",
            "--format", "speedscope", "--output", str(out)]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches before the load starts
    return process


def _stop_profiler(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_ceiling(target: CeilingTarget, trial: int, plan: Plan) -> dict[str, Any]:
    print(f"trial {trial}: starting the ceiling (AsyncLLM in-process)", flush=True)
    plan_dict = asdict(plan)
    raw = target.run(plan_dict, trial)
    cells_out = []
    for cell in raw["cells"]:
        results = [RequestResult(**r) for r in cell["results"]]
        summary = summarize(CellRun(results, cell["wall_s"], cell["driver_cpu_s"]), plan.output_tokens)
        summary.server_cpu_s = cell["server_cpu_s"]
        cells_out.append(
            {"kind": cell["kind"], "concurrency": cell["concurrency"], "round": cell["round"], **summary.to_dict()}
        )
        print(f"  {'ceiling':>8} {cell['kind']} c={cell['concurrency']:<4} {summary.req_per_s:7.2f} req/s", flush=True)
    startup = Startup(ready=raw["startup"].get("engine ready (AsyncLLM built)"), milestones=raw["startup"])
    return {"startup": asdict(startup), "prerender_cpu_s": raw.get("prerender_cpu_s"), "cells": cells_out}


def machine_info() -> dict[str, Any]:
    import platform

    import psutil
    import torch
    import transformers
    import vllm

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "server"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": model,
        "cores": psutil.cpu_count(logical=True),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": commit + (" (server/ modified)" if dirty else ""),
        "load_before": os.getloadavg(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 trial at concurrency 16")
    parser.add_argument("--trials", type=int, help="trials (default: 3 full, 1 quick)")
    parser.add_argument("--targets", default="ours,ours-2proc,vllm,vllm-2proc,ceiling",
                        help="comma list of ours, vllm, ceiling, variants, and ours-Nproc / vllm-Nproc "
                        "(N API processes on one engine core)")  # fmt: skip
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                        help="also run `python -m server serve` from DIR (a patched copy) as target NAME")  # fmt: skip
    parser.add_argument("--variant-env", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="environment for a variant (or for ours), e.g. ours:GEMMA_SERVER_X=1")  # fmt: skip
    parser.add_argument("--kinds", nargs="+", choices=KINDS)
    parser.add_argument("--concurrency", type=int, nargs="+")
    parser.add_argument("--requests", type=int, help="measured requests per cell (overrides the preset)")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="every cell this many times per start of a target (fresh prompts, images)")  # fmt: skip
    parser.add_argument("--retries", type=int, default=2, help="restarts of a target that died")
    parser.add_argument("--min-free-gb", type=float, default=8.0, help="wait for this much free memory per target")
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "tiny.yaml")
    parser.add_argument("--profile", nargs="*", metavar="KIND:C",
                        help="py-spy record our server's API process during these cells of trial 0 "
                        "(default with no value: text-stream:16 image-stream:16)")  # fmt: skip
    parser.add_argument("--preprocess", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the image preprocessing rate per core")  # fmt: skip
    parser.add_argument("--write", default=str(ROOT / "docs" / "benchmarks.md"), help="report file ('' for none)")
    return parser.parse_args(argv)


def build_targets(args: argparse.Namespace, settings: Any, log_dir: Path) -> list[Any]:
    envs: dict[str, dict[str, str]] = {}
    for item in args.variant_env:
        name, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        envs.setdefault(name, {})[key] = value
    variants = dict(item.split("=", 1) for item in args.variant)
    targets: list[Any] = []
    for name in args.targets.split(","):
        if name == "ours":
            targets.append(ours(args.config, log_dir, env=envs.get("ours")))
        elif name.startswith("ours-") and name.endswith("proc"):  # e.g. ours-2proc: server.api_processes 2
            env = {**envs.get(name, {}), "GEMMA_SERVER_SERVER__API_PROCESSES": _process_count(name)}
            targets.append(ours(args.config, log_dir, name=name, env=env))
        elif name == "vllm":
            targets.append(peer(settings, log_dir))
        elif name.startswith("vllm-") and name.endswith("proc"):  # e.g. vllm-2proc: --api-server-count 2
            targets.append(peer(settings, log_dir, extra_args=["--api-server-count", _process_count(name)], name=name))
        elif name == "ceiling":
            targets.append(CeilingTarget(args.config, log_dir))
        elif name in variants:
            targets.append(ours(args.config, log_dir, name=name, cwd=Path(variants[name]), env=envs.get(name)))
        else:
            raise SystemExit(f"unknown target {name!r}")
    return targets


def _process_count(target: str) -> str:
    count = target.split("-", 1)[1].removesuffix("proc")
    if not count.isdigit():
        raise SystemExit(f"unknown target {target!r}: expected e.g. ours-2proc")
    return count


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`: the running target is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A background shell starts us with SIGINT ignored; SIGTERM would kill us without cleanup.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    from server.settings import load_settings

    settings = load_settings(args.config)
    plan = make_plan(args)
    trials = args.trials or (QUICK if args.quick else FULL).trials
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"results and logs: {log_dir}", flush=True)

    info = machine_info()
    images = load_images(plan.images_needed(), plan.seed)
    cells = build_cells(plan, images)
    model = settings.model.served_name
    bodies = [
        ([chat_body(r, model=model, stream=c.stream, output_tokens=plan.output_tokens) for r in c.warmup],
         [chat_body(r, model=model, stream=c.stream, output_tokens=plan.output_tokens) for r in c.requests])
        for c in cells
    ]  # fmt: skip
    targets = build_targets(args, settings, log_dir)

    profile_cells: set[str] = set()
    if args.profile is not None:
        profile_cells = set(args.profile or ["text-stream:16", "image-stream:16"])
    preprocess = _measure_preprocess(settings, args.config) if args.preprocess else None
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    for trial in range(trials):
        shift = trial % len(targets)
        for target in targets[shift:] + targets[:shift]:
            if not _wait_for_memory(args.min_free_gb):
                print(f"  skipping {target.name} in trial {trial}: not enough free memory", flush=True)
                continue
            load_before = os.getloadavg()[0]
            try:
                result = _run_with_retries(target, trial, args, cells, bodies, plan, profile_cells, failures)
            except TargetDied:
                continue
            load = (load_before, os.getloadavg()[0])
            runs.extend(_split_rounds({"trial": trial, "target": target.name, "load": load, **result}, plan.rounds))
            _save(log_dir, info, plan, images, runs, preprocess, failures)
    info["load_after"] = os.getloadavg()
    results = _save(log_dir, info, plan, images, runs, preprocess, failures)
    if args.write:
        report.write(results, Path(args.write))
        print(f"report written to {args.write}", flush=True)
    print(report.render_tables(results))
    return 0


def _split_rounds(run: dict[str, Any], rounds: int) -> list[dict[str, Any]]:
    """One entry per round, numbered as trials (trial * rounds + round); start-up in the first."""
    entries = []
    for round_ in range(rounds):
        entry = {**run, "trial": run["trial"] * rounds + round_}
        entry["cells"] = [c for c in run["cells"] if c.get("round", 0) == round_]
        if round_ > 0:
            entry["startup"] = None
        entries.append(entry)
    return entries


def _run_with_retries(
    target: Any,
    trial: int,
    args: argparse.Namespace,
    cells: list[Cell],
    bodies: Any,
    plan: Plan,
    profile_cells: set[str],
    failures: list[str],
) -> dict[str, Any]:
    """Runs one target once; if it dies (the kernel kills the largest process when the shared
    machine runs out of memory), waits for memory and starts it again, up to --retries times."""
    for attempt in range(args.retries + 1):
        try:
            if isinstance(target, CeilingTarget):
                return run_ceiling(target, trial, plan)
            wanted = profile_cells if trial == 0 else set()
            return run_http_target(target, trial, cells, bodies, plan, wanted)
        except (TargetDied, RuntimeError) as exc:
            failures.append(f"trial {trial}, {target.name}, attempt {attempt + 1}: {str(exc)[:300]}")
            print(f"  {target.name} failed (attempt {attempt + 1}): {str(exc)[:300]}", flush=True)
            if attempt == args.retries or not _wait_for_memory(args.min_free_gb):
                break
    raise TargetDied(f"{target.name} failed in trial {trial}")


def _wait_for_memory(min_free_gb: float, timeout: float = 1200) -> bool:
    """Waits until the machine has room for a target (~7 GB: API process, engine core, worker).

    The machine is shared: starting a target without the memory for it gets a process killed by
    the kernel, ours or someone else's."""
    import psutil

    deadline = time.monotonic() + timeout
    while psutil.virtual_memory().available / 2**30 < min_free_gb:
        if time.monotonic() > deadline:
            return False
        print(f"  waiting for {min_free_gb} GB of free memory...", flush=True)
        time.sleep(15)
    return True


def _measure_preprocess(settings: Any, config: Path) -> dict[str, Any] | None:
    print("measuring the image preprocessing rate (one process, one core)", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.preprocess", "--model", settings.model.resolved_path, "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"preprocess measurement failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return dict(json.loads(lines[-1]))


def _save(
    log_dir: Path,
    info: dict[str, Any],
    plan: Plan,
    images: Any,
    runs: list[Any],
    preprocess: Any,
    failures: list[str],
) -> dict[str, Any]:
    results = {
        "machine": info,
        "plan": asdict(plan),
        "images": {"count": len(images), "fingerprint": fingerprint(images)},
        "preprocess": preprocess,
        "runs": runs,
        "failures": failures,
        "log_dir": str(log_dir),
    }
    (log_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    sys.exit(main())
