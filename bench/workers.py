#!/usr/bin/env python3
"""--workers: redis-benchmark throughput through brokerproxy with 1, 2 and ``auto`` worker processes, and direct Redis.

Theory of operation. The script starts one ``redis-server`` on a free loopback port and, in front of it, one
brokerproxy per worker setting (``--workers 1``, ``--workers 2``, ``--workers auto`` by default; ``--workers-list``),
each on its own port, all up for the whole run (an idle proxy costs nothing: without ``metrics_listen`` it runs no
timer). ``--workers 1`` is the single process as it always ran; the others are a supervisor and its workers on one
``SO_REUSEPORT`` port. Per repeat and pipeline depth it runs ``redis-benchmark`` (50 clients, ``-d 512``, PING_MBULK,
SET, GET, LPUSH, RPOP, as ``e2e_redis_benchmark.py``) against each path in turn: direct Redis, then every proxy, so
the runs alternate A B C D A B C D and each proxy run has a direct run of the same moment.

Figures: per path and test the median rps over repeats; per repeat the ratio of each proxy run to the direct run
before it (median over repeats, with the range) and of each multi-worker run to the 1-worker run of the same repeat
(the scaling). Also the CPU each path's processes used during its runs (utime + stime from ``/proc``, the
supervisor and its workers together; and Redis's), as cores: CPU seconds ÷ wall seconds. On a machine where
redis-server and redis-benchmark share the cores with the proxy, that says where the cores went.

Usage::

    python bench/workers.py [--quick] [--repeats N] [--requests N] [--workers-list 1,2,auto] [--out DIR]

Writes ``workers.md`` and ``workers.json`` into ``--out`` (default bench/results/). ``--quick`` is a tiny
configuration for the test suite: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DEFAULT_OUT,
    REPO,
    BenchError,
    Report,
    find_binary,
    fmt_ratio,
    fmt_spread,
    free_port,
    log,
    paired,
    redis_server,
    run_benchmark,
    spread,
    stop,
    tail,
    wait_for_port,
)
from e2e_redis_benchmark import CLIENTS, PIPELINED_REQUEST_FACTOR, TESTS, benchmark_command, requests_for
from e2e_redis_benchmark import run_benchmark as run_redis_benchmark

NAME = "workers"
SIZE = 512
PIPELINES = (1, 16)
DEFAULT_WORKERS = ("1", "2", "auto")
DEFAULT_REPEATS = 7
DEFAULT_REQUESTS = 20_000
QUICK_REPEATS = 1
QUICK_REQUESTS = 1_000
WARMUP_REQUESTS = 2_000
#: Bound on a proxy group's start (its workers import brokerproxy at the same time on a shared machine).
START_TIMEOUT = 60.0
TICKS = os.sysconf("SC_CLK_TCK")


def label(target: str) -> str:
    return "Redis" if target == "direct" else f"{target} worker{'' if target == '1' else 's'}"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------- processes


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes, seconds (a process gone meanwhile counts 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except FileNotFoundError:
        return []


def redis_process_id(port: int) -> int:
    """redis-server's pid, as its INFO says."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
        data = b""
        while b"process_id:" not in data or not data.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.split(b":", 1)[1])
    raise BenchError("redis-server's INFO has no process_id")


