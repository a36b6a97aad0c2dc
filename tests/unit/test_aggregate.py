"""aggregate.py: the metrics of --workers processes merged into one exposition and one status, and the setting.

The sources are real Observers (fed kombu traffic by ``busy_observer`` and by hand) rendered by metrics.py exactly as
a worker serves them; what the merge must give is computed here from prometheus_client's own parse of each source.
"""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from brokerproxy import aggregate, config, metrics, status, supervisor
from brokerproxy.errors import ConfigError
from brokerproxy.observe import Observer
from tests.unit.test_metrics import busy_observer, message

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def exposition(o: Observer, *, process_metrics: bool = False, accept: str | None = None) -> bytes:
    body, _ = metrics.render(metrics.build_registry(o, process_metrics=process_metrics), accept)
    return body


def render(families: aggregate.Families, accept: str | None = None) -> bytes:
    registry = CollectorRegistry()
    registry.register(aggregate.FamiliesCollector(lambda: families))
    body, _ = metrics.render(registry, accept)
    return body


def samples(text: bytes) -> Samples:
    out: Samples = {}
    for family in parse_text(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def second_observer() -> Observer:
    """Another worker: the same traffic as busy_observer and more, a queue of its own, a TLS listener, Redis down."""
    o = busy_observer()
    for i in range(4):
        msg = message("app.mul", str(uuid.uuid4()), str(uuid.uuid4()))
        o.on_request([b"RPUSH", b"high", msg], False)
        o.on_reply([b"RPUSH", b"high", msg], b":%d\r\n" % (i + 1))
    o.set_depth(b"celery\x06\x163", 7)  # a later poll than the other worker's
    o.connection_opened("tls")
    o.connection_opened("main")
    o.command("get", "ok")
    o.command("set", "error")
    o.observe_command_duration("get", 0.02)
    o.observe_command_duration("get", 3.0)
    o.upstream_up = 0
    o.tls_expiry[("tls", "server")] = 1_900_000_000.0
    o.tls_handshake_failed("tls", "unknown_ca")
    return o


def first_observer() -> Observer:
    o = busy_observer()
    o.tls_expiry[("tls", "server")] = 2_000_000_000.0
    return o


#: The rule the merge must follow, written out again here: these series are not summed.
NOT_SUMMED = {
    "brokerproxy_queue_depth": max,
    "brokerproxy_upstream_up": min,
    "brokerproxy_build_info": max,
    "brokerproxy_tls_certificate_expiry_timestamp_seconds": min,
    "process_start_time_seconds": min,
    "process_max_fds": max,
}


def expected_merge(*sources: Samples) -> Samples:
    out: Samples = {}
    for src in sources:
        for key, value in src.items():
            if key in out:
                combine = NOT_SUMMED.get(key[0])
                out[key] = combine(out[key], value) if combine is not None else out[key] + value
            else:
                out[key] = value
    return out


# ------------------------------------------------------------------------------------------------ one worker


def test_one_worker_merges_to_itself_byte_for_byte() -> None:
    o = first_observer()
    for accept in (None, OPENMETRICS):
        text = exposition(o, process_metrics=True, accept=accept if accept else None)
        plain = exposition(o, process_metrics=True) if accept else text
        merged = aggregate.merge([aggregate.parse(plain.decode())])
        again = render(merged, accept)
        if accept is None:
            assert again == text
        else:  # the process_* values move between two renders: compare the brokerproxy series
            ours = [line for line in again.decode().splitlines() if "process_" not in line]
            theirs = [line for line in text.decode().splitlines() if "process_" not in line]
            assert ours == theirs


def test_the_merged_observer_exports_the_same_series() -> None:
    """Read back into an Observer, the merged families give the exposition they came from (status.build reads that
    Observer, so the page shows what /metrics shows)."""
    for o in (first_observer(), second_observer(), Observer()):
        text = exposition(o)
        back = aggregate.observer(aggregate.merge([aggregate.parse(text.decode())]))
        assert exposition(back) == text
        assert back.depths() == o.depths()
        assert back.workers_online() == o.workers_online()


def test_unreadable_exposition_raises_value_error() -> None:
    with pytest.raises(ValueError):
        aggregate.parse('brokerproxy_commands_total{command="get" 1\n')


# ------------------------------------------------------------------------------------------------ several workers


def test_two_workers_sum_except_depth_upstream_up_build_info_and_certificate_expiry() -> None:
    a, b = exposition(first_observer(), process_metrics=True), exposition(second_observer(), process_metrics=True)
    merged = aggregate.merge([aggregate.parse(a.decode()), aggregate.parse(b.decode())])
    got = samples(render(merged))
    want = expected_merge(samples(a), samples(b))
    assert got == want
    # Spot checks of what that means.
    assert got[("brokerproxy_client_connections_total", (("listener", "main"),))] == 1 + 2
    assert got[("brokerproxy_client_connections_total", (("listener", "tls"),))] == 1
    assert got[("brokerproxy_queue_messages_published_total", (("queue", "celery"),))] == 6
    assert got[("brokerproxy_queue_messages_published_total", (("queue", "high"),))] == 4
    assert got[("brokerproxy_queue_depth", (("queue", "celery"),))] == 7  # max, not 7 + the other's
    assert got[("brokerproxy_upstream_up", ())] == 0  # one worker does not reach Redis
    assert got[("brokerproxy_build_info", (("version", metrics.__version__),))] == 1
    assert got[("brokerproxy_tls_certificate_expiry_timestamp_seconds", (("listener", "tls"), ("role", "server")))] == (
        1_900_000_000.0
    )
    assert got[("brokerproxy_command_duration_seconds_count", (("command", "get"),))] == 1 + 3
    assert got[("brokerproxy_command_duration_seconds_bucket", (("command", "get"), ("le", "0.025")))] == 1 + 2
    assert got[("brokerproxy_command_duration_seconds_bucket", (("command", "get"), ("le", "+Inf")))] == 1 + 3
    assert got[("process_resident_memory_bytes", ())] == (
        samples(a)[("process_resident_memory_bytes", ())] + samples(b)[("process_resident_memory_bytes", ())]
    )


def test_histograms_add_up_bucket_by_bucket_and_the_quantiles_follow() -> None:
    a, b = first_observer(), second_observer()
    merged = aggregate.observer(aggregate.merge([aggregate.parse(exposition(x).decode()) for x in (a, b)]))
    for name in ("celery",):
        for field in ("wait", "sizes"):
            h, ha, hb = (getattr(o.queues[name], field) for o in (merged, a, b))
            assert h.counts == [x + y for x, y in zip(ha.counts, hb.counts, strict=True)]
            assert h.sum == pytest.approx(ha.sum + hb.sum)
    get = merged.command_duration["get"]
    assert get.counts == [x + y for x, y in zip(a.command_duration["get"].counts, b.command_duration["get"].counts,
                                                 strict=True)]  # fmt: skip
    # The page's p95 is Prometheus's estimate over the summed buckets.
    facts = status.Facts("redis://x:1/0", True, "ready", False, (), 1.0, 5.0)
    page = status.build(merged, facts, now=10.0, wall=0.0, since=None)
    (celery,) = [q for q in page["queues"] if q["name"] == "celery"]
    assert celery["wait"]["p95"] == status.histogram_quantile(0.95, merged.queues["celery"].wait)
    assert celery["wait"]["count"] == a.queues["celery"].wait.count + b.queues["celery"].wait.count


def test_the_group_status_holds_the_sums() -> None:
    a, b = first_observer(), second_observer()
    merged = aggregate.observer(aggregate.merge([aggregate.parse(exposition(x).decode()) for x in (a, b)]))
    facts = status.Facts("redis://x:1/0", True, "ready", False, (), 1.0, 5.0)
    page = status.build(merged, facts, now=10.0, wall=0.0, since=None)
    one = [status.build(x, facts, now=10.0, wall=0.0, since=None) for x in (a, b)]
    by_name = {q["name"]: q for q in page["queues"]}
    for name in ("celery", "high"):
        for key in ("published", "consumed", "requeued", "consumers"):
            assert by_name[name][key] == sum(q[key] for p in one for q in p["queues"] if q["name"] == name), (name, key)
    assert by_name["celery"]["depth"] == 7
    assert page["connections"]["open"] == sum(p["connections"]["open"] for p in one)
    assert page["commands"] == {k: sum(p["commands"][k] for p in one) for k in ("ok", "error", "denied")}
    assert page["bytes"] == {k: sum(p["bytes"][k] for p in one) for k in ("in", "out")}
    assert page["upstream"]["up"] is False
    assert page["security"]["auth_failures"] == 2
    tasks = {t["name"]: t for t in page["tasks"]}
    assert tasks["app.add"]["published"] == 6
    assert tasks["app.mul"]["published"] == 4
    assert tasks["app.add"]["results"] == {"SUCCESS": 4, "FAILURE": 2}
    json.dumps(page, allow_nan=False)


def test_an_exited_workers_counters_are_kept_and_its_gauges_dropped() -> None:
    """Worker B dies after its last scrape and a fresh B' takes its place: no counter or histogram series of the
    group goes down (Prometheus would read a reset), and B's open connections are no longer counted."""
    a, b = first_observer(), second_observer()
    pa, pb = (aggregate.parse(exposition(x).decode()) for x in (a, b))
    retired = aggregate.Retired()
    before = samples(render(aggregate.exposition_families([pa, pb], retired, {})))
    retired.add(pb)
    fresh = Observer()
    fresh.connection_opened("main")
    fresh.command("get", "ok")
    after = samples(render(aggregate.exposition_families([pa, aggregate.parse(exposition(fresh).decode())],
                                                         retired, {})))  # fmt: skip
    families = {s.name: f.type for f in parse_text(exposition(b).decode()) for s in f.samples}
    cumulative = [k for k in before if families.get(k[0]) in ("counter", "histogram")]
    assert cumulative
    for key in cumulative:
        assert after.get(key, 0) >= before[key], key
    assert (
        after[("brokerproxy_client_connections_total", (("listener", "main"),))]
        == before[("brokerproxy_client_connections_total", (("listener", "main"),))] + 1
    )
    # Gauges: only the live workers'.
    assert after[("brokerproxy_client_connections", (("listener", "main"),))] == 1 + 1  # a's and fresh's
    assert ("brokerproxy_client_connections", (("listener", "tls"),)) not in after
    assert after[("brokerproxy_upstream_up", ())] == 0  # fresh has not polled yet; min over the live ones
    # A second exit adds to what was kept.
    retired.add(aggregate.parse(exposition(fresh).decode()))
    kept = samples(render(aggregate.exposition_families([pa], retired, {})))
    assert (
        kept[("brokerproxy_client_connections_total", (("listener", "main"),))]
        == after[("brokerproxy_client_connections_total", (("listener", "main"),))]
    )


def test_supervisor_series_and_both_formats() -> None:
    a, b = (aggregate.parse(exposition(x).decode()) for x in (first_observer(), second_observer()))
    merged = aggregate.exposition_families([a, b], aggregate.Retired(), aggregate.supervisor_families(2, 3))
    got = samples(render(merged))
    assert got[("brokerproxy_workers", ())] == 2
    assert got[("brokerproxy_worker_restarts_total", ())] == 3
    text = render(merged).decode()
    assert "# TYPE brokerproxy_workers gauge" in text
    assert "# TYPE brokerproxy_worker_restarts_total counter" in text
    # OpenMetrics: parses (the gauge/counter name clash of client connections handled as metrics.render does).
    om = render(merged, OPENMETRICS).decode()
    assert om.endswith("# EOF\n")
    names = {s.name for f in parse_openmetrics(om) for s in f.samples}
    assert {"brokerproxy_workers", "brokerproxy_worker_restarts_total", "brokerproxy_client_connections",
            "brokerproxy_client_connections_total"} <= names  # fmt: skip
    assert {spec.name for spec in aggregate.SUPERVISOR_METRICS} == {"brokerproxy_workers",
                                                                  "brokerproxy_worker_restarts_total"}  # fmt: skip


# ------------------------------------------------------------------------------------------------ supervisor bits


def test_restart_backoff_doubles_and_is_bounded() -> None:
    delays = [supervisor.restart_delay(n) for n in range(1, 12)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays[-1] == supervisor.RESTART_BACKOFF_MAX == 30.0
    assert all(x <= y for x, y in itertools.pairwise(delays))


def test_worker_command_is_the_same_command_line_plus_the_channel() -> None:
    cmd = supervisor.worker_command(["--listen", "127.0.0.1:7000", "--workers", "2"], 1, 9)
    assert cmd[1:] == ["-m", "brokerproxy", "--listen", "127.0.0.1:7000", "--workers", "2", "--_worker-channel", "1:9"]


# ------------------------------------------------------------------------------------------------ the setting


def test_workers_setting(tmp_path: Path) -> None:
    assert config.load().workers == 1
    assert config.load(overrides={"workers": "3"}).workers == 3
    assert config.load(overrides={"workers": "auto"}).workers == config.usable_cpus() >= 1
    assert config.load(overrides={"workers": "AUTO"}).workers == config.usable_cpus()
    assert config.load(env={"BROKERPROXY_WORKERS": "2"}).workers == 2
    path = tmp_path / "c.toml"
    path.write_text('workers = "auto"\n')
    assert config.load(str(path)).workers == config.usable_cpus()
    path.write_text("workers = 4\n")
    assert config.load(str(path)).workers == 4
    for bad in ("0", "-1", "two", "1.5", str(config.MAX_WORKERS + 1), True):
        with pytest.raises(ConfigError) as err:
            config.load(overrides={"workers": bad})
        assert err.value.key == "workers", bad
    with pytest.raises(ConfigError) as err:
        config.load(overrides={"workers": "2", "listen": "127.0.0.1:0"})
    assert err.value.key == "listen"
    assert config.load(overrides={"workers": "1", "listen": "127.0.0.1:0"}).listen is not None
