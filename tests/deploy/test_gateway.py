"""Scale-out on Kubernetes' own inference stack, rendered by the real kustomize and checked offline:
the inference gateway (overlays/gpu-gateway: InferencePool, the Endpoint Picker, an HTTPRoute) and
one replica across nodes (overlays/multi-node: a LeaderWorkerSet).

- InferencePool and LeaderWorkerSet against their own CRDs (tests/deploy/crds, with their sources),
  strictly: a field the schema does not declare fails, as `kubectl apply --validate=strict` would.
  The CRDs' CEL rules, which jsonschema does not run, are checked here by hand. The HTTPRoute is
  validated with the other custom resources (test_kubernetes.py); the pods LWS carries against the
  Kubernetes schemas.
- Agreement with the server: the pool selects the server's pods on their API port; the picker reads
  metric names the server exports (tests/slow/test_router_metrics.py scrapes them live); the
  leader's settings load, and the group's GPUs are what its parallelism needs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.metrics import ENGINE_WAITING, KV_CACHE_USAGE
from tests.deploy.support import K8S, container, env_values, find, render_kustomization, server_workload

CRDS = Path(__file__).parent / "crds"
POOL_KIND = "inference.networking.k8s.io/v1/InferencePool"
GROUP_KIND = "leaderworkerset.x-k8s.io/v1/LeaderWorkerSet"
# What llm-d's router v0.10.0 refuses at start (metric names moved into its configuration file).
DEPRECATED_PICKER_FLAGS = (
    "--total-queued-requests-metric",
    "--total-running-requests-metric",
    "--kv-cache-usage-percentage-metric",
    "--lora-info-metric",
    "--cache-info-metric",
)


def _strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties (the
    API server prunes unknown fields, or refuses them with --validate=strict; jsonschema would accept)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        declared = "properties" in schema and "additionalProperties" not in schema
        if declared and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(value) for value in schema]
    return schema


def _validator(crd_file: str) -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load((CRDS / crd_file).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft202012Validator(_strict(version["schema"]["openAPIV3Schema"]))


POOL_SCHEMA = _validator("inference.networking.k8s.io_inferencepools.yaml")
GROUP_SCHEMA = _validator("leaderworkerset.x-k8s.io_leaderworkersets.yaml")


def _errors(validator: jsonschema.Draft202012Validator, obj: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def _pool_cel_errors(pool: dict[str, Any]) -> list[str]:
    """The InferencePool CRD's x-kubernetes-validations (CEL), with the defaults the API server applies."""
    errors = []
    numbers = [port["number"] for port in pool["spec"]["targetPorts"]]
    if len(numbers) != len(set(numbers)):
        errors.append("port number must be unique")
    picker = pool["spec"].get("endpointPickerRef")
    if picker is not None and picker.get("kind", "Service") == "Service" and "port" not in picker:
        errors.append("port is required when kind is 'Service' or unspecified (defaults to 'Service')")
    return errors


@pytest.fixture(scope="module")
def gateway() -> list[dict[str, Any]]:
    return render_kustomization(K8S / "overlays" / "gpu-gateway")


