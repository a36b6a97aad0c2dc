"""Clients authenticate to the proxy; the proxy authenticates to Redis with its own credentials."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import ProxyProcess, RedisServer, exchange

USERS = f"""
[[users]]
name = "worker"
passwords = ["w-secret", "w-rotated"]

[[users]]
name = "default"
password_sha256 = ["{hashlib.sha256(b"default-secret").hexdigest()}"]

[[users]]
name = "retired"
passwords = ["old"]
enabled = false
"""


@pytest.fixture
def authed_proxy(redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return start_proxy(redis_server.url(), config=USERS)


@pytest.mark.parametrize("protocol", [2, 3])
def test_users_authenticate_with_auth_or_hello(authed_proxy: ProxyProcess, protocol: int) -> None:
    # redis-py sends HELLO 3 AUTH user pass (RESP3) or AUTH user pass (RESP2).
    r = authed_proxy.client(username="worker", password="w-secret", protocol=protocol)
    assert r.ping() is True
    assert r.set("k", "v") is True
    # Either of a user's passwords works (rotation).
    assert authed_proxy.client(username="worker", password="w-rotated", protocol=protocol).ping() is True
    # Password-only URL means the default user, as in Redis.
    assert redis.Redis.from_url(f"redis://:default-secret@127.0.0.1:{authed_proxy.port}/0", protocol=protocol).ping()


@pytest.mark.parametrize("protocol", [2, 3])
def test_wrong_password_gets_redis_error(authed_proxy: ProxyProcess, protocol: int) -> None:
    for username, password in [("worker", "nope"), ("nobody", "w-secret"), ("retired", "old")]:
        r = authed_proxy.client(username=username, password=password, protocol=protocol, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.AuthenticationError, match="invalid username-password pair or user is disabled"):
            r.ping()


def test_noauth_before_authentication(authed_proxy: ProxyProcess) -> None:
    out = exchange(authed_proxy.port, b"GET k\r\nHELLO 3\r\nAUTH worker w-secret\r\nPING\r\nQUIT\r\n")
    assert out == (
        b"-NOAUTH Authentication required.\r\n"
        b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH "
        b"<user> <pass> option can be used to authenticate the client and select the RESP protocol version at the "
        b"same time\r\n"
        b"+OK\r\n+PONG\r\n+OK\r\n"
    )


def test_client_credentials_never_reach_redis(
    redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]
) -> None:
    """Redis has a password the clients never see; clients have passwords Redis never sees."""
    admin = redis_server.client()
    admin.config_set("requirepass", "upstream-secret")
    up = redis_server.client(password="upstream-secret")
    p = start_proxy(f"redis://:upstream-secret@127.0.0.1:{redis_server.port}/2", config=USERS)
    monitor = up.monitor()
    with monitor as m:
        r = p.client(username="worker", password="w-secret", protocol=3)
        r.set("through", "1")
        seen = []
        for cmd in m.listen():
            seen.append(cmd["command"])
            if "through" in cmd["command"]:
                break
    assert not any("w-secret" in c for c in seen), seen
    assert up.execute_command("SELECT", 2) and up.get("through") == b"1"
    # A client that knows only Redis's password gets nowhere (once: redis-py's retries would each wait out the
    # proxy's growing delay for a peer whose AUTH failed).
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=p.port, password="upstream-secret", retry=Retry(NoBackoff(), 0)).ping()


def test_no_users_means_default_user_without_password(proxy: ProxyProcess, redis_server: RedisServer) -> None:
    """With no users configured the proxy answers AUTH exactly as a Redis whose default user is nopass."""
    payload = b"AUTH anything\r\nAUTH default anything\r\nAUTH someone anything\r\nPING\r\nQUIT\r\n"
    assert exchange(proxy.port, payload) == exchange(redis_server.port, payload)


def test_wrong_upstream_password_reported_to_client(
    redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]
) -> None:
    redis_server.client().config_set("requirepass", "right")
    p = start_proxy(f"redis://:wrong@127.0.0.1:{redis_server.port}/0")
    out = exchange(p.port, b"PING\r\n")
    assert out == b"-ERR upstream unavailable: WRONGPASS invalid username-password pair or user is disabled.\r\n"
    # redis-py ignores errors to the CLIENT SETINFO it sends first, then sees the connection closed.
    with pytest.raises((redis.ConnectionError, redis.ResponseError)):
        p.client(protocol=2, retry=Retry(NoBackoff(), 0)).ping()


def test_unauthenticated_connection_is_closed_after_auth_timeout(
    redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]
) -> None:
    import socket
    import time

    p = start_proxy(redis_server.url(), config="auth_timeout = 0.5\n" + USERS)
    idle = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    authed = p.client(username="worker", password="w-secret", protocol=3)
    assert authed.ping()
    started = time.monotonic()
    assert idle.recv(100) == b""  # closed by the proxy, with nothing said
    assert 0.4 < time.monotonic() - started < 3
    idle.close()
    time.sleep(0.3)
    assert authed.ping() is True  # an authenticated connection is not affected


def test_repeated_auth_failures_are_slowed_down(authed_proxy: ProxyProcess) -> None:
    import time

    def attempt() -> float:
        started = time.monotonic()
        out = exchange(authed_proxy.port, b"AUTH worker nope\r\nQUIT\r\n")
        assert out.startswith(b"-WRONGPASS")
        return time.monotonic() - started

    first = attempt()
    times = [attempt() for _ in range(5)]
    assert first < 0.2
    assert times[-1] >= 0.4  # 50 ms doubling: the fifth failure in a row waits 0.4 s
    assert times == sorted(times) or times[-1] > times[0]
    assert authed_proxy.client(username="worker", password="w-secret").ping()  # the right password still works


def test_passwords_from_a_file_and_the_environment(
    redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    config = (
        f'[[users]]\nname = "a"\npassword_file = "{secret}"\n'
        '[[users]]\nname = "b"\npassword_env = "BP_TEST_SECRET"\n'
    )
    p = start_proxy(redis_server.url(), config=config, env={"BP_TEST_SECRET": "from-env"})
    assert p.client(username="a", password="from-file").ping()
    assert p.client(username="b", password="from-env").ping()
