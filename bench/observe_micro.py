#!/usr/bin/env python3
"""What observation costs: nanoseconds per Observer call, and the sans-IO Session with and without an Observer.

Micro figures (each the median over repeats of elapsed / calls, with fresh observers per repeat):

* ``on_request`` for ``LPUSH q <msg>``, ``msg`` a ~1 KiB Celery 5.7 task message shaped as in the capture (unique
  delivery tag and task id per call, so the pairing maps grow as they do in production);
* the same for a 256 KiB message (the scans stay in the message's tail, so the cost does not grow with the body);
* ``on_reply`` for the matching ``BRPOP`` reply ``*2 $q $msg`` (each pairs with its push: the wait is observed);
* an unwatched request: the session's one set lookup, ``name in WATCH_REQUESTS``, for a mix of the commands Celery
  sends most (the loop's own cost subtracted).

Workload figure: the recorded Celery capture (tests/data/celery57-resp3, 3,861 requests), every connection replayed
through a fresh ``Session`` one request and one reply per read (the request/response pattern of a Celery client):
ns per command with ``observer=None``, and the CPU time spent inside the observer's hot-path methods per command
when one is attached (timed around each call; the timing's own cost, taken from a run with an observer whose
methods do nothing, is subtracted). A direct A/B of whole replays is within this shared machine's noise.

Usage::

    python bench/observe_micro.py [--repeats N] [--out DIR]
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from brokerproxy import resp, session  # noqa: E402
from brokerproxy.observe import Observer  # noqa: E402

CAPTURE = REPO / "tests" / "data" / "celery57-resp3"
N = 4_000  # messages per run: 4 MiB, so that they sit in cache as a just-parsed message does


def celery_message(i: int, size: int = 1024, body_bytes: int = 0) -> bytes:
    tid, tag = str(uuid.uuid4()), str(uuid.uuid4())
    body = base64.b64encode(json.dumps([[i, 3], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                                     "chord": None}]).encode()).decode()  # fmt: skip
    headers = {"lang": "py", "task": "recapp.mul", "id": tid, "shadow": None, "eta": None, "expires": None,
               "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": tid,
               "parent_id": None, "argsrepr": f"({i}, 3)", "kwargsrepr": "{}", "origin": "gen28965@vm",
               "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}  # fmt: skip
    properties = {"correlation_id": tid, "reply_to": "0a31f7ec-e56d-39f3-ac28-1d2a130445d9", "delivery_mode": 2,
                  "delivery_info": {"exchange": "", "routing_key": "alpha"}, "priority": 0,
                  "body_encoding": "base64", "delivery_tag": tag}  # fmt: skip
    msg = {"body": body, "content-encoding": "utf-8", "content-type": "application/json", "headers": headers,
           "properties": properties}  # fmt: skip
    if body_bytes:  # large arguments travel in the body (argsrepr is capped at 1 KiB by Celery)
        msg["body"] = base64.b64encode(b"x" * body_bytes).decode()
    raw = json.dumps(msg).encode()
    headers["argsrepr"] += " " * max(0, size - len(raw))  # pad to size inside a header, as a long argsrepr would
    return json.dumps(msg).encode()


def timed(fn: Callable[[], int]) -> float:
    """CPU ns per call of one run of fn (which returns its call count). CPU time of this thread, not wall time:
    the development machine is shared, and time spent descheduled is not the code's."""
    gc.collect()
    start = time.thread_time_ns()
    calls = fn()
    return (time.thread_time_ns() - start) / calls


