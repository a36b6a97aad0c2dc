"""Limits as Redis has them: max_clients, client-output-buffer-limit for subscribers, the idle timeout, and TCP
keepalive on both sides. Real redis-server and proxy processes."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ProxyProcess, RedisServer, free_port, wait_for_port

StartProxy = Callable[..., ProxyProcess]


def start(start_proxy: StartProxy, redis_server: RedisServer, config: str) -> tuple[ProxyProcess, int]:
    metrics = free_port()
    p = start_proxy(redis_server.url(), "--metrics-listen", f"127.0.0.1:{metrics}", config=config)
    wait_for_port(metrics, proc=p.proc)
    return p, metrics


def metric(port: int, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{name}{re.escape('{' + labels + '}') if labels else ''} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_max_clients(start_proxy: StartProxy, redis_server: RedisServer) -> None:
    p, metrics = start(start_proxy, redis_server, "max_clients = 3\n")
    time.sleep(0.2)  # the fixture's port probe has come and gone
    held = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        s.sendall(b"PING\r\n")
        assert s.recv(100) == b"+PONG\r\n"
        held.append(s)
    extra = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    assert extra.recv(100) == b"-ERR max number of clients reached\r\n"
    assert extra.recv(100) == b""  # then closed, as Redis does
    extra.close()
    assert metric(metrics, "brokerproxy_client_rejections_total", 'reason="max_clients"') == 1
    held.pop().close()
    time.sleep(0.3)
    assert p.client().ping()  # a slot is free again
    for s in held:
        s.sendall(b"PING\r\n")
        assert s.recv(100) == b"+PONG\r\n"  # the others were never affected
        s.close()


def test_subscriber_past_its_output_limit_is_disconnected(start_proxy: StartProxy, redis_server: RedisServer) -> None:
    p, metrics = start(start_proxy, redis_server, 'client_output_buffer_limit_pubsub = "2mb 512kb 2"\n')
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", p.port))
    slow.sendall(b"SUBSCRIBE news\r\n")
    time.sleep(0.3)  # subscribed; from now on it never reads
    fast = p.client().pubsub()
    fast.subscribe("news")
    assert fast.get_message(timeout=2)["type"] == "subscribe"
    before = rss_kib(p.proc.pid)
    publisher = p.client()
    payload = b"x" * 16384
    for _ in range(1500):  # 24 MiB in all, far past the slow subscriber's 2 MiB
        publisher.publish("news", payload)
        fast.get_message(timeout=0)  # the reading subscriber keeps up
    deadline = time.monotonic() + 10
    while metric(metrics, "brokerproxy_client_output_limit_disconnects_total", 'class="pubsub"') < 1:
        assert time.monotonic() < deadline, "the slow subscriber was not disconnected"
        time.sleep(0.1)
    grown = rss_kib(p.proc.pid) - before
    assert grown < 32 * 1024, f"the proxy grew by {grown} KiB for one stalled subscriber"
    assert publisher.ping()  # the proxy and other clients carry on
    fast.subscribe("other")  # the reading subscriber's connection is still there
    slow.close()
    assert "client output buffer over its limit" in p.logs()


def test_idle_timeout_spares_subscribers_and_blocked_pops(start_proxy: StartProxy, redis_server: RedisServer) -> None:
    p, metrics = start(start_proxy, redis_server, "idle_timeout = 1\n")
    idle = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    idle.sendall(b"PING\r\n")
    assert idle.recv(100) == b"+PONG\r\n"
    sub = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    sub.sendall(b"SUBSCRIBE ch\r\n")
    assert b"subscribe" in sub.recv(100)
    blocked = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    blocked.sendall(b"BRPOP q 0\r\n")
    t0 = time.monotonic()
    assert idle.recv(100) == b""  # closed for idleness
    took = time.monotonic() - t0
    assert 0.8 < took < 4, took
    time.sleep(1.5)
    redis_server.client().lpush("q", "m")
    assert blocked.recv(100) == b"*2\r\n$1\r\nq\r\n$1\r\nm\r\n"  # still there, and served
    redis_server.client().publish("ch", "hi")
    assert b"hi" in sub.recv(100)
    assert metric(metrics, "brokerproxy_client_idle_disconnects_total") == 1
    for s in (idle, sub, blocked):
        s.close()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read socket timers")
def test_tcp_keepalive_on_both_sides(start_proxy: StartProxy, redis_server: RedisServer) -> None:
    p, _ = start(start_proxy, redis_server, "tcp_keepalive = 7\n")
    c = p.client()
    assert c.ping()

    def timers(expr: str) -> list[str]:
        cmd = ["ss", "-tnoH", "state", "established", expr]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()

    # The proxy's side of the client connection, and its connection to Redis (the only client of this Redis), both
    # carry a keepalive timer.
    # (A socket with bytes in flight shows its retransmit timer instead: look again until the data is acked.)
    def keepalive_everywhere(expr: str) -> bool:
        lines = timers(expr)
        return bool(lines) and all("keepalive" in ln for ln in lines)

    deadline = time.monotonic() + 5
    while not (
        keepalive_everywhere(f"( sport = :{p.port} )") and keepalive_everywhere(f"( dport = :{redis_server.port} )")
    ):
        assert time.monotonic() < deadline, (
            timers(f"( sport = :{p.port} )"),
            timers(f"( dport = :{redis_server.port} )"),
        )
        time.sleep(0.1)
    c.close()
