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
import re
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
    # Rules evaluate every second: three have run since. Milliseconds, as Prometheus keeps time, so
    # that the raw samples' windows computed here are the ones Prometheus used.
    prometheus.at = round(float(result[0]["value"][1]) + 3, 3)
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
    """Not just series: the traffic just sent shows up as numbers where it must. (No bound on how
    fast the server was: that is this machine's load, not the dashboard's correctness.)"""
    by_title = {title: expr for title, expr in dashboard_targets(load_json(DASHBOARD))}
    assert value_of(scraped, grafana_expr_to_promql(by_title["API requests / s"])) > 0
    assert value_of(scraped, grafana_expr_to_promql(by_title["Ready replicas"])) == 1
    ttft = value_of(scraped, grafana_expr_to_promql(by_title["TTFT p99"]))
    assert math.isfinite(ttft) and ttft > 0
    statuses = {r["metric"]["status"] for r in scraped.query(grafana_expr_to_promql(by_title["Errors by status"]))}
    assert {"400", "404"} <= statuses
    sources = {r["metric"]["source"] for r in scraped.query(grafana_expr_to_promql(by_title["Images / s"]))}
    assert sources == {"data", "url"}
    generated = scraped.query("sum(increase(vllm:generation_tokens_total[1m]))")
    assert float(generated[0]["value"][1]) > 0


# ---- each panel's number, recomputed from the raw series ----------------------------------------
#
# The dashboard's queries take few shapes: an aggregation (sum or max, maybe by labels) of a gauge or
# of rate(counter[range]), a ratio of two such sums (the numerator maybe `or vector(0)`), and
# histogram_quantile over a sum by (le) of bucket rates. Each is recomputed here from the raw samples
# Prometheus holds at the same evaluation time (the gauge's latest sample; the counter's samples in
# the range window), with rate's extrapolation and histogram_quantile's interpolation as Prometheus
# 2.x implements them (promql/functions.go extrapolatedRate, promql/quantile.go bucketQuantile). A
# panel that selects the wrong metric, labels, window, grouping or quantile disagrees.

Series = dict[frozenset[tuple[str, str]], float]
SELECTOR = r"[\w:]+\{[^}]*\}"
AGGREGATION = re.compile(
    rf"(?P<op>sum|max)(?: by \((?P<by>[\w, ]+)\) )?"
    rf"\((?:rate\((?P<counter>{SELECTOR})\[(?P<range>\d+[sm])\]\)|(?P<gauge>{SELECTOR}))\)"
)


def _labels(metric: dict[str, str], by: list[str]) -> frozenset[tuple[str, str]]:
    return frozenset((name, metric[name]) for name in by if name in metric)


def _extrapolated_rate(points: list[tuple[int, float]], start_ms: int, end_ms: int) -> float | None:
    """rate() of one counter series from its samples in the window ending at end_ms (as Prometheus 2.x)."""
    if len(points) < 2:
        return None
    (first_t, first_v), (last_t, last_v) = points[0], points[-1]
    increase = last_v - first_v
    previous = 0.0
    for _t, value in points:  # counter resets
        if value < previous:
            increase += previous
        previous = value
    to_start, to_end = (first_t - start_ms) / 1000, (end_ms - last_t) / 1000
    sampled = (last_t - first_t) / 1000
    average = sampled / (len(points) - 1)
    if increase > 0 and first_v >= 0:
        to_start = min(to_start, sampled * (first_v / increase))
    threshold = average * 1.1
    interval = sampled + (to_start if to_start < threshold else average / 2)
    interval += to_end if to_end < threshold else average / 2
    return increase * (interval / sampled) / ((end_ms - start_ms) / 1000)


