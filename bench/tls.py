#!/usr/bin/env python3
"""TLS: throughput and round-trip latency through brokerproxy's TLS listener, against its plaintext listener,
Redis's own TLS port and plaintext Redis, all in the same run.

Theory of operation. The script makes a CA, a server certificate (for ``localhost`` and ``127.0.0.1``) and a client
certificate at run time with trustme, in a temp dir (no key is checked in). It starts one ``redis-server`` on a free
loopback port with a second, TLS port (``--tls-port``, ``--tls-auth-clients yes``: Redis's default), and one
``python -m brokerproxy`` in front of it with both a plaintext listener and a TLS listener (``tls_listen``, ``[tls]``
with ``auth_clients = "yes"``, the same certificate files); the proxy speaks plaintext to Redis. So there are four
paths to the same Redis process:

- ``direct``: plaintext Redis, the common baseline;
- ``redis_tls``: Redis's own TLS port;
- ``proxy``: brokerproxy's plaintext listener;
- ``proxy_tls``: brokerproxy's TLS listener (TLS client to proxy, plaintext proxy to Redis).

Both TLS servers require a client certificate, and every client presents the same one and verifies the server
against the CA; the handshake is once per connection, so it weighs on neither figure below.

Latency: one client per path (Python, blocking socket, TCP_NODELAY; ``ssl``-wrapped for the TLS paths), one request
at a time, ``PING`` and ``GET`` of a 512-byte value, as ``latency.py``. Per repeat and command a block of round trips
on each path in the order direct, Redis TLS, brokerproxy, brokerproxy TLS. "Added" is one path's percentile minus
another's in the same repeat (the Python client's cost, TLS included where both paths are TLS, cancels).

Throughput: ``redis-benchmark`` as in ``e2e_redis_benchmark.py`` (50 clients, ``-d 512``, PING_MBULK, SET, GET,
LPUSH, RPOP) at ``-P 1`` and ``-P 16``, with ``--tls --cacert --cert --key --sni localhost`` on the TLS paths. Per
repeat and depth one run per path in the same order, so the runs alternate A B C D A B C D.

Every figure is a ratio (or a difference) between two paths, taken per repeat and then the median over repeats with
the range: brokerproxy TLS ÷ Redis TLS (what the proxy costs when both ends are TLS), brokerproxy TLS ÷ brokerproxy
(what TLS costs in the proxy), and each path ÷ direct plaintext Redis.

Usage::

    python bench/tls.py [--quick] [--repeats N] [--requests N] [--latency-repeats N] [--round-trips N] [--out DIR]

Writes ``tls.md`` and ``tls.json`` into ``--out`` (default bench/results/). ``--quick`` is a tiny configuration for
the test suite: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import socket
import ssl
import statistics
import subprocess
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
    find_binary,
    fmt_ratio,
    fmt_spread,
    free_port,
    log,
    paired,
    proxy_process,
    redis_server,
    run_benchmark,
    spread,
    tail,
)
from e2e_redis_benchmark import CLIENTS, PIPELINED_REQUEST_FACTOR, TESTS, benchmark_command, requests_for
from e2e_redis_benchmark import run_benchmark as run_redis_benchmark
from latency import COMMANDS, KEY, VALUE, Client, _command, percentile

NAME = "tls"
SIZE = 512
PIPELINES = (1, 16)
#: The paths, in the order each repeat runs them.
TARGETS = ("direct", "redis_tls", "proxy", "proxy_tls")
LABELS = {"direct": "Redis", "redis_tls": "Redis TLS", "proxy": "brokerproxy", "proxy_tls": "brokerproxy TLS"}
TLS_TARGETS = ("redis_tls", "proxy_tls")
#: (path, baseline): every figure is path ÷ baseline (or path - baseline), paired per repeat.
COMPARISONS = (
    ("proxy_tls", "redis_tls"),
    ("proxy_tls", "proxy"),
    ("redis_tls", "direct"),
    ("proxy", "direct"),
    ("proxy_tls", "direct"),
)
DEFAULT_REPEATS = 7
DEFAULT_REQUESTS = 20_000
#: Latency comes in many short blocks: a block's round trips share one scheduling state (which core each process
#: wakes on), and on the 2-core machine that state moves a block's p50 by a factor of two; many blocks, paired,
#: let the median see through it.
DEFAULT_LATENCY_REPEATS = 21
DEFAULT_ROUND_TRIPS = 1000
QUICK_REPEATS = 1
QUICK_REQUESTS = 1_000
QUICK_ROUND_TRIPS = 200
WARMUP_REQUESTS = 2_000
WARMUP_ROUND_TRIPS = 200
SNI = "localhost"
METRICS = ("rps", "p50_latency_ms", "p99_latency_ms")


def cname(path: str, base: str) -> str:
    return f"{path}/{base}"


def clabel(path: str, base: str, sep: str = "÷") -> str:
    return f"{LABELS[path]} {sep} {LABELS[base]}"


# ---------------------------------------------------------------------------------------------- certificates


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and 127.0.0.1, a client certificate: PEM files in ``directory``."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert(SNI, "127.0.0.1")
    client = ca.issue_cert("bench.clients.test", common_name="bench")
    files = {
        "ca": (ca.cert_pem.bytes()),
        "server_cert": b"".join(b.bytes() for b in server.cert_chain_pems),
        "server_key": server.private_key_pem.bytes(),
        "client_cert": b"".join(b.bytes() for b in client.cert_chain_pems),
        "client_key": client.private_key_pem.bytes(),
    }
    names = {"ca": "ca.crt", "server_cert": "server.crt", "server_key": "server.key",
             "client_cert": "client.crt", "client_key": "client.key"}
    out = {}
    for key, data in files.items():
        path = directory / names[key]
        path.write_bytes(data)
        path.chmod(0o600)
        out[key] = path
    return out


def key_type(pem: Path) -> str:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    public = cert.public_key()
    curve = getattr(public, "curve", None)
    if curve is not None:
        return f"ECDSA {curve.name}"
    return f"{type(public).__name__} {getattr(public, 'key_size', '')}".strip()


def client_context(pki: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    return ctx


class TLSClient(Client):
    """latency.Client over TLS: the same timed loop, on an ``ssl`` socket (verified, with the client certificate)."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname=SNI)
        self.buf = bytearray(1 << 16)

    def session(self) -> dict[str, Any]:
        s = self.sock
        assert isinstance(s, ssl.SSLSocket)
        cipher = s.cipher()
        return {"version": s.version(), "cipher": cipher[0] if cipher else None}


