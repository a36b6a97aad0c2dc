"""status.py: the status JSON says what /metrics says, from the same Observer; rates, history, connections.

The observers are fed real traffic (the Celery 5.7 capture that test_observe replays, and hand-made kombu
envelopes); the expected numbers are read from the Prometheus exposition of the same observer, parsed by
prometheus_client's own parser, and the quantiles recomputed from the exposed buckets with a transcription of
Prometheus's ``bucketQuantile`` (promql/quantile.go).
"""

from __future__ import annotations

import ast
import json
import math
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from brokerproxy import metrics, status
from brokerproxy.config import load
from brokerproxy.observe import WAIT_BUCKETS, Histogram, Observer
from brokerproxy.status import Facts, History, StatusBoard, build, histogram_quantile
from tests.unit.test_metrics import busy_observer
from tests.unit.test_observe import Clock, envelope, pop_reply, replay_capture, result

# ------------------------------------------------------------------------------------------------ the reference


class Scrape:
    """The observer's /metrics exposition, parsed."""

    def __init__(self, o: Observer) -> None:
        body, _ = metrics.render(metrics.build_registry(o, process_metrics=False), None)
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                self.samples[s.name].append((dict(s.labels), s.value))

    def by(self, name: str, *labels: str) -> dict[Any, float]:
        out: dict[Any, float] = {}
        for lab, v in self.samples.get(name, []):
            key = tuple(lab[k] for k in labels)
            out[key[0] if len(key) == 1 else key] = v
        return out

    def one(self, name: str) -> float:
        (value,) = [v for _, v in self.samples[name]]
        return value

    def buckets(self, name: str, label: str, value: str) -> list[tuple[float, float]]:
        return sorted(
            (float(lab["le"]), v) for lab, v in self.samples.get(name + "_bucket", []) if lab.get(label) == value
        )


def prom_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's bucketQuantile over (upper bound, cumulative count) pairs, +Inf last."""
    if not buckets or buckets[-1][1] == 0:
        return None
    observations = buckets[-1][1]
    rank = q * observations
    b = next(i for i, (_, count) in enumerate([*buckets[:-1], (math.inf, math.inf)]) if count >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], buckets[b][1]
    if b > 0:
        start = buckets[b - 1][0]
        count -= buckets[b - 1][1]
        rank -= buckets[b - 1][1]
    return start + (end - start) * (rank / count)


def facts(**kw: Any) -> Facts:
    base: dict[str, Any] = {
        "upstream": "redis://127.0.0.1:6390/0",
        "ready": True,
        "reason": "ready",
        "draining": False,
        "clients": (),
        "uptime": 12.0,
        "depth_poll_interval": 5.0,
    }
    return Facts(**{**base, **kw})


def spread_observer() -> Observer:
    """Waits and runtimes spread over many buckets (the capture's all land in one)."""
    clock = Clock(step=0.0)
    o = Observer(clock=clock)
    waits = [0.001, 0.004, 0.02, 0.03, 0.2, 0.7, 0.9, 3.0, 40.0, 100000.0]
    for i, wait in enumerate(waits):
        tid = str(uuid.uuid4())
        msg = envelope("app.spread", queue="spread", tid=tid)
        o.on_request([b"LPUSH", b"spread", msg], False)
        clock.now += wait
        o.on_reply([b"BRPOP", b"spread", b"1"], pop_reply(b"spread", msg))
        clock.now += wait / 2
        o.on_request(
            [b"SET", b"celery-task-meta-" + tid.encode(), result("SUCCESS" if i % 3 else "FAILURE", tid)], False
        )
    return o


# ------------------------------------------------------------------------------------------------ same numbers


