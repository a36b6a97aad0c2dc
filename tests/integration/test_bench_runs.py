"""The end-to-end benchmark runs and writes its reports. A smoke test: no figure is checked, only that each exists.

Benchmarks' results are files, not test assertions (DESIGN.md §4): timing on a shared machine proves nothing here.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "e2e_redis_benchmark.py"
TESTS = ("PING_MBULK", "SET", "GET", "LPUSH", "RPOP")
SIZES = (512, 2048)
PIPELINES = (1, 16)


def test_quick_benchmark_writes_a_ratio_for_every_test(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"

    md = (out / "e2e_redis_benchmark.md").read_text()
    report = json.loads((out / "e2e_redis_benchmark.json").read_text())
    assert not list(out.glob("*.tmp"))

    summary = {(e["size"], e["pipeline"], e["test"]): e for e in report["summary"]}
    assert set(summary) == {(s, p, t) for s in SIZES for p in PIPELINES for t in TESTS}
    for key, entry in summary.items():
        for metric in ("rps", "p50_latency_ms", "p99_latency_ms"):
            ratio = entry[metric]["ratio"]["paired_median"]
            assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0, (key, metric, ratio)

    # Every run is in the raw data: one direct and one proxy run per size and depth.
    runs = {(r["size"], r["pipeline"], r["target"]) for r in report["runs"]}
    assert runs == {(s, p, t) for s in SIZES for p in PIPELINES for t in ("direct", "proxy")}

    # The markdown table has a row per (size, depth, test) with an rps, p50 and p99 ratio in it.
    for size in SIZES:
        for pipeline in PIPELINES:
            for test in TESTS:
                row = re.search(rf"^\| {size} \| {pipeline} \| {test} \|(.*)$", md, re.MULTILINE)
                assert row, (size, pipeline, test)
                assert len(re.findall(r"\*\*\d+\.\d\d\*\*", row.group(1))) == 3, row.group(0)
    for heading in ("## Machine", "## Commands", "redis-benchmark", "CPU"):
        assert heading in md
    # The headline table is also printed.
    for test in TESTS:
        assert re.search(rf"^\| {test} \|", done.stdout, re.MULTILINE), test
