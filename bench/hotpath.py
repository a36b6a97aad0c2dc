#!/usr/bin/env python3
"""Hot-path micro-benchmark: nanoseconds per command through the sans-IO Session alone, no sockets.

Theory of operation. Everything the proxy does per command apart from moving bytes through the kernel happens in
``brokerproxy.session.Session``: frame the request, look the command up, push a reply slot, frame the reply, hand
it to the client in order. This script drives Session exactly as ``proxy.ClientConnection`` does (``from_client``
then ``take_client``/``delivered``/``take_upstream``/``take_events``, and the same after ``from_upstream``) and
times it with ``time.perf_counter_ns``.

Workloads:

* **capture**: the recorded real Celery 5.7 traffic in ``tests/data/celery57-resp3`` (22 connections, 3,861
  requests; see its README). Each connection gets a fresh Session (its construction is part of the cost, as it is
  per connection in the proxy), its ``CLIENT ID`` and ``CLIENT INFO`` handshake is answered, then all its requests
  are fed and then all its replies. Two ways of cutting the bytes into reads: ``per-frame`` (one read per request
  and one per reply, the request/response pattern of a Celery client, the worst case for per-call overhead) and
  ``64k`` (the whole stream in 64 KiB reads, as a fully pipelined client would arrive).
* **synthetic**: ``LPUSH q v``, ``BRPOP q 1``, ``SET k v``, ``GET k`` with values of 100 B, 1 KiB, 16 KiB and
  64 KiB, pipelined 16 deep (and 1 deep, one command per read): a batch of requests is fed in reads of at most
  64 KiB, then the batch's replies (``:1``, ``*2 q v``, ``+OK``, ``$len v``) the same way. The value travels in the
  request for LPUSH/SET and in the reply for BRPOP/GET.

Two builds of the path are measured, alternating per repeat: ``pure``, the proxy as it runs without hiredis
(``brokerproxy.resp._hiredis`` set to None while the sessions are built: ``resp.request_parser()`` returns the
pure-Python ``RequestParser`` and the session's hiredis fast paths are off, so ``RequestParser`` and ``ReplyParser``
frame everything), and ``hiredis``, the proxy as shipped (``HiredisRequestParser``, and the session's hiredis
readers for reads of whole ordinary requests and replies). Every figure is the median over repeats of
(elapsed / commands); the spread is half the range over repeats.

Before timing, each workload is run once and checked: the bytes forwarded upstream and handed to the client must
be exactly the bytes fed in (the benchmark must not measure a broken path).

``--profile`` adds a cProfile (hiredis build) of the capture replay and of three synthetic workloads (SET 1 KiB
P16, BRPOP 1 KiB P1, GET 64 KiB P1) to the report: the top 20 functions by own time. cProfile adds a fixed cost
per call, so it exaggerates small functions; read it for where the time goes, not for absolute figures.

Usage::

    python bench/hotpath.py [--quick] [--repeats N] [--target-seconds S] [--profile] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT, REPO, Report, fmt_spread, log, spread

sys.path.insert(0, str(REPO))  # measure this checkout's code
from brokerproxy import resp, session

NAME = "hotpath"
CAPTURE = REPO / "tests" / "data" / "celery57-resp3"
PARSERS = ("pure", "hiredis")
READ_SIZE = 64 * 1024
SIZES = (100, 1024, 16 * 1024, 64 * 1024)
COMMANDS = ("LPUSH", "BRPOP", "SET", "GET")
DEPTHS = (16, 1)
DEFAULT_REPEATS = 7
DEFAULT_TARGET_S = 0.12  # wall time of one repeat of one workload
QUICK_REPEATS = 2
QUICK_TARGET_S = 0.005
PROFILE_TOP = 20


class NoUsers:
    """No users configured: every client is the default user (config.Users(()) behaves the same)."""

    required = False

    def check(self, username: bytes, password: bytes) -> str | None:
        return None


_AUTH = NoUsers()
# Redis's answers to the proxy's own CLIENT ID and CLIENT INFO
_HANDSHAKE_REPLY = b":1\r\n$25\r\nid=1 addr=127.0.0.1:50000\r\n"


_HIREDIS = resp._hiredis  # the hiredis module as brokerproxy.resp imported it (None if not installed)


@contextlib.contextmanager
def parser_kind(kind: str) -> Iterator[None]:
    """Build sessions as the named parser would. ``pure``: as if hiredis were not installed, so every request and
    reply is framed by the pure-Python framers (``resp.request_parser()`` then returns ``RequestParser`` and the
    session's hiredis fast paths are off). ``hiredis``: the proxy as shipped."""
    if kind == "hiredis" and _HIREDIS is None:
        raise SystemExit("hiredis is not installed: pip install hiredis")
    if kind not in PARSERS:
        raise ValueError(kind)
    resp._hiredis = None if kind == "pure" else _HIREDIS
    try:
        yield
    finally:
        resp._hiredis = _HIREDIS


def chunks(data: bytes, size: int = READ_SIZE) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# ---------------------------------------------------------------------------------------------- workloads


class Workload:
    """A replay: ``run(n)`` drives sessions through ``n`` iterations and returns the commands it pushed."""

    name: str
    commands_per_iteration: int
    bytes_per_iteration: int

    def run(self, iterations: int) -> int:
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError


def _new_session() -> session.Session:
    s = session.Session(_AUTH)
    s.take_events()
    s.take_upstream()  # CLIENT ID, CLIENT INFO
    s.from_upstream(_HANDSHAKE_REPLY)
    s.take_client()
    return s


class CaptureReplay(Workload):
    def __init__(self, cut: str) -> None:
        self.name = f"capture {cut}"
        self.conns: list[tuple[list[bytes], list[bytes]]] = []
        self.raw: list[tuple[bytes, bytes]] = []
        total = 0
        nbytes = 0
        for c2s_path in sorted(CAPTURE.glob("*.c2s")):
            c2s = c2s_path.read_bytes()
            s2c = c2s_path.with_suffix(".s2c").read_bytes()
            reqs = _frame_requests(c2s)
            total += len(reqs)
            nbytes += len(c2s) + len(s2c)
            if cut == "per-frame":
                up = [_HANDSHAKE_REPLY, *_frame_replies(s2c)]
                self.conns.append((reqs, up))
            elif cut == "64k":
                self.conns.append((chunks(c2s), chunks(_HANDSHAKE_REPLY + s2c)))
            else:
                raise ValueError(cut)
            self.raw.append((c2s, s2c))
        self.commands_per_iteration = total
        self.bytes_per_iteration = nbytes

    def run(self, iterations: int) -> int:
        Session = session.Session
        auth = _AUTH
        conns = self.conns
        for _ in range(iterations):
            for client_reads, upstream_reads in conns:
                s = Session(auth)
                s.take_events()
                s.take_upstream()
                for data in client_reads:
                    s.from_client(data)
                    if s.take_client():
                        s.delivered(s.written)
                    s.take_upstream()
                    s.take_events()
                for data in upstream_reads:
                    s.from_upstream(data)
                    if s.take_client():
                        s.delivered(s.written)
                    s.take_upstream()
                    s.take_events()
        return iterations * self.commands_per_iteration

    def check(self) -> None:
        for (client_reads, upstream_reads), (c2s, s2c) in zip(self.conns, self.raw, strict=True):
            s = session.Session(_AUTH)
            s.take_events()
            up = bytearray()
            s.take_upstream()
            for data in client_reads:
                s.from_client(data)
                up += s.take_upstream()
            got = bytearray()
            for data in upstream_reads:
                s.from_upstream(data)
                got += s.take_client()
            if bytes(up) != c2s or bytes(got) != s2c or s.pending:
                raise SystemExit(f"{self.name}: the session did not pass the capture through unchanged")


def _frame_requests(data: bytes) -> list[bytes]:
    p = resp.RequestParser()
    p.feed(data)
    out = []
    while (r := p.next()) is not None:
        out.append(r.raw)
    return out


def _frame_replies(data: bytes) -> list[bytes]:
    p = resp.ReplyParser()
    p.feed(data)
    out = []
    while (f := p.next()) is not None:
        out.append(f[1])
    return out


def synthetic_frames(command: str, size: int) -> tuple[bytes, bytes]:
    """One request and the reply Redis would send to it."""
    value = (b"v" * 15 + b"\n") * (size // 16) + b"v" * (size % 16)
    assert len(value) == size
    if command == "LPUSH":
        return resp.encode_command([b"LPUSH", b"celery", value]), b":1\r\n"
    if command == "BRPOP":
        return (
            resp.encode_command([b"BRPOP", b"celery", b"1"]),
            b"*2\r\n$6\r\ncelery\r\n$%d\r\n%s\r\n" % (size, value),
        )
    if command == "SET":
        return resp.encode_command([b"SET", b"celery-task-meta-1", value]), b"+OK\r\n"
    if command == "GET":
        return resp.encode_command([b"GET", b"celery-task-meta-1"]), b"$%d\r\n%s\r\n" % (size, value)
    raise ValueError(command)


class Synthetic(Workload):
    """``depth`` requests per batch, fed in reads of at most 64 KiB; then their replies, the same way."""

    def __init__(self, command: str, size: int, depth: int) -> None:
        self.command, self.size, self.depth = command, size, depth
        self.name = f"{command} {_size_name(size)} P{depth}"
        req, rep = synthetic_frames(command, size)
        self.req_batch, self.rep_batch = req * depth, rep * depth
        self.client_reads = chunks(self.req_batch)
        self.upstream_reads = chunks(self.rep_batch)
        self.commands_per_iteration = depth
        self.bytes_per_iteration = len(self.req_batch) + len(self.rep_batch)
        self._session: session.Session | None = None

    def run(self, iterations: int) -> int:
        s = self._session = _new_session() if self._session is None else self._session
        client_reads, upstream_reads = self.client_reads, self.upstream_reads
        for _ in range(iterations):
            for data in client_reads:
                s.from_client(data)
                if s.take_client():
                    s.delivered(s.written)
                s.take_upstream()
                s.take_events()
            for data in upstream_reads:
                s.from_upstream(data)
                if s.take_client():
                    s.delivered(s.written)
                s.take_upstream()
                s.take_events()
        return iterations * self.depth

    def reset(self) -> None:
        self._session = None

    def check(self) -> None:
        s = _new_session()
        for _ in range(3):
            up = bytearray()
            for data in self.client_reads:
                s.from_client(data)
                up += s.take_upstream()
            got = bytearray()
            for data in self.upstream_reads:
                s.from_upstream(data)
                got += s.take_client()
            if bytes(up) != self.req_batch or bytes(got) != self.rep_batch or s.pending:
                raise SystemExit(f"{self.name}: the session did not pass the pipeline through unchanged")


def _size_name(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


# ---------------------------------------------------------------------------------------------- timing


def calibrate(w: Workload, target_s: float) -> int:
    """Iterations for one repeat to last about ``target_s``."""
    n = 1
    while True:
        t0 = time.perf_counter_ns()
        w.run(n)
        dt = (time.perf_counter_ns() - t0) / 1e9
        if dt >= min(0.02, target_s) or n >= 1 << 24:
            return max(1, int(n * target_s / max(dt, 1e-9)))
        n *= 4


def measure(w: Workload, repeats: int, target_s: float) -> dict[str, Any]:
    iterations: dict[str, int] = {}
    for kind in PARSERS:
        with parser_kind(kind):
            w.check()
            if isinstance(w, Synthetic):
                w.reset()
            iterations[kind] = calibrate(w, target_s)
    samples: dict[str, list[float]] = {k: [] for k in PARSERS}
    for r in range(repeats):
        order = PARSERS if r % 2 == 0 else PARSERS[::-1]
        for kind in order:
            with parser_kind(kind):
                if isinstance(w, Synthetic):
                    w.reset()
                    w.run(1)  # new session, warm
                gc.collect()
                t0 = time.perf_counter_ns()
                cmds = w.run(iterations[kind])
                elapsed = time.perf_counter_ns() - t0
            samples[kind].append(elapsed / cmds)
    out: dict[str, Any] = {
        "workload": w.name,
        "commands_per_iteration": w.commands_per_iteration,
        "bytes_per_iteration": w.bytes_per_iteration,
        "iterations": iterations,
        "ns_per_command": {k: spread(v) for k, v in samples.items()},
        "raw_ns_per_command": samples,
    }
    for kind in PARSERS:
        ns = out["ns_per_command"][kind]["median"]
        out.setdefault("commands_per_s", {})[kind] = 1e9 / ns
        out.setdefault("mb_per_s", {})[kind] = w.bytes_per_iteration / w.commands_per_iteration / ns * 1e3
    pure, hired = samples["pure"], samples["hiredis"]
    out["hiredis_speedup"] = statistics.median(p / h for p, h in zip(pure, hired, strict=True))
    return out


def profile(w: Workload, target_s: float) -> dict[str, Any]:
    """cProfile the workload with the hiredis parser: the top functions by own time."""
    with parser_kind("hiredis"):
        if isinstance(w, Synthetic):
            w.reset()
        n = calibrate(w, target_s)
        prof = cProfile.Profile()
        prof.enable()
        cmds = w.run(n)
        prof.disable()
    st = pstats.Stats(prof)
    entries = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1e-12
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _callers) in entries.items():
        where = filename
        with contextlib.suppress(ValueError):
            where = str(Path(filename).resolve().relative_to(REPO))
        rows.append({
            "function": f"{where}:{line}({func})" if line else func,
            "calls": nc, "primitive_calls": cc, "tottime_s": tt, "cumtime_s": ct,
            "share_pct": tt / total * 100, "ns_per_command": tt / cmds * 1e9,
        })
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return {"workload": w.name, "commands": cmds, "total_s": total, "top": rows[:PROFILE_TOP]}


# ---------------------------------------------------------------------------------------------- report


def _row(e: dict[str, Any]) -> str:
    ns = e["ns_per_command"]
    cps = e["commands_per_s"]
    return (
        f"| {e['workload']} | {fmt_spread(ns['pure'])} | {fmt_spread(ns['hiredis'])} "
        f"| {ns['pure']['min']:,.0f} | {ns['hiredis']['min']:,.0f} "
        f"| {cps['pure']:,.0f} | {cps['hiredis']:,.0f} | {e['hiredis_speedup']:.2f} "
        f"| {e['mb_per_s']['hiredis']:,.0f} |"
    )


TABLE_HEAD = (
    "| workload | pure ns/cmd | hiredis ns/cmd | pure best | hiredis best | pure cmd/s | hiredis cmd/s "
    "| pure ÷ hiredis | hiredis MB/s |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def markdown(rep: Report, body: dict[str, Any]) -> str:
    cfg = body["config"]
    parts = [rep.header("Hot path: nanoseconds per command through the sans-IO Session", cfg["quick"])]
    parts.append(
        f"""## What is measured

`brokerproxy.session.Session` alone, driven as `proxy.ClientConnection` drives it (no sockets, no event loop):
request framing, command look-up, reply slots, reply framing, output buffers. Reads are at most {READ_SIZE // 1024}
KiB. `pure`: the proxy as it runs without hiredis (pure-Python `RequestParser` and `ReplyParser` frame
everything); `hiredis`: the proxy as shipped (hiredis {rep.machine["hiredis"]} frames requests, and the session's
hiredis fast paths take reads of whole ordinary requests or replies). Median of {cfg["repeats"]} repeats of about
{cfg["target_seconds"]} s each, parsers alternating; "±x%" is half the range over repeats. "pure ÷ hiredis" is the
median of the per-repeat ratios (above 1: hiredis is faster). "best" is the fastest repeat: on a shared machine
other work only ever adds time, so it is the figure least disturbed by load (compare medians with medians and best
with best). cmd/s and MB/s are from the medians; MB/s counts request and reply bytes together.
One process, one core; the garbage collector runs as usual (collected before each repeat).

## Recorded Celery traffic (tests/data/celery57-resp3: 22 connections, 3,861 requests)

`per-frame`: one read per request and per reply (request/response, as Celery mostly talks);
`64k`: the whole stream in 64 KiB reads. A fresh Session per connection, its construction included.

{TABLE_HEAD}
""" + "\n".join(_row(e) for e in body["capture"]) + f"""

## Synthetic pipelines

`P16`: 16 requests per batch (one read, or 64 KiB reads when larger), then their 16 replies;
`P1`: one request per read, then its reply. Values: {", ".join(_size_name(s) for s in SIZES)}.

{TABLE_HEAD}
""" + "\n".join(_row(e) for e in body["synthetic"]) + "\n"
    )
    for prof in body.get("profiles", []):
        parts.append(
            f"""
## Profile: {prof["workload"]} (hiredis parser, cProfile, top {PROFILE_TOP} by own time)

{prof["commands"]:,} commands, {prof["total_s"]:.3f} s of profiled time (cProfile's own overhead inflates this,
and most of all for small functions called per command).

| own time % | own ns/cmd | calls | cum s | function |
|---:|---:|---:|---:|---|
""" + "\n".join(
                f"| {r['share_pct']:.1f} | {r['ns_per_command']:,.0f} | {r['calls']:,} | {r['cumtime_s']:.3f} "
                f"| `{r['function']}` |"
                for r in prof["top"]
            ) + "\n"
        )
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run for the test suite; figures mean nothing")
    p.add_argument("--repeats", type=int, help=f"repeats per workload and parser (default {DEFAULT_REPEATS})")
    p.add_argument("--target-seconds", type=float, help=f"length of one repeat (default {DEFAULT_TARGET_S})")
    p.add_argument("--profile", action="store_true", help="add a cProfile top-20 of the hot path to the report")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.target_seconds is None:
        args.target_seconds = QUICK_TARGET_S if args.quick else DEFAULT_TARGET_S
    if args.repeats < 1 or args.target_seconds <= 0:
        p.error("--repeats and --target-seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rep = Report(NAME, "bench/hotpath.py", list(argv if argv is not None else sys.argv[1:]))
    body: dict[str, Any] = {
        "config": {
            "quick": args.quick, "repeats": args.repeats, "target_seconds": args.target_seconds,
            "read_size": READ_SIZE, "parsers": list(PARSERS), "sizes": list(SIZES), "commands": list(COMMANDS),
            "depths": list(DEPTHS),
        },
        "capture": [],
        "synthetic": [],
    }

    def run(w: Workload, key: str) -> None:
        e = measure(w, args.repeats, args.target_seconds)
        body[key].append(e)
        ns = e["ns_per_command"]
        log(f"{w.name:<22} pure {ns['pure']['median']:>9,.0f} ns/cmd   hiredis {ns['hiredis']['median']:>9,.0f} ns/cmd")

    captures = [CaptureReplay("per-frame"), CaptureReplay("64k")]
    for w in captures:
        run(w, "capture")
    synthetics = [Synthetic(c, s, d) for d in DEPTHS for c in COMMANDS for s in SIZES]
    for ws in synthetics:
        run(ws, "synthetic")
    if args.profile:
        profiled: list[Callable[[], Workload]] = [
            lambda: CaptureReplay("per-frame"),
            lambda: Synthetic("SET", 1024, 16),
            lambda: Synthetic("BRPOP", 1024, 1),
            lambda: Synthetic("GET", 64 * 1024, 1),
        ]
        body["profiles"] = [profile(make(), max(args.target_seconds * 4, 0.01)) for make in profiled]
    rep.finish(args.out, body, markdown(rep, body))
    print(TABLE_HEAD)
    for e in body["capture"] + body["synthetic"]:
        print(_row(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
