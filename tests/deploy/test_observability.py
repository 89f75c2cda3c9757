"""Alert rules and the Grafana dashboard, statically: promtool's checks and unit tests, coverage of
every alert by a firing and a silent test case, the dashboard's structure and the metric names its
queries use. (test_prometheus_live.py runs the queries against a real Prometheus and server.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from server.metrics import Metrics
from tests.deploy.support import (
    ADAPTER_VALUES,
    ALERT_TESTS,
    ALERTS,
    DASHBOARD,
    K8S,
    OBSERVABILITY,
    ROOT,
    dashboard_targets,
    exposition_families,
    load_json,
    metric_family,
    metric_names,
    run,
    tool,
)


@pytest.fixture(scope="module")
def server_families() -> set[str]:
    """Our metric families, as the server declares them (vLLM's are checked on a live server)."""
    return exposition_families(generate_latest(Metrics().registry).decode())


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = load_json(DASHBOARD)
    return data


def test_promtool_check_rules() -> None:
    result = run([tool("promtool"), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_compose_prometheus_config() -> None:
    result = run([tool("promtool"), "check", "config", str(OBSERVABILITY / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = run([tool("promtool"), "test", "rules", str(ALERT_TESTS)], cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_unit_test(rules: list[dict[str, Any]]) -> None:
    alerts = {rule["alert"] for rule in rules if "alert" in rule}
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts - fires == set(), "alerts no unit test makes fire"
    assert alerts - silent == set(), "alerts no unit test checks staying silent"
    required = {"error rate": "GemmaServerHighErrorRate", "queue growing": "GemmaServerQueueGrowing",
                "latency SLO burn": "GemmaServerTTFTBudgetBurnFast", "engine not ready": "GemmaServerEngineNotReady",
                "no traffic": "GemmaServerNoTraffic"}  # fmt: skip
    for what, name in required.items():
        assert name in alerts, f"issue 5 asks for an alert on {what}"


def test_alert_rules_use_only_our_metric_names(rules: list[dict[str, Any]], server_families: set[str]) -> None:
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        for name in metric_names(rule["expr"]):
            if name.startswith("gemma_server_"):
                assert metric_family(name, server_families), f"{rule.get('alert') or rule['record']}: {name}"
        for name in re.findall(r"\bgemma_server:[a-z0-9_:]+", rule["expr"]):
            assert name in recorded, f"{name} is not a recording rule"


def test_alerts_have_severity_summary_and_a_runbook_section(rules: list[dict[str, Any]]) -> None:
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in (ROOT / "docs" / "deployment.md").read_text().splitlines()
        if line.startswith("#")
    }
    for rule in rules:
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"page", "ticket", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        runbook = rule["annotations"]["runbook_url"]
        path, _, anchor = runbook.partition("#")
        assert path == "docs/deployment.md" and anchor in anchors, f"{rule['alert']}: no section for {runbook}"


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "gemma-server"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids: list[int] = []
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["y"] + dy, grid["x"] + dx) for dy in range(grid["h"]) for dx in range(grid["w"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
    assert len(set(ids)) == len(ids), "panel ids must be unique"


def test_dashboard_covers_what_issue_5_asks(dashboard: dict[str, Any]) -> None:
    exprs = [expr for _title, expr in dashboard_targets(dashboard)]

    def shown(pattern: str) -> bool:
        return any(re.search(pattern, expr) for expr in exprs)

    required = {
        "request rate": r"rate\(gemma_server_requests_total\{",
        "error rate by status": r"sum by \(status\) \(rate\(gemma_server_requests_total",
        "TTFT quantiles": r"histogram_quantile\(0\.99, .*time_to_first_token_seconds_bucket",
        "TPOT quantiles": r"histogram_quantile\(0\.99, .*vllm:request_time_per_output_token_seconds_bucket",
        "end-to-end latency quantiles": r"histogram_quantile\(0\.99, .*gemma_server_request_duration_seconds_bucket",
        "tokens/s": r"rate\(vllm:generation_tokens_total",
        "running requests": r"vllm:num_requests_running",
        "waiting requests (front end and engine)": r"vllm:num_requests_waiting",
        "waiting requests (front end)": r"gemma_server_requests_waiting",
        "KV cache usage": r"vllm:kv_cache_usage_perc",
        "front-end queue time": r"gemma_server_queue_time_seconds_bucket",
        "image counts": r"gemma_server_images_total",
        "preprocessing time": r"gemma_server_preprocess_seconds_bucket",
    }
    missing = [what for what, pattern in required.items() if not shown(pattern)]
    assert not missing, f"the dashboard does not show: {missing}"


def test_dashboard_queries_use_only_metrics_the_server_declares(
    dashboard: dict[str, Any], server_families: set[str]
) -> None:
    for title, expr in dashboard_targets(dashboard):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        for name in names:
            if name.startswith("gemma_server_"):
                assert metric_family(name, server_families), f"{title}: {name} is not exported by server/metrics.py"
            else:
                assert name.startswith("vllm:") or name == "up", f"{title}: unknown metric {name}"


def test_prometheusrule_carries_the_alert_rules_file(rules: list[dict[str, Any]]) -> None:
    rule_object = yaml.safe_load((K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule_object["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], (
        "prometheusrule.yaml differs from alerts.yml: copy the groups of alerts.yml into it"
    )


def test_autoscaler_metrics_are_ours_or_vllms(server_families: set[str]) -> None:
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    keda = yaml.safe_load((K8S / "components" / "autoscaling-keda" / "scaledobject.yaml").read_text())
    queries = [t["metadata"]["query"] for t in keda["spec"]["triggers"]]
    queries += [r["seriesQuery"] for r in adapter["rules"]["custom"]]
    seen = set().union(*(metric_names(q) for q in queries))
    assert seen == {"vllm:num_requests_waiting"}  # front end and engine: server/metrics.py's RouterView


def test_grafana_provisioning_points_at_the_dashboard_folder() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    provider = yaml.safe_load((OBSERVABILITY / "grafana/provisioning/dashboards/gemma-server.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    host_folder = next(host for host, container in mounts.items() if container == dashboards_path)
    assert (ROOT / host_folder / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    datasource = yaml.safe_load((OBSERVABILITY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    assert Path(mounts["./deploy/observability/grafana/provisioning"]) == Path("/etc/grafana/provisioning")
