"""The README's configuration table is generated from the settings; it must not drift."""

from __future__ import annotations

from pathlib import Path

from server.config_reference import updated_readme

README = Path(__file__).resolve().parents[2] / "README.md"


def test_config_reference_is_current() -> None:
    text = README.read_text()
    assert updated_readme(text) == text, "run `make config-reference`"


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert "make serve" in text and "make test" in text
