"""The server's OpenAPI document, generated from the app and committed as docs/openapi.json.

    python -m server.openapi                       # print it
    python -m server.openapi --write docs/openapi.json

The wire types (`server/protocols/*/wire.py`) and the routes define it; a unit test fails when the
committed document and the code drift apart (`make openapi` rewrites it). Building it loads no
model: the app is created with an engine that is never started.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from server.settings import Settings

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"


class _UnstartedEngine:
    """Enough of an engine for the app to be built; the document needs nothing of it."""

    model_name = "gemma"
    max_model_len = 0
    tokenizer = None
    is_ready = False
    is_dead = False

    def shutdown(self) -> None:
        pass


def openapi_document() -> dict[str, Any]:
    from server.app import create_app

    app = create_app(Settings(), engine=_UnstartedEngine())  # type: ignore[arg-type]
    return app.openapi()


def rendered() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="write the document to this file")
    args = parser.parse_args(argv)
    text = rendered()
    if args.write:
        args.write.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
