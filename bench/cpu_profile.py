#!/usr/bin/env python3
"""Where the proxy's CPU goes: microseconds of CPU per request, by process and by component, and what bounds the ratio.

Theory of operation. The script starts one ``redis-server`` on a free loopback port and, in front of it, every relay
it compares, each on its own port and up for the whole run:

* **brokerproxy with ACLs and metrics on** (``bench/configs/acl-metrics.toml``: the proxy as issue 6's targets
  specify it), the one that is profiled;
* **brokerproxy plain** (no config: no ACL, no metrics), so that the CPU the ACL and observation cost is a difference
  of two measurements, not only a profile's estimate;
* a **bare uvloop relay**: ``asyncio.Protocol`` callbacks that write every read to the other side, one upstream
  connection per client like brokerproxy, no parsing at all (this script run with ``--serve-relay``); the floor for a
  relay written in Python on uvloop;
* **HAProxy** (TCP mode, one thread) and **twemproxy**, as in ``e2e_redis_benchmark.py``, when installed: what a relay
  written in C costs, without (HAProxy) and with (twemproxy) every client multiplexed onto one upstream connection.

1. **CPU per request.** Per repeat and pipeline depth (``-P 1``, ``-P 16``), ``redis-benchmark -c 50 -d 512 -t
   set,get,lpush,rpop`` runs against each path in turn (direct Redis first). Around each run the script reads the
   relay's and redis-server's ``utime`` and ``stime`` from ``/proc/<pid>/stat`` and redis-benchmark's from
   ``getrusage(RUSAGE_CHILDREN)``; divided by the requests sent, that is each process's CPU per request, user and
   kernel; and their voluntary and involuntary context switches from ``/proc/<pid>/status``. With ``perf``
   available, ``perf stat -e raw_syscalls:sys_enter`` counts the relay's and Redis's system calls in the same runs.
   The profiled runs of step 2 send 3x the requests (more samples).
2. **Where brokerproxy's CPU goes.** Then, per depth, the same load through the ACL + metrics brokerproxy twice more:
   once with ``py-spy record --nonblocking`` (Python stacks only: each function's time includes the C and kernel
   time below it) and ``perf record -g`` (kernel and native stacks, not Python's) attached together, once with
   ``py-spy record --native`` (Python and native frames interleaved; it stops the process for each sample). The
   samples are classified by component (below) and the shares scaled to the CPU per request measured in step 1: the
   kernel part (``stime``) split by ``perf``'s kernel stacks, the user part (``utime``) by ``py-spy --native``.

Components, from the innermost frame of a sample that says whose the time is (``py-spy``): a system call (libc's
wrapper at the leaf), uvloop/libuv (Cython ``loop.c`` and libuv's sources), hiredis (its C reader), then the
brokerproxy module: ``resp.py`` (framing), ``session.py`` (the session state machine, also broken down by
function), ``acl*.py``/``keyspec.py``/``globmatch.py``/``command_table.py`` (ACL checks), ``observe.py``/
``metrics.py`` and prometheus_client (observation), ``proxy.py``/``server.py`` (the asyncio glue). Interpreter and
libc frames (malloc, refcounts, the eval loop) and standard-library Python count for the brokerproxy frame that
called them. ``perf``'s kernel samples are classified by the system call they are under (write, read, epoll_wait,
other) and flagged when they wake the process at the other end of the socket or copy bytes.

Finally a model: on N cores shared by Redis, redis-benchmark and the relay, each single-threaded, a path can do at
most ``min(N / (r + b + p), 1 / max(r, b, p))`` requests per µs, where r, b, p are the three processes' CPU µs per
request; the ratio of that for a relay to that for direct Redis bounds the relay's throughput ratio, and solving for
p gives the CPU per request a relay may spend to reach a target.

Usage::

    python bench/cpu_profile.py [--quick] [--repeats N] [--requests N] [--rate HZ] [--no-peers] [--install-peers]
                                [--out DIR]

Writes ``cpu_profile.md`` and ``cpu_profile.json`` into ``--out`` (default bench/results/). Needs ``redis-server``
and ``redis-benchmark``; ``py-spy`` (``pip install py-spy``) and ``perf`` are used
when present and allowed (both attach to another process: root, or ptrace permission and
``perf_event_paranoid``), and the report says which parts are missing otherwise. The script is not called
``profile.py``: with ``bench/`` first on ``sys.path`` that name would shadow the standard library's ``profile``, which
``cProfile`` imports. ``--quick`` is a tiny configuration
for the test suite: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
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
    free_port,
    log,
    paired,
    proxy_process,
    redis_server,
    run_benchmark,
    spread,
    stop,
    tail,
    wait_for_port,
)
from e2e_redis_benchmark import (
    CLIENTS,
    LABELS,
    PEERS,
    PIPELINED_REQUEST_FACTOR,
    requests_for,
    start_peers,
)
from workers import redis_process_id, usable_cpus

NAME = "cpu_profile"
#: The load: redis-benchmark's SET, GET, LPUSH and RPOP (PING never reaches Redis through twemproxy).
TESTS = ("SET", "GET", "LPUSH", "RPOP")
SIZE = 512
PIPELINES = (1, 16)
#: Issue 6's throughput floors, ratio to direct Redis, per depth.
TARGET_RATIO = {1: 0.5, 16: 0.55}
ACL_METRICS = REPO / "bench" / "configs" / "acl-metrics.toml"
DEFAULT_REPEATS = 5
DEFAULT_REQUESTS = 20_000
QUICK_REPEATS = 1
QUICK_REQUESTS = 1_000
WARMUP_REQUESTS = 2_000
#: The profiled runs send this many times the requests of a measured run (more samples).
PROFILE_REQUEST_FACTOR = 3
#: Samples per second of py-spy and perf record.
DEFAULT_RATE = 250
RUN_TIMEOUT_S = 600.0
#: Paths measured, in the order each repeat runs them (the peers only when installed).
ORDER = ("direct", "proxy", "plain", "relay", "haproxy", "twemproxy")
NAMES = {
    "direct": "direct Redis",
    "proxy": "brokerproxy (ACLs + metrics)",
    "plain": "brokerproxy (plain)",
    "relay": "bare uvloop relay",
    "haproxy": LABELS["haproxy"],
    "twemproxy": LABELS["twemproxy"],
}
TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- the bare relay


class _RelayUpstream(asyncio.Protocol):
    def __init__(self, client: _RelayClient) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class _RelayClient(asyncio.Protocol):
    """One client connection and its own upstream connection, bytes written through as they are read."""

    upstream_port = 0
    transport: asyncio.Transport
    upstream: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.early = bytearray()  # what the client sends before the upstream connection is up
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            up, _ = await loop.create_connection(lambda: _RelayUpstream(self), "127.0.0.1", self.upstream_port)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            up.close()
            return
        for t in (up, self.transport):
            sock = t.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream = up
        if self.early:
            up.write(bytes(self.early))

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early += data
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()


def serve_relay(listen: int, upstream: int) -> None:
    """The bare relay (``--serve-relay LISTEN:UPSTREAM``), on uvloop when installed, until SIGTERM."""
    _RelayClient.upstream_port = upstream

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_RelayClient, "127.0.0.1", listen, backlog=4096)
        stopped = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        loop.add_signal_handler(signal.SIGINT, stopped.set)
        async with server:
            await stopped.wait()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


@contextlib.contextmanager
def relay_process(upstream_port: int, workdir: Path) -> Iterator[tuple[int, list[str], subprocess.Popen[bytes]]]:
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-relay", f"{port}:{upstream_port}"]
    out = workdir / "relay.log"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            try:
                wait_for_port(port, proc, "bare relay")
            except BenchError as exc:
                raise BenchError(f"{exc}\n{tail(out)}") from None
            yield port, cmd, proc
        finally:
            stop(proc)


# ---------------------------------------------------------------------------------------------- measuring


def proc_cpu(pid: int) -> tuple[float, float, int, int]:
    """A process's user and kernel CPU seconds (/proc/<pid>/stat, all its threads) and its main thread's voluntary
    and involuntary context switches (/proc/<pid>/status)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    switches = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if "ctxt_switches:" in line:
                key, value = line.split(":")
                switches[key] = int(value)
    return (int(fields[11]) / TICKS, int(fields[12]) / TICKS, switches.get("voluntary_ctxt_switches", 0),
            switches.get("nonvoluntary_ctxt_switches", 0))


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (/proc/stat: everything but idle and iowait), all CPUs."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICKS


