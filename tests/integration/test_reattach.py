"""Redis killed and restarted under live clients: what each kind of connection sees through the proxy (issue 9).

Idle connections and connections blocked in a pop are carried over to a new upstream connection (a blocked pop
first gets its timeout reply); connections holding what the proxy cannot rebuild are closed. Real redis-server
(append-only file on, killed with SIGKILL and restarted on the same port) and real proxy processes.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import (
    ABANDONED_CLIENT_SOCKETS,
    ProxyProcess,
    RedisServer,
    free_port,
    freeze_in_transaction,
    wait_for_port,
)

NO_RETRY = Retry(NoBackoff(), 0)
KILLS = 3  # Redis restarts in the Celery scenario
StartProxy = Callable[..., ProxyProcess]


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    d = tmp_path / "aof-redis"
    d.mkdir()
    server = RedisServer(d, "--appendonly", "yes", "--appendfsync", "always")
    yield server
    server.stop()


def restart(server: RedisServer, after: float = 0.5) -> None:
    server.stop(signal.SIGKILL)
    time.sleep(after)
    server.start()


def metric(port: int, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def proxy_with_metrics(start_proxy: StartProxy, server: RedisServer, **kw: Any) -> tuple[ProxyProcess, int]:
    metrics = free_port()
    p = start_proxy(server.url(), "--metrics-listen", f"127.0.0.1:{metrics}", **kw)
    wait_for_port(metrics, proc=p.proc)
    return p, metrics


def test_idle_connection_carries_over_with_its_state(start_proxy: StartProxy, aof_redis: RedisServer) -> None:
    p, metrics = proxy_with_metrics(start_proxy, aof_redis)
    c = redis.Redis(port=p.port, db=3, protocol=3, client_name="worker-1", retry=NO_RETRY, socket_timeout=15)
    assert c.set("k", "before")
    restart(aof_redis)
    # No retry on the client: the same TCP connection, carried over; HELLO 3, SELECT 3 and the name replayed.
    assert c.get("k") == b"before"  # db 3, kept by the append-only file
    assert c.set("after", "1")
    assert aof_redis.client(db=3).get("after") == b"1"
    assert c.client_getname() in ("worker-1", b"worker-1")
    assert c.hgetall("nothing") == {}
    assert c.connection_pool._created_connections == 1  # type: ignore[attr-defined]
    assert metric(metrics, "brokerproxy_upstream_reattached_total", 'state="idle"') >= 1
    assert '"upstream back"' in p.logs()


def test_blocked_pop_gets_a_timeout_then_carries_on(start_proxy: StartProxy, aof_redis: RedisServer) -> None:
    p, metrics = proxy_with_metrics(start_proxy, aof_redis)
    s = socket.create_connection(("127.0.0.1", p.port), timeout=15)
    s.sendall(b"BRPOP jobs 0\r\n")
    time.sleep(0.3)
    t0 = time.monotonic()
    aof_redis.stop(signal.SIGKILL)
    assert s.recv(100) == b"*-1\r\n"  # as if the pop had timed out: never an error
    assert time.monotonic() - t0 < 2
    aof_redis.start()
    s.sendall(b"BRPOP jobs 0\r\n")  # the same connection pops again, from the restarted Redis
    time.sleep(0.3)
    aof_redis.client().lpush("jobs", "m1")
    assert s.recv(100) == b"*2\r\n$4\r\njobs\r\n$2\r\nm1\r\n"
    s.close()
    assert metric(metrics, "brokerproxy_upstream_reattached_total", 'state="blocked_pop"') == 1


def test_restarted_redis_still_loading_is_waited_for(start_proxy: StartProxy, tmp_path: Path) -> None:
    """A restarted Redis answers -LOADING while it loads its data: a carried-over connection resumes only once it
    has (to kombu, -LOADING is a connection error, on which a Celery worker restarts its consumer)."""
    d = tmp_path / "slow-load"
    d.mkdir()
    # 100 µs per key: 20,000 keys take about 2 s to load, answering (-LOADING) every 1 KiB loaded.
    server = RedisServer(d, "--key-load-delay", "100", "--loading-process-events-interval-bytes", "1024")
    try:
        direct = server.client()
        for i in range(0, 20_000, 2_000):
            direct.mset({f"k{j}": "v" for j in range(i, i + 2_000)})
        direct.save()
        direct.close()
        p = start_proxy(server.url())
        c = p.client(socket_timeout=15, retry=NO_RETRY)
        assert c.get("k1") == b"v"
        server.stop(signal.SIGKILL)
        server.start()
        with pytest.raises(redis.BusyLoadingError):
            server.client(retry=NO_RETRY).ping()  # the scenario is real: Redis is loading
        assert c.get("k19999") == b"v"  # the same connection, once Redis has its data: no -LOADING
        assert "upstream still loading" not in p.logs()
    finally:
        server.stop()


class CuttableRelay:
    """A TCP relay in front of Redis whose cut() drops the proxy's side of every connection while Redis keeps its
    side open: what a network cut or a middlebox dropping connections does (Redis still holds the clients)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.held: list[socket.socket] = []  # Redis-side sockets of cut connections: open, never read again
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.pairs.append((down, up))
            threading.Thread(target=self._pump, args=(down, up), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        pairs, self.pairs = self.pairs, []
        for down, up in pairs:
            down.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):  # ENOTCONN: the proxy closed that side already, the pump is awake
                down.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv (close alone would not)
            down.close()  # the proxy sees the connection end; Redis sees nothing
            self.held.append(up)

    def close(self) -> None:
        self.listener.close()
        for down, up in self.pairs:
            down.close()
            up.close()
        for up in self.held:
            up.close()


