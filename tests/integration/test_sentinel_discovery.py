"""SentinelWatcher against real Sentinels: one master, two replicas, three Sentinels (sentinel_cluster.py).

Each test gets a cluster of its own (Sentinel refuses a second failover of one master within 2 x failover-timeout).
The time from the SENTINEL FAILOVER or the kill to on_switch is printed (run with -s) and recorded as a property.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trustme

from brokerproxy.sentinel import Address, SentinelError, SentinelWatcher, parse_sentinel_url
from tests.conftest import free_port
from tests.integration.sentinel_cluster import MASTER_NAME, SentinelCluster, TlsFiles

#: Upper bounds on how long noticing may take. A forced failover is announced within about a second; a killed
#: master needs down-after-milliseconds (1 s), the vote and the promotion: 2-3 s measured. Generous for CI.
FORCED_FAILOVER_BOUND = 10.0
KILLED_MASTER_BOUND = 20.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    d = tmp_path / "sentinel"
    d.mkdir()
    c = SentinelCluster(d).start()
    try:
        yield c
    finally:
        c.stop()


class Switches:
    """Records on_switch calls, and the log lines saying why each change was made."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, Address | None, Address]] = []
        self.changed = asyncio.Event()

    def __call__(self, old: Address | None, new: Address) -> None:
        self.calls.append((time.monotonic(), old, new))
        self.changed.set()

    async def next(self, timeout: float) -> tuple[float, Address | None, Address]:
        count = len(self.calls)
        deadline = time.monotonic() + timeout
        while len(self.calls) == count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))
        return self.calls[count]


