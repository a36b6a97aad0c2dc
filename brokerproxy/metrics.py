"""Every metric brokerproxy exports, defined once, read from the Observer's plain counters at scrape time.

The hot path never calls prometheus_client: sessions bump ints and dicts on the ``Observer``, and
``ObserverCollector.collect()`` turns them into metric families when Prometheus scrapes. The names are a contract
(dashboards and alerts depend on them): ``METRICS`` is the one table, and the tests check the exposition, the
Grafana dashboard and the alert rules against it.

Two exposition formats, chosen by the scraper's ``Accept`` header as prometheus_client does (``render``): the
Prometheus text format 0.0.4, and OpenMetrics 1.0. One quirk of the contract: the gauge
``brokerproxy_client_connections`` and the counter ``brokerproxy_client_connections_total`` would be two families
of the same name in OpenMetrics (a counter family is named without ``_total``), which OpenMetrics parsers reject;
there the counter is exposed as an ``unknown``-typed family named ``brokerproxy_client_connections_total``, whose
sample has the same name and value (``rate()`` works on it as on any counter).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from .observe import Histogram, Observer


@dataclass(frozen=True, slots=True)
class Spec:
    name: str  # the exposed name; counters end in _total
    kind: str  # counter, gauge, histogram
    labels: tuple[str, ...]
    help: str


# ---------------------------------------------------------------------------------------------------- the table
# Per queue (label ``queue``: global_keyprefix and the priority suffix removed; ``other`` past the bound).
QUEUE_PUBLISHED = "brokerproxy_queue_messages_published_total"
QUEUE_REDELIVERED = "brokerproxy_queue_messages_redelivered_total"
QUEUE_CONSUMED = "brokerproxy_queue_messages_consumed_total"
QUEUE_DEPTH = "brokerproxy_queue_depth"
QUEUE_WAIT = "brokerproxy_queue_wait_seconds"
QUEUE_CONSUMERS = "brokerproxy_queue_consumers"
QUEUE_MESSAGE_BYTES = "brokerproxy_queue_message_bytes"
REQUEUED = "brokerproxy_messages_requeued_total"
REQUEUE_FAILURES = "brokerproxy_messages_requeue_failures_total"
# Per task.
TASKS_PUBLISHED = "brokerproxy_tasks_published_total"
TASK_RESULTS = "brokerproxy_task_results_total"
TASK_RUNTIME = "brokerproxy_task_runtime_seconds"
WORKERS_ONLINE = "brokerproxy_workers_online"
# The proxy itself.
CLIENT_CONNECTIONS = "brokerproxy_client_connections"
CLIENT_CONNECTIONS_TOTAL = "brokerproxy_client_connections_total"
COMMANDS = "brokerproxy_commands_total"
COMMAND_DURATION = "brokerproxy_command_duration_seconds"
CLIENT_BYTES = "brokerproxy_client_bytes_total"
UPSTREAM_CONNECTIONS = "brokerproxy_upstream_connections"
UPSTREAM_ERRORS = "brokerproxy_upstream_errors_total"
UPSTREAM_UP = "brokerproxy_upstream_up"
PROTOCOL_ERRORS = "brokerproxy_protocol_errors_total"
AUTH_FAILURES = "brokerproxy_auth_failures_total"
RELOAD_FAILURES = "brokerproxy_config_reload_failures_total"
ACL_DENIALS = "brokerproxy_acl_denials_total"
CLIENT_REJECTIONS = "brokerproxy_client_rejections_total"
AUDIT_DROPPED = "brokerproxy_audit_events_dropped_total"
REATTACHED = "brokerproxy_upstream_reattached_total"
REATTACH_FAILURES = "brokerproxy_upstream_reattach_failures_total"
REATTACH_RESETS = "brokerproxy_upstream_reattach_resets_total"
AUDIT_WRITTEN = "brokerproxy_audit_events_total"
OUTPUT_LIMIT_DISCONNECTS = "brokerproxy_client_output_limit_disconnects_total"
IDLE_DISCONNECTS = "brokerproxy_client_idle_disconnects_total"
TLS_HANDSHAKE_FAILURES = "brokerproxy_tls_handshake_failures_total"
TLS_RELOADS = "brokerproxy_tls_reloads_total"
TLS_CERT_EXPIRY = "brokerproxy_tls_certificate_expiry_timestamp_seconds"
BUILD_INFO = "brokerproxy_build_info"
# The observer's own bookkeeping.
PAIRS_DROPPED = "brokerproxy_observe_pairs_dropped_total"
PAIRS_PENDING = "brokerproxy_observe_pairs_pending"

METRICS: tuple[Spec, ...] = (
    Spec(QUEUE_PUBLISHED, "counter", ("queue",), "Messages pushed onto the queue (LPUSH/RPUSH of a kombu message)."),
    Spec(QUEUE_REDELIVERED, "counter", ("queue",), "Of the published messages, those re-pushed as redelivered."),
    Spec(QUEUE_CONSUMED, "counter", ("queue",), "Messages popped from the queue (BRPOP and the other pops)."),
    Spec(QUEUE_DEPTH, "gauge", ("queue",), "Messages in the queue, all priority sub-queues summed."),
    Spec(QUEUE_WAIT, "histogram", ("queue",), "Time from push to pop of the same message (by delivery_tag)."),
    Spec(QUEUE_CONSUMERS, "gauge", ("queue",), "Clients currently blocked in a pop on the queue."),
    Spec(QUEUE_MESSAGE_BYTES, "histogram", ("queue",), "Sizes of the messages published to the queue."),
    Spec(REQUEUED, "counter", ("queue",), "Popped messages the proxy put back because their client had gone."),
    Spec(REQUEUE_FAILURES, "counter", (), "Popped messages the proxy could not put back (each one is logged)."),
    Spec(TASKS_PUBLISHED, "counter", ("task", "queue"), "Celery task messages published, by task name and queue."),
    Spec(TASK_RESULTS, "counter", ("task", "state"), "Task results written to the result backend, by state."),
    Spec(TASK_RUNTIME, "histogram", ("task",), "Time from a task's pop (or STARTED) to its result."),
    Spec(WORKERS_ONLINE, "gauge", (), "Celery workers whose heartbeat events arrive through this process."),
    Spec(CLIENT_CONNECTIONS, "gauge", ("listener",), "Client connections open."),
    Spec(CLIENT_CONNECTIONS_TOTAL, "counter", ("listener",), "Client connections accepted."),
    Spec(COMMANDS, "counter", ("command", "outcome"), "Commands by outcome: ok, error (from Redis), denied."),
    Spec(COMMAND_DURATION, "histogram", ("command",), "Upstream round trip per command, blocking commands excluded."),
    Spec(CLIENT_BYTES, "counter", ("direction",), "Bytes from clients (in) and to clients (out)."),
    Spec(UPSTREAM_CONNECTIONS, "gauge", (), "Connections to Redis open."),
    Spec(UPSTREAM_ERRORS, "counter", ("reason",), "Failures of connections to Redis, by reason."),
    Spec(UPSTREAM_UP, "gauge", (), "1 while Redis answers, else 0."),
    Spec(PROTOCOL_ERRORS, "counter", ("side",), "Protocol violations, by the side that sent them."),
    Spec(AUTH_FAILURES, "counter", (), "Failed client authentications."),
    Spec(RELOAD_FAILURES, "counter", (), "SIGHUP reloads refused (the old users and rules stay)."),
    Spec(ACL_DENIALS, "counter", ("user", "kind"), "Commands the ACL refused, by user and what was refused."),
    Spec(REATTACHED, "counter", ("state",), "Client connections carried over to a new upstream connection."),
    Spec(
        REATTACH_FAILURES, "counter", ("reason",),
        "Client connections closed when their upstream died, by what they held (pending, multi, subscribed...).",
    ),
    Spec(
        REATTACH_RESETS, "counter", ("state",),
        "Carried-over subscribed or blocked-pop connections closed after an outage that cut a transaction of the same "
        "host and user (a kombu ack), so that the kombu consumer restarts (reattach_reset_consumers).",
    ),
    Spec(AUDIT_WRITTEN, "counter", (), "Audit trail events written."),
    Spec(AUDIT_DROPPED, "counter", (), "Audit trail events lost to write errors (disk full, unwritable path)."),
    Spec(CLIENT_REJECTIONS, "counter", ("reason",), "Connections turned away: max_clients reached."),
    Spec(
        OUTPUT_LIMIT_DISCONNECTS, "counter", ("class",),
        "Clients disconnected for an output buffer over client_output_buffer_limit (normal or pubsub).",
    ),
    Spec(IDLE_DISCONNECTS, "counter", (), "Clients closed after idle_timeout seconds without a request."),
    Spec(
        TLS_HANDSHAKE_FAILURES, "counter", ("listener", "reason"),
        "TLS handshakes that failed: no_certificate, unknown_ca, expired, protocol_version, not_tls, timeout, closed, "
        "other; plaintext_port counts TLS clients on the plaintext listener.",
    ),
    Spec(TLS_RELOADS, "counter", ("listener", "result"), "Certificate reloads (SIGHUP, files changed): ok or failed."),
    Spec(
        TLS_CERT_EXPIRY, "gauge", ("listener", "role"),
        "notAfter of every certificate the proxy holds, Unix seconds (role: server, client, ca = the earliest CA).",
    ),
    Spec(BUILD_INFO, "gauge", ("version",), "Always 1; the version is the label."),
    Spec(PAIRS_DROPPED, "counter", ("map",), "Pairing entries dropped for age or size (delivery_tag, task_id)."),
    Spec(PAIRS_PENDING, "gauge", ("map",), "Pairing entries held (delivery_tag, task_id)."),
)
SPECS = {s.name: s for s in METRICS}


def _family(spec: Spec) -> Metric:
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    if spec.kind == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
    return HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)


#: How prometheus_client writes an ``le`` bound (its own function, typed).
_le: Callable[[float], str] = floatToGoString


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    """Cumulative buckets in the form HistogramMetricFamily takes."""
    out: list[tuple[str, float]] = []
    acc = 0
    counts = h.counts
    for bound, count in zip(h.bounds, counts, strict=False):
        acc += count
        out.append((_le(bound), acc))
    out.append(("+Inf", acc + counts[-1]))
    return out


class ObserverCollector(Collector):
    """Exports an Observer's counters. Register it on the registry the HTTP endpoint serves."""

    def __init__(self, observer: Observer, version: str = __version__) -> None:
        self.observer = observer
        self.version = version

    def describe(self) -> Iterable[Metric]:
        return [_family(spec) for spec in METRICS]

    def collect(self) -> Iterable[Metric]:
        o = self.observer
        f = {spec.name: _family(spec) for spec in METRICS}

        def add(name: str, labels: list[str], value: float) -> None:
            f[name].add_metric(labels, value)  # type: ignore[attr-defined]

        def hist(name: str, labels: list[str], h: Histogram) -> None:
            if any(h.counts):
                f[name].add_metric(labels, _buckets(h), h.sum)  # type: ignore[attr-defined]

        depths = o.depths()
        for q in list(o.queues.values()):
            label = [q.name]
            add(QUEUE_PUBLISHED, label, q.published)
            add(QUEUE_REDELIVERED, label, q.redelivered)
            add(QUEUE_CONSUMED, label, q.consumed)
            add(QUEUE_CONSUMERS, label, q.consumers)
            add(REQUEUED, label, q.requeued)
            if q.name in depths:
                add(QUEUE_DEPTH, label, depths[q.name])
            hist(QUEUE_WAIT, label, q.wait)
            hist(QUEUE_MESSAGE_BYTES, label, q.sizes)
        add(REQUEUE_FAILURES, [], o.requeue_failures)

        for t in list(o.tasks.values()):
            for queue, n in list(t.published.items()):
                add(TASKS_PUBLISHED, [t.name, queue], n)
            for state, n in list(t.results.items()):
                add(TASK_RESULTS, [t.name, state], n)
            hist(TASK_RUNTIME, [t.name], t.runtime)
        add(WORKERS_ONLINE, [], o.workers_online())

        for listener, n in list(o.client_connections.items()):
            add(CLIENT_CONNECTIONS, [listener], n)
        for listener, n in list(o.client_connections_total.items()):
            add(CLIENT_CONNECTIONS_TOTAL, [listener], n)
        for (command, outcome), n in list(o.commands.items()):
            add(COMMANDS, [command, outcome], n)
        for command, h in list(o.command_duration.items()):
            hist(COMMAND_DURATION, [command], h)
        add(CLIENT_BYTES, ["in"], o.bytes_in)
        add(CLIENT_BYTES, ["out"], o.bytes_out)
        add(UPSTREAM_CONNECTIONS, [], o.upstream_connections)
        for reason, n in list(o.upstream_errors.items()):
            add(UPSTREAM_ERRORS, [reason], n)
        add(UPSTREAM_UP, [], o.upstream_up)
        for side, n in list(o.protocol_errors.items()):
            add(PROTOCOL_ERRORS, [side], n)
        add(AUTH_FAILURES, [], o.auth_failures)
        add(RELOAD_FAILURES, [], o.reload_failures)
        for (user, kind), n in list(o.acl_denials.items()):
            add(ACL_DENIALS, [user, kind], n)
        for state, n in list(o.reattached_total.items()):
            add(REATTACHED, [state], n)
        for reason, n in list(o.reattach_failures.items()):
            add(REATTACH_FAILURES, [reason], n)
        for state, n in list(o.reattach_resets.items()):
            add(REATTACH_RESETS, [state], n)
        add(AUDIT_WRITTEN, [], o.audit_written)
        add(AUDIT_DROPPED, [], o.audit_dropped)
        for reason, n in list(o.client_rejections.items()):
            add(CLIENT_REJECTIONS, [reason], n)
        for kind, n in list(o.output_limit_disconnects.items()):
            add(OUTPUT_LIMIT_DISCONNECTS, [kind], n)
        add(IDLE_DISCONNECTS, [], o.idle_disconnects)
        for (listener, reason), n in list(o.tls_handshake_failures.items()):
            add(TLS_HANDSHAKE_FAILURES, [listener, reason], n)
        for (listener, result), n in list(o.tls_reloads.items()):
            add(TLS_RELOADS, [listener, result], n)
        for (listener, role), not_after in list(o.tls_expiry.items()):
            add(TLS_CERT_EXPIRY, [listener, role], not_after)
        add(BUILD_INFO, [self.version], 1)

        for name, n in list(o.dropped.items()):
            add(PAIRS_DROPPED, [name], n)
        add(PAIRS_PENDING, ["delivery_tag"], o.pending_messages)
        add(PAIRS_PENDING, ["task_id"], o.pending_tasks)
        return f.values()


