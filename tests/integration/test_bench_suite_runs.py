"""The benchmark suite runs from its one entry point and writes every report. A smoke test: no figure is judged.

``bench/run.py --quick`` runs each benchmark in its tiny configuration into a temp dir; these tests check that each
report exists and holds the figures it should (present, finite, positive), and that SUMMARY.md has each section.
Timing on a shared machine proves nothing here, so nothing is compared with anything (DESIGN.md §2, bench/README.md).
Peers (HAProxy, twemproxy) are used when installed and reported as not available otherwise; this test never
installs anything.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "bench" / "run.py"
NAMES = ("hotpath", "latency", "celery_throughput", "connections", "e2e_redis_benchmark", "tls")


def positive(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("bench-results")
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--no-install", "--out", str(out)],
        capture_output=True, text=True, timeout=240, check=False, cwd=REPO,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    return out, done


def report(out: Path, name: str) -> tuple[str, dict[str, Any]]:
    md = (out / f"{name}.md").read_text()
    data = json.loads((out / f"{name}.json").read_text())
    for heading in ("## Machine", "CPU", "load average"):
        assert heading in md, (name, heading)
    assert data["machine"]["cpu_model"] and data["loadavg_before"] and data["loadavg_after"]
    return md, data


def test_every_report_and_the_summary_are_written(suite: tuple[Path, Any]) -> None:
    out, done = suite
    for name in NAMES:
        assert (out / f"{name}.md").exists() and (out / f"{name}.json").exists(), name
    assert not list(out.glob("*.tmp"))
    summary = (out / "SUMMARY.md").read_text()
    assert summary == done.stdout
    for title in ("Hot path", "Round-trip latency", "Celery throughput", "Connections", "redis-benchmark end to end",
                  "TLS"):
        assert f"## {title}" in summary, title
    assert "**failed**" not in summary
    assert "Machine:" in summary


def test_hotpath(suite: tuple[Path, Any]) -> None:
    md, data = report(suite[0], "hotpath")
    workloads = {e["workload"]: e for e in data["capture"] + data["synthetic"]}
    expected = {"capture per-frame", "capture 64k"} | {
        f"{c} {s} P{d}" for c in ("LPUSH", "BRPOP", "SET", "GET") for s in ("100 B", "1 KiB", "16 KiB", "64 KiB")
        for d in (1, 16)
    }
    assert set(workloads) == expected
    for name, e in workloads.items():
        for parser in ("pure", "hiredis"):
            assert positive(e["ns_per_command"][parser]["median"]), (name, parser)
            assert positive(e["commands_per_s"][parser]), (name, parser)
        assert positive(e["hiredis_speedup"]), name
        assert re.search(rf"^\| {re.escape(name)} \| [\d,]+", md, re.MULTILINE), name
    assert workloads["capture per-frame"]["commands_per_iteration"] == 3861  # the capture's README
    # --profile (run.py passes it): a top-20 table per profiled workload.
    assert len(data["profiles"]) >= 1
    for prof in data["profiles"]:
        assert 0 < len(prof["top"]) <= 20
        assert f"## Profile: {prof['workload']}" in md


def test_latency(suite: tuple[Path, Any]) -> None:
    md, data = report(suite[0], "latency")
    by = {(e["command"], e["target"]): e for e in data["summary"]}
    for cmd in ("PING", "GET 512 B"):
        e = by[cmd, "proxy"]
        for metric in ("p50_us", "p99_us"):
            assert positive(e[metric]["direct"]["median"]) and positive(e[metric]["proxy"]["median"])
            assert math.isfinite(e[metric]["added_us"]["median"])
        assert re.search(rf"^\| {cmd} \| brokerproxy \| p50 \| [\d.]+ \| [\d.]+ \| \*\*[+-][\d.]+\*\*", md, re.M)
    for peer, info in data["peers"].items():
        if info["available"]:
            assert (("PING", peer) in by) and (("GET 512 B", peer) in by)
        else:
            assert "not" in info["reason"]


def test_celery_throughput(suite: tuple[Path, Any]) -> None:
    md, data = report(suite[0], "celery_throughput")
    for kind in ("publish", "end_to_end"):
        s = data["summary"][kind]
        assert s["repeats"] >= 1
        assert positive(s["direct"]["median"]) and positive(s["proxy"]["median"])
        assert positive(s["ratio"]["paired_median"])
    assert re.search(r"^\| publish-only .*\*\*\d+\.\d\d\*\*", md, re.M)
    assert re.search(r"^\| end-to-end .*\*\*\d+\.\d\d\*\*", md, re.M)


def test_connections(suite: tuple[Path, Any]) -> None:
    md, data = report(suite[0], "connections")
    assert len(data["idle"]) == 2
    for e in data["idle"]:
        assert e["connections"] >= 1
        assert math.isfinite(e["proxy_kib_per_connection"])
        assert e["redis_connected_clients"] >= e["connections"]  # every client had its upstream connection
        assert e["proxy_fds_after"] >= 2 * e["connections"]
    for run in data["burst_runs"]:
        assert run["answered"] + run["failed"] + run["unanswered"] == run["connections"]
        assert positive(run["answered_p50_s"])
    s = data["burst_summary"]["answered_p50_s"]
    assert positive(s["direct"]["median"]) and positive(s["proxy"]["median"])
    assert positive(s["ratio"]["paired_median"])
    assert "## Idle connections" in md and "## Burst" in md


def test_e2e_with_peers(suite: tuple[Path, Any]) -> None:
    md, data = report(suite[0], "e2e_redis_benchmark")
    assert len(data["summary"]) == 2 * 2 * 5
    for e in data["summary"]:
        assert positive(e["rps"]["ratio"]["paired_median"])
    assert set(data["peers"]) == {"haproxy", "twemproxy"}
    for peer, info in data["peers"].items():
        if info["available"]:
            rows = data["peer_summary"][peer]
            assert len(rows) == 2 * 2 * 5
            for e in rows:
                assert positive(e["rps"]["ratio"]["paired_median"]) and positive(e["proxy_vs_peer"]["paired_median"])
        else:
            assert info["reason"].startswith("not"), info
            assert peer not in data["peer_summary"]
    assert "## Peers" in md
    assert re.search(r"^\| -d 512 -P 1 \| SET \| \*\*\d+\.\d\d\*\*", md, re.M)


def test_tls(suite: tuple[Path, Any]) -> None:
    """Four paths to one Redis (plaintext, its TLS port, the proxy's plaintext and TLS listeners): every ratio and
    round-trip difference is there, and both TLS paths really negotiated TLS."""
    md, data = report(suite[0], "tls")
    paths = ("direct", "redis_tls", "proxy", "proxy_tls")
    comparisons = ("proxy_tls/redis_tls", "proxy_tls/proxy", "redis_tls/direct", "proxy/direct", "proxy_tls/direct")
    assert data["config"]["comparisons"] == list(comparisons)
    for path in ("redis_tls", "proxy_tls"):
        assert data["tls"]["sessions"][path]["version"].startswith("TLS"), data["tls"]
    assert {(r["pipeline"], r["target"]) for r in data["runs"]} == {(p, t) for p in (1, 16) for t in paths}
    assert all("--tls" in r["command"] for r in data["runs"] if r["target"].endswith("_tls"))
    assert len(data["throughput"]) == 2 * 5
    for e in data["throughput"]:
        assert set(e["paths"]) == set(paths)
        for c in comparisons:
            assert positive(e["ratios"][c]["rps"]["paired_median"]), (e["pipeline"], e["test"], c)
    for pipeline in ("1", "16"):
        for c in comparisons:
            assert positive(data["throughput_headline"][c][pipeline]["median"]), (pipeline, c)
    assert {e["command"] for e in data["latency"]} == {"PING", "GET 512 B"}
    for e in data["latency"]:
        for p in paths:
            assert positive(e["paths"][p]["p50_us"]["median"]), (e["command"], p)
        for c in comparisons:
            assert math.isfinite(e["comparisons"][c]["p50_us"]["added_us"]["median"]), (e["command"], c)
    assert re.search(r"^\| brokerproxy TLS ÷ Redis TLS \| \*\*\d+\.\d\d\*\*", md, re.M)
    assert re.search(r"^\| PING \| brokerproxy TLS - Redis TLS \| \*\*[+-][\d.]+\*\*", md, re.M)
    assert "## Round-trip latency" in md and "## Commands" in md


def test_cpu_profile(suite: tuple[Path, Any]) -> None:
    """CPU per request of every process on every path, brokerproxy's split by component (or why a profiler could not
    run), and the bound the figures put on the ratio. Nothing is compared with anything."""
    md, data = report(suite[0], "cpu_profile")
    for pipeline in ("1", "16"):
        paths = data["summary"][pipeline]
        assert {"direct", "proxy", "plain", "relay"} <= set(paths), paths.keys()
        for target, e in paths.items():
            assert positive(e["rps"]["median"]), (pipeline, target)
            procs = ("redis", "bench") if target == "direct" else ("relay", "redis", "bench")
            for proc in procs:
                assert math.isfinite(e[proc]["total_us"]) and e[proc]["total_us"] >= 0, (pipeline, target, proc)
            if target != "direct":
                assert positive(e["ratio"]["paired_median"]), (pipeline, target)
        b = data["breakdown"][pipeline]
        assert positive(b["total_us"])
        assert b["rows"] and all(math.isfinite(v) and v >= 0 for v in b["rows"].values())
        for kind in ("python", "native", "perf"):
            prof = data["profiles"][pipeline][kind]
            assert (prof.get("ok") and prof["samples"] > 0) or prof["why"], (pipeline, kind, prof)
        m = data["model"][pipeline]
        assert positive(m["budget_us"]) or math.isfinite(m["budget_us"])
        assert positive(m["paths"]["proxy"]["best_ratio"]) and positive(m["paths"]["relay"]["model_ratio"])
        assert positive(data["headline"][pipeline]["proxy_us"])
    for heading in ("## CPU per request", "## Where brokerproxy's CPU goes", "## What bounds the ratio",
                    "**-P 1: the cost.**", "**-P 16: the bound.**", "**What would close the gap**"):
        assert heading in md, heading
    summary = (suite[0] / "SUMMARY.md").read_text()
    assert "## Where the CPU goes" in summary and "## redis-benchmark end to end, ACLs and metrics on" in summary
