"""Generates the README's configuration reference from the settings' own field descriptions.

    python -m server.config_reference            # print the markdown
    python -m server.config_reference --write README.md

A unit test fails when the README's table is out of date.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import BaseModel

from server.settings import ENV_PREFIX, Settings

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


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


def updated_readme(text: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[:start] + "\n" + reference_markdown() + "\n" + text[end:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", type=Path, help="replace the table in this file")
    args = parser.parse_args()
    if args.write:
        args.write.write_text(updated_readme(args.write.read_text()))
    else:
        print(reference_markdown())


if __name__ == "__main__":
    main()
