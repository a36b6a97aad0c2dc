#!/usr/bin/env python3
"""End-to-end throughput and latency: redis-benchmark against Redis directly and through brokerproxy.

Theory of operation. The script starts its own ``redis-server`` on a free loopback port (never 6379) and one
``python -m brokerproxy`` in front of it, both from this checkout. For every repeat, payload size (-d) and pipeline
depth (-P) it runs ``redis-benchmark`` twice, back to back: first against Redis directly (A), then through the proxy
(B). So the runs go A B A B …, and a direct run and its proxy run see the same machine conditions. Each run covers
all of PING_MBULK, SET, GET, LPUSH, RPOP (``-t``) with 50 clients, ``--csv`` output.

For every (size, depth, test) the report gives the median over repeats of requests per second and of p50/p99
latency for each path, their spread ((max - min) / median), and the ratio proxy/direct. The ratio is taken per
repeat (the proxy run over the direct run just before it) and the report shows the median of those paired ratios
and their range. On a shared machine the ratios are the figures to compare between changes, not the absolutes.

Usage::

    python bench/e2e_redis_benchmark.py [--quick] [--repeats N] [--requests N] [--out DIR]

Writes ``e2e_redis_benchmark.md`` and ``e2e_redis_benchmark.json`` into ``--out`` (default bench/results/) and
prints the table. ``--quick`` is a tiny configuration for the test suite: it checks that everything runs, its
figures mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"
REPORT_NAME = "e2e_redis_benchmark"

#: The redis-benchmark tests, in the order redis-benchmark runs them.
TESTS = ("PING_MBULK", "SET", "GET", "LPUSH", "RPOP")
#: Payload sizes (-d), bytes: a small Celery message and a larger one.
SIZES = (512, 2048)
#: Pipeline depths (-P): one request in flight per client (Celery's usual pattern), and a batching client.
PIPELINES = (1, 16)
#: Concurrent clients (-c).
CLIENTS = 50
#: Requests per test at -P 1. At deeper pipelines the run is that many times faster, so it sends
#: PIPELINED_REQUEST_FACTOR times as many requests to last long enough to be measured.
DEFAULT_REQUESTS = 20_000
PIPELINED_REQUEST_FACTOR = 4
DEFAULT_REPEATS = 5
#: --quick: enough to exercise every path and the report, far too little to mean anything.
QUICK_REQUESTS = 1_000
QUICK_REPEATS = 1
#: A short discarded run per path before measuring: connections, allocator and caches warmed up.
WARMUP_REQUESTS = 2_000
#: Bound on one redis-benchmark run; a run that takes longer than this is a hung proxy, not a slow one.
RUN_TIMEOUT_S = 600.0

TARGETS = ("direct", "proxy")
METRICS = ("rps", "p50_latency_ms", "p99_latency_ms")
INSTALL_HINT = "install it with: apt-get install redis-tools (redis-benchmark) / apt-get install redis-server"


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port != 6379:
            return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before listening on 127.0.0.1:{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what}: nothing listening on 127.0.0.1:{port} after {timeout}s")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def redis_server(binary: str, workdir: Path) -> Iterator[tuple[int, list[str]]]:
    port = free_port()
    log = workdir / "redis.log"
    cmd = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--daemonize", "no", "--logfile", str(log),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        try:
            wait_for_port(port, proc, "redis-server")
        except BenchError as exc:
            raise BenchError(f"{exc}\n{tail(log)}") from None
        yield port, cmd
    finally:
        stop(proc)


@contextmanager
def proxy_process(upstream_port: int, workdir: Path) -> Iterator[tuple[int, list[str], subprocess.Popen[bytes], Path]]:
    port = free_port()
    log = workdir / "brokerproxy.log"
    cmd = [
        sys.executable, "-m", "brokerproxy",
        "--listen", f"127.0.0.1:{port}", "--upstream", f"redis://127.0.0.1:{upstream_port}/0",
    ]
    # Measure this checkout's code, whether or not it is the one installed in the environment.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            try:
                wait_for_port(port, proc, "brokerproxy")
            except BenchError as exc:
                raise BenchError(f"{exc}\n{tail(log)}") from None
            yield port, cmd, proc, log
        finally:
            stop(proc)


# ---------------------------------------------------------------------------------------------- redis-benchmark


def benchmark_command(binary: str, port: int, size: int, pipeline: int, requests: int) -> list[str]:
    return [
        binary, "-h", "127.0.0.1", "-p", str(port), "-c", str(CLIENTS), "-n", str(requests), "-d", str(size),
        "-P", str(pipeline), "-t", ",".join(t.lower() for t in TESTS), "--csv", "-q",
    ]


def parse_csv(text: str) -> dict[str, dict[str, float]]:
    """redis-benchmark 7 ``--csv``: a header ``"test","rps","avg_latency_ms",…`` then one row per test.

    Older redis-benchmark (6.x and before) prints only ``"test","rps"``; then the latency columns are absent and
    this raises, since the report needs them.
    """
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows: dict[str, dict[str, float]] = {}
    for row in csv.DictReader(lines):
        name = row.pop("test")
        try:
            rows[name] = {key: float(value) for key, value in row.items() if key is not None}
        except (TypeError, ValueError) as exc:
            raise BenchError(f"unparseable redis-benchmark row for {name}: {row}") from exc
    for name in TESTS:
        if name not in rows:
            raise BenchError(f"redis-benchmark printed no result for {name}:\n{text}")
        missing = [m for m in METRICS if m not in rows[name]]
        if missing:
            raise BenchError(f"redis-benchmark --csv has no {missing} columns (need redis-benchmark >= 7):\n{text}")
    return rows


def run_benchmark(cmd: Sequence[str]) -> dict[str, dict[str, float]]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"redis-benchmark did not finish in {RUN_TIMEOUT_S}s: {shlex.join(cmd)}") from None
    if done.returncode != 0:
        raise BenchError(f"redis-benchmark exited with {done.returncode}: {shlex.join(cmd)}\n{done.stderr}")
    return parse_csv(done.stdout)


# ---------------------------------------------------------------------------------------------- machine


def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(redis_bin: str, bench_bin: str) -> dict[str, Any]:
    redis_line = _first_line([redis_bin, "--version"])
    match = re.search(r"v=(\S+)", redis_line)
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "brokerproxy"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    uvloop = _version("uvloop")
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "kernel": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "uvloop": uvloop,
        "event_loop": "uvloop" if uvloop != "not installed" else "asyncio (stdlib)",
        "redis_server": match.group(1) if match else redis_line,
        "redis_benchmark": _first_line([bench_bin, "--version"]),
        "brokerproxy": _version("brokerproxy"),
        "brokerproxy_commit": commit + (" (brokerproxy/ modified)" if dirty else ""),
    }


# ---------------------------------------------------------------------------------------------- figures


def spread(values: Sequence[float]) -> dict[str, float | None]:
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread_pct": (max(values) - min(values)) / med * 100 if med else None,
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (size, pipeline, test): per-path medians and spread, paired proxy/direct ratios."""
    out = []
    for size in SIZES:
        for pipeline in PIPELINES:
            for test in TESTS:
                by_repeat: dict[int, dict[str, dict[str, float]]] = {}
                for run in runs:
                    if run["size"] == size and run["pipeline"] == pipeline:
                        by_repeat.setdefault(run["repeat"], {})[run["target"]] = run["results"][test]
                pairs = [r for _, r in sorted(by_repeat.items()) if set(r) == set(TARGETS)]
                if not pairs:
                    continue
                entry: dict[str, Any] = {"size": size, "pipeline": pipeline, "test": test, "repeats": len(pairs)}
                for metric in METRICS:
                    direct = [p["direct"][metric] for p in pairs]
                    proxy = [p["proxy"][metric] for p in pairs]
                    paired = [b / a for a, b in zip(direct, proxy, strict=True) if a]
                    entry[metric] = {
                        "direct": spread(direct),
                        "proxy": spread(proxy),
                        "ratio": {
                            "paired_median": statistics.median(paired) if paired else None,
                            "paired_min": min(paired) if paired else None,
                            "paired_max": max(paired) if paired else None,
                            "of_medians": statistics.median(proxy) / statistics.median(direct)
                            if statistics.median(direct) else None,
                        },
                    }
                out.append(entry)
    return out


