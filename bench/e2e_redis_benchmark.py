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

With ``--peers haproxy,twemproxy`` the same runs also go through HAProxy (TCP mode) and twemproxy, each with a
generated config on free loopback ports in front of the same Redis, in the same rotation (direct, brokerproxy,
HAProxy, twemproxy); their ratios to direct, and brokerproxy's to theirs, go into a "Peers" section.
``--install-peers`` installs a missing peer with apt-get; a peer that cannot be had is reported as not available.

Usage::

    python bench/e2e_redis_benchmark.py [--quick] [--repeats N] [--requests N] [--out DIR]
                                        [--peers haproxy,twemproxy] [--install-peers]

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
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
def redis_server(
    binary: str, workdir: Path, *extra: str, preexec_fn: Callable[[], None] | None = None
) -> Iterator[tuple[int, list[str]]]:
    port = free_port()
    log = workdir / "redis.log"
    cmd = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--daemonize", "no", "--logfile", str(log), *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=preexec_fn)
    try:
        try:
            wait_for_port(port, proc, "redis-server")
        except BenchError as exc:
            raise BenchError(f"{exc}\n{tail(log)}") from None
        yield port, cmd
    finally:
        stop(proc)


@contextmanager
def proxy_process(
    upstream_port: int,
    workdir: Path,
    *,
    preexec_fn: Callable[[], None] | None = None,
    log_name: str = "brokerproxy.log",
    config: Path | None = None,
) -> Iterator[tuple[int, list[str], subprocess.Popen[bytes], Path]]:
    port = free_port()
    log = workdir / log_name
    cmd = [
        sys.executable, "-m", "brokerproxy",
        "--listen", f"127.0.0.1:{port}", "--upstream", f"redis://127.0.0.1:{upstream_port}/0",
    ]
    if config is not None:
        cmd += ["--config", str(config)]
    # Measure this checkout's code, whether or not it is the one installed in the environment.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO, preexec_fn=preexec_fn
        )
        try:
            try:
                wait_for_port(port, proc, "brokerproxy")
            except BenchError as exc:
                raise BenchError(f"{exc}\n{tail(log)}") from None
            yield port, cmd, proc, log
        finally:
            stop(proc)


# ---------------------------------------------------------------------------------------------- peers

#: The proxies a user would otherwise put in front of Redis (``--peers``), run on the same loopback Redis.
PEERS = ("haproxy", "twemproxy")
#: Debian package and binary of each peer.
PEER_PACKAGES = {"haproxy": "haproxy", "twemproxy": "nutcracker"}
PEER_BINARIES = {"haproxy": "haproxy", "twemproxy": "nutcracker"}
LABELS = {"direct": "direct", "proxy": "brokerproxy", "haproxy": "HAProxy", "twemproxy": "twemproxy"}
#: HAProxy threads: one, like the single brokerproxy process it is compared with (HAProxy's default is one per
#: core; on the 2-core machine Redis and redis-benchmark already use the other core).
HAPROXY_THREADS = 1
#: HAProxy needs about two descriptors per connection and refuses to start if it cannot raise its limit that far.
HAPROXY_MAXCONN = 4096
INSTALL_TIMEOUT_S = 600.0

HAPROXY_CONFIG = """\
global
    maxconn {maxconn}
    nbthread {threads}
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen redis
    bind 127.0.0.1:{port}
    server redis 127.0.0.1:{upstream_port}
"""

# twemproxy's usual Redis pool: one server, every client multiplexed onto one upstream connection.
TWEMPROXY_CONFIG = """\
bench:
  listen: 127.0.0.1:{port}
  hash: fnv1a_64
  distribution: ketama
  redis: true
  auto_eject_hosts: false
  server_connections: 1
  servers:
   - 127.0.0.1:{upstream_port}:1
"""


