"""End to end: a real Celery 5.7 prefork worker and a Celery client, both talking to Redis through brokerproxy.

Broker on db 0, result backend on db 1 (so every backend connection sends ``SELECT``), task side effects on db 2;
all three through the proxy. Assertions about side effects read Redis directly.

Most tests share one module-scoped worker (queues celery, alpha, beta; ``-E``). The priority and warm-shutdown
tests stop and start workers, so they get their own Redis and proxy.

``E2E_TARGET=direct`` runs the same tests straight against redis-server, with no proxy: when a test fails through
the proxy and passes direct, the proxy is at fault.
"""

from __future__ import annotations

import base64
import collections
import gc
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, chord, group
from celery.exceptions import TaskRevokedError

from tests.conftest import ProxyProcess, RedisServer, free_port
from tests.integration.celery_app import make_app

REPO = Path(__file__).resolve().parents[2]
APP_MODULE = "tests.integration.celery_app"
DIRECT = os.environ.get("E2E_TARGET", "proxy") == "direct"
TIMEOUT = 20.0  # per result; a healthy run needs well under a second

BROKER_DB, RESULT_DB, STATE_DB = 0, 1, 2


# ------------------------------------------------------------------------------------------------ helpers


def wait_until(what: str, pred: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Stack:
    """A Redis, optionally a proxy in front of it, and the URLs Celery should use."""

    redis: RedisServer
    proxy: ProxyProcess | None
    tmp: Path
    workers: list[Worker] = field(default_factory=list)
    apps: list[Celery] = field(default_factory=list)

    def url(self, db: int) -> str:
        return self.proxy.url(db) if self.proxy is not None else self.redis.url(db)

    @property
    def env(self) -> dict[str, str]:
        return {
            "BROKER_URL": self.url(BROKER_DB),
            "RESULT_URL": self.url(RESULT_DB),
            "STATE_URL": self.url(STATE_DB),
        }

    def state(self) -> redis.Redis:
        """Straight to Redis, bypassing the proxy."""
        return self.redis.client(db=STATE_DB)

    def broker(self) -> redis.Redis:
        return self.redis.client(db=BROKER_DB)

    def app(self, result_url: str | None = None) -> Celery:
        a = make_app(self.url(BROKER_DB), result_url or self.url(RESULT_DB), self.url(STATE_DB), main="client")
        self.apps.append(a)
        return a

    def worker(
        self,
        queues: str,
        *,
        concurrency: int = 2,
        events: bool = False,
        prefix: str = "w",
        options: tuple[str, ...] = (),
    ) -> Worker:
        w = Worker(self, queues, concurrency=concurrency, events=events, prefix=prefix, options=options)
        self.workers.append(w)
        return w

    def diag(self) -> str:
        """What to print when something goes wrong: worker logs and the proxy log."""
        parts = [f"--- worker {w.name} (rc={w.proc.poll()}) ---\n{w.log_tail()}" for w in self.workers]
        if self.proxy is not None:
            parts.append(f"--- proxy log ---\n{tail(self.proxy.logs())}")
        return "\n".join(parts)

    def close(self) -> None:
        try:
            for w in self.workers:
                w.kill()
            # Celery's AsyncResult.__del__ talks to the result backend: let it run now, while Redis still
            # answers, rather than at some later garbage collection inside another test.
            gc.collect()
            for a in self.apps:
                a.close()
        finally:
            if self.proxy is not None:
                try:
                    self.proxy.stop(signal.SIGTERM, timeout=40)
                except subprocess.TimeoutExpired:
                    self.proxy.proc.kill()
                    self.proxy.proc.wait(10)
            self.redis.stop()


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def make_stack(tmp: Path) -> Stack:
    rdir = tmp / "redis"
    rdir.mkdir()
    server = RedisServer(rdir)
    if DIRECT:
        return Stack(server, None, tmp)
    port = free_port()
    proxy = ProxyProcess(["--listen", f"127.0.0.1:{port}", "--upstream", server.url(0)], None, tmp / "proxy.log", port)
    try:
        proxy.wait_ready()
    except BaseException:
        proxy.proc.kill()
        proxy.proc.wait(10)
        server.stop()
        raise
    return Stack(server, proxy, tmp)


class Worker:
    """``celery worker -P prefork`` in its own process group, logging to a file."""

    def __init__(
        self, stack: Stack, queues: str, *, concurrency: int, events: bool, prefix: str, options: tuple[str, ...] = ()
    ) -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}@e2e"
        self.log_path = stack.tmp / f"{self.name}.log"
        argv = [
            sys.executable, "-m", "celery", "-A", APP_MODULE, "worker",
            "-P", "prefork", "-c", str(concurrency), "-Q", queues, "-n", self.name,
            "-l", "info", "--prefetch-multiplier", "1",
        ]
        if events:
            argv.append("-E")
        argv += options
        env = {**os.environ, **stack.env, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_tail(self, lines: int = 60) -> str:
        self._log.flush()
        return tail(self.log_path.read_text(errors="replace"), lines)

    def wait_ready(self, app: Celery, timeout: float = 45.0) -> Worker:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            return " ready." in self.log_path.read_text(errors="replace")

        try:
            wait_until(f"worker {self.name} ready", ready, timeout, 0.1)
            # Remote control goes through pidbox: PUBLISH, PSUBSCRIBE, the reply queue (LPUSH/BRPOP).
            wait_until(f"worker {self.name} answering ping", lambda: app.control.ping([self.name], timeout=1.0), 15)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None
        return self

    def terminate(self, timeout: float = 60.0) -> int:
        """Warm shutdown: SIGTERM to the main process only (the pool children are its business)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """The whole process group, pool children included, whatever state the worker is in."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        finally:
            self._log.close()


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = make_stack(tmp_path_factory.mktemp("e2e"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def app(stack: Stack) -> Celery:
    return stack.app()


@pytest.fixture(scope="module")
def worker(stack: Stack, app: Celery) -> Worker:
    return stack.worker("celery,alpha,beta", concurrency=2, events=True, prefix="main").wait_ready(app)


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    """A fresh Redis (and proxy) for tests that stop and start workers."""
    s = make_stack(tmp_path)
    try:
        yield s
    finally:
        s.close()


def T(app: Celery, name: str) -> Any:
    return app.tasks[f"e2e.{name}"]


# ------------------------------------------------------------------------------------------------ tests


def test_plain_results(app: Celery, worker: Worker, stack: Stack) -> None:
    try:
        assert T(app, "add").delay(2, 3).get(timeout=TIMEOUT) == 5
        assert T(app, "mul").apply_async((6, 7)).get(timeout=TIMEOUT) == 42
        results = [T(app, "add").delay(i, i) for i in range(20)]
        assert [r.get(timeout=TIMEOUT) for r in results] == [2 * i for i in range(20)]
        r = T(app, "add").delay(1, 1)
        r.get(timeout=TIMEOUT)
        assert r.state == "SUCCESS"
    except Exception as exc:
        raise AssertionError(f"{exc!r}\n{stack.diag()}") from exc
    # The result really is in db 1 on the server (the backend's SELECT went through).
    assert stack.redis.client(db=RESULT_DB).exists(f"celery-task-meta-{r.id}")
    assert not stack.redis.client(db=BROKER_DB).exists(f"celery-task-meta-{r.id}")


def test_failure_propagates(app: Celery, worker: Worker, stack: Stack) -> None:
    r = T(app, "boom").delay("kaboom")
    with pytest.raises(ValueError, match="kaboom"):
        r.get(timeout=TIMEOUT)
    assert r.state == "FAILURE"
    assert r.traceback and "ValueError" in r.traceback


def test_retries(app: Celery, worker: Worker, stack: Stack) -> None:
    key = f"flaky:{uuid.uuid4().hex}"
    r = T(app, "flaky").delay(key, 3)
    assert r.get(timeout=TIMEOUT) == 4, stack.diag()
    assert int(stack.state().get(key) or 0) == 4


def test_group_and_chord(app: Celery, worker: Worker, stack: Stack) -> None:
    g = group(T(app, "mul").s(i, i) for i in range(10))()
    assert g.get(timeout=TIMEOUT) == [i * i for i in range(10)], stack.diag()
    c = chord(T(app, "add").s(i, i) for i in range(8))(T(app, "tsum").s())
    assert c.get(timeout=TIMEOUT) == sum(2 * i for i in range(8)), stack.diag()
    # A chord whose header runs on alpha and beta, and whose callback runs on beta.
    header = [T(app, "add").s(1, 1).set(queue="alpha"), T(app, "add").s(2, 2).set(queue="beta")]
    c2 = chord(header)(T(app, "tsum").s().set(queue="beta"))
    assert c2.get(timeout=TIMEOUT) == 6, stack.diag()


def test_several_queues(app: Celery, worker: Worker, stack: Stack) -> None:
    for queue in ("alpha", "beta", "celery"):
        got = T(app, "whereami").apply_async(queue=queue).get(timeout=TIMEOUT)
        assert got == {"routing_key": queue, "hostname": worker.name}
    assert stack.broker().llen("alpha") == 0
    assert stack.broker().llen("beta") == 0


def test_inspect_ping_cli(stack: Stack, worker: Worker) -> None:
    env = {**os.environ, **stack.env, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP_MODULE, "inspect", "ping", "-d", worker.name, "--timeout", "5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{stack.diag()}"
    assert "pong" in out.stdout
    assert worker.name in out.stdout


def test_revoke_before_run(app: Celery, worker: Worker, stack: Stack) -> None:
    key = f"revoke:{uuid.uuid4().hex}"
    tid = str(uuid.uuid4())
    app.control.revoke(tid)

    def revoked_on_worker() -> bool:
        replies = app.control.inspect([worker.name], timeout=1.0).revoked() or {}
        return tid in replies.get(worker.name, [])

    wait_until("the worker to know the revoke", revoked_on_worker)
    r = T(app, "record").apply_async((key,), task_id=tid)
    with pytest.raises(TaskRevokedError):
        r.get(timeout=TIMEOUT)
    assert r.state == "REVOKED"
    # The worker still runs other work, and the revoked task never ran.
    assert T(app, "record").delay(key).get(timeout=TIMEOUT) != tid
    assert tid.encode() not in stack.state().lrange(key, 0, -1)


def test_revoke_eta_task(app: Celery, worker: Worker, stack: Stack) -> None:
    """Revoked while the worker already holds it (countdown): it must not run when its ETA comes."""
    key = f"revoke-eta:{uuid.uuid4().hex}"
    countdown = 2.0
    due = time.monotonic() + countdown
    r = T(app, "record").apply_async((key,), countdown=countdown)
    wait_until("the worker to hold the ETA task", lambda: _scheduled(app, worker, r.id))
    app.control.revoke(r.id)
    with pytest.raises(TaskRevokedError):
        r.get(timeout=TIMEOUT)
    assert r.state == "REVOKED"
    # Past its ETA (and then some), it still has not run.
    time.sleep(max(0.0, due - time.monotonic()) + 1.0)
    assert stack.state().llen(key) == 0, stack.diag()
    assert r.state == "REVOKED"


def _scheduled(app: Celery, worker: Worker, tid: str) -> bool:
    replies = app.control.inspect([worker.name], timeout=1.0).scheduled() or {}
    return any(entry["request"]["id"] == tid for entry in replies.get(worker.name, []))


def _events(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The Celery events in one ``/0.celeryev/...`` pub/sub message (``task.multi`` carries a list)."""
    if message.get("type") != "pmessage":
        return []
    envelope = json.loads(message["data"])
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    decoded = json.loads(body)
    return decoded if isinstance(decoded, list) else [decoded]


@pytest.mark.parametrize("protocol", [3, 2])
def test_worker_events(app: Celery, worker: Worker, stack: Stack, protocol: int) -> None:
    """The -E worker's task events reach a plain PSUBSCRIBE through the proxy, in RESP3 push frames and RESP2."""
    sub_client = redis.Redis.from_url(stack.url(BROKER_DB), protocol=protocol)
    pubsub = sub_client.pubsub()
    try:
        pubsub.psubscribe(f"/{BROKER_DB}.celeryev/*")
        wait_until("psubscribe reply", lambda: (pubsub.get_message(timeout=0.2) or {}).get("type") == "psubscribe")
        r = T(app, "add").delay(20, 22)
        assert r.get(timeout=TIMEOUT) == 42
        seen: dict[str, set[str]] = collections.defaultdict(set)
        deadline = time.monotonic() + TIMEOUT
        while "task-succeeded" not in seen[r.id] and time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=0.5)
            for event in _events(msg or {}):
                if "uuid" in event:
                    seen[event["uuid"]].add(event["type"])
        assert {"task-received", "task-started", "task-succeeded"} <= seen[r.id], f"{dict(seen)}\n{stack.diag()}"
    finally:
        pubsub.close()
        sub_client.close()


def test_event_receiver(app: Celery, worker: Worker, stack: Stack) -> None:
    """celery.events.Receiver (kombu's fanout consumer: PSUBSCRIBE through the proxy) sees the task's events."""
    seen: list[str] = []
    sent: dict[str, str] = {}

    def on_event(event: dict[str, Any]) -> None:
        seen.append(event.get("type", "?"))
        if not sent:
            # The first event (a worker heartbeat, every 2 s) proves the subscription is live: publish now.
            sent["id"] = T(app, "mul").delay(6, 7).id
        elif event.get("type") == "task-succeeded" and event.get("uuid") == sent["id"]:
            receiver.should_stop = True

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_event})
        try:
            receiver.capture(limit=None, timeout=TIMEOUT, wakeup=False)
        except TimeoutError:
            pass
    assert receiver.should_stop, f"no task-succeeded for {sent}: {seen}\n{stack.diag()}"
    assert app.AsyncResult(sent["id"]).get(timeout=TIMEOUT) == 42


def test_result_backend_resp2(stack: Stack, worker: Worker) -> None:
    """redis-py speaking RESP2 to the backend (``?protocol=2``: no HELLO, RESP2 pub/sub messages)."""
    app2 = stack.app(result_url=stack.url(RESULT_DB) + "?protocol=2")
    assert T(app2, "add").delay(40, 2).get(timeout=TIMEOUT) == 42, stack.diag()
    with pytest.raises(ValueError, match="resp2"):
        T(app2, "boom").delay("resp2").get(timeout=TIMEOUT)
    assert group(T(app2, "add").s(i, 1) for i in range(5))().get(timeout=TIMEOUT) == [1, 2, 3, 4, 5]
    c = chord(T(app2, "add").s(i, i) for i in range(4))(T(app2, "tsum").s())
    assert c.get(timeout=TIMEOUT) == 12
    key = f"flaky2:{uuid.uuid4().hex}"
    assert T(app2, "flaky").delay(key, 1).get(timeout=TIMEOUT) == 2


def test_proxy_log_clean(stack: Stack) -> None:
    """After all of the above, the proxy logged nothing at warning level or worse."""
    if stack.proxy is None:
        pytest.skip("direct to Redis")
    bad = []
    for line in stack.proxy.logs().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if entry.get("level") not in ("debug", "info"):
            bad.append(line)
    assert bad == [], "\n".join(bad)


def test_priorities(own_stack: Stack) -> None:
    """Published while no worker runs: priority 0 (Redis: highest) first, then 5, then 9, FIFO within each."""
    app = own_stack.app()
    key = "prio:order"
    record = T(app, "record")
    low = [record.apply_async((key,), queue="prio", priority=9).id for _ in range(3)]
    mid = [record.apply_async((key,), queue="prio", priority=5).id for _ in range(2)]
    high = [record.apply_async((key,), queue="prio", priority=0).id]
    broker = own_stack.broker()
    assert broker.llen("prio\x06\x169") == 3
    assert broker.llen("prio\x06\x165") == 2
    assert broker.llen("prio") == 1
    own_stack.worker("prio", concurrency=1, prefix="prio").wait_ready(app)
    state = own_stack.state()
    wait_until("all six to run", lambda: state.llen(key) == 6)
    order = [x.decode() for x in state.lrange(key, 0, -1)]
    assert order == high + mid + low, own_stack.diag()


def test_warm_shutdown_then_second_worker_drains(own_stack: Stack) -> None:
    """SIGTERM a worker with a slow task running and acks_late tasks queued: it finishes what it runs, gives back
    what it prefetched, and a second worker runs the rest. Every task runs exactly once."""
    app = own_stack.app()
    key = "drain:done"
    state = own_stack.state()
    broker = own_stack.broker()
    first = own_stack.worker("drain", concurrency=2, prefix="drainA").wait_ready(app)

    slow = T(app, "sleepy").apply_async((2.0, key), queue="drain")
    ids = [slow.id] + [T(app, "record").apply_async((key, 0.3), queue="drain").id for _ in range(20)]
    # Wait until the worker is busy (the slow task runs, a few records are done), then stop it.
    wait_until("the first worker to be busy", lambda: state.llen(key) >= 2, TIMEOUT)
    rc = first.terminate(timeout=60)
    assert rc == 0, own_stack.diag()
    done_by_first = [x.decode() for x in state.lrange(key, 0, -1)]
    assert slow.id in done_by_first, f"warm shutdown did not finish the running task\n{own_stack.diag()}"
    assert len(done_by_first) < len(ids), "the first worker ran everything; nothing left to drain"
    # Nothing stays unacked: what the first worker had prefetched went back to the queue.
    assert broker.hlen("unacked") == 0, own_stack.diag()
    assert broker.llen("drain") == len(ids) - len(done_by_first), own_stack.diag()

    own_stack.worker("drain", concurrency=2, prefix="drainB").wait_ready(app)
    wait_until("the second worker to drain the queue", lambda: state.llen(key) >= len(ids), 60)
    time.sleep(1.0)  # a duplicate would show up now
    done = [x.decode() for x in state.lrange(key, 0, -1)]
    counts = collections.Counter(done)
    assert {tid for tid, n in counts.items() if n != 1} == set(), f"ran more than once: {counts}"
    assert set(done) == set(ids)
    assert broker.llen("drain") == 0
    wait_until("acks", lambda: broker.hlen("unacked") == 0, 10)
    assert slow.get(timeout=TIMEOUT) == 2.0