def build_registry(
    observer: Observer, registry: CollectorRegistry | None = None, *, process_metrics: bool = True
) -> CollectorRegistry:
    """A registry (the one given, or a new one) with the observer's collector on it, and prometheus_client's
    ``process_*`` collector (CPU, memory, open files; it reads /proc at scrape time) unless told otherwise."""
    registry = registry if registry is not None else CollectorRegistry()
    registry.register(ObserverCollector(observer))
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry


class _OpenMetricsView:
    """The registry as OpenMetrics must see it: the ``_total`` counter whose family name a gauge already has
    becomes an ``unknown`` family under its full name (see the module docstring)."""

    _CLASHES = frozenset({CLIENT_CONNECTIONS_TOTAL[: -len("_total")]})

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.type == "counter" and family.name in self._CLASHES:
                renamed = UnknownMetricFamily(family.name + "_total", family.documentation)
                renamed.samples = [s for s in family.samples if s.name.endswith("_total")]
                yield renamed
            else:
                yield family


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition the ``Accept`` header asks for (OpenMetrics, else the text format): (body, content type)."""
    encoder, content_type = choose_encoder(accept or "")
    if content_type.startswith("application/openmetrics-text"):
        return encoder(_OpenMetricsView(registry)), content_type
    return encoder(registry), content_type


__all__ = [
    "METRICS",
    "SPECS",
    "ObserverCollector",
    "Spec",
    "build_registry",
    "render",
]
