"""The GPU image (the Dockerfile's default target: vllm 0.32.0 with its CUDA wheels from PyPI)
built for real with podman, and checked on a machine without a GPU: vLLM and Ray import, the entry
point parses the GPU configuration, and the server, given no GPU, exits at once with one clear line
(exit code 3), not a traceback or a model download.

Not part of `make test`: the build downloads about 5 GB of CUDA wheels and writes an image of about
12 GB (twice that in podman's storage while it builds), more than the suite's time and disk budget on
these machines. Its own target runs it: `make test-gpu-image` (tests/conftest.py leaves this folder
out unless it is named).

Bases, as for the CPU image (tests/deploy/podman.py): the CUDA base (nvidia/cuda) cannot be pulled
here, so a Debian 12 base made from Debian's packages stands in for it (the CUDA libraries come from
the nvidia-* wheels either way; the CUDA base adds the driver hooks a GPU host needs), and uv's
Python build cannot be downloaded from GitHub, so PYTHON_SOURCE=system takes Debian's Python 3.11.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.deploy.podman import Build, build_image, podman, podman_json

pytestmark = pytest.mark.timeout(5400)

GPU_IMAGE = "localhost/gemma-server:gpu"
STAND_IN_BASES = (
    *("--build-arg", "CUDA_BASE_IMAGE=localhost/debian-base:bookworm"),
    *("--build-arg", "PYTHON_SOURCE=system"),
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, report: Callable[[str], None]) -> Build:
    build = build_image("gpu", GPU_IMAGE, tmp_path_factory.mktemp("gpu-image") / "build.log", *STAND_IN_BASES)
    size = f"{build.size_bytes / 1e9:.2f} GB"
    report(f"GPU image: built in {build.seconds:.0f} s (podman, this machine's layer cache), {size}")
    return build


def run_in_image(*command: str, timeout: float = 600) -> Any:
    return podman("run", "--rm", "--read-only", "--tmpfs", "/tmp", GPU_IMAGE, *command, timeout=timeout, check=False)


def test_the_cuda_build_of_vllm_and_ray_import(built: Build) -> None:
    script = (
        "import importlib.metadata as m, json, torch, vllm, ray;"
        "print(json.dumps([m.version('vllm'), torch.version.cuda, torch.cuda.is_available(), ray.__version__]))"
    )
    result = run_in_image("python", "-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    version, cuda, available, _ray = json.loads(result.stdout.strip().splitlines()[-1])
    assert version == "0.32.0" and cuda and cuda.startswith("13"), (version, cuda)
    assert available is False  # no GPU here: what the next test relies on


def test_without_a_gpu_the_server_exits_3_with_one_clear_line(built: Build, report: Callable[[str], None]) -> None:
    # The image's own command: `python -m server serve --config config/gemma-3-4b-it.yaml`.
    started = time.monotonic()
    result = run_in_image()
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    ours = [line for line in output.splitlines() if line.startswith("gemma-server:")]
    assert len(ours) == 1 and "vLLM sees no GPU" in ours[0], output[-3000:]
    assert "Traceback" not in output
    report(f"GPU image without a GPU: exit 3 after {seconds:.1f} s, saying: {ours[0]}")


def test_the_entry_point_parses_the_gpu_configuration(built: Build) -> None:
    script = (
        "from server.settings import load_settings;"
        "s = load_settings('config/gemma-3-4b-it.yaml');"
        "print(s.model.path, s.engine.tensor_parallel_size, s.responses.url)"
    )
    result = run_in_image("python", "-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["google/gemma-3-4b-it", "1", "sqlite:////cache/gemma-server/responses.db"]
    # A configuration it cannot load is refused before anything else (exit 2).
    result = run_in_image("python", "-m", "server", "serve", "--config", "config/missing.yaml")
    assert result.returncode == 2 and "invalid configuration" in result.stderr, result.stderr[-2000:]


def test_the_gpu_image_keeps_the_cpu_images_promises(built: Build) -> None:
    image = podman_json("image", "inspect", GPU_IMAGE)[0]
    config = image["Config"]
    assert config["User"] == "10001:10001" and image["Healthcheck"]["Test"][0] == "CMD"
    assert config["Entrypoint"] == ["tini", "--"]
    assert not any(name.startswith(("SSL_CERT_FILE=", "UV_CACHE_DIR=", "HF_TOKEN=")) for name in config["Env"])
    result = run_in_image("sh", "-c", "id -u; python -c 'import pytest' 2>/dev/null && echo dev-tools; touch /app/x")
    out = result.stdout + result.stderr
    assert out.split()[0] == "10001" and "dev-tools" not in out and "Read-only file system" in out, out
