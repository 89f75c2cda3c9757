"""The `gemma-server` command.

    gemma-server serve --config config/tiny.yaml [--host H] [--port P]
    gemma-server make-tiny-model DIR [--force]
    gemma-server make-tiny-adapter DIR --seed N [--rank R] [--base DIR] [--force]
    gemma-server hash-key < key.txt      (the `sha256` of a key, for auth.keys)

`serve` runs uvicorn on the app from `server.app.create_app`; it exits non-zero when the engine
fails to start or dies, so an orchestrator restarts the process. SIGTERM drains and exits 0 (see
`server/lifecycle.py`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

log = logging.getLogger("server")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from server.lifecycle import exit_now

        exit_now(serve(args))
    if args.command == "make-tiny-model":
        return make_tiny_model(args)
    if args.command == "make-tiny-adapter":
        return make_tiny_adapter(args)
    if args.command == "hash-key":
        return hash_key()
    parser.print_help()
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-server", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")

    serve_cmd = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve_cmd.add_argument("--config", help="YAML configuration file (default: $GEMMA_SERVER_CONFIG)")
    serve_cmd.add_argument("--host", help="override server.host")
    serve_cmd.add_argument("--port", type=int, help="override server.port")

    tiny_cmd = commands.add_parser("make-tiny-model", help="write the tiny random-weight Gemma 3 checkpoint")
    tiny_cmd.add_argument("directory")
    tiny_cmd.add_argument("--force", action="store_true", help="rebuild even if it exists")

    adapter_cmd = commands.add_parser(
        "make-tiny-adapter", help="write a tiny random-weight LoRA adapter (PEFT) for the tiny checkpoint"
    )
    adapter_cmd.add_argument("directory")
    adapter_cmd.add_argument("--seed", type=int, required=True, help="same seed, same adapter")
    adapter_cmd.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: 8)")
    adapter_cmd.add_argument(
        "--base",
        default="~/.cache/gemma-server/tiny-gemma3",
        help="the tiny checkpoint (built there if missing; default: ~/.cache/gemma-server/tiny-gemma3)",
    )
    adapter_cmd.add_argument("--force", action="store_true", help="rebuild even if it exists")

    commands.add_parser(
        "hash-key",
        help="print the SHA-256 of the API key read from stdin, for auth.keys[].sha256 "
        "(stdin, not an argument: keys stay out of shell history and process lists)",
    )
    return parser


def hash_key() -> int:
    import hashlib

    key = sys.stdin.readline().strip()
    if len(key) < 8:
        print("gemma-server: give the key (8 characters or more) on stdin", file=sys.stderr)
        return 2
    print(hashlib.sha256(key.encode()).hexdigest())
    return 0


def serve(args: argparse.Namespace) -> int:
    from server.lifecycle import ExitCode, run_server
    from server.logging_setup import configure_logging
    from server.settings import load_settings

    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    try:
        settings = load_settings(args.config, **({"server": overrides} if overrides else {}))
    except (FileNotFoundError, ValueError) as exc:
        print(f"gemma-server: invalid configuration: {exc}{_env_hint(exc)}", file=sys.stderr)
        return ExitCode.INVALID_CONFIGURATION
    configure_logging(settings.server.log_level, settings.server.log_format)
    from server.engine.vllm_engine import device_problem

    if problem := device_problem():
        print(f"gemma-server: cannot start the engine: {problem}", file=sys.stderr)
        return ExitCode.ENGINE_STARTUP_FAILED
    if settings.server.api_processes > 1:
        from server.engine.api_processes import serve_api_processes

        return serve_api_processes(settings)
    return run_server(settings)


def _env_hint(exc: Exception) -> str:
    """pydantic-settings names only the section when a GEMMA_SERVER_* variable is not what its
    setting's type reads; the usual cause is a list given as plain text."""
    if "EnvSettingsSource" not in str(exc):
        return ""
    return (
        " (a GEMMA_SERVER_* variable of that section could not be read: lists and mappings are JSON, "
        'e.g. GEMMA_SERVER_AUTH__API_KEYS=\'["sk-one", "sk-two"]\')'
    )


def make_tiny_model(args: argparse.Namespace) -> int:
    from server.logging_setup import configure_logging
    from server.tiny_model import build_tiny_model

    configure_logging("info")
    path = build_tiny_model(args.directory, force=args.force)
    print(path)
    return 0


def make_tiny_adapter(args: argparse.Namespace) -> int:
    from server.logging_setup import configure_logging
    from server.tiny_adapter import build_tiny_adapter

    configure_logging("info")
    path = build_tiny_adapter(args.directory, args.base, seed=args.seed, rank=args.rank, force=args.force)
    print(path)
    return 0