def wait_for_tls(port: int, ctx: ssl.SSLContext, what: str, log_file: Path, timeout: float = 15.0) -> dict[str, Any]:
    """PING over TLS until it answers; the negotiated version and cipher."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            c = TLSClient(port, ctx)
        except (OSError, ssl.SSLError) as exc:
            last = exc
            time.sleep(0.1)
            continue
        try:
            got = bytes(c.call(_command(b"PING"), 7))
            if got != b"+PONG\r\n":
                raise BenchError(f"{what}: PING over TLS answered {got!r}")
            return c.session()
        finally:
            c.close()
    raise BenchError(f"{what}: no TLS PING on 127.0.0.1:{port} after {timeout}s ({last!r})\n{tail(log_file)}")


# ---------------------------------------------------------------------------------------------- commands


def tls_flags(pki: dict[str, Path]) -> list[str]:
    return ["--tls", "--cacert", str(pki["ca"]), "--cert", str(pki["client_cert"]), "--key", str(pki["client_key"]),
            "--sni", SNI]


def bench_command(binary: str, port: int, pipeline: int, requests: int, pki: dict[str, Path] | None) -> list[str]:
    cmd = benchmark_command(binary, port, SIZE, pipeline, requests)
    if pki is not None:
        cmd[1:1] = tls_flags(pki)
    return cmd


def proxy_config(tls_port: int, pki: dict[str, Path]) -> str:
    return (
        f'tls_listen = "127.0.0.1:{tls_port}"\n\n[tls]\ncert_file = "{pki["server_cert"]}"\n'
        f'key_file = "{pki["server_key"]}"\nca_file = "{pki["ca"]}"\nauth_clients = "yes"\n'
    )


def redis_tls_args(tls_port: int, pki: dict[str, Path]) -> list[str]:
    return ["--tls-port", str(tls_port), "--tls-cert-file", str(pki["server_cert"]), "--tls-key-file",
            str(pki["server_key"]), "--tls-ca-cert-file", str(pki["ca"]), "--tls-auth-clients", "yes"]


# ---------------------------------------------------------------------------------------------- figures


def _pairs(rows: list[dict[str, Any]], key: tuple[str, ...]) -> dict[tuple[Any, ...], dict[int, dict[str, Any]]]:
    out: dict[tuple[Any, ...], dict[int, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in key), {}).setdefault(r["repeat"], {})[r["target"]] = r
    return out


def summarize_throughput(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per depth and test: each path's medians and spread; per comparison the paired ratios of rps, p50, p99."""
    rows = [{"repeat": r["repeat"], "pipeline": r["pipeline"], "target": r["target"], "test": test, **figures}
            for r in runs for test, figures in r["results"].items() if test in TESTS]
    out = []
    grouped = _pairs(rows, ("pipeline", "test"))
    for pipeline in PIPELINES:
        for test in TESTS:
            reps = grouped.get((pipeline, test), {})
            entry: dict[str, Any] = {"pipeline": pipeline, "test": test, "repeats": len(reps), "paths": {},
                                     "ratios": {}}
            for t in TARGETS:
                got = [r[t] for _, r in sorted(reps.items()) if t in r]
                if got:
                    entry["paths"][t] = {m: spread([g[m] for g in got]) for m in METRICS}
            for path, base in COMPARISONS:
                both = [r for _, r in sorted(reps.items()) if {path, base} <= set(r)]
                if both:
                    entry["ratios"][cname(path, base)] = {
                        m: paired([b[base][m] for b in both], [b[path][m] for b in both]) for m in METRICS
                    }
            out.append(entry)
    return out


