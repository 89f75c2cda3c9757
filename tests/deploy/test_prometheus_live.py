"""A real Prometheus (Debian's package) scrapes the live server (the session's `live_server`, real
vLLM engine on the tiny model) every second, with the alert rules loaded; after some real traffic,
every PromQL query of the Grafana dashboard, the KEDA ScaledObject and the prometheus-adapter rules
must return series, and the rules must evaluate without errors.

The scrape job mimics what the Prometheus Operator makes of deploy/kubernetes's ServiceMonitor:
job = the Service name, plus namespace / service / pod target labels, so the autoscalers' queries
(which select namespace and job) are run exactly as written.

Prometheus missing is a failure, not a skip: .ci/run installs it (deploy/tools/install.sh).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.support import (
    ADAPTER_VALUES,
    ALERTS,
    DASHBOARD,
    K8S,
    adapter_query,
    dashboard_targets,
    exposition_families,
    grafana_expr_to_promql,
    load_json,
    metric_family,
    metric_names,
    tool,
)
from tests.support.images import jpeg_bytes, png_data_uri
from tests.support.live_server import LiveServer, free_port

SCRAPE_INTERVAL_SECONDS = 2  # and the scrape timeout: under CI load /metrics can take over 1 s
NAMESPACE = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["namespace"]
JOB = "gemma-server"
POD = "gemma-server-7d9f8c6b5-x2k4q"
MODEL = "tiny-gemma3"
# Panels that show events the session's traffic cannot cause (no admission rejection happens on an
# idle test server): their queries must still parse and name exported metrics, but may be empty.
EVENT_ONLY_PANELS = {"Rejected requests"}


class Prometheus:
    def __init__(self, base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.base_url = base_url
        self.process = process
        self.log = log
        # Queries are evaluated at this time once traffic was scraped: rates over [1m] and the
        # 5-minute recording rules must not depend on how long the tests in between took.
        self.at: float | None = None

    def api(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.base_url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr) if self.at is None else self.api("query", query=expr, time=self.at)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        result: list[dict[str, Any]] = data["result"]
        return result


@pytest.fixture(scope="module")
def prometheus(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_SECONDS}s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "scrape_timeout": f"{SCRAPE_INTERVAL_SECONDS}s",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{live_server.port}"],
                        "labels": {"namespace": NAMESPACE, "service": JOB, "pod": POD},
                    }
                ],
            }
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"prometheus exited:\n{log.read_text()}"
            try:
                if httpx.get(f"{server.base_url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log.read_text()}"
            time.sleep(0.3)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def chat(base_url: str, content: Any, *, stream: bool = False, model: str = MODEL, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0,
            "stream": stream, **extra}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)


def send_traffic(base_url: str, image_url: str) -> None:
    """Text and image requests, streamed and not, a 404 and a 400, and one aborted stream."""
    image = png_data_uri(96, 64)

    def with_image(text: str, url: str) -> list[dict[str, Any]]:
        return [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]

    statuses = [
        chat(base_url, "Say hello.").status_code,
        chat(base_url, with_image("What is this?", image)).status_code,
        chat(base_url, with_image("And this?", image_url)).status_code,
        chat(base_url, "Count to three.", stream=True).status_code,
        chat(base_url, with_image("", image)[1:], stream=True).status_code,
    ]
    assert statuses == [200] * 5
    assert chat(base_url, "Hi", model="no-such-model").status_code == 404
    assert httpx.post(f"{base_url}/v1/chat/completions", json={"messages": []}, timeout=30).status_code == 400
    # A client that leaves mid-stream: the server aborts the request (aborted_requests_total).
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 512,
            "stream": True, "temperature": 0}  # fmt: skip
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        next(response.iter_bytes())


@pytest.fixture(scope="module")
def scraped(prometheus: Prometheus, live_server: LiveServer, image_host: Any) -> Prometheus:
    """Traffic in two bursts a few scrapes apart (so rates are not zero), then scrapes after it."""
    image_url = image_host.add("deploy-test.jpg", jpeg_bytes(80, 60), "image/jpeg")
    # A successful scrape before the traffic, so that rates have a sample before it to start from.
    deadline = time.monotonic() + 120
    while not prometheus.query(f'gemma_server_engine_ready{{job="{JOB}"}}'):
        assert time.monotonic() < deadline, f"no successful scrape:\n{prometheus.log.read_text()}"
        time.sleep(0.5)
    send_traffic(live_server.base_url, image_url)
    time.sleep(4 * SCRAPE_INTERVAL_SECONDS)
    send_traffic(live_server.base_url, image_url)
    finished = time.time()
    deadline = time.monotonic() + 60
    while True:
        result = prometheus.query(f'timestamp(gemma_server_engine_ready{{job="{JOB}"}})')  # a successful scrape
        if result and float(result[0]["value"][1]) > finished + 2 * SCRAPE_INTERVAL_SECONDS:
            break
        assert time.monotonic() < deadline, f"no scrape after the traffic:\n{prometheus.log.read_text()}"
        time.sleep(0.5)
    prometheus.at = float(result[0]["value"][1]) + 3  # rules evaluate every second: three have run since
    time.sleep(max(0.0, prometheus.at + 1 - time.time()))
    return prometheus


def test_prometheus_scrapes_the_server(scraped: Prometheus) -> None:
    targets = scraped.api("targets")["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets
    assert scraped.query(f'up{{job="{JOB}"}}')[0]["value"][1] == "1"
    ready = scraped.query(f'gemma_server_engine_ready{{job="{JOB}"}}')
    assert ready and ready[0]["value"][1] == "1"


def test_every_dashboard_query_returns_series(scraped: Prometheus) -> None:
    targets = dashboard_targets(load_json(DASHBOARD))
    empty = []
    for title, expr in targets:
        result = scraped.query(grafana_expr_to_promql(expr))
        if not result and title not in EVENT_ONLY_PANELS:
            empty.append((title, expr))
    assert not empty, f"dashboard queries without series: {json.dumps(empty, indent=1)}"


def value_of(prometheus: Prometheus, expr: str) -> float:
    result = prometheus.query(expr)
    assert len(result) == 1, f"{expr}: {result}"
    return float(result[0]["value"][1])


def test_dashboard_numbers_reflect_the_traffic(scraped: Prometheus) -> None:
    """Not just series: the traffic just sent shows up as numbers where it must."""
    by_title = {title: expr for title, expr in dashboard_targets(load_json(DASHBOARD))}
    assert value_of(scraped, grafana_expr_to_promql(by_title["API requests / s"])) > 0
    assert value_of(scraped, grafana_expr_to_promql(by_title["Ready replicas"])) == 1
    ttft = value_of(scraped, grafana_expr_to_promql(by_title["TTFT p99"]))
    assert math.isfinite(ttft) and 0 < ttft < 60
    statuses = {r["metric"]["status"] for r in scraped.query(grafana_expr_to_promql(by_title["Errors by status"]))}
    assert {"400", "404"} <= statuses
    sources = {r["metric"]["source"] for r in scraped.query(grafana_expr_to_promql(by_title["Images / s"]))}
    assert sources == {"data", "url"}
    generated = scraped.query("sum(increase(vllm:generation_tokens_total[1m]))")
    assert float(generated[0]["value"][1]) > 0


def test_dashboard_metrics_are_on_the_servers_metrics_page(live_server: LiveServer) -> None:
    """Every metric name the dashboard and the autoscalers use is declared by the live /metrics page
    (our gemma_server_* metrics and vLLM's vllm:* engine metrics)."""
    families = exposition_families(httpx.get(f"{live_server.base_url}/metrics", timeout=10).text)
    exprs = [expr for _title, expr in dashboard_targets(load_json(DASHBOARD))]
    exprs += [t["metadata"]["query"] for t in keda_triggers()]
    exprs += [rule["seriesQuery"] for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]]
    exprs += [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    missing = {
        name for expr in exprs for name in metric_names(expr) if name != "up" and not metric_family(name, families)
    }
    assert not missing, f"not exported by the server: {sorted(missing)}"


def keda_triggers() -> list[dict[str, Any]]:
    scaled = yaml.safe_load((K8S / "components" / "autoscaling-keda" / "scaledobject.yaml").read_text())
    triggers: list[dict[str, Any]] = scaled["spec"]["triggers"]
    return triggers


def test_keda_queries_return_the_queue_depths(scraped: Prometheus) -> None:
    for trigger in keda_triggers():
        result = scraped.query(trigger["metadata"]["query"])
        assert len(result) == 1, f"{trigger['name']}: {trigger['metadata']['query']} -> {result}"
        assert float(result[0]["value"][1]) >= 0


def test_prometheus_adapter_queries_return_per_pod_series(scraped: Prometheus) -> None:
    for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]:
        assert scraped.query(rule["seriesQuery"]), f"the adapter would discover nothing for {rule['seriesQuery']}"
        result = scraped.query(adapter_query(rule, NAMESPACE, POD))
        assert [r["metric"] for r in result] == [{"pod": POD}], f"{rule['name']['as']}: {result}"


def test_rules_evaluate_against_the_real_server(scraped: Prometheus) -> None:
    time.sleep(2)  # at least one evaluation after the traffic
    groups = scraped.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    expected = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert len(rules) == len(expected)
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not broken, broken
    # The recording rules produce a number from the real TTFT histogram (a share of requests).
    miss = scraped.query(f'gemma_server:ttft_slo_miss:ratio_rate5m{{job="{JOB}"}}')
    assert miss and 0 <= float(miss[0]["value"][1]) <= 1
    # The traffic was real and the server healthy: no paging alert is firing.
    firing = {r["name"] for r in rules if r["type"] == "alerting" and r["state"] == "firing"}
    assert not firing & {"GemmaServerHighErrorRate", "GemmaServerDown", "GemmaServerEngineNotReady"}