def test_pop_left_blocked_in_redis_by_a_network_cut_is_ended(start_proxy: StartProxy, aof_redis: RedisServer) -> None:
    """The upstream connection is lost to the proxy but not to Redis: the pop still blocked there must not take the
    next element for nobody. The proxy ends it (CLIENT KILL ID … ADDR …) and the client's next pop gets the element."""
    relay = CuttableRelay(aof_redis.port)
    try:
        p = start_proxy(f"redis://127.0.0.1:{relay.port}/0")
        direct = aof_redis.client()
        s = socket.create_connection(("127.0.0.1", p.port), timeout=15)
        s.sendall(b"BRPOP jobs 0\r\n")
        time.sleep(0.3)
        relay.cut()
        assert s.recv(100) == b"*-1\r\n"  # the reattached pop's timeout

        def blocked_pops() -> int:
            return sum(1 for c in direct.client_list() if c["cmd"] == "brpop" and "b" in c["flags"])

        deadline = time.monotonic() + 10
        while blocked_pops() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert blocked_pops() == 0  # the orphan is gone from Redis
        s.sendall(b"BRPOP jobs 0\r\n")
        time.sleep(0.3)
        direct.lpush("jobs", "m1")
        assert s.recv(100) == b"*2\r\n$4\r\njobs\r\n$2\r\nm1\r\n"
        s.close()
        assert "closed an upstream connection Redis still held for us" in p.logs()
    finally:
        relay.close()


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (b"DEBUG SLEEP 5\r\n", "pending"),  # a reply owed: nobody knows whether Redis ran it
        (b"MULTI\r\nSET a 1\r\n", "multi"),
        (b"WATCH a\r\n", "watch"),
        (b"MONITOR\r\n", "monitor"),
        (b"HELLO 3\r\nCLIENT TRACKING ON\r\n", "tracking"),  # Redis's invalidation state: nothing to rebuild
    ],
    ids=["pending", "multi", "watch", "monitor", "tracking"],
)
def test_what_cannot_be_rebuilt_is_closed(
    start_proxy: StartProxy, aof_redis: RedisServer, setup: bytes, reason: str
) -> None:
    p, metrics = proxy_with_metrics(start_proxy, aof_redis)
    s = socket.create_connection(("127.0.0.1", p.port), timeout=15)
    s.sendall(setup)
    time.sleep(0.3)
    if reason != "pending":
        s.recv(4096)  # the replies so far
    aof_redis.stop(signal.SIGKILL)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    assert data == b""  # closed cleanly, nothing invented
    s.close()
    aof_redis.start()
    assert metric(metrics, "brokerproxy_upstream_reattach_failures_total", f'reason="{reason}"') == 1


