#!/usr/bin/env python3
"""Round-trip latency: one client, one command at a time, Redis directly vs through brokerproxy.

Theory of operation. The script starts its own ``redis-server`` on a free loopback port and one
``python -m brokerproxy`` in front of it (the helpers of ``e2e_redis_benchmark.py``), stores a 512-byte value, and
opens one TCP connection to each (``TCP_NODELAY``, blocking socket). A round trip is: ``sendall`` one request,
``recv`` until the whole reply is in, timed with ``time.perf_counter_ns``. Commands: ``PING`` (``+PONG``) and
``GET`` of the 512-byte value (a 519-byte bulk reply).

Per repeat and command it runs a block of round trips against Redis (A), then the same block through the proxy (B),
so the blocks alternate A B A B and each proxy block has a direct block taken moments before it. Per block: p50
and p99 in microseconds. "Added" is proxy minus direct, per repeat (the proxy block and the direct block just before
it), then the median over repeats with the range. The client is Python: its own cost (a few microseconds per round
trip) is in both figures and cancels in the difference.

Usage::

    python bench/latency.py [--quick] [--repeats N] [--round-trips N] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import socket
import statistics
import sys
import tempfile
import time
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
    redis_server,
    run_benchmark,
    spread,
)
from e2e_redis_benchmark import LABELS, PEERS, start_peers

NAME = "latency"
VALUE_SIZE = 512
DEFAULT_REPEATS = 7
DEFAULT_ROUND_TRIPS = 4000
QUICK_REPEATS = 1
QUICK_ROUND_TRIPS = 200
WARMUP_ROUND_TRIPS = 200
TARGETS = ("direct", "proxy")  # and any --peers after them
KEY = b"bench:latency:value"
VALUE = (b"0123456789abcdef" * (VALUE_SIZE // 16 + 1))[:VALUE_SIZE]


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


COMMANDS: dict[str, tuple[bytes, bytes]] = {
    "PING": (_command(b"PING"), b"+PONG\r\n"),
    f"GET {VALUE_SIZE} B": (_command(b"GET", KEY), b"$%d\r\n%s\r\n" % (VALUE_SIZE, VALUE)),
}


class Client:
    """One blocking connection that does one round trip at a time and checks every reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(1 << 16)

    def call(self, request: bytes, reply_len: int) -> memoryview:
        sock = self.sock
        view = memoryview(self.buf)
        sock.sendall(request)
        got = 0
        while got < reply_len:
            n = sock.recv_into(view[got:], 65536 - got)
            if not n:
                raise BenchError("connection closed mid-reply")
            got += n
        return view[:got]

    def round_trips(self, request: bytes, reply: bytes, n: int) -> list[float]:
        """n timed round trips; microseconds each. The first reply is checked byte for byte."""
        got = self.call(request, len(reply))
        if bytes(got) != reply:
            raise BenchError(f"unexpected reply {bytes(got[:60])!r}, wanted {reply[:60]!r}")
        sock, view, size = self.sock, memoryview(self.buf), len(reply)
        clock = time.perf_counter_ns
        out = [0.0] * n
        for i in range(n):
            t0 = clock()
            sock.sendall(request)
            got_n = 0
            while got_n < size:
                k = sock.recv_into(view[got_n:], 65536 - got_n)
                if not k:
                    raise BenchError("connection closed mid-reply")
                got_n += k
            out[i] = (clock() - t0) / 1000
        return out

    def close(self) -> None:
        self.sock.close()


