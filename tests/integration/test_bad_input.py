"""Malformed or oversized input: one Redis-worded error, that connection closed, nobody else notices."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import ProxyProcess, RedisServer, exchange

LIMITS = """
[limits]
max_bulk_length = 1024
max_array_length = 16
max_inline_length = 256
max_buffered_bytes = 65536
"""


@pytest.fixture
def limited(redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return start_proxy(redis_server.url(), config=LIMITS)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"*x\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
        (b"*17\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
        (b"*1\r\n:3\r\n", b"-ERR Protocol error: expected '$', got ':'\r\n"),
        (b"*1\r\n$1025\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
        (b"*1\r\n$-5\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
        (b"SET a \"unbalanced\r\n", b"-ERR Protocol error: unbalanced quotes in request\r\n"),
        (b"A" * 300, b"-ERR Protocol error: too big inline request\r\n"),
    ],
)
def test_malformed_gets_one_error_and_close(limited: ProxyProcess, payload: bytes, error: bytes) -> None:
    # A good command first: its reply comes before the error, in order.
    assert exchange(limited.port, b"PING\r\n" + payload) == b"+PONG\r\n" + error


def test_simple_string_argument_closes_like_redis(limited: ProxyProcess, redis_server: RedisServer) -> None:
    # A read that starts with '*' (the fast path's kind): Redis's answer, and the connection closed, on both.
    payload = b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n+foo\r\n"
    direct = exchange(redis_server.port, payload)
    assert direct == b"+PONG\r\n-ERR Protocol error: expected '$', got '+'\r\n"
    assert exchange(limited.port, payload, timeout=5) == direct


def test_limits_allow_exactly_the_limit(limited: ProxyProcess) -> None:
    value = b"v" * 1024
    args = [b"RPUSH", b"l"] + [b"x"] * 13 + [value]  # 16 arguments, one of 1024 bytes
    cmd = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    assert exchange(limited.port, cmd + b"QUIT\r\n") == b":14\r\n+OK\r\n"


def test_buffered_bytes_limit(redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]) -> None:
    """An incomplete request may not grow past max_buffered_bytes (Redis's client-query-buffer-limit)."""
    p = start_proxy(redis_server.url(), config="[limits]\nmax_buffered_bytes = 65536\n")
    payload = b"*2\r\n$4\r\nECHO\r\n$1000000\r\n" + b"x" * 70000
    assert exchange(p.port, payload) == b"-ERR Protocol error: client query buffer exceeds the limit\r\n"
    # Just under the limit is fine.
    ok = b"*2\r\n$4\r\nECHO\r\n$60000\r\n" + b"x" * 60000 + b"\r\nQUIT\r\n"
    assert exchange(p.port, ok) == b"$60000\r\n" + b"x" * 60000 + b"\r\n+OK\r\n"


def test_bad_client_does_not_disturb_others(limited: ProxyProcess, redis_server: RedisServer) -> None:
    good = limited.client(protocol=3)
    good.set("k", "v")
    blocked = limited.client(protocol=3)
    for _ in range(20):
        exchange(limited.port, b"*1\r\n$9999999999\r\n")
    assert good.get("k") == b"v"
    assert blocked.ping() is True
    assert "protocol error" in limited.logs()
