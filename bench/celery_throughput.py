#!/usr/bin/env python3
"""Celery throughput: publish-only rate and end-to-end tasks per second, Redis directly vs through brokerproxy.

Theory of operation. The script starts its own ``redis-server`` on a free loopback port and one
``python -m brokerproxy`` in front of it (the helpers of ``e2e_redis_benchmark.py``), and two real Celery prefork
workers (``-c 2``, the app of ``tests/integration/celery_app.py``): one talking to Redis directly (broker db 0,
result backend db 1), one talking through the proxy (broker db 3, result backend db 4), both consuming the queue
``celery``. Separate databases keep the two paths apart (kombu's broadcast channels carry the db number too); both
workers stay up for the whole run, so the idle one's polling (a ``BRPOP`` with a timeout) is there in both halves.

Per repeat, in order:

* **publish-only**, direct then proxy: ``apply_async`` of ``e2e.add`` in a loop, N tasks to the queue ``alpha``,
  which no worker consumes, from a client app with no result backend, so each call is the broker publish alone
  (kombu's ``LPUSH``, and its exchange-table look-up). Rate = N / elapsed. The queue is checked to hold N
  messages and then emptied (directly on Redis).
* **end-to-end**, direct then proxy: ``apply_async`` of ``e2e.add`` N times from a client app with the Redis
  result backend, then ``get()`` every result (checked), all through the same path as that path's worker.
  Rate = N / (time from the first ``apply_async`` to the last result). The app tracks STARTED states
  (``task_track_started``) as the test app does: every task writes its result meta twice.

Ratios are proxy / direct per repeat (the proxy run over the direct run just before it), median and range.

Usage::

    python bench/celery_throughput.py [--quick] [--repeats N] [--publish N] [--tasks N] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DEFAULT_OUT,
    REPO,
    BenchError,
    Report,
    fmt_ratio,
    fmt_spread,
    log,
    paired,
    proxy_process,
    redis_server,
    run_benchmark,
    spread,
    tail,
)

sys.path.insert(0, str(REPO))

NAME = "celery_throughput"
APP_MODULE = "tests.integration.celery_app"
TARGETS = ("direct", "proxy")
DBS = {"direct": (0, 1), "proxy": (3, 4)}  # (broker, result backend)
PUBLISH_QUEUE = "alpha"
DEFAULT_REPEATS = 5
DEFAULT_PUBLISH = 2000
DEFAULT_TASKS = 400
QUICK = {"repeats": 1, "publish": 20, "tasks": 10}
WARMUP_PUBLISH = 100
WARMUP_TASKS = 40
RESULT_TIMEOUT_S = 120.0
WORKER_READY_TIMEOUT_S = 90.0
CONCURRENCY = 2


class Worker:
    """``celery worker -P prefork -c 2`` in its own process group, logging to a file."""

    def __init__(self, name: str, broker: str, backend: str, workdir: Path) -> None:
        self.name = f"bench-{name}-{uuid.uuid4().hex[:6]}@bench"
        self.log_path = workdir / f"worker-{name}.log"
        self.argv = [
            sys.executable, "-m", "celery", "-A", APP_MODULE, "worker", "-P", "prefork", "-c", str(CONCURRENCY),
            "-Q", "celery", "-n", self.name, "-l", "info", "--prefetch-multiplier", "1",
        ]
        env = {**os.environ, "BROKER_URL": broker, "RESULT_URL": backend, "PYTHONPATH": str(REPO),
               "PYTHONWARNINGS": "ignore"}
        env.pop("STATE_URL", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.env_shown = f"BROKER_URL={broker} RESULT_URL={backend} PYTHONPATH=."

    def wait_ready(self, app: Any) -> None:
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"worker {self.name} exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            if " ready." in self.log_path.read_text(errors="replace") and app.control.ping([self.name], timeout=1.0):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"worker {self.name} not ready after {WORKER_READY_TIMEOUT_S}s:\n"
                                 f"{tail(self.log_path)}")
            time.sleep(0.2)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"worker {self.name} exited with {self.proc.returncode}:\n{tail(self.log_path)}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        finally:
            self._log.close()


def publish(app: Any, n: int) -> float:
    add = app.tasks["e2e.add"]
    t0 = time.perf_counter()
    for i in range(n):
        add.apply_async((i, i), queue=PUBLISH_QUEUE)
    return time.perf_counter() - t0


def end_to_end(app: Any, n: int) -> float:
    add = app.tasks["e2e.add"]
    t0 = time.perf_counter()
    results = [add.apply_async((i, i)) for i in range(n)]
    for i, r in enumerate(results):
        value = r.get(timeout=RESULT_TIMEOUT_S)
        if value != 2 * i:
            raise BenchError(f"task {r.id} returned {value!r}, wanted {2 * i}")
    return time.perf_counter() - t0


def empty_queue(redis_client: Any, n: int) -> None:
    keys = list(redis_client.scan_iter(match=f"{PUBLISH_QUEUE}*"))
    held = sum(redis_client.llen(k) for k in keys)
    if held != n:
        raise BenchError(f"the publish queue holds {held} messages after publishing {n}")
    if keys:
        redis_client.delete(*keys)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("publish", "end_to_end"):
        by_repeat: dict[int, dict[str, float]] = {}
        for r in runs:
            if r["kind"] == kind:
                by_repeat.setdefault(r["repeat"], {})[r["target"]] = r["per_s"]
        pairs = [v for _, v in sorted(by_repeat.items()) if set(v) == set(TARGETS)]
        d = [p["direct"] for p in pairs]
        x = [p["proxy"] for p in pairs]
        out[kind] = {"repeats": len(pairs), "direct": spread(d), "proxy": spread(x), "ratio": paired(d, x)}
    return out


def markdown(rep: Report, body: dict[str, Any]) -> str:
    cfg, cmds, s = body["config"], body["commands"], body["summary"]
    rows = []
    for kind, label, unit in (("publish", "publish-only (apply_async, no result wait)", "tasks published/s"),
                              ("end_to_end", "end-to-end (apply_async + worker + result get)", "tasks/s")):
        e = s[kind]
        rows.append(f"| {label} | {unit} | {fmt_spread(e['direct'])} | {fmt_spread(e['proxy'])} "
                    f"| {fmt_ratio(e['ratio'])} |")
    return rep.header("Celery throughput: direct Redis vs through brokerproxy", cfg["quick"]) + f"""
