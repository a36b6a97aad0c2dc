#!/usr/bin/env python3
"""ACL check micro-benchmark: nanoseconds per ``AclPolicy.check(user, request)``, the call the session makes for
every command of an authenticated client.

The table is realistic in size: Celery roles (worker, producer with remote control, result reader, monitor) over
six queues with a ``global_keyprefix``, an admin with ``+@all ~* &*``, and 200 more users with a dozen patterns each
(a user's verdicts are cached on that user, so other users cost nothing but a dict entry).

Cases: *cached* ones, whose verdict does not depend on the arguments (a command every selector refuses, or one a
selector allows with all keys and channels, or one that names none: ``MULTI``, ``PING``), and *per-argument*
ones, which find the keys or channels from the key specs and match them against the patterns (``LPUSH``,
``BRPOP`` over 4 priority lists, ``HSET unacked``, ``SETEX`` a result, ``PUBLISH`` an event, ``EVALSHA`` with the
script allowlist, ``MGET`` of 5 results, and a key refused). Each case is timed over ``--loops`` calls, ``--repeats``
times; the figure is the median ns per call, with the spread (half the range) over repeats.

Usage::

    python bench/acl_check.py [--loops N] [--repeats N] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure this checkout's code
from brokerproxy import acl_roles  # noqa: E402
from brokerproxy.acl import User, UserTable  # noqa: E402
from brokerproxy.resp import Request  # noqa: E402

PREFIX = "tenantA:"
QUEUES = ["celery", "default", "high", "low", "reports*", "emails"]
TAG = b"191ab4b7-5911-4d82-9c52-9e29a5d07315"
META = b"tenantA:celery-task-meta-fac9442f-c4b9-4b6a-a109-3a1b3fc160d5"


def build_table() -> UserTable:
    users = [
        acl_roles.role_user("worker", acl_roles.worker(QUEUES, keyprefix=PREFIX), passwords=["w"]),
        acl_roles.role_user("producer", acl_roles.producer(QUEUES, keyprefix=PREFIX, control=True), passwords=["p"]),
        acl_roles.role_user("reader", acl_roles.result_reader(result_keyprefix=PREFIX), passwords=["r"]),
        acl_roles.role_user("monitor", acl_roles.monitor(keyprefix=PREFIX), passwords=["m"]),
    ]
    admin = User("admin")
    admin.apply(["on", ">a", "+@all", "~*", "&*"])
    users.append(admin)
    for i in range(200):
        u = User(f"app{i}")
        u.apply(["on", f">pw{i}", "+@read", "+@write", "-@dangerous", *(f"~app{i}:k{j}:*" for j in range(12))])
        users.append(u)
    return UserTable(users)


def req(*args: bytes) -> Request:
    return Request(list(args), b"")


CASES: list[tuple[str, str, str, Request, bool]] = [
    # (kind, name, user, request, allowed)
    ("cached", "admin GET (allkeys)", "admin", req(b"GET", b"k"), True),
    ("cached", "worker MULTI (no keys)", "worker", req(b"MULTI"), True),
    ("cached", "worker PING", "worker", req(b"PING"), True),
    ("cached", "worker FLUSHALL (denied)", "worker", req(b"FLUSHALL"), False),
    ("cached", "monitor CONFIG GET (denied subcommand)", "monitor", req(b"CONFIG", b"GET", b"x"), False),
    ("per-argument", "worker LPUSH queue", "worker", req(b"LPUSH", b"tenantA:default", b"{...}"), True),
    (
        "per-argument",
        "worker BRPOP 4 lists",
        "worker",
        req(
            b"BRPOP",
            b"tenantA:default",
            b"tenantA:default\x06\x163",
            b"tenantA:default\x06\x166",
            b"tenantA:default\x06\x169",
            b"1",
        ),
        True,
    ),
    ("per-argument", "worker HSET unacked", "worker", req(b"HSET", b"tenantA:unacked", TAG, b"[...]"), True),
    ("per-argument", "worker SETEX result", "worker", req(b"SETEX", META, b"86400", b"{...}"), True),
    (
        "per-argument",
        "worker PUBLISH event",
        "worker",
        req(b"PUBLISH", b"tenantA:/0.celeryev/worker.heartbeat", b"{...}"),
        True,
    ),
    (
        "per-argument",
        "worker EVALSHA (allowlist)",
        "worker",
        req(b"EVALSHA", acl_roles.SCRIPT_LOCK_RELEASE.encode(), b"1", b"tenantA:unacked_mutex", b"t"),
        True,
    ),
    ("per-argument", "reader MGET 5 results", "reader", req(b"MGET", *[META] * 5), True),
    ("per-argument", "producer RPOP queue (denied key)", "producer", req(b"RPOP", b"tenantA:default"), False),
    ("per-argument", "app17 GET (12 patterns, last)", "app17", req(b"GET", b"app17:k11:x"), True),
]


def timed(check: object, user: str, request: Request, loops: int) -> float:
    f = check  # bound method
    rng = range(loops)
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        for _ in rng:
            f(user, request)  # type: ignore[operator]
        t1 = time.perf_counter_ns()
    finally:
        gc.enable()
    return (t1 - t0) / loops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    table = build_table()
    check = table.policy.check
    for _, name, user, request, allowed in CASES:
        verdict = check(user, request)
        if (verdict is None) != allowed:
            raise SystemExit(f"{name}: expected {'allowed' if allowed else 'denied'}, got {verdict!r}")
    empty = req(b"PING")
    baseline = statistics.median(timed(lambda u, r: None, "worker", empty, args.loops) for _ in range(args.repeats))

    rows = []
    for kind, name, user, request, _ in CASES:
        samples = [timed(check, user, request, args.loops) for _ in range(args.repeats)]
        med = statistics.median(samples)
        rows.append((kind, name, med, (max(samples) - min(samples)) / 2, min(samples)))
        print(f"{kind:13} {name:42} {med:8.0f} ns  ±{(max(samples) - min(samples)) / 2:.0f}", file=sys.stderr)

    lines = [
        "# ACL check: ns per `AclPolicy.check(user, request)`",
        "",
        f"Python {platform.python_version()} on {platform.machine()}, {time.strftime('%Y-%m-%d')}; "
        f"{args.loops} calls x {args.repeats} repeats per case; median ns per call (± half the range) and the "
        f"fastest repeat (the least disturbed by other work on the machine). An empty Python call costs "
        f"{baseline:.0f} ns here (included in every figure).",
        "",
        "| kind | case | ns per check (median) | fastest repeat |",
        "|---|---|---:|---:|",
        *(f"| {k} | {n} | {m:.0f} ± {s:.0f} | {lo:.0f} |" for k, n, m, s, lo in rows),
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "acl_check.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