class Reasons(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.why: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "sentinel master changed":
            self.why.append(str(record.__dict__.get("why")))


@pytest.fixture
def reasons() -> Iterator[Reasons]:
    handler = Reasons()
    logger = logging.getLogger("brokerproxy.sentinel")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def checked() -> None:
        await main()
        # close() left nothing behind: the only task still running is this one.
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(checked())


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def local(port: int) -> Address:
    return ("127.0.0.1", port)


def test_discover_finds_the_master(cluster: SentinelCluster) -> None:
    async def main() -> None:
        switches = Switches()
        watcher = SentinelWatcher(parse_sentinel_url("upstream", cluster.url()), switches)
        assert watcher.current is None
        master = await watcher.discover()
        assert master == local(cluster.master().port) == local(cluster.nodes[0].port)
        assert watcher.current == master
        assert [(old, new) for _, old, new in switches.calls] == [(None, master)]
        assert await watcher.discover() == master
        assert len(switches.calls) == 1  # the same master again is not a change
        await watcher.close()

    run(main)


def failover_test(
    cluster: SentinelCluster,
    reasons: Reasons,
    record_property: Callable[[str, object], None],
    act: Callable[[], None],
    bound: float,
    label: str,
) -> None:
    async def main() -> None:
        switches = Switches()
        # The periodic re-query is pushed far out, so what is measured is the +switch-master path.
        watcher = SentinelWatcher(parse_sentinel_url("upstream", cluster.url()), switches, requery_interval=60)
        old = await watcher.discover()
        watcher.start()
        everyone = {s.address for s in cluster.sentinels}
        await wait_until(lambda: watcher.subscribed == everyone, 5, "subscribed to every Sentinel")
        await asyncio.sleep(0.1)  # the re-query that follows subscribing is done
        # Count the Sentinels' own announcements too, to see that several copies make one on_switch.
        clients = [s.client() for s in cluster.sentinels]
        listeners = [c.pubsub() for c in clients]
        for pubsub in listeners:
            pubsub.subscribe("+switch-master")
        try:
            start = time.monotonic()
            act()
            at, was, new = await switches.next(bound)
            noticed = at - start
            print(f"\n{label}: on_switch {noticed:.2f}s after it, {was} -> {new}")
            record_property(f"{label.replace(' ', '_')}_noticed_seconds", round(noticed, 3))
            assert was == old and new != old
            assert reasons.why[-1].startswith("+switch-master from sentinel")
            assert cluster.role(next(n for n in cluster.nodes if n.port == new[1])) == "master"
            assert await watcher.discover() == new == watcher.current
            # The other Sentinels learn the new configuration from hello messages (every 2 s) and announce it
            # again; wait for every Sentinel's copy, then check there was one on_switch for the one change.
            copies = 0
            deadline = time.monotonic() + 8
            while copies < 3 and time.monotonic() < deadline:
                for pubsub in listeners:
                    message = pubsub.get_message(timeout=0.01)
                    if message is not None and message["type"] == "message":
                        copies += 1
                await asyncio.sleep(0.05)
            print(f"{label}: {copies} Sentinels announced it; on_switch calls: {len(switches.calls)}")
            assert copies == 3
            await asyncio.sleep(0.3)
            assert [(o, n) for _, o, n in switches.calls] == [(None, old), (old, new)]
        finally:
            for pubsub, client in zip(listeners, clients, strict=True):
                pubsub.close()
                client.close()
            await watcher.close()
        assert watcher.subscribed == frozenset()

    run(main)


def test_forced_failover_is_followed(
    cluster: SentinelCluster, reasons: Reasons, record_property: Callable[[str, object], None]
) -> None:
    failover_test(cluster, reasons, record_property, cluster.failover, FORCED_FAILOVER_BOUND, "SENTINEL FAILOVER")


def test_killed_master_is_followed(
    cluster: SentinelCluster, reasons: Reasons, record_property: Callable[[str, object], None]
) -> None:
    def kill() -> None:
        cluster.master().stop()  # SIGKILL

    failover_test(cluster, reasons, record_property, kill, KILLED_MASTER_BOUND, "master killed")


class NoSubscriptions(SentinelWatcher):
    """A watcher that never hears +switch-master: only its periodic re-query can notice a change."""

    async def _subscription(self, sentinel: Address) -> None:
        await asyncio.Event().wait()


def test_periodic_requery_notices_a_change_without_events(
    cluster: SentinelCluster, reasons: Reasons, record_property: Callable[[str, object], None]
) -> None:
    async def main() -> None:
        switches = Switches()
        watcher = NoSubscriptions(parse_sentinel_url("upstream", cluster.url()), switches, requery_interval=1.0)
        old = await watcher.discover()
        watcher.start()
        start = time.monotonic()
        cluster.failover()
        at, was, new = await switches.next(FORCED_FAILOVER_BOUND)
        print(f"\nre-query only: on_switch {at - start:.2f}s after SENTINEL FAILOVER")
        record_property("requery_only_noticed_seconds", round(at - start, 3))
        assert (was, new) == (old, watcher.current) and new != old
        assert reasons.why[-1].startswith("discovered via sentinel")
        # The demoted master keeps saying "master" for a while; the re-query must not flip back to it.
        await asyncio.sleep(3)
        assert [(o, n) for _, o, n in switches.calls] == [(None, old), (old, new)]
        await watcher.close()

    run(main)


def test_sentinel_down_at_start_is_skipped_and_subscribed_when_back(cluster: SentinelCluster) -> None:
    dead = local(free_port())  # nothing listens here
    stopped = cluster.sentinels[0]
    stopped.stop()

    async def main() -> None:
        url = cluster.url(extra_sentinels=(dead,))
        watcher = SentinelWatcher(parse_sentinel_url("upstream", url), Switches())
        assert await watcher.discover() == local(cluster.master().port)
        watcher.start()
        live = {s.address for s in cluster.sentinels[1:]}
        await wait_until(lambda: watcher.subscribed == live, 5, "subscribed to the live Sentinels")
        await asyncio.sleep(1.0)  # the stopped one has failed a few times; its backoff has grown
        stopped.start()
        took = await wait_until(lambda: stopped.address in watcher.subscribed, 8, "resubscribed")
        print(f"\nrestarted Sentinel subscribed again {took:.2f}s after it came back")
        assert watcher.subscribed == live | {stopped.address}
        await watcher.close()

    run(main)


def test_all_sentinels_down_is_a_clear_error() -> None:
    dead = [local(free_port()) for _ in range(3)]

    async def main() -> None:
        url = "sentinel://" + ",".join(f"{h}:{p}" for h, p in dead) + "/mymaster/0"
        watcher = SentinelWatcher(parse_sentinel_url("upstream", url), timeout=0.5)
        with pytest.raises(SentinelError) as info:
            await watcher.discover()
        message = str(info.value)
        assert message.startswith("no Sentinel gave a usable master for 'mymaster': ")
        for h, p in dead:
            assert f"{h}:{p}: connection refused" in message
        assert watcher.current is None
        await watcher.close()

    run(main)


def test_silent_sentinel_times_out_within_the_bound() -> None:
    """A Sentinel that accepts and never answers costs one timeout, not a hang."""

    async def main() -> None:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            port = silent.getsockname()[1]
            watcher = SentinelWatcher(parse_sentinel_url("upstream", f"sentinel://127.0.0.1:{port}/m"), timeout=0.3)
            start = time.monotonic()
            with pytest.raises(SentinelError, match=r"timed out after 0.3s"):
                await watcher.discover()
            assert time.monotonic() - start < 1.5
            await watcher.close()

    run(main)


def test_unknown_master_name(cluster: SentinelCluster) -> None:
    async def main() -> None:
        url = cluster.url().replace(f"/{MASTER_NAME}/", "/nosuchmaster/")
        watcher = SentinelWatcher(parse_sentinel_url("upstream", url))
        with pytest.raises(SentinelError) as info:
            await watcher.discover()
        assert str(info.value).count("does not know master 'nosuchmaster'") == 3
        await watcher.close()

    run(main)


@pytest.fixture
def auth_cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    d = tmp_path / "sentinel"
    d.mkdir()
    c = SentinelCluster(d, password="redis-Secret1", sentinel_password="sentinel-Secret2").start()
    try:
        yield c
    finally:
        c.stop()


def test_credentials_for_sentinels_and_data_nodes(auth_cluster: SentinelCluster) -> None:
    c = auth_cluster

    async def main() -> None:
        watcher = SentinelWatcher(parse_sentinel_url("upstream", c.url()), Switches())
        assert await watcher.discover() == local(c.master().port)
        watcher.start()
        everyone = {s.address for s in c.sentinels}
        await wait_until(lambda: watcher.subscribed == everyone, 5, "subscribed with AUTH")
        await watcher.close()

        wrong_sentinel = c.url().replace("sentinel-Secret2", "nope")
        watcher = SentinelWatcher(parse_sentinel_url("upstream", wrong_sentinel))
        with pytest.raises(SentinelError) as info:
            await watcher.discover()
        assert str(info.value).count("Sentinel AUTH failed: WRONGPASS") == 3
        await watcher.close()

        no_sentinel_password = c.url().split("?")[0]
        watcher = SentinelWatcher(parse_sentinel_url("upstream", no_sentinel_password))
        with pytest.raises(SentinelError, match="NOAUTH"):
            await watcher.discover()
        await watcher.close()

        wrong_redis = c.url().replace(":redis-Secret1@", ":nope@")
        watcher = SentinelWatcher(parse_sentinel_url("upstream", wrong_redis))
        with pytest.raises(SentinelError) as info:
            await watcher.discover()
        assert "Redis AUTH failed: WRONGPASS" in str(info.value)
        for secret in ("redis-Secret1", "sentinel-Secret2", "nope"):
            assert secret not in str(info.value)
        await watcher.close()

    run(main)


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[SentinelCluster, trustme.CA]]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(str(files.cert))
    cert.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    d = tmp_path / "sentinel"
    d.mkdir()
    c = SentinelCluster(d, tls=files).start()
    try:
        yield c, ca
    finally:
        c.stop()


