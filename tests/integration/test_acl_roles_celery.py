"""The Celery roles with real Celery 5.7: a worker and a producer that hold only their role's permissions run tasks,
results, chords, events and remote control; and each role is refused what it must not do.

Redis enforces the rules here (the ACL file is loaded with ``--aclfile``): test_acl_differential.py shows that
brokerproxy's check gives the same verdicts as Redis for the same file, role users included, and each refusal
below is also checked against ``AclPolicy`` loaded from the same file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery, chord, group

from brokerproxy import acl_roles, resp
from brokerproxy.acl import UserTable
from tests.conftest import ProxyProcess, RedisServer, free_port
from tests.integration.celery_app import make_app
from tests.integration.test_celery_e2e import Stack, Worker

QUEUES = ["celery", "alpha", "beta", "prio", "drain"]
STEPS = range(10)  # celery_app uses priority_steps 0..9
PASSWORDS = {"worker": "w-pw", "producer": "p-pw", "monitor": "m-pw", "admin": "a-pw"}


def acl_text() -> str:
    return "\n".join(
        [
            "user default off",
            f"user admin on >{PASSWORDS['admin']} +@all ~* &*",
            acl_roles.worker(QUEUES, priority_steps=STEPS).line("worker", f">{PASSWORDS['worker']}"),
            acl_roles.producer(QUEUES, control=True, priority_steps=STEPS).line(
                "producer", f">{PASSWORDS['producer']}"
            ),
            acl_roles.monitor(priority_steps=STEPS).line("monitor", f">{PASSWORDS['monitor']}"),
            "",
        ]
    )


class RoleStack(Stack):
    """The e2e stack with the worker's credentials in the worker's environment: either Redis enforces the ACL
    file (``--aclfile``), or brokerproxy does, in front of a Redis without ACLs (``[acl] file``)."""

    @property
    def port(self) -> int:
        return self.proxy.port if self.proxy is not None else self.redis.port

    def creds_url(self, user: str, db: int) -> str:
        return f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{self.port}/{db}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "BROKER_URL": self.creds_url("worker", 0),
            "RESULT_URL": self.creds_url("worker", 1),
            "STATE_URL": self.creds_url("admin", 2),  # the tasks' own side effects, not Celery's
        }

    def client(self, user: str) -> redis.Redis:
        return redis.Redis(port=self.port, username=user, password=PASSWORDS[user])


@pytest.fixture(scope="module", params=["redis-enforces", "proxy-enforces"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoleStack]:
    tmp = tmp_path_factory.mktemp("roles")
    rdir = tmp / "redis"
    rdir.mkdir()
    acl = rdir / "users.acl"
    acl.write_text(acl_text())
    if request.param == "redis-enforces":
        s = RoleStack(RedisServer(rdir, "--aclfile", str(acl)), None, tmp)
    else:
        server = RedisServer(rdir)
        conf = tmp / "proxy.toml"
        conf.write_text(f'[acl]\nfile = "{acl}"\n')
        port = free_port()
        args = ["--listen", f"127.0.0.1:{port}", "--upstream", server.url(), "--config", str(conf)]
        s = RoleStack(server, ProxyProcess(args, None, tmp / "proxy.log", port).wait_ready(), tmp)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def producer_app(stack: RoleStack) -> Celery:
    app = make_app(stack.creds_url("producer", 0), stack.creds_url("producer", 1), stack.creds_url("admin", 2))
    stack.apps.append(app)
    return app


@pytest.fixture(scope="module")
def worker(stack: RoleStack, producer_app: Celery) -> Worker:
    w = stack.worker("celery,alpha,beta", events=True, prefix="role")
    # wait_ready also pings the worker through pidbox: the producer's remote control works.
    return w.wait_ready(producer_app)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> UserTable:
    return UserTable.from_acl(acl_text(), "users.acl")


def test_worker_and_producer_run_tasks_results_and_chords(
    producer_app: Celery, worker: Worker, stack: RoleStack
) -> None:
    tasks = producer_app.tasks
    try:
        assert tasks["e2e.add"].delay(2, 3).get(timeout=20) == 5
        assert tasks["e2e.mul"].apply_async((3, 4), queue="alpha").get(timeout=20) == 12
        assert group(tasks["e2e.add"].s(i, i) for i in range(5))().get(timeout=20) == [0, 2, 4, 6, 8]
        result = chord([tasks["e2e.add"].s(i, i) for i in range(4)])(tasks["e2e.tsum"].s())
        assert result.get(timeout=20) == 12
        assert tasks["e2e.flaky"].delay("roles:flaky", 2).get(timeout=20) == 3  # retries republish
        with pytest.raises(ValueError, match="boom"):
            tasks["e2e.boom"].delay().get(timeout=20)
        replies = producer_app.control.inspect(destination=[worker.name], timeout=2).active_queues()
        assert replies is not None and worker.name in replies
    except Exception as exc:
        raise AssertionError(f"{exc}\n{stack.diag()}") from exc


def test_roles_leave_no_acl_denials_behind(producer_app: Celery, worker: Worker, stack: RoleStack) -> None:
    tasks = producer_app.tasks
    tasks["e2e.add"].delay(1, 1).get(timeout=20)
    log = stack.client("admin").acl_log()
    celery_users = [e for e in log if e["username"] in ("worker", "producer")]
    assert celery_users == [], celery_users


REFUSED = [
    ("producer", ["BRPOP", "celery", "0.1"]),  # a producer cannot consume
    ("producer", ["RPOP", "celery"]),
    ("producer", ["LMOVE", "celery", "x", "LEFT", "LEFT"]),
    ("producer", ["DEL", "celery"]),
    ("producer", ["HGETALL", "unacked"]),
    ("worker", ["FLUSHALL"]),  # a worker cannot wipe the broker
    ("worker", ["FLUSHDB"]),
    ("worker", ["KEYS", "*"]),
    ("worker", ["CONFIG", "SET", "appendonly", "no"]),
    ("worker", ["LPUSH", "someone-elses-queue", "x"]),
    ("monitor", ["PUBLISH", "/0.celery.pidbox", "x"]),  # a monitor cannot publish
    ("monitor", ["LPUSH", "celery", "x"]),
    ("monitor", ["HGETALL", "unacked"]),
]


@pytest.mark.parametrize(("user", "command"), REFUSED)
def test_roles_refuse(stack: RoleStack, policy: UserTable, user: str, command: list[str]) -> None:
    client = stack.client(user)
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command(*command)
    args = [c.encode() for c in command]
    assert policy.policy.check(user, resp.Request(args, b"")) is not None


def test_roles_allow_what_they_need(stack: RoleStack, policy: UserTable) -> None:
    monitor = stack.client("monitor")
    assert isinstance(monitor.llen("celery"), int) and isinstance(monitor.hlen("unacked"), int)
    pubsub = monitor.pubsub()
    pubsub.psubscribe("/0.celeryev/*")  # Flower's subscription: allowed, literally
    pubsub.close()
    producer = stack.client("producer")
    assert producer.lpush("drain", "x") == 1
    assert stack.client("worker").rpop("drain") == b"x"


def test_acl_file_is_readable_by_brokerproxy_and_redis(stack: RoleStack, tmp_path: Path) -> None:
    if stack.proxy is not None:  # the proxy loaded it: every user authenticates through it
        for user in PASSWORDS:
            assert stack.client(user).ping() is True
        assert stack.client("admin").execute_command("ACL", "WHOAMI") in ("admin", b"admin")
        return
    users = stack.client("admin").acl_users()
    assert sorted(users) == sorted(["default", "admin", "worker", "producer", "monitor"])


def test_warm_shutdown_needs_nothing_more(producer_app: Celery, worker: Worker, stack: RoleStack) -> None:
    # Last in this module: stops the shared worker. At a warm shutdown kombu restores, unbinds and deletes its
    # queues (SREM, DEL, MULTI): all within the worker role.
    stack.client("admin").acl_log_reset()
    producer_app.tasks["e2e.add"].delay(5, 5).get(timeout=20)
    assert worker.terminate() == 0, worker.log_tail()
    denials = [e for e in stack.client("admin").acl_log() if e["username"] in ("worker", "producer")]
    assert denials == [], denials
