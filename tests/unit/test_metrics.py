"""metrics.py: the contract's names, labels and types; both exposition formats parse; values follow the Observer."""

from __future__ import annotations

import json
import uuid

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from brokerproxy import __version__, metrics
from brokerproxy.observe import OTHER, Observer

# The contract (dashboards and alerts depend on these): name -> (type, labels).
CONTRACT = {
    "brokerproxy_queue_messages_published_total": ("counter", {"queue"}),
    "brokerproxy_queue_messages_redelivered_total": ("counter", {"queue"}),
    "brokerproxy_queue_messages_consumed_total": ("counter", {"queue"}),
    "brokerproxy_queue_depth": ("gauge", {"queue"}),
    "brokerproxy_queue_wait_seconds": ("histogram", {"queue"}),
    "brokerproxy_queue_consumers": ("gauge", {"queue"}),
    "brokerproxy_queue_message_bytes": ("histogram", {"queue"}),
    "brokerproxy_messages_requeued_total": ("counter", {"queue"}),
    "brokerproxy_tasks_published_total": ("counter", {"task", "queue"}),
    "brokerproxy_task_results_total": ("counter", {"task", "state"}),
    "brokerproxy_task_runtime_seconds": ("histogram", {"task"}),
    "brokerproxy_workers_online": ("gauge", set()),
    "brokerproxy_client_connections": ("gauge", {"listener"}),
    "brokerproxy_client_connections_total": ("counter", {"listener"}),
    "brokerproxy_commands_total": ("counter", {"command", "outcome"}),
    "brokerproxy_command_duration_seconds": ("histogram", {"command"}),
    "brokerproxy_client_bytes_total": ("counter", {"direction"}),
    "brokerproxy_upstream_connections": ("gauge", set()),
    "brokerproxy_upstream_errors_total": ("counter", {"reason"}),
    "brokerproxy_upstream_up": ("gauge", set()),
    "brokerproxy_protocol_errors_total": ("counter", {"side"}),
    "brokerproxy_auth_failures_total": ("counter", set()),
    "brokerproxy_acl_denials_total": ("counter", {"user", "kind"}),
    "brokerproxy_build_info": ("gauge", {"version"}),
}
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def message(task: str, tid: str, tag: str) -> bytes:
    headers = {"lang": "py", "task": task, "id": tid}
    properties = {"delivery_info": {"routing_key": "q"}, "delivery_tag": tag}
    return json.dumps({"body": "e30=", "headers": headers, "properties": properties}).encode()


def busy_observer() -> Observer:
    """An observer that has seen a little of everything."""
    clock = Clock()
    o = Observer(clock=clock)
    for i in range(3):
        tid, tag = str(uuid.uuid4()), str(uuid.uuid4())
        msg = message("app.add", tid, tag)
        o.on_request([b"LPUSH", b"celery\x06\x163", msg], False)
        o.on_reply([b"LPUSH", b"celery\x06\x163", msg], b":%d\r\n" % (i + 1))
        clock.now += 0.5
        o.on_reply([b"BRPOP", b"celery", b"1"], b"*2\r\n$9\r\ncelery\x06\x163\r\n$%d\r\n%s\r\n" % (len(msg), msg))
        clock.now += 2.0
        meta = json.dumps({"status": "SUCCESS" if i else "FAILURE", "task_id": tid}).encode()
        o.on_request([b"SETEX", b"celery-task-meta-" + tid.encode(), b"60", meta], True)
    o.consumer_blocked([b"celery", b"celery\x06\x163"])
    o.requeued(b"celery\x06\x163", 1)
    o.connection_opened("main")
    o.command("get", "ok")
    o.command("flushall", "denied")
    o.observe_command_duration("get", 0.0003)
    o.bytes_in += 123
    o.bytes_out += 456
    o.upstream_connections = 1
    o.upstream_up = 1
    o.upstream_error("connect")
    o.protocol_error("client")
    o.auth_failed()
    o.acl_denied("worker", "key")
    return o


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in parse_text(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_contract_metric_is_defined_once_with_its_type_and_labels() -> None:
    names = [spec.name for spec in metrics.METRICS]
    assert len(names) == len(set(names))
    for name, (kind, labels) in CONTRACT.items():
        spec = metrics.SPECS[name]
        assert (spec.kind, set(spec.labels)) == (kind, labels), name
    for spec in metrics.METRICS:
        assert spec.name.startswith("brokerproxy_")
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert spec.help


def test_text_exposition_has_every_metric_with_the_right_types() -> None:
    registry = metrics.build_registry(busy_observer(), process_metrics=False)
    body, content_type = metrics.render(registry, None)
    assert content_type.startswith("text/plain; version=0.0.4")
    families = list(parse_text(body.decode()))
    for name, (kind, labels) in CONTRACT.items():
        # The text parser names a counter family without _total (and the gauge brokerproxy_client_connections
        # shares that name): match on name and type together.
        family_name = name.removesuffix("_total") if kind == "counter" else name
        (family,) = [f for f in families if f.name == family_name and f.type == kind]
        assert family.samples, name
        for s in family.samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)


