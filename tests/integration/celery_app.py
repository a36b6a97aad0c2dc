"""A small Celery app for the end-to-end tests, configured from the environment.

The worker runs as ``celery -A tests.integration.celery_app worker`` with:

* ``BROKER_URL``: the kombu broker (the proxy, ``redis://127.0.0.1:<port>/0``);
* ``RESULT_URL``: the result backend (the proxy, another db to exercise ``SELECT``);
* ``STATE_URL``: a Redis db the tasks write their side effects to (retry counters, the ``record`` lists), so tests
  can check "ran exactly once" straight on the server.

Tests build their own client apps with :func:`make_app` (same task names, their own URLs); the module-level ``app``
is the one the worker uses. Building an app opens no connection.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery
from kombu import Queue

# Every queue the tests use. "prio" and "drain" get workers of their own.
QUEUES = ("celery", "alpha", "beta", "prio", "drain")


def make_app(broker_url: str, result_url: str | None, state_url: str | None, *, main: str = "e2e") -> Celery:
    app = Celery(main, broker=broker_url, backend=result_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue="celery",
        task_queues=[
            Queue("celery"),
            Queue("alpha"),
            Queue("beta"),
            Queue("prio", queue_arguments={"x-max-priority": 10}),
            Queue("drain"),
        ],
        task_track_started=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "priority_steps": list(range(10)),
            "queue_order_strategy": "priority",
            "visibility_timeout": 3600,
        },
        result_expires=3600,
        worker_hijack_root_logger=False,
    )

    client: dict[int, redis.Redis] = {}

    def state() -> redis.Redis:
        # One client per process: the worker's pool children are forked after import.
        pid = os.getpid()
        if pid not in client:
            if state_url is None:
                raise RuntimeError("STATE_URL is not set")
            client.clear()
            client[pid] = redis.Redis.from_url(state_url)
        return client[pid]

    @app.task(shared=False, name="e2e.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(shared=False, name="e2e.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(shared=False, name="e2e.tsum")
    def tsum(xs: list[int]) -> int:
        return sum(xs)

    @app.task(shared=False, name="e2e.boom")
    def boom(message: str = "boom") -> None:
        raise ValueError(message)

    @app.task(shared=False, bind=True, name="e2e.flaky", max_retries=10)
    def flaky(self: Any, key: str, failures: int) -> int:
        """Fails (and retries) ``failures`` times, counting attempts in ``key``; returns the attempt count."""
        attempt = int(state().incr(key))
        if attempt <= failures:
            raise self.retry(countdown=0.1)
        return attempt

    @app.task(shared=False, bind=True, name="e2e.sleepy", acks_late=True)
    def sleepy(self: Any, seconds: float, key: str | None = None) -> float:
        time.sleep(seconds)
        if key is not None:
            state().rpush(key, self.request.id)
        return seconds

    @app.task(shared=False, bind=True, name="e2e.record", acks_late=True)
    def record(self: Any, key: str, delay: float = 0.0) -> str:
        """Appends its own task id to the list ``key``: the list shows what ran, in order, and how often."""
        if delay:
            time.sleep(delay)
        state().rpush(key, self.request.id)
        return str(self.request.id)

    @app.task(shared=False, name="e2e.pause", acks_late=True, ignore_result=True, track_started=False)
    def pause(marker: str, seconds: float) -> None:
        """Creates the file ``marker``, then sleeps: a test freezes Redis meanwhile, so that the ack that follows is
        in flight when Redis dies (no result and no STARTED state: the ack is the first command after the body)."""
        with open(marker, "a"):
            pass
        time.sleep(seconds)

    @app.task(shared=False, bind=True, name="e2e.whereami")
    def whereami(self: Any) -> dict[str, Any]:
        info = self.request.delivery_info or {}
        return {"routing_key": info.get("routing_key"), "hostname": self.request.hostname}

    return app


app = make_app(
    os.environ.get("BROKER_URL", "memory://"),
    os.environ.get("RESULT_URL"),
    os.environ.get("STATE_URL"),
)