def percentile(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(blocks: list[dict[str, Any]], targets: Sequence[str]) -> list[dict[str, Any]]:
    """Per command and target other than direct: medians, and the paired difference and ratio to direct."""
    out = []
    for cmd in COMMANDS:
        reps: dict[int, dict[str, dict[str, float]]] = {}
        for b in blocks:
            if b["command"] == cmd:
                reps.setdefault(b["repeat"], {})[b["target"]] = b
        for target in targets:
            if target == "direct":
                continue
            pairs = [r for _, r in sorted(reps.items()) if {"direct", target} <= set(r)]
            entry: dict[str, Any] = {"command": cmd, "target": target, "repeats": len(pairs)}
            for metric in ("p50_us", "p99_us", "mean_us"):
                d = [p["direct"][metric] for p in pairs]
                x = [p[target][metric] for p in pairs]
                added = [b - a for a, b in zip(d, x, strict=True)]
                entry[metric] = {
                    "direct": spread(d), target: spread(x), "ratio": paired(d, x),
                    "added_us": {"median": statistics.median(added), "min": min(added), "max": max(added)},
                }
            out.append(entry)
    return out


def _added(a: dict[str, float]) -> str:
    if a["min"] == a["max"]:
        return f"**{a['median']:+.1f}**"
    return f"**{a['median']:+.1f}** ({a['min']:+.1f} to {a['max']:+.1f})"


def markdown(rep: Report, body: dict[str, Any]) -> str:
    cfg, cmds = body["config"], body["commands"]
    rows = []
    for e in body["summary"]:
        t = e["target"]
        for metric, label in (("p50_us", "p50"), ("p99_us", "p99"), ("mean_us", "mean")):
            m = e[metric]
            rows.append(
                f"| {e['command']} | {LABELS[t]} | {label} | {m['direct']['median']:.1f} | {m[t]['median']:.1f} "
                f"| {_added(m['added_us'])} | {fmt_ratio(m['ratio'])} |"
            )
    peers = []
    for name, info in body["peers"].items():
        if info["available"]:
            peers.append(f"- {LABELS[name]} ({info['version']}), as in the end-to-end benchmark: `{info['command']}`")
        else:
            peers.append(f"- {LABELS[name]}: {info['reason']}")
    peer_text = ""
    if peers:
        peer_text = (
            "\nPeers, for scale (what a proxy written in C adds on this machine), measured in the same rotation:\n\n"
            + "\n".join(peers)
            + "\n\ntwemproxy answers `PING` itself without asking Redis: its PING row is not a relayed round trip.\n"
        )
    order = " then ".join(LABELS[t] for t in cfg["targets"])
    return rep.header("Round-trip latency: one client, one command at a time", cfg["quick"]) + f"""
## Commands

```
{cmds["redis_server"]}
{cmds["brokerproxy"]}
```

One Python client (blocking socket, TCP_NODELAY) per path; per repeat and command, {cfg["round_trips"]} round trips
against Redis (port {cmds["direct_port"]}), then {cfg["round_trips"]} through each proxy (order: {order});
{cfg["repeats"]} repeat(s), after {cfg["warmup"]} discarded round trips per path and command.
{peer_text}
## Microseconds per round trip

"direct" and "via" are the medians over repeats of each block's percentile. "added" is via - direct per repeat
(median, with the range over repeats): what the proxy adds to one round trip. "ratio" is via ÷ direct per repeat.

| command | via | percentile | direct µs | via µs | added µs | ratio |
|---|---|---|---:|---:|---:|---|
""" + "\n".join(rows) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run for the test suite; figures mean nothing")
    p.add_argument("--repeats", type=int, help=f"A B pairs per command (default {DEFAULT_REPEATS})")
    p.add_argument("--round-trips", type=int, help=f"round trips per block (default {DEFAULT_ROUND_TRIPS})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory (default {DEFAULT_OUT})")
    p.add_argument("--peers", default="", help="also measure through these peers: haproxy, twemproxy, all")
    p.add_argument("--install-peers", action="store_true", help="apt-get install a missing peer")
    args = p.parse_args(argv)
    peers = [x.strip() for x in args.peers.split(",") if x.strip() and x.strip() != "none"]
    args.peers = list(PEERS) if peers == ["all"] else list(dict.fromkeys(peers))
    if set(args.peers) - set(PEERS):
        p.error(f"unknown peer(s): choose from {', '.join(PEERS)}")
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.round_trips is None:
        args.round_trips = QUICK_ROUND_TRIPS if args.quick else DEFAULT_ROUND_TRIPS
    if args.repeats < 1 or args.round_trips < 2:
        p.error("--repeats must be positive and --round-trips at least 2")
    return args


def measure(args: argparse.Namespace, redis_bin: str) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []
    warmup = 20 if args.quick else WARMUP_ROUND_TRIPS
    peers: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="brokerproxy-latency-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        redis_port, redis_cmd = stack.enter_context(redis_server(redis_bin, workdir))
        proxy_port, proxy_cmd, proxy_proc, _log = stack.enter_context(proxy_process(redis_port, workdir))
        ports = {"direct": redis_port, "proxy": proxy_port}
        procs = {"proxy": proxy_proc}
        started, found = start_peers(stack, args.peers, args.install_peers, redis_port, workdir)
        peers.update(found)
        for name, (port, proc, cmd, _config) in started.items():
            ports[name], procs[name] = port, proc
            peers[name]["command"] = shlex.join(cmd)
        targets = [t for t in ("direct", "proxy", *PEERS) if t in ports]
        clients = {t: Client(ports[t]) for t in targets}
        for client in clients.values():
            stack.callback(client.close)
        clients["direct"].call(_command(b"SET", KEY, VALUE), len(b"+OK\r\n"))
        for t in targets:
            for request, reply in COMMANDS.values():
                clients[t].round_trips(request, reply, warmup)
        for repeat in range(args.repeats):
            for cmd_name, (request, reply) in COMMANDS.items():
                got = {}
                for t in targets:
                    us = clients[t].round_trips(request, reply, args.round_trips)
                    for name, proc in procs.items():
                        if proc.poll() is not None:
                            raise BenchError(f"{LABELS[name]} exited with {proc.returncode}")
                    got[t] = {
                        "repeat": repeat, "command": cmd_name, "target": t, "n": len(us),
                        "p50_us": percentile(us, 50), "p99_us": percentile(us, 99),
                        "mean_us": statistics.fmean(us), "min_us": min(us), "max_us": max(us),
                    }
                    blocks.append(got[t])
                log(f"[{repeat + 1}/{args.repeats}] {cmd_name:<10} p50 "
                    + "  ".join(f"{t} {b['p50_us']:.1f} µs" for t, b in got.items()))
    return {
        "config": {
            "quick": args.quick, "repeats": args.repeats, "round_trips": args.round_trips, "warmup": warmup,
            "value_size": VALUE_SIZE, "targets": targets,
            "order": "per repeat and command: one block per target, direct first",
        },
        "commands": {
            "redis_server": shlex.join(redis_cmd), "brokerproxy": shlex.join(proxy_cmd),
            "direct_port": redis_port, "proxy_port": proxy_port,
            "requests": {k: v[0].decode("latin-1")[:80] for k, v in COMMANDS.items()},
        },
        "peers": peers,
        "blocks": blocks,
        "summary": summarize(blocks, targets),
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(NAME, "bench/latency.py", argv, parse_args, measure, markdown, "## Microseconds")


if __name__ == "__main__":
    sys.exit(main())