def headline(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """Per comparison and depth: the median over the five tests of each test's median paired rps ratio, and the
    lowest and highest test."""
    out: dict[str, Any] = {}
    for path, base in COMPARISONS:
        name = cname(path, base)
        out[name] = {}
        for pipeline in PIPELINES:
            ratios = [e["ratios"][name]["rps"]["paired_median"] for e in summary
                      if e["pipeline"] == pipeline and name in e["ratios"]
                      and e["ratios"][name]["rps"]["paired_median"] is not None]
            out[name][str(pipeline)] = (
                {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "tests": len(ratios)}
                if ratios else None
            )
    return out


def summarize_latency(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per command: each path's medians; per comparison the paired difference (µs added) and ratio."""
    out = []
    grouped = _pairs(blocks, ("command",))
    for cmd in COMMANDS:
        reps = grouped.get((cmd,), {})
        entry: dict[str, Any] = {"command": cmd, "repeats": len(reps), "paths": {}, "comparisons": {}}
        for t in TARGETS:
            got = [r[t] for _, r in sorted(reps.items()) if t in r]
            if got:
                entry["paths"][t] = {m: spread([g[m] for g in got]) for m in ("p50_us", "p99_us", "mean_us")}
        for path, base in COMPARISONS:
            both = [r for _, r in sorted(reps.items()) if {path, base} <= set(r)]
            if not both:
                continue
            comp: dict[str, Any] = {}
            for m in ("p50_us", "p99_us", "mean_us"):
                a, b = [x[base][m] for x in both], [x[path][m] for x in both]
                added = [y - x for x, y in zip(a, b, strict=True)]
                comp[m] = {"added_us": {"median": statistics.median(added), "min": min(added), "max": max(added)},
                           "ratio": paired(a, b)}
            entry["comparisons"][cname(path, base)] = comp
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------- report


def _range(h: dict[str, Any] | None) -> str:
    if h is None:
        return "n/a"
    if h["min"] == h["max"]:
        return f"**{h['median']:.2f}**"
    return f"**{h['median']:.2f}** ({h['min']:.2f}-{h['max']:.2f})"


def _added(a: dict[str, float]) -> str:
    if a["min"] == a["max"]:
        return f"**{a['median']:+.1f}**"
    return f"**{a['median']:+.1f}** ({a['min']:+.1f} to {a['max']:+.1f})"


def headline_table(head: dict[str, Any]) -> str:
    lines = ["| ratio | " + " | ".join(f"rps -d {SIZE} -P {p}" for p in PIPELINES) + " |",
             "|---|" + "---|" * len(PIPELINES)]
    for path, base in COMPARISONS:
        cells = [_range(head[cname(path, base)][str(p)]) for p in PIPELINES]
        lines.append(f"| {clabel(path, base)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def throughput_table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| -P | test | " + " | ".join(f"{LABELS[t]} rps" for t in TARGETS) + " | "
        + " | ".join(clabel(p, b) for p, b in COMPARISONS) + " |",
        "|---:|---|" + "---:|" * len(TARGETS) + "---|" * len(COMPARISONS),
    ]
    for e in summary:
        cells = [fmt_spread(e["paths"][t]["rps"]) if t in e["paths"] else "n/a" for t in TARGETS]
        cells += [fmt_ratio(e["ratios"][cname(p, b)]["rps"]) if cname(p, b) in e["ratios"] else "n/a"
                  for p, b in COMPARISONS]
        lines.append(f"| {e['pipeline']} | {e['test']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def throughput_latency_table(summary: list[dict[str, Any]], metric: str) -> str:
    lines = [
        "| -P | test | " + " | ".join(f"{LABELS[t]} ms" for t in TARGETS) + " | "
        + " | ".join(clabel(p, b) for p, b in COMPARISONS) + " |",
        "|---:|---|" + "---:|" * len(TARGETS) + "---|" * len(COMPARISONS),
    ]
    for e in summary:
        cells = [fmt_spread(e["paths"][t][metric], 3) if t in e["paths"] else "n/a" for t in TARGETS]
        cells += [fmt_ratio(e["ratios"][cname(p, b)][metric]) if cname(p, b) in e["ratios"] else "n/a"
                  for p, b in COMPARISONS]
        lines.append(f"| {e['pipeline']} | {e['test']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| command | " + " | ".join(f"{LABELS[t]} p50 µs" for t in TARGETS) + " |",
        "|---|" + "---:|" * len(TARGETS),
    ]
    for e in summary:
        cells = [f"{fmt_spread(e['paths'][t]['p50_us'], 1)} (best {e['paths'][t]['p50_us']['min']:.1f})"
                 if t in e["paths"] else "n/a" for t in TARGETS]
        lines.append(f"| {e['command']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| command | comparison | added at p50 µs | added at p99 µs | added, mean µs | p50 ratio |",
        "|---|---|---:|---:|---:|---|",
    ]
    for e in summary:
        for p, b in COMPARISONS:
            c = e["comparisons"].get(cname(p, b))
            if c is None:
                continue
            lines.append(
                f"| {e['command']} | {clabel(p, b, '-')} | {_added(c['p50_us']['added_us'])} "
                f"| {_added(c['p99_us']['added_us'])} | {_added(c['mean_us']['added_us'])} "
                f"| {fmt_ratio(c['p50_us']['ratio'])} |"
            )
    return "\n".join(lines)


def markdown(rep: Report, body: dict[str, Any]) -> str:
    cfg, cmds, tls = body["config"], body["commands"], body["tls"]
    order = ", ".join(LABELS[t] for t in TARGETS)
    sessions = "\n".join(f"| {LABELS[t]} | {s['version']} | {s['cipher']} |" for t, s in tls["sessions"].items())
    bench_lines = "\n".join(cmds["redis_benchmark"])
    warmup = (f", after one discarded run of {cfg['warmup_requests']:,} requests per path"
              if cfg["warmup_requests"] else "")
    return rep.header("TLS: brokerproxy's TLS listener vs its plaintext listener vs Redis's own TLS port",
                      cfg["quick"]) + f"""
## Set-up

One `redis-server` with a plaintext port ({cmds["direct_port"]}) and a TLS port ({cmds["redis_tls_port"]}), and one
brokerproxy in front of it with a plaintext listener ({cmds["proxy_port"]}) and a TLS listener
({cmds["proxy_tls_port"]}); the proxy speaks plaintext to Redis. Certificates made at run time with trustme
({tls["key_type"]} keys): one CA, a server certificate for `localhost` and `127.0.0.1` served by both TLS ports, and
a client certificate that every TLS client presents. Both TLS servers require it (Redis `--tls-auth-clients yes`,
its default; brokerproxy `auth_clients = "yes"`) and every client verifies the server against the CA. The handshake
happens once per connection: the figures below are the record layer's cost.

Negotiated (Python client; Python's {tls["python_openssl"]}):

| path | protocol | cipher |
|---|---|---|
{sessions}

Paths, in the order each repeat runs them: {order}. Every ratio and difference below is taken per repeat between
runs moments apart, then the median over repeats with the range in brackets.

## Commands

```
{cmds["redis_server"]}
{cmds["brokerproxy"]}
```

brokerproxy's config file:

```toml
{cmds["brokerproxy_config"].rstrip()}
```

Per repeat and depth, each line below against each path (the plaintext ports as shown, the TLS ports with
`{" ".join(cmds["tls_flags"])}` added); {cfg["repeats"]} repeat(s){warmup}:

```
{bench_lines}
```

## Throughput: ratios (redis-benchmark, {CLIENTS} clients, -d {SIZE})

Per depth, the median over the five tests (PING_MBULK, SET, GET, LPUSH, RPOP) of each test's median paired rps
ratio, with the lowest and highest test in brackets. "brokerproxy TLS ÷ Redis TLS" is what putting the proxy in
front of a TLS endpoint costs; "brokerproxy TLS ÷ brokerproxy" is what TLS costs in the proxy.

{headline_table(body["throughput_headline"])}

### Requests per second, every test

Medians over repeats ("±x%" is half the range as a share of the median); ratios per repeat, median (min-max).

{throughput_table(body["throughput"])}

### p50 latency of one request, ms, and its ratios (1.00 = no added latency)

{throughput_latency_table(body["throughput"], "p50_latency_ms")}

## Round-trip latency: one client, one command at a time

One Python client per path (blocking socket, TCP_NODELAY; `ssl` on the TLS paths); per repeat and command,
{cfg["round_trips"]} round trips on each path, after {cfg["warmup_round_trips"]} discarded ones;
{cfg["latency_repeats"]} repeat(s) (many short blocks: a block's round trips share one scheduling state, which on a
2-core machine can double a block's p50; the median over paired blocks sees through it).
The first table is each path's p50, median over repeats, and in brackets the best (lowest) repeat: the block least
disturbed by other load. "added" is path - baseline per repeat, median (range): "brokerproxy TLS - Redis TLS" is
what the proxy adds to a TLS round trip (the client's own TLS cost is in both and cancels); "Redis TLS - Redis" is
what TLS costs the client and Redis together, and "brokerproxy TLS - brokerproxy" what it costs the client and the
proxy together (so the proxy's own share is that minus the client's, which is at most "Redis TLS - Redis").

{latency_table(body["latency"])}
"""


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run for the test suite; figures mean nothing")
    p.add_argument("--repeats", type=int, help=f"rotations of the four paths (default {DEFAULT_REPEATS})")
    p.add_argument("--requests", type=int,
                   help=f"redis-benchmark requests per test at -P 1 (default {DEFAULT_REQUESTS}); "
                   f"-P 16 sends {PIPELINED_REQUEST_FACTOR}x that")
    p.add_argument("--latency-repeats", type=int,
                   help=f"rotations of the four paths for latency (default {DEFAULT_LATENCY_REPEATS})")
    p.add_argument("--round-trips", type=int, help=f"round trips per latency block (default {DEFAULT_ROUND_TRIPS})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.requests is None:
        args.requests = QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS
    if args.latency_repeats is None:
        args.latency_repeats = QUICK_REPEATS if args.quick else DEFAULT_LATENCY_REPEATS
    if args.round_trips is None:
        args.round_trips = QUICK_ROUND_TRIPS if args.quick else DEFAULT_ROUND_TRIPS
    if min(args.repeats, args.requests, args.latency_repeats) < 1 or args.round_trips < 2:
        p.error("--repeats, --latency-repeats and --requests must be positive and --round-trips at least 2")
    return args


def _linked_ssl(binary: str) -> str:
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    libs = [line.split()[0] for line in out.splitlines() if "libssl" in line]
    return ", ".join(libs) or "not linked"


def measure(args: argparse.Namespace, redis_bin: str) -> dict[str, Any]:
    bench_bin = find_binary("redis-benchmark")
    if bench_bin is None:
        raise BenchError("redis-benchmark not found; install it with: apt-get install redis-tools")
    warmup_rt = 20 if args.quick else WARMUP_ROUND_TRIPS
    warmup_req = 0 if args.quick else WARMUP_REQUESTS
    blocks: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="brokerproxy-tls-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        pki = make_pki(workdir)
        ctx = client_context(pki)
        keys = key_type(pki["server_cert"])
        redis_tls_port = free_port()
        redis_port, redis_cmd = stack.enter_context(
            redis_server(redis_bin, workdir, *redis_tls_args(redis_tls_port, pki))
        )
        proxy_tls_port = free_port()
        while proxy_tls_port == redis_tls_port:
            proxy_tls_port = free_port()
        config_text = proxy_config(proxy_tls_port, pki)
        config = workdir / "brokerproxy.toml"
        config.write_text(config_text)
        proxy_port, proxy_cmd, proxy_proc, proxy_log = stack.enter_context(
            proxy_process(redis_port, workdir, config=config)
        )
        sessions = {
            "redis_tls": wait_for_tls(redis_tls_port, ctx, "redis-server", workdir / "redis.log"),
            "proxy_tls": wait_for_tls(proxy_tls_port, ctx, "brokerproxy", proxy_log),
        }
        ports = {"direct": redis_port, "redis_tls": redis_tls_port, "proxy": proxy_port, "proxy_tls": proxy_tls_port}

        def check_proxy() -> None:
            if proxy_proc.poll() is not None:
                raise BenchError(f"brokerproxy exited with {proxy_proc.returncode}:\n{tail(proxy_log)}")

        # ------------------------------------------------------------------ latency
        clients: dict[str, Client] = {
            t: TLSClient(ports[t], ctx) if t in TLS_TARGETS else Client(ports[t]) for t in TARGETS
        }
        for client in clients.values():
            stack.callback(client.close)
        clients["direct"].call(_command(b"SET", KEY, VALUE), len(b"+OK\r\n"))
        for t in TARGETS:
            for request, reply in COMMANDS.values():
                clients[t].round_trips(request, reply, warmup_rt)
        for repeat in range(args.latency_repeats):
            for cmd_name, (request, reply) in COMMANDS.items():
                got = {}
                for t in TARGETS:
                    us = clients[t].round_trips(request, reply, args.round_trips)
                    check_proxy()
                    got[t] = {
                        "repeat": repeat, "command": cmd_name, "target": t, "n": len(us),
                        "p50_us": percentile(us, 50), "p99_us": percentile(us, 99),
                        "mean_us": statistics.fmean(us), "min_us": min(us), "max_us": max(us),
                    }
                    blocks.append(got[t])
                log(f"latency [{repeat + 1}/{args.latency_repeats}] {cmd_name:<10} p50 "
                    + "  ".join(f"{LABELS[t]} {b['p50_us']:.1f} µs" for t, b in got.items()))
        for client in clients.values():
            client.close()

        # ------------------------------------------------------------------ throughput
        def command(t: str, pipeline: int, n: int) -> list[str]:
            return bench_command(bench_bin, ports[t], pipeline, n, pki if t in TLS_TARGETS else None)

        if warmup_req:
            for t in TARGETS:
                run_redis_benchmark(command(t, 1, warmup_req))
            check_proxy()
        for repeat in range(args.repeats):
            for pipeline in PIPELINES:
                n = requests_for(pipeline, args.requests)
                for t in TARGETS:
                    cmd = command(t, pipeline, n)
                    results = run_redis_benchmark(cmd)
                    check_proxy()
                    runs.append({"repeat": repeat, "pipeline": pipeline, "target": t, "requests": n,
                                 "command": shlex.join(cmd), "results": results})
                    log(f"throughput [{repeat + 1}/{args.repeats}] -P {pipeline:<2} {LABELS[t]:<16} "
                        + "  ".join(f"{x} {results[x]['rps']:,.0f}" for x in TESTS))
    throughput = summarize_throughput(runs)
    return {
        "config": {
            "quick": args.quick, "repeats": args.repeats, "requests_p1": args.requests,
            "pipelined_request_factor": PIPELINED_REQUEST_FACTOR, "clients": CLIENTS, "size": SIZE,
            "pipelines": list(PIPELINES), "tests": list(TESTS), "latency_repeats": args.latency_repeats,
            "round_trips": args.round_trips,
            "warmup_round_trips": warmup_rt, "warmup_requests": warmup_req, "targets": list(TARGETS),
            "comparisons": [cname(p, b) for p, b in COMPARISONS],
            "order": "latency first (per repeat and command, one block per path), then throughput (per repeat and "
                     "depth, one redis-benchmark run per path); paths in the order " + ", ".join(TARGETS),
        },
        "tls": {
            "sessions": sessions, "key_type": keys,
            "python_openssl": ssl.OPENSSL_VERSION, "client_certificates": "required by both TLS servers",
        },
        "commands": {
            "redis_server": shlex.join(redis_cmd), "brokerproxy": shlex.join(proxy_cmd),
            "brokerproxy_config": config_text, "direct_port": redis_port, "redis_tls_port": redis_tls_port,
            "proxy_port": proxy_port, "proxy_tls_port": proxy_tls_port, "tls_flags": tls_flags(pki),
            "redis_benchmark": [shlex.join(bench_command(bench_bin, redis_port, p, requests_for(p, args.requests),
                                                         None)) for p in PIPELINES],
        },
        "latency_blocks": blocks,
        "latency": summarize_latency(blocks),
        "runs": runs,
        "throughput": throughput,
        "throughput_headline": headline(throughput),
    }


def main(argv: Sequence[str] | None = None) -> int:
    def md(rep: Report, body: dict[str, Any]) -> str:
        rep.machine["extra"]["redis-benchmark"] = rep.machine.get("redis_benchmark")
        rep.machine["extra"]["OpenSSL (Python's ssl, the latency client)"] = ssl.OPENSSL_VERSION
        redis_bin = find_binary("redis-server")
        if redis_bin:
            rep.machine["extra"]["redis-server links"] = _linked_ssl(redis_bin)
        return markdown(rep, body)

    return run_benchmark(NAME, "bench/tls.py", argv, parse_args, measure, md, "## Throughput")


if __name__ == "__main__":
    sys.exit(main())
