"""--workers N with real processes: a supervisor, N workers on one port (SO_REUSEPORT), a real redis-server.

What is checked against what: connections and commands the test made against the supervisor's /metrics (the sum)
and each worker's own private endpoint (the parts, found from the supervisor's "worker started" log lines); process
ids from the logs against /proc; a kill -9 against the restart counter and the readiness flip; SIGHUP against a user
that exists only in the reloaded file, logged in on every worker; SIGTERM against blocked pops and a command in
flight; the supervisor's own death against its workers' exit.
"""

from __future__ import annotations

import collections
import gc
import http.client
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from brokerproxy.config import usable_cpus
from tests.conftest import ProxyProcess, RedisServer, free_port, freeze_in_transaction
from tests.integration.test_celery_e2e import TIMEOUT, Stack, T
from tests.tls_pki import Pki
from tests.unit.test_metrics import message

StartProxy = Callable[..., ProxyProcess]
#: Two interpreters importing brokerproxy at once take about 1.5 s on the 2-core machine; leave room for a loaded one.
START_TIMEOUT = 30.0


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Scrape:
    """One /metrics (text format), as {(sample name, sorted labels): value}."""

    def __init__(self, port: int) -> None:
        status, self.text = http_get(port, "/metrics")
        assert status == 200, self.text
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(self.text):
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, default: float | None = None, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        if key not in self.samples:
            assert default is not None, f"no {key} in the scrape"
            return default
        return self.samples[key]

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(labels), v) for (n, labels), v in self.samples.items() if n == name]


class Group:
    """A supervisor and its workers, as started by ``python -m brokerproxy --workers N``."""

    def __init__(self, proxy: ProxyProcess, metrics_port: int) -> None:
        self.proxy = proxy
        self.metrics_port = metrics_port

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def proc(self) -> Any:
        return self.proxy.proc

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.proxy.logs().splitlines() if line.startswith("{")]

    def workers(self) -> dict[int, dict[str, Any]]:
        """Slot -> the latest "worker started" line of the supervisor (pid, metrics_port)."""
        out: dict[int, dict[str, Any]] = {}
        for e in self.events():
            if e["event"] == "worker started" and e["logger"] == "brokerproxy.supervisor":
                out[e["worker"]] = e
        return out

    def starts(self, index: int) -> int:
        return sum(1 for e in self.events() if e["event"] == "worker started" and e["worker"] == index)

    def scrape(self) -> Scrape:
        return Scrape(self.metrics_port)

    def scrape_worker(self, index: int) -> Scrape:
        return Scrape(self.workers()[index]["metrics_port"])

    def ready(self) -> tuple[int, str]:
        return http_get(self.metrics_port, "/readyz")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def ok() -> bool:
            assert self.proc.poll() is None, f"the supervisor exited with {self.proc.returncode}:\n{self.proxy.logs()}"
            try:
                return self.ready()[0] == 200
            except OSError:
                return False

        wait_until(ok, timeout, "/readyz 200")

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        pids = [w["pid"] for w in self.workers().values()]
        rc = self.proxy.stop(sig, timeout)
        wait_until(lambda: not any(pid_alive(p) for p in pids), 10, "every worker gone")
        return rc


@pytest.fixture
def start_group(start_proxy: StartProxy, redis_server: RedisServer) -> Iterator[Callable[..., Group]]:
    groups: list[Group] = []

    def start(*args: str, workers: str = "2", config: str | None = None, wait: bool = True,
              upstream: str | None = None) -> Group:  # fmt: skip
        mport = free_port()
        proxy = start_proxy(
            upstream or redis_server.url(), "--workers", workers, "--metrics-listen", f"127.0.0.1:{mport}", *args,
            config=config, wait=False,
        )  # fmt: skip
        g = Group(proxy, mport)
        groups.append(g)
        if wait:
            g.wait_ready()
        return g

    yield start
    for g in groups:  # what a test left running stops the proper way, and no worker outlives the test
        pids = [w["pid"] for w in g.workers().values()]
        if g.proc.poll() is None:
            g.proc.send_signal(signal.SIGTERM)
            g.proc.wait(30)
        wait_until(lambda pids=pids: not any(pid_alive(p) for p in pids), 15, "workers gone after the test")


