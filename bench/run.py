#!/usr/bin/env python3
"""The benchmark suite: run every benchmark, write each report and a summary of the headline figures.

Usage::

    python bench/run.py [--quick] [--only NAME,NAME] [--out DIR] [--no-install] [--e2e-repeats N]

Runs, in this order, each as its own process (so one benchmark's state never leaks into the next):

1. ``hotpath.py --profile``: ns per command through the sans-IO Session, pure Python vs hiredis;
2. ``latency.py --peers haproxy,twemproxy``: microseconds added per round trip;
3. ``celery_throughput.py``: publish-only and end-to-end Celery tasks per second;
4. ``connections.py``: RSS per idle connection, burst accept;
5. ``e2e_redis_benchmark.py --peers haproxy,twemproxy``: redis-benchmark through brokerproxy, HAProxy, twemproxy;
6. ``tls.py``: redis-benchmark and round trips through brokerproxy's TLS listener vs its plaintext one, Redis's own
   TLS port and plaintext Redis;
7. ``workers.py``: redis-benchmark through brokerproxy with ``--workers 1``, ``2`` and ``auto``, and direct Redis;
8. ``e2e_redis_benchmark.py --proxy-config bench/configs/acl-metrics.toml``: the redis-benchmark runs again, through
   brokerproxy with ACLs and metrics on (as issue 6's targets specify it), report ``e2e_redis_benchmark-acl-metrics``;
9. ``cpu_profile.py``: CPU µs per request of brokerproxy (ACLs and metrics on), Redis and redis-benchmark, next to
   a bare uvloop relay, HAProxy and twemproxy; py-spy and perf profiles of brokerproxy by component; the bound they
   put on the throughput ratio.

Each writes ``<name>.md`` and ``<name>.json`` into ``--out`` (default bench/results/); then this script writes
``SUMMARY.md`` there from the JSON files: date, machine, load, and the headline ratios. A benchmark that fails is
reported as failed in the summary and the others still run; the exit status is then 1.

Missing peers (HAProxy, twemproxy) are installed with ``apt-get`` unless ``--no-install``; a peer that cannot be
installed is reported as not available. ``--quick`` runs every benchmark in its tiny configuration (for the test
suite; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT, REPO, loadavg, log, write_atomic

BENCH = Path(__file__).resolve().parent
PEERS_ARG = "haproxy,twemproxy"
#: Repeats of the redis-benchmark runs in a full run: about a minute each with both peers on the 2-core machine.
E2E_REPEATS = 5
#: The ACL + metrics run of e2e_redis_benchmark.py: its report's name (the script names it after the config file).
E2E_ACL_METRICS = "e2e_redis_benchmark-acl-metrics"
ACL_METRICS_CONFIG = "bench/configs/acl-metrics.toml"
ORDER = ("hotpath", "latency", "celery_throughput", "connections", "e2e_redis_benchmark", "tls", "workers",
         E2E_ACL_METRICS, "cpu_profile")  # fmt: skip
SCRIPTS = {name: BENCH / f"{name.split('-')[0]}.py" for name in ORDER}
TITLES = {
    "hotpath": "Hot path (sans-IO Session)",
    "latency": "Round-trip latency",
    "celery_throughput": "Celery throughput",
    "connections": "Connections",
    "e2e_redis_benchmark": "redis-benchmark end to end",
    "tls": "TLS",
    "workers": "Many cores (--workers)",
    E2E_ACL_METRICS: "redis-benchmark end to end, ACLs and metrics on",
    "cpu_profile": "Where the CPU goes (µs per request)",
}


def arguments(name: str, args: argparse.Namespace) -> list[str]:
    out = ["--quick"] if args.quick else []
    install = [] if args.no_install else ["--install-peers"]
    if name == "hotpath":
        out.append("--profile")
    elif name == "latency":
        out += ["--peers", PEERS_ARG, *install]
    elif name == "e2e_redis_benchmark":
        out += ["--peers", PEERS_ARG, *install]
        if not args.quick:
            out += ["--repeats", str(args.e2e_repeats)]
    elif name == E2E_ACL_METRICS:
        out += ["--proxy-config", ACL_METRICS_CONFIG]
        if not args.quick:
            out += ["--repeats", str(args.e2e_repeats)]
    elif name == "cpu_profile":
        out += install
    return [*out, "--out", str(args.out)]


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(SCRIPTS[name]), *arguments(name, args)]
    shown = " ".join(["python", f"bench/{SCRIPTS[name].name}", *arguments(name, args)[:-2]])
    log(f"\n=== {name}: {shown}")
    t0 = time.monotonic()
    load = loadavg()
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
    status = {"name": name, "command": shown, "returncode": done.returncode,
              "duration_s": time.monotonic() - t0, "loadavg_before": load, "loadavg_after": loadavg()}
    if done.returncode != 0:
        log(f"{name} failed with exit status {done.returncode}; its output:\n{done.stdout[-3000:]}")
    return status


# ---------------------------------------------------------------------------------------------- summary


def _load(out: Path, name: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def _r(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _rr(r: dict[str, Any] | None, digits: int = 2) -> str:
    """A paired ratio: median (min-max)."""
    if not r or r.get("paired_median") is None:
        return "n/a"
    if r["paired_min"] == r["paired_max"]:
        return f"{r['paired_median']:.{digits}f}"
    return f"{r['paired_median']:.{digits}f} ({r['paired_min']:.{digits}f}-{r['paired_max']:.{digits}f})"


def hotpath_section(d: dict[str, Any]) -> list[str]:
    lines = ["| workload | pure Python ns/cmd | hiredis ns/cmd | pure best | hiredis best | pure ÷ hiredis |",
             "|---|---:|---:|---:|---:|---:|"]
    for e in d["capture"] + d["synthetic"]:
        ns = e["ns_per_command"]
        lines.append(f"| {e['workload']} | {ns['pure']['median']:,.0f} | {ns['hiredis']['median']:,.0f} "
                     f"| {ns['pure']['min']:,.0f} | {ns['hiredis']['min']:,.0f} | {e['hiredis_speedup']:.2f} |")
    out = ["Nanoseconds per command, median over repeats and the best repeat (the least disturbed by other load); "
           "`capture` = the recorded Celery traffic (tests/data/celery57-resp3); `pure` = the proxy without hiredis.",
           "", *lines]
    for prof in d.get("profiles", [])[:1]:
        out += ["", f"Where the time goes ({prof['workload']}, hiredis, cProfile own time, top 8):", "",
                "| own % | function |", "|---:|---|"]
        out += [f"| {r['share_pct']:.1f} | `{r['function']}` |" for r in prof["top"][:8]]
    return out


def latency_section(d: dict[str, Any]) -> list[str]:
    from e2e_redis_benchmark import LABELS

    lines = ["| command | via | direct p50 µs | via p50 µs | added at p50 µs | added at p99 µs |",
             "|---|---|---:|---:|---:|---:|"]
    for e in d["summary"]:
        t = e["target"]
        p50, p99 = e["p50_us"], e["p99_us"]
        lines.append(f"| {e['command']} | {LABELS[t]} | {p50['direct']['median']:.1f} | {p50[t]['median']:.1f} "
                     f"| **{p50['added_us']['median']:+.1f}** | {p99['added_us']['median']:+.1f} |")
    return lines


def celery_section(d: dict[str, Any]) -> list[str]:
    s = d["summary"]
    return [
        "| run | direct | through brokerproxy | ratio (min-max) |", "|---|---:|---:|---|",
        f"| publish-only, tasks/s | {s['publish']['direct']['median']:,.0f} | {s['publish']['proxy']['median']:,.0f} "
        f"| **{_rr(s['publish']['ratio'])}** |",
        f"| end-to-end, tasks/s | {s['end_to_end']['direct']['median']:,.1f} "
        f"| {s['end_to_end']['proxy']['median']:,.1f} | **{_rr(s['end_to_end']['ratio'])}** |",
    ]


def connections_section(d: dict[str, Any]) -> list[str]:
    lines = ["| idle clients | proxy KiB per connection | Redis KiB per connection (for scale) |", "|---:|---:|---:|"]
    for e in d["idle"]:
        asked = "" if e["connections"] == e["requested"] else f" (asked {e['requested']:,}: fd limit)"
        lines.append(f"| {e['connections']:,}{asked} | **{e['proxy_kib_per_connection']:.1f}** "
                     f"| {e['redis_kib_per_connection']:.1f} |")
    b = d["burst_summary"]
    backlog = d.get("listen_backlog", {})
    runs = d.get("burst_runs", [])
    limit = runs[0].get("limit_s", 30) if runs else 30

    def ms(m: dict[str, Any] | None) -> str:
        return f"{m['median'] * 1000:,.0f}" if m else "not in every repeat"

    lines += [
        "",
        f"Burst of {d['config']['burst']:,} connections at once, ms (listen backlog: Redis {backlog.get('direct')}, "
        f"brokerproxy {backlog.get('proxy')}):",
        "",
        "| until | direct | brokerproxy | ratio |", "|---|---:|---:|---|",
    ]
    for metric, label in (("all_connected_s", "every connect() returned"), ("answered_p50_s", "50 % answered"),
                          ("answered_p99_s", "99 % answered"), ("all_answered_s", "every client answered")):
        m = b.get(metric)
        if m is None:
            continue
        lines.append(f"| {label} | {ms(m['direct'])} | {ms(m['proxy'])} | {_rr(m['ratio'])} |")
    for count, label in (("failed", "refused or reset, per repeat"),
                         ("unanswered", f"no answer after {limit:.0f} s, per repeat")):
        if count in b:
            lines.append(f"| {label} | {', '.join(map(str, b[count]['direct']))} "
                         f"| {', '.join(map(str, b[count]['proxy']))} | |")
    return lines


def e2e_section(d: dict[str, Any]) -> list[str]:
    from e2e_redis_benchmark import LABELS

    targets = ["proxy"] + [p for p in d.get("peers", {})]
    summaries = {"proxy": d["summary"], **d.get("peer_summary", {})}
    head = "| -d | -P | " + " | ".join(LABELS[t] for t in targets) + " |"
    lines = [
        "rps ratio to direct Redis, 50 clients; per configuration the median over the five tests (PING_MBULK, SET, "
        "GET, LPUSH, RPOP) of each test's median paired ratio, with the lowest and highest test in brackets.",
        "",
        head, "|---:|---:|" + "---|" * len(targets),
    ]
    configs = sorted({(e["size"], e["pipeline"]) for e in d["summary"]}, key=lambda c: (c[1], c[0]))
    for size, pipeline in configs:
        cells = []
        for t in targets:
            if t not in summaries:
                cells.append(d["peers"][t].get("reason", "n/a").split(":")[0] if t in d.get("peers", {}) else "n/a")
                continue
            ratios = [e["rps"]["ratio"]["paired_median"] for e in summaries[t]
                      if e["size"] == size and e["pipeline"] == pipeline and e["rps"]["ratio"]["paired_median"]]
            cells.append(f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f})"
                         if ratios else "n/a")
        lines.append(f"| {size} | {pipeline} | " + " | ".join(cells) + " |")
    return lines


def tls_section(d: dict[str, Any]) -> list[str]:
    from tls import COMPARISONS, LABELS, PIPELINES, SIZE, cname

    head = d["throughput_headline"]
    lines = [
        f"rps ratios, redis-benchmark, 50 clients, -d {SIZE}, TLS on the client side (brokerproxy to Redis in "
        "plaintext); per depth the median over the five tests of each test's median paired ratio, with the lowest "
        "and highest test in brackets. Then one client, one command at a time: µs added per round trip at p50.",
        "",
        "| ratio | " + " | ".join(f"rps -P {p}" for p in PIPELINES) + " |",
        "|---|" + "---|" * len(PIPELINES),
    ]
    for path, base in COMPARISONS:
        cells = []
        for p in PIPELINES:
            h = head[cname(path, base)][str(p)]
            cells.append("n/a" if h is None else f"**{h['median']:.2f}** ({h['min']:.2f}-{h['max']:.2f})")
        lines.append(f"| {LABELS[path]} ÷ {LABELS[base]} | " + " | ".join(cells) + " |")
    commands = [e["command"] for e in d["latency"]]
    lines += ["", "| round trip, added at p50 | " + " | ".join(f"{c} µs" for c in commands) + " |",
              "|---|" + "---:|" * len(commands)]
    for path, base in COMPARISONS:
        cells = []
        for e in d["latency"]:
            c = e["comparisons"].get(cname(path, base))
            a = c["p50_us"]["added_us"] if c else None
            if a is None:
                cells.append("n/a")
            elif a["min"] == a["max"]:
                cells.append(f"**{a['median']:+.1f}**")
            else:
                cells.append(f"**{a['median']:+.1f}** ({a['min']:+.1f} to {a['max']:+.1f})")
        lines.append(f"| {LABELS[path]} - {LABELS[base]} | " + " | ".join(cells) + " |")
    return lines


def workers_section(d: dict[str, Any]) -> list[str]:
    from workers import PIPELINES, label

    head = d["headline"]
    targets = d["config"]["targets"]
    resolved = ", ".join(f"{t} = {n}" for t, n in d["config"]["resolved"].items())
    lines = [
        f"rps ratios, redis-benchmark, 50 clients, -d 512; per depth the median over the five tests of each test's "
        f"median paired ratio, with the lowest and highest test in brackets. Worker processes: {resolved}, on "
        f"{d['config']['usable_cpus']} usable CPU(s) shared with redis-server and redis-benchmark.",
        "",
        "| ratio | " + " | ".join(f"rps -P {p}" for p in PIPELINES) + " |",
        "|---|" + "---|" * len(PIPELINES),
    ]
    rows = [(t, "vs_one", "1 worker") for t in targets if t not in ("direct", "1")]
    rows += [(t, "vs_direct", "Redis") for t in targets if t != "direct"]
    for t, kind, base in rows:
        cells = []
        for p in PIPELINES:
            h = head.get(kind, {}).get(t, {}).get(str(p))
            cells.append("n/a" if h is None else f"**{h['median']:.2f}** ({h['min']:.2f}-{h['max']:.2f})")
        lines.append(f"| {label(t)} ÷ {base} | " + " | ".join(cells) + " |")
    return lines


def _median_over_tests(summary: list[dict[str, Any]], size: int, pipeline: int, key: str) -> float | None:
    values = []
    for e in summary:
        if e["size"] == size and e["pipeline"] == pipeline:
            r = e["rps"]["ratio"] if key == "ratio" else e.get(key)
            if r and r.get("paired_median"):
                values.append(r["paired_median"])
    return statistics.median(values) if values else None


def targets_section(out: Path, usable: set[str]) -> list[str]:
    """Issue 6's targets next to this run's figures. The targets specify ACLs and metrics on: the throughput rows
    come from the ACL + metrics run of redis-benchmark when its report is usable, the others say how they were
    measured. Only the reports in ``usable`` count (a benchmark that failed may have left an older report behind)."""
    rows: list[tuple[str, str, bool | None]] = []
    e2e, e2e_am, lat, cel, con, cpu = (_load(out, n) if n in usable else None for n in (
        "e2e_redis_benchmark", E2E_ACL_METRICS, "latency", "celery_throughput", "connections", "cpu_profile"))
    source, on = (e2e_am, "ACLs + metrics on") if e2e_am else (e2e, "ACLs + metrics off")
    if source:
        for pipeline, floor in ((1, 0.5), (16, 0.55)):
            for size in (512, 2048):
                r = _median_over_tests(source["summary"], size, pipeline, "ratio")
                rows.append((f"-P {pipeline}, -d {size}: ≥ {floor}x direct Redis ({on})", _r(r),
                             None if r is None else r >= floor))
    if e2e:
        peer = e2e.get("peer_summary", {})
        for name, pipeline, floor in (("haproxy", 1, 0.9), ("twemproxy", 16, 1.3)):
            for size in (512, 2048):
                r = _median_over_tests(peer[name], size, pipeline, "proxy_vs_peer") if name in peer else None
                label = "HAProxy" if name == "haproxy" else "twemproxy"
                rows.append((f"-P {pipeline}, -d {size}: ≥ {floor}x {label} (ACLs + metrics off)",
                             _r(r) if name in peer else "peer not available", None if r is None else r >= floor))
    if cel:
        r = cel["summary"]["end_to_end"]["ratio"]["paired_median"]
        rows.append(("Celery end-to-end tasks/s ≥ 0.95x direct (ACLs + metrics off)", _r(r),
                     None if r is None else r >= 0.95))
    if lat:
        for e in lat["summary"]:
            if e["target"] == "proxy":
                a = e["p50_us"]["added_us"]["median"]
                rows.append((f"round trip ({e['command']}): ≤ 50 µs added at p50 (ACLs + metrics off)",
                             f"{a:+.0f} µs", a <= 50))
    if con:
        worst = max(e["proxy_kib_per_connection"] for e in con["idle"])
        rows.append(("≤ 32 KB RSS per idle client connection", f"{worst:.1f} KiB (worst level)", worst * 1024 <= 32000))
    cost_rows = 0
    if e2e and e2e_am:
        costs = []
        for pipeline in (1, 16):
            for size in (512, 2048):
                a = _median_over_tests(e2e_am["summary"], size, pipeline, "ratio")
                b = _median_over_tests(e2e["summary"], size, pipeline, "ratio")
                if a is not None and b:
                    costs.append((1 - a / b, pipeline, size))
        if costs:
            worst_cost, p, size = max(costs)
            rows.append((
                "metrics + ACL cost ≤ 10 % of throughput (redis-benchmark: ACL + metrics ratio ÷ plain ratio)",
                f"{worst_cost * 100:.0f} % (worst: -P {p}, -d {size}; best {min(costs)[0] * 100:.0f} %; runs of "
                f"{e2e.get('started_at', '?')[:16]} and {e2e_am.get('started_at', '?')[:16]})",
                worst_cost <= 0.10,
            ))
            cost_rows += 1
    if cpu and "headline" in cpu:
        costs = [(1 - h["acl_metrics_vs_plain"], p) for p, h in cpu["headline"].items()
                 if h.get("acl_metrics_vs_plain")]  # fmt: skip
        if costs:
            rows.append((
                "metrics + ACL cost ≤ 10 % of throughput (cpu_profile: paired in one run, -d 512)",
                ", ".join(f"{c * 100:.0f} % at -P {p}" for c, p in costs), max(c for c, _ in costs) <= 0.10,
            ))
            cost_rows += 1
    if not cost_rows:
        rows.append(("metrics + ACL cost ≤ 10 % of throughput", "not measured: no ACL + metrics run usable", None))
    lines = [
        "The targets of issue 6, against this run's figures (medians over the five redis-benchmark tests for the "
        "rps rows). The targets specify ACLs and metrics on: the throughput rows are "
        + (f"from the ACL + metrics run ([{E2E_ACL_METRICS}.md]({E2E_ACL_METRICS}.md))" if e2e_am else
           "from the plain run (no ACL + metrics run usable)")
        + "; the peer, Celery and round-trip benchmarks run the proxy's defaults (ACLs and metrics off) and their "
        "rows say so. Where a target is missed, [cpu_profile.md](cpu_profile.md) shows where the time goes and what "
        "bounds the ratio.",
        "",
        "| target | measured | met |", "|---|---:|---|",
    ]
    lines += [f"| {t} | {m} | {'n/a' if ok is None else 'yes' if ok else '**no**'} |" for t, m, ok in rows]
    return lines


def cpu_profile_section(d: dict[str, Any]) -> list[str]:
    head = d["headline"]
    ps = [p for p in ("1", "16") if p in head]

    def row(label: str, fmt: Any) -> str:
        cells = []
        for p in ps:
            try:
                cells.append(fmt(head[p]))
            except (KeyError, TypeError):
                cells.append("n/a")
        return f"| {label} | " + " | ".join(cells) + " |"

    return [
        "CPU µs per request, -d 512, 50 clients (SET, GET, LPUSH, RPOP), medians over repeats; the components from "
        "py-spy and perf profiles scaled to the measured utime and stime. The model: each of Redis, redis-benchmark "
        f"and the relay is one thread on {d['config']['usable_cpus']} shared cores.",
        "",
        "| | " + " | ".join(f"-P {p}" for p in ps) + " |", "|---|" + "---:|" * len(ps),
        row("brokerproxy, ACLs + metrics on", lambda h: f"**{h['proxy_us']:.1f}**"),
        row("of which: kernel (system calls, wake-ups)", lambda h: f"{h['kernel']:.1f}"),
        row("of which: uvloop + hiredis (C)", lambda h: f"{h['uvloop'] + h['hiredis']:.1f}"),
        row("of which: Python dispatch (session, framing, glue)", lambda h: f"{h['python_dispatch']:.1f}"),
        row("of which: ACL and observation modules", lambda h: f"{h['acl_observe']:.1f}"),
        row("ACLs + metrics over the plain proxy", lambda h: f"{h['acl_metrics_cpu_us']:+.1f}"),
        row("bare uvloop relay / HAProxy / twemproxy",
            lambda h: " / ".join(_r(h.get(f"{t}_us"), 1) for t in ("relay", "haproxy", "twemproxy"))),
        row("Redis, direct / through brokerproxy",
            lambda h: f"{h['redis_direct_us']:.1f} / {h['redis_via_proxy_us']:.1f}"),
        row("ratio: measured / model with the cores other work left / model on all cores",
            lambda h: f"{_r(h['measured_ratio'])} / {h['model_ratio_cores_left']:.2f} (N = {h['cores_left']:.1f}) / "
            f"{h['model_ratio']:.2f}"),
        row("best ratio at brokerproxy's cost (Redis, redis-benchmark as direct)", lambda h: f"{h['best_ratio']:.2f}"),
        row("issue 6's target needs the relay at", lambda h: f"≤ {h['budget_us']:.1f} µs"),
        row("a relay costing only the kernel's share reaches",
            lambda h: f"{h['kernel_floor_ratio']:.2f} ({h['kernel_floor_us']:.1f} µs)"),
    ]


SECTIONS = {
    "hotpath": hotpath_section,
    "latency": latency_section,
    "celery_throughput": celery_section,
    "connections": connections_section,
    "e2e_redis_benchmark": e2e_section,
    "tls": tls_section,
    "workers": workers_section,
    E2E_ACL_METRICS: e2e_section,
    "cpu_profile": cpu_profile_section,
}


def summary(out: Path, statuses: list[dict[str, Any]], args: argparse.Namespace, started: dt.datetime) -> str:
    machine: dict[str, Any] = {}
    for name in ORDER:
        d = _load(out, name)
        if d and d.get("machine"):
            machine = d["machine"]
            break
    lines = [
        "# Benchmark summary",
        "",
        f"`{' '.join(['python bench/run.py', *args.argv])}` on {started.strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{sum(s['duration_s'] for s in statuses if s['returncode'] is not None) / 60:.1f} minutes"
        + ("; the benchmarks marked \"from an earlier run\" were not run this time, their figures are from the "
           "reports already here." if any(s["returncode"] is None for s in statuses) else "."),
    ]
    if args.quick:
        lines += ["", "**--quick run: a smoke test of the suite; these figures mean nothing.**"]
    lines += [
        "",
        f"Machine: {machine.get('cpu_model', 'unknown')}, {machine.get('logical_cpus')} logical CPUs, "
        f"{machine.get('kernel')}; {machine.get('python')}, {machine.get('event_loop')}, hiredis "
        f"{machine.get('hiredis')}, redis-server {machine.get('redis_server')}; brokerproxy "
        f"{machine.get('brokerproxy_commit')}. Redis, the proxies and the load generators share the machine's cores, "
        "and the machine is shared with other work: every figure below is a ratio to a baseline measured in the same "
        "run (alternating A B A B), except the hot path, which is one process on one core.",
        "",
        "| benchmark | report | status | minutes | load average before → after |",
        "|---|---|---|---:|---|",
    ]
    for s in statuses:
        if s["returncode"] is None:
            state = f"from an earlier run ({s['started_at']})"
        else:
            state = "ok" if s["returncode"] == 0 else f"**failed** (exit {s['returncode']})"
        lines.append(f"| {TITLES[s['name']]} | [{s['name']}.md]({s['name']}.md) | {state} "
                     f"| {s['duration_s'] / 60:.1f} | {s['loadavg_before']} → {s['loadavg_after']} |")
    if not args.quick:
        usable = {s["name"] for s in statuses if s["returncode"] in (0, None)}
        lines += ["", "## Targets (issue 6)", "", *targets_section(out, usable)]
    for s in statuses:
        d = _load(out, s["name"]) if s["returncode"] in (0, None) else None
        lines += ["", f"## {TITLES[s['name']]}", ""]
        if d is None:
            lines.append("No figures: the benchmark failed (see its output).")
            continue
        lines += SECTIONS[s["name"]](d)
    return "\n".join(lines) + "\n"


def earlier(out: Path, name: str) -> dict[str, Any] | None:
    """A benchmark not run this time (``--only``) whose report is in ``out``: its status row for the summary."""
    d = _load(out, name)
    if d is None:
        return None
    return {"name": name, "command": d.get("command", ""), "returncode": None, "duration_s": d.get("duration_s", 0),
            "loadavg_before": d.get("loadavg_before", "?"), "loadavg_after": d.get("loadavg_after", "?"),
            "started_at": d.get("started_at", "?")}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every benchmark in its tiny configuration")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(ORDER)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory (default {DEFAULT_OUT})")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install missing peers")
    p.add_argument("--e2e-repeats", type=int, default=E2E_REPEATS,
                   help=f"repeats of the redis-benchmark runs in a full run (default {E2E_REPEATS})")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.names = list(ORDER)
    if args.only:
        wanted = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = set(wanted) - set(ORDER)
        if unknown:
            p.error(f"unknown benchmark(s) {sorted(unknown)}: choose from {', '.join(ORDER)}")
        args.names = [n for n in ORDER if n in wanted]
    args.out = args.out.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    args.out.mkdir(parents=True, exist_ok=True)
    ran = {name: run_one(name, args) for name in args.names}
    # With --only, the summary keeps the other benchmarks' figures from the reports already in --out.
    statuses = [s for s in (ran.get(n) or earlier(args.out, n) for n in ORDER) if s is not None]
    text = summary(args.out, statuses, args, started)
    write_atomic(args.out / "SUMMARY.md", text)
    log(f"\nwrote {args.out / 'SUMMARY.md'}")
    print(text, end="")
    return 0 if all(s["returncode"] == 0 for s in ran.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
