"""SIGTERM/SIGINT: stop accepting, finish what is in flight, end blocked pops without taking an element, exit 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import ProxyProcess, RedisServer


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_sigterm_drains_in_flight_and_ends_blocked_pops(proxy: ProxyProcess, redis_server: RedisServer) -> None:
    results: dict[str, object] = {}

    def blocked_pop() -> None:
        results["pop"] = proxy.client(protocol=3).brpop(["jobs"], timeout=0)

    def slow_command() -> None:
        results["sleep"] = proxy.client(protocol=2).execute_command("DEBUG", "SLEEP", "0.8")

    threads = [threading.Thread(target=blocked_pop), threading.Thread(target=slow_command)]
    threads[0].start()
    wait_until(lambda: "cmd=brpop" in redis_server.client().execute_command("CLIENT", "LIST").decode())
    threads[1].start()
    time.sleep(0.3)  # both requests are in Redis now
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(10)
    rc = proxy.proc.wait(10)
    assert rc == 0
    assert results["sleep"] in (b"OK", "OK", True)  # the in-flight command finished and its reply arrived
    assert results["pop"] is None  # the blocked pop ended as a timeout
    assert time.monotonic() - started < 5
    # Nothing was taken from the queue by the ended pop, and the proxy no longer accepts connections.
    redis_server.client().lpush("jobs", "after")
    assert redis_server.client().lrange("jobs", 0, -1) == [b"after"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
    events = [json.loads(line)["event"] for line in proxy.logs().splitlines() if line.startswith("{")]
    assert events[0] == "starting" and "shutdown requested" in events and events[-1] == "stopped"


def test_idle_and_subscribed_clients_do_not_hold_the_drain(proxy: ProxyProcess) -> None:
    idle = proxy.client(protocol=3)
    idle.ping()
    sub = proxy.client(protocol=2).pubsub()
    sub.subscribe("ch")
    sub.get_message(timeout=2)
    started = time.monotonic()
    assert proxy.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 3
    with pytest.raises(redis.ConnectionError):
        idle.ping()


def test_second_sigint_exits_at_once(proxy: ProxyProcess) -> None:
    def sleep_through_proxy() -> None:
        try:
            proxy.client(protocol=2, retry=Retry(NoBackoff(), 0)).execute_command("DEBUG", "SLEEP", "5")
        except redis.ConnectionError:
            pass  # expected: the proxy exits under it

    slow = threading.Thread(target=sleep_through_proxy)
    slow.start()
    time.sleep(0.3)
    proxy.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proxy.proc.poll() is None  # draining: waiting for the slow command
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGINT)
    rc = proxy.proc.wait(5)
    assert time.monotonic() - started < 2
    assert rc == 130
    slow.join(10)
