"""Metrics end to end: real Celery traffic through a proxy started with ``--metrics-listen``, scraped over HTTP.

What the scrapes are checked against is never the proxy's own view: the counts come from what the test sent and
what the workers ran (results fetched, side effects in Redis), depths from ``LLEN`` straight on redis-server,
redeliveries from the restored messages as they sit in Redis.

* ``test_celery_traffic``: several queues, priorities, successes, failures, retries, and a warm shutdown that
  restores reserved acks_late (ETA) messages; per-queue and per-task counters, depth, wait and runtime histograms;
* ``test_health_readiness_and_proxy_counters``: /healthz, /readyz flipping with Redis stopped and started,
  ``brokerproxy_upstream_up``, connection gauge, command outcomes, build info, OpenMetrics;
* ``test_label_cardinality_bound``: 10 000 distinct queue (and task) names fold into ``other`` past the bounds,
  with exact totals.
"""

from __future__ import annotations

import base64
import collections
import gc
import http.client
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from brokerproxy import __version__
from tests.conftest import ProxyProcess, RedisServer, free_port, wait_for_port
from tests.integration.test_celery_e2e import TIMEOUT, Stack, T, wait_until

POLL = 0.2  # depth_poll_interval of every proxy here
CONFIG = f"[metrics]\ndepth_poll_interval = {POLL}\n"
PRIORITY_SEP = "\x06\x16"


# ------------------------------------------------------------------------------------------------ helpers


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


class Scrape:
    """One /metrics scrape (Prometheus text format), indexed by sample name."""

    def __init__(self, port: int) -> None:
        status, headers, body = http_get(port, "/metrics")
        assert status == 200, body
        assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
        self.text = body.decode()
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
        for family in text_string_to_metric_families(self.text):
            for s in family.samples:
                self.samples[s.name].append((dict(s.labels), s.value))

    def get(self, name: str, default: float | None = None, **labels: str) -> float:
        """The value of the one sample ``name`` with exactly these labels."""
        found = [v for lab, v in self.samples.get(name, []) if lab == labels]
        if not found:
            if default is not None:
                return default
            raise AssertionError(f"no sample {name}{labels}; have {self.samples.get(name, [])[:20]}")
        assert len(found) == 1, (name, labels, found)
        return found[0]

    def by(self, name: str, *labels: str) -> dict[Any, float]:
        """``name``'s samples keyed by the values of ``labels`` (a str for one label, a tuple for several)."""
        out: dict[Any, float] = {}
        for lab, v in self.samples.get(name, []):
            key = lab[labels[0]] if len(labels) == 1 else tuple(lab[x] for x in labels)
            assert key not in out, (name, key)
            out[key] = v
        return out

    def nonzero(self, name: str, *labels: str) -> dict[Any, float]:
        return {k: v for k, v in self.by(name, *labels).items() if v}


def start_metrics_proxy(
    redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess], config: str = CONFIG
) -> tuple[ProxyProcess, int]:
    mport = free_port()
    proxy = start_proxy(redis_server.url(), "--metrics-listen", f"127.0.0.1:{mport}", config=config)
    wait_for_port(mport, proc=proxy.proc)
    return proxy, mport


def llen_by_queue(r: redis.Redis) -> dict[str, int]:
    """Ground truth from redis-server: the length of every list, priority sub-queues summed into their queue."""
    out: dict[str, int] = collections.Counter()
    for key in r.scan_iter(count=1000):
        if r.type(key) != b"list":
            continue
        name = key.decode()
        base, sep, step = name.rpartition(PRIORITY_SEP)
        if sep and step.isdigit():
            name = base
        out[name] += int(r.llen(key))
    return dict(out)


def bucket(scrape: Scrape, name: str, le: float, **labels: str) -> float:
    """The cumulative count of histogram ``name`` at the largest bucket bound <= ``le``."""
    best, value = -1.0, 0.0
    for lab, v in scrape.samples.get(name + "_bucket", []):
        if {k: x for k, x in lab.items() if k != "le"} != labels or lab["le"] == "+Inf":
            continue
        bound = float(lab["le"])
        if best < bound <= le:
            best, value = bound, v
    return value


# ------------------------------------------------------------------------------------------------ Celery traffic