@pytest.mark.parametrize("protocol", [2, 3])
def test_subscriber_is_subscribed_again(start_proxy: StartProxy, aof_redis: RedisServer, protocol: int) -> None:
    p, metrics = proxy_with_metrics(start_proxy, aof_redis)
    c = redis.Redis(port=p.port, protocol=protocol, retry=NO_RETRY, socket_timeout=15)
    sub = c.pubsub()
    sub.subscribe("news", "alerts")
    sub.psubscribe("job.*")
    for _ in range(3):
        assert sub.get_message(timeout=5)["type"] in ("subscribe", "psubscribe")
    restart(aof_redis)
    direct = aof_redis.client()

    def published() -> int:
        return int(direct.publish("news", "after")) + int(direct.publish("job.1", "done"))

    deadline = time.monotonic() + 10
    while published() < 2:  # until the proxy has subscribed again on the new connection
        assert time.monotonic() < deadline, "not subscribed again"
        time.sleep(0.05)
    got = []
    while (m := sub.get_message(timeout=2)) is not None:
        got.append((m["type"], m["channel"], m["data"]))
    # Only messages: the re-subscriptions' confirmations were the proxy's, not shown to the client again.
    assert got and all(t in ("message", "pmessage") for t, _, _ in got), got
    assert {(t, d) for t, _, d in got} >= {("message", b"after"), ("pmessage", b"done")}
    assert sub.connection is not None
    sub.unsubscribe("alerts")  # the connection is still in step with Redis
    assert sub.get_message(timeout=5)["type"] == "unsubscribe"
    # Once, or twice when the dying Redis still accepted the first reconnection (then reset it).
    assert metric(metrics, "brokerproxy_upstream_reattached_total", 'state="subscribed"') >= 1


TWO_USERS = """
[[users]]
name = "worker"
passwords = ["w"]

[[users]]
name = "other"
passwords = ["o"]
"""


