"""ACLs through the running proxy: redis-py sees Redis's exceptions, nothing denied reaches Redis, SIGHUP reloads."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import ProxyProcess, RedisServer, exchange

ACL = """user default off
user worker on >w-pass ~celery* ~unacked* &* +@all -@dangerous
user reader on >r-pass ~celery* resetchannels -@all +get +llen +ping +hello +client +acl|whoami +publish
user auditor on >a-pass -@all +acl|log +hello +client
"""


@pytest.fixture
def acl_proxy(tmp_path: Path, redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    (tmp_path / "users.acl").write_text(ACL)
    return start_proxy(redis_server.url(), config=f'[acl]\nfile = "{tmp_path / "users.acl"}"\n')


def client(p: ProxyProcess, user: str, password: str, protocol: int = 3) -> redis.Redis:
    return p.client(username=user, password=password, protocol=protocol, retry=Retry(NoBackoff(), 0))


@pytest.mark.parametrize("protocol", [2, 3])
def test_denials_raise_redis_exceptions_and_never_reach_redis(
    acl_proxy: ProxyProcess, redis_server: RedisServer, protocol: int
) -> None:
    w = client(acl_proxy, "worker", "w-pass", protocol)
    assert w.lpush("celery", "m") == 1
    with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to run the 'flushall' command"):
        w.flushall()
    with pytest.raises(redis.exceptions.NoPermissionError, match="No permissions to access a key"):
        w.set("secret", "x")
    r = client(acl_proxy, "reader", "r-pass", protocol)
    assert r.llen("celery") == 1
    with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to run the 'lpush' command"):
        r.lpush("celery", "x")
    with pytest.raises(redis.exceptions.NoPermissionError, match="No permissions to access a channel"):
        w.connection_pool.reset()
        client(acl_proxy, "reader", "r-pass", protocol).execute_command("PUBLISH", "ch", "x")
    direct = redis_server.client()
    assert direct.exists("secret") == 0 and direct.llen("celery") == 1  # the denied writes never happened
    assert r.execute_command("ACL", "WHOAMI") in (b"reader", "reader")


def test_denied_command_in_multi_aborts_exec(acl_proxy: ProxyProcess, redis_server: RedisServer) -> None:
    payload = (
        b"AUTH worker w-pass\r\nMULTI\r\nLPUSH celery a\r\nSET secret x\r\nLPUSH celery b\r\nEXEC\r\nQUIT\r\n"
    )
    out = exchange(acl_proxy.port, payload)
    assert out == (
        b"+OK\r\n+OK\r\n+QUEUED\r\n-NOPERM No permissions to access a key\r\n+QUEUED\r\n"
        b"-EXECABORT Transaction discarded because of previous errors.\r\n+OK\r\n"
    )
    assert redis_server.client().llen("celery") == 0


def test_unauthenticated_and_acl_log(acl_proxy: ProxyProcess) -> None:
    assert exchange(acl_proxy.port, b"PING\r\nQUIT\r\n") == b"-NOAUTH Authentication required.\r\n+OK\r\n"
    with pytest.raises(redis.AuthenticationError):
        client(acl_proxy, "worker", "wrong").ping()
    w = client(acl_proxy, "worker", "w-pass")
    with pytest.raises(redis.exceptions.NoPermissionError):
        w.get("nope")
    log = client(acl_proxy, "auditor", "a-pass").execute_command("ACL", "LOG")
    reasons = [dict(zip(e[::2], e[1::2], strict=True)) if isinstance(e, list) else e for e in log]
    assert {e[b"reason"] for e in reasons} >= {b"key", b"auth"}


def test_sighup_reloads_rules_and_closes_removed_users(acl_proxy: ProxyProcess, tmp_path: Path) -> None:
    w = client(acl_proxy, "worker", "w-pass")
    r = client(acl_proxy, "reader", "r-pass")
    assert w.set("celery-x", "1") and r.get("celery-x") == b"1"
    # The worker loses SET; the reader is removed.
    (tmp_path / "users.acl").write_text("user default off\nuser worker on >w-pass ~celery* +@read +ping +hello\n")
    acl_proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "reloaded users and rules" not in acl_proxy.logs():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(redis.exceptions.NoPermissionError):
        w.set("celery-x", "2")  # same connection, new rules
    assert w.get("celery-x") == b"1"
    with pytest.raises(redis.ConnectionError):
        r.get("celery-x")  # the reader's connection was closed
    # A broken file keeps the old rules.
    (tmp_path / "users.acl").write_text("user worker on +nosuchcommand\n")
    acl_proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "reload failed" not in acl_proxy.logs():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert w.get("celery-x") == b"1"
    assert "users.acl:1" in acl_proxy.logs()


ROLES = """
[acl]
rules = ["user default off"]

[[acl.roles]]
name = "worker"
role = "worker(default)"
passwords = ["w"]

[[acl.roles]]
name = "producer"
role = "producer(default) + result_reader"
passwords = ["p"]

[[acl.roles]]
name = "flower"
role = "monitor"
passwords = ["f"]
"""


def test_celery_roles_from_the_config(redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]) -> None:
    """[[acl.roles]]: a producer can publish but not consume, a worker cannot FLUSHALL, a monitor cannot publish;
    EVALSHA only for the listed scripts."""
    p = start_proxy(redis_server.url(), config=ROLES)
    producer, worker, flower = client(p, "producer", "p"), client(p, "worker", "w"), client(p, "flower", "f")
    assert producer.lpush("default", "task") == 1
    with pytest.raises(redis.exceptions.NoPermissionError):
        producer.brpop(["default"], timeout=1)
    assert tuple(worker.brpop(["default"], timeout=1)) == (b"default", b"task")
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.flushall()
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.set("not-a-celery-key", "x")
    assert flower.llen("default") == 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        flower.publish("/0.celeryev/worker.heartbeat", "x")
    with pytest.raises(redis.exceptions.NoPermissionError, match="script"):
        worker.evalsha("0" * 40, 0)
