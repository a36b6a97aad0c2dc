"""The audit trail: JSON lines an auditor can correlate, never a password or a value."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import ProxyProcess, RedisServer


def test_audit_trail_events(
    redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    trail = tmp_path / "audit.jsonl"
    acl = tmp_path / "users.acl"
    acl.write_text("user default off\nuser ops on >ops-secret ~* &* +@all\nuser app on >app-secret ~app:* +@all\n")
    p = start_proxy(redis_server.url(), config=f'[acl]\nfile = "{acl}"\n[audit]\nfile = "{trail}"\n')
    app = p.client(username="app", password="app-secret", protocol=3, retry=Retry(NoBackoff(), 0))
    app.set("app:k", "super-secret-value")
    with pytest.raises(redis.exceptions.NoPermissionError):
        app.get("other:key")
    ops = p.client(username="ops", password="ops-secret", protocol=2, retry=Retry(NoBackoff(), 0))
    ops.execute_command("CONFIG", "GET", "maxmemory")  # @admin: listed
    ops.execute_command("CONFIG", "GET", "maxmemory")
    with pytest.raises(redis.AuthenticationError):
        p.client(username="app", password="wrong-password", retry=Retry(NoBackoff(), 0)).ping()
    app.close()
    ops.close()
    p.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while True:
        events = [json.loads(line) for line in trail.read_text().splitlines()]
        if any(e["event"] == "reload" for e in events) and sum(e["event"] == "connection_closed" for e in events) >= 3:
            break
        assert time.monotonic() < deadline, events
        time.sleep(0.05)
    kinds = [e["event"] for e in events]
    assert {"connection_opened", "connection_closed", "auth", "denied", "command", "reload"} <= set(kinds)
    assert all({"ts", "event", "conn"} <= set(e) for e in events)
    auth = [e for e in events if e["event"] == "auth"]
    assert {(e["user"], e["ok"]) for e in auth} >= {("app", True), ("ops", True), ("app", False)}
    denied = next(e for e in events if e["event"] == "denied")
    assert (denied["user"], denied["command"], denied["kind"], denied["object"]) == ("app", "get", "key", "other:key")
    commands = [e for e in events if e["event"] == "command"]
    assert [c["command"] for c in commands] == ["config|get", "config|get"] and commands[0]["user"] == "ops"
    closed = [e for e in events if e["event"] == "connection_closed" and e["user"] == "app"]
    assert closed and closed[0]["bytes_in"] > 0 and closed[0]["duration_s"] >= 0
    # The same connection id ties a connection's events together.
    conn = denied["conn"]
    assert any(e["event"] == "connection_opened" and e["conn"] == conn for e in events)
    text = trail.read_text()
    for secret in ("app-secret", "ops-secret", "wrong-password", "super-secret-value"):
        assert secret not in text