def test_lost_reply_closes_that_clients_consumer_connections(start_proxy: StartProxy, aof_redis: RedisServer) -> None:
    """The rule behind test_worker_whose_ack_was_lost_consumes_again, connection by connection: after an outage that
    cut a transaction of user "worker", that user's carried-over subscribed and blocked-pop connections from the
    same host are closed (kombu then restarts its consumer); its idle connections, and the subscriber of another
    user whose plain command was cut, are carried over and kept."""
    p, metrics = proxy_with_metrics(start_proxy, aof_redis, config=TWO_USERS)

    def login(user: str, password: str) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", p.port), timeout=15)
        s.sendall(f"AUTH {user} {password}\r\n".encode())
        assert s.recv(100) == b"+OK\r\n"
        return s

    def subscriber(user: str, password: str) -> socket.socket:
        s = login(user, password)
        s.sendall(b"SUBSCRIBE news\r\n")
        assert s.recv(100) == b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
        return s

    w_sub, o_sub = subscriber("worker", "w"), subscriber("other", "o")
    w_pop, w_idle = login("worker", "w"), login("worker", "w")
    w_pop.sendall(b"BLPOP q 0\r\n")
    w_lost = login("worker", "w")
    o_lost = login("other", "o")
    freeze_in_transaction(w_lost, aof_redis)
    # A transaction whose EXEC is owed when Redis dies, as kombu's ack: that connection is closed, and a reset due.
    w_lost.sendall(b"EXEC\r\n")
    # A plain command cut (a producer's LPUSH) leaks nothing in kombu: no reset for the other user.
    o_lost.sendall(b"INCR m\r\n")
    time.sleep(0.3)
    aof_redis.stop(signal.SIGKILL)
    assert w_lost.recv(100) == b""
    assert o_lost.recv(100) == b""
    assert w_pop.recv(100) == b"*-1\r\n"  # the pop in flight: answered as a timeout, carried over
    w_pop.sendall(b"BLPOP q 0\r\n")  # kombu pops again at once
    aof_redis.start()
    assert w_sub.recv(100) == b""
    assert w_pop.recv(100) == b""
    direct = aof_redis.client()
    direct.rpush("q", "after")  # the closed pop's upstream connection takes nothing more (CLIENT UNBLOCK)
    time.sleep(0.3)
    assert direct.lrange("q", 0, -1) == [b"after"]
    w_idle.sendall(b"PING\r\n")
    assert w_idle.recv(100) == b"+PONG\r\n"
    deadline = time.monotonic() + 10
    while direct.publish("news", "after") < 1:  # until o_sub is subscribed again on its new upstream connection
        assert time.monotonic() < deadline, "the other user's subscriber was not carried over"
        time.sleep(0.05)
    assert o_sub.recv(100).startswith(b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nafter\r\n")
    assert metric(metrics, "brokerproxy_upstream_reattach_resets_total", 'state="subscribed"') == 1
    assert metric(metrics, "brokerproxy_upstream_reattach_resets_total", 'state="blocked_pop"') == 1
    for s in (w_sub, w_pop, w_idle, o_sub, w_lost, o_lost):
        s.close()


def test_consumer_reset_off_keeps_the_subscriber(start_proxy: StartProxy, aof_redis: RedisServer) -> None:
    """reattach_reset_consumers = false: a cut transaction closes only its own connection; the same client's
    subscriber is carried over and stays (the behaviour before the reset, for deployments that want it)."""
    p, metrics = proxy_with_metrics(start_proxy, aof_redis, env={"BROKERPROXY_REATTACH_RESET_CONSUMERS": "false"})
    sub = socket.create_connection(("127.0.0.1", p.port), timeout=15)
    sub.sendall(b"SUBSCRIBE news\r\n")
    assert sub.recv(100) == b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    lost = socket.create_connection(("127.0.0.1", p.port), timeout=15)
    freeze_in_transaction(lost, aof_redis)
    lost.sendall(b"EXEC\r\n")
    time.sleep(0.3)
    aof_redis.stop(signal.SIGKILL)
    assert lost.recv(100) == b""
    aof_redis.start()
    direct = aof_redis.client()
    deadline = time.monotonic() + 10
    while direct.publish("news", "after") < 1:  # subscribed again on its new upstream connection, not closed
        assert time.monotonic() < deadline, "the subscriber was not carried over"
        time.sleep(0.05)
    assert sub.recv(100).startswith(b"*3\r\n$7\r\nmessage\r\n")
    assert metric(metrics, "brokerproxy_upstream_reattach_resets_total", 'state="subscribed"') == 0
    assert metric(metrics, "brokerproxy_upstream_reattach_failures_total", 'reason="pending"') == 1
    for s in (sub, lost):
        s.close()


def test_reattach_off_closes_as_before(start_proxy: StartProxy, aof_redis: RedisServer) -> None:
    p = start_proxy(aof_redis.url(), env={"BROKERPROXY_REATTACH": "no"})
    s = socket.create_connection(("127.0.0.1", p.port), timeout=15)
    s.sendall(b"PING\r\n")
    assert s.recv(100) == b"+PONG\r\n"
    restart(aof_redis)
    assert s.recv(100) == b""  # closed when Redis went away
    s.close()


def test_commands_sent_during_the_outage_wait(start_proxy: StartProxy, aof_redis: RedisServer) -> None:
    p = start_proxy(aof_redis.url())
    c = redis.Redis(port=p.port, retry=NO_RETRY, socket_timeout=15)
    assert c.ping()
    aof_redis.stop(signal.SIGKILL)
    threading.Timer(1.5, aof_redis.start).start()
    t0 = time.monotonic()
    assert c.incr("n") == 1  # sent while Redis is down: held, then run once Redis is back
    assert 1.0 < time.monotonic() - t0 < 10


@pytest.mark.filterwarnings(ABANDONED_CLIENT_SOCKETS)  # Celery's result consumer, under faults (see conftest)
def test_worker_whose_ack_was_lost_consumes_again(tmp_path: Path) -> None:
    """kombu frees a prefetch slot only when an ack succeeds. A worker with one slot (concurrency 1, prefetch 1)
    whose ack is in flight when Redis dies loses it: the proxy closes the ack's connection, never knowing whether
    Redis ran it. Its other connections are carried over, so nothing else tells kombu, and the worker would consume
    nothing more (alive, silent). After the outage the proxy closes that client's subscribed connections, its
    consumer restarts, and the worker consumes again."""
    from tests.integration.test_celery_e2e import Stack, T, wait_until

    rdir = tmp_path / "redis"
    rdir.mkdir()
    server = RedisServer(rdir, "--appendonly", "yes", "--appendfsync", "always")
    port, metrics = free_port(), free_port()
    argv = ["--listen", f"127.0.0.1:{port}", "--upstream", server.url(0), "--metrics-listen", f"127.0.0.1:{metrics}"]
    stack = Stack(server, ProxyProcess(argv, None, tmp_path / "p.log", port), tmp_path)
    try:
        assert stack.proxy is not None
        stack.proxy.wait_ready()
        wait_for_port(metrics, proc=stack.proxy.proc)
        app = stack.app()
        # No heartbeats: the worker sends them from its main loop every 2 s, and one sent to the frozen Redis would
        # hold the ack back (the worker then restarts its consumer on the heartbeat's error, not this test's case).
        worker = stack.worker("celery", concurrency=1, options=("--without-heartbeat",))
        worker.wait_ready(app)
        marker = tmp_path / "marker"
        T(app, "pause").apply_async((str(marker), 1.0))
        wait_until("the task to start", marker.exists)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)  # the ack, sent when the body returns, waits on a frozen Redis
        time.sleep(2.0)
        restart(server, after=0.5)  # SIGKILL ends a stopped process too
        wait_until("the failed ack", lambda: "Couldn't ack" in worker.log_tail(100_000))
        ids = [T(app, "record").apply_async(("after",)).id for _ in range(5)]
        state = stack.state()

        def ran() -> bool:
            return set(ids) <= {x.decode() for x in state.lrange("after", 0, -1)}

        wait_until("the worker to consume again", ran, 30)
        assert worker.proc.poll() is None
        assert "Unrecoverable error" not in worker.log_tail(100_000)
        assert metric(metrics, "brokerproxy_upstream_reattach_resets_total", 'state="subscribed"') >= 1
    except BaseException:
        print(stack.diag())
        raise
    finally:
        stack.close()


