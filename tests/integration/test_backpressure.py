"""Backpressure: reading pauses when the other side's write buffer passes ``write_buffer_high_water``, so a slow
reader (or a slow Redis) cannot grow the proxy's memory without bound.

The proxy's memory is measured from outside, as an operator would: VmRSS of the proxy process in /proc, sampled
every few milliseconds while one side is not reading. What sits in kernel socket buffers is not in VmRSS, and
what Redis itself buffers (its client output buffer) is Redis's memory, not the proxy's.

Why these tests fail without backpressure (checked by running them with ``write_buffer_high_water = 2147483647``,
larger than anything here, which keeps the same code paths but never pauses; 4 GiB is not usable, uvloop refuses a
limit above 2**31-1):

* slow reader: Redis has all 800 MiB of replies ready at once; a proxy that keeps reading Redis while the client
  reads nothing moves them into its client transport's write buffer at memory speed: VmRSS rose by 746-822 MiB
  within the stall (bound: 64 MiB; with backpressure +12-16 MiB);
* slow upstream: the client can push the SETs as fast as loopback allows; a proxy that keeps reading the client
  while Redis is frozen queues them in its upstream transport's write buffer: +424-426 MiB, and the client got all
  400 MiB out while Redis slept (with backpressure +24-28 MiB, and the client got 13-16 MiB out). The test also
  checks that the client's own sending stalled, i.e. the pause reached the client instead of the proxy swallowing
  its requests.

The third test does not depend on backpressure being there; it guards against doing it wrongly (pausing more than
the one connection, or blocking the event loop while a connection is stalled).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from brokerproxy import resp
from tests.conftest import ProxyProcess, RedisServer

MiB = 1024 * 1024

#: Replies: GETs of KEYS big values, pipelined and not read for STALL seconds (800 MiB in all). More adds only
#: runtime: Redis alone needs about 1 s per 400 MiB to build the replies in its output buffer.
VALUE_SIZE = 4 * MiB
KEYS = 4
GETS = 200
STALL = 2.0
#: The stalled client of the third test needs only enough replies to fill every buffer on the way (200 MiB).
STALLED_GETS = 50
#: Requests: SETs pipelined while Redis sleeps in DEBUG SLEEP (400 MiB in all).
SET_SIZE = 4 * MiB
SETS = 100
REDIS_SLEEP = 3
#: Allowed growth of the proxy's RSS over its baseline. With the default 1 MiB high-water mark the proxy holds the
#: buffered writes up to the mark plus the frame being framed and its copies on the way through (a small multiple of
#: the 4 MiB frame size, whatever the pipeline's length); without backpressure it would hold as much of the pipeline
#: as it can read in the time (hundreds of MiB).
RSS_BOUND = 64 * MiB
#: A small receive buffer, so the kernel holds little of what the client does not read.
CLIENT_RCVBUF = 64 * 1024


def rss(pid: int) -> int:
    """VmRSS of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every few milliseconds until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                value = rss(self.pid)
            except (OSError, AssertionError):
                return  # the process is gone; the test sees that itself
            self.peak = max(self.peak, value)
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(5)
        return self.peak


@contextmanager
def sampling(pid: int) -> Iterator[RssSampler]:
    sampler = RssSampler(pid)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


def mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def connect_small_rcvbuf(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)  # before connect, so the window stays small
    s.settimeout(60)
    s.connect(("127.0.0.1", port))
    return s


def recv_exactly(sock: socket.socket, buf: bytearray) -> None:
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise AssertionError(f"connection closed after {got} of {len(buf)} bytes of a reply")
        got += n


