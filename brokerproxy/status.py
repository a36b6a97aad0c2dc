"""The status page's numbers: one JSON-ready dict built from the Observer and a few facts about the server.

Theory of operation
-------------------
``/api/status`` (``endpoints.py``) returns ``StatusBoard.snapshot()``, the status page (``status_page.html``) and
``brokerproxy status`` read it. Every number comes from the same ``Observer`` fields that ``metrics.py`` exports, so
the page and ``/metrics`` never disagree: counts are the counters themselves, depth is ``Observer.depths()``, and the
wait and runtime quantiles are computed from the same histogram buckets the way Prometheus's ``histogram_quantile``
computes them (linear interpolation inside the bucket the rank falls in).

Rates are differences of counters over time, so the board keeps a short history: every ``SAMPLE_INTERVAL`` seconds
(the endpoint's timer calls ``sample()``) it records each queue's published and consumed counters and its depth, in a
ring of ``HISTORY_SAMPLES`` samples (five minutes). The table's rates span the last ``RATE_WINDOW`` seconds; the
charts' rates span one sample interval each. The page asks for the samples newer than the last one it holds
(``?since=<seq>``); ``?history=0`` leaves them out (the terminal summary).

The wait and runtime quantiles cover everything this process has seen since it started (the histograms are
cumulative; the Grafana dashboard has windowed ones from ``rate()``).

Sans-IO: no asyncio, sockets or prometheus_client; the clocks are injected.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from . import __version__
from .config import Config
from .observe import OTHER, RESULT_STATES, Histogram, Observer

#: Seconds between history samples; the page refreshes on the same beat.
SAMPLE_INTERVAL: Final = 2.0
#: Samples kept: five minutes at SAMPLE_INTERVAL. Each holds three ints per queue label (at most max_queues + 1).
HISTORY_SAMPLES: Final = 150
#: The table's publish and consume rates span about this many seconds.
RATE_WINDOW: Final = 10.0
#: No rate over a shorter span than this (right after start-up the first sample is too close to tell).
MIN_RATE_SPAN: Final = 1.0
#: Task result states in the order the page shows them; anything else is counted under ``other`` by the observer.
STATES: Final = (*RESULT_STATES, OTHER)


def histogram_quantile(q: float, h: Histogram) -> float | None:
    """The q-quantile of a histogram as Prometheus's ``histogram_quantile`` estimates it from the exported buckets;
    None when it holds no observation. A rank in the ``+Inf`` bucket gives the highest finite bound."""
    total = sum(h.counts)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for i, bound in enumerate(h.bounds):
        count = h.counts[i]
        if below + count >= rank:
            if i == 0 and bound <= 0:
                return bound
            start = 0.0 if i == 0 else h.bounds[i - 1]
            if count == 0:
                return start
            return start + (bound - start) * ((rank - below) / count)
        below += count
    return h.bounds[-1]


@dataclass(frozen=True, slots=True)
class Sample:
    """Each queue's (published, consumed, depth or -1) at one moment of the board's clock."""

    seq: int
    t: float
    queues: dict[str, tuple[int, int, int]]


def take_sample(observer: Observer, seq: int, t: float) -> Sample:
    depths = observer.depths()
    return Sample(
        seq,
        t,
        {q.name: (q.published, q.consumed, depths.get(q.name, -1)) for q in list(observer.queues.values())},
    )


class History:
    """The last ``capacity`` samples, oldest first."""

    def __init__(self, capacity: int = HISTORY_SAMPLES) -> None:
        self.samples: deque[Sample] = deque(maxlen=capacity)
        self._seq = 0

    def add(self, observer: Observer, t: float) -> Sample:
        self._seq += 1
        sample = take_sample(observer, self._seq, t)
        self.samples.append(sample)
        return sample

    def reference(self, now: float, window: float = RATE_WINDOW) -> Sample | None:
        """The sample to measure rates from at ``now``: the newest one at least ``window`` old, else the oldest
        one if it is at least MIN_RATE_SPAN old, else None."""
        best: Sample | None = None
        for s in reversed(self.samples):
            if now - s.t >= window:
                return s
            best = s
        if best is not None and now - best.t >= MIN_RATE_SPAN:
            return best
        return None


def _rate(now: int, then: int, span: float) -> float:
    return round(max(0, now - then) / span, 3)


@dataclass(frozen=True, slots=True)
class Client:
    """One open client connection as the page lists it."""

    user: str | None
    listener: str


@dataclass(frozen=True, slots=True)
class Facts:
    """What the status needs from the server besides the Observer."""

    upstream: str  # the upstream's address as Upstream.__str__ writes it (never the password)
    ready: bool
    reason: str
    draining: bool
    clients: tuple[Client, ...]
    uptime: float
    depth_poll_interval: float
    version: str = __version__


def _quantiles(h: Histogram) -> dict[str, Any]:
    return {
        "count": sum(h.counts),
        "sum": h.sum,
        "p50": histogram_quantile(0.5, h),
        "p95": histogram_quantile(0.95, h),
    }


def _queue_order(name: str) -> tuple[bool, str]:
    return (name == OTHER, name)


def build(
    observer: Observer,
    facts: Facts,
    history: History | None = None,
    *,
    now: float,
    wall: float,
    since: int | None = 0,
) -> dict[str, Any]:
    """The status as a JSON-ready dict. ``now``: the history's clock; ``wall``: Unix time, for display. ``since``:
    include the history samples whose ``seq`` is greater (0: all of them; None: none)."""
    o = observer
    depths = o.depths()
    ref = history.reference(now) if history is not None else None
    span = now - ref.t if ref is not None else 0.0

    queues: list[dict[str, Any]] = []
    for q in sorted(list(o.queues.values()), key=lambda q: _queue_order(q.name)):
        before = ref.queues.get(q.name, (0, 0, -1)) if ref is not None else None
        queues.append(
            {
                "name": q.name,
                "depth": depths.get(q.name),
                "published": q.published,
                "consumed": q.consumed,
                "redelivered": q.redelivered,
                "requeued": q.requeued,
                "consumers": q.consumers,
                "publish_rate": _rate(q.published, before[0], span) if before is not None else None,
                "consume_rate": _rate(q.consumed, before[1], span) if before is not None else None,
                "wait": _quantiles(q.wait),
            }
        )

    tasks: list[dict[str, Any]] = []
    for t in sorted(list(o.tasks.values()), key=lambda t: t.name):
        tasks.append(
            {
                "name": t.name,
                "published": sum(t.published.values()),
                "published_by_queue": dict(sorted(t.published.items())),
                "results": {state: t.results[state] for state in STATES if t.results.get(state)},
                "runtime": _quantiles(t.runtime),
            }
        )

    groups: dict[tuple[str | None, str], int] = {}
    for c in facts.clients:
        groups[(c.user, c.listener)] = groups.get((c.user, c.listener), 0) + 1
    clients = [
        {"user": user, "listener": listener, "count": n}
        for (user, listener), n in sorted(groups.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or "", kv[0][1]))
    ]

    outcomes = dict.fromkeys(("ok", "error", "denied"), 0)
    for (_, outcome), n in list(o.commands.items()):
        outcomes[outcome] = outcomes.get(outcome, 0) + n

    out: dict[str, Any] = {
        "version": facts.version,
        "time": wall,
        "uptime": round(facts.uptime, 3),
        "upstream": {
            "address": facts.upstream,
            "up": bool(o.upstream_up),
            "ready": facts.ready,
            "reason": facts.reason,
            "draining": facts.draining,
            "connections": o.upstream_connections,
            "errors": dict(sorted(o.upstream_errors.items())),
            "poll_interval": facts.depth_poll_interval,
        },
        "queues": queues,
        "rate_window": round(span, 3) if ref is not None else None,
        "tasks": tasks,
        "workers_online": o.workers_online(),
        "connections": {
            "open": sum(o.client_connections.values()),
            "by_listener": dict(sorted(o.client_connections.items())),
            "accepted_by_listener": dict(sorted(o.client_connections_total.items())),
            "clients": clients,
        },
        "security": {
            "auth_failures": o.auth_failures,
            "acl_denials": [
                {"user": user, "kind": kind, "count": n} for (user, kind), n in sorted(list(o.acl_denials.items()))
            ],
            "acl_denials_total": sum(list(o.acl_denials.values())),
            "protocol_errors": dict(sorted(o.protocol_errors.items())),
            "reload_failures": o.reload_failures,
        },
        "commands": outcomes,
        "bytes": {"in": o.bytes_in, "out": o.bytes_out},
        "messages": {
            "requeued": sum(q.requeued for q in list(o.queues.values())),
            "requeue_failures": o.requeue_failures,
        },
    }
    if history is not None and since is not None:
        out["history"] = history_json(history, since, now)
    return out


def history_json(history: History, since: int, now: float) -> dict[str, Any]:
    """The samples newer than ``since``: their age in seconds (``t``, negative: before ``now``) and per queue
    ``[depth or null, publish rate, consume rate]`` (rates over the interval since the sample before, null for the
    first sample)."""
    out: list[dict[str, Any]] = []
    prev: Sample | None = None
    for s in history.samples:
        if s.seq > since:
            queues: dict[str, list[float | int | None]] = {}
            for name, (published, consumed, depth) in s.queues.items():
                row: list[float | int | None] = [depth if depth >= 0 else None, None, None]
                if prev is not None and s.t > prev.t:
                    p0, c0, _ = prev.queues.get(name, (0, 0, -1))
                    row[1] = _rate(published, p0, s.t - prev.t)
                    row[2] = _rate(consumed, c0, s.t - prev.t)
                queues[name] = row
            out.append({"seq": s.seq, "t": round(s.t - now, 3), "queues": queues})
        prev = s
    last = history.samples[-1].seq if history.samples else 0
    return {"interval": SAMPLE_INTERVAL, "capacity": history.samples.maxlen, "last": last, "samples": out}


# ------------------------------------------------------------------------------------------ the server's side


class _Connection(Protocol):
    @property
    def user(self) -> str | None: ...


class ServerView(Protocol):
    """What the board reads from ``server.Server`` (structurally; this module does not import it)."""

    config: Config
    observer: Observer
    draining: bool

    def ready(self) -> tuple[bool, str]: ...

    @property
    def open_connections(self) -> Iterable[_Connection]: ...


class StatusBoard:
    """The server's status source for ``/api/status``: its history, and the facts read from the server."""

    interval = SAMPLE_INTERVAL

    def __init__(
        self,
        server: ServerView,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        capacity: int = HISTORY_SAMPLES,
    ) -> None:
        self.server = server
        self._clock = clock
        self._wall = wall
        self._started = clock()
        self.history = History(capacity)

    def sample(self) -> None:
        """Record one history sample (the endpoint calls this every ``interval`` seconds)."""
        self.history.add(self.server.observer, self._clock() - self._started)

    def facts(self) -> Facts:
        s = self.server
        try:
            ready, reason = s.ready()
        except Exception as exc:  # as /readyz: a failing check means not ready
            ready, reason = False, f"readiness check failed: {exc!r}"
        clients = tuple(Client(conn.user, str(getattr(conn, "listener", "main"))) for conn in list(s.open_connections))
        return Facts(
            upstream=str(s.config.upstream),
            ready=ready,
            reason=reason,
            draining=s.draining,
            clients=clients,
            uptime=self._clock() - self._started,
            depth_poll_interval=s.config.metrics.depth_poll_interval,
        )

    def snapshot(self, query: Mapping[str, str] | None = None) -> dict[str, Any]:
        """``/api/status``: ``?since=<seq>`` for the samples after ``seq`` only, ``?history=0`` for none."""
        query = query or {}
        since: int | None = 0
        if query.get("history") in ("0", "false", "no"):
            since = None
        elif "since" in query:
            try:
                since = max(0, int(query["since"]))
            except ValueError:
                since = 0
        return build(
            self.server.observer,
            self.facts(),
            self.history,
            now=self._clock() - self._started,
            wall=self._wall(),
            since=since,
        )


__all__ = [
    "HISTORY_SAMPLES",
    "RATE_WINDOW",
    "SAMPLE_INTERVAL",
    "Client",
    "Facts",
    "History",
    "ServerView",
    "StatusBoard",
    "build",
    "histogram_quantile",
]