@pytest.fixture
def celery_stack(
    redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> Iterator[tuple[Stack, int]]:
    proxy, mport = start_metrics_proxy(redis_server, start_proxy)
    stack = Stack(redis_server, proxy, tmp_path)
    try:
        yield stack, mport
    finally:
        # The proxy and Redis belong to their fixtures; workers and apps are ours.
        for w in stack.workers:
            w.kill()
        gc.collect()  # Celery's AsyncResult.__del__ needs the backend: run it while Redis still answers
        for a in stack.apps:
            a.close()


def test_celery_traffic(celery_stack: tuple[Stack, int]) -> None:
    stack, mport = celery_stack
    try:
        _celery_traffic(stack, mport)
    except Exception as exc:  # a failed check or a result that never came: show the workers' and proxy's logs
        raise AssertionError(f"{type(exc).__name__}: {exc}\n{stack.diag()}") from exc


def _celery_traffic(stack: Stack, mport: int) -> None:
    app = stack.app()
    broker = stack.broker()
    state = stack.state()
    published: collections.Counter[tuple[str, str]] = collections.Counter()  # (task, queue) -> messages sent
    results: list[Any] = []
    boom: list[Any] = []

    def send(name: str, args: tuple[Any, ...], queue: str, **options: Any) -> Any:
        r = T(app, name).apply_async(args, queue=queue, **options)
        published[(f"e2e.{name}", queue)] += 1
        return r

    # ---- phase A: publish with no worker running (depth = LLEN, priorities summed)
    for i in range(5):
        results.append(send("add", (i, 1), "alpha"))
    for i in range(4):
        results.append(send("mul", (i, 2), "beta", priority=7 if i % 2 else 0))
    for i in range(3):
        results.append(send("add", (i, 2), "celery"))
    boom += [send("boom", ("kaboom",), "celery") for _ in range(2)]
    flaky_key = f"flaky:{uuid.uuid4().hex}"
    flaky = send("flaky", (flaky_key, 2), "alpha")  # fails twice (RETRY, RETRY), then SUCCESS
    prio_key = "prio:order"
    for priority in (9, 9, 9, 5, 5, 0, 0):
        results.append(send("record", (prio_key,), "prio", priority=priority))
    published_at = time.monotonic()
    by_queue = collections.Counter[str]()
    for (_, queue), n in published.items():
        by_queue[queue] += n
    assert by_queue == {"alpha": 6, "beta": 4, "celery": 5, "prio": 7}
    # The priorities really went to sub-queues (else the depth check below proves nothing about summing).
    assert broker.llen("prio\x06\x169") == 3 and broker.llen("prio\x06\x165") == 2 and broker.llen("prio") == 2
    assert broker.llen("beta\x06\x167") == 2 and broker.llen("beta") == 2

    time.sleep(3 * POLL)  # at least one LLEN poll since the last push
    s = Scrape(mport)
    assert s.by("brokerproxy_queue_messages_published_total", "queue") == dict(by_queue)
    assert s.by("brokerproxy_tasks_published_total", "task", "queue") == dict(published)
    assert s.nonzero("brokerproxy_queue_messages_consumed_total", "queue") == {}
    assert s.nonzero("brokerproxy_queue_messages_redelivered_total", "queue") == {}
    truth = llen_by_queue(broker)
    assert {q: truth.get(q, 0) for q in by_queue} == dict(by_queue)
    assert s.by("brokerproxy_queue_depth", "queue") == {q: truth[q] for q in by_queue}
    assert s.by("brokerproxy_queue_message_bytes_count", "queue") == dict(by_queue)
    assert s.nonzero("brokerproxy_task_results_total", "task", "state") == {}

    # ---- phase B: one worker runs everything (successes, failures, retries)
    worker_started = time.monotonic()
    w1 = stack.worker("celery,alpha,beta,prio,drain", concurrency=2, prefix="m1").wait_ready(app)
    for r in results:
        r.get(timeout=TIMEOUT)
    for r in boom:
        with pytest.raises(ValueError, match="kaboom"):
            r.get(timeout=TIMEOUT)
    assert flaky.get(timeout=TIMEOUT) == 3
    assert int(state.get(flaky_key) or 0) == 3
    published[("e2e.flaky", "alpha")] += 2  # the retries are new messages on the task's queue
    by_queue["alpha"] += 2
    assert state.llen(prio_key) == 7

    ran: collections.Counter[str] = collections.Counter()  # executions (STARTED) per task
    outcome: collections.Counter[tuple[str, str]] = collections.Counter()  # (task, final state)
    for (task, _), n in published.items():
        if task == "e2e.flaky":
            continue
        ran[task] += n
        outcome[(task, "FAILURE" if task == "e2e.boom" else "SUCCESS")] += n
    ran["e2e.flaky"] += 3
    outcome[("e2e.flaky", "RETRY")] += 2
    outcome[("e2e.flaky", "SUCCESS")] += 1

    def expected_results() -> dict[tuple[str, str], int]:
        out = dict(outcome)
        for task, n in ran.items():
            out[(task, "STARTED")] = n
        return out

    def runtime_counts() -> dict[str, int]:
        # One runtime per attempt that ended: SUCCESS, FAILURE, RETRY (not STARTED).
        out: collections.Counter[str] = collections.Counter()
        for (task, _), n in outcome.items():
            out[task] += n
        return dict(out)

    def queues_idle() -> Scrape | None:
        # The worker's consumer sits in BRPOP on every queue it serves (re-issued every second).
        sc = Scrape(mport)
        consumers = sc.by("brokerproxy_queue_consumers", "queue")
        return sc if all(consumers.get(q) == 1 for q in ("celery", "alpha", "beta", "prio", "drain")) else None

    # A queue the worker consumes has its series (zeros included) from its first BRPOP on: compare what is nonzero.
    wait_until("the worker to block in BRPOP on its queues", queues_idle, 10)
    time.sleep(3 * POLL)
    s = Scrape(mport)
    assert s.nonzero("brokerproxy_queue_messages_published_total", "queue") == dict(by_queue)
    assert s.by("brokerproxy_tasks_published_total", "task", "queue") == dict(published)
    assert s.nonzero("brokerproxy_queue_messages_consumed_total", "queue") == dict(by_queue)
    assert s.nonzero("brokerproxy_queue_wait_seconds_count", "queue") == dict(by_queue)
    assert s.nonzero("brokerproxy_queue_message_bytes_count", "queue") == dict(by_queue)
    # Every phase-A message on beta and prio sat in Redis at least until the worker was started.
    gap = worker_started - published_at
    assert gap > 0.5
    for q in ("beta", "prio"):
        assert bucket(s, "brokerproxy_queue_wait_seconds", gap, queue=q) == 0, (q, gap, s.text)
        assert s.get("brokerproxy_queue_wait_seconds_sum", queue=q) >= by_queue[q] * gap
    assert s.nonzero("brokerproxy_task_results_total", "task", "state") == expected_results()
    assert s.by("brokerproxy_task_runtime_seconds_count", "task") == runtime_counts()
    truth = llen_by_queue(broker)
    assert {q: truth.get(q, 0) for q in by_queue} == dict.fromkeys(by_queue, 0)
    assert s.by("brokerproxy_queue_depth", "queue") == {**dict.fromkeys(by_queue, 0), "drain": 0}
    commands = s.by("brokerproxy_commands_total", "command", "outcome")
    assert commands.get(("brpop", "ok"), 0) > 0 and commands.get(("lpush", "ok"), 0) > 0, commands

    # ---- phase C: warm shutdown with acks_late tasks reserved (ETA), restored with "redelivered" set
    drain_key = "drain:done"
    slow = send("sleepy", (1.5, drain_key), "drain")
    etas = [send("record", (drain_key,), "drain", countdown=6) for _ in range(4)]
    wait_until("the worker to hold every drain message", lambda: broker.hlen("unacked") == 5)
    assert w1.terminate(timeout=60) == 0
    restored = broker.lrange("drain", 0, -1)
    redelivered = [m for m in restored if json.loads(m)["properties"]["delivery_info"].get("redelivered")]
    assert len(redelivered) == len(restored) == len(etas), "test setup: the warm shutdown did not restore the ETAs"
    assert [x.decode() for x in state.lrange(drain_key, 0, -1)] == [slow.id]
    ran["e2e.sleepy"] += 1
    outcome[("e2e.sleepy", "SUCCESS")] += 1
    by_queue["drain"] = 1 + 2 * len(etas)  # published: five sends and four restores

    def no_consumers() -> Scrape | None:
        sc = Scrape(mport)
        return None if sc.nonzero("brokerproxy_queue_consumers", "queue") else sc

    s = wait_until("the stopped worker's pops to end", no_consumers, 10)
    assert s.get("brokerproxy_queue_messages_redelivered_total", queue="drain") == len(redelivered)
    assert s.get("brokerproxy_queue_messages_published_total", queue="drain") == by_queue["drain"]
    assert s.get("brokerproxy_queue_messages_consumed_total", queue="drain") == 5
    assert s.get("brokerproxy_tasks_published_total", task="e2e.record", queue="drain") == 2 * len(etas)
    time.sleep(3 * POLL)
    s = Scrape(mport)
    assert s.get("brokerproxy_queue_depth", queue="drain") == llen_by_queue(broker)["drain"] == len(etas)

    # ---- phase D: a second worker runs what was restored
    stack.worker("drain", concurrency=2, prefix="m2").wait_ready(app)
    for r in etas:
        assert r.get(timeout=TIMEOUT)
    ran["e2e.record"] += len(etas)
    outcome[("e2e.record", "SUCCESS")] += len(etas)
    published[("e2e.record", "drain")] += len(etas)  # the restores are pushes of the same task messages
    time.sleep(3 * POLL)
    s = Scrape(mport)
    assert s.nonzero("brokerproxy_queue_messages_published_total", "queue") == dict(by_queue)
    assert s.nonzero("brokerproxy_queue_messages_consumed_total", "queue") == dict(by_queue)
    assert s.nonzero("brokerproxy_queue_wait_seconds_count", "queue") == dict(by_queue)
    assert s.nonzero("brokerproxy_queue_messages_redelivered_total", "queue") == {"drain": len(etas)}
    assert s.by("brokerproxy_tasks_published_total", "task", "queue") == dict(published)
    assert s.nonzero("brokerproxy_task_results_total", "task", "state") == expected_results()
    assert s.by("brokerproxy_task_runtime_seconds_count", "task") == runtime_counts()
    assert s.get("brokerproxy_task_runtime_seconds_sum", task="e2e.sleepy") >= 1.5
    assert s.get("brokerproxy_queue_depth", queue="drain") == llen_by_queue(broker).get("drain", 0) == 0
    assert s.nonzero("brokerproxy_messages_requeued_total", "queue") == {}  # no client went away mid-pop


# ------------------------------------------------------------------------------------------------ health


def test_health_readiness_and_proxy_counters(
    redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]
) -> None:
    proxy, mport = start_metrics_proxy(redis_server, start_proxy)
    assert http_get(mport, "/healthz")[::2] == (200, b"ok\n")
    wait_until("/readyz 200", lambda: http_get(mport, "/readyz")[0] == 200, 5)
    assert http_get(mport, "/readyz")[::2] == (200, b"ready\n")

    s = Scrape(mport)
    assert s.get("brokerproxy_upstream_up") == 1
    assert s.get("brokerproxy_build_info", version=__version__) == 1
    listeners = s.by("brokerproxy_client_connections", "listener")
    base = sum(listeners.values())

    # Connection gauge: five clients in, then out.
    clients = [proxy.client() for _ in range(5)]
    for c in clients:
        assert c.ping()
    s = Scrape(mport)
    assert sum(s.by("brokerproxy_client_connections", "listener").values()) == base + 5
    assert sum(s.by("brokerproxy_client_connections_total", "listener").values()) >= 5
    for c in clients:
        c.close()
    wait_until(
        "the connection gauge to drop back",
        lambda: sum(Scrape(mport).by("brokerproxy_client_connections", "listener").values()) == base,
        5,
    )

    # Command outcomes: ok, error (an error reply from Redis), and a command outside the table.
    c = proxy.client()
    assert c.set("metrics:s", "not a number")
    for _ in range(7):
        assert c.echo("hi") == b"hi"
    for _ in range(3):
        with pytest.raises(redis.ResponseError):
            c.execute_command("INCR", "metrics:s")  # redis-py's incr() sends INCRBY
    with pytest.raises(redis.ResponseError):
        c.execute_command("NOSUCHCOMMAND", "x")
    s = Scrape(mport)
    commands = s.by("brokerproxy_commands_total", "command", "outcome")
    assert commands[("echo", "ok")] == 7
    assert commands[("incr", "error")] == 3
    assert commands.get(("incr", "ok"), 0) == 0
    assert commands[("set", "ok")] == 1
    assert sum(n for (name, _), n in commands.items() if name == "unknown") == 1, commands
    assert not any("nosuch" in name.lower() for name, _ in commands)
    c.close()

    # OpenMetrics when asked for.
    accept = {"Accept": "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"}
    status, headers, body = http_get(mport, "/metrics", accept)
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text"), headers
    assert body.endswith(b"# EOF\n")
    families = {f.name: f for f in parse_openmetrics(body.decode())}
    assert families["brokerproxy_upstream_up"].samples[0].value == 1
    assert families["brokerproxy_commands"].type == "counter"

    # Redis goes away: /readyz says so (one line) within a few poll intervals; /healthz does not care.
    redis_server.stop()
    t0 = time.monotonic()
    wait_until("/readyz 503", lambda: http_get(mport, "/readyz")[0] == 503, 10 * POLL, 0.02)
    flipped = time.monotonic() - t0
    status, headers, body = http_get(mport, "/readyz")
    assert status == 503
    assert body.endswith(b"\n") and body.count(b"\n") == 1 and body.strip(), body
    assert headers["content-type"].startswith("text/plain")
    assert http_get(mport, "/healthz")[::2] == (200, b"ok\n")
    assert Scrape(mport).get("brokerproxy_upstream_up") == 0
    assert flipped < 10 * POLL

    # ... and comes back.
    redis_server.start()
    t0 = time.monotonic()
    wait_until("/readyz 200 again", lambda: http_get(mport, "/readyz")[0] == 200, 10 * POLL, 0.02)
    assert time.monotonic() - t0 < 10 * POLL
    assert http_get(mport, "/readyz")[::2] == (200, b"ready\n")
    assert Scrape(mport).get("brokerproxy_upstream_up") == 1
    assert proxy.client().ping()