## Commands

```
{cmds["redis_server"]}
{cmds["brokerproxy"]}
{cmds["worker_direct"]}
{cmds["worker_proxy"]}
```

Celery {body["versions"]["celery"]}, kombu {body["versions"]["kombu"]}, redis-py {body["versions"]["redis"]}.
Workers: prefork, concurrency {CONCURRENCY}, prefetch multiplier 1, queue `celery`; the direct one on db
{DBS["direct"][0]}/{DBS["direct"][1]} of Redis, the proxied one on db {DBS["proxy"][0]}/{DBS["proxy"][1]} through
brokerproxy (broker/results). Per repeat: publish-only with {cfg["publish"]} tasks direct then proxy, then
end-to-end with {cfg["tasks"]} tasks direct then proxy; {cfg["repeats"]} repeat(s), after a warm-up of each.

## Results

Medians over repeats, "±x%" half the range as a share of the median; ratio = proxy ÷ direct per repeat, median
(min-max). 1.00 = as fast as direct Redis.

| run | unit | direct | proxy | ratio |
|---|---|---:|---:|---|
""" + "\n".join(rows) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run for the test suite; figures mean nothing")
    p.add_argument("--repeats", type=int, help=f"A B pairs (default {DEFAULT_REPEATS})")
    p.add_argument("--publish", type=int, help=f"tasks per publish-only run (default {DEFAULT_PUBLISH})")
    p.add_argument("--tasks", type=int, help=f"tasks per end-to-end run (default {DEFAULT_TASKS})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else {"repeats": DEFAULT_REPEATS, "publish": DEFAULT_PUBLISH,
                                         "tasks": DEFAULT_TASKS}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        if getattr(args, key) < 1:
            p.error(f"--{key} must be positive")
    return args


def measure(args: argparse.Namespace, redis_bin: str) -> dict[str, Any]:
    import celery
    import kombu
    import redis

    from tests.integration.celery_app import make_app

    runs: list[dict[str, Any]] = []
    workers: list[Worker] = []
    apps: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="brokerproxy-celery-") as tmp:
        workdir = Path(tmp)
        with redis_server(redis_bin, workdir) as (redis_port, redis_cmd), proxy_process(
            redis_port, workdir
        ) as (proxy_port, proxy_cmd, proxy_proc, proxy_log):
            ports = {"direct": redis_port, "proxy": proxy_port}

            def url(target: str, db: int) -> str:
                return f"redis://127.0.0.1:{ports[target]}/{db}"

            try:
                w = {t: Worker(t, url(t, DBS[t][0]), url(t, DBS[t][1]), workdir) for t in TARGETS}
                workers += w.values()
                pub = {t: make_app(url(t, DBS[t][0]), None, None, main=f"bench-pub-{t}") for t in TARGETS}
                e2e = {t: make_app(url(t, DBS[t][0]), url(t, DBS[t][1]), None, main=f"bench-e2e-{t}")
                       for t in TARGETS}
                apps += [*pub.values(), *e2e.values()]
                queue_db = {t: redis.Redis(port=redis_port, db=DBS[t][0]) for t in TARGETS}
                for t in TARGETS:
                    w[t].wait_ready(e2e[t])
                log("workers ready")

                def check() -> None:
                    if proxy_proc.poll() is not None:
                        raise BenchError(f"brokerproxy exited with {proxy_proc.returncode}:\n{tail(proxy_log)}")
                    for wk in workers:
                        wk.check()

                warm_pub = 5 if args.quick else WARMUP_PUBLISH
                warm_e2e = 2 if args.quick else WARMUP_TASKS
                for t in TARGETS:
                    publish(pub[t], warm_pub)
                    empty_queue(queue_db[t], warm_pub)
                    end_to_end(e2e[t], warm_e2e)
                check()
                for repeat in range(args.repeats):
                    for t in TARGETS:
                        elapsed = publish(pub[t], args.publish)
                        empty_queue(queue_db[t], args.publish)
                        runs.append({"repeat": repeat, "kind": "publish", "target": t, "n": args.publish,
                                     "elapsed_s": elapsed, "per_s": args.publish / elapsed})
                        check()
                    for t in TARGETS:
                        elapsed = end_to_end(e2e[t], args.tasks)
                        runs.append({"repeat": repeat, "kind": "end_to_end", "target": t, "n": args.tasks,
                                     "elapsed_s": elapsed, "per_s": args.tasks / elapsed})
                        check()
                    last = {(r["kind"], r["target"]): r["per_s"] for r in runs if r["repeat"] == repeat}
                    log(f"[{repeat + 1}/{args.repeats}] publish/s direct {last['publish', 'direct']:,.0f} "
                        f"proxy {last['publish', 'proxy']:,.0f}   tasks/s direct {last['end_to_end', 'direct']:,.1f} "
                        f"proxy {last['end_to_end', 'proxy']:,.1f}")
            finally:
                for a in apps:
                    a.close()
                for wk in workers:
                    wk.kill()
            worker_cmds = {t: f"{w[t].env_shown} {shlex.join(w[t].argv)}" for t in TARGETS}
    return {
        "config": {
            "quick": args.quick, "repeats": args.repeats, "publish": args.publish, "tasks": args.tasks,
            "concurrency": CONCURRENCY, "dbs": DBS, "publish_queue": PUBLISH_QUEUE,
            "order": "per repeat: publish direct, publish proxy, end-to-end direct, end-to-end proxy",
        },
        "versions": {"celery": celery.__version__, "kombu": kombu.__version__, "redis": redis.__version__},
        "commands": {
            "redis_server": shlex.join(redis_cmd), "brokerproxy": shlex.join(proxy_cmd),
            "worker_direct": worker_cmds["direct"], "worker_proxy": worker_cmds["proxy"],
        },
        "runs": runs,
        "summary": summarize(runs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(NAME, "bench/celery_throughput.py", argv, parse_args, measure, markdown, "## Results")


if __name__ == "__main__":
    sys.exit(main())