def connect_many(g: Group, n: int, **kw: Any) -> list[redis.Redis]:
    """n clients, each with one connection made and a PING answered (so each is a connection the proxy counted)."""
    clients = []
    for _ in range(n):
        c = g.client(single_connection_client=True, **kw)
        assert c.ping()
        clients.append(c)
    return clients


# ------------------------------------------------------------------------------------------------ serving and metrics


def test_two_workers_share_the_port_and_metrics_add_up(start_group: Callable[..., Group]) -> None:
    g = start_group()
    workers = g.workers()
    assert sorted(workers) == [0, 1]
    pids = {w["pid"] for w in workers.values()}
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    for pid in pids:  # real processes of their own, children of the supervisor
        with open(f"/proc/{pid}/stat") as fh:
            assert int(fh.read().rsplit(")", 1)[1].split()[1]) == g.proc.pid

    n = 40
    clients = connect_many(g, n)
    for i, c in enumerate(clients):
        assert c.set(f"k{i}", i)
        assert c.get(f"k{i}") == str(i).encode()
    total = g.scrape()
    parts = [g.scrape_worker(i) for i in (0, 1)]
    # The kernel spread the connections over both workers (40 connections on one would happen 2 in 10^12 runs).
    per_worker = [p.get("brokerproxy_client_connections_total", 0, listener="main") for p in parts]
    assert all(x > 0 for x in per_worker), per_worker
    assert sum(per_worker) == n
    assert total.get("brokerproxy_client_connections_total", listener="main") == n
    assert total.get("brokerproxy_client_connections", listener="main") == n
    for cmd in ("set", "get", "ping"):
        assert total.get("brokerproxy_commands_total", command=cmd, outcome="ok") == n, cmd
        assert total.get("brokerproxy_command_duration_seconds_count", command=cmd) == n, cmd
        assert total.get("brokerproxy_commands_total", command=cmd, outcome="ok") == sum(
            p.get("brokerproxy_commands_total", 0, command=cmd, outcome="ok") for p in parts
        )
    # Histograms bucket by bucket, bytes, upstream connections: the sum of the parts.
    for (name, labels), value in total.samples.items():
        if name.startswith(("brokerproxy_command_duration_seconds", "brokerproxy_client_bytes_total")) or name in (
            "brokerproxy_upstream_connections",
        ):
            assert value == pytest.approx(sum(p.samples.get((name, labels), 0.0) for p in parts)), (name, labels)
    assert total.get("brokerproxy_upstream_connections") == n
    assert total.get("brokerproxy_workers") == 2
    assert total.get("brokerproxy_worker_restarts_total") == 0
    assert total.get("brokerproxy_upstream_up") == 1
    assert len(total.series("brokerproxy_build_info")) == 1
    assert total.get("process_open_fds") > sum(p.get("process_open_fds") for p in parts)  # the supervisor's too
    status, body = http_get(g.metrics_port, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and body.endswith("# EOF\n")
    list(parse_openmetrics(body))

    # The status page's numbers are the group's.
    code, text = http_get(g.metrics_port, "/api/status")
    assert code == 200
    page = json.loads(text)
    assert page["connections"]["open"] == n
    assert page["connections"]["clients"] == [{"user": "default", "listener": "main", "count": n}]
    assert page["commands"]["ok"] >= 3 * n
    assert page["upstream"]["ready"] is True and page["upstream"]["up"] is True
    code, html = http_get(g.metrics_port, "/")
    assert code == 200 and "<html" in html.lower()
    assert g.ready() == (200, "ready\n")
    assert http_get(g.metrics_port, "/healthz") == (200, "ok\n")

    for c in clients:
        c.close()
    wait_until(lambda: g.scrape().get("brokerproxy_client_connections", listener="main") == 0, what="gauge at 0")
    assert g.stop() == 0


def test_a_lost_reply_resets_the_clients_subscribers_in_every_worker(
    start_group: Callable[..., Group], redis_server: RedisServer
) -> None:
    """The kernel spreads a client's connections over the workers: the one that lost a reply (a Celery worker's ack,
    when Redis died) is seldom in the worker that holds the client's subscription, whose closing makes kombu restart
    its consumer (see test_reattach.py). Each worker tells the others, through the supervisor."""
    g = start_group()
    subscribers: list[socket.socket] = []

    def per_worker() -> list[float]:
        return [g.scrape_worker(i).get("brokerproxy_client_connections", 0, listener="main") for i in (0, 1)]

    while not all(per_worker()):  # until both workers hold a subscriber (one more each time: 1 in 2 stays put)
        assert len(subscribers) < 40, per_worker()
        s = socket.create_connection(("127.0.0.1", g.port), timeout=15)
        s.sendall(b"SUBSCRIBE news\r\n")
        assert s.recv(100) == b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
        subscribers.append(s)
    lost = socket.create_connection(("127.0.0.1", g.port), timeout=15)
    freeze_in_transaction(lost, redis_server)
    lost.sendall(b"EXEC\r\n")  # owed when Redis dies, as a kombu ack's: closed, the transaction cut
    time.sleep(0.3)
    redis_server.stop(signal.SIGKILL)
    assert lost.recv(100) == b""
    redis_server.start()
    for s in subscribers:  # carried over the outage, then closed once Redis is back: in both workers
        assert s.recv(100) == b""
        s.close()
    lost.close()
    resets = g.scrape().get("brokerproxy_upstream_reattach_resets_total", state="subscribed")
    assert resets == len(subscribers)


def test_workers_auto_is_one_per_usable_cpu(start_group: Callable[..., Group]) -> None:
    cpus = usable_cpus()
    g = start_group(workers="auto")
    assert g.client().ping()
    if cpus == 1:  # one CPU: auto means the single process, no supervisor
        assert "brokerproxy_workers" not in g.scrape().text
    else:
        assert g.scrape().get("brokerproxy_workers") == cpus
        assert sorted(g.workers()) == list(range(cpus))
    assert g.stop() == 0


def test_tls_listener_is_shared_too(start_group: Callable[..., Group], tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    tls_port = free_port()
    g = start_group(config=f'tls_listen = "127.0.0.1:{tls_port}"\n' + pki.server_toml())
    clients = []
    for _ in range(30):
        c = redis.Redis(host="localhost", port=tls_port, ssl=True, ssl_ca_certs=str(pki.ca_file), socket_timeout=10)
        assert c.ping()
        clients.append(c)
    per_worker = [g.scrape_worker(i).get("brokerproxy_client_connections_total", 0, listener="tls") for i in (0, 1)]
    assert all(x > 0 for x in per_worker) and sum(per_worker) == 30, per_worker
    assert g.scrape().get("brokerproxy_client_connections_total", listener="tls") == 30
    for c in clients:
        c.close()
    assert g.stop() == 0


def test_celery_through_two_workers(
    start_group: Callable[..., Group], redis_server: RedisServer, tmp_path: Path
) -> None:
    """Queue depth is every worker's LLEN of the same list: the group shows it once, not once per worker. Then Celery
    as is: a producer and a prefork worker through the group, every count on /metrics what they did."""
    g = start_group(config="[metrics]\ndepth_poll_interval = 0.2\n")
    pushers = connect_many(g, 20)
    for c in pushers:
        c.lpush("alpha", message("e2e.add", str(uuid.uuid4()), str(uuid.uuid4())))
    seen = [g.scrape_worker(i).get("brokerproxy_queue_messages_published_total", 0, queue="alpha") for i in (0, 1)]
    assert all(x > 0 for x in seen) and sum(seen) == 20, seen  # both workers poll the queue's depth
    time.sleep(0.6)
    s = g.scrape()
    assert s.get("brokerproxy_queue_messages_published_total", queue="alpha") == 20
    assert s.get("brokerproxy_queue_depth", queue="alpha") == redis_server.client().llen("alpha") == 20
    redis_server.client().delete("alpha")
    wait_until(lambda: g.scrape().get("brokerproxy_queue_depth", queue="alpha") == 0, 5, "depth 0 after DEL")
    for c in pushers:
        c.close()

    stack = Stack(redis_server, g.proxy, tmp_path)
    try:
        app = stack.app()
        results = [T(app, "add").apply_async((i, i), queue="celery") for i in range(20)]
        stack.worker("celery", concurrency=2, prefix="wk").wait_ready(app)
        assert [r.get(timeout=TIMEOUT) for r in results] == [2 * i for i in range(20)]

        def successes(sc: Scrape) -> dict[str, float]:
            return {
                lab["task"]: v for lab, v in sc.series("brokerproxy_task_results_total") if lab["state"] == "SUCCESS"
            }

        def counted() -> Scrape | None:
            sc = g.scrape()
            done = sum(successes(sc).values()) == 20
            return sc if done and sc.get("brokerproxy_queue_messages_consumed_total", 0, queue="celery") == 20 else None

        s = wait_until(counted, 10, "every task counted")
        # A result is named after its task by the proxy process that saw the task's message; when the worker's result
        # backend connection landed on the other process, the result counts under "unknown" (the total is exact).
        assert set(successes(s)) <= {"e2e.add", "unknown"}
        assert s.get("brokerproxy_queue_messages_published_total", queue="celery") == 20
        assert s.get("brokerproxy_tasks_published_total", task="e2e.add", queue="celery") == 20
        assert s.get("brokerproxy_queue_message_bytes_count", queue="celery") == 20
        assert s.get("brokerproxy_queue_consumers", queue="celery") == 1  # the worker's one BRPOP, on one worker
        # Depth: the worker that saw the pushes holds 20 until its next LLEN poll (the max errs high by what was
        # consumed since a worker's last poll, at most one depth_poll_interval).
        wait_until(lambda: g.scrape().get("brokerproxy_queue_depth", queue="celery") == 0, 2, "depth 0 after a poll")
        code, text = http_get(g.metrics_port, "/api/status?history=0")
        assert code == 200
        (celery,) = [q for q in json.loads(text)["queues"] if q["name"] == "celery"]
        assert (celery["published"], celery["consumed"], celery["depth"]) == (20, 20, 0)
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}\n{stack.diag()}") from exc
    finally:
        for w in stack.workers:
            w.kill()
        gc.collect()
        for a in stack.apps:
            a.close()
    assert g.stop() == 0


# ------------------------------------------------------------------------------------------------ restarts


def test_a_killed_worker_is_restarted_counted_and_its_counters_kept(
    start_group: Callable[..., Group], redis_server: RedisServer
) -> None:
    g = start_group()
    clients = connect_many(g, 20, retry=Retry(NoBackoff(), 0))
    victim = g.workers()[0]
    on_victim = g.scrape_worker(0).get("brokerproxy_client_connections_total", listener="main")
    before = g.scrape()  # the supervisor's last view of the victim's counters
    assert before.get("brokerproxy_client_connections_total", listener="main") == 20

    os.kill(victim["pid"], signal.SIGKILL)
    seen_not_ready = set()

    def restarted() -> bool:
        code, body = g.ready()
        if code != 200:
            seen_not_ready.add(body.strip())
        return g.starts(0) == 2 and code == 200

    wait_until(restarted, START_TIMEOUT, "worker 0 restarted and the group ready")
    assert any("worker 0" in reason for reason in seen_not_ready), seen_not_ready
    assert not pid_alive(victim["pid"])
    new = g.workers()[0]
    assert new["pid"] != victim["pid"] and pid_alive(new["pid"])
    exited = [e for e in g.events() if e["event"] == "worker exited; restarting it"]
    assert len(exited) == 1 and exited[0]["signal"] == "SIGKILL" and exited[0]["worker"] == 0

    # The clients of the dead worker lost their connection (a clean error, never a hang) and reconnect.
    failed = 0
    for c in clients:
        try:
            assert c.ping()
        except redis.ConnectionError:
            failed += 1
            assert c.ping()  # the next command reconnects
    assert failed == on_victim
    after = g.scrape()
    assert after.get("brokerproxy_worker_restarts_total") == 1
    assert after.get("brokerproxy_workers") == 2
    # The victim's connections stay counted (no counter of the group goes down), plus the reconnections.
    assert after.get("brokerproxy_client_connections_total", listener="main") == 20 + on_victim
    assert after.get("brokerproxy_client_connections", listener="main") == 20
    for (name, labels), value in before.samples.items():
        if name.endswith("_total") and name.startswith("brokerproxy_"):
            assert after.samples.get((name, labels), 0) >= value, (name, labels)
    assert redis_server.client().dbsize() == 0  # nothing odd reached Redis
    assert g.stop() == 0


def test_sighup_reaches_every_worker(start_group: Callable[..., Group], tmp_path: Path) -> None:
    users = '[[users]]\nname = "alice"\npasswords = ["a-secret"]\n'
    path = tmp_path / "users.toml"
    path.write_text(users)
    g = start_group("--config", str(path))
    with pytest.raises(redis.AuthenticationError):
        g.client(username="bob", password="b-secret", retry=Retry(NoBackoff(), 0)).ping()
    path.write_text(users + '[[users]]\nname = "bob"\npasswords = ["b-secret"]\n')
    g.proc.send_signal(signal.SIGHUP)

    def reloaded() -> set[int]:
        done = {e.get("worker") for e in g.events() if e["event"] == "reloaded users and rules"}
        return done if done >= {0, 1} else set()

    wait_until(reloaded, 10, "both workers reloaded")
    before = [g.scrape_worker(i).get("brokerproxy_client_connections_total", 0, listener="main") for i in (0, 1)]
    bobs = connect_many(g, 30, username="bob", password="b-secret")
    after = [g.scrape_worker(i).get("brokerproxy_client_connections_total", 0, listener="main") for i in (0, 1)]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)  # bob logged in on both
    assert g.scrape().get("brokerproxy_auth_failures_total") == 1  # the one before the reload
    for c in bobs:
        c.close()
    assert g.stop() == 0


