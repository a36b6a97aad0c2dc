"""deploy/: the Grafana dashboard and the Prometheus alert rules parse, and query only metrics brokerproxy exports.

promtool is not available, so PromQL is checked here by a small lexer: brackets and quotes balance, every function
is one PromQL has, every range is a duration, every ``brokerproxy_*`` name is one metrics.py defines (or the one a
later issue adds), and every label matcher names a label that metric has.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from brokerproxy import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "brokerproxy.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

#: Metrics the deploy files may reference before metrics.py defines them (none left: TLS's expiry gauge landed).
FUTURE: dict[str, tuple[str, tuple[str, ...]]] = {}
#: Labels Prometheus adds to every series at scrape time.
TARGET_LABELS = {"instance", "job"}
FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "count_values", "stddev", "group",
    # functions
    "rate", "irate", "increase", "delta", "deriv", "histogram_quantile", "max_over_time", "min_over_time",
    "avg_over_time", "sum_over_time", "count_over_time", "last_over_time", "time", "vector", "scalar", "abs",
    "clamp_min", "clamp_max", "absent", "absent_over_time", "predict_linear", "label_replace", "round",
    # grouping and matching modifiers, which are followed by a parenthesis too
    "by", "without", "on", "ignoring", "group_left", "group_right",
}  # fmt: skip
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+(:(\d+(ms|s|m|h|d|w|y))+)?$|^\$__(rate_)?interval$")


def exported() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every series name a query can use -> (the family's type, its labels)."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for spec in metrics.METRICS:
        if spec.kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                labels = (*spec.labels, "le") if suffix == "_bucket" else spec.labels
                out[spec.name + suffix] = (spec.kind, labels)
        else:
            out[spec.name] = (spec.kind, spec.labels)
    out.update(FUTURE)
    return out


def strip_strings(expr: str) -> str:
    out = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    out = re.sub(r"'(?:[^'\\]|\\.)*'", "''", out)
    assert '"' not in out.replace('""', "") and "'" not in out.replace("''", ""), f"unbalanced quotes: {expr}"
    return out


def check_promql(expr: str) -> set[str]:
    """Lint one expression; the brokerproxy_* names it uses."""
    assert expr.strip(), "empty expression"
    bare = strip_strings(expr)
    depth = {"(": 0, "[": 0, "{": 0}
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in bare:
        if ch in depth:
            stack.append(ch)
        elif ch in closing:
            assert stack and stack.pop() == closing[ch], f"unbalanced {ch!r} in {expr}"
    assert not stack, f"unclosed {stack} in {expr}"
    for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", bare):
        assert name in FUNCTIONS, f"unknown function {name}() in {expr}"
    for rng in re.findall(r"\[([^\]]*)\]", bare):
        assert DURATION.match(rng.strip()), f"bad range [{rng}] in {expr}"
    known = exported()
    used = set(re.findall(r"\bbrokerproxy_[A-Za-z0-9_]*", bare))
    for name in used:
        assert name in known, f"{name} is not a metric brokerproxy exports (in {expr})"
    for name, matchers in re.findall(r"\b(brokerproxy_[A-Za-z0-9_]*)\s*\{([^}]*)\}", bare):
        for label in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
            assert label in set(known[name][1]) | TARGET_LABELS, f"{name} has no label {label!r} (in {expr})"
    return used


# -------------------------------------------------------------------------------------------- the linter itself


@pytest.mark.parametrize(
    "bad",
    [
        "sum(rate(brokerproxy_commands_total[5m])",
        "rate(brokerproxy_commands_total[5 minutes])",
        "rate(brokerproxy_nonexistent_total[5m])",
        "histogram_quantil(0.9, brokerproxy_queue_wait_seconds_bucket)",
        'brokerproxy_queue_depth{task="x"}',
        'brokerproxy_queue_depth{queue="x}',
    ],
)
def test_the_linter_catches_mistakes(bad: str) -> None:
    with pytest.raises(AssertionError):
        check_promql(bad)


def test_the_linter_accepts_good_promql() -> None:
    used = check_promql(
        'histogram_quantile(0.95, sum by (queue, le) (rate(brokerproxy_queue_wait_seconds_bucket{queue=~"a|b"}[5m])))'
        ' > 300 and on (queue) max by (queue) (brokerproxy_queue_depth{job="x"}) > 0'
    )
    assert used == {"brokerproxy_queue_wait_seconds_bucket", "brokerproxy_queue_depth"}


# -------------------------------------------------------------------------------------------- the dashboard


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def all_panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    panels = all_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))


def test_dashboard_queries_use_only_exported_metrics_and_defined_variables() -> None:
    d = dashboard()
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "queue", "task"} <= variables
    used: set[str] = set()
    for p in all_panels(d):
        for t in p.get("targets", []):
            expr = t["expr"]
            for var in re.findall(r"\$(\w+)", expr):
                assert var in variables or var.startswith("__"), f"undefined variable ${var} in {expr}"
            used |= check_promql(expr)
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((brokerproxy_\w+),\s*(\w+)\)", v["definition"])
            assert m and m.group(2) in exported()[m.group(1)][1], v["definition"]
    # What the issue asks the dashboard to show.
    for name in (
        "brokerproxy_queue_depth",
        "brokerproxy_queue_messages_published_total",
        "brokerproxy_queue_messages_consumed_total",
        "brokerproxy_queue_wait_seconds_bucket",
        "brokerproxy_task_results_total",
        "brokerproxy_upstream_up",
        "brokerproxy_commands_total",
        "brokerproxy_client_connections",
    ):
        assert name in used, f"the dashboard does not show {name}"


# -------------------------------------------------------------------------------------------- the alert rules


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    assert set(data) == {"groups"}
    names = [g["name"] for g in data["groups"]]
    assert len(names) == len(set(names))
    rules = [r for g in data["groups"] for r in g["rules"]]
    assert rules
    return rules


def test_alert_rules_are_well_formed() -> None:
    rules = alert_rules()
    alerts = [r["alert"] for r in rules]
    assert len(alerts) == len(set(alerts))
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", r["alert"])
        if "for" in r:
            assert DURATION.match(r["for"]), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"]
        for text in r["annotations"].values():
            assert text.count("{{") == text.count("}}"), r["alert"]
        check_promql(r["expr"])


def test_alert_rules_cover_what_the_issue_asks() -> None:
    exprs = {r["alert"]: " ".join(r["expr"].split()) for r in alert_rules()}

    def one(pattern: str) -> None:
        assert any(re.search(pattern, e) for e in exprs.values()), f"no alert matches {pattern!r}"

    one(r"deriv\(brokerproxy_queue_depth\[")  # a queue growing
    one(r"histogram_quantile\(0\.95, .*brokerproxy_queue_wait_seconds_bucket")  # wait p95
    one(r"brokerproxy_queue_depth.*> 0 .*brokerproxy_queue_consumers.*== 0")  # no consumers on a non-empty queue
    one(r'brokerproxy_task_results_total\{state="FAILURE"\}.*/')  # failure ratio
    one(r"brokerproxy_upstream_up == 0")  # upstream down
    one(r"brokerproxy_tls_certificate_expiry_timestamp_seconds")  # certificate near expiry