def find_peer(name: str, install: bool) -> tuple[str | None, str]:
    """The peer's binary, or None and why not. With ``install``, a missing peer is installed with ``apt-get install``
    (after ``apt-get update`` if the first attempt fails)."""
    package, binary = PEER_PACKAGES[name], PEER_BINARIES[name]
    found = find_binary(binary)
    if found:
        return found, ""
    if not install:
        return None, f"not installed (apt-get install {package}; or pass --install-peers)"
    if shutil.which("apt-get") is None:
        return None, f"not installed, and no apt-get to install {package} with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    why = ""
    for attempt in (["apt-get", "install", "-y", "--no-install-recommends", package], ["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", package]):
        _log(f"{name}: {shlex.join(attempt)}")
        try:
            done = subprocess.run(attempt, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=env,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"not available: {shlex.join(attempt)} failed ({exc})"
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        found = find_binary(binary)
        if found:
            return found, ""
    return None, f"not available: apt-get install {package} failed ({why})"


def peer_version(name: str, binary: str) -> str:
    if name == "haproxy":
        return _first_line([binary, "-v"])
    try:  # nutcracker prints its version on stderr
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def start_peers(
    stack: ExitStack, names: Sequence[str], install: bool, upstream_port: int, workdir: Path
) -> tuple[dict[str, tuple[int, subprocess.Popen[bytes], list[str], str]], dict[str, dict[str, Any]]]:
    """Start, in front of ``upstream_port``, each peer that can be had (stopped with ``stack``): name -> (port,
    process, command, config text) of those started, and name -> its report entry (available with its version, or
    not with the reason) of all."""
    started: dict[str, tuple[int, subprocess.Popen[bytes], list[str], str]] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        binary, why = find_peer(name, install)
        if binary is None:
            entries[name] = {"available": False, "reason": why}
            continue
        try:
            port, cmd, proc, config = stack.enter_context(peer_process(name, binary, upstream_port, workdir))
        except BenchError as exc:
            entries[name] = {"available": False, "reason": f"not available: did not start ({exc})"}
            continue
        started[name] = (port, proc, cmd, config)
        entries[name] = {"available": True, "version": peer_version(name, binary)}
    return started, entries


@contextmanager
def peer_process(
    name: str, binary: str, upstream_port: int, workdir: Path
) -> Iterator[tuple[int, list[str], subprocess.Popen[bytes], str]]:
    """Start a peer proxy in front of ``upstream_port``: (port, command, process, its config file's text)."""
    port = free_port()
    log = workdir / f"{name}.log"
    if name == "haproxy":
        config = HAPROXY_CONFIG.format(
            maxconn=HAPROXY_MAXCONN, threads=HAPROXY_THREADS, port=port, upstream_port=upstream_port
        )
        path = workdir / "haproxy.cfg"
        cmd = [binary, "-f", str(path), "-db"]
    elif name == "twemproxy":
        config = TWEMPROXY_CONFIG.format(port=port, upstream_port=upstream_port)
        path = workdir / "nutcracker.yml"
        # Its statistics port defaults to 22222: give it a free one, on loopback.
        cmd = [binary, "-c", str(path), "-o", str(log), "-s", str(free_port()), "-a", "127.0.0.1",
               "-p", str(workdir / "nutcracker.pid")]
    else:
        raise ValueError(name)
    path.write_text(config)
    with open(workdir / f"{name}.out", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            try:
                wait_for_port(port, proc, name)
            except BenchError as exc:
                raise BenchError(f"{exc}\n{tail(workdir / f'{name}.out')}\n{tail(log)}") from None
            yield port, cmd, proc, config
        finally:
            stop(proc, timeout=10)


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


def _paired_ratio(base: Sequence[float], other: Sequence[float]) -> dict[str, float | None]:
    paired = [b / a for a, b in zip(base, other, strict=True) if a]
    return {
        "paired_median": statistics.median(paired) if paired else None,
        "paired_min": min(paired) if paired else None,
        "paired_max": max(paired) if paired else None,
        "of_medians": statistics.median(other) / statistics.median(base) if statistics.median(base) else None,
    }


def summarize(runs: list[dict[str, Any]], target: str = "proxy") -> list[dict[str, Any]]:
    """One entry per (size, pipeline, test): per-path medians and spread, paired target/direct ratios.

    For a peer (``target`` "haproxy" or "twemproxy") each entry also holds ``proxy_vs_peer``: brokerproxy's rps
    over the peer's, paired per repeat."""
    out = []
    for size in SIZES:
        for pipeline in PIPELINES:
            for test in TESTS:
                by_repeat: dict[int, dict[str, dict[str, float]]] = {}
                for run in runs:
                    if run["size"] == size and run["pipeline"] == pipeline:
                        by_repeat.setdefault(run["repeat"], {})[run["target"]] = run["results"][test]
                pairs = [r for _, r in sorted(by_repeat.items()) if {"direct", target} <= set(r)]
                if not pairs:
                    continue
                entry: dict[str, Any] = {"size": size, "pipeline": pipeline, "test": test, "repeats": len(pairs)}
                for metric in METRICS:
                    direct = [p["direct"][metric] for p in pairs]
                    other = [p[target][metric] for p in pairs]
                    entry[metric] = {"direct": spread(direct), target: spread(other),
                                     "ratio": _paired_ratio(direct, other)}
                if target != "proxy":
                    both = [p for p in pairs if "proxy" in p]
                    if both:
                        entry["proxy_vs_peer"] = _paired_ratio(
                            [p[target]["rps"] for p in both], [p["proxy"]["rps"] for p in both]
                        )
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


def peers_table(report: dict[str, Any], metric: str = "rps") -> str:
    """Ratio to direct Redis of brokerproxy and each peer, side by side, and brokerproxy over each peer (rps)."""
    peers = [name for name, info in report["peers"].items() if info["available"]]
    asked = list(report["peers"])
    head = "| -d, -P | test | brokerproxy | " + " | ".join(LABELS[p] for p in asked) + " |"
    if metric == "rps":
        head += "".join(f" brokerproxy ÷ {LABELS[p]} |" for p in asked)
    ncols = 3 + len(asked) * (2 if metric == "rps" else 1)
    lines = [head, "|---|---|" + "---|" * (ncols - 2)]
    proxy = {(e["size"], e["pipeline"], e["test"]): e for e in report["summary"]}
    by_peer = {p: {(e["size"], e["pipeline"], e["test"]): e for e in report["peer_summary"].get(p, [])}
               for p in peers}
    for size in SIZES:
        for pipeline in PIPELINES:
            for test in TESTS:
                key = (size, pipeline, test)
                if key not in proxy:
                    continue
                cells = [_ratio(proxy[key][metric]["ratio"])]
                versus = []
                for p in asked:
                    e = by_peer.get(p, {}).get(key)
                    cells.append(_ratio(e[metric]["ratio"]) if e else "n/a")
                    versus.append(_ratio(e["proxy_vs_peer"]) if e and "proxy_vs_peer" in e else "n/a")
                row = f"| -d {size} -P {pipeline} | {test} | " + " | ".join(cells) + " |"
                if metric == "rps":
                    row += "".join(f" {v} |" for v in versus)
                lines.append(row)
    return "\n".join(lines)


def peers_section(report: dict[str, Any]) -> str:
    if not report["peers"]:
        return ""
    about = []
    for name, info in report["peers"].items():
        if info["available"]:
            about.append(f"- **{LABELS[name]}** ({info['version']}): `{info['command']}` with\n\n"
                         f"```\n{info['config'].rstrip()}\n```")
        else:
            about.append(f"- **{LABELS[name]}**: {info['reason']}")
    return f"""
## Peers: brokerproxy, HAProxy and twemproxy on the same runs

The same redis-benchmark commands, against the same Redis, through each peer; per repeat and configuration the
targets run in the order {", ".join(LABELS[t] for t in report["config"]["targets"])}, and every ratio is over the
direct run of the same repeat (median over repeats, min-max in brackets). "brokerproxy ÷ peer" is brokerproxy's
rps over the peer's, per repeat: above 1 brokerproxy is faster.

{(chr(10) * 2).join(about)}

twemproxy answers `PING` itself (it never reaches Redis) and multiplexes all clients onto one upstream
connection; it does not support `CONFIG`, so redis-benchmark warns "Could not fetch server CONFIG" (harmless).

### Throughput, ratio to direct Redis

{peers_table(report, "rps")}

### p50 latency, ratio to direct Redis (1.00 = no added latency)

{peers_table(report, "p50_latency_ms")}
"""


def peer_ports(report: dict[str, Any]) -> str:
    return "".join(f", then through {LABELS[n]} (port {i['port']})" for n, i in report["peers"].items()
                   if i["available"])


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
(port {cmds["proxy_port"]}){peer_ports(report)}; {c["repeats"]} repeat(s), A B A B:

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
{peers_section(report)}"""


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
    p.add_argument(
        "--peers", default="",
        help="comma-separated peers to run on the same Redis next to brokerproxy: haproxy, twemproxy, or 'all' "
        "(default: none). A peer that is not installed is reported as not available",
    )
    p.add_argument(
        "--proxy-config", type=Path,
        help="a brokerproxy config file for the proxy under test (e.g. metrics and an ACL on); the report is then "
        "named e2e_redis_benchmark-<config file stem>",
    )
    p.add_argument(
        "--install-peers", action="store_true",
        help="apt-get install a missing peer (Debian packages haproxy, nutcracker) before giving up on it",
    )
    args = p.parse_args(argv)
    peers = [x.strip() for x in args.peers.split(",") if x.strip() and x.strip() != "none"]
    if peers == ["all"]:
        peers = list(PEERS)
    unknown = [x for x in peers if x not in PEERS]
    if unknown:
        p.error(f"unknown peer(s) {unknown}: choose from {', '.join(PEERS)}")
    args.peers = list(dict.fromkeys(peers))
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
    for directory in ("/usr/bin", "/usr/sbin"):
        fallback = f"{directory}/{name}"
        if os.path.exists(fallback):
            return fallback
    return None


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
    peers: dict[str, dict[str, Any]] = {}
    binaries: dict[str, str] = {}
    for name in args.peers:
        binary, why = find_peer(name, args.install_peers)
        if binary is None:
            _log(f"{name}: {why}")
            peers[name] = {"available": False, "reason": why}
        else:
            binaries[name] = binary
    with tempfile.TemporaryDirectory(prefix="brokerproxy-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        redis_port, redis_cmd = stack.enter_context(redis_server(redis_bin, workdir))
        proxy_port, proxy_cmd, proxy_proc, proxy_log = stack.enter_context(
            proxy_process(redis_port, workdir, config=args.proxy_config)
        )
        ports = {"direct": redis_port, "proxy": proxy_port}
        procs = {"proxy": (proxy_proc, proxy_log)}
        for name, binary in binaries.items():
            try:
                port, cmd, proc, config = stack.enter_context(peer_process(name, binary, redis_port, workdir))
            except BenchError as exc:
                _log(f"{name} did not start: {exc}")
                peers[name] = {"available": False, "reason": f"not available: did not start ({exc})"}
                continue
            ports[name] = port
            procs[name] = (proc, workdir / f"{name}.out")
            peers[name] = {"available": True, "binary": binary, "version": peer_version(name, binary),
                           "command": shlex.join(cmd), "config": config, "port": port}
        peers = {name: peers[name] for name in args.peers}
        targets = [t for t in ("direct", "proxy", *PEERS) if t in ports]

        def check_proxies() -> None:
            for name, (proc, log) in procs.items():
                if proc.poll() is not None:
                    raise BenchError(f"{LABELS[name]} exited with {proc.returncode}:\n{tail(log)}")

        if not args.quick:
            for target in targets:
                run_benchmark(benchmark_command(bench_bin, ports[target], SIZES[0], 1, WARMUP_REQUESTS))
            check_proxies()
        for repeat in range(args.repeats):
            for size in SIZES:
                for pipeline in PIPELINES:
                    for target in targets:
                        n = requests_for(pipeline, args.requests)
                        cmd = benchmark_command(bench_bin, ports[target], size, pipeline, n)
                        results = run_benchmark(cmd)
                        check_proxies()
                        runs.append({
                            "repeat": repeat, "size": size, "pipeline": pipeline, "target": target,
                            "requests": n, "command": shlex.join(cmd), "results": results,
                        })
                        _log(
                            f"[{repeat + 1}/{args.repeats}] -d {size} -P {pipeline:<2} {target:<9} "
                            + "  ".join(f"{t} {results[t]['rps']:,.0f}" for t in TESTS)
                        )
    duration = time.monotonic() - t0
    argv = ["python", "bench/e2e_redis_benchmark.py"]
    if args.quick:
        argv.append("--quick")
    argv += ["--repeats", str(args.repeats), "--requests", str(args.requests)]
    if args.peers:
        argv += ["--peers", ",".join(args.peers)]
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
            "order": "per repeat, size, pipeline: " + " then ".join(targets),
            "targets": targets,
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
        "peers": peers,
        "peer_summary": {name: summarize(runs, name) for name, info in peers.items() if info["available"]},
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
    name = REPORT_NAME if args.proxy_config is None else f"{REPORT_NAME}-{args.proxy_config.stem}"
    write_atomic(args.out / f"{name}.json", json.dumps(report, indent=1) + "\n")
    write_atomic(args.out / f"{name}.md", text)
    print(headline_table(report["summary"]))
    print()
    print(full_table(report["summary"]))
    if report["peers"]:
        print()
        print(peers_table(report))
    _log(f"wrote {args.out / (name + '.md')} and {args.out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