def test_values_follow_the_observer() -> None:
    o = busy_observer()
    registry = metrics.build_registry(o, process_metrics=False)
    got = samples(metrics.render(registry, None)[0].decode())
    q = (("queue", "celery"),)
    assert got[("brokerproxy_queue_messages_published_total", q)] == 3
    assert got[("brokerproxy_queue_messages_consumed_total", q)] == 3
    assert got[("brokerproxy_queue_messages_redelivered_total", q)] == 0
    assert got[("brokerproxy_messages_requeued_total", q)] == 1
    assert got[("brokerproxy_queue_consumers", q)] == 1
    assert got[("brokerproxy_queue_depth", q)] == 3  # the last push said 3, one pop since, one requeued
    assert got[("brokerproxy_queue_wait_seconds_count", q)] == 3
    assert got[("brokerproxy_queue_wait_seconds_sum", q)] == pytest.approx(1.5)
    assert got[("brokerproxy_queue_wait_seconds_bucket", (("le", "0.5"), *q))] == 3
    assert got[("brokerproxy_queue_wait_seconds_bucket", (("le", "0.25"), *q))] == 0
    assert got[("brokerproxy_queue_wait_seconds_bucket", (("le", "+Inf"), *q))] == 3
    assert got[("brokerproxy_tasks_published_total", (("queue", "celery"), ("task", "app.add")))] == 3
    assert got[("brokerproxy_task_results_total", (("state", "SUCCESS"), ("task", "app.add")))] == 2
    assert got[("brokerproxy_task_results_total", (("state", "FAILURE"), ("task", "app.add")))] == 1
    assert got[("brokerproxy_task_runtime_seconds_count", (("task", "app.add"),))] == 3
    assert got[("brokerproxy_task_runtime_seconds_sum", (("task", "app.add"),))] == pytest.approx(6.0)
    assert got[("brokerproxy_commands_total", (("command", "get"), ("outcome", "ok")))] == 1
    assert got[("brokerproxy_commands_total", (("command", "flushall"), ("outcome", "denied")))] == 1
    assert got[("brokerproxy_command_duration_seconds_count", (("command", "get"),))] == 1
    assert got[("brokerproxy_client_bytes_total", (("direction", "in"),))] == 123
    assert got[("brokerproxy_client_bytes_total", (("direction", "out"),))] == 456
    assert got[("brokerproxy_client_connections", (("listener", "main"),))] == 1
    assert got[("brokerproxy_client_connections_total", (("listener", "main"),))] == 1
    assert got[("brokerproxy_upstream_up", ())] == 1
    assert got[("brokerproxy_upstream_errors_total", (("reason", "connect"),))] == 1
    assert got[("brokerproxy_protocol_errors_total", (("side", "client"),))] == 1
    assert got[("brokerproxy_protocol_errors_total", (("side", "upstream"),))] == 0
    assert got[("brokerproxy_auth_failures_total", ())] == 1
    assert got[("brokerproxy_acl_denials_total", (("kind", "key"), ("user", "worker")))] == 1
    assert got[("brokerproxy_build_info", (("version", __version__),))] == 1
    assert got[("brokerproxy_observe_pairs_pending", (("map", "delivery_tag"),))] == 0
    assert got[("brokerproxy_workers_online", ())] == 0


