"""LoRA adapters on Kubernetes (components/lora-adapters and its routing sub-component), rendered by
the real kustomize and checked offline, the same way as the overlays (test_kubernetes.py,
test_gateway.py), on a composition of the kind docs/deployment.md ("LoRA adapters") shows:
overlays/gpu-gateway + the component + its HTTPRoute.

- Core kinds against the Kubernetes schemas (strict), the HTTPRoutes against the Gateway API CRD
  schema (deploy/tools/validate-crds.mjs), the InferencePool against its CRD.
- The server's container mounts the adapters' claim read-only at /adapters, nothing else about the
  pod changes (security context, probes, other mounts), the claim is ReadOnlyMany.
- The lora and auth.keys values load with the server's own Settings (server/settings.py), with
  every adapter's folder on the mount; the example Secret's scoped keys load too.
- The route's names are the served model and the adapters; the Endpoint Picker scores LoRA affinity
  from the gauge vLLM exports.
Nothing is applied to a cluster.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.settings import load_settings
from tests.deploy.support import K8S, ROOT, container, env_values, find, render_kustomization, server_workload
from tests.deploy.test_gateway import POOL_SCHEMA, _errors, _picker_config, _pool_cel_errors
from tests.deploy.test_kubernetes import (
    CRD_FILE_KINDS,
    CUSTOM_KINDS,
    KUBERNETES_VERSIONS,
    NAMESPACE,
    server_settings_for,
    validate_custom,
)

COMPONENT = K8S / "components" / "lora-adapters"
ROUTING = COMPONENT / "routing"
MOUNT = "/adapters"
CLAIM = "gemma-lora-adapters"
ADAPTERS = {"sql-expert": "/adapters/sql-expert", "support-bot": "/adapters/support-bot"}
MODEL_HEADER = "X-Gateway-Model-Name"  # what the body-based router sets from the request's "model"
LORA_GAUGE = "vllm:lora_requests_info"  # vLLM's; the picker's LoRA affinity reads it


def _compose(folder: Path, base: str, components: list[Path]) -> list[dict[str, Any]]:
    """An overlay of one's own, as docs/deployment.md shows it, rendered by kustomize."""
    folder.mkdir(parents=True)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "resources": [os.path.relpath(K8S / "overlays" / base, folder)],
        "components": [os.path.relpath(c, folder) for c in components],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render_kustomization(folder)


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _compose(tmp_path_factory.mktemp("lora") / "gpu-gateway-lora", "gpu-gateway", [COMPONENT, ROUTING])


@pytest.fixture(scope="module")
def without() -> list[dict[str, Any]]:
    return render_kustomization(K8S / "overlays" / "gpu-gateway")


def _kind(obj: dict[str, Any]) -> str:
    return f"{obj['apiVersion']}/{obj['kind']}"


# ---- the manifests validate --------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schemas(composed: list[dict[str, Any]], version: str) -> None:
    core = [obj for obj in composed if _kind(obj) not in CUSTOM_KINDS | CRD_FILE_KINDS]
    assert {"PersistentVolumeClaim", "Deployment"} <= {obj["kind"] for obj in core}
    for obj in core:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} @ {version}: {error.message} at {list(error.path)}")


def test_the_routes_and_the_pool_validate_against_their_crds(composed: list[dict[str, Any]]) -> None:
    routes = [obj for obj in composed if obj["kind"] == "HTTPRoute"]
    assert sorted(r["metadata"]["name"] for r in routes) == ["gemma-server", "gemma-server-by-model"]
    reports = validate_custom(routes)
    assert len(reports) == len(routes) and [r for r in reports if r["errors"]] == []
    pool = find(composed, "InferencePool")
    assert _errors(POOL_SCHEMA, pool) == [] and _pool_cel_errors(pool) == []


def test_route_validation_can_fail(composed: list[dict[str, Any]]) -> None:
    route = copy.deepcopy(find(composed, "HTTPRoute", "gemma-server-by-model"))
    route["spec"]["rules"][0]["matches"][0]["headers"][0]["type"] = "Equals"  # Exact or RegularExpression
    route["spec"]["rules"][0]["matches"][1]["header"] = route["spec"]["rules"][0]["matches"][1].pop("headers")
    errors = validate_custom([route])[0]["errors"]
    assert any("type" in e for e in errors) and any("header" in e for e in errors), errors


def test_every_namespaced_object_is_in_the_namespace(composed: list[dict[str, Any]]) -> None:
    namespaced = [o for o in composed if o["kind"] != "Namespace"]
    assert [o["kind"] for o in namespaced if o["metadata"].get("namespace") != NAMESPACE] == []


# ---- the volume ----------------------------------------------------------------------------------


