"""session.Session: the reply count around pub/sub, MULTI and CLIENT REPLY, and the commands counter's ``denied``.

Each case is what Redis 7 sends for the same requests (checked against a real redis-server in
tests/integration/test_fuzz_socket.py); here the session is driven with those replies and must hand every frame to
the client in Redis's order, never lose count of the replies, and never take a frame for another request's.
"""

from __future__ import annotations

from brokerproxy import metrics
from brokerproxy.observe import Observer
from brokerproxy.session import Session
from tests.unit.test_session import (
    HELLO3_REPLY,
    OK,
    QUEUED,
    DenyFlushall,
    Users,
    arr,
    bulk,
    cmd,
    err,
    open_session,
    push,
    requests_in,
    settle,
)

PONG = b"+PONG\r\n"
NOT_IN_MULTI = err("ERR Command not allowed inside a transaction")
EXECABORT = err("EXECABORT Transaction discarded because of previous errors.")

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


# ------------------------------------------------------------------------------------------------------- CLIENT REPLY


def conf(kind: bytes, channel: bytes | None, count: int) -> bytes:
    """A RESP2 (un)subscribe confirmation."""
    return arr(bulk(kind), b"$-1\r\n" if channel is None else bulk(channel), b":%d\r\n" % count)


def test_confirmations_come_even_with_replies_off() -> None:
    s = open_session()
    s.from_client(cmd("CLIENT", "REPLY", "OFF") + cmd("UNSUBSCRIBE") + cmd("CLIENT", "REPLY", "ON") + cmd("PING"))
    assert s.pending == 3  # the confirmation, +OK, +PONG
    s.from_upstream(conf(b"unsubscribe", None, 0) + OK + PONG)
    assert s.take_client() == conf(b"unsubscribe", None, 0) + OK + PONG
    assert s.pending == 0


def test_confirmations_come_even_when_skipped() -> None:
    s = open_session()
    s.from_client(cmd("CLIENT", "REPLY", "SKIP") + cmd("PUNSUBSCRIBE") + cmd("PING"))
    s.from_upstream(conf(b"punsubscribe", None, 0) + PONG)
    assert s.take_client() == conf(b"punsubscribe", None, 0) + PONG
    assert s.pending == 0


def test_subscribe_with_replies_off_then_messages() -> None:
    s = open_session()
    s.from_client(cmd("CLIENT", "REPLY", "OFF") + cmd("SUBSCRIBE", "a") + cmd("PING"))
    assert s.pending == 1  # PING's reply is silenced, the confirmation is not
    msg = arr(bulk(b"message"), bulk(b"a"), bulk(b"hi"))
    s.from_upstream(conf(b"subscribe", b"a", 1) + msg)
    assert s.take_client() == conf(b"subscribe", b"a", 1) + msg
    assert s.pending == 0


def test_client_reply_refused_inside_multi() -> None:
    s = open_session()
    s.from_client(cmd("MULTI") + cmd("CLIENT", "REPLY", "OFF") + cmd("PING") + cmd("EXEC") + cmd("PING"))
    assert requests_in(s.take_upstream()) == [[b"MULTI"], [b"PING"], [b"DISCARD"], [b"PING"]]
    s.from_upstream(OK + QUEUED + OK + PONG)
    assert s.take_client() == OK + NOT_IN_MULTI + QUEUED + EXECABORT + PONG
    assert s.pending == 0


def test_refused_command_in_multi_with_replies_off() -> None:
    # EXEC becomes DISCARD, which Redis does not answer with replies off: no reply is waited for.
    s = open_session(policy=DenyFlushall())
    s.from_client(cmd("CLIENT", "REPLY", "OFF") + cmd("MULTI") + cmd("FLUSHALL") + cmd("EXEC"))
    s.from_client(cmd("CLIENT", "REPLY", "ON") + cmd("PING"))
    assert requests_in(s.take_upstream())[-3:] == [[b"DISCARD"], [b"CLIENT", b"REPLY", b"ON"], [b"PING"]]
    assert s.pending == 2
    s.from_upstream(OK + PONG)
    assert s.take_client() == OK + PONG
    assert s.pending == 0


# ---------------------------------------------------------------------------------------------- RESP2 subscribed mode


