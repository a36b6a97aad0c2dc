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


# ------------------------------------------------------------------------------------------ (un)subscribe inside MULTI

RESP2_PONG = arr(bulk(b"pong"), bulk(b""))  # PING's reply in RESP2 subscribed mode


def test_subscribe_queued_in_multi_resp2() -> None:
    s = open_session()
    s.from_client(cmd("MULTI") + cmd("SUBSCRIBE", "b", "c") + cmd("EXEC") + cmd("PING"))
    # PING waits for EXEC's reply: only then is it known whether SUBSCRIBE ran.
    assert requests_in(s.take_upstream()) == [[b"MULTI"], [b"SUBSCRIBE", b"b", b"c"], [b"EXEC"]]
    s.from_upstream(OK + QUEUED + b"*1\r\n" + conf(b"subscribe", b"b", 1))
    assert s.take_upstream() == b""  # one more confirmation of EXEC's to come
    s.from_upstream(conf(b"subscribe", b"c", 2))
    assert s.take_upstream() == cmd("PING")
    msg = arr(bulk(b"message"), bulk(b"b"), bulk(b"hi"))
    s.from_upstream(msg + RESP2_PONG)
    assert s.take_client() == (
        OK + QUEUED + b"*1\r\n" + conf(b"subscribe", b"b", 1) + conf(b"subscribe", b"c", 2) + msg + RESP2_PONG
    )
    assert s.pending == 0
    assert s.subscribed


def test_subscribe_ping_unsubscribe_queued_in_multi_resp2() -> None:
    s = open_session()
    s.from_client(cmd("MULTI") + cmd("SUBSCRIBE", "b", "c") + cmd("PING") + cmd("UNSUBSCRIBE") + cmd("EXEC"))
    s.from_client(cmd("PING") + cmd("AUTH", "default", "x"))
    replies = (
        OK + QUEUED + QUEUED + QUEUED + b"*3\r\n" + conf(b"subscribe", b"b", 1) + conf(b"subscribe", b"c", 2)
        + RESP2_PONG + conf(b"unsubscribe", b"b", 1) + conf(b"unsubscribe", b"c", 0)
    )  # fmt: skip
    s.from_upstream(replies)
    assert requests_in(s.take_upstream())[-1] == [b"PING"]
    s.from_upstream(PONG)
    assert s.take_client() == replies + PONG + OK  # not subscribed any more: AUTH is not refused
    assert s.pending == 0
    assert not s.subscribed


def test_subscribe_queued_in_multi_not_run_when_a_watched_key_changed() -> None:
    s = open_session()
    s.from_client(cmd("WATCH", "k") + cmd("MULTI") + cmd("SUBSCRIBE", "b") + cmd("EXEC") + cmd("UNSUBSCRIBE"))
    s.from_upstream(OK + OK + QUEUED + b"*-1\r\n")
    assert requests_in(s.take_upstream())[-1] == [b"UNSUBSCRIBE"]
    assert not s.subscribed
    s.from_upstream(conf(b"unsubscribe", None, 0))  # one confirmation: nothing was subscribed
    assert s.take_client() == OK + OK + QUEUED + b"*-1\r\n" + conf(b"unsubscribe", None, 0)
    assert s.pending == 0


def test_subscribe_queued_in_multi_not_run_after_a_queuing_error() -> None:
    s = open_session()
    s.from_client(cmd("MULTI") + cmd("SUBSCRIBE", "b") + cmd("NOSUCH") + cmd("EXEC") + cmd("PING"))
    unknown = err("ERR unknown command 'NOSUCH', with args beginning with: ")
    execabort = err("EXECABORT Transaction discarded because of previous errors.")
    s.from_upstream(OK + QUEUED + unknown + execabort)
    assert requests_in(s.take_upstream())[-1] == [b"PING"]
    s.from_upstream(PONG)
    assert s.take_client() == OK + QUEUED + unknown + execabort + PONG
    assert s.pending == 0 and not s.subscribed


def test_ssubscribe_queued_in_multi_is_one_error_reply() -> None:
    s = open_session()
    s.from_client(cmd("MULTI") + cmd("SSUBSCRIBE", "a", "b") + cmd("EXEC") + cmd("PING"))
    assert requests_in(s.take_upstream())[-1] == [b"PING"]  # nothing to wait for
    refused = err("ERR SSUBSCRIBE isn't allowed for a DENY BLOCKING client")
    s.from_upstream(OK + QUEUED + arr(refused) + PONG)
    assert s.take_client() == OK + QUEUED + arr(refused) + PONG
    assert s.pending == 0 and not s.subscribed