def test_tls_to_the_sentinels(
    tls_cluster: tuple[SentinelCluster, trustme.CA], record_property: Callable[[str, object], None]
) -> None:
    c, ca = tls_cluster
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)

    async def main() -> None:
        switches = Switches()
        upstream = parse_sentinel_url("upstream", c.url(tls=True))
        watcher = SentinelWatcher(upstream, switches, sentinel_ssl=trusting, requery_interval=60)
        old = await watcher.discover()
        assert old == local(c.master().port)
        watcher.start()
        tls_ports = {("127.0.0.1", s.tls_port) for s in c.sentinels}
        await wait_until(lambda: watcher.subscribed == tls_ports, 5, "subscribed over TLS")
        await asyncio.sleep(0.1)
        start = time.monotonic()
        c.failover()
        at, was, new = await switches.next(FORCED_FAILOVER_BOUND)
        print(f"\nSENTINEL FAILOVER over TLS: on_switch {at - start:.2f}s after it")
        record_property("tls_failover_noticed_seconds", round(at - start, 3))
        assert was == old and new != old
        await watcher.close()

        # A CA the client does not trust: the handshake fails, and the error says so.
        watcher = SentinelWatcher(upstream, sentinel_ssl=ssl.create_default_context())
        with pytest.raises(SentinelError, match="CERTIFICATE_VERIFY_FAILED"):
            await watcher.discover()
        await watcher.close()

        # Plain text to a TLS port: no answer the watcher can read, within the bound.
        watcher = SentinelWatcher(upstream, timeout=0.5)
        with pytest.raises(SentinelError, match="no Sentinel gave a usable master"):
            await watcher.discover()
        await watcher.close()

    run(main)
