"""deploy/monitoring: the Prometheus rules pass promtool's check and unit tests, every alert is
tested both ways, and the rules and the Grafana dashboard read only metrics (and labels) the
server exports."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from server.metrics import Metrics
from tests.deploy.conftest import DEPLOY, run, tool

MONITORING = DEPLOY / "monitoring"
RULES = MONITORING / "magistream.rules.yaml"
RULE_TESTS = MONITORING / "magistream.rules.test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
# Labels Prometheus adds to every scraped series (Kubernetes service discovery adds pod and
# namespace), and the histogram bucket label.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "le"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}
PROMQL_WORDS = set(
    "by without on ignoring group_left group_right bool and or unless offset "
    "inf nan Inf NaN".split()
)
# Grafana's variables, replaced by what Grafana would put there, so promtool can parse it.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": ".*"}


def exported() -> dict[str, set[str]]:
    """Every series name the server exposes -> its label names (from server/metrics.py)."""
    metrics = Metrics(CollectorRegistry())
    out = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            # prometheus_client keeps name, type and label names only in these attributes
            for suffix in SUFFIXES[metric._type]:
                out[metric._name + suffix] = set(metric._labelnames)
    return out


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names it is filtered on) for every series selector in a PromQL
    expression; aggregation labels (by/without/on) are returned under the name ''."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may hold anything
    expr = re.sub(r"\[[^\]]*\]|\boffset\s+\w+", "", expr)  # durations
    expr = re.sub(r"(?<![\w:.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", expr)  # numbers, 1e3
    found: list[tuple[str, set[str]]] = []
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for labels in re.findall(grouping, expr):
        found.append(("", {x.strip() for x in labels.split(",") if x.strip()}))
    expr = re.sub(grouping, " ", expr)
    pattern = r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}|([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()"
    for name, matchers, bare in re.findall(pattern, expr):
        if matchers or name:
            found.append((name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))))
        elif bare not in PROMQL_WORDS:
            found.append((bare, set()))
    return found


def assert_reads_only_exported(expr: str, where: str, recorded: set[str] = frozenset()):
    series = exported()
    all_labels = set().union(*series.values()) | TARGET_LABELS
    for name, labels in selectors(expr):
        if not name:
            assert labels <= all_labels, f"{where}: unknown labels {labels - all_labels}"
        elif name in recorded:
            assert labels <= TARGET_LABELS, f"{where}: {name} has only job/namespace labels"
        else:
            assert name in series, f"{where}: {name} is not a metric of server/metrics.py"
            unknown = labels - series[name] - TARGET_LABELS
            assert not unknown, f"{where}: {name} has no labels {unknown}"


def test_rules_pass_promtool_check():
    run(tool("promtool"), "check", "rules", str(RULES))


def test_rules_pass_their_promtool_unit_tests():
    run(tool("promtool"), "test", "rules", RULE_TESTS.name, cwd=MONITORING)


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    alerts = {
        r["alert"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    assert len(alerts) == 7
    cases = [
        c
        for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for c in t.get("alert_rule_test", [])
    ]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert fires == alerts and quiet == alerts


def test_rules_read_only_metrics_the_server_exports():
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    for rule in rules:
        assert_reads_only_exported(rule["expr"], rule.get("record") or rule["alert"], recorded)


def test_the_exported_metrics_pass_promtool_lint():
    """Names the rules rely on follow Prometheus conventions (counters end in _total...)."""
    metrics = Metrics(CollectorRegistry())
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))  # labelled series appear once used
    run(tool("promtool"), "check", "metrics", input=generate_latest(metrics.registry).decode())


def dashboard_targets() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def test_dashboard_answers_the_operator_questions():
    board = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["How many sessions", "How fast", "Where the time goes", "Is anything failing"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["description"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.mark.parametrize(
    "title,expr",
    dashboard_targets(),
    ids=[f"{t}-{i}" for i, (t, _) in enumerate(dashboard_targets())],
)
def test_dashboard_queries_read_only_metrics_the_server_exports(title, expr):
    assert_reads_only_exported(expr, title)


def test_dashboard_queries_parse(tmp_path):
    """promtool parses each panel's PromQL (as a recording rule) after Grafana's variables
    are replaced the way Grafana replaces them."""
    rules = []
    for i, (_, expr) in enumerate(dashboard_targets()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"an unhandled Grafana variable in {expr}"
        rules.append({"record": f"dashboard:panel_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run(tool("promtool"), "check", "rules", str(path))
