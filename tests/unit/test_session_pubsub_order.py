"""session.Session: the reply count around pub/sub, MULTI and CLIENT REPLY, and the commands counter's ``denied``.

Each case is what Redis 7 sends for the same requests (checked against a real redis-server in
tests/integration/test_fuzz_socket.py); here the session is driven with those replies and must hand every frame to
the client in Redis's order, never lose count of the replies, and never take a frame for another request's.
"""

from __future__ import annotations

from brokerproxy import metrics
from brokerproxy.observe import Observer
from tests.unit.test_session import OK, DenyFlushall, cmd, open_session

# ------------------------------------------------------------------------------------------------------------ metrics


def test_acl_denial_counts_the_command_as_denied() -> None:
    observer = Observer()
    s = open_session(policy=DenyFlushall(), observer=observer)
    s.from_client(cmd("FLUSHALL") + cmd("SET", "a", "1"))
    assert s.take_client().startswith(b"-NOPERM")
    s.from_upstream(OK)
    assert s.take_client() == OK
    assert observer.commands.get(("flushall", "denied")) == 1
    assert ("flushall", "ok") not in observer.commands and ("flushall", "error") not in observer.commands
    assert observer.commands.get(("set", "ok")) == 1
    assert sum(observer.acl_denials.values()) == 1
    registry = metrics.build_registry(observer, process_metrics=False)
    labels = {"command": "flushall", "outcome": "denied"}
    assert registry.get_sample_value("brokerproxy_commands_total", labels) == 1


def test_acl_denial_inside_multi_counts_the_command_as_denied() -> None:
    observer = Observer()
    s = open_session(policy=DenyFlushall(), observer=observer)
    s.from_client(cmd("MULTI") + cmd("FLUSHALL") + cmd("FLUSHALL"))
    assert observer.commands.get(("flushall", "denied")) == 2
