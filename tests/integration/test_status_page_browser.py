"""The status page in a real browser: Debian's chromium, driven by Playwright, on a proxy carrying Celery traffic.

The page is opened while tasks run and must update by itself; once the traffic has stopped, every number it shows
(per queue, per task, the cards) must be what ``/metrics`` says at that moment, and ``/metrics`` must agree with
what the test sent and what the worker ran. The page must load nothing from anywhere but the proxy, raise no
error, and draw its charts. A screenshot is saved as a test artifact (``$BROKERPROXY_TEST_ARTIFACTS``, default
``tests/artifacts/``).

Chromium missing is a failure, not a skip: ``apt-get install chromium`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ProxyProcess, RedisServer
from tests.integration.test_celery_e2e import REPO, TIMEOUT, Stack, T, wait_until
from tests.integration.test_metrics_e2e import POLL, Scrape, start_metrics_proxy
from tests.unit.test_status import prom_quantile

CHROMIUM = os.environ.get("BROKERPROXY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = Path(os.environ.get("BROKERPROXY_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")

# What the page shows, read from its DOM: the text of each cell, as a person sees it.
READ_PAGE = """() => {
  const cells = tr => Object.fromEntries([...tr.querySelectorAll("td[data-f]")].map(td =>
    [td.dataset.f, td.textContent]));
  const rows = sel => Object.fromEntries([...document.querySelectorAll(sel + " tbody tr[data-name]")].map(tr =>
    [tr.dataset.name, cells(tr)]));
  return {
    time: Number(document.body.dataset.time || 0),
    updates: Number(document.body.dataset.updates || 0),
    queues: rows("#queues"),
    tasks: rows("#tasks"),
    cards: Object.fromEntries([...document.querySelectorAll("[data-card]")].map(c =>
      [c.dataset.card, c.querySelector(".v").textContent])),
    clients: [...document.querySelectorAll("#clients tbody tr[data-listener]")].map(tr =>
      [tr.dataset.user, tr.dataset.listener, tr.querySelector("td[data-f=open]").textContent]),
    upstream: document.getElementById("upstream-badge").textContent,
    ready: document.getElementById("ready-badge").textContent,
    error: document.getElementById("error").hidden ? "" : document.getElementById("error").textContent,
    charts: Object.fromEntries([...document.querySelectorAll("#charts .chart")].map(c =>
      [c.dataset.queue, [...c.querySelectorAll("svg path")].map(p => p.getAttribute("d")).filter(Boolean).length])),
  };
}"""

STATE_FIELDS = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried", "REVOKED": "revoked",
                "STARTED": "started", "other": "other"}  # fmt: skip
DASH = "\N{EN DASH}"  # what the page shows for "no value"
UNITS = {"µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}


def seconds(text: str) -> tuple[float, float] | None:
    """A duration as the page shows it ("12 ms", "1.25 s") -> (value, half of the last shown digit's step)."""
    if text == DASH:
        return None
    number, unit = text.split(" ")
    decimals = len(number.partition(".")[2])
    return float(number) * UNITS[unit], 0.5 * 10**-decimals * UNITS[unit]


# ------------------------------------------------------------------------------------------------ fixtures


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A fresh chromium (its own profile directory), as a Playwright browser context. Missing: the test fails."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"chromium is not installed at {CHROMIUM}: the status page test needs a real browser. "
            "Install it with `apt-get install chromium` (.ci/run does), or point BROKERPROXY_TEST_CHROMIUM at one."
        )
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="bp-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000}, locale="en-GB", timezone_id="UTC",
        )  # fmt: skip
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def celery_stack(
    redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> Iterator[tuple[Stack, int]]:
    proxy, mport = start_metrics_proxy(redis_server, start_proxy)
    stack = Stack(redis_server, proxy, tmp_path)
    try:
        yield stack, mport
    finally:
        for w in stack.workers:
            w.kill()
        gc.collect()  # Celery's AsyncResult.__del__ needs the backend: run it while Redis still answers
        for a in stack.apps:
            a.close()


# ------------------------------------------------------------------------------------------------ the test


def test_status_page_in_chromium_matches_metrics(celery_stack: tuple[Stack, int]) -> None:
    with chromium() as browser:
        _test_page(celery_stack, browser)


def _test_page(celery_stack: tuple[Stack, int], browser: Any) -> None:
    stack, mport = celery_stack
    base = f"http://127.0.0.1:{mport}/"
    page = browser.new_page()
    requests: list[str] = []
    problems: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None
    )
    try:
        _run(stack, mport, base, page, requests, problems)
    except Exception as exc:
        shot = save_screenshot(page, "status_page_failed.png")
        raise AssertionError(f"{type(exc).__name__}: {exc}\nscreenshot: {shot}\n{stack.diag()}") from exc
    finally:
        page.close()


