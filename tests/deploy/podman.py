"""The container tools of the image tests: podman (with the repo's containers.conf), the bases the
Dockerfile's build ARGs point at on a machine without a registry, the CPU image's build, and a
container or pod waited on until its server is ready.

podman stands for Docker here: the Dockerfile, the `run` flags and the Kubernetes manifests are the
ones a Docker or Kubernetes user runs; only the bases and two build-time mounts differ (see
`build_cpu_image`).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.deploy.support import ROOT, TOOLS, tool

CPU_IMAGE = "localhost/gemma-server:cpu"  # what the CPU overlay runs as gemma-server:cpu
CONTAINERS_CONF = TOOLS / "containers.conf"
READY_TIMEOUT_SECONDS = 900  # a cold engine start is 1-2 minutes; the machine stalls at times


def podman_env() -> dict[str, str]:
    """The environment for podman and for tools that run it (the base scripts, podman-compose)."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [tool("podman"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=podman_env(),
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def podman_json(*args: str) -> Any:
    import json

    return json.loads(podman(*args).stdout)


@dataclass
class Build:
    seconds: float
    size_bytes: int
    log: Path


def build_cpu_image(log: Path) -> Build:
    """`podman build --target cpu` of the repo's Dockerfile: see `build_image`."""
    return build_image("cpu", CPU_IMAGE, log)


def build_image(target: str, tag: str, log: Path, *build_args: str) -> Build:
    """`podman build --target TARGET` of the repo's Dockerfile, as a Docker user builds it, except:
    - the bases are local (deploy/tools/base-images.sh: Debian 12 from Debian's packages, the pinned
      uv binary): no registry is reachable here;
    - two build-time mounts, named by build ARGs that are unset by default: this machine's CA bundle
      (package downloads here go through a private CA) and its uv cache (no wheel is downloaded
      twice). A mount leaves nothing in the image; the tests check it.
    - `--format docker`: the OCI format has no HEALTHCHECK, and podman drops it silently;
    - `--force-rm`: a failed build leaves no working container behind (each may hold gigabytes).
    Layers are cached in podman's storage (as untagged intermediate images: pruning them empties the
    cache): a second build on one machine redoes only what changed.
    """
    base_args = tools_script("base-images.sh").split()
    uv_cache = subprocess.run(
        [*_uv(), "cache", "dir"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    ca_bundle = os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run(
            [
                tool("podman"), "build", "--force-rm", "--format", "docker", "--target", target, "--tag", tag,
                *base_args, *build_args,
                "--volume", f"{uv_cache}:/uv-cache", "--build-arg", "UV_CACHE_DIR=/uv-cache",
                "--volume", f"{ca_bundle}:/run/build-ca.crt:ro", "--build-arg", "SSL_CERT_FILE=/run/build-ca.crt",
                str(ROOT),
            ],
            stdout=out, stderr=subprocess.STDOUT, timeout=3600, check=False,
            env=podman_env(),
        )  # fmt: skip
    seconds = time.monotonic() - started
    assert result.returncode == 0, f"the image did not build:\n{tail(log)}"
    size = int(podman("image", "inspect", tag, "--format", "{{.Size}}").stdout)
    return Build(seconds, size, log)


def tools_script(name: str) -> str:
    """Runs deploy/tools/NAME (a script that makes a local base or stand-in image) and returns what
    it printed; fails the test with its error output if it fails."""
    run = subprocess.run(
        ["bash", str(TOOLS / name)], capture_output=True, text=True, timeout=900, env=podman_env(), check=False
    )
    assert run.returncode == 0, f"deploy/tools/{name} failed:\n{run.stderr[-3000:]}"
    return run.stdout


def _uv() -> list[str]:
    import shutil

    return [found] if (found := shutil.which("uv")) else ["python3", "-m", "uv"]


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def logs(container: str, lines: int = 60) -> str:
    out = podman("logs", "--tail", str(lines), container, check=False)
    return out.stdout + out.stderr


KUBE_PLAY_TIMEOUT_SECONDS = 240  # a healthy play of the CPU overlay takes seconds: the image is local


def kube_play(manifest: Path, clean: Callable[[], None], prepare: Callable[[], None]) -> None:
    """`podman kube play MANIFEST`, tried twice: before each try `clean` (which must remove the
    manifest's pod, containers and volumes) and `prepare` (what must exist before the play); after a
    failed last try, `clean`. podman 4.3 sometimes leaves a pod's
    infra (pause) container in `Created` and `kube play` waits on it for ever, or leaves a
    container in its storage only (`podman ps --external`), whose name the next play cannot take.
    That is podman's, not the manifests': the leftovers are removed and the play tried once more;
    a second failure fails the test with what podman said and showed each time."""
    failures = []
    for attempt in (1, 2):
        clean()
        prepare()
        try:
            podman("kube", "play", str(manifest), timeout=KUBE_PLAY_TIMEOUT_SECONDS)
            return
        except (subprocess.TimeoutExpired, AssertionError) as exc:
            shown = podman("pod", "ps", check=False).stdout + podman("ps", "--all", "--external", check=False).stdout
            failures.append(f"attempt {attempt}: {str(exc)[-1500:]}\n{shown}")
            print(failures[-1], flush=True)  # in the test's captured output even if the retry passes
    clean()
    raise AssertionError("\n".join(failures))


def wait_ready(base_url: str, container: str) -> float:
    """Seconds until GET /ready is 200; fails with the container's log if it stops or never gets there."""
    started = time.monotonic()
    while True:
        running = podman("inspect", container, "--format", "{{.State.Running}}", check=False).stdout.strip()
        assert running == "true", f"{container} is not running:\n{logs(container)}"
        try:
            if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        assert time.monotonic() - started < READY_TIMEOUT_SECONDS, f"{container} not ready:\n{logs(container)}"
        time.sleep(1)
