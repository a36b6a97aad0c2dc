"""The metrics of ``--workers`` processes as one: parse each worker's exposition, merge, and read the sums back.

Theory of operation
-------------------
Every worker serves its own ``/metrics`` on a private loopback port; the supervisor (``supervisor.py``) scrapes them
all, hands each exposition to ``parse``, and serves ``merge`` of the lot on ``metrics_listen``. A series (a sample
name and its labels) is the sum over the workers that export it, except where a sum means nothing (``COMBINE``):

=========================================================  =====  ===================================================
``brokerproxy_queue_depth``                                max    every worker polls ``LLEN`` of the same Redis, so
                                                                  each one's figure is the whole queue; between polls
                                                                  each moves with the pushes and pops it saw itself,
                                                                  and the max errs high by at most what was consumed
                                                                  since the last poll
``brokerproxy_upstream_up``                                min    1 only while every worker reaches Redis: a worker
                                                                  that cannot is failing its clients (alert on it)
``brokerproxy_build_info``                                 max    one series per version, 1
``brokerproxy_tls_certificate_expiry_timestamp_seconds``   min    the same files; a worker whose reload failed holds
                                                                  the older certificate, the one to alert on
``process_start_time_seconds``                             min    the oldest process of the group
``process_max_fds``                                        max    a per-process limit, not a total
=========================================================  =====  ===================================================

Everything else adds up: counters; gauges (connections open, consumers blocked, Celery workers online, since each
Celery worker's events arrive on one connection, hence through one worker); histograms bucket by bucket (``_bucket``
per ``le``, ``_sum``, ``_count``: every worker has the same bounds).

Counters across a restart. A worker that dies takes its counters with it, and a sum that drops reads as a counter
reset to Prometheus: ``rate()`` would count the survivors' whole totals again. So the supervisor keeps every worker's
last scrape and, when a worker exits, ``Retired.add`` keeps that scrape's counters and histograms, which every later
``merge`` adds in: the sums never go down. What the worker counted after its last scrape is lost (the supervisor
scrapes every ``status.SAMPLE_INTERVAL`` seconds and at every request). A dead worker's gauges go with it.

``observer`` reads merged families back into an ``Observer`` whose fields hold the sums, so that ``status.build``
makes the status page of the whole group from the numbers ``/metrics`` shows.

Label bounds (``max_queues``, ``max_tasks``) hold per worker: past the bound, workers that met the queues in another
order may give different ones their own label, so the merge can hold up to ``workers * (max_queues + 1)`` series.

No IO here: text in, families out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from . import metrics as m
from .observe import Histogram, Observer, QueueStats, TaskStats

LabelSet = tuple[tuple[str, str], ...]
#: A sample: its name (``…_total``, ``…_bucket``) and its labels, sorted.
SampleKey = tuple[str, LabelSet]
#: A family: its name as the parser gives it (a counter's without ``_total``) and its type. The type is part of the
#: key because ``brokerproxy_client_connections`` is both a gauge and (``_total``) a counter family.
FamilyKey = tuple[str, str]

WORKERS: Final = "brokerproxy_workers"
WORKER_RESTARTS: Final = "brokerproxy_worker_restarts_total"
#: The supervisor's own series, added to the merge (``supervisor_families``).
SUPERVISOR_METRICS: Final = (
    m.Spec(WORKERS, "gauge", (), "Worker processes running (--workers); fewer than configured while one restarts."),
    m.Spec(WORKER_RESTARTS, "counter", (), "Worker processes the supervisor started again after one exited."),
)


def _add(a: float, b: float) -> float:
    return a + b


#: How two workers' values of one series combine, by family name; anything not listed adds up.
COMBINE: Final[Mapping[str, Callable[[float, float], float]]] = {
    m.QUEUE_DEPTH: max,
    m.UPSTREAM_UP: min,
    m.BUILD_INFO: max,
    m.TLS_CERT_EXPIRY: min,
    "process_start_time_seconds": min,
    "process_max_fds": max,
}
#: Family types whose series only grow while their process lives: kept after it exits (``Retired``).
CUMULATIVE: Final = frozenset({"counter", "histogram"})


@dataclass
class Family:
    name: str
    type: str
    documentation: str
    samples: dict[SampleKey, float] = field(default_factory=dict)

    def copy(self) -> Family:
        return Family(self.name, self.type, self.documentation, dict(self.samples))


Families = dict[FamilyKey, Family]


def parse(text: str) -> Families:
    """One worker's exposition (the Prometheus text format) as families. Raises ValueError when it is not one."""
    out: Families = {}
    for metric in text_string_to_metric_families(text):
        key = (metric.name, metric.type)
        family = out.get(key)
        if family is None:
            family = out[key] = Family(metric.name, metric.type, metric.documentation)
        for s in metric.samples:
            family.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def merge(sources: Iterable[Families]) -> Families:
    """The group's families: each series combined over the sources that have it (``COMBINE``, else the sum), in the
    order the sources list them."""
    out: Families = {}
    for source in sources:
        for key, family in source.items():
            into = out.get(key)
            if into is None:
                out[key] = family.copy()
                continue
            combine = COMBINE.get(family.name, _add)
            samples = into.samples
            for sample, value in family.samples.items():
                samples[sample] = combine(samples[sample], value) if sample in samples else value
    return out