def cant(name: str) -> bytes:
    return err(
        f"ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in "
        "this context"
    )


def resp2_subscribed() -> Session:
    s = open_session()
    s.from_client(cmd("SUBSCRIBE", "a"))
    s.from_upstream(conf(b"subscribe", b"a", 1))
    assert s.take_client() == conf(b"subscribe", b"a", 1)
    s.take_upstream()
    return s


def test_hello_refused_in_resp2_subscribed_mode_keeps_resp2() -> None:
    s = resp2_subscribed()
    s.from_client(cmd("HELLO", "3") + cmd("UNSUBSCRIBE", "a") + cmd("PING"))
    # Bare: Redis refuses any HELLO there alike, and a bare one could not switch the protocol in any case.
    assert s.take_upstream() == cmd("HELLO") + cmd("UNSUBSCRIBE", "a") + cmd("PING")
    assert s.protocol == 2
    replies = cant("hello") + conf(b"unsubscribe", b"a", 0) + PONG
    s.from_upstream(replies)
    assert s.take_client() == replies
    assert s.pending == 0
    assert s.protocol == 2


def test_hello_auth_in_resp2_subscribed_mode_neither_authenticates_nor_forwards_credentials() -> None:
    s = Session(Users({b"alice": b"pw", b"bob": b"pw2"}))
    s.from_client(cmd("AUTH", "alice", "pw"))
    assert s.take_client() == OK
    settle(s)
    s.from_client(cmd("SUBSCRIBE", "a"))
    s.from_upstream(conf(b"subscribe", b"a", 1))
    s.take_client()
    s.take_upstream()
    s.from_client(cmd("HELLO", "3", "AUTH", "bob", "pw2") + cmd("AUTH", "bob", "pw2") + cmd("ACL", "WHOAMI"))
    assert s.take_upstream() == cmd("HELLO")
    assert s.user == "alice"
    s.from_upstream(cant("hello"))
    assert s.take_client() == cant("hello") + cant("auth") + cant("acl|whoami")
    assert s.pending == 0
    assert s.user == "alice" and s.protocol == 2


def test_multi_refused_in_resp2_subscribed_mode_is_not_started() -> None:
    s = open_session()
    s.from_client(cmd("SSUBSCRIBE", "a"))
    s.from_upstream(conf(b"ssubscribe", b"a", 1))
    s.take_client()
    s.from_client(cmd("MULTI") + cmd("SUBSCRIBE", "b", "c") + cmd("PING"))
    pong = arr(bulk(b"pong"), bulk(b""))
    replies = cant("multi") + conf(b"subscribe", b"b", 1) + conf(b"subscribe", b"c", 2) + pong
    s.from_upstream(replies)
    assert s.take_client() == replies
    assert s.pending == 0


def test_client_reply_refused_in_resp2_subscribed_mode_changes_nothing() -> None:
    s = resp2_subscribed()
    s.from_client(cmd("CLIENT", "REPLY", "OFF") + cmd("PING"))
    pong = arr(bulk(b"pong"), bulk(b""))
    assert s.pending == 2
    s.from_upstream(cant("client|reply") + pong)
    assert s.take_client() == cant("client|reply") + pong


def test_hello_2_from_resp3_subscribed_mode_then_messages_are_arrays() -> None:
    s = open_session()
    s.from_client(cmd("HELLO", "3"))
    s.from_upstream(HELLO3_REPLY)
    s.from_client(cmd("SUBSCRIBE", "a"))
    s.from_upstream(push(bulk(b"subscribe"), bulk(b"a"), b":1\r\n"))
    s.take_client()
    s.from_client(cmd("HELLO", "2") + cmd("PING"))
    hello2 = b"*4\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:2\r\n"
    msg = arr(bulk(b"message"), bulk(b"a"), bulk(b"hi"))
    pong = arr(bulk(b"pong"), bulk(b""))
    s.from_upstream(hello2 + msg + pong)
    assert s.take_client() == hello2 + msg + pong
    assert s.pending == 0


# ----------------------------------------------------------------------------------------------- RESP3 confirmations