def test_subscribe_queued_in_multi_resp3() -> None:
    s = resp3_session()
    s.from_client(cmd("MULTI") + cmd("SUBSCRIBE", "b", "c") + cmd("PING") + cmd("EXEC") + cmd("AUTH", "default", "x"))
    replies = OK + QUEUED + QUEUED + b"*2\r\n" + pconf(b"subscribe", b"b", 1) + pconf(b"subscribe", b"c", 2) + PONG
    s.from_upstream(replies)
    assert s.take_client() == replies + OK  # AUTH's reply after EXEC's last frame, the PONG past its array
    assert s.pending == 0 and s.subscribed


def test_subscribe_queued_in_multi_with_replies_off_is_refused() -> None:
    s = open_session()
    s.from_client(cmd("CLIENT", "REPLY", "OFF") + cmd("MULTI") + cmd("SUBSCRIBE", "b") + cmd("EXEC"))
    s.from_client(cmd("CLIENT", "REPLY", "ON") + cmd("PING"))
    up = requests_in(s.take_upstream())
    assert [b"SUBSCRIBE", b"b"] not in up and [b"DISCARD"] in up
    s.from_upstream(OK + PONG)
    assert s.take_client() == OK + PONG
    assert s.pending == 0 and not s.subscribed


def test_pops_around_a_subscribe_in_multi_are_put_back_for_a_gone_client() -> None:
    s = open_session()
    s.from_client(cmd("MULTI") + cmd("RPOP", "q") + cmd("SUBSCRIBE", "b", "c") + cmd("LPOP", "r") + cmd("EXEC"))
    s.from_upstream(OK + QUEUED + QUEUED + QUEUED)
    assert s.client_gone()
    # EXEC's array holds RPOP's element and the first confirmation; the second confirmation and LPOP's come after.
    s.from_upstream(b"*3\r\n" + bulk(b"m1") + conf(b"subscribe", b"b", 1) + conf(b"subscribe", b"c", 2) + bulk(b"m2"))
    assert s.pending == 0
    assert sorted(s.take_requeues()) == sorted([[b"RPUSH", b"q", b"m1"], [b"LPUSH", b"r", b"m2"]])


def test_pop_after_a_subscribe_in_multi_delivered_is_tracked() -> None:
    s = open_session()
    s.from_client(cmd("MULTI") + cmd("SUBSCRIBE", "b", "c") + cmd("RPOP", "q") + cmd("EXEC"))
    replies = OK + QUEUED + QUEUED + b"*2\r\n" + conf(b"subscribe", b"b", 1) + conf(b"subscribe", b"c", 2) + bulk(b"m")
    s.from_upstream(replies)
    assert s.take_client() == replies
    assert s.tracking_pops
    assert s.undelivered(len(bulk(b"m"))) == [[b"RPUSH", b"q", b"m"]]


def test_client_gone_between_exec_frames_still_puts_back_the_pop_after_them() -> None:
    observer = Observer()
    s = open_session(observer=observer)
    s.from_client(cmd("MULTI") + cmd("SUBSCRIBE", "b", "c") + cmd("RPOP", "q") + cmd("EXEC"))
    s.from_upstream(OK + QUEUED + QUEUED + b"*2\r\n" + conf(b"subscribe", b"b", 1) + conf(b"subscribe", b"c", 2))
    assert s.client_gone()  # RPOP's reply is still to come, past EXEC's array
    s.from_upstream(bulk(b"m"))
    assert s.pending == 0
    assert s.take_requeues() == [[b"RPUSH", b"q", b"m"]]
    assert observer.commands.get(("exec", "ok")) == 1  # once, not once more per frame past its array


# ------------------------------------------------------------------------------------------- after the last reply


def test_no_pubsub_traffic_after_the_protocol_error() -> None:
    s = resp2_subscribed()
    s.from_client(cmd("PING") + b"*1\r\n:1\r\n")
    msg = arr(bulk(b"message"), bulk(b"a"), bulk(b"hi"))
    s.from_upstream(msg + RESP2_PONG + msg)  # the second message came after the reply owed before the error
    assert s.take_client() == msg + RESP2_PONG + err("ERR Protocol error: expected '$', got ':'")
    s.from_upstream(msg)
    assert s.take_client() == b""


def test_no_push_after_quit() -> None:
    s = resp3_session()
    s.from_client(cmd("SUBSCRIBE", "a") + cmd("QUIT"))
    msg = push(bulk(b"message"), bulk(b"a"), bulk(b"hi"))
    s.from_upstream(pconf(b"subscribe", b"a", 1) + msg)
    assert s.take_client() == pconf(b"subscribe", b"a", 1) + OK
