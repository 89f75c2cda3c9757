"""The layout's boundaries, checked on the source: which package may import what.

Every import statement of every module under server/ is read with `ast` (those inside functions and
under TYPE_CHECKING too), so a rule a docstring states cannot quietly stop being true.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"
VLLM_IMPORTERS = {"server/engine/vllm_engine.py", "server/engine/api_processes.py"}

# (modules the rule applies to, a prefix they must not import, why)
RULES = [
    ("server/protocols/", "vllm", "protocols speak to the pipeline, never to the engine"),
    ("server/protocols/", "server.engine.vllm_engine", "protocols speak to the pipeline, never to the engine"),
    ("server/protocols/", "server.app", "the app includes the protocols, not the other way round"),
    ("server/pipeline/", "server.protocols", "the pipeline is protocol-neutral"),
    ("server/pipeline/", "fastapi", "the pipeline does not route; it answers with Starlette responses"),
    ("server/pipeline/", "server.app", "the pipeline is built by the app"),
    ("server/pipeline/", "server.engine.vllm_engine", "the pipeline uses the engine interface"),
    ("server/media/", "server.pipeline", "media is a step the pipeline calls"),
    ("server/media/", "server.protocols", "media knows request fields only by name"),
    ("server/edge/", "server.protocols", "the edge is the same for every protocol"),
    ("server/edge/", "server.pipeline.pipeline", "the edge runs before any route"),
    ("server/errors.py", "fastapi", "errors are plain; Starlette's Response is enough"),
    ("server/engine/interface.py", "server.", "the engine interface is plain types"),
    ("server/pipeline/request.py", "server.", "the pipeline request is the contract: plain types"),
    ("server/lifecycle.py", "server.engine.api_processes", "api_processes uses lifecycle, not the other way round"),
]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


MODULES = {str(path.relative_to(SERVER.parent)): _imports(path) for path in sorted(SERVER.rglob("*.py"))}


def test_only_the_engine_adapter_imports_vllm() -> None:
    importers = {
        name for name, imports in MODULES.items() if any(i == "vllm" or i.startswith("vllm.") for i in imports)
    }
    assert importers == VLLM_IMPORTERS


@pytest.mark.parametrize(("scope", "forbidden", "why"), RULES)
def test_package_boundaries(scope: str, forbidden: str, why: str) -> None:
    offenders = {
        name: sorted(i for i in imports if i == forbidden.rstrip(".") or i.startswith(forbidden))
        for name, imports in MODULES.items()
        if name.startswith(scope)
    }
    assert any(name.startswith(scope) for name in MODULES), f"no module matches {scope}"
    assert not {name: found for name, found in offenders.items() if found}, why


def test_no_module_imports_the_cli() -> None:
    """The cli is the entry point (`python -m server` runs it); lifecycle owns exit_now, so nothing
    else imports the cli back."""
    assert [name for name, imports in MODULES.items() if "server.cli" in imports] == ["server/__main__.py"]
