"""Generates docs/configuration.md's table from the settings' own field descriptions.

    python -m server.config_reference            # print the markdown
    python -m server.config_reference --write    # rewrite the table in docs/configuration.md

`--write FILE` rewrites the table between the markers in another file. A unit test fails when
docs/configuration.md's table is out of date.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import BaseModel

from server.settings import ENV_PREFIX, Settings

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def reference_markdown() -> str:
    lines = [
        "| key | environment variable | default | meaning |",
        "|---|---|---|---|",
    ]
    for section_name, section_field in Settings.model_fields.items():
        section_type = section_field.annotation
        assert isinstance(section_type, type) and issubclass(section_type, BaseModel)
        defaults = section_type()
        for name, field in section_type.model_fields.items():
            default = getattr(defaults, name)
            env = f"{ENV_PREFIX}{section_name.upper()}__{name.upper()}"
            shown = json.dumps(default) if not isinstance(default, str) else default
            description = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{section_name}.{name}` | `{env}` | `{shown}` | {description} |")
    return "\n".join(lines)


def updated_document(text: str) -> str:
    """`text` with the generated table between its markers."""
    start, end = text.index(START) + len(START), text.index(END)
    return text[:start] + "\n" + reference_markdown() + "\n" + text[end:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--write",
        type=Path,
        nargs="?",
        const=DEFAULT_PATH,
        help="replace the table in this file (default: docs/configuration.md)",
    )
    args = parser.parse_args()
    if args.write:
        args.write.write_text(updated_document(args.write.read_text()))
    else:
        print(reference_markdown())


if __name__ == "__main__":
    main()