@pytest.mark.parametrize("make", [lambda: replay_capture(Clock()), busy_observer, spread_observer])
def test_status_numbers_are_the_metrics_numbers(make: Any) -> None:
    o: Observer = make()
    s = Scrape(o)
    st = build(o, facts(), now=0.0, wall=0.0)
    json.dumps(st, allow_nan=False)  # the endpoint serves it so

    queues = {q["name"]: q for q in st["queues"]}
    assert queues, "the traffic made no queue: the comparison below would prove nothing"
    assert set(queues) == set(s.by("brokerproxy_queue_messages_published_total", "queue"))
    for field, metric in (
        ("published", "brokerproxy_queue_messages_published_total"),
        ("consumed", "brokerproxy_queue_messages_consumed_total"),
        ("redelivered", "brokerproxy_queue_messages_redelivered_total"),
        ("requeued", "brokerproxy_messages_requeued_total"),
        ("consumers", "brokerproxy_queue_consumers"),
    ):
        assert {n: q[field] for n, q in queues.items()} == s.by(metric, "queue"), field
    depth = s.by("brokerproxy_queue_depth", "queue")
    assert {n: q["depth"] for n, q in queues.items() if q["depth"] is not None} == depth
    for name, q in queues.items():
        wait = s.buckets("brokerproxy_queue_wait_seconds", "queue", name)
        assert q["wait"]["count"] == (wait[-1][1] if wait else 0)
        for p in ("p50", "p95"):
            expected = prom_quantile(0.5 if p == "p50" else 0.95, wait)
            assert q["wait"][p] == pytest.approx(expected), (name, p)

    tasks = {t["name"]: t for t in st["tasks"]}
    published: dict[str, float] = defaultdict(float)
    for (task, _), n in s.by("brokerproxy_tasks_published_total", "task", "queue").items():
        published[task] += n
    assert {n: t["published"] for n, t in tasks.items() if t["published"]} == {k: v for k, v in published.items() if v}
    by_queue = {(n, q): c for n, t in tasks.items() for q, c in t["published_by_queue"].items()}
    assert by_queue == s.by("brokerproxy_tasks_published_total", "task", "queue")
    results = {(n, state): c for n, t in tasks.items() for state, c in t["results"].items()}
    assert results == {k: v for k, v in s.by("brokerproxy_task_results_total", "task", "state").items() if v}
    for name, t in tasks.items():
        runtime = s.buckets("brokerproxy_task_runtime_seconds", "task", name)
        assert t["runtime"]["count"] == (runtime[-1][1] if runtime else 0)
        assert t["runtime"]["p95"] == pytest.approx(prom_quantile(0.95, runtime)), name

    assert st["workers_online"] == s.one("brokerproxy_workers_online")
    assert st["connections"]["by_listener"] == s.by("brokerproxy_client_connections", "listener")
    assert st["connections"]["accepted_by_listener"] == s.by("brokerproxy_client_connections_total", "listener")
    assert st["connections"]["open"] == sum(s.by("brokerproxy_client_connections", "listener").values())
    sec = st["security"]
    assert sec["auth_failures"] == s.one("brokerproxy_auth_failures_total")
    assert {(d["user"], d["kind"]): d["count"] for d in sec["acl_denials"]} == s.by(
        "brokerproxy_acl_denials_total", "user", "kind"
    )
    assert sec["protocol_errors"] == s.by("brokerproxy_protocol_errors_total", "side")
    assert sec["reload_failures"] == s.one("brokerproxy_config_reload_failures_total")
    commands = s.by("brokerproxy_commands_total", "command", "outcome")
    for outcome in ("ok", "error", "denied"):
        assert st["commands"][outcome] == sum(n for (_, out), n in commands.items() if out == outcome)
    assert sec["acl_denials_total"] == sum(s.by("brokerproxy_acl_denials_total", "user", "kind").values())
    assert st["upstream"]["up"] == bool(s.one("brokerproxy_upstream_up"))
    assert st["upstream"]["connections"] == s.one("brokerproxy_upstream_connections")
    assert st["upstream"]["errors"] == s.by("brokerproxy_upstream_errors_total", "reason")
    assert st["messages"]["requeue_failures"] == s.one("brokerproxy_messages_requeue_failures_total")
    assert st["bytes"] == {
        "in": s.by("brokerproxy_client_bytes_total", "direction")["in"],
        "out": s.by("brokerproxy_client_bytes_total", "direction")["out"],
    }


def test_the_capture_gives_the_counts_its_readme_states() -> None:
    # Independent of metrics.py: 140 task messages were published (test_observe's oracle counts them).
    st = build(replay_capture(Clock()), facts(), now=0.0, wall=0.0)
    assert sum(q["published"] for q in st["queues"]) == 140
    assert sum(t["published"] for t in st["tasks"]) == 140