def test_histogram_buckets_are_cumulative_and_end_at_the_count() -> None:
    o = busy_observer()
    for v in (0.0001, 0.002, 0.02, 7.0, 1e6):
        o.observe_command_duration("set", v)
    got = samples(metrics.render(metrics.build_registry(o, process_metrics=False), None)[0].decode())
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in got.items()
        if name == "brokerproxy_command_duration_seconds_bucket" and dict(labels)["command"] == "set"
    )
    values = [v for _, v in buckets]
    assert values == sorted(values) and values[-1] == 5
    assert buckets[0] == (0.0001, 1)  # le is inclusive
    assert dict(buckets)[10.0] == 4 and dict(buckets)[float("inf")] == 5
    assert got[("brokerproxy_command_duration_seconds_sum", (("command", "set"),))] == pytest.approx(1e6 + 7.0221)


def test_openmetrics_exposition_parses() -> None:
    registry = metrics.build_registry(busy_observer(), process_metrics=False)
    body, content_type = metrics.render(registry, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(text)}
    assert families["brokerproxy_queue_messages_published"].type == "counter"
    assert families["brokerproxy_queue_wait_seconds"].type == "histogram"
    assert families["brokerproxy_client_connections"].type == "gauge"
    # The counter whose family name the gauge already has: exposed under its full sample name, same value.
    clash = families["brokerproxy_client_connections_total"]
    assert clash.type == "unknown"
    assert [(s.name, s.labels, s.value) for s in clash.samples] == [
        ("brokerproxy_client_connections_total", {"listener": "main"}, 1.0)
    ]


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        (None, False),
        ("", False),
        ("text/plain", False),
        ("*/*", False),
        ("application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True),
        ("application/openmetrics-text", True),
    ],
)
def test_format_is_chosen_by_accept(accept: str | None, openmetrics: bool) -> None:
    registry = metrics.build_registry(Observer(), process_metrics=False)
    body, content_type = metrics.render(registry, accept)
    assert content_type.startswith("application/openmetrics-text") == openmetrics
    assert body.endswith(b"# EOF\n") == openmetrics


def test_registries_are_isolated_and_process_metrics_optional() -> None:
    a = metrics.build_registry(Observer())
    b = metrics.build_registry(Observer(), CollectorRegistry(), process_metrics=False)
    assert b"process_" in metrics.render(a, None)[0]
    assert b"process_" not in metrics.render(b, None)[0]
    # The same observer cannot be registered twice on one registry (duplicate names are refused).
    with pytest.raises(ValueError, match="Duplicated"):
        metrics.build_registry(Observer(), b, process_metrics=False)


def test_series_stay_bounded_under_ten_thousand_queue_names() -> None:
    o = Observer(max_queues=100, max_tasks=100)
    for i in range(10_000):
        key = b"queue-%d" % i
        msg = message(f"task{i}", str(i), f"tag{i}")
        o.on_request([b"LPUSH", key, msg], False)
        o.on_reply([b"BRPOP", key, b"1"], b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(msg), msg))
    got = samples(metrics.render(metrics.build_registry(o, process_metrics=False), None)[0].decode())
    queues = {dict(labels)["queue"] for (name, labels) in got if name.startswith("brokerproxy_queue_")}
    tasks = {dict(labels)["task"] for (name, labels) in got if name.startswith("brokerproxy_task")}
    assert len(queues) == 101 and OTHER in queues
    assert len(tasks) == 101 and OTHER in tasks
    assert got[("brokerproxy_queue_messages_published_total", (("queue", OTHER),))] == 9_900
    assert len(got) < 10_000


def test_metrics_module_is_the_only_one_that_imports_prometheus_client() -> None:
    from tests.unit.test_layering import imported_modules

    for module in ("observe", "resp", "commands", "session"):
        assert not any(n.startswith("prometheus_client") for n in imported_modules(module)), module