# ------------------------------------------------------------------------------------------------ cardinality


def envelope(queue: str, task: str) -> bytes:
    """A kombu/Celery protocol-2 message as kombu's Redis transport pushes it (json.dumps' default separators)."""
    tid = str(uuid.uuid4())
    body = base64.b64encode(json.dumps([[1, 2], {}, {"callbacks": None}]).encode()).decode()
    return json.dumps(
        {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": task, "id": tid, "shadow": None, "retries": 0, "root_id": tid},
            "properties": {
                "correlation_id": tid,
                "reply_to": str(uuid.uuid4()),
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    ).encode()


def test_label_cardinality_bound(redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]) -> None:
    max_queues, max_tasks, n = 40, 30, 10_000
    config = CONFIG + f"max_queues = {max_queues}\nmax_tasks = {max_tasks}\n"
    proxy, mport = start_metrics_proxy(redis_server, start_proxy, config)
    c = proxy.client()
    # Plain values on lists are not queue messages: they must not spend the label budget.
    pipe = c.pipeline(transaction=False)
    for i in range(100):
        pipe.lpush(f"plain:{i}", "value")
    pipe.execute()
    for start in range(0, n, 1000):
        pipe = c.pipeline(transaction=False)
        for i in range(start, start + 1000):
            pipe.lpush(f"card:{i}", envelope(f"card:{i}", f"card.task{i}"))
        assert pipe.execute() == [1] * 1000
    c.close()

    t0 = time.monotonic()
    s = Scrape(mport)
    scrape_seconds = time.monotonic() - t0
    queues = s.by("brokerproxy_queue_messages_published_total", "queue")
    assert len(queues) <= max_queues + 1, len(queues)
    assert "other" in queues
    assert not any(q.startswith("plain:") for q in queues)
    assert sum(queues.values()) == n
    for name in (
        "brokerproxy_queue_messages_consumed_total",
        "brokerproxy_queue_consumers",
        "brokerproxy_queue_message_bytes_count",
        "brokerproxy_messages_requeued_total",
    ):
        assert set(s.by(name, "queue")) <= set(queues), name
    assert sum(s.by("brokerproxy_queue_message_bytes_count", "queue").values()) == n
    assert len(s.by("brokerproxy_queue_depth", "queue")) <= max_queues
    tasks = s.by("brokerproxy_tasks_published_total", "task", "queue")
    assert len({t for t, _ in tasks}) <= max_tasks + 1
    assert sum(tasks.values()) == n
    assert scrape_seconds < 2.0
    # The proxy still answers and serves a sane exposition.
    assert proxy.client().ping()
    assert len(s.text) < 1_000_000