def test_the_server_mounts_the_adapters_read_only(composed: list[dict[str, Any]]) -> None:
    deployment = server_workload(composed)
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in container(deployment)["volumeMounts"]}
    assert mounts[MOUNT]["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[MOUNT]["name"])
    assert volume["persistentVolumeClaim"] == {"claimName": CLAIM, "readOnly": True}
    claim = find(composed, "PersistentVolumeClaim", CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"], "every replica, on any node, reads the same files"


def test_nothing_else_about_the_pod_changes(composed: list[dict[str, Any]], without: list[dict[str, Any]]) -> None:
    """Restricted pod security, probes, resources and the other mounts are the overlay's own."""
    pod, before = (server_workload(objects)["spec"]["template"]["spec"] for objects in (composed, without))
    assert {k: v for k, v in pod.items() if k not in {"containers", "volumes"}} == {
        k: v for k, v in before.items() if k not in {"containers", "volumes"}
    }
    assert [v for v in pod["volumes"] if v["name"] != "lora-adapters"] == before["volumes"]
    server, server_before = container({"spec": {"template": {"spec": pod}}}), before["containers"][0]
    assert {k: v for k, v in server.items() if k not in {"env", "volumeMounts"}} == {
        k: v for k, v in server_before.items() if k not in {"env", "volumeMounts"}
    }
    assert [m for m in server["volumeMounts"] if m["mountPath"] != MOUNT] == server_before["volumeMounts"]
    assert [e for e in server["env"] if e in server_before["env"]] == server_before["env"], "only additions"
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    others = [o for o in composed if o not in without]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in others) == [
        ("Deployment", "gemma-server"),
        ("HTTPRoute", "gemma-server-by-model"),
        ("PersistentVolumeClaim", CLAIM),
    ]


def test_the_loader_example_is_restricted_and_writes_the_same_claim() -> None:
    pod = yaml.safe_load((COMPONENT / "adapter-loader.example.yaml").read_text())
    kubernetes_validate.validate(pod, KUBERNETES_VERSIONS[-1], strict=True)
    spec = pod["spec"]
    assert pod["metadata"]["namespace"] == NAMESPACE
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    context = spec["containers"][0]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == CLAIM
    assert spec["containers"][0]["volumeMounts"][0]["mountPath"] == MOUNT
    # Files written as the server's user and group are the server's to read.
    server_context = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        assert spec["securityContext"][key] == server_context["securityContext"][key]
    # An example to apply by hand, never with the component.
    assert (
        "adapter-loader.example.yaml" not in yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())["resources"]
    )


# ---- the settings --------------------------------------------------------------------------------


def test_the_lora_values_have_the_documented_shape(composed: list[dict[str, Any]]) -> None:
    """Independent of the Settings class: the JSON the container gets is a list of {name, path}."""
    env = env_values(container(server_workload(composed)))
    adapters = json.loads(env["GEMMA_SERVER_LORA__ADAPTERS"])
    assert adapters == [{"name": name, "path": path} for name, path in ADAPTERS.items()]
    assert (env["GEMMA_SERVER_LORA__MAX_LORAS"], env["GEMMA_SERVER_LORA__MAX_LORA_RANK"]) == ("4", "16")
    assert env["GEMMA_SERVER_LORA__RUNTIME_LOADING"] == "false"


def test_the_lora_settings_load_with_the_servers_settings(
    composed: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = server_workload(composed)
    settings = server_settings_for(deployment, monkeypatch)  # asserts every GEMMA_SERVER_* is a setting
    lora = settings.lora
    assert {adapter.name: adapter.path for adapter in lora.adapters} == ADAPTERS
    assert (lora.max_loras, lora.max_lora_rank, lora.runtime_loading) == (4, 16, False)
    for adapter in lora.adapters:
        assert PurePosixPath(adapter.path).parent == PurePosixPath(MOUNT), f"{adapter.name} is not on the volume"
    assert settings.model.served_name not in ADAPTERS


def test_the_scoped_keys_secret_loads_as_auth_keys(
    composed: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = container(server_workload(composed))
    keys_env = next(e for e in spec["env"] if e["name"] == "GEMMA_SERVER_AUTH__KEYS")
    ref = keys_env["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True, "without the Secret the server starts with auth.api_keys_file's keys"
    # The Secret's value, as the example file shows it, is what the variable carries.
    server_settings_for(server_workload(composed), monkeypatch)  # the container's own variables
    monkeypatch.setenv(keys_env["name"], (COMPONENT / "scoped-keys.json.example").read_text())
    args = spec["args"]
    settings = load_settings(ROOT / args[args.index("--config") + 1])
    served = {settings.model.served_name, *ADAPTERS}
    assert settings.auth.keys and all(key.sha256 and not key.key for key in settings.auth.keys), "stored hashed"
    assert all(set(key.models or ()) <= served for key in settings.auth.keys)
    assert not any(key.admin for key in settings.auth.keys), "runtime loading is off: no admin key needed"


# ---- routing by adapter name ---------------------------------------------------------------------


def test_the_route_sends_each_served_name_to_the_pool(
    composed: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    route = find(composed, "HTTPRoute", "gemma-server-by-model")["spec"]
    catch_all = find(composed, "HTTPRoute", "gemma-server")["spec"]
    assert route["parentRefs"] == catch_all["parentRefs"], "both attach to the same Gateway"
    settings = server_settings_for(server_workload(composed), monkeypatch)
    pool = find(composed, "InferencePool")["metadata"]["name"]
    names: set[str] = set()
    for rule in route["rules"]:
        assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool}]
        assert rule["timeouts"] == catch_all["rules"][0]["timeouts"]
        for match in rule["matches"]:
            # Same path as the catch-all plus a header: these rules take precedence over it.
            assert match["path"] == catch_all["rules"][0]["matches"][0]["path"]
            [header] = match["headers"]
            assert (header["type"], header["name"]) == ("Exact", MODEL_HEADER)
            names.add(header["value"])
    assert names == {settings.model.served_name, *(adapter.name for adapter in settings.lora.adapters)}


def test_the_picker_scores_lora_affinity_from_vllms_gauge(composed: list[dict[str, Any]]) -> None:
    config = _picker_config(composed)
    plugins = {plugin.get("name", plugin["type"]): plugin for plugin in config["plugins"]}
    assert plugins["lora-affinity-scorer"]["type"] == "lora-affinity-scorer"
    [profile] = config["schedulingProfiles"]
    assert "lora-affinity-scorer" in [ref["pluginRef"] for ref in profile["plugins"]]
    engines = plugins["core-metrics-extractor"]["parameters"]["engineConfigs"]
    assert next(e for e in engines if e["name"] == "vllm")["loraSpec"] == LORA_GAUGE
