"""What every tier needs: the tiny checkpoint, the image hosts, the `late` ordering, and the rule that
a skipped test is a test that did not pass (the session fails if anything was skipped).

The live tier's fixtures (the live server, vLLM's server and offline oracle, the sacrificial
servers, the measured figures and the machine's stall reports) are in tests/support/live_plugin.py,
registered here; they start nothing unless a test of the run asks for them.

Tiers (see the Makefile): tests/unit is the fast tier (fake engine, no vLLM engine started);
tests/integration the live tier (the real vLLM CPU engine on the tiny model); tests/slow the faults,
soak and fuzz tests (`late`, on the shared server and on sacrificial ones); tests/deploy the
deployment files (tests/deploy/test_prometheus_live.py scrapes the live server). `make test` runs
them all in one pytest run, so the tiers share the live servers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.image_host import ImageHost

pytest_plugins = ["tests.support.live_plugin"]

TINY_MODEL_DIR = Path(os.path.expanduser("~/.cache/gemma-server/tiny-gemma3"))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/gpu_image (the GPU image's build: ~5 GB of downloads) runs only when named, as
    `make test-gpu-image` does; the suite (`pytest` alone, `make test`) leaves it out."""
    if collection_path.name == "gpu_image" and not any("gpu_image" in arg for arg in config.args):
        return True
    return None


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from server.tiny_model import build_tiny_model, is_complete

    if not is_complete(TINY_MODEL_DIR):
        build_tiny_model(TINY_MODEL_DIR)
    return TINY_MODEL_DIR


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir: Path) -> dict[str, Path]:
    """The two tiny LoRA adapters of the tiny checkpoint (name -> folder), built once per machine."""
    from server.tiny_adapter import ensure_tiny_adapters
    from tests.support.oracle_cases import LORA_ADAPTERS

    return ensure_tiny_adapters(LORA_ADAPTERS, base_dir=tiny_model_dir)


@pytest.fixture(scope="session")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost().start()
    yield host
    host.stop()


@pytest.fixture(scope="session")
def canary() -> Iterator[ImageHost]:
    """A listener on another loopback port that no image URL may ever reach (SSRF tests)."""
    host = ImageHost().start()
    yield host
    host.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "late(order): run after all other tests, in this order (tests on servers they stop or break)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def order(item: pytest.Item) -> tuple[int, float]:
        marker = item.get_closest_marker("late")
        return (1, float(marker.args[0])) if marker else (0, 0.0)

    items.sort(key=order)  # stable: everything else keeps its order


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and exitstatus == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line(f"FAILED: {skipped} test(s) were skipped; a skipped test does not pass.", red=True)
