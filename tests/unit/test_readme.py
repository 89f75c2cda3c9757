"""The README and docs/: the configuration table is generated from the settings and must not drift;
every relative link points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.config_reference import DEFAULT_PATH, updated_document

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) or [text](target "title"); inline code is removed first
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


def test_config_reference_is_current() -> None:
    assert DEFAULT_PATH == CONFIGURATION
    text = CONFIGURATION.read_text()
    assert updated_document(text) == text, "run `make config-reference`"


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert "make serve" in text and "make test" in text


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(document: Path) -> None:
    prose = CODE.sub("", document.read_text())
    missing = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http(s), mailto:, ... and anchors within the page
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (document.parent / path).exists():
            missing.append(target)
    assert not missing, f"{document.relative_to(ROOT)} links to missing files: {missing}"