# ------------------------------------------------------------------------------------------------ stopping


def test_sigterm_drains_every_worker_and_exits_0(start_group: Callable[..., Group], redis_server: RedisServer) -> None:
    g = start_group()
    results: dict[str, Any] = collections.defaultdict(list)

    def blocked_pop() -> None:
        results["pops"].append(g.client(protocol=3).brpop(["jobs"], timeout=0))

    sleepers = connect_many(g, 4, retry=Retry(NoBackoff(), 0))  # connected first: their sleeps are all in flight

    def slow_command(c: redis.Redis) -> None:
        try:
            results["sleeps"].append(c.execute_command("DEBUG", "SLEEP", "0.2"))
        except Exception as exc:
            results["sleeps"].append(exc)

    pops = [threading.Thread(target=blocked_pop) for _ in range(8)]
    for t in pops:
        t.start()
    wait_until(lambda: redis_server.client().execute_command("CLIENT", "LIST").decode().count("cmd=brpop") == 8)
    per_worker = [g.scrape_worker(i).get("brokerproxy_client_connections", 0, listener="main") for i in (0, 1)]
    assert all(x > 0 for x in per_worker), per_worker  # blocked pops on both workers
    sleeps = [threading.Thread(target=slow_command, args=(c,)) for c in sleepers]
    for t in sleeps:
        t.start()
    time.sleep(0.1)  # the sleeps are in Redis now (one runs, three wait their turn)
    pids = [w["pid"] for w in g.workers().values()]
    started = time.monotonic()
    g.proc.send_signal(signal.SIGTERM)
    for t in pops + sleeps:
        t.join(10)
    assert g.proc.wait(15) == 0
    assert time.monotonic() - started < 5
    assert results["sleeps"] == [b"OK"] * 4  # in flight: finished and answered
    assert results["pops"] == [None] * 8  # blocked: ended as timeouts, nothing taken
    redis_server.client().lpush("jobs", "after")
    assert redis_server.client().lrange("jobs", 0, -1) == [b"after"]
    wait_until(lambda: not any(pid_alive(p) for p in pids), 5, "workers gone")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", g.port), timeout=1)
    events = g.events()
    stopped = [e for e in events if e["event"] == "stopped"]
    assert sorted(e.get("worker", -1) for e in stopped) == [-1, 0, 1]  # both workers and the supervisor
    assert all(e["clean"] for e in stopped)
    assert [e["event"] for e in events if "worker" not in e][-1] == "stopped"