def micro(repeats: int) -> dict[str, list[float]]:
    msgs = [celery_message(i) for i in range(N)]
    pushes = [[b"LPUSH", b"alpha", m] for m in msgs]
    replies = [resp.encode_command([b"alpha", m]) for m in msgs]  # *2 $5 alpha $n msg: a BRPOP reply
    brpop = [b"BRPOP", b"alpha", b"alpha\x06\x163", b"1"]
    names = ["publish", "multi", "exec", "get", "setex", "zadd", "hset", "zrem", "hdel", "brpop"] * (N // 10)
    out: dict[str, list[float]] = {"on_request LPUSH": [], "on_reply BRPOP": [], "unwatched lookup": []}
    for _ in range(repeats):
        o = Observer(max_pending=2 * N)

        def push(o: Observer = o) -> int:
            for args in pushes:
                o.on_request(args, False)
            return len(pushes)

        def pop(o: Observer = o) -> int:
            for raw in replies:
                o.on_reply(brpop, raw)
            return len(replies)

        out["on_request LPUSH"].append(timed(push))
        out["on_reply BRPOP"].append(timed(pop))
        assert o.queues["alpha"].wait.count == N and o.pending_messages == 0

        def lookup(watch: frozenset[str] = o.WATCH_REQUESTS) -> int:
            for name in names:
                name in watch  # noqa: B015 - the statement under test
            return len(names)

        def empty(watch: frozenset[str] = o.WATCH_REQUESTS) -> int:
            for name in names:
                name  # noqa: B018 - the same loop without the lookup
            return len(names)

        out["unwatched lookup"].append(timed(lookup) - timed(empty))

    # The machine's speed, for scale: one call of a five-operation Python function.
    def five(a: int, b: int) -> int:
        x = a + b
        y = x * 2
        return (y - a) // 3

    def calls() -> int:
        for _ in range(N):
            five(1, 2)
        return N

    out["for scale: a 5-operation Python call"] = [timed(calls) for _ in range(repeats)]
    # A large message (a 256 KiB base64 body): the scans stay in its tail.
    bigs = [celery_message(i, body_bytes=192 * 1024) for i in range(200)]
    for _ in range(repeats):
        o = Observer()

        def push_big(o: Observer = o) -> int:
            for m in bigs:
                o.on_request([b"LPUSH", b"alpha", m], False)
            return len(bigs)

        out.setdefault("on_request LPUSH, 256 KiB message", []).append(timed(push_big))
    return out


class NoUsers:
    required = False

    def check(self, username: bytes, password: bytes) -> str | None:
        return None


def capture_reads() -> list[tuple[list[bytes], list[bytes]]]:
    conns = []
    for c2s_path in sorted(CAPTURE.glob("*.c2s")):
        p = resp.RequestParser()
        p.feed(c2s_path.read_bytes())
        reqs = []
        while (r := p.next()) is not None:
            reqs.append(r.raw)
        rp = resp.ReplyParser()
        rp.feed(c2s_path.with_suffix(".s2c").read_bytes())
        reps = [b":1\r\n", b"$25\r\nid=1 addr=127.0.0.1:50000\r\n"]  # the proxy's own CLIENT ID, CLIENT INFO
        while (f := rp.next()) is not None:
            reps.append(f[1])
        conns.append((reqs, reps))
    return conns


def replay(conns: list[tuple[list[bytes], list[bytes]]], observer: Observer | None) -> int:
    auth = NoUsers()
    commands = 0
    for client_reads, upstream_reads in conns:
        s = session.Session(auth, observer=observer)  # type: ignore[arg-type]
        s.take_events()
        s.take_upstream()
        for data in client_reads:
            s.from_client(data)
            s.take_client()
            s.take_upstream()
            s.take_events()
        for data in upstream_reads:
            s.from_upstream(data)
            s.take_client()
            s.take_upstream()
            s.take_events()
        s.close()
        commands += len(client_reads)
    return commands


class WiringOnly(Observer):
    """The session's calls into the observer with the observer's own work left out: what the wiring costs."""

    def on_request(self, args: list[bytes], in_multi: bool) -> None:
        pass

    def on_reply(self, args: list[bytes], raw: bytes) -> None:
        pass

    def consumer_blocked(self, keys: list[bytes]) -> None:
        pass

    def consumer_unblocked(self, keys: list[bytes]) -> None:
        pass


class Timed(Observer):
    """An observer that adds up the CPU time spent in its own hot-path methods, wrapper cost subtracted."""

    def __init__(self, base: type[Observer] = Observer) -> None:
        super().__init__()
        self.ns = 0
        self.calls = 0
        self._base = base

    def on_request(self, args: list[bytes], in_multi: bool) -> None:
        t = time.thread_time_ns()
        self._base.on_request(self, args, in_multi)
        self.ns += time.thread_time_ns() - t
        self.calls += 1

    def on_reply(self, args: list[bytes], raw: bytes) -> None:
        t = time.thread_time_ns()
        self._base.on_reply(self, args, raw)
        self.ns += time.thread_time_ns() - t
        self.calls += 1

    def consumer_blocked(self, keys: list[bytes]) -> None:
        t = time.thread_time_ns()
        self._base.consumer_blocked(self, keys)
        self.ns += time.thread_time_ns() - t
        self.calls += 1

    def consumer_unblocked(self, keys: list[bytes]) -> None:
        t = time.thread_time_ns()
        self._base.consumer_unblocked(self, keys)
        self.ns += time.thread_time_ns() - t
        self.calls += 1


def workload(repeats: int) -> dict[str, list[float]]:
    """The capture through sessions: the session alone, and the time spent inside the observer's hot-path methods
    (measured around each call, the cost of measuring taken off with a run of an observer that does nothing)."""
    conns = capture_reads()
    commands = sum(len(c) for c, _ in conns)
    out: dict[str, list[float]] = {"capture: session, no observer": [], "capture: in the observer": []}
    for _ in range(repeats):
        out["capture: session, no observer"].append(timed(lambda: replay(conns, None)))
        real, idle = Timed(), Timed(WiringOnly)
        replay(conns, real)
        replay(conns, idle)
        out["capture: in the observer"].append((real.ns - idle.ns) / commands)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=None, help="write observe_micro.md there")
    args = ap.parse_args()
    figures = micro(args.repeats) | workload(args.repeats)
    lines = [
        "# observe_micro: what observation costs",
        "",
        f"Python {platform.python_version()} on {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}; "
        f"{args.repeats} repeats; CPU time of the benchmark thread. The message is {len(celery_message(0)):,} bytes.",
        "",
        "| figure | ns per call, median | min |",
        "|---|---:|---:|",
    ]
    for name, values in figures.items():
        lines.append(f"| {name} | {statistics.median(values):,.0f} | {min(values):,.0f} |")
    session_ns = statistics.median(figures["capture: session, no observer"])
    observer_ns = statistics.median(figures["capture: in the observer"])
    lines += [
        "",
        f"On the capture (medians): the session costs {session_ns:,.0f} ns per command without an observer; the "
        f"observer's own work adds {observer_ns:,.0f} ns per command ({observer_ns / session_ns:+.1%}). What the "
        "session's wiring adds around it (counting every command, timing, the exact path for watched commands) is "
        "not included: measure it with bench/hotpath.py.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "observe_micro.md").write_text(text)


if __name__ == "__main__":
    main()