def restart_scenario(tmp_path: Path, through_proxy: bool) -> dict[str, object]:
    """The issue's scenario: a prefork worker (acks_late tasks, prefetch 1) and a producer, through the proxy or
    straight to Redis; Redis (append-only file on) killed with -9 and restarted on the same port, three times, under
    load. Returns what happened: accepted tasks, those that ran, whether the worker survived, its log."""
    from tests.integration.celery_app import make_app
    from tests.integration.test_celery_e2e import Stack, T

    rdir = tmp_path / "redis"
    rdir.mkdir()
    server = RedisServer(rdir, "--appendonly", "yes", "--appendfsync", "always")
    proxy = None
    if through_proxy:
        port = free_port()
        argv = ["--listen", f"127.0.0.1:{port}", "--upstream", server.url(0)]
        proxy = ProxyProcess(argv, None, tmp_path / "p.log", port)
    stack = Stack(server, proxy, tmp_path)
    try:
        if proxy is not None:
            proxy.wait_ready()
        app = stack.app()
        # kombu frees a prefetch slot only when an ack succeeds: an ack in flight when Redis dies fails (through the
        # proxy as straight to Redis: the proxy never replays a command whose reply it did not see) and holds its
        # slot until the worker restarts its consumer. With prefetch 1 the worker has `concurrency` slots: two slots
        # and three kills, so that without the proxy's consumer reset (test_worker_whose_ack_was_lost_consumes_again)
        # two failed acks would stall it (seen in CI before that reset).
        worker = stack.worker("celery", concurrency=2)
        worker.wait_ready(app)
        producer = make_app(stack.url(0), None, None, main="producer")
        stack.apps.append(producer)
        accepted: list[str] = []
        stop = threading.Event()

        def produce() -> None:
            while not stop.is_set():
                try:
                    accepted.append(T(producer, "record").apply_async(("ran",), {"delay": 0.02}).id)
                except Exception:
                    pass  # not accepted: the caller knows
                time.sleep(0.01)

        t = threading.Thread(target=produce)
        t.start()
        for _ in range(KILLS):
            time.sleep(3)
            restart(server, after=1.0)
        time.sleep(3)
        stop.set()
        t.join()
        ran = stack.state()

        def done() -> set[str]:
            return {x.decode() for x in ran.lrange("ran", 0, -1)}

        # Wait for every accepted task to run, up to 60 s, but stop once nothing has run for 15 s: a task lost in
        # a kill (allowed, see below) would otherwise hold the test for the whole minute.
        deadline = time.monotonic() + 60
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() < deadline and not set(accepted) <= (ran_now := done()):
            if len(ran_now) != last_count:
                last_count, last_change = len(ran_now), time.monotonic()
            elif time.monotonic() - last_change > 15:
                break
            time.sleep(0.5)
        runs = ran.lrange("ran", 0, -1)
        log = worker.log_tail(100_000)
        # Tasks the worker received and failed on a connection error of its own, before their body ran: with
        # task_track_started, Celery stores STARTED first, and a result-backend command whose connection dies under
        # it fails the task (result_backend_always_retry is off by default), through the proxy as straight to Redis.
        # Celery reports them as failed; they are not lost in silence.
        failed = set(re.findall(r"Task e2e\.record\[([0-9a-f-]+)\] raised unexpected: network:ConnectionError", log))
        never = [a for a in accepted if a not in done()]
        return {
            "accepted": len(accepted), "ran": len(set(accepted) & done()), "runs": len(runs),
            "lost": [a for a in never if a not in failed], "failed_on_connection_error": len(set(never) & failed),
            "worker_alive": worker.proc.poll() is None, "unrecoverable": "Unrecoverable error" in log,
            "failed_acks": log.count("Couldn't ack"), "log": log,
        }  # fmt: skip
    except BaseException:
        print(stack.diag())
        raise
    finally:
        stack.close()


