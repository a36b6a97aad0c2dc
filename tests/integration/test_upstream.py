"""Redis unreachable, Redis dying under live connections, Redis back: what clients see through the proxy."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import ProxyProcess, RedisServer, exchange, free_port

NO_RETRY = Retry(NoBackoff(), 0)


def test_unreachable_upstream_gets_error_then_close(start_proxy: Callable[..., ProxyProcess]) -> None:
    dead = free_port()  # nothing listens here
    p = start_proxy(f"redis://127.0.0.1:{dead}/0", env={"BROKERPROXY_UPSTREAM_WAIT": "0"})
    out = exchange(p.port, b"PING\r\nGET x\r\n")
    assert out.startswith(b"-ERR upstream unavailable: ")
    assert out.count(b"\r\n") == 1  # one error, then the connection closed
    assert p.proc.poll() is None  # the proxy itself keeps running
    assert "upstream connect failed" in p.logs()


def test_new_connections_wait_for_a_restarting_redis(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    """upstream_wait: a connection made while Redis is down keeps retrying; once Redis is back (within the bound)
    its commands are answered, with no error in between."""
    proxy = start_proxy(redis_server.url(), env={"BROKERPROXY_UPSTREAM_WAIT": "10"})
    redis_server.stop()
    import threading

    threading.Timer(1.0, redis_server.start).start()
    t0 = time.monotonic()
    assert exchange(proxy.port, b"PING\r\nQUIT\r\n") == b"+PONG\r\n+OK\r\n"
    assert 0.8 < time.monotonic() - t0 < 9


def test_redis_restart_closes_clients_and_proxy_recovers(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    proxy = start_proxy(redis_server.url(), env={"BROKERPROXY_UPSTREAM_WAIT": "0", "BROKERPROXY_REATTACH": "no"})
    idle = proxy.client(protocol=3, retry=NO_RETRY)
    blocked = proxy.client(protocol=3, retry=NO_RETRY, socket_timeout=10)
    sub = proxy.client(protocol=3, retry=NO_RETRY).pubsub()
    sub.subscribe("ch")
    assert sub.get_message(timeout=2)["type"] == "subscribe"
    assert idle.ping()

    import threading

    errors: list[BaseException] = []

    def pop() -> None:
        try:
            blocked.brpop(["nothing"], timeout=0)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=pop)
    t.start()
    time.sleep(0.3)
    redis_server.stop()  # SIGKILL: Redis dies under live connections
    t.join(5)
    assert not t.is_alive(), "a blocked client was left hanging after Redis died"
    assert errors and isinstance(errors[0], redis.ConnectionError)
    # Its connection was closed cleanly, not left half-open: redis-py sees the close (and if it reconnects at
    # once, the proxy's "upstream unavailable" error).
    with pytest.raises((redis.ConnectionError, redis.ResponseError)):
        idle.ping()
    with pytest.raises((redis.ConnectionError, redis.ResponseError)):
        sub.get_message(timeout=2)
    # Meanwhile new connections get the upstream error, not a hang.
    assert exchange(proxy.port, b"PING\r\n").startswith(b"-ERR upstream unavailable")

    redis_server.start()  # same port
    fresh = proxy.client(protocol=3)
    assert fresh.set("after", "1") is True
    assert redis_server.client().get("after") == b"1"
    # redis-py's own reconnect works too.
    idle.connection_pool.reset()
    assert idle.ping() is True


def test_a_carried_over_connection_keeps_its_database(proxy: ProxyProcess, redis_server: RedisServer) -> None:
    """A connection that did SELECT 3 never silently continues in db 0: carried over a Redis restart, its SELECT is
    replayed on the new upstream connection (with reattach off, test_redis_restart_closes_clients... closes it)."""
    conn = redis.Connection(port=proxy.port, protocol=2, retry=NO_RETRY)
    conn.connect()
    conn.send_command("SELECT", 3)
    assert conn.read_response() == b"OK"
    redis_server.stop()
    redis_server.start()
    conn.send_command("SET", "k", "v")
    assert conn.read_response() == b"OK"
    assert redis_server.client(db=3).get("k") == b"v"
    assert redis_server.client(db=0).get("k") is None