def save_screenshot(page: Any, name: str) -> Path | None:
    try:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        page.screenshot(path=str(path), full_page=True)
        print(f"\nstatus page screenshot: {path}")
        return path
    except Exception:  # the screenshot serves the diagnosis; it must not hide the failure itself
        return None


def _run(stack: Stack, mport: int, base: str, page: Any, requests: list[str], problems: list[str]) -> None:
    app = stack.app()
    worker = stack.worker("celery,alpha", concurrency=2, events=True, prefix="page").wait_ready(app)
    sent: Counter[tuple[str, str]] = Counter()  # (task, queue)
    results: list[Any] = []

    def send(name: str, args: tuple[Any, ...], queue: str) -> Any:
        r = T(app, name).apply_async(args, queue=queue)
        sent[(f"e2e.{name}", queue)] += 1
        return r

    # ---- traffic starts; the page is opened while it runs, and must follow it without a reload
    results += [send("add", (i, i), "alpha") for i in range(12)]
    page.goto(base)
    first = wait_until("the page's first numbers", lambda: (d := read(page))["updates"] >= 1 and d, 15)
    assert first["queues"], f"the page shows no queue after the first update: {first}"
    results += [send("mul", (i, 3), "alpha") for i in range(8)]
    boom = [send("boom", ("kaboom",), "celery") for _ in range(3)]
    parked = [send("add", (i, 0), "beta") for i in range(5)]  # no worker consumes beta: they stay queued
    for r in results:
        assert r.get(timeout=TIMEOUT) is not None
    for r in boom:
        with pytest.raises(ValueError, match="kaboom"):
            r.get(timeout=TIMEOUT)
    assert len(parked) == 5
    wait_until(
        "the page to show the new traffic by itself",
        lambda: read(page)["queues"].get("beta", {}).get("published") == "5",
        15,
    )

    # ---- the traffic has stopped; the worker idles in BRPOP. /metrics first, then the page.
    def scrape_when_idle() -> Scrape | None:
        s = Scrape(mport)
        consumers = s.by("brokerproxy_queue_consumers", "queue")
        return s if consumers.get("celery") == 1 and consumers.get("alpha") == 1 else None

    wait_until("the worker to block in BRPOP", scrape_when_idle, 15)
    time.sleep(3 * POLL)  # an LLEN poll since the last push
    s = Scrape(mport)
    # /metrics against the test's own counts.
    by_queue: Counter[str] = Counter()
    for (_, queue), n in sent.items():
        by_queue[queue] += n
    assert s.nonzero("brokerproxy_queue_messages_published_total", "queue") == dict(by_queue)
    assert s.by("brokerproxy_tasks_published_total", "task", "queue") == dict(sent)
    assert s.nonzero("brokerproxy_queue_messages_consumed_total", "queue") == {"alpha": 20, "celery": 3}
    assert s.by("brokerproxy_queue_depth", "queue") == {"alpha": 0, "celery": 0, "beta": 5}
    assert stack.broker().llen("beta") == 5
    results_by_state = s.nonzero("brokerproxy_task_results_total", "task", "state")
    assert results_by_state == {
        ("e2e.add", "STARTED"): 12, ("e2e.add", "SUCCESS"): 12, ("e2e.mul", "STARTED"): 8,
        ("e2e.mul", "SUCCESS"): 8, ("e2e.boom", "STARTED"): 3, ("e2e.boom", "FAILURE"): 3,
    }  # fmt: skip
    assert s.get("brokerproxy_workers_online") == 1

    # The page, refreshed after that scrape, against a scrape taken right after reading it (the numbers are
    # at rest; should a connection come or go in between, read both again).
    scraped_at = time.time()

    def page_matches_metrics() -> tuple[dict[str, Any], Scrape] | None:
        shown = read(page)
        if shown["time"] <= scraped_at:
            return None  # not refreshed since
        after = Scrape(mport)
        mismatches = compare(shown, after)
        if mismatches:
            page_matches_metrics.last = mismatches  # type: ignore[attr-defined]
            return None
        return shown, after

    try:
        shown, after = wait_until("the page to show what /metrics says", page_matches_metrics, 15, 0.25)
    except AssertionError:
        raise AssertionError(f"the page and /metrics differ: {getattr(page_matches_metrics, 'last', '?')}") from None
    for name in ("brokerproxy_queue_messages_published_total", "brokerproxy_queue_depth"):
        assert after.by(name, "queue") == s.by(name, "queue"), "the numbers moved after the traffic stopped"

    # What the page showed, spelled out for the record (compare() checked all of it against /metrics).
    assert {q: row["published"] for q, row in shown["queues"].items()} == {"alpha": "20", "beta": "5", "celery": "3"}
    assert shown["queues"]["beta"]["depth"] == "5" and shown["queues"]["beta"]["consumers"] == "0"
    assert shown["tasks"]["e2e.boom"]["failed"] == "3" and shown["tasks"]["e2e.add"]["succeeded"] == "12"
    assert shown["cards"]["workers"] == "1" and shown["cards"]["waiting"] == "5"
    assert shown["upstream"] == "upstream up" and shown["ready"] == "ready" and shown["error"] == ""
    # Every queue has its two charts, with something drawn.
    assert set(shown["charts"]) == set(shown["queues"]) and all(n >= 2 for n in shown["charts"].values()), shown

    # Nothing but the proxy's own listener was asked for anything, and nothing went wrong in the page.
    assert requests and all(u.startswith(base) for u in requests), requests
    assert {u.split("?")[0] for u in requests} <= {base, base + "api/status"}, requests
    assert problems == [], problems

    path = save_screenshot(page, "status_page.png")
    assert path is not None and path.stat().st_size > 10_000
    worker.terminate(timeout=30)