def load_command(binary: str, port: int, pipeline: int, requests: int) -> list[str]:
    return [
        binary, "-h", "127.0.0.1", "-p", str(port), "-c", str(CLIENTS), "-n", str(requests), "-d", str(SIZE),
        "-P", str(pipeline), "-t", ",".join(t.lower() for t in TESTS), "--csv", "-q",
    ]


def parse_rps(text: str) -> dict[str, float]:
    """redis-benchmark --csv: the rps of each of TESTS."""
    rows = {r["test"]: float(r["rps"]) for r in csv.DictReader(x for x in text.splitlines() if x.startswith('"'))}
    missing = [t for t in TESTS if t not in rows]
    if missing:
        raise BenchError(f"redis-benchmark printed no result for {missing}:\n{text}")
    return {t: rows[t] for t in TESTS}


def perf_binary() -> tuple[str | None, str]:
    """perf, if it can count this machine's system calls; else None and why not."""
    perf = shutil.which("perf")
    if perf is None:
        return None, "perf not installed (apt-get install linux-perf)"
    try:
        done = subprocess.run([perf, "stat", "-x,", "-e", "raw_syscalls:sys_enter", "--", "true"],
                              capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"perf does not run ({exc})"
    if done.returncode != 0 or "raw_syscalls" not in done.stderr or "<not supported>" in done.stderr:
        return None, f"perf cannot count system calls here: {done.stderr.strip().splitlines()[-1:] or done.returncode}"
    return perf, ""


def parse_perf_stat(text: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for row in csv.reader(x for x in text.splitlines() if x and not x.startswith("#")):
        if len(row) >= 3:
            try:
                out[row[2]] = float(row[0])
            except ValueError:
                out[row[2]] = None  # <not counted>
    return out


@contextlib.contextmanager
def perf_counting(perf: str | None, pids: dict[str, int], workdir: Path) -> Iterator[dict[str, dict[str, Any]]]:
    """Count the system calls of these processes while the block runs (filled in on exit)."""
    counts: dict[str, dict[str, Any]] = {}
    procs = []
    if perf is not None:
        for name, pid in pids.items():
            path = workdir / f"perf-stat-{name}.csv"
            cmd = [perf, "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p", str(pid), "-o",
                   str(path)]  # fmt: skip
            procs.append((name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path))
        time.sleep(0.3)  # attached before the load starts
    try:
        yield counts
    finally:
        for name, proc, path in procs:
            stop(proc, signal.SIGINT, timeout=15)
            try:
                counts[name] = parse_perf_stat(path.read_text())
            except OSError:
                counts[name] = {}


def run_load(cmd: Sequence[str], pids: dict[str, int]) -> dict[str, Any]:
    """One redis-benchmark run, and the CPU each process in ``pids`` and redis-benchmark itself used during it."""
    before = {name: proc_cpu(pid) for name, pid in pids.items()}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = machine_busy()
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"redis-benchmark did not finish in {RUN_TIMEOUT_S}s: {shlex.join(cmd)}") from None
    wall = time.monotonic() - t0
    busy1 = machine_busy()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = {name: proc_cpu(pid) for name, pid in pids.items()}
    if done.returncode != 0:
        raise BenchError(f"redis-benchmark exited with {done.returncode}: {shlex.join(cmd)}\n{done.stderr}")
    cpu = {name: {"user_s": after[name][0] - before[name][0], "sys_s": after[name][1] - before[name][1],
                  "voluntary_switches": after[name][2] - before[name][2],
                  "involuntary_switches": after[name][3] - before[name][3]} for name in pids}  # fmt: skip
    cpu["bench"] = {"user_s": ru1.ru_utime - ru0.ru_utime, "sys_s": ru1.ru_stime - ru0.ru_stime}
    ours = sum(v["user_s"] + v["sys_s"] for v in cpu.values())
    return {"rps": parse_rps(done.stdout), "wall_s": wall, "cpu": cpu,
            "others_cores": max(busy1 - busy0 - ours, 0.0) / wall if wall else 0.0}  # fmt: skip


def overall_rps(rps: dict[str, float], per_test: int) -> float:
    """Requests per second over the whole run: every test's requests over the time all of them took."""
    return per_test * len(rps) / sum(per_test / r for r in rps.values())


# ---------------------------------------------------------------------------------------------- profilers


@contextlib.contextmanager
def sampling(cmd: list[str], what: str, workdir: Path) -> Iterator[dict[str, Any]]:
    """Run a sampling profiler attached to a process while the block runs; stop it with SIGINT (it then writes its
    file). Yields a dict that says, on exit, whether it worked."""
    errors = workdir / f"{what}.err"
    state: dict[str, Any] = {"command": shlex.join(cmd), "ok": False}
    with open(errors, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    time.sleep(1.0)  # attached (py-spy reads the interpreter's layout first) before the load starts
    try:
        yield state
    finally:
        if proc.poll() is None:
            stop(proc, signal.SIGINT, timeout=60)
        state["returncode"] = proc.returncode
        state["output"] = tail(errors, 5)


def frame_parts(frame: str) -> tuple[str, str]:
    """py-spy's ``name (file:line)`` or ``name (library)``: (name, file)."""
    name, _, where = frame.rpartition(" (")
    return name, where.rstrip(")").split(":")[0]


#: libc's system call wrappers at the leaf of a py-spy --native stack: the time is the kernel's.
SYSCALL_KIND = {
    "write": "write", "writev": "write", "send": "write", "sendmsg": "write", "sendto": "write",
    "read": "read", "readv": "read", "recv": "read", "recvmsg": "read", "recvfrom": "read",
    "epoll_wait": "epoll_wait", "epoll_pwait": "epoll_wait", "epoll_pwait2": "epoll_wait",
}  # fmt: skip
SYSCALL_OTHER = {"syscall", "epoll_ctl", "accept4", "close", "setsockopt", "getsockopt", "getpeername",
                 "getsockname", "socket", "connect", "shutdown", "ioctl", "io_uring_enter"}  # fmt: skip
UVLOOP_FILES = {
    "loop.c", "core.c", "linux.c", "stream.c", "tcp.c", "timer.c", "loop-watcher.c", "queue.h", "uv-common.c",
    "poll.c", "async.c", "signal.c", "process.c", "heap-inl.h", "handle-inl.h", "threadpool.c", "pipe.c", "udp.c",
    "fs.c", "idna.c", "inet.c", "getaddrinfo.c", "internal.h", "uv-common.h", "linux-core.c", "epoll.c",
}  # fmt: skip
HIREDIS_FILES = {"reader.c", "read.c", "sds.c", "sds.h", "alloc.c", "alloc.h", "hiredis.c", "pack.c", "dict.c"}
#: brokerproxy module -> component.
MODULES = {
    "resp.py": "framing",
    "session.py": "session", "session_fast.py": "session", "session_auth.py": "session",
    "session_multi_pubsub.py": "session", "session_recovery.py": "session", "session_replies.py": "session",
    "session_events.py": "session", "commands.py": "session",
    "acl.py": "acl", "acl_roles.py": "acl", "acl_log.py": "acl", "keyspec.py": "acl", "globmatch.py": "acl",
    "command_table.py": "acl",
    "observe.py": "observe", "metrics.py": "observe", "aggregate.py": "observe", "status.py": "observe",
    "audit.py": "observe",
    "proxy.py": "glue", "server.py": "glue", "tls_listener.py": "glue", "endpoints.py": "glue",
    "supervisor.py": "glue", "cli.py": "glue",
}  # fmt: skip
COMPONENTS = {
    "kernel:write": "kernel: write() to a socket",
    "kernel:read": "kernel: read() from a socket",
    "kernel:epoll_wait": "kernel: epoll_wait()",
    "kernel:other": "kernel: other system calls (io_uring, epoll_ctl, …)",
    "kernel:nosyscall": "kernel: interrupts, faults, scheduler",
    "uvloop": "event loop: uvloop/libuv (C)",
    "hiredis": "RESP framing: hiredis (C)",
    "framing": "RESP framing: resp.py (Python)",
    "session": "session state machine: session*.py (Python)",
    "glue": "asyncio glue: proxy.py, server.py (Python)",
    "acl": "ACL checks: acl.py, keyspec.py, globmatch.py",
    "observe": "observation: observe.py, metrics.py, prometheus_client",
    "other": "other (interpreter start-up, other modules)",
}
USER_COMPONENTS = ("uvloop", "hiredis", "framing", "session", "glue", "acl", "observe", "other")
KERNEL_COMPONENTS = ("kernel:write", "kernel:read", "kernel:epoll_wait", "kernel:other", "kernel:nosyscall")
#: Python dispatch: what a compiled fast path would replace.
PYTHON_DISPATCH = ("framing", "session", "glue", "other")


def classify_frame(name: str, file: str) -> tuple[str, str] | None:
    """(component, function) for a frame that says whose the time is; None for one that does not (interpreter,
    libc, standard library): the caller's frame decides then."""
    if file.endswith(".py"):
        if "prometheus_client" in file:
            return "observe", f"prometheus_client.{name}"
        if "brokerproxy/" in file:
            module = file.rsplit("/", 1)[1]
            return MODULES.get(module, "other"), f"{module[:-3]}.{name}"
        return None
    base = file.rsplit("/", 1)[-1]
    if base in UVLOOP_FILES or "uvloop/" in file:
        return "uvloop", name
    if base in HIREDIS_FILES or "hiredis/" in file:
        return "hiredis", name
    return None


def syscall_kind(name: str, file: str) -> str | None:
    if not file.startswith("libc.so") and "libpthread" not in file:
        return None
    bare = re.sub(r"^(__)?(GI_)?(__)?(libc_)?", "", name)
    if bare in SYSCALL_KIND:
        return SYSCALL_KIND[bare]
    return "other" if bare in SYSCALL_OTHER else None


def classify_stack(frames: Sequence[str]) -> tuple[str, str]:
    """A py-spy stack (root first): (component, function) of the time its sample stands for."""
    leaf_name, leaf_file = frame_parts(frames[-1])
    kind = syscall_kind(leaf_name, leaf_file)
    if kind is not None:
        return f"kernel:{kind}", leaf_name
    for frame in reversed(frames):
        found = classify_frame(*frame_parts(frame))
        if found is not None:
            return found
    return "other", leaf_name


def read_pyspy(path: Path) -> dict[str, Any]:
    """py-spy's raw (collapsed) output: samples by component and by (component, function)."""
    components: Counter[str] = Counter()
    functions: Counter[tuple[str, str]] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        component, function = classify_stack(stack.split(";"))
        components[component] += n
        functions[(component, function)] += n
        total += n
    return {
        "samples": total,
        "components": dict(components),
        "functions": [{"component": c, "function": f, "samples": n} for (c, f), n in functions.most_common(60)],
    }


#: Kernel functions that wake the process at the other end (the socket's reader, or an epoll waiting on it).
WAKE_UP = {"sock_def_readable", "ep_poll_callback", "__wake_up_common", "try_to_wake_up", "__wake_up_sync_key"}
COPY = re.compile(r"copy|memcpy|memmove|rep_movs")


def read_perf_script(text: str) -> dict[str, Any]:
    """``perf script`` of a ``perf record -g``: on-CPU samples, kernel ones by system call, user ones by library."""
    kernel: Counter[str] = Counter()
    user: Counter[str] = Counter()
    symbols: Counter[str] = Counter()
    wake = copy = total = 0
    for block in text.split("\n\n"):
        lines = [x.strip() for x in block.strip().splitlines()]
        if len(lines) < 2:
            continue
        frames = []
        for x in lines[1:]:
            m = re.match(r"^[0-9a-f]+ (.+?)(?:\+0x[0-9a-f]+)? \((.*)\)$", x)
            if m:
                frames.append((m.group(1), m.group(2)))
        if not frames:
            continue
        total += 1
        sym, dso = frames[0]
        if dso != "[kernel.kallsyms]":
            base = dso.rsplit("/", 1)[-1]
            lib = ("CPython interpreter (libpython)" if base.startswith("libpython") else
                   "uvloop/libuv" if "uvloop" in dso or base.startswith("loop.") else
                   "hiredis" if "hiredis" in dso else "libc" if base.startswith("libc.") else
                   "[vdso]" if base == "[vdso]" else "other")  # fmt: skip
            user[lib] += 1
            continue
        symbols[sym] += 1
        names = [s for s, d in frames if d == "[kernel.kallsyms]"]
        caller = next((s for s, d in frames if d != "[kernel.kallsyms]"), "")
        if not any(s.startswith("entry_SYSCALL") for s in names):
            kind = "nosyscall"
        else:
            kind = syscall_kind(caller, "libc.so.6") or "other"
        kernel[kind] += 1
        if WAKE_UP.intersection(names):
            wake += 1
        if COPY.search(sym):
            copy += 1
    return {
        "samples": total,
        "kernel": dict(kernel),
        "kernel_samples": sum(kernel.values()),
        "kernel_waking_peer": wake,
        "kernel_copying": copy,
        "user": dict(user),
        "top_kernel_symbols": [{"symbol": s, "samples": n} for s, n in symbols.most_common(15)],
    }


# ---------------------------------------------------------------------------------------------- the run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run for the test suite; figures mean nothing")
    p.add_argument("--repeats", type=int, help=f"rounds of every path and depth (default {DEFAULT_REPEATS})")
    p.add_argument("--requests", type=int,
                   help=f"requests per test at -P 1 (default {DEFAULT_REQUESTS}); -P 16 sends "
                   f"{PIPELINED_REQUEST_FACTOR}x as many")  # fmt: skip
    p.add_argument("--rate", type=int, default=DEFAULT_RATE, help=f"samples per second (default {DEFAULT_RATE})")
    p.add_argument("--no-peers", action="store_true", help="leave HAProxy and twemproxy out")
    p.add_argument("--install-peers", action="store_true", help="apt-get install a missing peer")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory (default {DEFAULT_OUT})")
    p.add_argument("--serve-relay", metavar="LISTEN:UPSTREAM", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.requests is None:
        args.requests = QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS
    if args.repeats < 1 or args.requests < 1 or args.rate < 1:
        p.error("--repeats, --requests and --rate must be positive")
    return args


def measure(args: argparse.Namespace, redis_bin: str) -> dict[str, Any]:
    bench_bin = find_binary("redis-benchmark")
    if bench_bin is None:
        raise BenchError("redis-benchmark not found; install it with: apt-get install redis-tools")
    pyspy = shutil.which("py-spy") or (shutil.which("py-spy", path=str(Path(sys.executable).parent)))
    perf, perf_why = perf_binary()
    if perf is None:
        log(perf_why)
    runs: list[dict[str, Any]] = []
    profiles: dict[str, dict[str, Any]] = {}
    peers: dict[str, dict[str, Any]] = {}
    commands: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="brokerproxy-cpu-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        redis_port, redis_cmd = stack.enter_context(redis_server(redis_bin, workdir))
        redis_pid = redis_process_id(redis_port)
        ports = {"direct": redis_port}
        procs: dict[str, subprocess.Popen[bytes]] = {}
        commands["redis_server"] = shlex.join(redis_cmd)
        config = ACL_METRICS.relative_to(REPO)
        port, cmd, proc, _ = stack.enter_context(proxy_process(redis_port, workdir, config=config))
        ports["proxy"], procs["proxy"], commands["proxy"] = port, proc, shlex.join(cmd)
        port, cmd, proc, _ = stack.enter_context(proxy_process(redis_port, workdir, log_name="plain.log"))
        ports["plain"], procs["plain"], commands["plain"] = port, proc, shlex.join(cmd)
        port, cmd, proc = stack.enter_context(relay_process(redis_port, workdir))
        ports["relay"], procs["relay"], commands["relay"] = port, proc, shlex.join(cmd)
        started, found = start_peers(stack, () if args.no_peers else PEERS, args.install_peers, redis_port, workdir)
        peers.update(found)
        for name, (port, proc, cmd, config) in started.items():
            ports[name], procs[name], commands[name] = port, proc, shlex.join(cmd)
            peers[name]["config"] = config
        targets = [t for t in ORDER if t in ports]

        def check() -> None:
            for name, p in procs.items():
                if p.poll() is not None:
                    raise BenchError(f"{NAMES[name]} exited with {p.returncode}")

        def pids(target: str) -> dict[str, int]:
            return {"redis": redis_pid} if target == "direct" else {"redis": redis_pid, "relay": procs[target].pid}

        if not args.quick:
            for t in targets:
                run_load(load_command(bench_bin, ports[t], 1, WARMUP_REQUESTS), pids(t))
        for repeat in range(args.repeats):
            for pipeline in PIPELINES:
                n = requests_for(pipeline, args.requests)
                for t in targets:
                    cmd = load_command(bench_bin, ports[t], pipeline, n)
                    with perf_counting(perf, pids(t), workdir) as counts:
                        got = run_load(cmd, pids(t))
                    check()
                    got.update({"repeat": repeat, "pipeline": pipeline, "target": t, "requests_per_test": n,
                                "requests": n * len(TESTS), "counts": counts})  # fmt: skip
                    got["rps_overall"] = overall_rps(got["rps"], n)
                    runs.append(got)
                    us = {k: (v["user_s"] + v["sys_s"]) * 1e6 / got["requests"] for k, v in got["cpu"].items()}
                    log(f"[{repeat + 1}/{args.repeats}] -P {pipeline:<2} {NAMES[t]:<28} {got['rps_overall']:>9,.0f} "
                        "rps  CPU µs/request: " + "  ".join(f"{k} {v:.1f}" for k, v in us.items()))  # fmt: skip
        # Profiles of the ACL + metrics brokerproxy, per depth: py-spy (Python only) with perf record, then
        # py-spy --native.
        pid = procs["proxy"].pid
        for pipeline in PIPELINES:
            n = requests_for(pipeline, args.requests) * (1 if args.quick else PROFILE_REQUEST_FACTOR)
            prof: dict[str, Any] = {}
            cmd = load_command(bench_bin, ports["proxy"], pipeline, n)
            if pyspy is None:
                prof["python"] = prof["native"] = {"ok": False, "why": "py-spy not installed (pip install py-spy)"}
            perf_data = workdir / f"perf-{pipeline}.data"
            with contextlib.ExitStack() as attached:
                states = {}
                if pyspy is not None:
                    out = workdir / f"pyspy-python-{pipeline}.txt"
                    states["python"] = (attached.enter_context(sampling(
                        [pyspy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(args.rate),
                         "--nonblocking", "-o", str(out)], f"pyspy-python-{pipeline}", workdir)), out)  # fmt: skip
                if perf is not None:
                    states["perf"] = (attached.enter_context(sampling(
                        [perf, "record", "-g", "-F", str(args.rate), "-e", "cpu-clock", "-p", str(pid), "-o",
                         str(perf_data)], f"perf-{pipeline}", workdir)), perf_data)  # fmt: skip
                got = run_load(cmd, {"relay": pid})
            check()
            run_info = {"rps_overall": overall_rps(got["rps"], n), "load_command": shlex.join(cmd)}
            if "python" in states:
                state, out = states["python"]
                prof["python"] = {**state, **run_info}
                if out.exists() and out.stat().st_size:
                    prof["python"].update(read_pyspy(out), ok=True)
            if perf is None:
                prof["perf"] = {"ok": False, "why": perf_why}
            else:
                state, _ = states["perf"]
                prof["perf"] = {**state, **run_info}
                if perf_data.exists():
                    script = subprocess.run([perf, "script", "-i", str(perf_data)], capture_output=True, text=True,
                                            timeout=300, check=False)  # fmt: skip
                    parsed = read_perf_script(script.stdout)
                    if parsed["samples"]:
                        prof["perf"].update(parsed, ok=True)
            if pyspy is not None:
                out = workdir / f"pyspy-native-{pipeline}.txt"
                with sampling([pyspy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(args.rate),
                               "--native", "-o", str(out)], f"pyspy-native-{pipeline}", workdir) as state:  # fmt: skip
                    got = run_load(cmd, {"relay": pid})
                check()
                prof["native"] = {**state, "rps_overall": overall_rps(got["rps"], n), "load_command": shlex.join(cmd)}
                if out.exists() and out.stat().st_size:
                    prof["native"].update(read_pyspy(out), ok=True)
            for kind in ("python", "native", "perf"):
                p = prof[kind]
                if not p.get("ok") and "why" not in p:
                    p["why"] = f"{kind} profile failed: {p.get('output', '')[-300:]}"
                log(f"profile -P {pipeline} {kind}: " + (f"{p['samples']:,} samples" if p.get("ok") else p["why"]))
            profiles[str(pipeline)] = prof
        commands["redis_benchmark"] = [
            shlex.join(load_command(bench_bin, redis_port, p, requests_for(p, args.requests))) for p in PIPELINES
        ]
    summary = summarize(runs, targets)
    cores = usable_cpus()
    breakdown = {str(p): breakdown_for(summary[str(p)]["proxy"], profiles[str(p)]) for p in PIPELINES}
    model = {str(p): model_for(summary[str(p)], targets, cores, TARGET_RATIO[p]) for p in PIPELINES}
    body = {
        "config": {
            "quick": args.quick, "repeats": args.repeats, "requests_p1": args.requests,
            "pipelined_request_factor": PIPELINED_REQUEST_FACTOR, "clients": CLIENTS, "size": SIZE,
            "tests": list(TESTS), "pipelines": list(PIPELINES), "targets": targets, "rate_hz": args.rate,
            "usable_cpus": cores, "warmup_requests": 0 if args.quick else WARMUP_REQUESTS,
            "profile_request_factor": 1 if args.quick else PROFILE_REQUEST_FACTOR,
            "tools": {"py-spy": pyspy, "perf": perf, "perf_why": perf_why},
            "order": "per repeat and depth, one redis-benchmark run per path: " + ", ".join(targets),
        },
        "commands": commands,
        "peers": peers,
        "runs": runs,
        "summary": summary,
        "profiles": profiles,
        "breakdown": breakdown,
        "model": model,
    }
    body["headline"] = headline(body)
    return body


# ---------------------------------------------------------------------------------------------- figures


def _paired_over(by_repeat: dict[int, dict[str, dict[str, Any]]], base: str, other: str) -> dict[str, Any]:
    pairs = [(rep[base]["rps_overall"], rep[other]["rps_overall"]) for _, rep in sorted(by_repeat.items())
             if base in rep and other in rep]  # fmt: skip
    return paired([a for a, _ in pairs], [b for _, b in pairs])


def summarize(runs: list[dict[str, Any]], targets: Sequence[str]) -> dict[str, Any]:
    """Per depth and path: rps, the paired ratio to direct, and each process's CPU µs per request (medians)."""
    out: dict[str, Any] = {}
    for pipeline in PIPELINES:
        by_repeat: dict[int, dict[str, dict[str, Any]]] = {}
        for r in runs:
            if r["pipeline"] == pipeline:
                by_repeat.setdefault(r["repeat"], {})[r["target"]] = r
        per: dict[str, Any] = {}
        for t in targets:
            rows = [rep[t] for _, rep in sorted(by_repeat.items()) if t in rep]
            if not rows:
                continue
            entry: dict[str, Any] = {"runs": len(rows), "rps": spread([r["rps_overall"] for r in rows])}
            for proc in ("relay", "redis", "bench"):
                if proc not in rows[0]["cpu"]:
                    continue
                user = [r["cpu"][proc]["user_s"] * 1e6 / r["requests"] for r in rows]
                kern = [r["cpu"][proc]["sys_s"] * 1e6 / r["requests"] for r in rows]
                total = [u + k for u, k in zip(user, kern, strict=True)]
                entry[proc] = {"user_us": statistics.median(user), "sys_us": statistics.median(kern),
                               "total_us": statistics.median(total), "total": spread(total)}  # fmt: skip
                for key in ("voluntary_switches", "involuntary_switches"):
                    if key in rows[0]["cpu"][proc]:
                        entry[proc][f"{key}_per_request"] = statistics.median(
                            r["cpu"][proc][key] / r["requests"] for r in rows)  # fmt: skip
            for proc in ("relay", "redis"):
                values = [r["counts"][proc]["raw_syscalls:sys_enter"] / r["requests"] for r in rows
                          if r["counts"].get(proc, {}).get("raw_syscalls:sys_enter")]  # fmt: skip
                if values and proc in entry:
                    entry[proc]["syscalls_per_request"] = statistics.median(values)
            entry["cores_busy"] = statistics.median(
                sum(v["user_s"] + v["sys_s"] for v in r["cpu"].values()) / r["wall_s"] for r in rows
            )
            entry["others_cores"] = statistics.median(r.get("others_cores", 0.0) for r in rows)
            if t != "direct":
                entry["ratio"] = _paired_over(by_repeat, "direct", t)
            if t == "proxy" and "plain" in targets:
                entry["vs_plain"] = _paired_over(by_repeat, "plain", "proxy")
            per[t] = entry
        out[str(pipeline)] = per
    return out


def breakdown_for(proxy: dict[str, Any], prof: dict[str, Any]) -> dict[str, Any]:
    """brokerproxy's CPU µs per request by component: the kernel part (stime) split as perf's kernel samples are, the
    user part (utime) as py-spy --native's non-syscall samples are. Without perf, the kernel part is split as
    py-spy --native's system-call samples are; without py-spy --native, the Python-only profile splits the total."""
    cpu = proxy["relay"]
    # The median total, split as the medians of user and kernel time are (so that every table adds up the same).
    total = cpu["total_us"]
    both = cpu["user_us"] + cpu["sys_us"]
    user_us = total * cpu["user_us"] / both if both else 0.0
    sys_us = total - user_us
    kernel_us = sys_us
    rows: dict[str, float] = {}
    sources: dict[str, str] = {}
    native, perf, python = prof.get("native", {}), prof.get("perf", {}), prof.get("python", {})
    if native.get("ok"):
        comps = native["components"]
        user_n = sum(v for k, v in comps.items() if not k.startswith("kernel:"))
        for c in USER_COMPONENTS:
            rows[c] = user_us * comps.get(c, 0) / user_n if user_n else 0.0
        sources["user"] = "utime, split as py-spy --native's samples outside system calls"
    elif python.get("ok"):
        comps = python["components"]
        total_n = sum(comps.values())
        for c in USER_COMPONENTS:
            rows[c] = (user_us + sys_us) * comps.get(c, 0) / total_n if total_n else 0.0
        sources["user"] = ("utime + stime, split as py-spy's Python-only samples (kernel time included in the "
                           "Python function that made the system call)")
        sys_us = 0.0
    else:
        rows["user (not profiled)"] = user_us
        sources["user"] = "utime, not split (no py-spy profile)"
    if perf.get("ok") and sys_us:
        kn = perf["kernel_samples"]
        for c in KERNEL_COMPONENTS:
            rows[c] = sys_us * perf["kernel"].get(c.split(":")[1], 0) / kn if kn else 0.0
        rows["kernel: waking the peer"] = sys_us * perf["kernel_waking_peer"] / kn if kn else 0.0
        rows["kernel: copying bytes"] = sys_us * perf["kernel_copying"] / kn if kn else 0.0
        sources["kernel"] = "stime, split as perf record -g's kernel samples"
    elif native.get("ok") and sys_us:
        comps = native["components"]
        kn = sum(v for k, v in comps.items() if k.startswith("kernel:"))
        for c in KERNEL_COMPONENTS:
            rows[c] = sys_us * comps.get(c, 0) / kn if kn else 0.0
        sources["kernel"] = "stime, split as py-spy --native's samples in system calls"
    elif sys_us:
        rows["kernel (not split)"] = sys_us
        sources["kernel"] = "stime, not split (no perf, no py-spy --native)"
    functions = []
    if native.get("ok"):
        user_n = sum(v for k, v in native["components"].items() if not k.startswith("kernel:"))
        for f in native["functions"]:
            if not f["component"].startswith("kernel:") and user_n:
                functions.append({**f, "us": user_us * f["samples"] / user_n})
    groups = {
        "kernel": sum(rows.get(c, 0.0) for c in (*KERNEL_COMPONENTS, "kernel (not split)")),
        "uvloop": rows.get("uvloop", 0.0),
        "hiredis": rows.get("hiredis", 0.0),
        "python_dispatch": sum(rows.get(c, 0.0) for c in PYTHON_DISPATCH),
        "acl_observe": rows.get("acl", 0.0) + rows.get("observe", 0.0),
    }
    return {"total_us": total, "user_us": user_us, "sys_us": kernel_us, "rows": rows, "groups": groups,
            "sources": sources, "functions": functions[:25]}  # fmt: skip


def model_rate(r: float, b: float, p: float, cores: int) -> float:
    """Requests per µs that three single-threaded processes costing r, b, p µs of CPU per request can do on
    ``cores`` cores: bounded by the cores' total and by the busiest process's own core."""
    tiny = 1e-3  # a --quick run can see no CPU tick at all
    return min(cores / max(r + b + p, tiny), 1 / max(r, b, p, tiny))


def model_for(summary: dict[str, Any], targets: Sequence[str], cores: int, target_ratio: float) -> dict[str, Any]:
    d = summary["direct"]
    r_d, b_d = d["redis"]["total_us"], d["bench"]["total_us"]
    direct_rate = model_rate(r_d, b_d, 0.0, cores)
    # What other work on the machine left to the paths during this run (median over the paths' runs).
    left = max(cores - statistics.median(e["others_cores"] for e in summary.values()), 0.25)
    direct_left = model_rate(r_d, b_d, 0.0, left)
    out: dict[str, Any] = {"cores": cores, "cores_left": left, "target_ratio": target_ratio,
                           "direct_model_rps": direct_rate * 1e6, "direct_measured_rps": d["rps"]["median"],
                           "paths": {}}  # fmt: skip
    for t in targets:
        if t == "direct":
            continue
        e = summary[t]
        p, r, b = e["relay"]["total_us"], e["redis"]["total_us"], e["bench"]["total_us"]
        out["paths"][t] = {
            "proxy_us": p,
            "model_ratio": model_rate(r, b, p, cores) / direct_rate,
            "model_ratio_cores_left": model_rate(r, b, p, left) / direct_left,
            "measured_ratio": e["ratio"]["paired_median"],
            "best_ratio": model_rate(r_d, b_d, p, cores) / direct_rate,
            "own_core_rps": 1e6 / max(p, 1e-3),
            "spare_cores_ratio": max(r_d, b_d) / max(r, b, 1e-3),
            # As many workers as needed, the same cores: the relay's own core no longer bounds it, the cores do.
            "workers_ratio": min(cores / max(r + b + p, 1e-3), 1 / max(r, b, 1e-3)) / direct_rate,
        }
    # The kernel floor: a relay costing only the kernel time of the cheapest relay with one upstream connection per
    # client (the bare relay, HAProxy), i.e. no user-space work at all.
    floors = [summary[t]["relay"]["sys_us"] for t in ("relay", "haproxy") if t in summary]
    if floors:
        out["kernel_floor_us"] = min(floors)
        out["kernel_floor_ratio"] = model_rate(r_d, b_d, min(floors), cores) / direct_rate
    # The CPU per request a relay may cost to reach the target, Redis and redis-benchmark at their direct cost:
    # min(cores / (s + p), 1 / max(m, p)) >= T * D  <=>  p <= cores / (T D) - s  and  p <= 1 / (T D).
    need = target_ratio * direct_rate
    out["budget_us"] = min(cores / need - (r_d + b_d), 1 / need)
    if "proxy" in summary:
        e = summary["proxy"]
        out["budget_us_as_measured"] = min(cores / need - (e["redis"]["total_us"] + e["bench"]["total_us"]), 1 / need)
    return out


def headline(body: dict[str, Any]) -> dict[str, Any]:
    """The figures the summary and the closing note quote, per depth."""
    out: dict[str, Any] = {}
    for p in PIPELINES:
        s, m, b = body["summary"][str(p)], body["model"][str(p)], body["breakdown"][str(p)]
        proxy = s["proxy"]
        h: dict[str, Any] = {
            "proxy_us": b["total_us"], "proxy_user_us": b["user_us"], "proxy_sys_us": b["sys_us"], **b["groups"],
            "redis_direct_us": s["direct"]["redis"]["total_us"], "redis_via_proxy_us": proxy["redis"]["total_us"],
            "bench_direct_us": s["direct"]["bench"]["total_us"], "bench_via_proxy_us": proxy["bench"]["total_us"],
            "measured_ratio": proxy["ratio"]["paired_median"], "model_ratio": m["paths"]["proxy"]["model_ratio"],
            "best_ratio": m["paths"]["proxy"]["best_ratio"], "budget_us": m["budget_us"],
            "cores_left": m["cores_left"], "model_ratio_cores_left": m["paths"]["proxy"]["model_ratio_cores_left"],
            "target_ratio": m["target_ratio"], "kernel_floor_us": m.get("kernel_floor_us"),
            "kernel_floor_ratio": m.get("kernel_floor_ratio"), "syscalls_per_request":
            proxy["relay"].get("syscalls_per_request"),
        }  # fmt: skip
        if "plain" in s:
            h["plain_us"] = s["plain"]["relay"]["total_us"]
            h["acl_metrics_cpu_us"] = b["total_us"] - h["plain_us"]
            h["acl_metrics_vs_plain"] = proxy.get("vs_plain", {}).get("paired_median")
        for t in ("relay", "haproxy", "twemproxy"):
            if t in s:
                h[f"{t}_us"] = s[t]["relay"]["total_us"]
                h[f"{t}_sys_us"] = s[t]["relay"]["sys_us"]
                h[f"{t}_best_ratio"] = m["paths"][t]["best_ratio"]
                h[f"{t}_measured_ratio"] = s[t]["ratio"]["paired_median"]
        out[str(p)] = h
    return out


# ---------------------------------------------------------------------------------------------- report


def _us(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def cpu_table(summary: dict[str, Any], targets: Sequence[str]) -> str:
    lines = [
        "| -P | path | rps | ratio to direct | relay µs (user + kernel) | Redis µs (user + kernel) "
        "| redis-benchmark µs | total µs | relay system calls | relay sleeps | relay preempted | Redis system calls "
        "| cores busy: the path / other work |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in PIPELINES:
        for t in targets:
            e = summary[str(p)].get(t)
            if e is None:
                continue
            relay = e.get("relay", {})
            relay_cell = (f"**{relay['total_us']:.1f}** ({relay['user_us']:.1f} + {relay['sys_us']:.1f})"
                          if relay else "-")  # fmt: skip
            total = sum(e[k]["total_us"] for k in ("relay", "redis", "bench") if k in e)
            ratio = fmt_ratio(e["ratio"]) if "ratio" in e else "-"
            dash = "-" if not relay else None
            lines.append(
                f"| {p} | {NAMES[t]} | {e['rps']['median']:,.0f} | {ratio} | {relay_cell} "
                f"| {e['redis']['total_us']:.1f} ({e['redis']['user_us']:.1f} + {e['redis']['sys_us']:.1f}) "
                f"| {e['bench']['total_us']:.1f} | {total:.1f} "
                f"| {dash or _us(relay.get('syscalls_per_request'), 2)} "
                f"| {dash or _us(relay.get('voluntary_switches_per_request'), 2)} "
                f"| {dash or _us(relay.get('involuntary_switches_per_request'), 2)} "
                f"| {_us(e['redis'].get('syscalls_per_request'), 2)} | {e['cores_busy']:.2f} / "
                f"{e['others_cores']:.2f} |"
            )
    return "\n".join(lines)


def breakdown_table(breakdown: dict[str, Any]) -> str:
    keys: list[str] = []
    for b in breakdown.values():
        keys += [k for k in b["rows"] if k not in keys]
    order = [*KERNEL_COMPONENTS, "kernel: waking the peer", "kernel: copying bytes", "kernel (not split)",
             *USER_COMPONENTS, "user (not profiled)"]  # fmt: skip
    keys = [k for k in order if k in keys]
    head = "| component | " + " | ".join(f"-P {p} µs/request | -P {p} share" for p in PIPELINES) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(PIPELINES)]
    for k in keys:
        label = COMPONENTS.get(k, k)
        sub = k in ("kernel: waking the peer", "kernel: copying bytes")
        if sub:
            label = "of the kernel time: " + k.split(": ", 1)[1]
        cells = []
        for p in PIPELINES:
            b = breakdown[str(p)]
            v = b["rows"].get(k)
            cells.append("n/a | n/a" if v is None else f"{v:.2f} | {v / b['total_us'] * 100:.0f} %")
        lines.append(f"| {'*' + label + '*' if sub else label} | " + " | ".join(cells) + " |")
    lines.append("| **total (utime + stime)** | " + " | ".join(
        f"**{breakdown[str(p)]['total_us']:.1f}** | 100 %" for p in PIPELINES) + " |")  # fmt: skip
    return "\n".join(lines)


def groups_table(breakdown: dict[str, Any]) -> str:
    labels = {
        "kernel": "kernel (system calls: socket reads and writes, epoll, wake-ups)",
        "uvloop": "event loop in C (uvloop/libuv)",
        "hiredis": "RESP framing in C (hiredis)",
        "python_dispatch": "Python dispatch (session.py, resp.py, proxy.py, interpreter)",
        "acl_observe": "ACL checks + observation",
    }
    lines = ["| part | " + " | ".join(f"-P {p} µs/request" for p in PIPELINES) + " |",
             "|---|" + "---:|" * len(PIPELINES)]  # fmt: skip
    for k, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(f"{breakdown[str(p)]['groups'][k]:.1f}" for p in PIPELINES) + " |")
    return "\n".join(lines)


def functions_table(breakdown: dict[str, Any], pipeline: int, top: int = 20) -> str:
    fs = breakdown[str(pipeline)]["functions"][:top]
    if not fs:
        return "No py-spy --native profile."
    lines = ["| function (own time, with the interpreter and C below it) | component | µs/request |", "|---|---|---:|"]
    lines += [f"| `{f['function']}` | {f['component']} | {f['us']:.2f} |" for f in fs]
    return "\n".join(lines)


def python_profile_table(profiles: dict[str, Any]) -> str:
    comps = [c for c in (*USER_COMPONENTS, *KERNEL_COMPONENTS)]
    lines = ["| component (inclusive of the C and kernel time below it) | " + " | ".join(
        f"-P {p} share" for p in PIPELINES) + " |", "|---|" + "---:|" * len(PIPELINES)]  # fmt: skip
    present = False
    for c in comps:
        cells = []
        for p in PIPELINES:
            py = profiles[str(p)].get("python", {})
            n = sum(py.get("components", {}).values())
            v = py.get("components", {}).get(c, 0)
            cells.append(f"{v / n * 100:.1f} %" if n else "n/a")
        if any(cell not in ("0.0 %", "n/a") for cell in cells):
            present = True
            lines.append(f"| {COMPONENTS[c]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if present else "No Python-only profile."


def perf_table(profiles: dict[str, Any]) -> str:
    lines = []
    for p in PIPELINES:
        pf = profiles[str(p)].get("perf", {})
        if not pf.get("ok"):
            lines.append(f"-P {p}: {pf.get('why', 'no perf profile')}")
            continue
        n = pf["samples"]
        parts = [("kernel", pf["kernel_samples"]), *sorted(pf["user"].items(), key=lambda kv: -kv[1])]
        lines.append(f"-P {p} ({n:,} samples): " + ", ".join(f"{k} {v / n * 100:.0f} %" for k, v in parts)
                     + "; top kernel functions: " + ", ".join(
                         f"`{s['symbol']}` {s['samples'] / n * 100:.1f} %" for s in pf["top_kernel_symbols"][:8]))
    return "\n\n".join(lines)


def bound_table(model: dict[str, Any], targets: Sequence[str]) -> str:
    lines = [
        "| -P | path | relay µs/request | its own core: rps at most | model ratio | model ratio, the cores other work "
        "left | measured ratio | best ratio (Redis, redis-benchmark at direct cost) | with spare cores |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in PIPELINES:
        m = model[str(p)]
        for t in targets:
            x = m["paths"].get(t)
            if x is None:
                continue
            lines.append(f"| {p} | {NAMES[t]} | {x['proxy_us']:.1f} | {x['own_core_rps']:,.0f} "
                         f"| {x['model_ratio']:.2f} | {x['model_ratio_cores_left']:.2f} (N = {m['cores_left']:.1f}) "
                         f"| {_us(x['measured_ratio'], 2)} | {x['best_ratio']:.2f} | {x['spare_cores_ratio']:.2f} |")
        if "kernel_floor_us" in m:
            lines.append(f"| {p} | *kernel floor: only the cheapest relay's kernel time* | {m['kernel_floor_us']:.1f} "
                         f"| {1e6 / max(m['kernel_floor_us'], 1e-3):,.0f} | | | | {m['kernel_floor_ratio']:.2f} | |")
        lines.append(f"| {p} | *what issue 6's {m['target_ratio']} needs* | ≤ {m['budget_us']:.1f} | | | | "
                     f"| {m['target_ratio']} | |")
    return "\n".join(lines)


def explanation(body: dict[str, Any]) -> str:
    """The figures in sentences: what a request costs, what bounds the ratio, and what would close the gap."""
    summary, model, breakdown, head = body["summary"], body["model"], body["breakdown"], body["headline"]
    out = []
    for p in PIPELINES:
        s, m, b, h = summary[str(p)], model[str(p)], breakdown[str(p)], head[str(p)]
        proxy, d = s["proxy"], s["direct"]
        rows, relay = b["rows"], proxy["relay"]

        def cost(t: str, s: dict[str, Any] = s) -> str:
            c = s[t]["relay"]
            calls = c.get("syscalls_per_request")
            return (f"{NAMES[t]} {c['total_us']:.1f} µs ({c['sys_us']:.1f} in the kernel"
                    + (f", {calls:.2f} system calls" if calls else "") + ")")

        detail = []
        if relay.get("syscalls_per_request"):
            detail.append(f"{relay['syscalls_per_request']:.2f} system calls per request")
        sleeps = relay.get("voluntary_switches_per_request", 0)
        detail.append(f"{sleeps:.2f} sleeps and {relay.get('involuntary_switches_per_request', 0):.2f} preemptions "
                      "per request" + (": it hardly ever waits for work" if sleeps < 0.05 else ""))
        if "kernel: waking the peer" in rows:
            detail.append(f"{rows['kernel: waking the peer']:.1f} µs waking the process at the other end of a socket")
        if "kernel: copying bytes" in rows:
            detail.append(f"{rows['kernel: copying bytes']:.1f} µs copying bytes")
        acl = (f"; measured as the difference to the plain proxy ({h['plain_us']:.1f} µs), ACLs + metrics cost "
               f"**{h['acl_metrics_cpu_us']:+.1f} µs** per request, and the ACL + metrics proxy does "
               f"{_us(h['acl_metrics_vs_plain'], 2)}x the plain one's rps in the same runs"
               if "plain_us" in h else "")  # fmt: skip
        floor = m.get("kernel_floor_us")
        left = None if floor is None else m["budget_us"] - floor
        para = [
            f"**-P {p}: the cost.** Each request costs brokerproxy with ACLs and metrics on **{b['total_us']:.1f} µs "
            f"of CPU**: {h['kernel']:.1f} µs in the kernel ({'; '.join(detail)}), {h['uvloop']:.1f} µs in "
            f"uvloop/libuv, {h['hiredis']:.1f} µs in hiredis, **{h['python_dispatch']:.1f} µs of Python dispatch** "
            f"(session.py {rows.get('session', 0):.1f}, proxy.py/server.py {rows.get('glue', 0):.1f}, resp.py "
            f"{rows.get('framing', 0):.1f}, other {rows.get('other', 0):.1f}) and **{h['acl_observe']:.1f} µs in "
            f"the ACL and observation modules** (profile: their own functions; the code that calls them inline counts "
            f"as session.py's){acl}. "
            "For comparison: " + "; ".join(cost(t) for t in ("relay", "haproxy", "twemproxy") if t in s) + ". "
            f"Redis spends {d['redis']['total_us']:.1f} µs per request direct and {proxy['redis']['total_us']:.1f} "
            f"µs through brokerproxy; redis-benchmark {d['bench']['total_us']:.1f} and "
            f"{proxy['bench']['total_us']:.1f}.",
            "",
            f"**-P {p}: the bound.** brokerproxy's own core relays at most "
            f"{m['paths']['proxy']['own_core_rps']:,.0f} requests/s. On {m['cores']} cores shared by the three "
            f"processes, the model puts brokerproxy at {m['paths']['proxy']['model_ratio']:.2f} of direct; with the "
            f"{m['cores_left']:.1f} cores other work left during this run, at "
            f"{m['paths']['proxy']['model_ratio_cores_left']:.2f} (measured "
            f"{_us(m['paths']['proxy']['measured_ratio'], 2)}); and at {m['paths']['proxy']['best_ratio']:.2f} even "
            f"if Redis and redis-benchmark were as cheap per request as direct. Issue 6's {m['target_ratio']} needs "
            f"the relay at **≤ {m['budget_us']:.1f} µs per request** in all"
            + (f". The kernel part of relaying with one upstream connection per client is {floor:.1f} µs (the "
               f"cheapest of the bare relay and HAProxy; a relay costing only that would reach "
               f"{m['kernel_floor_ratio']:.2f}), which leaves **{max(left, 0):.1f} µs** per request for all user-space "
               f"work; brokerproxy spends {b['user_us']:.1f} µs in user space"
               + (f" ({b['user_us'] / left:.1f}x that)" if left and left > 0 else "") if floor is not None else "")
            + ".",
        ]
        out.append("\n".join(para))
    h1, h16 = head["1"], head["16"]
    m1, m16 = model["1"], model["16"]
    s1 = summary["1"]
    gap = []
    if "relay_us" in h1:
        within = [h["relay_us"] <= m["budget_us"] for h, m in ((h1, m1), (h16, m16))]
        verdict = ("inside both budgets" if all(within) else "outside both budgets" if not any(within) else
                   f"inside the budget at -P {1 if within[0] else 16} only")  # fmt: skip
        spare = [m1["budget_us"] - h1["relay_us"], m16["budget_us"] - h16["relay_us"]]
        today = [h1["hiredis"] + h1["acl_observe"], h16["hiredis"] + h16["acl_observe"]]
        over = [str(p) for p, t, x in zip(PIPELINES, today, spare, strict=True) if t > max(x, 0)]
        gap.append(
            f"- **A compiled fast path** (C, Rust or Cython: frame the read, check the ACL, count, and pass the bytes "
            f"on in one call per read; Python only for the commands that need the session's attention). Python "
            f"dispatch plus the ACL and observation modules are {h1['python_dispatch'] + h1['acl_observe']:.1f} of "
            f"the {h1['proxy_us']:.1f} µs at -P 1 and {h16['python_dispatch'] + h16['acl_observe']:.1f} of "
            f"{h16['proxy_us']:.1f} µs at -P 16. The bare uvloop relay, which still runs one Python callback per "
            f"read but no Python per request, costs {h1['relay_us']:.1f} and {h16['relay_us']:.1f} µs, {verdict} "
            f"({m1['budget_us']:.1f} and {m16['budget_us']:.1f} µs; best ratios {h1['relay_best_ratio']:.2f} and "
            f"{h16['relay_best_ratio']:.2f}). Over the bare relay, the budgets leave {max(spare[0], 0):.1f} µs "
            f"(-P 1) and {max(spare[1], 0):.1f} µs (-P 16) per request for framing, the ACL decision and the "
            f"counters together; hiredis and the ACL and observation modules cost {today[0]:.1f} and {today[1]:.1f} "
            "µs today"
            + (f", more than that at -P {' and -P '.join(over)}: they too must be in the compiled call, not only "
               "the session's loop." if over else ".")
        )
    if "twemproxy_us" in h1:
        tw = s1["twemproxy"]
        calls = [s1[t]["relay"].get("syscalls_per_request") for t in ("proxy", "relay", "haproxy") if t in s1]
        calls = [c for c in calls if c]
        gap.append(
            "- **Fewer system calls and wake-ups per request: batching across clients.** With one upstream "
            "connection per client, every relay here makes "
            + (f"{min(calls):.1f} to {max(calls):.1f} system calls per request at -P 1 (brokerproxy, the bare relay, "
               "HAProxy)" if calls else "its reads and writes per request")
            + f", and each write wakes the reader at the other end. twemproxy multiplexes every client onto one "
            f"upstream connection: Redis's cost falls from {h1['redis_direct_us']:.1f} µs per request (direct) to "
            f"{tw['redis']['total_us']:.1f} µs (Redis's system calls per request "
            f"{_us(s1['direct']['redis'].get('syscalls_per_request'), 2)} → "
            f"{_us(tw['redis'].get('syscalls_per_request'), 2)}), and twemproxy measures "
            f"{_us(h1['twemproxy_measured_ratio'], 2)} of direct at -P 1 ({_us(h16['twemproxy_measured_ratio'], 2)} "
            f"at -P 16, where its own {h16['twemproxy_us']:.1f} µs per request count). Writing the requests of many "
            "clients, read in one loop iteration, to a shared upstream connection in one write applies only to "
            "requests that carry no connection state (not blocking pops, transactions, pub/sub, SELECT or CLIENT): "
            "a design change, not a tuning."
        )
    if "kernel: copying bytes" in breakdown["1"]["rows"]:
        gap.append(
            f"- **Zero-copy (splice)** would save at most the kernel's copying: "
            f"{breakdown['1']['rows']['kernel: copying bytes']:.2f} µs per request at -P 1 and "
            f"{breakdown['16']['rows']['kernel: copying bytes']:.2f} at -P 16 with 512-byte values. Not where the "
            "time goes at these sizes."
        )
    gap.append(
        f"- **More cores (`--workers`)** spread the proxy's cost over processes but do not lower it: on "
        f"{m1['cores']} cores, with as many workers as wanted, the model's ratio is at most "
        f"{m1['paths']['proxy']['workers_ratio']:.2f} (-P 1) and {m16['paths']['proxy']['workers_ratio']:.2f} (-P 16)"
        f" (one process: {m1['paths']['proxy']['model_ratio']:.2f} and {m16['paths']['proxy']['model_ratio']:.2f})."
        " With a core for every "
        f"process, Redis's (or redis-benchmark's) own thread becomes the limit, and Redis costs more per request "
        f"through brokerproxy than direct ({h1['redis_via_proxy_us']:.1f} vs {h1['redis_direct_us']:.1f} µs at -P 1, "
        f"{_us(s1['proxy']['redis'].get('syscalls_per_request'), 2)} vs "
        f"{_us(s1['direct']['redis'].get('syscalls_per_request'), 2)} system calls): ratio ≤ "
        f"{m1['paths']['proxy']['spare_cores_ratio']:.2f} at -P 1, "
        f"{m16['paths']['proxy']['spare_cores_ratio']:.2f} at -P 16. `workers.md` measures `--workers` here."
    )
    return "\n\n".join(out) + "\n\n**What would close the gap**, with the figures above:\n\n" + "\n".join(gap)


def markdown(rep: Report, body: dict[str, Any]) -> str:
    cfg, cmds = body["config"], body["commands"]
    targets = cfg["targets"]
    peers = []
    for name, info in body["peers"].items():
        if info["available"]:
            peers.append(f"- {NAMES[name]} ({info['version']}), as in `e2e_redis_benchmark.py`: `{cmds[name]}`")
        else:
            peers.append(f"- {NAMES[name]}: {info['reason']}")
    relays = "\n".join(cmds[t] for t in targets if t != "direct" and t in cmds and t not in PEERS)
    tools = cfg["tools"]
    prof_cmds = []
    for p in PIPELINES:
        for kind in ("python", "perf", "native"):
            pr = body["profiles"][str(p)].get(kind, {})
            if "command" in pr:
                prof_cmds.append(pr["command"])
        load = next((pr["load_command"] for pr in body["profiles"][str(p)].values() if "load_command" in pr), None)
        if load:
            prof_cmds.append(f"# while: {load}")
    rates = []
    for p in PIPELINES:
        pr = body["profiles"][str(p)]
        unprofiled = body["summary"][str(p)]["proxy"]["rps"]["median"]
        cells = [f"unprofiled {unprofiled:,.0f}"]
        for kind, label in (("python", "py-spy + perf record"), ("native", "py-spy --native")):
            if "rps_overall" in pr.get(kind, {}):
                cells.append(f"{label} {pr[kind]['rps_overall']:,.0f}")
        rates.append(f"-P {p}: " + ", ".join(cells))
    sources = body["breakdown"][str(PIPELINES[0])]["sources"]
    return rep.header("Where the proxy's CPU goes: µs per request, by process and by component", cfg["quick"]) + f"""
## Set-up

One `redis-server` and, in front of it, every path below on its own port, all up for the whole run. Per repeat
and depth one `redis-benchmark` run per path, in the order {", ".join(NAMES[t] for t in targets)};
{cfg["repeats"]} repeat(s) of {cfg["requests_p1"]:,} requests per test at `-P 1` ({cfg["pipelined_request_factor"]}x
at `-P 16`), tests {", ".join(TESTS)}, {CLIENTS} clients, `-d {SIZE}`. CPU per request is each process's CPU time
during the run (`/proc/<pid>/stat` utime and stime for the relay and redis-server, `getrusage` for redis-benchmark)
÷ the requests sent, median over repeats; every process is single-threaded. {cfg["usable_cpus"]} usable CPU(s),
shared by the three processes of a path (and by whatever else runs on the machine: the CPU per request moves much
less with that load than the rps do).

Then, per depth, two more runs ({cfg["profile_request_factor"]}x the requests) through the ACL + metrics
brokerproxy, sampled at {cfg["rate_hz"]} Hz: `py-spy
--nonblocking` (Python frames only) with `perf record -g` (kernel and native frames), then `py-spy --native` (Python
and native frames; it stops the process at every sample, so that run is slower). py-spy: {tools["py-spy"] or
"not installed"}; perf: {tools["perf"] or tools["perf_why"]}. The rps of those runs, to see what sampling cost:
{"; ".join(rates)}.

{chr(10).join(peers)}

## Commands

```
{cmds["redis_server"]}
{relays}
```

```
{chr(10).join(cmds["redis_benchmark"])}
```

Profilers, attached to the brokerproxy with `--config {ACL_METRICS.relative_to(REPO)}`:

```
{chr(10).join(prof_cmds)}
```

## CPU per request, every process on every path

µs of CPU per request (user + kernel), medians over repeats. "sleeps" and "preempted" are the relay's voluntary and
involuntary context switches per request (`/proc/<pid>/status`); system calls per request are `perf stat` counts
(n/a without perf). "cores busy" is the three processes' CPU ÷ the run's wall time, then the rest of the machine's
busy time (`/proc/stat`) in the same run: other work on the shared machine (the profilers are not running then).

{cpu_table(body["summary"], targets)}

## Where brokerproxy's CPU goes (ACLs and metrics on)

User time: {sources.get("user")}. Kernel time: {sources.get("kernel")}. A component's µs per request is its share
of those samples times the utime (or stime) per request measured above, unprofiled.

{groups_table(body["breakdown"])}

Every component:

{breakdown_table(body["breakdown"])}

### Functions, -P 1 (py-spy --native, own time outside system calls)

{functions_table(body["breakdown"], 1)}

### Functions, -P 16

{functions_table(body["breakdown"], 16, 12)}

### Cross-checks

py-spy without `--native` (it never stops the process): share of samples by the innermost brokerproxy frame, so a
Python function's share includes the uvloop and kernel time of the calls it makes (`transport.write` in
`proxy.py`'s `_pump` carries the socket writes):

{python_profile_table(body["profiles"])}

`perf record -g` of the same run, share of samples by where the CPU was (kernel, or the library of the user-space
frame):

{perf_table(body["profiles"])}

## What bounds the ratio, and what would close the gap

Each of redis-server, redis-benchmark and the relay is one thread. With r, b, p their µs of CPU per request, a
path can do at most min(N ÷ (r + b + p), 1 ÷ max(r, b, p)) requests per µs on N cores; "model ratio" is that for the
path ÷ that for direct Redis (p = 0) with this run's figures, with N = {body["config"]["usable_cpus"]} and with N = the
cores other work on the machine left during the runs, next to the measured ratio. "best ratio" keeps r and b
at their direct values (a relay that made Redis and the load generator no less efficient); "with spare cores" drops
the N-core budget and the relay's own core (enough cores, enough `--workers`): Redis's or redis-benchmark's thread is
then the limit.

{bound_table(body["model"], targets)}

{explanation(body)}
"""


# ---------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_relay:
        listen, upstream = (int(x) for x in args.serve_relay.split(":"))
        serve_relay(listen, upstream)
        return 0
    return run_benchmark(NAME, "bench/cpu_profile.py", argv, parse_args, measure, markdown, "## CPU per request")


if __name__ == "__main__":
    sys.exit(main())
