#!/usr/bin/env python3
"""Connections: the proxy's memory per idle client connection, and how fast it accepts a burst of connections.

Theory of operation. The script starts its own ``redis-server`` (``--maxclients`` raised) on a free loopback port
and ``python -m brokerproxy`` processes in front of it (the helpers of ``e2e_redis_benchmark.py``), with the soft
``RLIMIT_NOFILE`` of every process raised to the hard limit. The clients are asyncio protocols in this process.

* **Idle RSS.** For each level (1 000 and 10 000 connections) a fresh proxy is started, warmed up (20 connections
  opened, PINGed, closed), and its resident set size read from ``/proc/<pid>/status`` (VmRSS). Then the clients
  connect, 64 at a time; each sends one ``PING`` and waits for ``+PONG`` (so the proxy has opened its pinned
  upstream connection), then stays idle. After a settling pause the RSS is read again. Per connection:
  (RSS with N idle clients - RSS before) / N, which covers both sides the proxy holds per client (the client socket
  and the upstream socket, their transports, the session and its buffers). Redis's own RSS growth for the same N
  upstream connections is shown for scale. The proxy needs two descriptors per client; when the hard limit does not
  allow N, the level is lowered to what it allows and the report says so.
* **Burst accept.** 5 000 clients start connecting at the same moment; each sends ``PING`` on connect. Reported:
  the time until every client's ``connect()`` completed, and until every client had its ``+PONG`` (the proxy
  accepted it, made its session, opened the upstream connection and relayed the round trip). The same burst
  against Redis directly, alternating direct / proxy, gives the baseline; the ratio is proxy / direct per repeat.
  Between bursts the clients close and the script waits until Redis has seen every upstream connection go.

Usage::

    python bench/connections.py [--quick] [--levels N,N] [--burst N] [--repeats N] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DEFAULT_OUT,
    BenchError,
    Report,
    fmt_ratio,
    log,
    paired,
    proxy_process,
    raise_nofile,
    redis_server,
    rss_kib,
    run_benchmark,
    spread,
)

NAME = "connections"
DEFAULT_LEVELS = (1_000, 10_000)
DEFAULT_BURST = 5_000
DEFAULT_REPEATS = 3
QUICK_LEVELS = (50, 200)
QUICK_BURST = 200
QUICK_REPEATS = 1
OPEN_CONCURRENCY = 64  # below the proxy's listen backlog (asyncio's default, 100): no SYN is dropped
WARMUP_CONNECTIONS = 20
SETTLE_S = 1.0
#: A burst client with no +PONG after this long is given up on and counted as unanswered.
BURST_CLIENT_LIMIT_S = 30.0
QUICK_BURST_CLIENT_LIMIT_S = 10.0
FD_SLACK = 64  # descriptors a proxy process uses besides its connections (listener, log, epoll, Python)
PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"
TARGETS = ("direct", "proxy")
BURST_METRICS = ("all_connected_s", "answered_p50_s", "answered_p99_s", "all_answered_s")


def _raise_to_hard() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class PingClient(asyncio.Protocol):
    """Connects, sends PING, resolves ``done`` on +PONG, then stays open and idle."""

    def __init__(self, done: asyncio.Future[None], clock: Any) -> None:
        self.done = done
        self.clock = clock
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.connected_at = 0.0
        self.ponged_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected_at = self.clock()
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(PING)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.done.done() and len(self.buf) >= len(PONG):
            self.ponged_at = self.clock()
            if self.buf == PONG:
                self.done.set_result(None)
            else:
                self.done.set_exception(BenchError(f"unexpected reply {self.buf[:60]!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed before +PONG ({exc})"))


async def open_client(port: int, sem: asyncio.Semaphore | None = None) -> PingClient:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    client = PingClient(done, time.perf_counter)
    if sem is None:
        await loop.create_connection(lambda: client, "127.0.0.1", port)
        await done
        return client
    async with sem:
        await loop.create_connection(lambda: client, "127.0.0.1", port)
        await done
    return client


def close_all(clients: Sequence[PingClient]) -> None:
    for c in clients:
        if c.transport is not None:
            c.transport.close()


async def open_many(port: int, n: int, concurrency: int | None) -> tuple[list[PingClient], list[BaseException]]:
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    results = await asyncio.gather(*(open_client(port, sem) for _ in range(n)), return_exceptions=True)
    ok = [r for r in results if isinstance(r, PingClient)]
    errors = [r for r in results if isinstance(r, BaseException)]
    return ok, errors


def connected_clients(redis_port: int) -> int:
    import redis

    with contextlib.closing(redis.Redis(port=redis_port)) as r:
        return int(r.info("clients")["connected_clients"])


async def wait_redis_clients(redis_port: int, at_most: int, timeout: float = 60.0) -> None:
    """Wait (polling Redis) until it holds at most ``at_most`` client connections."""
    deadline = time.monotonic() + timeout
    while connected_clients(redis_port) > at_most:
        if time.monotonic() > deadline:
            raise BenchError(f"Redis still holds more than {at_most} connections after {timeout}s")
        await asyncio.sleep(0.1)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def listen_backlog(port: int) -> int | None:
    """The accept-queue bound of the socket listening on ``port`` (``ss``'s Send-Q for a listener)."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    try:
        out = subprocess.run([ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2].isdigit():
            return int(parts[2])
    return None


async def idle_level(redis_port: int, redis_pid: int, proxy_port: int, proxy_pid: int, n: int) -> dict[str, Any]:
    warm, errors = await open_many(proxy_port, WARMUP_CONNECTIONS, None)
    if errors:
        raise BenchError(f"warm-up connections failed: {errors[0]!r}")
    close_all(warm)
    await wait_redis_clients(redis_port, 1)
    await asyncio.sleep(SETTLE_S)
    before = {"proxy": rss_kib(proxy_pid), "redis": rss_kib(redis_pid)}
    fds_before = fd_count(proxy_pid)
    t0 = time.perf_counter()
    clients, errors = await open_many(proxy_port, n, OPEN_CONCURRENCY)
    open_s = time.perf_counter() - t0
    if errors:
        close_all(clients)
        raise BenchError(f"{len(errors)} of {n} connections failed, first: {errors[0]!r}")
    await asyncio.sleep(SETTLE_S)
    after = {"proxy": rss_kib(proxy_pid), "redis": rss_kib(redis_pid)}
    fds_after = fd_count(proxy_pid)
    redis_clients = connected_clients(redis_port)
    close_all(clients)
    await wait_redis_clients(redis_port, 1)
    return {
        "connections": n,
        "open_s": open_s,
        "rss_kib_before": before,
        "rss_kib_after": after,
        "proxy_fds_before": fds_before,
        "proxy_fds_after": fds_after,
        "redis_connected_clients": redis_clients,
        "proxy_kib_per_connection": (after["proxy"] - before["proxy"]) / n,
        "redis_kib_per_connection": (after["redis"] - before["redis"]) / n,
    }


def _kth(sorted_times: list[float], n: int, share: float) -> float | None:
    """When ``share`` of the ``n`` clients had answered (None if fewer did)."""
    k = max(1, -(-int(share * 1000) * n // 1000))  # ceil(share * n), in integers
    return sorted_times[k - 1] if len(sorted_times) >= k else None


async def burst(port: int, redis_port: int, n: int, limit_s: float) -> dict[str, Any]:
    """``n`` clients start connecting at once; each sends PING on connect. A client that has no +PONG after
    ``limit_s`` is given up on (counted, not retried), so a burst that leaves clients hanging still ends."""
    baseline = connected_clients(redis_port)
    loop = asyncio.get_running_loop()
    clients = [PingClient(loop.create_future(), time.perf_counter) for _ in range(n)]

    async def one(client: PingClient) -> None:
        await loop.create_connection(lambda: client, "127.0.0.1", port)
        await client.done

    t0 = time.perf_counter()
    tasks = [loop.create_task(one(c)) for c in clients]
    done, pending = await asyncio.wait(tasks, timeout=limit_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
    for c in clients:
        if not c.done.done():
            c.done.cancel()  # given up on: a late close must not leave an exception nobody reads
    connected = sorted(c.connected_at - t0 for c in clients if c.connected_at)
    answered = sorted(c.ponged_at - t0 for c in clients
                      if c.done.done() and not c.done.cancelled() and c.done.exception() is None)
    if not answered:
        raise BenchError(f"no client of a burst of {n} was answered within {limit_s}s; first error: "
                         f"{errors[0] if errors else 'none'}")
    close_all(clients)
    await wait_redis_clients(redis_port, baseline)
    kinds = Counter(f"{type(e).__name__}: {e}"[:120] for e in errors if e is not None)
    return {
        "connections": n,
        "limit_s": limit_s,
        "connected": len(connected),
        "answered": len(answered),
        "failed": len(errors),
        "unanswered": n - len(answered) - len(errors),
        "all_connected_s": connected[-1] if len(connected) == n else None,
        "answered_p50_s": _kth(answered, n, 0.5),
        "answered_p99_s": _kth(answered, n, 0.99),
        "all_answered_s": answered[-1] if len(answered) == n else None,
        "failures": dict(kinds.most_common(5)),
    }


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def measure(args: argparse.Namespace, redis_bin: str) -> dict[str, Any]:
    soft, hard = raise_nofile()
    max_n = (hard - FD_SLACK) // 2 if hard != resource.RLIM_INFINITY else 10**9
    levels = []
    for want in args.levels:
        levels.append({"requested": want, "measured": min(want, max_n, soft - FD_SLACK)})
    loop = _new_loop()
    result: dict[str, Any] = {"idle": [], "burst_runs": []}
    try:
        with tempfile.TemporaryDirectory(prefix="brokerproxy-conns-") as tmp:
            workdir = Path(tmp)
            maxclients = str(max(1000, min(hard, 10**6) - 64))
            with redis_server(redis_bin, workdir, "--maxclients", maxclients, "--tcp-backlog", "511",
                              preexec_fn=_raise_to_hard) as (redis_port, redis_cmd):
                redis_pid = _redis_pid(redis_port)
                for i, level in enumerate(levels):
                    with proxy_process(redis_port, workdir, preexec_fn=_raise_to_hard,
                                       log_name=f"brokerproxy-{i}.log") as (pport, pcmd, pproc, _log):
                        entry = loop.run_until_complete(idle_level(redis_port, redis_pid, pport, pproc.pid,
                                                                   level["measured"]))
                        entry["requested"] = level["requested"]
                        result["idle"].append(entry)
                        proxy_cmd = pcmd
                        log(f"idle {entry['connections']:>6} connections: proxy "
                            f"{entry['proxy_kib_per_connection']:.1f} KiB each, Redis "
                            f"{entry['redis_kib_per_connection']:.1f} KiB each")
                with proxy_process(redis_port, workdir, preexec_fn=_raise_to_hard,
                                   log_name="brokerproxy-burst.log") as (pport, pcmd, pproc, _log):
                    ports = {"direct": redis_port, "proxy": pport}
                    result["listen_backlog"] = {t: listen_backlog(p) for t, p in ports.items()}
                    for repeat in range(args.repeats):
                        for t in TARGETS:
                            limit = QUICK_BURST_CLIENT_LIMIT_S if args.quick else BURST_CLIENT_LIMIT_S
                            b = loop.run_until_complete(burst(ports[t], redis_port, args.burst, limit))
                            b.update(repeat=repeat, target=t)
                            result["burst_runs"].append(b)
                            log(f"[{repeat + 1}/{args.repeats}] burst {args.burst} {t:<6} "
                                f"connected {_ms(b['all_connected_s'])}, 50% answered {_ms(b['answered_p50_s'])}, "
                                f"99% {_ms(b['answered_p99_s'])}, all {_ms(b['all_answered_s'])}; "
                                f"{b['failed']} failed, {b['unanswered']} unanswered after {limit:.0f} s"
                                + (f" {b['failures']}" if b["failures"] else ""))
                            if pproc.poll() is not None:
                                raise BenchError(f"brokerproxy exited with {pproc.returncode}")
    finally:
        loop.close()
    burst_summary: dict[str, Any] = {}
    for metric in BURST_METRICS:
        by_rep: dict[int, dict[str, float | None]] = {}
        for b in result["burst_runs"]:
            by_rep.setdefault(b["repeat"], {})[b["target"]] = b[metric]
        per_target: dict[str, list[float]] = {
            t: [x for _, v in sorted(by_rep.items()) if (x := v.get(t)) is not None] for t in TARGETS
        }
        pairs: list[dict[str, float]] = [
            {t: x for t in TARGETS if (x := v.get(t)) is not None}
            for _, v in sorted(by_rep.items())
            if all(v.get(t) is not None for t in TARGETS)
        ]
        figures: dict[str, Any] = {
            t: spread(vals) if len(vals) == len(by_rep) else None  # None: some repeat never got there
            for t, vals in per_target.items()
        }
        figures["ratio"] = paired([p["direct"] for p in pairs], [p["proxy"] for p in pairs])
        burst_summary[metric] = figures
    for count in ("failed", "unanswered"):
        burst_summary[count] = {t: [b[count] for b in result["burst_runs"] if b["target"] == t] for t in TARGETS}
    return {
        "config": {
            "quick": args.quick, "levels": [lv["requested"] for lv in levels], "burst": args.burst,
            "repeats": args.repeats, "open_concurrency": OPEN_CONCURRENCY, "settle_s": SETTLE_S,
            "rlimit_nofile": {"soft": soft, "hard": hard}, "max_connections_by_fd_limit": max_n,
        },
        "commands": {"redis_server": shlex.join(redis_cmd), "brokerproxy": shlex.join(proxy_cmd)},
        **result,
        "burst_summary": burst_summary,
    }


def _ms(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds * 1000:,.0f} ms"


def _redis_pid(port: int) -> int:
    """The pid of the redis-server on ``port`` (redis_server() does not hand out its Popen)."""
    import redis

    with contextlib.closing(redis.Redis(port=port)) as r:
        return int(r.info("server")["process_id"])


def markdown(rep: Report, body: dict[str, Any]) -> str:
    cfg = body["config"]
    idle_rows = []
    for e in body["idle"]:
        note = "" if e["connections"] == e["requested"] else (
            f" (asked {e['requested']:,}; the hard RLIMIT_NOFILE of {cfg['rlimit_nofile']['hard']:,} allows "
            f"{cfg['max_connections_by_fd_limit']:,}: two descriptors per client)"
        )
        idle_rows.append(
            f"| {e['connections']:,}{note} | {e['rss_kib_before']['proxy'] / 1024:,.1f} "
            f"| {e['rss_kib_after']['proxy'] / 1024:,.1f} | **{e['proxy_kib_per_connection']:.1f}** "
            f"| {e['proxy_fds_after']:,} | {e['redis_kib_per_connection']:.1f} | {e['open_s']:.2f} |"
        )
    bs = body["burst_summary"]
    limit = body["burst_runs"][0]["limit_s"] if body["burst_runs"] else BURST_CLIENT_LIMIT_S
    burst_rows = []
    for metric, label in (("all_connected_s", "every client's connect() returned"),
                          ("answered_p50_s", "half the clients answered (+PONG)"),
                          ("answered_p99_s", "99 % of the clients answered"),
                          ("all_answered_s", "every client answered")):
        m = bs[metric]
        cells = [f"{m[t]['median'] * 1000:,.0f}" if m[t] else f"not in every repeat (within {limit:.0f} s)"
                 for t in TARGETS]
        burst_rows.append(f"| {label} | {cells[0]} | {cells[1]} | {fmt_ratio(m['ratio'])} |")
    for count, label in (("failed", "clients refused or reset, per repeat"),
                         ("unanswered", f"clients with no answer after {limit:.0f} s, per repeat")):
        burst_rows.append(f"| {label} | {', '.join(map(str, bs[count]['direct']))} "
                          f"| {', '.join(map(str, bs[count]['proxy']))} | |")
    failures = sorted({k for b in body["burst_runs"] for k in b.get("failures", {})})
    failure_text = ""
    if failures:
        failure_text = "\nHow they failed: " + "; ".join(f"`{k}`" for k in failures) + ".\n"
    backlog = body.get("listen_backlog", {})
    return rep.header("Connections: memory per idle connection, burst accept", cfg["quick"]) + f"""
## Commands

```
{body["commands"]["redis_server"]}
{body["commands"]["brokerproxy"]}
```

RLIMIT_NOFILE: soft {cfg["rlimit_nofile"]["soft"]:,}, hard {cfg["rlimit_nofile"]["hard"]:,} (every process raised
to the hard limit; the hard limit cannot be raised without privileges). Clients: asyncio protocols in the
benchmark process, opened {cfg["open_concurrency"]} at a time, one `PING` each.

## Idle connections: proxy RSS

A fresh proxy per level. "KiB per connection" = (RSS with N idle clients - RSS before) / N, from VmRSS; it covers
the client side and the upstream side the proxy holds for each client. Redis's growth for the same N upstream
connections is shown for scale.

| idle clients | proxy RSS before MiB | proxy RSS after MiB | proxy KiB/conn | proxy fds | Redis KiB/conn | open s |
|---|---:|---:|---:|---:|---:|---:|
""" + "\n".join(idle_rows) + f"""

## Burst: {cfg["burst"]:,} clients connecting at once

Milliseconds from the start of the burst; medians over {cfg["repeats"]} repeat(s), direct and proxy alternating.
Ratio = proxy ÷ direct per repeat. Listen backlog (accept queue bound, from `ss`): Redis {backlog.get("direct")},
brokerproxy {backlog.get("proxy")}; a burst larger than the backlog overflows it and the kernel drops the extra
SYNs (or, once the handshake is done, the final ACK), and they are retried after about one second, then two, four,
eight…; after five SYN-ACK retries (about a minute) the kernel drops the half-open connection and the client's
request is answered with a reset. A client with no answer after {limit:.0f} s is given up on and counted.

| until | direct ms | proxy ms | ratio |
|---|---:|---:|---|
""" + "\n".join(burst_rows) + "\n" + failure_text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run for the test suite; figures mean nothing")
    p.add_argument("--levels", help="idle connection counts, comma-separated (default 1000,10000)")
    p.add_argument("--burst", type=int, help=f"connections in the burst (default {DEFAULT_BURST})")
    p.add_argument("--repeats", type=int, help=f"burst A B pairs (default {DEFAULT_REPEATS})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.levels is None:
        args.levels = list(QUICK_LEVELS if args.quick else DEFAULT_LEVELS)
    else:
        args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if args.burst is None:
        args.burst = QUICK_BURST if args.quick else DEFAULT_BURST
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if not args.levels or min(args.levels) < 1 or args.burst < 1 or args.repeats < 1:
        p.error("--levels, --burst and --repeats must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(NAME, "bench/connections.py", argv, parse_args, measure, markdown, "## Idle")


if __name__ == "__main__":
    sys.exit(main())