@pytest.mark.filterwarnings(ABANDONED_CLIENT_SOCKETS)  # Celery's result consumer, under faults (see conftest)
def test_celery_worker_survives_redis_restarts(tmp_path: Path) -> None:
    """Through the proxy: the worker stays alive with no "Unrecoverable error", and every task whose apply_async
    returned runs (some twice: acks_late redelivers what was running when its connection went)."""
    r = restart_scenario(tmp_path, through_proxy=True)
    lost = r["lost"]
    assert isinstance(lost, list)
    # A pop that Redis executes in the instant it is killed, before its reply leaves, is lost with any client: kombu
    # moves a message to its unacked set only once the reply has arrived, and the append-only file has the pop. At
    # most one such message per kill; anything more is the proxy's (seen: 0 in most runs, 1 in about one in four;
    # straight to Redis, 6 in the same scenario: test_restarts_direct_versus_through_the_proxy).
    assert len(lost) <= KILLS, (
        f"{len(lost)} of {r['accepted']} accepted tasks never ran ({r['failed_acks']} failed acks, "
        f"{r['failed_on_connection_error']} failed by Celery on a connection error): {lost[:10]}"
    )
    assert r["worker_alive"], r["log"]
    assert not r["unrecoverable"]
    assert isinstance(r["accepted"], int) and r["accepted"] > 200
    print(f"{r['accepted']} accepted, {r['runs']} runs, {r['failed_on_connection_error']} failed on a connection error")


@pytest.mark.slow
def test_restarts_direct_versus_through_the_proxy(tmp_path: Path) -> None:
    """The difference, reported: the same scenario straight against Redis and through the proxy
    (python -m pytest -s -m slow tests/integration/test_reattach.py)."""
    for through in (False, True):
        d = tmp_path / ("proxy" if through else "direct")
        d.mkdir()
        r = restart_scenario(d, through_proxy=through)
        print(
            f"{'through the proxy' if through else 'straight to Redis'}: worker alive {r['worker_alive']}, "
            f"unrecoverable error {r['unrecoverable']}, {r['ran']} of {r['accepted']} accepted tasks ran, "
            f"{r['failed_acks']} failed acks, {r['failed_on_connection_error']} failed by Celery on a connection error"
        )
        if through:  # what test_celery_worker_survives_redis_restarts asserts, as the README reports it
            assert r["worker_alive"] and not r["unrecoverable"]
            assert isinstance(r["lost"], list) and len(r["lost"]) <= KILLS, r["lost"]