def test_histogram_quantile_by_hand() -> None:
    h = Histogram(WAIT_BUCKETS)
    assert histogram_quantile(0.5, h) is None
    for _ in range(10):
        h.observe(0.003)  # all in (0, 0.005]
    assert histogram_quantile(0.5, h) == pytest.approx(0.0025)
    assert histogram_quantile(0.95, h) == pytest.approx(0.00475)
    for _ in range(10):
        h.observe(0.2)  # (0.1, 0.25]
    assert histogram_quantile(0.5, h) == pytest.approx(0.005)  # rank 10: the top of the first bucket
    assert histogram_quantile(0.95, h) == pytest.approx(0.1 + 0.15 * 9 / 10)
    h2 = Histogram(WAIT_BUCKETS)
    h2.observe(1e9)  # above every bound: the highest finite bound, as Prometheus answers
    assert histogram_quantile(0.5, h2) == WAIT_BUCKETS[-1]


# ------------------------------------------------------------------------------------------------ rates, history


class FakeConn:
    def __init__(self, user: str | None, listener: str | None = None) -> None:
        self.user = user
        if listener is not None:
            self.listener = listener


class FakeServer:
    def __init__(self, observer: Observer, conns: list[FakeConn] | None = None, url: str = "") -> None:
        self.config = load(None, {}, {"upstream": url or "redis://127.0.0.1:6390/0"})
        self.observer = observer
        self.draining = False
        self.conns = conns or []
        self.readiness = (True, "ready")

    def ready(self) -> tuple[bool, str]:
        return self.readiness

    @property
    def open_connections(self) -> list[FakeConn]:
        return self.conns


class Time:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def push(o: Observer, queue: bytes, n: int) -> None:
    for _ in range(n):
        o.on_request([b"LPUSH", queue, envelope(queue=queue.decode())], False)


def pop(o: Observer, queue: bytes, n: int) -> None:
    for _ in range(n):
        o.on_reply([b"BRPOP", queue, b"1"], pop_reply(queue, envelope(queue=queue.decode())))


def test_rates_are_counter_deltas_over_the_window() -> None:
    o = Observer()
    t = Time()
    board = StatusBoard(FakeServer(o), clock=t, wall=lambda: 1.7e9)
    board.sample()  # t = 0
    snap = board.snapshot()
    assert snap["queues"] == [] and snap["rate_window"] is None
    push(o, b"alpha", 4)
    t.now += 0.5
    (q,) = board.snapshot()["queues"]
    assert q["published"] == 4 and q["publish_rate"] is None  # half a second is too short to tell
    for step in range(1, 6):  # samples every 2 s; 6 more messages per interval, 3 popped
        t.now += 2.0 if step > 1 else 1.5
        push(o, b"alpha", 6)
        pop(o, b"alpha", 3)
        board.sample()
    # now = 10 s: the reference is the sample at 0 (10 s old), when alpha had published nothing.
    snap = board.snapshot()
    (q,) = snap["queues"]
    assert snap["rate_window"] == 10.0
    assert q["published"] == 34 and q["consumed"] == 15
    assert q["publish_rate"] == pytest.approx(3.4) and q["consume_rate"] == pytest.approx(1.5)
    t.now += 1.0  # 11 s: the newest sample at least 10 s old is still t = 0
    assert board.snapshot()["queues"][0]["publish_rate"] == pytest.approx(34 / 11, abs=1e-3)
    t.now += 1.0  # 12 s: now the sample at 2 s (published 4 + 6 = 10)
    assert board.snapshot()["queues"][0]["publish_rate"] == pytest.approx((34 - 10) / 10)

    history = board.snapshot()["history"]
    assert [s["seq"] for s in history["samples"]] == [1, 2, 3, 4, 5, 6]
    assert [s["t"] for s in history["samples"]] == [-12.0, -10.0, -8.0, -6.0, -4.0, -2.0]
    rows = [s["queues"].get("alpha") for s in history["samples"]]
    assert rows[0] is None  # no queue yet at the first sample
    assert rows[1] == [None, pytest.approx(10 / 2), pytest.approx(3 / 2)]  # 4 + 6 pushed, 3 popped in 2 s
    assert rows[2] == [None, 3.0, 1.5]
    assert history["last"] == 6
    # The page asks only for what it lacks; the CLI for none.
    assert [s["seq"] for s in board.snapshot({"since": "4"})["history"]["samples"]] == [5, 6]
    assert board.snapshot({"since": "6"})["history"]["samples"] == []
    assert "history" not in board.snapshot({"history": "0"})
    assert len(board.snapshot({"since": "bogus"})["history"]["samples"]) == 6