def pconf(kind: bytes, channel: bytes | None, count: int) -> bytes:
    """A RESP3 (un)subscribe confirmation: a push frame."""
    return push(bulk(kind), b"_\r\n" if channel is None else bulk(channel), b":%d\r\n" % count)


def resp3_session() -> Session:
    s = open_session()
    s.from_client(cmd("HELLO", "3"))
    s.from_upstream(HELLO3_REPLY)
    assert s.take_client() == HELLO3_REPLY
    s.take_upstream()
    return s


def test_resp3_protocol_error_waits_for_the_confirmations() -> None:
    s = resp3_session()
    s.from_client(cmd("SUBSCRIBE", "a", "b") + b"*1\r\n:1\r\n")
    assert s.take_client() == b""
    s.from_upstream(pconf(b"subscribe", b"a", 1))
    assert s.take_client() == pconf(b"subscribe", b"a", 1)
    s.from_upstream(pconf(b"subscribe", b"b", 2))
    assert s.take_client() == pconf(b"subscribe", b"b", 2) + err("ERR Protocol error: expected '$', got ':'")
    assert s.pending == 0


def test_resp3_messages_and_invalidations_between_confirmations_are_not_counted() -> None:
    s = resp3_session()
    s.from_client(cmd("SUBSCRIBE", "a"))
    s.from_upstream(pconf(b"subscribe", b"a", 1))
    s.from_client(cmd("PSUBSCRIBE", "x*", "y*") + cmd("AUTH", "default", "x"))
    msg = push(bulk(b"message"), bulk(b"a"), bulk(b"hi"))
    invalidate = push(bulk(b"invalidate"), arr(bulk(b"k")))
    s.from_upstream(pconf(b"psubscribe", b"x*", 2) + msg + invalidate)
    assert s.pending == 2  # the second confirmation, then +OK
    s.from_upstream(pconf(b"psubscribe", b"y*", 3) + msg)
    assert s.take_client() == (
        pconf(b"subscribe", b"a", 1) + pconf(b"psubscribe", b"x*", 2) + msg + invalidate
        + pconf(b"psubscribe", b"y*", 3) + OK + msg
    )  # fmt: skip
    assert s.pending == 0


def test_resp3_unsubscribe_all_waits_for_each_confirmation() -> None:
    s = resp3_session()
    s.from_client(cmd("SUBSCRIBE", "a", "b"))
    s.from_upstream(pconf(b"subscribe", b"a", 1) + pconf(b"subscribe", b"b", 2))
    s.take_client()
    s.from_client(cmd("UNSUBSCRIBE") + cmd("UNSUBSCRIBE", "z") + cmd("AUTH", "default", "x") + cmd("GET", "k"))
    assert s.pending == 4
    replies = pconf(b"unsubscribe", b"a", 1) + pconf(b"unsubscribe", b"b", 0) + pconf(b"unsubscribe", b"z", 0)
    s.from_upstream(replies + b"_\r\n")
    assert s.take_client() == replies + OK + b"_\r\n"
    assert s.pending == 0
    assert not s.subscribed


def test_resp3_confirmations_with_replies_off() -> None:
    s = resp3_session()
    s.from_client(cmd("CLIENT", "REPLY", "OFF") + cmd("SUBSCRIBE", "a") + cmd("PING") + cmd("AUTH", "default", "x"))
    assert s.pending == 1
    s.from_upstream(pconf(b"subscribe", b"a", 1))
    assert s.take_client() == pconf(b"subscribe", b"a", 1)
    assert s.pending == 0


def test_resp3_subscribed_reply_that_looks_like_a_resp2_message_is_a_reply() -> None:
    # RESP3 messages are pushes: an array shaped like a RESP2 message (a list holding "message") is a reply.
    s = resp3_session()
    s.from_client(cmd("SUBSCRIBE", "a"))
    s.from_upstream(pconf(b"subscribe", b"a", 1))
    s.from_client(cmd("LRANGE", "l", "0", "-1") + cmd("AUTH", "default", "x"))
    looks_like_message = arr(bulk(b"message"), bulk(b"a"), bulk(b"hi"))
    s.from_upstream(looks_like_message)
    assert s.take_client() == pconf(b"subscribe", b"a", 1) + looks_like_message + OK
    assert s.pending == 0
