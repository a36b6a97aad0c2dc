"""``/api/status`` and ``/`` on the metrics listener: a real proxy in front of a real redis-server, real clients.

The status is checked against ``/metrics`` scraped at the same moment (both read the same Observer), and against
what the test itself did: the messages it pushed and popped, the connections it holds open (by user), the failed
authentication and the refused command it caused, ``LLEN`` straight on redis-server.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import redis

from brokerproxy import metrics
from brokerproxy.endpoints import HTTPEndpoints
from brokerproxy.observe import Observer
from brokerproxy.status import StatusBoard
from tests.conftest import ProxyProcess, RedisServer
from tests.integration.test_celery_e2e import wait_until
from tests.integration.test_metrics_e2e import CONFIG, POLL, Scrape, envelope, http_get, start_metrics_proxy
from tests.unit.test_status import FakeServer

USERS_CONFIG = (
    CONFIG
    + """
[[users]]
name = "alice"
passwords = ["alice-pw"]

[[users]]
name = "bob"
passwords = ["bob-pw"]

[acl]
rules = ["user default off", "user carol on >carol-pw ~allowed:* +@all"]
"""
)


def get_status(port: int, query: str = "") -> dict[str, Any]:
    status, headers, body = http_get(port, "/api/status" + query)
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    data: dict[str, Any] = json.loads(body)
    return data


def test_api_status_matches_metrics_and_what_the_clients_did(
    redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]
) -> None:
    proxy, mport = start_metrics_proxy(redis_server, start_proxy, USERS_CONFIG)
    clients: list[redis.Redis] = []

    def client(user: str, password: str) -> redis.Redis:
        c = proxy.client(username=user, password=password, single_connection_client=True)
        clients.append(c)
        return c

    alice1, alice2 = client("alice", "alice-pw"), client("alice", "alice-pw")
    bob = client("bob", "bob-pw")
    carol = client("carol", "carol-pw")
    idle = socket.create_connection(("127.0.0.1", proxy.port))  # connected, never authenticates
    try:
        for i in range(5):
            message = envelope("alpha", "st.add") if i < 3 else envelope("beta", "st.mul")
            (alice1 if i % 2 else alice2).lpush("alpha" if i < 3 else "beta", message)
        popped = bob.brpop(["alpha"], timeout=1)
        assert popped is not None
        tid = json.loads(popped[1])["headers"]["id"]
        bob.set(f"celery-task-meta-{tid}", json.dumps({"status": "SUCCESS", "result": 1, "task_id": tid}))
        with pytest.raises(redis.exceptions.NoPermissionError):
            carol.get("secret:key")
        # One failed AUTH, on a raw connection (redis-py would retry it, and the proxy slows repeated failures down).
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as wrong:
            wrong.sendall(b"*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$5\r\nwrong\r\n")
            assert wrong.recv(1024).startswith(b"-WRONGPASS")
        for c in (alice1, alice2, bob, carol):
            assert c.ping()

        def settled() -> tuple[dict[str, Any], Scrape] | None:
            st = get_status(mport)
            s = Scrape(mport)
            st2 = get_status(mport)
            if st["queues"] != st2["queues"] or not st["upstream"]["ready"]:
                return None
            if {q["name"]: q["depth"] for q in st["queues"]} != {"alpha": 2, "beta": 2}:
                return None  # the LLEN poll has not run since the pop yet
            return st, s

        st, s = wait_until("the status to settle", settled, 10, POLL)
        truth = {q: redis_server.client().llen(q) for q in ("alpha", "beta")}
        assert truth == {"alpha": 2, "beta": 2}

        queues = {q["name"]: q for q in st["queues"]}
        assert {n: q["published"] for n, q in queues.items()} == {"alpha": 3, "beta": 2}
        assert {n: q["published"] for n, q in queues.items()} == s.by(
            "brokerproxy_queue_messages_published_total", "queue"
        )
        assert {n: q["consumed"] for n, q in queues.items()} == {"alpha": 1, "beta": 0}
        assert {n: q["consumed"] for n, q in queues.items()} == s.by(
            "brokerproxy_queue_messages_consumed_total", "queue"
        )
        assert {n: q["depth"] for n, q in queues.items()} == s.by("brokerproxy_queue_depth", "queue") == truth
        assert queues["alpha"]["wait"]["count"] == 1 == s.get("brokerproxy_queue_wait_seconds_count", queue="alpha")
        assert queues["alpha"]["wait"]["p50"] is not None and queues["beta"]["wait"]["p50"] is None

        tasks = {t["name"]: t for t in st["tasks"]}
        assert {n: t["published"] for n, t in tasks.items()} == {"st.add": 3, "st.mul": 2}
        assert (
            {(n, state): c for n, t in tasks.items() for state, c in t["results"].items()}
            == {("st.add", "SUCCESS"): 1}
            == s.nonzero("brokerproxy_task_results_total", "task", "state")
        )

        conns = st["connections"]
        assert conns["clients"] == [
            {"user": "alice", "listener": "main", "count": 2},
            {"user": "bob", "listener": "main", "count": 1},
            {"user": "carol", "listener": "main", "count": 1},
            {"user": None, "listener": "main", "count": 1},
        ]
        assert conns["open"] == 5 == sum(s.by("brokerproxy_client_connections", "listener").values())
        assert conns["by_listener"] == s.by("brokerproxy_client_connections", "listener")

        sec = st["security"]
        assert sec["auth_failures"] == 1 == s.get("brokerproxy_auth_failures_total")
        assert sec["acl_denials"] == [{"user": "carol", "kind": "key", "count": 1}]
        assert s.by("brokerproxy_acl_denials_total", "user", "kind") == {("carol", "key"): 1}
        assert sec["acl_denials_total"] == 1
        commands = s.by("brokerproxy_commands_total", "command", "outcome")
        for outcome in ("ok", "error", "denied"):
            assert st["commands"][outcome] == sum(n for (_, out), n in commands.items() if out == outcome)
        up = st["upstream"]
        assert up["up"] is True and up["ready"] is True and up["reason"] == "ready" and up["draining"] is False
        assert up["address"] == redis_server.url() and up["poll_interval"] == POLL
        assert up["connections"] == s.get("brokerproxy_upstream_connections") == 4  # the four authenticated

        # The history: samples every 2 s, only the new ones on request, none for the terminal summary.
        history = st["history"]
        assert history["interval"] == 2.0 and history["samples"] and history["last"] == history["samples"][-1]["seq"]
        assert all(s["t"] <= 0 for s in history["samples"])
        last = history["last"]
        assert get_status(mport, f"?since={last}")["history"]["samples"] == []
        later = wait_until("a new sample", lambda: get_status(mport, f"?since={last}")["history"]["samples"], 5)
        assert [x["seq"] for x in later] == [last + 1]
        assert later[0]["queues"]["alpha"][0] == 2  # its depth
        assert "history" not in get_status(mport, "?history=0")

        # Connections leaving are no longer listed.
        idle.close()
        for c in clients:
            c.close()
        wait_until("the connections to close", lambda: get_status(mport)["connections"]["clients"] == [], 5)

        # Redis goes away: the status says so, and is still served.
        redis_server.stop()
        down = wait_until("upstream down", lambda: (d := get_status(mport))["upstream"]["up"] is False and d, 10 * POLL)
        assert down["upstream"]["ready"] is False
        assert "does not answer" in down["upstream"]["reason"]
        assert Scrape(mport).get("brokerproxy_upstream_up") == 0
    finally:
        idle.close()
        for c in clients:
            c.close()


# Things a self-contained page must not contain: anything fetched from elsewhere.
EXTERNAL = [
    re.compile(rb"<script[^>]*\bsrc\s*=", re.I),
    re.compile(rb"<link[^>]*\brel\s*=\s*[\"']?stylesheet", re.I),
    re.compile(rb"<(img|iframe|object|embed|audio|video|source)\b", re.I),
    re.compile(rb"@import", re.I),
    re.compile(rb"url\s*\(", re.I),
    re.compile(rb"@font-face", re.I),
]


def test_page_is_served_self_contained(redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]) -> None:
    _, mport = start_metrics_proxy(redis_server, start_proxy)
    status, headers, body = http_get(mport, "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert body.startswith(b"<!doctype html>") and b"api/status" in body
    for pattern in EXTERNAL:
        assert not pattern.search(body), pattern.pattern
    # The only absolute URL is the SVG namespace, an identifier that is never fetched.
    assert set(re.findall(rb"\b(?:https?:)?//[\w.-]+[^\s\"'<>)]*", body)) == {b"http://www.w3.org/2000/svg"}
    # The page uses textContent for names from the traffic, never innerHTML.
    assert b"innerHTML" not in body and b"insertAdjacentHTML" not in body and b"document.write" not in body
    # HEAD: the headers only.
    status, headers, empty = head(mport, "/")
    assert status == 200 and empty == b"" and int(headers["content-length"]) == len(body)


def head(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("HEAD", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------ the endpoint alone


class Source:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.samples = 0
        self.fail = False
        self.queries: list[Mapping[str, str] | None] = []

    def snapshot(self, query: Mapping[str, str] | None = None) -> dict[str, Any]:
        self.queries.append(query)
        if self.fail:
            raise RuntimeError("boom")
        return {"samples": self.samples}

    def sample(self) -> None:
        self.samples += 1
        if self.samples == 2:
            raise RuntimeError("a sample that fails does not stop the next ones")


def test_endpoint_samples_on_its_timer_and_survives_a_failing_source() -> None:
    async def main() -> None:
        source = Source(0.05)
        endpoints = HTTPEndpoints(metrics.build_registry(Observer(), process_metrics=False), lambda: (True, "ready"),
                                  status=source)  # fmt: skip
        await endpoints.start("127.0.0.1", 0)
        (port,) = endpoints.ports
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(0.4)
            assert source.samples >= 4  # one at start, then every 0.05 s, the failing one included
            status, _, body = await loop.run_in_executor(None, http_get, port, "/api/status?since=7&x=a%20b")
            assert status == 200 and json.loads(body)["samples"] == source.samples
            assert source.queries[-1] == {"since": "7", "x": "a b"}
            source.fail = True
            status, _, body = await loop.run_in_executor(None, http_get, port, "/api/status")
            assert status == 500 and body == b"building the status failed\n"
            status, _, body = await loop.run_in_executor(None, http_get, port, "/healthz")
            assert (status, body) == (200, b"ok\n")
        finally:
            await endpoints.close()
        done = source.samples
        await asyncio.sleep(0.2)
        assert source.samples == done  # close() stopped the timer

        # Without a status source there is no page and no JSON (and no timer).
        bare = HTTPEndpoints(metrics.build_registry(Observer(), process_metrics=False), lambda: (True, "ready"))
        await bare.start("127.0.0.1", 0)
        try:
            (port,) = bare.ports
            for path in ("/", "/api/status"):
                status, _, _ = await loop.run_in_executor(None, http_get, port, path)
                assert status == 404, path
        finally:
            await bare.close()

    asyncio.run(main())


def test_metrics_and_status_listener_timing() -> None:
    """A status request with many queues is cheap enough to poll every 2 s (bounded labels keep it so)."""
    o = Observer(max_queues=100)
    for i in range(300):
        o.on_request([b"LPUSH", b"q%d" % i, envelope(f"q{i}", f"t{i % 150}")], False)
    board = StatusBoard(FakeServer(o))
    for _ in range(150):
        board.sample()
    t0 = time.perf_counter()
    body = json.dumps(board.snapshot())
    elapsed = time.perf_counter() - t0
    assert len(json.loads(body)["queues"]) == 101  # 100 labelled and "other"
    assert len(body) < 2_000_000
    assert elapsed < 0.5, elapsed