@pytest.fixture(scope="module")
def multi_node() -> list[dict[str, Any]]:
    return render_kustomization(K8S / "overlays" / "multi-node")


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def _picker_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    picker = find(objects, "Deployment", "gemma-server-epp")
    args = dict(arg.split("=", 1) for arg in container(picker, "epp")["args"] if "=" in arg)
    mount = container(picker, "epp")["volumeMounts"][0]
    volume = next(v for v in picker["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = find(objects, "ConfigMap", volume["configMap"]["name"])
    key = Path(args["--config-file"]).relative_to(mount["mountPath"]).as_posix()
    config: dict[str, Any] = yaml.safe_load(config_map["data"][key])
    return config


# ---- the inference gateway ------------------------------------------------------------------------


def test_the_inference_pool_validates_against_its_crd(gateway: list[dict[str, Any]]) -> None:
    pool = find(gateway, "InferencePool")
    assert f"{pool['apiVersion']}/{pool['kind']}" == POOL_KIND
    assert _errors(POOL_SCHEMA, pool) == []
    assert _pool_cel_errors(pool) == []


def test_crd_validation_can_fail(gateway: list[dict[str, Any]], multi_node: list[dict[str, Any]]) -> None:
    pool = copy.deepcopy(find(gateway, "InferencePool"))
    pool["spec"]["targetPort"] = [{"number": 8000}]  # the field is targetPorts
    pool["spec"]["endpointPickerRef"]["failureMode"] = "Open"
    assert len(_errors(POOL_SCHEMA, pool)) == 2
    pool = copy.deepcopy(find(gateway, "InferencePool"))
    pool["spec"]["targetPorts"].append({"number": 8000})
    del pool["spec"]["endpointPickerRef"]["port"]
    assert len(_pool_cel_errors(pool)) == 2
    group = copy.deepcopy(find(multi_node, "LeaderWorkerSet"))
    group["spec"]["leaderWorkerTemplate"]["sizee"] = 2
    group["spec"]["startupPolicy"] = "LeaderFirst"
    assert len(_errors(GROUP_SCHEMA, group)) == 2


def test_the_pool_sends_requests_to_the_server_pods_and_asks_the_picker(gateway: list[dict[str, Any]]) -> None:
    pool = find(gateway, "InferencePool")["spec"]
    server = server_workload(gateway)
    server_pod = server["spec"]["template"]["metadata"]["labels"]
    picker = find(gateway, "Deployment", "gemma-server-epp")
    assert _selects(pool["selector"]["matchLabels"], server_pod)
    assert not _selects(pool["selector"]["matchLabels"], picker["spec"]["template"]["metadata"]["labels"])
    assert [port["number"] for port in pool["targetPorts"]] == [container(server)["ports"][0]["containerPort"]]
    # The picker's Service, on the port of its ext-proc gRPC server (TLS: the gateway speaks h2 to it).
    service = find(gateway, "Service", pool["endpointPickerRef"]["name"])
    assert _selects(service["spec"]["selector"], picker["spec"]["template"]["metadata"]["labels"])
    grpc = next(p for p in service["spec"]["ports"] if p["port"] == pool["endpointPickerRef"]["port"]["number"])
    assert grpc["appProtocol"] == "kubernetes.io/h2c"
    picker_ports = {p["name"]: p["containerPort"] for p in container(picker, "epp")["ports"]}
    assert picker_ports["grpc"] == grpc.get("targetPort", grpc["port"])
    args = container(picker, "epp")["args"]
    assert f"--pool-name={find(gateway, 'InferencePool')['metadata']['name']}" in args
    assert f"--grpc-port={picker_ports['grpc']}" in args
    assert not [arg for arg in args if arg.split("=")[0] in DEPRECATED_PICKER_FLAGS]
    # The route sends the Gateway's traffic to the pool (a port on a pool backendRef is ignored).
    route = find(gateway, "HTTPRoute")["spec"]
    backends = [ref for rule in route["rules"] for ref in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "gemma-server"}]


def test_the_picker_reads_the_metric_names_the_server_exports(gateway: list[dict[str, Any]]) -> None:
    config = _picker_config(gateway)
    assert (config["apiVersion"], config["kind"]) == ("llm-d.ai/v1alpha1", "EndpointPickerConfig")
    plugins = {plugin.get("name", plugin["type"]): plugin for plugin in config["plugins"]}
    for profile in config["schedulingProfiles"]:
        assert all(ref["pluginRef"] in plugins for ref in profile["plugins"]), profile
    engines = plugins["core-metrics-extractor"]["parameters"]["engineConfigs"]
    vllm = next(engine for engine in engines if engine["name"] == "vllm")
    # The queue it routes on is the one KEDA scales on: front end and engine (server/metrics.py).
    assert vllm["queuedRequestsSpec"] == ENGINE_WAITING
    assert vllm["kvUsageSpec"] == KV_CACHE_USAGE
    assert vllm["runningRequestsSpec"] == "vllm:num_requests_running"
    keda = find(gateway, "ScaledObject")
    assert all(ENGINE_WAITING in trigger["metadata"]["query"] for trigger in keda["spec"]["triggers"])


def test_the_picker_may_read_pods_and_pools_and_runs_restricted(gateway: list[dict[str, Any]]) -> None:
    picker = find(gateway, "Deployment", "gemma-server-epp")
    pod = picker["spec"]["template"]["spec"]
    binding = find(gateway, "RoleBinding", "gemma-server-epp")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "gemma"}]
    rules = find(gateway, "Role", binding["roleRef"]["name"])["rules"]

    def allowed(group: str, resource: str) -> set[str]:
        return {v for r in rules if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}

    assert allowed("", "pods") >= {"get", "list", "watch"}
    assert allowed("inference.networking.k8s.io", "inferencepools") >= {"get", "list", "watch"}
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    context = container(picker, "epp")["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
    # The server pods' NetworkPolicy admits pods of their namespace (the picker scrapes /metrics).
    policy = find(gateway, "NetworkPolicy", "gemma-server")
    assert {} in [source.get("podSelector") for source in policy["spec"]["ingress"][0]["from"]]


# ---- one replica across nodes (LeaderWorkerSet) -----------------------------------------------------


def test_the_leaderworkerset_validates_against_its_crd_and_its_pods_against_kubernetes(
    multi_node: list[dict[str, Any]],
) -> None:
    group = find(multi_node, "LeaderWorkerSet")
    assert f"{group['apiVersion']}/{group['kind']}" == GROUP_KIND
    assert _errors(GROUP_SCHEMA, group) == []
    templates = group["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role}, "template": templates[role]}
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def test_a_group_is_one_replica_of_the_server(
    multi_node: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.deploy.test_kubernetes import server_settings_for

    group = find(multi_node, "LeaderWorkerSet")["spec"]
    templates = group["leaderWorkerTemplate"]
    leader = server_workload(multi_node)
    settings = server_settings_for(leader, monkeypatch).engine
    assert (settings.nodes, settings.distributed_executor_backend) == (templates["size"], "ray")
    worker = templates["workerTemplate"]["spec"]["containers"][0]
    for pod_container in (container(leader), worker):
        gpus = int(pod_container["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus * settings.nodes == settings.tensor_parallel_size * settings.pipeline_parallel_size
    # The worker joins the leader's Ray head (LWS gives it the leader's address).
    head_port = {p["name"]: p["containerPort"] for p in container(leader)["ports"]}["ray"]
    assert f"--port={head_port}" in container(leader)["args"][2]
    assert f"--address=$(LWS_LEADER_ADDRESS):{head_port}" in worker["args"][2]
    # The leader is ready only once its workers have joined: waiting for it would never end.
    assert group["startupPolicy"] == "LeaderCreated"
    # Only leaders serve: the Service, the PodDisruptionBudget, the API NetworkPolicy and the
    # ServiceMonitor see them, not the workers; the group's own policy opens the group to itself.
    worker_labels = templates["workerTemplate"]["metadata"]["labels"]
    leader_labels = leader["spec"]["template"]["metadata"]["labels"]
    for selector in (
        find(multi_node, "Service", "gemma-server")["spec"]["selector"],
        find(multi_node, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        find(multi_node, "NetworkPolicy", "gemma-server")["spec"]["podSelector"]["matchLabels"],
    ):
        assert _selects(selector, leader_labels) and not _selects(selector, worker_labels)
    set_by_lws = {"leaderworkerset.sigs.k8s.io/name": find(multi_node, "LeaderWorkerSet")["metadata"]["name"]}
    group_policy = find(multi_node, "NetworkPolicy", "gemma-server-group")["spec"]
    assert group_policy["podSelector"]["matchLabels"] == set_by_lws
    assert group_policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == set_by_lws
    # KEDA scales whole groups, through the LWS's scale subresource.
    target = find(multi_node, "ScaledObject")["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "name": "gemma-server"}


def test_the_leader_runs_the_base_pod(multi_node: list[dict[str, Any]]) -> None:
    """The leader's pod is written out in leaderworkerset.yaml: it must not drift from the base's."""
    base = render_kustomization(K8S / "overlays" / "gpu")
    base_pod = server_workload(base)["spec"]["template"]["spec"]
    leader_pod = server_workload(multi_node)["spec"]["template"]["spec"]
    differs = {"containers", "volumes"}
    assert {k: v for k, v in leader_pod.items() if k not in differs} == {
        k: v for k, v in base_pod.items() if k not in differs
    }
    base_server, leader_server = base_pod["containers"][0], leader_pod["containers"][0]
    differs = {"args", "env", "ports", "resources"}  # the Ray head, the parallelism, the group's GPUs
    assert {k: v for k, v in leader_server.items() if k not in differs} == {
        k: v for k, v in base_server.items() if k not in differs
    }
    assert env_values(base_server).items() <= env_values(leader_server).items()
    assert [v["name"] for v in leader_pod["volumes"]] == [v["name"] for v in base_pod["volumes"]]
    assert json.dumps(base_server["ports"][0]) == json.dumps(leader_server["ports"][0])
