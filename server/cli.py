"""The `gemma-server` command.

    gemma-server serve --config config/tiny.yaml [--host H] [--port P]
    gemma-server make-tiny-model DIR [--force]

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
    return parser


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