def ping(sock: socket.socket) -> None:
    sock.sendall(b"PING\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(64)
        assert chunk, "connection closed"
        reply += chunk
    assert reply == b"+PONG\r\n"


class StalledReader:
    """A client that pipelines ``gets`` big GETs through the proxy and reads nothing until told to."""

    def __init__(self, proxy: ProxyProcess, redis_server: RedisServer, gets: int) -> None:
        rng = random.Random(1)
        self.direct = redis_server.client(socket_timeout=60)
        self.gets = gets
        self.frames: list[bytes] = []
        for k in range(KEYS):
            value = rng.randbytes(VALUE_SIZE)
            self.direct.set(f"big{k}", value)
            self.frames.append(b"$%d\r\n%s\r\n" % (VALUE_SIZE, value))
        self.sock = connect_small_rcvbuf(proxy.port)
        ping(self.sock)  # the upstream connection is up before the pipeline
        self.pipeline = b"".join(resp.encode_command([b"GET", b"big%d" % (i % KEYS)]) for i in range(gets))

    def send(self) -> float:
        """Send the pipeline and wait until Redis has run every GET; returns how long that took.

        Redis is single-threaded and spends seconds building hundreds of MiB of replies in its output buffer, during
        which it answers nobody (direct clients included). Waiting for it keeps that out of the stall, so the
        whole stall is time in which a proxy without backpressure would be reading Redis as fast as it can."""
        started = time.monotonic()
        self.sock.sendall(self.pipeline)  # ~10 KB: fits the socket buffers, never blocks
        while int(self.direct.info("commandstats").get("cmdstat_get", {}).get("calls", 0)) < self.gets:
            time.sleep(0.01)
        return time.monotonic() - started

    def read_all(self) -> int:
        """Read every reply, checking each against the value it must be, in order. Returns how many."""
        buf = bytearray(len(self.frames[0]))
        for i in range(self.gets):
            recv_exactly(self.sock, buf)
            assert buf == self.frames[i % KEYS], f"reply {i} differs from big{i % KEYS}"
        return self.gets

    def close(self) -> None:
        self.sock.close()
        self.direct.close()


def test_slow_reader_of_replies_keeps_proxy_memory_bounded(proxy: ProxyProcess, redis_server: RedisServer) -> None:
    pid = proxy.proc.pid
    reader = StalledReader(proxy, redis_server, GETS)
    try:
        baseline = rss(pid)
        with sampling(pid) as stalled:
            redis_seconds = reader.send()
            time.sleep(STALL)  # the client reads nothing; Redis has every reply ready
        with sampling(pid) as draining:
            started = time.monotonic()
            assert reader.read_all() == GETS
            drain_seconds = time.monotonic() - started
        reader.sock.settimeout(0.5)
        ping(reader.sock)  # nothing left over after the last reply: the stream is still in step
    finally:
        reader.close()

    total = GETS * len(reader.frames[0])
    print(
        f"\nslow reader: {GETS} x GET of {mib(VALUE_SIZE)} = {mib(total)} of replies (Redis took "
        f"{redis_seconds:.1f}s to build them); proxy VmRSS baseline {mib(baseline)}, peak while the client read "
        f"nothing {mib(stalled.peak)} (+{mib(stalled.peak - baseline)}, {stalled.samples} samples), peak while it "
        f"read everything {mib(draining.peak)} (+{mib(draining.peak - baseline)}) in {drain_seconds:.1f}s"
    )
    assert stalled.samples > 10
    assert stalled.peak - baseline < RSS_BOUND, f"proxy grew by {mib(stalled.peak - baseline)} while the client stalled"
    assert draining.peak - baseline < RSS_BOUND, f"proxy grew by {mib(draining.peak - baseline)} while it drained"


def test_fast_writer_to_frozen_redis_keeps_proxy_memory_bounded(proxy: ProxyProcess, redis_server: RedisServer) -> None:
    pid = proxy.proc.pid
    body = os.urandom(SET_SIZE)
    requests = [resp.encode_command([b"SET", b"k%d" % i, b"%08d" % i + body[8:]]) for i in range(SETS)]
    total = sum(len(r) for r in requests)

    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=60)
    ping(client)  # the upstream connection is up before Redis freezes
    baseline = rss(pid)

    sent = 0
    errors: list[BaseException] = []

    def write_all() -> None:
        nonlocal sent
        try:
            for r in requests:
                view = memoryview(r)
                while view:
                    n = client.send(view)
                    sent += n
                    view = view[n:]
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    sleeper = socket.create_connection(("127.0.0.1", redis_server.port), timeout=30)
    writer = threading.Thread(target=write_all, daemon=True)
    try:
        sleeper.sendall(resp.encode_command([b"DEBUG", b"SLEEP", str(REDIS_SLEEP).encode()]))
        time.sleep(0.2)  # Redis has read it and is asleep
        frozen_until = time.monotonic() + REDIS_SLEEP - 0.2
        with sampling(pid) as frozen:
            writer.start()
            time.sleep(max(0.0, frozen_until - time.monotonic() - 0.3))  # stop sampling before Redis wakes
            sent_while_frozen = sent
        assert sleeper.recv(16) == b"+OK\r\n"  # Redis is awake again
        with sampling(pid) as catching_up:
            writer.join(60)
            assert not writer.is_alive(), "the client could not finish sending"
            replies = b""
            client.settimeout(30)
            while len(replies) < SETS * len(b"+OK\r\n"):
                chunk = client.recv(65536)
                assert chunk, "connection closed before every SET was answered"
                replies += chunk
    finally:
        sleeper.close()
        client.close()
    assert not errors, errors

    print(
        f"\nfrozen Redis: {SETS} x SET of {mib(SET_SIZE)} = {mib(total)} of requests; client sent "
        f"{mib(sent_while_frozen)} while Redis slept; proxy VmRSS baseline {mib(baseline)}, peak while Redis slept "
        f"{mib(frozen.peak)} (+{mib(frozen.peak - baseline)}, {frozen.samples} samples), peak while catching up "
        f"{mib(catching_up.peak)} (+{mib(catching_up.peak - baseline)})"
    )
    assert replies == b"+OK\r\n" * SETS
    direct = redis_server.client()
    try:
        assert direct.dbsize() == SETS
        for i in (0, SETS // 2, SETS - 1):
            assert direct.get(f"k{i}") == b"%08d" % i + body[8:]
    finally:
        direct.close()
    assert frozen.samples > 10
    assert frozen.peak - baseline < RSS_BOUND, f"proxy grew by {mib(frozen.peak - baseline)} while Redis slept"
    assert catching_up.peak - baseline < RSS_BOUND, f"proxy grew by {mib(catching_up.peak - baseline)} after"
    # The pause reached the client: it could not push its pipeline through while Redis was not reading (what it got
    # out sits in the kernel's socket buffers and the proxy's bounded buffers).
    assert sent_while_frozen < RSS_BOUND, f"client sent {mib(sent_while_frozen)} of {mib(total)} while Redis slept"


def test_other_clients_unaffected_by_a_stalled_reader(proxy: ProxyProcess, redis_server: RedisServer) -> None:
    reader = StalledReader(proxy, redis_server, STALLED_GETS)
    other = proxy.client(socket_timeout=5)
    latencies: list[float] = []
    try:
        reader.send()
        time.sleep(0.2)  # the stalled connection's buffers are full and its upstream reading is paused
        deadline = time.monotonic() + 2.0
        n = 0
        while time.monotonic() < deadline:
            key, value = f"small{n}", f"v{n}".encode()
            for op, args, expect in (("PING", (), True), ("SET", (key, value), True), ("GET", (key,), value)):
                t0 = time.monotonic()
                result = other.execute_command(op, *args)
                latencies.append(time.monotonic() - t0)
                assert result == expect, (op, result)
            n += 1
        # The stalled client is still whole: it gets every reply once it reads.
        assert reader.read_all() == STALLED_GETS
    finally:
        reader.close()
        other.close()
    print(
        f"\nother client during the stall: {len(latencies)} commands, max latency {max(latencies) * 1000:.1f} ms, "
        f"median {sorted(latencies)[len(latencies) // 2] * 1000:.2f} ms"
    )
    assert n > 10
    assert max(latencies) < 0.5
