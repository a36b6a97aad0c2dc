"""Shared pieces of the benchmark scripts: the machine section, statistics, process helpers, report writing.

The process helpers (a private ``redis-server`` on a free loopback port, a ``python -m brokerproxy`` from this
checkout in front of it) live in ``e2e_redis_benchmark.py``, the first benchmark; this module re-exports them so
every script starts its servers the same way.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from e2e_redis_benchmark import (
    DEFAULT_OUT,
    REPO,
    BenchError,
    find_binary,
    free_port,
    machine_info,
    proxy_process,
    redis_server,
    stop,
    tail,
    wait_for_port,
    write_atomic,
)

__all__ = [
    "DEFAULT_OUT",
    "REPO",
    "BenchError",
    "Report",
    "find_binary",
    "free_port",
    "loadavg",
    "log",
    "machine_info",
    "machine_table",
    "paired",
    "proxy_process",
    "raise_nofile",
    "redis_server",
    "rss_kib",
    "spread",
    "stop",
    "tail",
    "wait_for_port",
    "write_atomic",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the spread (max - min) as a percentage of the median."""
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread_pct": (max(values) - min(values)) / med * 100 if med else None,
        "n": len(values),
    }


def paired(base: Sequence[float], other: Sequence[float]) -> dict[str, Any]:
    """Ratios other/base taken per repeat (each run over the baseline run taken next to it): median, min, max."""
    ratios = [b / a for a, b in zip(base, other, strict=True) if a]
    if not ratios:
        return {"paired_median": None, "paired_min": None, "paired_max": None, "of_medians": None}
    med_base = statistics.median(base)
    return {
        "paired_median": statistics.median(ratios),
        "paired_min": min(ratios),
        "paired_max": max(ratios),
        "of_medians": statistics.median(other) / med_base if med_base else None,
    }


def fmt_ratio(r: dict[str, Any], digits: int = 2) -> str:
    if r.get("paired_median") is None:
        return "n/a"
    if r["paired_min"] == r["paired_max"]:
        return f"**{r['paired_median']:.{digits}f}**"
    return f"**{r['paired_median']:.{digits}f}** ({r['paired_min']:.{digits}f}-{r['paired_max']:.{digits}f})"


def fmt_spread(s: dict[str, Any], digits: int = 0) -> str:
    text = f"{s['median']:,.{digits}f}"
    if s.get("spread_pct") is None or s["min"] == s["max"]:
        return text
    return text + f" ±{s['spread_pct'] / 2:.0f}%"


def rss_kib(pid: int) -> int:
    """Resident set size of a process, KiB, from /proc/<pid>/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def raise_nofile(want: int | None = None) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards ``want`` (default: the hard limit). Returns (soft, hard).

    Only the soft limit can be raised without privileges; the hard limit is what the machine allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None or hard == resource.RLIM_INFINITY else min(want, hard)
    if hard == resource.RLIM_INFINITY and want is not None:
        target = want
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def machine_table(machine: dict[str, Any], load_before: str, load_after: str) -> str:
    rows = [
        ("CPU", machine.get("cpu_model", "unknown")),
        ("cores", f"{machine.get('logical_cpus')} logical, {machine.get('usable_cpus')} usable by this process"),
        ("kernel", machine.get("kernel")),
        ("Python", machine.get("python")),
        ("event loop", f"{machine.get('event_loop')} (uvloop {machine.get('uvloop')})"),
        ("hiredis", machine.get("hiredis", "n/a")),
        ("redis-server", machine.get("redis_server")),
        ("brokerproxy", f"{machine.get('brokerproxy')} at {machine.get('brokerproxy_commit')}"),
    ]
    rows += [(k, v) for k, v in machine.get("extra", {}).items()]
    rows.append(("load average (1, 5, 15 min) before / after", f"{load_before} / {load_after}"))
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


class Report:
    """Collects the common header of a report (start time, load, machine) and writes ``<name>.md``/``.json``."""

    def __init__(self, name: str, script: str, argv: Sequence[str], redis_bin: str | None = None) -> None:
        self.name = name
        self.started = dt.datetime.now(dt.UTC)
        self.t0 = time.monotonic()
        self.load_before = loadavg()
        rb = redis_bin or find_binary("redis-server") or "redis-server"
        bb = find_binary("redis-benchmark") or "redis-benchmark"
        self.machine = machine_info(rb, bb)
        try:
            import importlib.metadata

            self.machine["hiredis"] = importlib.metadata.version("hiredis")
        except Exception:
            self.machine["hiredis"] = "not installed"
        self.machine["extra"] = {}
        self.script = " ".join(["python", script, *argv])

    def header(self, title: str, quick: bool) -> str:
        self.load_after = getattr(self, "load_after", loadavg())
        lines = [
            f"# {title}",
            "",
            f"Generated by `{self.script}` on {self.started.strftime('%Y-%m-%dT%H:%M:%SZ')} "
            f"in {time.monotonic() - self.t0:.0f} s.",
        ]
        if quick:
            lines += ["", "**--quick run: a smoke test of the script; these figures mean nothing.**"]
        lines += ["", "## Machine", "", machine_table(self.machine, self.load_before, self.load_after), ""]
        lines += [
            "The machine is shared: other processes (other engineers' tests among them) may run at the same time; "
            "the load average above says how busy it was. Compare ratios taken in the same run, not absolutes.",
            "",
        ]
        return "\n".join(lines)

    def finish(self, out: Path, body: dict[str, Any], markdown: str) -> tuple[Path, Path]:
        self.load_after = getattr(self, "load_after", loadavg())
        data = {
            "schema": 1,
            "name": self.name,
            "started_at": self.started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "duration_s": time.monotonic() - self.t0,
            "loadavg_before": self.load_before,
            "loadavg_after": self.load_after,
            "machine": self.machine,
            "command": self.script,
            **body,
        }
        out.mkdir(parents=True, exist_ok=True)
        md_path, json_path = out / f"{self.name}.md", out / f"{self.name}.json"
        write_atomic(json_path, json.dumps(data, indent=1, default=str) + "\n")
        write_atomic(md_path, markdown)
        log(f"wrote {md_path} and {json_path}")
        return md_path, json_path


def run_benchmark(
    name: str,
    script: str,
    argv: Sequence[str] | None,
    parse_args: Callable[[Sequence[str] | None], Any],
    measure: Callable[[Any, str], dict[str, Any]],
    markdown: Callable[[Report, dict[str, Any]], str],
    print_from: str,
) -> int:
    """The main() every Redis-backed benchmark shares: find redis-server, measure, write the report, print its
    results section (from the heading ``print_from``). Exit codes: 0 done, 1 the benchmark failed, 2 no Redis."""
    args = parse_args(argv)
    redis_bin = find_binary("redis-server")
    if redis_bin is None:
        log("redis-server not found; install it with: apt-get install redis-server")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rep = Report(name, script, list(argv if argv is not None else sys.argv[1:]), redis_bin)
    try:
        body = measure(args, redis_bin)
    except (BenchError, OSError) as exc:
        log(f"benchmark failed: {exc!r}")
        return 1
    text = markdown(rep, body)
    rep.finish(args.out, body, text)
    print(text[text.index(print_from) :])
    return 0