def test_a_drain_past_its_bound_exits_4(start_group: Callable[..., Group]) -> None:
    g = start_group("--drain-timeout", "1")
    outcome: list[BaseException] = []

    def sleep_past_the_bound() -> None:
        try:
            g.client(retry=Retry(NoBackoff(), 0)).execute_command("DEBUG", "SLEEP", "4")
        except redis.ConnectionError as exc:
            outcome.append(exc)  # expected: the worker closes it at its bound

    slow = threading.Thread(target=sleep_past_the_bound)
    slow.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert g.stop() == 4
    assert time.monotonic() - started < 3.5  # the bound, not the sleep
    slow.join(10)
    assert len(outcome) == 1


def test_sigint_is_forwarded_once_and_a_second_one_exits_at_once(start_group: Callable[..., Group]) -> None:
    """Ctrl-C reaches the supervisor alone (the workers run in sessions of their own): it forwards it, once; a second
    one is forwarded too and the workers stop at once, as a single process does (exit 130)."""
    g = start_group()
    assert g.client().ping()
    assert g.stop(signal.SIGINT) == 0
    signals = [e for e in g.events() if e["event"] == "shutdown requested"]
    assert sorted(e.get("worker", -1) for e in signals) == [0, 1]  # each worker once (the supervisor logs its own)

    g = start_group()
    busy: list[BaseException] = []

    def sleep_through() -> None:
        try:
            g.client(retry=Retry(NoBackoff(), 0)).execute_command("DEBUG", "SLEEP", "5")
        except redis.ConnectionError as exc:
            busy.append(exc)  # expected: the worker exits under it

    slow = threading.Thread(target=sleep_through)
    slow.start()
    time.sleep(0.3)
    started = time.monotonic()
    g.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    g.proc.send_signal(signal.SIGINT)
    assert g.proc.wait(10) == 130
    assert time.monotonic() - started < 3
    slow.join(10)
    assert len(busy) == 1


def test_workers_stop_when_the_supervisor_is_killed(start_group: Callable[..., Group]) -> None:
    g = start_group()
    pids = [w["pid"] for w in g.workers().values()]
    idle = g.client()
    assert idle.ping()
    g.proc.send_signal(signal.SIGKILL)
    g.proc.wait(5)
    wait_until(lambda: not any(pid_alive(p) for p in pids), 10, "workers gone after the supervisor")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", g.port), timeout=1)
    stopped = [e for e in g.events() if e["event"] == "shutdown requested"]
    assert sorted(e["worker"] for e in stopped) == [0, 1]
    assert {e["signal"] for e in stopped} == {"supervisor exited"}


def test_a_worker_that_cannot_listen_fails_the_start(start_group: Callable[..., Group]) -> None:
    # The port is taken by a socket without SO_REUSEPORT: no worker can bind it, and the supervisor gives up.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        g = start_group("--listen", f"127.0.0.1:{port}", wait=False)
        assert g.proc.wait(START_TIMEOUT) == 3
    assert any(e["event"] == "cannot listen" for e in g.events())
    assert any(e["event"] == "a worker did not start; stopping the others" for e in g.events())
