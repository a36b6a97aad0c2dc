"""A sentinel:// upstream through the proxy: clients keep a plain redis:// URL to the proxy, and the proxy follows the
master across a forced failover and a killed master.

Real processes: one master, two replicas, three Sentinels (tests/integration/sentinel_cluster.py), the proxy, and
for the Celery test a real worker and producer.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import ABANDONED_CLIENT_SOCKETS, ProxyProcess, RedisServer, free_port, wait_for_port
from tests.integration.sentinel_cluster import MASTER_NAME, SentinelCluster

StartProxy = Callable[..., ProxyProcess]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    d = tmp_path / "sentinel"
    d.mkdir()
    c = SentinelCluster(d).start()
    try:
        yield c
    finally:
        c.stop()


def sentinels_master(cluster: SentinelCluster) -> RedisServer:
    with cluster.sentinels[0].client() as sentinel:
        _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
    return next(n for n in cluster.nodes if n.port == int(port))


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def test_failover_carries_connections_and_answers_blocked_pops_as_timeouts(
    cluster: SentinelCluster, start_proxy: StartProxy
) -> None:
    metrics = free_port()
    proxy = start_proxy(
        cluster.url(), "--metrics-listen", f"127.0.0.1:{metrics}", config="[metrics]\ndepth_poll_interval = 0.2\n"
    )
    wait_for_port(metrics, proc=proxy.proc)
    old = cluster.master()
    c = proxy.client(socket_timeout=10, retry=Retry(NoBackoff(), 0))  # no retry: the same TCP connection throughout
    assert c.set("before", "1")
    assert cluster.node_client(old).get("before") == "1"
    # A client blocked in BRPOP on the old master, a RESP3 one too, and an idle one.
    blocked = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    blocked.sendall(b"*3\r\n$5\r\nBRPOP\r\n$5\r\nqueue\r\n$1\r\n0\r\n")
    resp3 = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    resp3.sendall(b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n")
    assert resp3.recv(4096).startswith(b"%")
    resp3.sendall(b"*3\r\n$5\r\nBLPOP\r\n$5\r\nqueue\r\n$1\r\n0\r\n")
    wait_for(lambda: cluster.node_client(old).info("clients")["blocked_clients"] == 2, 10, "both pops blocked")
    wait_for(lambda: readyz(metrics) == 200, 10, "ready")

    t0 = time.monotonic()
    cluster.failover()
    # The blocked clients see a timeout (the null reply of their protocol), and their connections are carried
    # over to the new master: the same TCP connections pop again, and get what is pushed there.
    assert blocked.recv(100) == b"*-1\r\n"
    assert resp3.recv(100) == b"_\r\n"
    noticed = time.monotonic() - t0
    blocked.sendall(b"*3\r\n$5\r\nBRPOP\r\n$5\r\nqueue\r\n$1\r\n0\r\n")
    resp3.sendall(b"*3\r\n$5\r\nBLPOP\r\n$5\r\nqueue\r\n$1\r\n0\r\n")

    # New connections go to the new master at once; the idle client's connection was closed, and redis-py's
    # retry on a fresh connection reaches the new master too.
    def write_reaches_new_master() -> bool:
        try:
            return bool(proxy.client(socket_timeout=5).set("after", "2"))
        except redis.RedisError:
            return False

    first_write = wait_for(write_reaches_new_master, 20, "a write through the proxy") + noticed
    new = sentinels_master(cluster)  # the old master keeps saying "master" for seconds: ask the Sentinels
    assert new.port != old.port
    assert cluster.node_client(new).get("after") == "2"
    # The idle client's connection was carried over to the new master (its old upstream connection dropped, never
    # written to again): the same TCP connection reads what was replicated before the failover, and writes.
    assert c.get("before") == b"1"
    assert c.set("carried", "1")
    assert cluster.node_client(new).get("carried") == "1"
    assert c.connection_pool._created_connections == 1  # type: ignore[attr-defined]
    cluster.node_client(new).rpush("queue", "m1", "m2")
    assert blocked.recv(100) == b"*2\r\n$5\r\nqueue\r\n$2\r\nm2\r\n"  # BRPOP: the right end
    assert resp3.recv(100) == b"*2\r\n$5\r\nqueue\r\n$2\r\nm1\r\n"  # BLPOP: the left end
    blocked.close()
    resp3.close()
    assert '"master switched; closing the connections bound to the old one"' in proxy.logs()
    print(
        f"failover noticed by the blocked clients after {noticed:.2f}s; "
        f"first write on the new master {first_write:.2f}s"
    )
    wait_for(lambda: readyz(metrics) == 200, 10, "ready again")
    assert proxy.proc.poll() is None


def test_killed_master_is_followed(cluster: SentinelCluster, start_proxy: StartProxy) -> None:
    proxy = start_proxy(cluster.url())
    old = cluster.master()
    assert proxy.client().lpush("q", "x") == 1
    t0 = time.monotonic()
    old.stop()

    def works() -> bool:
        try:
            return proxy.client(socket_timeout=2).lpush("q", "y") >= 1
        except redis.RedisError:
            return False

    took = wait_for(works, 30, "the proxy to reach the new master")
    new = cluster.master()
    assert new.port != old.port
    assert cluster.node_client(new).lrange("q", 0, -1)[-1] == "x"  # the element acknowledged before the kill
    print(f"killed master: first write through the proxy {time.monotonic() - t0:.2f}s after the kill ({took:.2f}s)")


def test_sentinels_unreachable_at_start_is_a_clear_start_error(start_proxy: StartProxy) -> None:
    dead = free_port()
    proxy = start_proxy(f"sentinel://127.0.0.1:{dead}/mymaster/0", "--connect-timeout", "0.5", wait=False)
    assert proxy.proc.wait(30) == 3
    assert "cannot find the master" in proxy.logs()


@pytest.mark.filterwarnings(ABANDONED_CLIENT_SOCKETS)
def test_celery_through_a_failover_and_a_killed_master(cluster: SentinelCluster, tmp_path: Path) -> None:
    """A prefork worker (acks_late tasks, prefetch 1, as Airflow configures it) and a producer through the proxy
    while the master is failed over, then killed: every task whose apply_async returned runs, the worker never dies,
    and /readyz shows the gap and recovers."""
    import itertools
    import json
    import threading
    from datetime import datetime

    from tests.integration.celery_app import make_app
    from tests.integration.test_celery_e2e import TIMEOUT, Stack, T

    port, metrics = free_port(), free_port()
    config = tmp_path / "proxy.toml"
    config.write_text("[metrics]\ndepth_poll_interval = 0.2\n")
    argv = ["--listen", f"127.0.0.1:{port}", "--upstream", cluster.url(), "--metrics-listen", f"127.0.0.1:{metrics}"]
    proxy = ProxyProcess([*argv, "--config", str(config)], None, tmp_path / "proxy.log", port)
    stack = Stack(cluster.nodes[0], proxy, tmp_path)
    try:
        proxy.wait_ready()
        app = stack.app()
        # Two prefetch slots for two master changes: an ack cut by a failover takes its slot for good until the
        # consumer restarts, which the proxy brings about (see test_worker_whose_ack_was_lost_consumes_again).
        worker = stack.worker("celery", concurrency=2)
        worker.wait_ready(app)
        # The producer has no result backend: results are read straight from Redis below, so no Pub/Sub result
        # listener of the test's own sits through the failovers.
        producer = make_app(proxy.url(0), None, None, main="producer")
        stack.apps.append(producer)
        accepted: list[tuple[int, object]] = []
        accepted_at: dict[int, float] = {}
        stop = threading.Event()
        statuses: list[int] = []

        def produce() -> None:
            i = 0
            while not stop.is_set():
                try:
                    # sleepy is acks_late, as Airflow runs tasks
                    accepted.append((i, T(producer, "sleepy").apply_async((0.005,))))
                    accepted_at[i] = time.monotonic()
                except Exception:  # not accepted: the publish failed, the caller knows
                    pass
                i += 1
                time.sleep(0.02)

        def watch_ready() -> None:
            while not stop.is_set():
                statuses.append(readyz(metrics))
                time.sleep(0.05)

        threads = [threading.Thread(target=produce), threading.Thread(target=watch_ready)]
        for t in threads:
            t.start()
        time.sleep(2)
        failover_wall = time.time()
        cluster.failover()
        time.sleep(8)  # Sentinel refuses a second failover of one master within 2 x failover-timeout
        killed_at = time.monotonic()
        killed_wall = time.time()
        sentinels_master(cluster).stop()
        time.sleep(8)
        stop.set()
        for t in threads:
            t.join()
        # Read the results straight from the master the Sentinels name now (result keys are replicated).
        master = redis.Redis(port=sentinels_master(cluster).port, db=1)

        def missing() -> list[int]:
            ids = [(i, r.id) for i, r in accepted]  # type: ignore[attr-defined]
            got = master.mget([f"celery-task-meta-{tid}" for _, tid in ids])
            return [i for (i, _), raw in zip(ids, got, strict=True) if raw is None]

        # Redis replicates asynchronously: what a master acknowledged in its last instant before a kill -9 may not
        # have reached the replica that replaces it (Redis's own documented limit; the proxy cannot undo it). Such
        # tasks are allowed, only in that instant; anything else missing is a loss.
        def lost_outside_the_kill() -> list[int]:
            return [i for i in missing() if not killed_at - 0.5 < accepted_at[i] <= killed_at and not unacked(i)]

        # A task in kombu's unacked hash is not lost: the visibility timeout restores it to the queue. One gets
        # there when its worker failed it on a connection error before its body ran and its ack failed too (kombu's
        # limits, through the proxy as straight to Redis: README), seen once in CI under load.
        def unacked(i: int) -> bool:
            tid = ids[i].encode()
            return any(tid in v for v in redis.Redis(port=sentinels_master(cluster).port, db=0).hvals("unacked"))

        ids = {i: r.id for i, r in accepted}  # type: ignore[attr-defined]

        # kombu pops a message (BRPOP), then records it as unacknowledged (MULTI ZADD HSET EXEC): a master change that
        # cuts that write loses the message before the worker logs it as received, through the proxy as straight to
        # Redis (seen once under load). The proxy logs every connection it closes owing replies, with what they were.
        def unexplained() -> list[int]:
            lost = lost_outside_the_kill()
            cut = sum(1 for line in proxy.logs().splitlines() if '"owed"' in line and '"zadd"' in line)
            log = worker.log_tail(100_000)
            never_received = [i for i in lost if f"[{ids[i]}] received" not in log]
            return lost if len(never_received) > cut else [i for i in lost if i not in never_received]

        try:
            wait_for(lambda: not unexplained(), TIMEOUT * 2, "every accepted task's result")
            at_kill = missing()
            print(f"{len(accepted)} accepted; {len(at_kill)} acknowledged by the master in its last 0.5 s lost")
        except AssertionError:
            lost = unexplained()
            broker = redis.Redis(port=sentinels_master(cluster).port, db=0)
            ids = {i: r.id for i, r in accepted}  # type: ignore[attr-defined]
            where = {
                i: ("unacked" if any(ids[i].encode() in v for v in broker.hvals("unacked")) else "")
                + ("queued" if any(ids[i].encode() in v for v in broker.lrange("celery", 0, -1)) else "")
                + ("received" if f"[{ids[i]}] received" in worker.log_tail(100_000) else "")
                for i in lost
            }
            raise AssertionError(f"{len(lost)} of {len(accepted)} accepted tasks have no result: {where}") from None
        # What a user sees of each change of master: the longest pause between two tasks completing, in the 8 s after
        # it (date_done is the worker's clock, this machine's).
        metas = master.mget([f"celery-task-meta-{r.id}" for _, r in accepted])  # type: ignore[attr-defined]
        done = sorted(datetime.fromisoformat(json.loads(raw)["date_done"]).timestamp() for raw in metas if raw)
        for what, at in (("SENTINEL FAILOVER", failover_wall), ("kill -9 of the master", killed_wall)):
            window = [t for t in done if at <= t <= at + 8]
            assert window, f"no task ran in the 8 s after the {what}"
            pause = max(b - a for a, b in itertools.pairwise([at, *window]))
            print(f"{what}: tasks completed again through the proxy; longest pause {pause:.2f}s")
        i, sample = accepted[len(accepted) // 2]
        meta = json.loads(master.get(f"celery-task-meta-{sample.id}"))  # type: ignore[attr-defined]
        assert meta["status"] == "SUCCESS" and meta["result"] == 0.005, (i, meta)
        assert len(accepted) > 200
        assert worker.proc.poll() is None, worker.log_tail()
        assert "Unrecoverable error" not in worker.log_tail(10_000)
        gap = statuses.index(503) if 503 in statuses else None
        assert gap is not None, "the killed master never showed on /readyz"
        assert 200 in statuses[gap:], "/readyz did not recover"
    except BaseException:
        print(stack.diag())
        raise
    finally:
        stack.close()