def _aggregate(prometheus: Prometheus, expr: str) -> Series:
    match = AGGREGATION.fullmatch(expr)
    assert match, f"a dashboard query of a shape this test does not recompute: {expr}"
    by = [name.strip() for name in match["by"].split(",")] if match["by"] else []
    at_ms = round(prometheus.at * 1000)  # type: ignore[operator]
    values: list[tuple[frozenset[tuple[str, str]], float]] = []
    if match["gauge"]:
        values = [(_labels(r["metric"], by), float(r["value"][1])) for r in prometheus.query(match["gauge"])]
    else:
        window = match["range"]
        window_ms = int(window[:-1]) * (60_000 if window.endswith("m") else 1000)
        raw = prometheus.api("query", query=f"{match['counter']}[{window}]", time=prometheus.at)
        assert raw["resultType"] == "matrix", raw
        for series in raw["result"]:
            points = [(round(float(t) * 1000), float(v)) for t, v in series["values"]]
            rate = _extrapolated_rate(points, at_ms - window_ms, at_ms)
            if rate is not None:
                values.append((_labels(series["metric"], by), rate))
    groups: dict[frozenset[tuple[str, str]], list[float]] = {}
    for labels, value in values:
        groups.setdefault(labels, []).append(value)
    combine = max if match["op"] == "max" else math.fsum
    return {labels: float(combine(group)) for labels, group in groups.items()}


def _bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """histogram_quantile over (upper bound, cumulative count) pairs, as Prometheus 2.x computes it."""
    buckets = sorted(buckets)
    if not buckets or not math.isinf(buckets[-1][0]):
        return math.nan
    highest, monotonic = 0.0, []
    for bound, count in buckets:
        highest = max(highest, count)
        monotonic.append((bound, highest))
    if len(monotonic) < 2 or monotonic[-1][1] == 0:
        return math.nan
    rank = q * monotonic[-1][1]
    b = next((i for i, (_bound, count) in enumerate(monotonic[:-1]) if count >= rank), len(monotonic) - 1)
    if b == len(monotonic) - 1:
        return monotonic[-2][0]
    if b == 0 and monotonic[0][0] <= 0:
        return monotonic[0][0]
    start, (end, count) = 0.0, monotonic[b]
    if b > 0:
        start = monotonic[b - 1][0]
        count -= monotonic[b - 1][1]
        rank -= monotonic[b - 1][1]
    return start + (end - start) * (rank / count)


def _divide(numerator: float, denominator: float) -> float:
    if denominator:
        return numerator / denominator
    return math.copysign(math.inf, numerator) if numerator else math.nan  # as PromQL's division


def _ratio(numerator: Series, denominator: Series) -> Series:
    return {labels: _divide(numerator[labels], value) for labels, value in denominator.items() if labels in numerator}


def recompute(prometheus: Prometheus, expr: str) -> Series:
    """The value of dashboard query `expr`, computed from the raw series."""
    if quantile := re.fullmatch(r"histogram_quantile\((?P<q>[\d.]+), (?P<inner>sum by \(le\) .+)\)", expr):
        rates = _aggregate(prometheus, quantile["inner"])
        if not rates:
            return {}
        buckets = [(float(dict(labels)["le"]), value) for labels, value in rates.items()]
        return {frozenset(): _bucket_quantile(float(quantile["q"]), buckets)}
    if ratio := re.fullmatch(r"\((?P<num>.+) or vector\(0\)\) / (?P<den>.+)", expr):
        return _ratio(_aggregate(prometheus, ratio["num"]) or {frozenset(): 0.0}, _aggregate(prometheus, ratio["den"]))
    for split in re.finditer(" / ", expr):
        numerator, denominator = expr[: split.start()], expr[split.end() :]
        if AGGREGATION.fullmatch(numerator) and AGGREGATION.fullmatch(denominator):
            return _ratio(_aggregate(prometheus, numerator), _aggregate(prometheus, denominator))
    return _aggregate(prometheus, expr)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_every_dashboard_panel_agrees_with_the_raw_series(scraped: Prometheus) -> None:
    disagreements = []
    for title, expr in dashboard_targets(load_json(DASHBOARD)):
        promql = grafana_expr_to_promql(expr)
        panel = {frozenset(r["metric"].items()): float(r["value"][1]) for r in scraped.query(promql)}
        raw = recompute(scraped, promql)
        if panel.keys() != raw.keys() or not all(_same(panel[k], raw[k]) for k in panel):
            disagreements.append({"panel": title, "query": promql, "panel's": str(panel), "from raw series": str(raw)})
    assert not disagreements, json.dumps(disagreements, indent=1)
    # The traffic made the rates non-zero: the comparison was not between two empty panels.
    requests = grafana_expr_to_promql(dict(dashboard_targets(load_json(DASHBOARD)))["API requests / s"])
    assert any(value > 0 for value in recompute(scraped, requests).values())


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
