"""The monitoring Kiln ships, as the tests read it: every Grafana panel's query (manifests/components/dashboards),
a way to run them against a real Prometheus, and the PrometheusRule's groups as a rule file
(manifests/components/alerts) for promtool or a Prometheus to load."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "manifests/components/dashboards"
RULES = REPO / "manifests/components/alerts/prometheusrule.yaml"

# What Grafana puts in place of its own variables, and of the dashboards' (which all match every value with
# "All"): a window long enough for rate() over a few scrapes of a test Prometheus, and a range for increase().
DEFAULT_VARIABLES: Mapping[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}
ALL = ".*"
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)\]\]|\$(\w+)")


class Query(NamedTuple):
    dashboard: str  # the dashboard's title
    title: str  # the panel's title (with the target's refId when the panel has several)
    expr: str


def dashboards(root: Path = DASHBOARDS) -> dict[str, dict[str, Any]]:
    """Every dashboard JSON under ``root``, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(root.glob("*.json"))}


def _panels(panels: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])  # a collapsed row keeps its panels inside it


def panel_queries(root: Path = DASHBOARDS) -> list[Query]:
    """(dashboard, title, expr) of every query of every panel, rows included, in the dashboards' order."""
    out = []
    for board in dashboards(root).values():
        for panel in _panels(board.get("panels") or []):
            targets = [t for t in panel.get("targets") or [] if t.get("expr")]
            for target in targets:
                title = panel.get("title", "")
                if len(targets) > 1:
                    title = f"{title} [{target.get('refId', '?')}]"
                out.append(Query(board["title"], title, target["expr"]))
    return out


def variable_queries(root: Path = DASHBOARDS) -> list[Query]:
    """(dashboard, variable name, query) of every query variable: Grafana's label_values(...), not PromQL."""
    out = []
    for board in dashboards(root).values():
        for variable in (board.get("templating") or {}).get("list") or []:
            if variable.get("type") == "query":
                query = variable.get("query")
                text = query.get("query", "") if isinstance(query, Mapping) else str(query or "")
                out.append(Query(board["title"], variable["name"], text or variable.get("definition", "")))
    return out


def variables_used(expr: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(expr)}


def concrete(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """``expr`` with Grafana's variables replaced: ``variables`` first, then the defaults, and ".*" for the rest
    (the dashboards' own variables, which select with =~)."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return values.get(name, ALL)

    return _VARIABLE.sub(value, expr)


def instant_query(prometheus_url: str, expr: str, timeout: float = 10.0) -> dict[str, Any]:
    """Prometheus' answer to an instant query (its JSON, also for a 4xx/5xx that carries one)."""
    url = f"{prometheus_url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:  # a bad query is a 400 with {"status": "error", "error": ...}
        body = e.read()
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "error": f"HTTP {e.code}: {body[:200]!r}"}


def check_queries(
    prometheus_url: str,
    items: Iterable[Query | tuple[str, str, str]],
    variables: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> list[str]:
    """Run each (dashboard, title, expr) as an instant query, its Grafana variables replaced (``concrete``);
    return one line per query that errors or returns an empty result, saying which panel and why. An empty
    list: every panel would draw something."""
    failures = []
    for dashboard, title, expr in items:
        query = concrete(expr, variables)
        where = f"{dashboard} / {title}: {' '.join(query.split())}"
        try:
            answer = instant_query(prometheus_url, query, timeout)
        except (OSError, ValueError) as e:
            failures.append(f"{where}: no answer: {e}")
            continue
        if answer.get("status") != "success":
            failures.append(f"{where}: {answer.get('errorType', 'error')}: {answer.get('error')}")
            continue
        data = answer.get("data") or {}
        if data.get("resultType") in ("vector", "matrix") and not data.get("result"):
            failures.append(f"{where}: empty result")
    return failures


def rule_groups(path: Path = RULES) -> list[dict[str, Any]]:
    """The PrometheusRule's groups, as a Prometheus rule file has them."""
    return yaml.safe_load(path.read_text())["spec"]["groups"]


def write_rule_file(target: Path, path: Path = RULES) -> Path:
    """The PrometheusRule's spec as a rule file Prometheus and promtool load (``rule_files``); returns ``target``."""
    target.write_text(yaml.safe_dump({"groups": rule_groups(path)}, sort_keys=False))
    return target


def alerts(path: Path = RULES) -> list[dict[str, Any]]:
    """Every alerting rule of the PrometheusRule."""
    return [rule for group in rule_groups(path) for rule in group["rules"] if "alert" in rule]


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NAME = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\b(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][\w:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric (or recorded series) names a PromQL expression, or a Grafana label_values(), reads."""
    found = set(_LABEL_VALUES.findall(expr))
    if found or "label_values(" in expr:
        return found
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    return {
        name
        for name, call in _NAME.findall(text)
        if not call and name not in _KEYWORDS and not re.fullmatch(r"(?i)nan|inf", name)
    }


def sample_names(registry: Any) -> set[str]:
    """The series names a prometheus_client registry exposes, including families with no child yet."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
    }
    return {f"{family.name}{suffix}" for family in registry.collect() for suffix in suffixes.get(family.type, ("",))}


def known_metric_names() -> set[str]:
    """Every series name the operator and the inference server export: what a shipped query may read."""
    from prometheus_client import REGISTRY

    import kiln_operator.kube
    import kiln_operator.metrics  # noqa: F401  (registers the operator's metrics)
    from kiln_server.metrics import Metrics, MonitorMetrics

    server = Metrics("model", 8)
    MonitorMetrics(server)  # drift, anomalies, answers by class, payload log: in the same registry
    return sample_names(REGISTRY) | sample_names(server.registry)