class Retired:
    """The counters and histograms of workers that have exited, as their last scrape had them (see the module
    docstring): added to every merge, so that the group's counters never go down."""

    def __init__(self) -> None:
        self.families: Families = {}

    def add(self, families: Families) -> None:
        self.families = merge([self.families, {k: f for k, f in families.items() if f.type in CUMULATIVE}])


def supervisor_families(running: int, restarts: int) -> Families:
    """``brokerproxy_workers`` and ``brokerproxy_worker_restarts_total``."""
    workers, restarted = SUPERVISOR_METRICS
    return {
        (WORKERS, "gauge"): Family(WORKERS, "gauge", workers.help, {(WORKERS, ()): float(running)}),
        (WORKER_RESTARTS[: -len("_total")], "counter"): Family(
            WORKER_RESTARTS[: -len("_total")], "counter", restarted.help, {(WORKER_RESTARTS, ()): float(restarts)}
        ),
    }


class FamiliesCollector(Collector):
    """Families as prometheus_client metrics, to put on the registry the endpoint renders (``metrics.render``, so
    OpenMetrics and the text format come out as a single process writes them)."""

    def __init__(self, families: Callable[[], Families]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        out: list[Metric] = []
        for family in self._families().values():
            metric = Metric(family.name, family.documentation, family.type)
            for (name, labels), value in family.samples.items():
                metric.add_sample(name, dict(labels), value)
            out.append(metric)
        return out


# ---------------------------------------------------------------------------------------------------- as an Observer


class MergedObserver(Observer):
    """An Observer holding a group's sums: what it would compute from traffic (depth, Celery workers online, the
    pairing maps' sizes) is given instead. Only read it; it observes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.merged_depths: dict[str, int] = {}
        self.merged_workers_online = 0
        self.merged_pending: dict[str, int] = {"delivery_tag": 0, "task_id": 0}

    def depths(self) -> dict[str, int]:
        return dict(self.merged_depths)

    def workers_online(self) -> int:
        return self.merged_workers_online

    @property
    def pending_messages(self) -> int:
        return self.merged_pending.get("delivery_tag", 0)

    @property
    def pending_tasks(self) -> int:
        return self.merged_pending.get("task_id", 0)


def _family_key(name: str) -> FamilyKey:
    kind = m.SPECS[name].kind
    return (name[: -len("_total")], kind) if kind == "counter" else (name, kind)


def _series(families: Families, name: str) -> list[tuple[dict[str, str], float]]:
    """The (labels, value) of every sample of the metric ``name`` (a histogram's: none; see ``_histograms``)."""
    family = families.get(_family_key(name))
    if family is None:
        return []
    return [(dict(labels), value) for (_, labels), value in family.samples.items()]


def _histograms(families: Families, name: str) -> list[tuple[dict[str, str], Histogram]]:
    """Every series of the histogram ``name`` as a (non-cumulative) Histogram, labels without ``le``."""
    family = families.get((name, "histogram"))
    if family is None:
        return []
    buckets: dict[LabelSet, list[tuple[float, float]]] = {}
    sums: dict[LabelSet, float] = {}
    for (sample, labels), value in family.samples.items():
        if sample == name + "_bucket":
            rest = tuple((k, v) for k, v in labels if k != "le")
            le = dict(labels).get("le", "+Inf")
            buckets.setdefault(rest, []).append((float(le), value))
        elif sample == name + "_sum":
            sums[labels] = value
    out: list[tuple[dict[str, str], Histogram]] = []
    for labels, cumulative in buckets.items():
        cumulative.sort()
        h = Histogram(tuple(b for b, _ in cumulative if b != float("inf")))
        below = 0.0
        for i, (_, count) in enumerate(cumulative[: len(h.counts)]):
            h.counts[i] = int(count - below)
            below = count
        h.sum = sums.get(labels, 0.0)
        out.append((dict(labels), h))
    return out


def observer(families: Families) -> MergedObserver:
    """The merged families read back into an Observer (for ``status.build``; ``metrics.ObserverCollector`` exports
    it as the same series)."""
    o = MergedObserver()

    def queue(name: str) -> QueueStats:
        q = o.queues.get(name)
        if q is None:
            q = o.queues[name] = QueueStats(name)
        return q

    def task(name: str) -> TaskStats:
        t = o.tasks.get(name)
        if t is None:
            t = o.tasks[name] = TaskStats(name)
        return t

    for labels, v in _series(families, m.QUEUE_PUBLISHED):
        queue(labels["queue"]).published = int(v)
    for labels, v in _series(families, m.QUEUE_REDELIVERED):
        queue(labels["queue"]).redelivered = int(v)
    for labels, v in _series(families, m.QUEUE_CONSUMED):
        queue(labels["queue"]).consumed = int(v)
    for labels, v in _series(families, m.QUEUE_CONSUMERS):
        queue(labels["queue"]).consumers = int(v)
    for labels, v in _series(families, m.REQUEUED):
        queue(labels["queue"]).requeued = int(v)
    for labels, v in _series(families, m.QUEUE_DEPTH):
        o.merged_depths[labels["queue"]] = int(v)
    for labels, h in _histograms(families, m.QUEUE_WAIT):
        queue(labels["queue"]).wait = h
    for labels, h in _histograms(families, m.QUEUE_MESSAGE_BYTES):
        queue(labels["queue"]).sizes = h
    for _, v in _series(families, m.REQUEUE_FAILURES):
        o.requeue_failures = int(v)

    for labels, v in _series(families, m.TASKS_PUBLISHED):
        task(labels["task"]).published[labels["queue"]] = int(v)
    for labels, v in _series(families, m.TASK_RESULTS):
        task(labels["task"]).results[labels["state"]] = int(v)
    for labels, h in _histograms(families, m.TASK_RUNTIME):
        task(labels["task"]).runtime = h
    for _, v in _series(families, m.WORKERS_ONLINE):
        o.merged_workers_online = int(v)

    o.client_connections = {labels["listener"]: int(v) for labels, v in _series(families, m.CLIENT_CONNECTIONS)}
    o.client_connections_total = {
        labels["listener"]: int(v) for labels, v in _series(families, m.CLIENT_CONNECTIONS_TOTAL)
    }
    o.commands = {(labels["command"], labels["outcome"]): int(v) for labels, v in _series(families, m.COMMANDS)}
    o.command_duration = {labels["command"]: h for labels, h in _histograms(families, m.COMMAND_DURATION)}
    for labels, v in _series(families, m.CLIENT_BYTES):
        if labels.get("direction") == "in":
            o.bytes_in = int(v)
        elif labels.get("direction") == "out":
            o.bytes_out = int(v)
    for _, v in _series(families, m.UPSTREAM_CONNECTIONS):
        o.upstream_connections = int(v)
    o.upstream_errors = {labels["reason"]: int(v) for labels, v in _series(families, m.UPSTREAM_ERRORS)}
    for _, v in _series(families, m.UPSTREAM_UP):
        o.upstream_up = int(v)
    o.protocol_errors.update({labels["side"]: int(v) for labels, v in _series(families, m.PROTOCOL_ERRORS)})
    for _, v in _series(families, m.AUTH_FAILURES):
        o.auth_failures = int(v)
    for _, v in _series(families, m.RELOAD_FAILURES):
        o.reload_failures = int(v)
    o.acl_denials = {(labels["user"], labels["kind"]): int(v) for labels, v in _series(families, m.ACL_DENIALS)}
    o.tls_handshake_failures = {
        (labels["listener"], labels["reason"]): int(v) for labels, v in _series(families, m.TLS_HANDSHAKE_FAILURES)
    }
    o.tls_reloads = {(labels["listener"], labels["result"]): int(v) for labels, v in _series(families, m.TLS_RELOADS)}
    o.tls_expiry = {(labels["listener"], labels["role"]): v for labels, v in _series(families, m.TLS_CERT_EXPIRY)}
    o.dropped.update({labels["map"]: int(v) for labels, v in _series(families, m.PAIRS_DROPPED)})
    o.merged_pending.update({labels["map"]: int(v) for labels, v in _series(families, m.PAIRS_PENDING)})
    return o


def exposition_families(sources: Sequence[Families], retired: Retired, supervisor: Families) -> Families:
    """What the supervisor's ``/metrics`` serves: the live workers' last scrapes, the retired counters, and the
    supervisor's own series (its ``process_*`` and ``supervisor_families``)."""
    return merge([*sources, retired.families, supervisor])


__all__ = [
    "COMBINE",
    "SUPERVISOR_METRICS",
    "WORKERS",
    "WORKER_RESTARTS",
    "Families",
    "FamiliesCollector",
    "Family",
    "MergedObserver",
    "Retired",
    "exposition_families",
    "merge",
    "observer",
    "parse",
    "supervisor_families",
]