@contextlib.contextmanager
def proxy_group(
    upstream_port: int, workdir: Path, workers: str
) -> Iterator[tuple[int, list[str], subprocess.Popen[bytes], Path]]:
    """``python -m brokerproxy --workers N`` from this checkout; yields once every worker serves."""
    port = free_port()
    log_path = workdir / f"brokerproxy-workers-{workers}.log"
    cmd = [
        sys.executable, "-m", "brokerproxy", "--listen", f"127.0.0.1:{port}",
        "--upstream", f"redis://127.0.0.1:{upstream_port}/0", "--workers", workers,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            try:
                wait_for_port(port, proc, "brokerproxy")
                deadline = time.monotonic() + START_TIMEOUT
                single = workers == "1" or (workers == "auto" and usable_cpus() == 1)
                while not single and b'"workers started"' not in log_path.read_bytes():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise BenchError(f"brokerproxy --workers {workers} did not start its workers")
                    time.sleep(0.05)
            except BenchError as exc:
                raise BenchError(f"{exc}\n{tail(log_path)}") from None
            yield port, cmd, proc, log_path
        finally:
            stop(proc)


# ---------------------------------------------------------------------------------------------- summary


def summarize(runs: list[dict[str, Any]], targets: Sequence[str]) -> list[dict[str, Any]]:
    """Per (depth, test): every path's rps over repeats, and per repeat each proxy ÷ direct and each ÷ 1 worker."""
    out: list[dict[str, Any]] = []
    repeats = sorted({r["repeat"] for r in runs})
    for pipeline in PIPELINES:
        for test in TESTS:

            def series(target: str, pipeline: int = pipeline, test: str = test) -> list[float]:
                by_repeat = {r["repeat"]: r["results"][test]["rps"] for r in runs
                             if r["pipeline"] == pipeline and r["target"] == target}  # fmt: skip
                return [by_repeat[i] for i in repeats if i in by_repeat]

            rps = {t: series(t) for t in targets}
            entry: dict[str, Any] = {
                "pipeline": pipeline, "test": test,
                "rps": {t: spread(v) for t, v in rps.items() if v},
                "vs_direct": {t: paired(rps["direct"], rps[t]) for t in targets if t != "direct"},
                "vs_one": {t: paired(rps["1"], rps[t]) for t in targets if t not in ("direct", "1")},
            }  # fmt: skip
            out.append(entry)
    return out


def headline(summary: list[dict[str, Any]], targets: Sequence[str]) -> dict[str, Any]:
    """Per depth and ratio: the median over the five tests of each test's median paired ratio, with the lowest and
    highest test."""
    out: dict[str, Any] = {}
    for kind in ("vs_direct", "vs_one"):
        for t in targets:
            for pipeline in PIPELINES:
                values = [e[kind][t]["paired_median"] for e in summary
                          if e["pipeline"] == pipeline and t in e[kind] and e[kind][t]["paired_median"]]  # fmt: skip
                if values:
                    out.setdefault(kind, {}).setdefault(t, {})[str(pipeline)] = {
                        "median": statistics.median(values), "min": min(values), "max": max(values),
                    }  # fmt: skip
    return out


def cpu_summary(runs: list[dict[str, Any]], targets: Sequence[str]) -> dict[str, Any]:
    """Cores used during a path's runs (CPU seconds ÷ wall seconds), medians over repeats, per depth."""
    out: dict[str, Any] = {}
    for pipeline in PIPELINES:
        for t in targets:
            rows = [r for r in runs if r["pipeline"] == pipeline and r["target"] == t]
            if rows:
                out.setdefault(str(pipeline), {})[t] = {
                    "proxy_cores": statistics.median(r["proxy_cpu_s"] / r["wall_s"] for r in rows),
                    "redis_cores": statistics.median(r["redis_cpu_s"] / r["wall_s"] for r in rows),
                    # What one request costs the proxy processes: if N workers cost what one does, throughput
                    # grows with the cores they are given (they share nothing but the listening port).
                    "proxy_us_per_request": statistics.median(
                        r["proxy_cpu_s"] / (r["requests"] * len(TESTS)) * 1e6 for r in rows
                    ),
                }
    return out


# ---------------------------------------------------------------------------------------------- report


def _range(h: dict[str, Any] | None) -> str:
    if h is None:
        return "n/a"
    if h["min"] == h["max"]:
        return f"**{h['median']:.2f}**"
    return f"**{h['median']:.2f}** ({h['min']:.2f}-{h['max']:.2f})"


def markdown(rep: Report, body: dict[str, Any]) -> str:
    cfg, cmds = body["config"], body["commands"]
    targets = cfg["targets"]
    proxies = [t for t in targets if t != "direct"]
    multi = [t for t in proxies if t != "1"]
    head, cpu = body["headline"], body["cpu"]
    resolved = ", ".join(f"`--workers {t}` = {n} process{'es' if n > 1 else ''}"
                         for t, n in cfg["resolved"].items())  # fmt: skip
    lines = [
        "| ratio | " + " | ".join(f"rps -P {p}" for p in PIPELINES) + " |",
        "|---|" + "---|" * len(PIPELINES),
    ]
    for t in multi:
        lines.append(f"| {label(t)} ÷ 1 worker | " + " | ".join(
            _range(head.get("vs_one", {}).get(t, {}).get(str(p))) for p in PIPELINES) + " |")  # fmt: skip
    for t in proxies:
        lines.append(f"| {label(t)} ÷ Redis | " + " | ".join(
            _range(head.get("vs_direct", {}).get(t, {}).get(str(p))) for p in PIPELINES) + " |")  # fmt: skip
    table = [
        "| -P | test | "
        + " | ".join(f"{label(t)} rps" for t in targets)
        + " | "
        + " | ".join(f"{label(t)} ÷ 1" for t in multi)
        + " | "
        + " | ".join(f"{label(t)} ÷ Redis" for t in proxies)
        + " |",
        "|---:|---|" + "---:|" * len(targets) + "---|" * (len(multi) + len(proxies)),
    ]
    for e in body["summary"]:
        cells = [fmt_spread(e["rps"][t]) if t in e["rps"] else "n/a" for t in targets]
        cells += [fmt_ratio(e["vs_one"][t]) for t in multi]
        cells += [fmt_ratio(e["vs_direct"][t]) for t in proxies]
        table.append(f"| {e['pipeline']} | {e['test']} | " + " | ".join(cells) + " |")
    cores = [
        "| -P | path | proxy processes, cores | redis-server, cores | proxy CPU µs per request | ÷ 1 worker's |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for p in PIPELINES:
        one = cpu.get(str(p), {}).get("1", {}).get("proxy_us_per_request")
        for t in targets:
            c = cpu.get(str(p), {}).get(t)
            if c is not None:
                proxy_cores = "-" if t == "direct" else f"{c['proxy_cores']:.2f}"
                us = c.get("proxy_us_per_request")
                per_request = "-" if t == "direct" or us is None else f"{us:.1f}"
                vs_one = "-" if t == "direct" or us is None or not one else f"{us / one:.2f}"
                cores.append(
                    f"| {p} | {label(t)} | {proxy_cores} | {c['redis_cores']:.2f} | {per_request} | {vs_one} |"
                )
    bench_lines = "\n".join(cmds["redis_benchmark"])
    warmup = (f", after one discarded run of {cfg['warmup_requests']:,} requests per path"
              if cfg["warmup_requests"] else "")  # fmt: skip
    proxy_lines = "\n".join(cmds["brokerproxy"].values())
    return (
        rep.header("--workers: throughput with 1, 2 and auto worker processes", cfg["quick"])
        + f"""
## Set-up

One `redis-server` and, in front of it, one brokerproxy per worker setting, each on its own port and up for the whole
run: {resolved} (`auto` is the CPUs this process may use: {cfg["usable_cpus"]} here). Every multi-worker proxy is a
supervisor and its workers on one `SO_REUSEPORT` port; `--workers 1` is the single process. No metrics, no ACL (the
defaults). This machine has {cfg["usable_cpus"]} usable CPU(s), shared by redis-server, redis-benchmark and the proxy
processes (and by whatever else runs on the machine): a second worker can only use what Redis and the load generator
leave, so expect modest scaling here; the CPU table below says where the cores went.

Paths, in the order each repeat runs them: {", ".join(label(t) for t in targets)}. Every ratio is taken per repeat
between runs moments apart, then the median over repeats with the range in brackets.

## Commands

```
{cmds["redis_server"]}
{proxy_lines}
```

Per repeat and depth, against each path's port; {cfg["repeats"]} repeat(s){warmup}:

```
{bench_lines}
```

## Scaling (redis-benchmark, {CLIENTS} clients, -d {SIZE})

Per depth, the median over the five tests (PING_MBULK, SET, GET, LPUSH, RPOP) of each test's median paired rps
ratio, with the lowest and highest test in brackets.

{chr(10).join(lines)}

### Requests per second, every test

Medians over repeats ("±x%" is half the range as a share of the median); ratios per repeat, median (min-max).

{chr(10).join(table)}

### Where the CPU went

During each path's runs: CPU seconds used ÷ wall seconds, medians over repeats (the proxy's supervisor and workers
together; redis-benchmark itself is not counted, and takes much of what is left), and the proxy's CPU time per
request. Workers share nothing but the listening port, so where N workers spend about what one worker spends per
request (last column near 1.00), throughput grows with the cores they get until Redis is the limit; on a machine
where Redis and the load generator already take what one worker leaves, the cores column shows there is nothing
more to get.

{chr(10).join(cores)}
"""
    )


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny configuration (the test suite's smoke test)")
    p.add_argument("--repeats", type=int, help=f"rounds of every path and depth (default {DEFAULT_REPEATS})")
    p.add_argument("--requests", type=int,
                   help=f"redis-benchmark requests per test at -P 1 (default {DEFAULT_REQUESTS}); "
                   f"-P 16 sends {PIPELINED_REQUEST_FACTOR}x as many")  # fmt: skip
    p.add_argument("--workers-list", default=",".join(DEFAULT_WORKERS),
                   help=f"worker settings to compare, 1 first (default {','.join(DEFAULT_WORKERS)})")  # fmt: skip
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.requests is None:
        args.requests = QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS
    if args.repeats < 1 or args.requests < 1:
        p.error("--repeats and --requests must be positive")
    workers = list(dict.fromkeys(x.strip() for x in args.workers_list.split(",") if x.strip()))
    if "1" not in workers:
        workers.insert(0, "1")
    for w in workers:
        if w != "auto" and not (w.isdigit() and int(w) >= 1):
            p.error(f"--workers-list: {w!r} is not a number of processes or auto")
    args.workers = ["1", *[w for w in workers if w != "1"]]
    return args


def measure(args: argparse.Namespace, redis_bin: str) -> dict[str, Any]:
    import tempfile

    bench_bin = find_binary("redis-benchmark")
    if bench_bin is None:
        raise BenchError("redis-benchmark not found; install it with: apt-get install redis-tools")
    targets = ["direct", *args.workers]
    warmup = 0 if args.quick else WARMUP_REQUESTS
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="brokerproxy-workers-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        redis_port, redis_cmd = stack.enter_context(redis_server(redis_bin, workdir))
        redis_pid = redis_process_id(redis_port)
        ports: dict[str, int] = {"direct": redis_port}
        procs: dict[str, subprocess.Popen[bytes]] = {}
        cmds: dict[str, str] = {}
        logs: dict[str, Path] = {}
        for w in args.workers:
            port, cmd, proc, log_path = stack.enter_context(proxy_group(redis_port, workdir, w))
            ports[w], procs[w], cmds[w], logs[w] = port, proc, shlex.join(cmd), log_path
        resolved = {w: max(1, len(children(procs[w].pid))) for w in args.workers}

        def group_pids(target: str) -> list[int]:
            if target == "direct":
                return []
            proc = procs[target]
            if proc.poll() is not None:
                raise BenchError(f"brokerproxy --workers {target} exited with {proc.returncode}:\n{tail(logs[target])}")
            return [proc.pid, *children(proc.pid)]

        def command(t: str, pipeline: int, n: int) -> list[str]:
            return benchmark_command(bench_bin, ports[t], SIZE, pipeline, n)

        if warmup:
            for t in targets:
                run_redis_benchmark(command(t, 1, warmup))
        for repeat in range(args.repeats):
            for pipeline in PIPELINES:
                n = requests_for(pipeline, args.requests)
                for t in targets:
                    pids = group_pids(t)
                    cmd = command(t, pipeline, n)
                    cpu0, redis0, t0 = cpu_seconds(pids), cpu_seconds([redis_pid]), time.monotonic()
                    results = run_redis_benchmark(cmd)
                    wall = time.monotonic() - t0
                    cpu1, redis1 = cpu_seconds(group_pids(t)), cpu_seconds([redis_pid])
                    runs.append({
                        "repeat": repeat, "pipeline": pipeline, "target": t, "requests": n,
                        "command": shlex.join(cmd), "results": results, "wall_s": wall,
                        "proxy_cpu_s": cpu1 - cpu0, "redis_cpu_s": redis1 - redis0,
                    })  # fmt: skip
                    log(f"[{repeat + 1}/{args.repeats}] -P {pipeline:<2} {label(t):<16} "
                        + "  ".join(f"{x} {results[x]['rps']:,.0f}" for x in TESTS))  # fmt: skip
        for w, proc in procs.items():
            if proc.poll() is not None:
                raise BenchError(f"brokerproxy --workers {w} exited during the run:\n{tail(logs[w])}")
    summary = summarize(runs, targets)
    config = {
        "quick": args.quick, "repeats": args.repeats, "requests_p1": args.requests,
        "pipelined_request_factor": PIPELINED_REQUEST_FACTOR, "clients": CLIENTS, "size": SIZE,
        "pipelines": list(PIPELINES), "tests": list(TESTS), "targets": targets, "resolved": resolved,
        "usable_cpus": usable_cpus(), "warmup_requests": warmup,
        "order": "per repeat and depth, one redis-benchmark run per path, in the order " + ", ".join(targets),
    }  # fmt: skip
    bench_commands = [
        shlex.join(benchmark_command(bench_bin, redis_port, SIZE, p, requests_for(p, args.requests))) for p in PIPELINES
    ]
    return {
        "config": config,
        "commands": {"redis_server": shlex.join(redis_cmd), "brokerproxy": cmds, "redis_benchmark": bench_commands},
        "runs": runs,
        "summary": summary,
        "headline": headline(summary, targets),
        "cpu": cpu_summary(runs, targets),
    }


def main(argv: Sequence[str] | None = None) -> int:
    def md(rep: Report, body: dict[str, Any]) -> str:
        rep.machine["extra"]["redis-benchmark"] = rep.machine.get("redis_benchmark")
        return markdown(rep, body)

    return run_benchmark(NAME, "bench/workers.py", argv, parse_args, measure, md, "## Scaling")


if __name__ == "__main__":
    sys.exit(main())