def test_history_depth_and_bound() -> None:
    o = Observer()
    t = Time()
    board = StatusBoard(FakeServer(o), clock=t, capacity=5)
    o.on_request([b"LPUSH", b"beta", envelope(queue="beta")], False)
    o.on_reply([b"LPUSH", b"beta", envelope(queue="beta")], b":7\r\n")  # the push reply: the sub-queue's length
    for _ in range(12):
        board.sample()
        t.now += 2.0
    history = board.snapshot()["history"]
    assert [s["seq"] for s in history["samples"]] == [8, 9, 10, 11, 12]
    assert history["capacity"] == 5
    rows = [s["queues"]["beta"] for s in history["samples"]]
    assert rows == [[7, None, None]] + [[7, 0.0, 0.0]] * 4  # the oldest kept sample has none before it
    assert board.snapshot()["queues"][0]["depth"] == 7 == o.depths()["beta"]


def test_reference_sample_choice() -> None:
    h = History(10)
    o = Observer()
    for t in (0.0, 2.0, 4.0):
        h.add(o, t)
    assert h.reference(4.5) is not None and h.reference(4.5).t == 0.0  # type: ignore[union-attr]
    assert h.reference(12.0).t == 2.0  # type: ignore[union-attr]
    assert h.reference(100.0).t == 4.0  # type: ignore[union-attr]
    h2 = History(10)
    h2.add(o, 0.0)
    assert h2.reference(0.5) is None


def test_connections_by_user_and_listener_and_server_facts() -> None:
    o = Observer()
    o.upstream_up = 0
    conns = [
        FakeConn("alice", "tls"), FakeConn("alice", "tls"), FakeConn("alice", "main"), FakeConn("bob"),
        FakeConn(None, "main"), FakeConn(None),
    ]  # fmt: skip
    server = FakeServer(o, conns, url="redis://proxyuser:s3cretpw@127.0.0.1:6391/2")
    server.readiness = (False, "upstream 127.0.0.1:6391 does not answer")
    snap = StatusBoard(server).snapshot()
    assert snap["connections"]["clients"] == [
        {"user": "alice", "listener": "main", "count": 1},
        {"user": "alice", "listener": "tls", "count": 2},
        {"user": "bob", "listener": "main", "count": 1},  # no listener attribute: the plaintext listener
        {"user": None, "listener": "main", "count": 2},
    ]
    up = snap["upstream"]
    assert up == {
        "address": "redis://proxyuser@127.0.0.1:6391/2",
        "up": False,
        "ready": False,
        "reason": "upstream 127.0.0.1:6391 does not answer",
        "draining": False,
        "connections": 0,
        "errors": {},
        "poll_interval": 5.0,
    }
    assert "s3cretpw" not in json.dumps(snap)

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    server.ready = broken  # type: ignore[method-assign]
    up = StatusBoard(server).snapshot()["upstream"]
    assert up["ready"] is False and "boom" in up["reason"]


def test_tasks_list_outcomes_by_state_in_a_fixed_order() -> None:
    o = Observer()
    for state in ("STARTED", "SUCCESS", "STARTED", "FAILURE", "CUSTOM"):
        tid = str(uuid.uuid4())
        o.on_request([b"LPUSH", b"celery", envelope("app.t", tid=tid)], False)
        o.on_request([b"SET", b"celery-task-meta-" + tid.encode(), result(state, tid)], False)
    (task,) = build(o, facts(), now=0.0, wall=0.0)["tasks"]
    assert task["published"] == 5
    assert list(task["results"].items()) == [("SUCCESS", 1), ("FAILURE", 1), ("STARTED", 2), ("other", 1)]


def test_other_queue_is_listed_last_with_no_depth() -> None:
    o = Observer(max_queues=2)
    for name in (b"zeta", b"alpha", b"m1", b"m2"):
        push(o, name, 1)
    names = [q["name"] for q in build(o, facts(), now=0.0, wall=0.0)["queues"]]
    assert names == ["alpha", "zeta", "other"]
    assert build(o, facts(), now=0.0, wall=0.0)["queues"][-1]["depth"] is None


def test_status_imports_no_io() -> None:
    tree = ast.parse(Path(status.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add("." + node.module)
    assert names, "no imports found: the check is broken"
    assert names & {"asyncio", "socket", "ssl", "prometheus_client", "uvloop", "selectors"} == set()
    assert names & {".server", ".proxy", ".endpoints", ".metrics", ".cli"} == set()