def _num(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _cell(s: dict[str, Any], digits: int) -> str:
    pct = s["spread_pct"]
    if pct is None or s["min"] == s["max"]:
        return _num(s["median"], digits)
    return _num(s["median"], digits) + f" ±{pct / 2:.0f}%"


def _ratio(r: dict[str, Any]) -> str:
    if r["paired_median"] is None:
        return "n/a"
    if r["paired_min"] == r["paired_max"]:
        return f"**{r['paired_median']:.2f}**"
    return f"**{r['paired_median']:.2f}** ({r['paired_min']:.2f}-{r['paired_max']:.2f})"


def headline_table(summary: list[dict[str, Any]]) -> str:
    cols = [(size, pipeline) for size in SIZES for pipeline in PIPELINES]
    head = "| test | " + " | ".join(f"rps -d {s} -P {p}" for s, p in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    index = {(e["size"], e["pipeline"], e["test"]): e for e in summary}
    for test in TESTS:
        cells = []
        for size, pipeline in cols:
            e = index.get((size, pipeline, test))
            cells.append(f"{e['rps']['ratio']['paired_median']:.2f}" if e else "n/a")
        lines.append(f"| {test} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| -d | -P | test | direct rps | proxy rps | rps ratio | direct p50 ms | proxy p50 ms | p50 ratio "
        "| direct p99 ms | proxy p99 ms | p99 ratio |",
        "|---:|---:|---|---:|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for e in summary:
        rps, p50, p99 = e["rps"], e["p50_latency_ms"], e["p99_latency_ms"]
        lines.append(
            f"| {e['size']} | {e['pipeline']} | {e['test']} "
            f"| {_cell(rps['direct'], 0)} | {_cell(rps['proxy'], 0)} | {_ratio(rps['ratio'])} "
            f"| {_cell(p50['direct'], 3)} | {_cell(p50['proxy'], 3)} | {_ratio(p50['ratio'])} "
            f"| {_cell(p99['direct'], 3)} | {_cell(p99['proxy'], 3)} | {_ratio(p99['ratio'])} |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    cmds = report["commands"]
    bench_lines = "\n".join(cmds["redis_benchmark"])
    return f"""# End-to-end: redis-benchmark, direct Redis vs through brokerproxy

Generated by `{cmds["this_script"]}` on {report["started_at"]} in {report["duration_s"]:.0f} s.
{"**--quick run: a smoke test of the script; these figures mean nothing.**" if c["quick"] else ""}

## Machine

| | |
|---|---|
| CPU | {m["cpu_model"]} |
| cores | {m["logical_cpus"]} logical, {m["usable_cpus"]} usable by this process |
| kernel | {m["kernel"]} |
| Python | {m["python"]} |
| event loop | {m["event_loop"]} (uvloop {m["uvloop"]}) |
| redis-server | {m["redis_server"]} |
| redis-benchmark | {m["redis_benchmark"]} |
| brokerproxy | {m["brokerproxy"]} at {m["brokerproxy_commit"]} |
| load average before / after | {report["loadavg_before"]} / {report["loadavg_after"]} |

redis-server, brokerproxy and redis-benchmark all run on this machine and share its cores; the machine is shared
with other work. Compare the ratios, not the absolute figures.

## Commands

```
{cmds["redis_server"]}
{cmds["brokerproxy"]}
```

Per repeat, for each line below, first against Redis (port {cmds["direct_port"]}), then through the proxy
(port {cmds["proxy_port"]}); {c["repeats"]} repeat(s), A B A B:

```
{bench_lines}
```

## Throughput ratio proxy/direct (median over repeats of paired runs; 1.00 = as fast as Redis)

{headline_table(report["summary"])}

## All figures

Medians over {c["repeats"]} repeat(s); "±x%" is half the range (max - min) as a share of the median. Ratios are
proxy/direct per repeat, median (min-max): for rps below 1 means the proxy is slower, for latency above 1 means
the proxy adds latency.

{full_table(report["summary"])}
"""


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="tiny run for the test suite: few requests, one repeat")
    p.add_argument("--repeats", type=int, help=f"A B pairs per configuration (default {DEFAULT_REPEATS})")
    p.add_argument(
        "--requests", type=int,
        help=f"requests per test at -P 1 (default {DEFAULT_REQUESTS}); -P 16 sends {PIPELINED_REQUEST_FACTOR}x that",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"directory for the reports (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.requests is None:
        args.requests = QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS
    if args.repeats < 1 or args.requests < 1:
        p.error("--repeats and --requests must be positive")
    return args


def requests_for(pipeline: int, base: int) -> int:
    return base if pipeline == 1 else base * PIPELINED_REQUEST_FACTOR


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    fallback = f"/usr/bin/{name}"
    return fallback if os.path.exists(fallback) else None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(args: argparse.Namespace, redis_bin: str, bench_bin: str) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    loadavg_before = _loadavg()
    machine = machine_info(redis_bin, bench_bin)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="brokerproxy-bench-") as tmp:
        workdir = Path(tmp)
        with redis_server(redis_bin, workdir) as (redis_port, redis_cmd), proxy_process(
            redis_port, workdir
        ) as (proxy_port, proxy_cmd, proxy_proc, proxy_log):
            ports = {"direct": redis_port, "proxy": proxy_port}

            def check_proxy() -> None:
                if proxy_proc.poll() is not None:
                    raise BenchError(f"brokerproxy exited with {proxy_proc.returncode}:\n{tail(proxy_log)}")

            if not args.quick:
                for target in TARGETS:
                    run_benchmark(benchmark_command(bench_bin, ports[target], SIZES[0], 1, WARMUP_REQUESTS))
                check_proxy()
            for repeat in range(args.repeats):
                for size in SIZES:
                    for pipeline in PIPELINES:
                        for target in TARGETS:
                            n = requests_for(pipeline, args.requests)
                            cmd = benchmark_command(bench_bin, ports[target], size, pipeline, n)
                            results = run_benchmark(cmd)
                            check_proxy()
                            runs.append({
                                "repeat": repeat, "size": size, "pipeline": pipeline, "target": target,
                                "requests": n, "command": shlex.join(cmd), "results": results,
                            })
                            _log(
                                f"[{repeat + 1}/{args.repeats}] -d {size} -P {pipeline:<2} {target:<6} "
                                + "  ".join(f"{t} {results[t]['rps']:,.0f}" for t in TESTS)
                            )
    duration = time.monotonic() - t0
    argv = ["python", "bench/e2e_redis_benchmark.py"]
    if args.quick:
        argv.append("--quick")
    argv += ["--repeats", str(args.repeats), "--requests", str(args.requests)]
    return {
        "schema": 1,
        "started_at": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": duration,
        "loadavg_before": loadavg_before,
        "loadavg_after": _loadavg(),
        "machine": machine,
        "config": {
            "quick": args.quick, "repeats": args.repeats, "requests_p1": args.requests,
            "pipelined_request_factor": PIPELINED_REQUEST_FACTOR, "clients": CLIENTS, "sizes": list(SIZES),
            "pipelines": list(PIPELINES), "tests": list(TESTS),
            "order": "per repeat, size, pipeline: direct then proxy",
            "warmup_requests": 0 if args.quick else WARMUP_REQUESTS,
        },
        "commands": {
            "this_script": shlex.join(argv),
            "redis_server": shlex.join(redis_cmd),
            "brokerproxy": shlex.join(proxy_cmd),
            "direct_port": redis_port,
            "proxy_port": proxy_port,
            "redis_benchmark": [
                shlex.join(benchmark_command(bench_bin, redis_port, s, p, requests_for(p, args.requests)))
                for s in SIZES for p in PIPELINES
            ],
        },
        "runs": runs,
        "summary": summarize(runs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    redis_bin, bench_bin = find_binary("redis-server"), find_binary("redis-benchmark")
    for name, found in (("redis-server", redis_bin), ("redis-benchmark", bench_bin)):
        if found is None:
            _log(f"{name} not found; {INSTALL_HINT}")
            return 2
    assert redis_bin is not None and bench_bin is not None
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop redis-server and the proxy.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = measure(args, redis_bin, bench_bin)
    except BenchError as exc:
        _log(f"benchmark failed: {exc}")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    write_atomic(args.out / f"{REPORT_NAME}.json", json.dumps(report, indent=1) + "\n")
    write_atomic(args.out / f"{REPORT_NAME}.md", text)
    print(headline_table(report["summary"]))
    print()
    print(full_table(report["summary"]))
    _log(f"wrote {args.out / (REPORT_NAME + '.md')} and {args.out / (REPORT_NAME + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
