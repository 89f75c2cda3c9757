"""The Kustomize overlays, rendered by the real kustomize (built into the pinned kubectl), validated
offline, and checked against the server's own configuration.

- Core kinds: kubernetes-validate (the Kubernetes OpenAPI schemas, strict: unknown fields fail) at
  the newest version it ships and at the oldest we support (native preStop sleep needs 1.30).
- Custom resources (KEDA ScaledObject, ServiceMonitor, PrometheusRule, HTTPRoute): the CRD schemas
  compiled in the kubernetes-models npm packages, plus a check for fields those schemas do not
  declare (deploy/tools/validate-crds.mjs); InferencePool and LeaderWorkerSet: their CRDs, kept in
  tests/deploy/crds (tests/deploy/test_gateway.py).
- Consistency: probes match /health and /ready, the grace period covers preStop + the drain window
  the server reads, the startup budget covers the server's own engine start-up timeout, selectors
  match, every GEMMA_SERVER_* variable is a real setting and the result loads, etc.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.settings import ENV_PREFIX, Settings, load_settings
from tests.deploy.support import (
    ADAPTER_VALUES,
    K8S,
    OVERLAYS,
    ROOT,
    TOOLS,
    container,
    env_values,
    find,
    metric_names,
    node_module,
    render_kustomization,
    run,
    server_workload,
    tool,
)

KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CUSTOM_KINDS = {"keda.sh/v1alpha1/ScaledObject", "monitoring.coreos.com/v1/ServiceMonitor",
                "monitoring.coreos.com/v1/PrometheusRule", "gateway.networking.k8s.io/v1/HTTPRoute"}  # fmt: skip
CRD_FILE_KINDS = {"inference.networking.k8s.io/v1/InferencePool", "leaderworkerset.x-k8s.io/v1/LeaderWorkerSet"}
NAMESPACE = "gemma"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render_kustomization(K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def secret_objects(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """deploy/kubernetes/secrets rendered with its example files in place of the real (ignored) ones."""
    folder = tmp_path_factory.mktemp("secrets") / "secrets"
    shutil.copytree(K8S / "secrets", folder)
    for example in folder.glob("*.example"):
        shutil.copy(example, folder / example.name.removesuffix(".example"))
    return render_kustomization(folder)


def test_the_overlays_the_issues_ask_for_exist() -> None:
    # Issue 5: one GPU, HPA, tensor parallel, CPU; issue 14: the inference gateway, multi-node (LWS).
    assert set(OVERLAYS) == {"gpu", "gpu-hpa", "tensor-parallel", "cpu", "gpu-gateway", "multi-node"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], secret_objects: list[dict[str, Any]], version: str
) -> None:
    checked = 0
    for overlay, objects in [*rendered.items(), ("secrets", secret_objects)]:
        for obj in objects:
            if f"{obj['apiVersion']}/{obj['kind']}" in CUSTOM_KINDS | CRD_FILE_KINDS:
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']} @ {version}"
                pytest.fail(f"{where}: {error.message} at {list(error.path)}")
            checked += 1
    assert checked >= 40


def test_strict_validation_rejects_a_misspelt_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The validator above can fail: a typo in a probe is caught."""
    deployment = json.loads(json.dumps(find(rendered["gpu"], "Deployment")))
    container(deployment)["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def validate_custom(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    node_module("@kubernetes-models/keda")
    result = run([tool("node"), str(TOOLS / "validate-crds.mjs")], input=json.dumps(objects), cwd=TOOLS)
    assert result.returncode == 0, result.stderr
    reports: list[dict[str, Any]] = json.loads(result.stdout)
    return reports


def test_custom_resources_validate_against_their_crd_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    custom = [
        obj for objects in rendered.values() for obj in objects if f"{obj['apiVersion']}/{obj['kind']}" in CUSTOM_KINDS
    ]
    kinds = {f"{obj['apiVersion']}/{obj['kind']}" for obj in custom}
    assert kinds == CUSTOM_KINDS
    reports = validate_custom(custom)
    assert len(reports) == len(custom)
    failures = [r for r in reports if r["errors"]]
    assert not failures, failures


def test_crd_validation_can_fail(rendered: dict[str, list[dict[str, Any]]]) -> None:
    scaled = json.loads(json.dumps(find(rendered["gpu"], "ScaledObject")))
    scaled["spec"]["minReplicas"] = 1  # KEDA's field is minReplicaCount
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # must be a string
    monitor = json.loads(json.dumps(find(rendered["gpu"], "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["interval"] = "fifteen seconds"
    reports = validate_custom([scaled, monitor])
    assert any("minReplicas" in e for e in reports[0]["errors"])
    assert any("threshold" in e for e in reports[0]["errors"])
    assert any("interval" in e for e in reports[1]["errors"])


# ------------------------------------------------------------------ agreement with the server ----
def server_settings_for(deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings the container would load: its --config file and its GEMMA_SERVER_* variables."""
    spec = container(deployment)
    args = spec["args"]
    if args[:2] == ["sh", "-c"]:  # the multi-node leader: the Ray head first, then `exec` the server
        args = shlex.split(args[2].split("&& exec ", 1)[1])
    assert args[:4] == ["python", "-m", "server", "serve"]
    config = ROOT / args[args.index("--config") + 1]
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    env = env_values(spec)
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            section, _, field = key.removeprefix(ENV_PREFIX).lower().partition("__")
            model = Settings.model_fields[section].annotation
            assert field in model.model_fields, f"{key} is not a setting"  # type: ignore[union-attr]
            monkeypatch.setenv(key, value)
    return load_settings(config)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_shutdown_agree_with_the_server(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = server_workload(rendered[overlay])
    settings = server_settings_for(deployment, monkeypatch)
    spec = container(deployment)
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    ray_head = {"ray": 6379} if settings.engine.nodes > 1 else {}  # the multi-node leader's Ray head
    assert ports == {"http": settings.server.port, **ray_head}

    def probe_target(probe: str) -> tuple[str, Any]:
        get = spec[probe]["httpGet"]
        return get["path"], get["port"]

    # /health: the process is alive (also while loading); /ready: the engine can serve (not draining).
    assert probe_target("livenessProbe") == ("/health", "http")
    assert probe_target("readinessProbe") == ("/ready", "http")
    assert probe_target("startupProbe") == ("/ready", "http")
    startup = spec["startupProbe"]
    startup_budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert startup_budget > settings.server.engine_startup_timeout_seconds, (
        "the server's own start-up timeout must fire first (a clear error and exit code, not a kubelet kill)"
    )
    # Shutdown: preStop sleep, then SIGTERM -> drain for server.drain_timeout_seconds -> exit.
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = spec["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["terminationGracePeriodSeconds"]
    drain = settings.server.drain_timeout_seconds
    assert drain > 0
    assert grace >= pre_stop + drain + 15, f"grace {grace} s < preStop {pre_stop} s + drain {drain} s + 15 s shutdown"
    # The readiness probe notices a drain (or a dead engine) well inside the drain window.
    readiness = spec["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < drain
    # The liveness probe does not kill a pod that is busy but alive too eagerly.
    liveness = spec["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_cache_and_writable_paths(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    deployment = server_workload(rendered[overlay])
    pod = deployment["spec"]["template"]["spec"]
    spec = container(deployment)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in spec["volumeMounts"]}
    assert all(m["name"] in volumes for m in mounts.values()), "every mount has a volume"
    env = env_values(spec)
    # API keys: a file from the Secret; HF token: an env var from the Secret, never a literal.
    keys_file = Path(env["GEMMA_SERVER_AUTH__API_KEYS_FILE"])
    secret_mount = mounts[str(keys_file.parent)]
    secret_volume = volumes[secret_mount["name"]]["secret"]
    assert secret_mount["readOnly"] and keys_file.name in [i["path"] for i in secret_volume["items"]]
    hf_token = next(e for e in spec["env"] if e["name"] == "HF_TOKEN")
    assert hf_token["valueFrom"]["secretKeyRef"]["name"] == secret_volume["secretName"]
    assert not any("TOKEN" in e["name"] and "value" in e for e in spec["env"])
    # Read-only root filesystem: the image's HOME, /tmp and the cache (HF_HOME=/cache/...) are mounts.
    for path in ("/home/gemma", "/tmp", "/cache", "/dev/shm"):
        assert path in mounts, f"{path} must be a writable mount under readOnlyRootFilesystem"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    cache = volumes[mounts["/cache"]["name"]]
    if overlay == "cpu":
        assert "emptyDir" in cache, "the CPU image carries its model"
        assert not [o for o in rendered[overlay] if o["kind"] == "PersistentVolumeClaim"]
    else:
        claim = find(rendered[overlay], "PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "replicas share the model cache"


def test_the_secret_provides_what_the_deployment_reads(
    rendered: dict[str, list[dict[str, Any]]], secret_objects: list[dict[str, Any]]
) -> None:
    secret = find(secret_objects, "Secret")
    assert secret["metadata"]["namespace"] == NAMESPACE
    deployment = find(rendered["gpu"], "Deployment")
    spec = container(deployment)
    hf = next(e for e in spec["env"] if e["name"] == "HF_TOKEN")["valueFrom"]["secretKeyRef"]
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v)["secret"]
    assert secret["metadata"]["name"] == hf["name"] == volume["secretName"]
    assert {hf["key"], *(i["key"] for i in volume["items"])} <= set(secret["data"])
    gitignore = (K8S / "secrets" / ".gitignore").read_text().split()
    assert all(
        Path(f.split("=")[1]).name in gitignore
        for f in yaml.safe_load((K8S / "secrets" / "kustomization.yaml").read_text())["secretGenerator"][0]["files"]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context_meets_the_restricted_pod_security_standard(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    namespace = find(rendered[overlay], "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    deployment = server_workload(rendered[overlay])
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 1000
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    allowed_volumes = {"emptyDir", "persistentVolumeClaim", "secret", "configMap", "projected", "ephemeral"}
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= allowed_volumes, volume
    for spec in pod["containers"]:
        context = spec["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert not context.get("privileged")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_gpus_and_parallelism(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = server_workload(rendered[overlay])
    spec = container(deployment)
    resources = spec["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    settings = server_settings_for(deployment, monkeypatch)
    gpus = resources["limits"].get("nvidia.com/gpu")
    if overlay == "cpu":
        assert gpus is None and "nvidia.com/gpu" not in resources["requests"]
        assert settings.model.served_name == "tiny-gemma3"
        assert deployment["spec"]["template"]["spec"].get("tolerations") in (None, [])
        return
    assert resources["requests"]["nvidia.com/gpu"] == gpus
    # One replica uses tensor_parallel_size x pipeline_parallel_size GPUs, split evenly over its nodes
    # (one for a Deployment's pod; a LeaderWorkerSet group's pods each have their share).
    engine = settings.engine
    assert int(gpus) * engine.nodes == engine.tensor_parallel_size * engine.pipeline_parallel_size
    assert settings.model.path == "google/gemma-3-4b-it"
    if overlay == "tensor-parallel":
        assert settings.engine.tensor_parallel_size > 1
        # gemma-3-4b-it has 8 attention heads and 4 KV heads: the size must divide both.
        assert 8 % settings.engine.tensor_parallel_size == 0 and 4 % settings.engine.tensor_parallel_size == 0
        base_shm = find(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]["volumes"]
        shm = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}["dshm"]
        assert shm != {v["name"]: v for v in base_shm}["dshm"], "NCCL needs more shared memory"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_pods(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    deployment = server_workload(objects)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = find(objects, "Service", "gemma-server")
    assert selects(service["spec"]["selector"], pod_labels)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert selects(find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    assert find(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    policy = find(objects, "NetworkPolicy", "gemma-server")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    egress_blocks = [to["ipBlock"] for rule in policy["spec"]["egress"] for to in rule["to"] if "ipBlock" in to]
    assert egress_blocks and all({"10.0.0.0/8", "169.254.0.0/16"} <= set(b["except"]) for b in egress_blocks)
    # Every namespaced object says so (one without would land in kubectl's current namespace).
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert [o["kind"] for o in namespaced if o["metadata"].get("namespace") != NAMESPACE] == []
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(container(deployment)["ports"][0]["containerPort"])
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    for monitor in monitors:
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


@pytest.mark.parametrize("overlay", ["gpu", "tensor-parallel"])
def test_keda_scales_the_deployment_on_the_queue_the_router_reads(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    scaled = find(objects, "ScaledObject")
    deployment = find(objects, "Deployment")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= 1, "no scale to zero: a cold start takes minutes"
    queries = {t["name"]: t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"}
    # vllm:num_requests_waiting counts the front end's queue too (server/metrics.py): the one signal
    # the inference gateway's Endpoint Picker routes on.
    assert set().union(*map(metric_names, queries.values())) == {"vllm:num_requests_waiting"}
    # The queries select this namespace and the scrape job the ServiceMonitor creates (the Service name).
    service = find(objects, "Service")["metadata"]
    for query in queries.values():
        assert f'namespace="{service["namespace"]}"' in query and f'job="{service["name"]}"' in query
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"], "KEDA creates its own HPA"


def test_hpa_scales_on_the_adapters_metrics(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["gpu-hpa"]
    hpa = find(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gemma-server"}
    assert hpa["spec"]["minReplicas"] >= 1
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert names == served == {"vllm_num_requests_waiting"}
    for rule in adapter["rules"]["custom"]:
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, "per-pod metrics need both labels"
    assert not [o for o in objects if o["kind"] == "ScaledObject"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_runs_its_own_image(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """The CPU overlay once rendered the GPU image: its rename rule matched a name the base had
    already replaced. (test_image.py runs the CPU overlay's pod with the image built here.)"""
    image = container(server_workload(rendered[overlay]))["image"]
    expected = "gemma-server:cpu" if overlay == "cpu" else "registry.example.com/gemma-server:0.1.0-gpu"
    assert image == expected