def read(page: Any) -> dict[str, Any]:
    data: dict[str, Any] = page.evaluate(READ_PAGE)
    return data


def compare(shown: dict[str, Any], s: Scrape) -> list[str]:
    """Every number the page shows that /metrics also exports, checked; the differences, as text."""
    bad: list[str] = []

    def check(what: str, page_text: str, expected: str) -> None:
        if page_text != expected:
            bad.append(f"{what}: page {page_text!r}, /metrics {expected!r}")

    def n(value: float) -> str:
        return str(int(value))

    published = s.by("brokerproxy_queue_messages_published_total", "queue")
    if set(shown["queues"]) != set(published):
        bad.append(f"queues: page {sorted(shown['queues'])}, /metrics {sorted(published)}")
    depth = s.by("brokerproxy_queue_depth", "queue")
    for queue, row in shown["queues"].items():
        check(f"{queue} depth", row["depth"], n(depth[queue]) if queue in depth else DASH)
        for field, metric in (
            ("published", "brokerproxy_queue_messages_published_total"),
            ("consumed", "brokerproxy_queue_messages_consumed_total"),
            ("redelivered", "brokerproxy_queue_messages_redelivered_total"),
            ("requeued", "brokerproxy_messages_requeued_total"),
            ("consumers", "brokerproxy_queue_consumers"),
        ):
            check(f"{queue} {field}", row[field], n(s.get(metric, queue=queue)))
        buckets = sorted(
            (float(lab["le"]), v)
            for lab, v in s.samples["brokerproxy_queue_wait_seconds_bucket"]
            if lab["queue"] == queue
        )
        for field, q in (("wait_p50", 0.5), ("wait_p95", 0.95)):
            expected = prom_quantile(q, buckets)
            got = seconds(row[field])
            if (expected is None) != (got is None) or (
                got is not None and expected is not None and abs(got[0] - expected) > got[1] * 1.001
            ):
                bad.append(f"{queue} {field}: page {row[field]!r}, /metrics buckets give {expected}")
        for field in ("publish_rate", "consume_rate"):
            if not re.fullmatch(DASH + r"|0|\d+(\.\d+)?", row[field]):
                bad.append(f"{queue} {field}: {row[field]!r} is not a rate")

    per_task: Counter[str] = Counter()
    for (task, _), v in s.by("brokerproxy_tasks_published_total", "task", "queue").items():
        per_task[task] += int(v)
    outcomes = s.by("brokerproxy_task_results_total", "task", "state")
    if set(shown["tasks"]) != set(per_task) | {t for t, _ in outcomes}:
        bad.append(f"tasks: page {sorted(shown['tasks'])}, /metrics {sorted(per_task)}")
    for task, row in shown["tasks"].items():
        check(f"{task} published", row["published"], str(per_task.get(task, 0)))
        for state, field in STATE_FIELDS.items():
            check(f"{task} {field}", row[field], n(outcomes.get((task, state), 0)))

    cards = shown["cards"]
    check("card queues", cards["queues"], str(len(published)))
    check("card waiting", cards["waiting"], n(sum(depth.values())))
    check("card workers", cards["workers"], n(s.get("brokerproxy_workers_online")))
    open_now = sum(s.by("brokerproxy_client_connections", "listener").values())
    check("card connections", cards["connections"], n(open_now))
    check("clients table", str(sum(int(c[2]) for c in shown["clients"])), n(open_now))
    check("card auth failures", cards["auth_failures"], n(s.get("brokerproxy_auth_failures_total")))
    check("card denials", cards["denials"], n(sum(s.by("brokerproxy_acl_denials_total", "user", "kind").values())))
    check("upstream", shown["upstream"], "upstream up" if s.get("brokerproxy_upstream_up") == 1 else "upstream down")
    return bad
