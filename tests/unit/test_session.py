"""session.Session driven with frames; checked by what it sends each way and the events it raises."""

from __future__ import annotations

import pytest

from brokerproxy import resp, session
from brokerproxy.errors import ProtocolError
from brokerproxy.session import AuthFailed, Close, OpenUpstream, Session, UpstreamFailed

# ------------------------------------------------------------------------------------------------------------- helpers


class Users:
    """A fake Authenticator: ``required`` plus a table of passwords."""

    def __init__(self, passwords: dict[bytes, bytes] | None = None, required: bool | None = None) -> None:
        self.passwords = passwords or {}
        self.required = bool(self.passwords) if required is None else required

    def check(self, username: bytes, password: bytes) -> str | None:
        return username.decode() if self.passwords.get(username) == password else None


class DenyFlushall:
    """A fake Policy that refuses FLUSHALL."""

    def check(self, user: str | None, request: resp.Request) -> str | None:
        if request.name == "flushall":
            return "NOPERM this user has no permissions to run the 'flushall' command"
        return None


def cmd(*args: bytes | str) -> bytes:
    return resp.encode_command([a.encode() if isinstance(a, str) else a for a in args])


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def arr(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


def push(*items: bytes) -> bytes:
    return b">%d\r\n" % len(items) + b"".join(items)


def err(text: str) -> bytes:
    return b"-" + text.encode() + b"\r\n"


OK = b"+OK\r\n"
QUEUED = b"+QUEUED\r\n"
NOAUTH = b"-NOAUTH Authentication required.\r\n"
WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
HANDSHAKE = [[b"AUTH", b"upstream-secret"], [b"SELECT", b"2"]]
HELLO3_REPLY = b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n"


def requests_in(data: bytes) -> list[list[bytes]]:
    parser = resp.RequestParser()
    parser.feed(data)
    reqs = [r.args for r in iter(parser.next, None)]
    assert parser.buffered == 0
    return reqs


# The proxy writes commands of its own on a new (or RESET) upstream connection: the configured handshake first, and
# whatever else it needs for itself after it (CLIENT ID). Tests answer those as Redis would, and check only that
# the handshake leads and that the client's own commands follow unchanged.


def answer_own(own: bytes) -> bytes:
    """Redis's replies to the proxy's own commands."""
    out = bytearray()
    for args in requests_in(own):
        out += b":42\r\n" if [a.upper() for a in args[:2]] == [b"CLIENT", b"ID"] else OK
    return bytes(out)


def own_part(up: bytes, client: bytes, handshake: list[list[bytes]] = HANDSHAKE) -> bytes:
    """``up`` must be the proxy's own commands, led by ``handshake``, then exactly the client's ``client``."""
    assert up.endswith(client), up
    own = up[: len(up) - len(client)]
    assert requests_in(own)[: len(handshake)] == handshake
    return own


def settle(s: Session) -> None:
    """Answer what the proxy sent for itself on opening the upstream connection."""
    s.from_upstream(answer_own(s.take_upstream()))
    assert s.take_client() == b""
    assert s.pending == 0


def open_session(**kw: object) -> Session:
    """No users, no handshake: the client is authenticated as default from the start."""
    s = Session(Users(), **kw)  # type: ignore[arg-type]
    assert s.take_events() == [OpenUpstream()]
    settle(s)
    return s


def authed_session() -> Session:
    """Users required; the client has authenticated as alice."""
    s = Session(Users({b"alice": b"pw"}))
    s.from_client(cmd("AUTH", "alice", "pw"))
    assert s.take_client() == OK
    assert s.take_events() == [OpenUpstream()]
    settle(s)
    return s


def closed(events: list[session.Event]) -> bool:
    return [type(e) for e in events] == [Close]


# ------------------------------------------------------------------------------------------------------------ ordering


def test_local_replies_are_spliced_between_forwarded_ones() -> None:
    s = authed_session()
    s.from_client(cmd("GET", "a") + cmd("AUTH", "alice", "pw") + cmd("GET", "b"))
    assert s.take_upstream() == cmd("GET", "a") + cmd("GET", "b")
    assert s.take_client() == b""  # +OK waits behind GET a
    s.from_upstream(bulk(b"1"))
    assert s.take_client() == bulk(b"1") + OK
    assert s.pending == 1
    s.from_upstream(bulk(b"2"))
    assert s.take_client() == bulk(b"2")
    assert s.pending == 0


def test_replies_in_order_across_splits() -> None:
    s = open_session()
    s.from_client(cmd("GET", "a") + cmd("AUTH", "nobody") + cmd("GET", "b") + cmd("AUTH", "default", "x"))
    replies = bulk(b"first") + bulk(b"second")
    out = bytearray()
    for i in range(len(replies)):
        s.from_upstream(replies[i : i + 1])
        out += s.take_client()
    no_password = err(session.AUTH_NO_PASSWORD)
    assert bytes(out) == bulk(b"first") + no_password + bulk(b"second") + OK


def test_local_reply_with_nothing_pending_is_immediate() -> None:
    s = open_session()
    s.from_client(cmd("AUTH", "default", "whatever"))
    assert s.take_client() == OK
    assert s.take_upstream() == b""


def test_empty_multibulk_is_ignored() -> None:
    s = open_session()
    s.from_client(b"*0\r\n*-1\r\n" + cmd("PING"))
    assert s.take_upstream() == cmd("PING")
    assert s.pending == 1


def test_inline_request_is_forwarded_as_multibulk() -> None:
    s = open_session()
    s.from_client(b'SET a "b c"\r\n')
    assert s.take_upstream() == cmd("SET", "a", "b c")


def test_reply_with_no_request_is_a_protocol_error() -> None:
    s = open_session()
    with pytest.raises(ProtocolError):
        s.from_upstream(OK)


# ------------------------------------------------------------------------------------------------------ authentication


def test_noauth_before_authentication() -> None:
    s = Session(Users({b"alice": b"pw"}))
    assert s.take_events() == []  # no upstream connection for an unauthenticated client
    s.from_client(cmd("GET", "a") + cmd("SET", "a", "b"))
    assert s.take_client() == NOAUTH * 2
    assert s.take_upstream() == b""
    assert s.user is None


def test_auth_user_pass_ok() -> None:
    s = Session(Users({b"alice": b"pw"}))
    s.from_client(cmd("AUTH", "alice", "pw") + cmd("GET", "a"))
    assert s.take_client() == OK
    assert s.take_events() == [OpenUpstream()]
    own = own_part(s.take_upstream(), cmd("GET", "a"), handshake=[])
    assert b"pw" not in own
    assert s.user == "alice"
    s.from_upstream(answer_own(own) + bulk(b"v"))
    assert s.take_client() == bulk(b"v")


def test_auth_wrong_password() -> None:
    s = Session(Users({b"alice": b"pw"}))
    s.from_client(cmd("AUTH", "alice", "nope") + cmd("GET", "a"))
    assert s.take_client() == b"-WRONGPASS invalid username-password pair or user is disabled.\r\n" + NOAUTH
    assert s.take_events() == [AuthFailed("alice")]
    assert s.take_upstream() == b""
    assert s.user is None


def test_auth_unknown_user() -> None:
    s = Session(Users({b"alice": b"pw"}))
    s.from_client(cmd("AUTH", "mallory", "pw"))
    assert s.take_client() == WRONGPASS
    assert s.take_events() == [AuthFailed("mallory")]


def test_auth_one_arg_is_the_default_user() -> None:
    s = Session(Users({b"default": b"pw"}))
    s.from_client(cmd("AUTH", "pw"))
    assert s.take_client() == OK
    assert s.user == "default"


def test_auth_one_arg_without_users() -> None:
    s = open_session()
    s.from_client(cmd("AUTH", "secret"))
    assert s.take_client() == (
        b"-ERR AUTH <password> called without any password configured for the default user. "
        b"Are you sure your configuration is correct?\r\n"
    )
    assert s.take_upstream() == b""


def test_auth_without_users_accepts_only_default() -> None:
    s = open_session()
    s.from_client(cmd("AUTH", "default", "anything") + cmd("AUTH", "alice", "anything"))
    assert s.take_client() == OK + WRONGPASS
    assert s.take_events() == [AuthFailed("alice")]


@pytest.mark.parametrize("args", [["AUTH"], ["AUTH", "a", "b", "c"]])
def test_auth_arity(args: list[str]) -> None:
    s = open_session()
    s.from_client(cmd(*args))
    assert s.take_client() == b"-ERR wrong number of arguments for 'auth' command\r\n"


def test_credentials_are_never_forwarded() -> None:
    s = Session(Users({b"alice": b"s3cr3t"}), upstream_handshake=HANDSHAKE)
    s.from_client(cmd("AUTH", "alice", "s3cr3t") + cmd("HELLO", "3", "AUTH", "alice", "s3cr3t") + cmd("PING"))
    assert b"s3cr3t" not in s.take_upstream()


# --------------------------------------------------------------------------------------------------------------- HELLO


def test_hello_auth_authenticates_and_strips_credentials() -> None:
    s = Session(Users({b"alice": b"pw"}))
    s.from_client(cmd("HELLO", "3", "AUTH", "alice", "pw"))
    assert s.take_events() == [OpenUpstream()]
    own = own_part(s.take_upstream(), cmd("HELLO", "3"), handshake=[])
    assert b"pw" not in own
    assert s.protocol == 3
    assert s.user == "alice"
    assert s.take_client() == b""
    s.from_upstream(answer_own(own) + HELLO3_REPLY)
    assert s.take_client() == HELLO3_REPLY
    assert s.protocol == 3


def test_hello_auth_setname() -> None:
    s = Session(Users({b"alice": b"pw"}))
    s.from_client(cmd("hello", "3", "auth", "alice", "pw", "setname", "worker-1"))
    own_part(s.take_upstream(), cmd("HELLO", "3", "SETNAME", "worker-1"), handshake=[])


def test_hello_auth_after_handshake() -> None:
    s = Session(Users({b"alice": b"pw"}), upstream_handshake=HANDSHAKE)
    s.from_client(cmd("HELLO", "3", "AUTH", "alice", "pw"))
    own = own_part(s.take_upstream(), cmd("HELLO", "3"))
    s.from_upstream(answer_own(own) + HELLO3_REPLY)
    assert s.take_client() == HELLO3_REPLY


def test_hello_wrong_password() -> None:
    s = Session(Users({b"alice": b"pw"}))
    s.from_client(cmd("HELLO", "3", "AUTH", "alice", "bad"))
    assert s.take_client() == WRONGPASS
    assert s.take_upstream() == b""
    assert s.protocol == 2
    assert s.user is None


def test_hello_without_auth_when_required() -> None:
    s = Session(Users({b"alice": b"pw"}))
    s.from_client(cmd("HELLO", "3"))
    assert s.take_client() == (
        b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH "
        b"<user> <pass> option can be used to authenticate the client and select the RESP protocol version at the "
        b"same time\r\n"
    )
    assert s.take_upstream() == b""
    assert s.protocol == 2


@pytest.mark.parametrize("version", ["1", "4", "0"])
def test_hello_unsupported_version(version: str) -> None:
    s = open_session()
    s.from_client(cmd("HELLO", version))
    assert s.take_client() == b"-NOPROTO unsupported protocol version\r\n"
    assert s.take_upstream() == b""
    assert s.protocol == 2


def test_hello_non_integer_version() -> None:
    s = open_session()
    s.from_client(cmd("HELLO", "three"))
    assert s.take_client() == b"-ERR Protocol version is not an integer or out of range\r\n"
    assert s.take_upstream() == b""


def test_hello_when_authenticated_is_forwarded_as_is() -> None:
    s = open_session()
    raw = cmd("hello", "3")
    s.from_client(raw)
    assert s.take_upstream() == raw
    assert s.protocol == 3


def test_hello_error_reply_restores_protocol() -> None:
    s = open_session()
    s.from_client(cmd("HELLO", "3"))
    assert s.protocol == 3
    s.from_upstream(b"-ERR something went wrong\r\n")
    assert s.take_client() == b"-ERR something went wrong\r\n"
    assert s.protocol == 2


# -------------------------------------------------------------------------------------------------- upstream handshake


def test_handshake_sent_once_authenticated_and_swallowed() -> None:
    s = Session(Users({b"alice": b"pw"}), upstream_handshake=HANDSHAKE)
    s.from_client(cmd("GET", "x"))
    assert s.take_client() == NOAUTH
    assert s.take_upstream() == b""
    s.from_client(cmd("AUTH", "alice", "pw") + cmd("GET", "a"))
    assert s.take_client() == OK
    assert s.take_events() == [OpenUpstream()]
    own = own_part(s.take_upstream(), cmd("GET", "a"))
    replies = answer_own(own)
    for i in range(len(replies)):  # swallowed, whatever the split
        s.from_upstream(replies[i : i + 1])
    assert s.take_client() == b""
    s.from_upstream(bulk(b"v"))
    assert s.take_client() == bulk(b"v")
    assert s.take_events() == []
    # Authenticating again does not replay it.
    s.from_client(cmd("AUTH", "alice", "pw"))
    assert s.take_upstream() == b""
    assert s.take_client() == OK


def test_handshake_sent_at_once_without_users() -> None:
    s = Session(Users(), upstream_handshake=HANDSHAKE)
    assert s.take_events() == [OpenUpstream()]
    own = own_part(s.take_upstream(), b"")
    # A local reply waits for the handshake's replies like any other.
    s.from_client(cmd("AUTH", "default", "x"))
    assert s.take_client() == b""
    s.from_upstream(answer_own(own))
    assert s.take_client() == OK


def test_handshake_error_raises_upstream_failed() -> None:
    s = Session(Users({b"alice": b"pw"}), upstream_handshake=HANDSHAKE)
    s.from_client(cmd("AUTH", "alice", "pw") + cmd("GET", "a"))
    s.take_client()
    s.take_events()
    s.from_upstream(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    events = s.take_events()
    assert len(events) == 1 and isinstance(events[0], UpstreamFailed)
    assert "WRONGPASS" in events[0].reason
    assert s.take_client() == b""  # the client never sees the proxy's own handshake
    # Nor what Redis says after it (its refusals of the rest of the handshake and of GET): the proxy answers.
    s.from_upstream(NOAUTH + NOAUTH)
    assert s.take_client() == b""


def test_handshake_select_error_raises_upstream_failed() -> None:
    s = Session(Users(), upstream_handshake=HANDSHAKE)
    s.take_events()
    s.from_upstream(OK + b"-ERR DB index is out of range\r\n")
    assert s.take_events() == [UpstreamFailed("ERR DB index is out of range")]
    assert s.take_client() == b""


def test_upstream_connection_id_is_recorded() -> None:
    # The proxy learns its upstream connection's CLIENT ID, to end a gone client's blocked pop with CLIENT UNBLOCK.
    s = Session(Users(), upstream_handshake=HANDSHAKE)
    own = own_part(s.take_upstream(), b"")
    assert [b"CLIENT", b"ID"] in requests_in(own)
    s.from_upstream(answer_own(own))
    assert s.upstream_id == 42
    assert s.take_client() == b""


def test_upstream_connection_id_refused_is_not_fatal() -> None:
    s = Session(Users())
    s.take_events()
    own = s.take_upstream()
    s.from_client(cmd("GET", "a"))
    refusal = b"-NOPERM this user has no permissions to run the 'client|id' command\r\n"
    s.from_upstream(answer_own(own).replace(b":42\r\n", refusal) + bulk(b"v"))
    assert s.take_events() == []
    assert s.take_client() == bulk(b"v")
    assert s.upstream_id is None


@pytest.mark.parametrize(
    ("reply", "addr"),
    [
        (bulk(b"id=42 addr=10.0.0.7:51234 laddr=10.0.0.1:6379 fd=8 name= age=0"), b"10.0.0.7:51234"),
        (b"=61\r\ntxt:id=42 addr=[::1]:6000 laddr=[::1]:6379 fd=8 name=x age=3 \r\n", b"[::1]:6000"),  # RESP3
        (b"-ERR unknown subcommand 'INFO'. Try CLIENT HELP.\r\n", None),  # Redis before 6.2: not fatal
    ],
    ids=["resp2", "resp3-verbatim", "old-redis"],
)
def test_upstream_connection_address_is_recorded(reply: bytes, addr: bytes | None) -> None:
    # ...and its address as Redis sees it, for CLIENT KILL ID … ADDR … of a connection lost to us but not to Redis.
    s = Session(Users(), upstream_handshake=HANDSHAKE)
    s.take_events()
    own = own_part(s.take_upstream(), b"")
    assert requests_in(own)[-1] == [b"CLIENT", b"INFO"]
    s.from_client(cmd("GET", "a"))
    s.from_upstream(OK * (len(requests_in(own)) - 2) + b":42\r\n" + reply + bulk(b"v"))
    assert s.take_events() == []
    assert s.take_client() == bulk(b"v")
    assert (s.upstream_id, s.upstream_addr) == (42, addr)


# -------------------------------------------------------------------------------------------------------- RESP3 pushes


def test_push_frames_do_not_consume_a_slot() -> None:
    s = open_session()
    s.from_client(cmd("HELLO", "3") + cmd("GET", "a") + cmd("AUTH", "default", "x") + cmd("GET", "b"))
    s.from_upstream(HELLO3_REPLY)
    assert s.take_client() == HELLO3_REPLY
    invalidate = push(bulk(b"invalidate"), arr(bulk(b"a")))
    message = push(bulk(b"message"), bulk(b"ch"), bulk(b"hi"))
    s.from_upstream(invalidate)  # before the reply to GET a
    assert s.take_client() == invalidate
    assert s.pending == 3
    s.from_upstream(bulk(b"1") + message + bulk(b"2"))
    assert s.take_client() == bulk(b"1") + OK + message + bulk(b"2")
    assert s.pending == 0
    s.from_upstream(message)  # with nothing pending: still passed on, no error
    assert s.take_client() == message


def test_push_with_attribute_is_still_a_push() -> None:
    s = open_session()
    s.from_client(cmd("GET", "a"))
    attributed = b"|1\r\n+key\r\n:1\r\n" + push(bulk(b"message"), bulk(b"ch"), bulk(b"x"))
    s.from_upstream(attributed + bulk(b"v"))
    assert s.take_client() == attributed + bulk(b"v")
    assert s.pending == 0


def test_resp3_subscribe_confirmations_keep_their_place() -> None:
    s = open_session()
    s.from_client(cmd("HELLO", "3"))
    assert s.take_upstream() == cmd("HELLO", "3")
    s.from_upstream(HELLO3_REPLY)
    assert s.take_client() == HELLO3_REPLY
    s.from_client(cmd("SUBSCRIBE", "a", "b") + cmd("AUTH", "default", "x"))
    assert s.take_upstream() == cmd("SUBSCRIBE", "a", "b")
    # Confirmations are pushes, not replies; but Redis sends them before it answers anything sent later, so the
    # proxy's own reply waits for them.
    assert s.take_client() == b""
    assert s.pending == 2
    confirmations = push(bulk(b"subscribe"), bulk(b"a"), b":1\r\n") + push(bulk(b"subscribe"), bulk(b"b"), b":2\r\n")
    s.from_upstream(confirmations)
    assert s.take_client() == confirmations + OK
    assert s.pending == 0
    assert s.subscribed


# ------------------------------------------------------------------------------------------------------- RESP2 pub/sub


def conf(kind: bytes, channel: bytes | None, count: int) -> bytes:
    return arr(bulk(kind), b"$-1\r\n" if channel is None else bulk(channel), b":%d\r\n" % count)


def message(channel: bytes, data: bytes) -> bytes:
    return arr(bulk(b"message"), bulk(channel), bulk(data))


#: A local reply in RESP2 subscribed mode: Redis refuses AUTH there, and so does the proxy, in the same words.
CANT_AUTH = err(
    "ERR Can't execute 'auth': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
)


def subscribed_session() -> Session:
    s = open_session()
    s.from_client(cmd("SUBSCRIBE", "a", "b"))
    assert s.take_upstream() == cmd("SUBSCRIBE", "a", "b")
    assert s.pending == 1
    s.from_upstream(conf(b"subscribe", b"a", 1))
    assert s.pending == 1  # one more confirmation owed
    s.from_upstream(conf(b"subscribe", b"b", 2))
    assert s.pending == 0
    assert s.take_client() == conf(b"subscribe", b"a", 1) + conf(b"subscribe", b"b", 2)
    assert s.subscribed
    return s


def test_resp2_subscribe_two_confirmations_then_messages() -> None:
    s = open_session()
    s.from_client(cmd("SUBSCRIBE", "a", "b") + cmd("AUTH", "default", "x"))
    s.from_upstream(conf(b"subscribe", b"a", 1))
    # Redis runs AUTH after SUBSCRIBE, in subscribed mode: refused. The refusal waits for the second confirmation.
    assert s.take_client() == conf(b"subscribe", b"a", 1)
    s.from_upstream(conf(b"subscribe", b"b", 2))
    assert s.take_client() == conf(b"subscribe", b"b", 2) + CANT_AUTH
    msgs = message(b"a", b"hello") + message(b"b", b"world")
    s.from_upstream(msgs)
    assert s.take_client() == msgs
    assert s.pending == 0


def test_resp2_messages_between_replies_in_subscribed_mode() -> None:
    s = subscribed_session()
    s.from_client(cmd("PING") + cmd("AUTH", "default", "x"))
    assert s.take_upstream() == cmd("PING")
    s.from_upstream(message(b"a", b"m1"))
    assert s.take_client() == message(b"a", b"m1")  # not the PING's reply: the AUTH refusal still waits
    assert s.pending == 2
    pong = arr(bulk(b"pong"), bulk(b""))
    s.from_upstream(pong + message(b"b", b"m2"))
    assert s.take_client() == pong + CANT_AUTH + message(b"b", b"m2")
    assert s.pending == 0


def test_resp2_pmessage() -> None:
    s = open_session()
    s.from_client(cmd("PSUBSCRIBE", "news.*"))
    s.from_upstream(conf(b"psubscribe", b"news.*", 1))
    s.take_client()
    s.from_client(cmd("PING"))
    pmsg = arr(bulk(b"pmessage"), bulk(b"news.*"), bulk(b"news.x"), bulk(b"hi"))
    s.from_upstream(pmsg)
    assert s.pending == 1
    s.from_upstream(arr(bulk(b"pong"), bulk(b"")))
    assert s.pending == 0
    assert s.take_client() == pmsg + arr(bulk(b"pong"), bulk(b""))


def test_unsubscribe_all_from_two_channels() -> None:
    s = subscribed_session()
    s.from_client(cmd("UNSUBSCRIBE") + cmd("AUTH", "default", "x"))
    assert s.take_upstream() == cmd("UNSUBSCRIBE")
    s.from_upstream(conf(b"unsubscribe", b"a", 1))
    assert s.take_client() == conf(b"unsubscribe", b"a", 1)
    assert s.pending == 2
    s.from_upstream(conf(b"unsubscribe", b"b", 0))
    assert s.take_client() == conf(b"unsubscribe", b"b", 0) + OK
    assert s.pending == 0
    assert not s.subscribed
    # Out of subscribed mode, an array that looks like a message is an ordinary reply again.
    s.from_client(cmd("LRANGE", "l", "0", "-1") + cmd("AUTH", "default", "x"))
    looks_like_message = message(b"x", b"y")
    s.from_upstream(looks_like_message)
    assert s.take_client() == looks_like_message + OK
    assert s.pending == 0


def test_unsubscribe_with_no_subscriptions_confirms_once() -> None:
    s = open_session()
    s.from_client(cmd("UNSUBSCRIBE") + cmd("AUTH", "default", "x"))
    s.from_upstream(conf(b"unsubscribe", None, 0))
    assert s.take_client() == conf(b"unsubscribe", None, 0) + OK
    assert s.pending == 0


def test_unsubscribe_named_channels() -> None:
    s = subscribed_session()
    s.from_client(cmd("UNSUBSCRIBE", "a") + cmd("AUTH", "default", "x"))
    s.from_upstream(conf(b"unsubscribe", b"a", 1))
    assert s.take_client() == conf(b"unsubscribe", b"a", 1) + CANT_AUTH  # still subscribed to b
    assert s.subscribed
    s.from_upstream(message(b"b", b"still here"))
    assert s.take_client() == message(b"b", b"still here")


# ------------------------------------------------------------------------------------------------------------- MONITOR


def test_monitor_stream_passes_through() -> None:
    s = open_session()
    s.from_client(cmd("MONITOR"))
    assert s.take_upstream() == cmd("MONITOR")
    s.from_upstream(OK)
    assert s.take_client() == OK
    assert s.pending == 0
    lines = b"".join(b'+1700000000.%06d [0 127.0.0.1:5000] "GET" "k%d"\r\n' % (i, i) for i in range(100))
    s.from_upstream(lines)
    assert s.take_client() == lines
    assert s.pending == 0


def test_monitor_refused_does_not_enter_monitor_mode() -> None:
    s = open_session()
    s.from_client(cmd("MONITOR"))
    s.from_upstream(b"-ERR not allowed\r\n")
    assert s.take_client() == b"-ERR not allowed\r\n"
    with pytest.raises(ProtocolError):  # a frame no request waits for
        s.from_upstream(b"+1700000000.0 [0 127.0.0.1:5000] \"GET\" \"k\"\r\n")


# -------------------------------------------------------------------------------------------------------- CLIENT REPLY


def redis_answers(upstream: bytes, values: dict[bytes, bytes] | None = None) -> bytes:
    """What Redis sends back for these commands, honouring CLIENT REPLY OFF/ON/SKIP as Redis does: SKIP silences
    the next command Redis runs; ON clears it and is answered; OFF silences everything until ON."""
    values = values or {}
    out = bytearray()
    off = skip_armed = False
    for args in requests_in(upstream):
        name = args[0].upper()
        skipping, skip_armed = skip_armed, False
        if name == b"CLIENT" and args[1].upper() == b"REPLY":
            mode = args[2].upper()
            if mode == b"SKIP":
                skip_armed = not off
            elif mode == b"OFF":
                off = True
            else:
                off = False
                out += OK
            continue
        if name == b"RESET":
            off = skip_armed = False  # RESET turns replies back on before it answers; a SKIP already running holds
        if off or skipping:
            continue
        if name == b"RESET":
            out += b"+RESET\r\n"
        elif name == b"CLIENT" and args[1].upper() == b"ID":
            out += b":42\r\n"
        elif name == b"GET":
            out += bulk(values[args[1]]) if args[1] in values else b"$-1\r\n"
        elif name == b"PING":
            out += b"+PONG\r\n"
        else:
            out += OK
    return bytes(out)


def test_client_reply_off_then_on() -> None:
    s = open_session()
    s.from_client(cmd("CLIENT", "REPLY", "OFF") + cmd("SET", "a", "1") + cmd("AUTH", "default", "x"))
    assert s.pending == 0
    assert s.take_client() == b""  # the local reply is silenced too
    s.from_client(cmd("GET", "a") + cmd("CLIENT", "REPLY", "ON") + cmd("GET", "a"))
    up = s.take_upstream()
    assert requests_in(up) == [
        [b"CLIENT", b"REPLY", b"OFF"], [b"SET", b"a", b"1"], [b"GET", b"a"], [b"CLIENT", b"REPLY", b"ON"],
        [b"GET", b"a"],
    ]
    assert s.pending == 2
    s.from_upstream(redis_answers(up, {b"a": b"1"}))
    assert s.take_client() == OK + bulk(b"1")
    assert s.pending == 0


def test_client_reply_skip() -> None:
    s = open_session()
    s.from_client(cmd("CLIENT", "REPLY", "SKIP") + cmd("SET", "a", "1") + cmd("GET", "a"))
    assert s.pending == 1
    s.from_upstream(redis_answers(s.take_upstream(), {b"a": b"1"}))
    assert s.take_client() == bulk(b"1")
    assert s.pending == 0


def test_client_reply_skip_when_off_does_nothing() -> None:
    s = open_session()
    s.from_client(
        cmd("CLIENT", "REPLY", "OFF") + cmd("CLIENT", "REPLY", "SKIP") + cmd("CLIENT", "REPLY", "ON") + cmd("PING")
    )
    assert s.pending == 2
    s.from_upstream(redis_answers(s.take_upstream()))
    assert s.take_client() == OK + b"+PONG\r\n"
    assert s.pending == 0


def test_client_reply_skip_then_on() -> None:
    s = open_session()
    s.from_client(cmd("CLIENT", "REPLY", "SKIP") + cmd("CLIENT", "REPLY", "ON") + cmd("PING"))
    s.from_upstream(redis_answers(s.take_upstream()))
    assert s.take_client() == OK + b"+PONG\r\n"
    assert s.pending == 0


def test_client_reply_skip_before_a_locally_answered_command() -> None:
    # The client's SKIP silences the AUTH the proxy answers itself; Redis, which never sees that AUTH, must not
    # silence the GET after it instead, or every later reply goes to the wrong request.
    s = open_session()
    s.from_client(cmd("CLIENT", "REPLY", "SKIP") + cmd("AUTH", "default", "x") + cmd("GET", "a") + cmd("GET", "b"))
    assert s.take_client() == b""
    s.from_upstream(redis_answers(s.take_upstream(), {b"a": b"1", b"b": b"2"}))
    assert s.take_client() == bulk(b"1") + bulk(b"2")
    assert s.pending == 0


def test_reset_is_answered_even_with_replies_off() -> None:
    s = open_session()
    s.from_client(cmd("CLIENT", "REPLY", "OFF") + cmd("RESET") + cmd("PING"))
    up = s.take_upstream()
    reqs = requests_in(up)
    assert reqs[:2] == [[b"CLIENT", b"REPLY", b"OFF"], [b"RESET"]] and reqs[-1] == [b"PING"]
    s.from_upstream(redis_answers(up))
    assert s.take_client() == b"+RESET\r\n+PONG\r\n"
    assert s.pending == 0


def test_client_reply_skip_then_reset() -> None:
    s = open_session()
    s.from_client(cmd("CLIENT", "REPLY", "SKIP") + cmd("RESET") + cmd("PING"))
    s.from_upstream(redis_answers(s.take_upstream()))
    assert s.take_client() == b"+PONG\r\n"
    assert s.pending == 0


# ---------------------------------------------------------------------------------------------------------- MULTI/EXEC


def test_multi_exec_forwarded() -> None:
    s = open_session()
    reqs = cmd("MULTI") + cmd("SET", "a", "1") + cmd("GET", "a") + cmd("EXEC")
    s.from_client(reqs)
    assert s.take_upstream() == reqs
    replies = OK + QUEUED + QUEUED + arr(OK, bulk(b"1"))
    s.from_upstream(replies)
    assert s.take_client() == replies
    assert s.pending == 0


def test_denied_command_in_multi_aborts_exec() -> None:
    s = open_session(policy=DenyFlushall())
    s.from_client(cmd("MULTI") + cmd("SET", "a", "1") + cmd("FLUSHALL") + cmd("EXEC") + cmd("GET", "a"))
    assert requests_in(s.take_upstream()) == [[b"MULTI"], [b"SET", b"a", b"1"], [b"DISCARD"], [b"GET", b"a"]]
    s.from_upstream(OK + QUEUED + OK + b"$-1\r\n")
    assert s.take_client() == (
        OK + QUEUED + err("NOPERM this user has no permissions to run the 'flushall' command")
        + b"-EXECABORT Transaction discarded because of previous errors.\r\n" + b"$-1\r\n"
    )
    assert s.pending == 0


def test_denied_command_outside_multi_is_not_forwarded() -> None:
    s = open_session(policy=DenyFlushall())
    s.from_client(cmd("FLUSHALL") + cmd("MULTI") + cmd("EXEC"))
    assert requests_in(s.take_upstream()) == [[b"MULTI"], [b"EXEC"]]  # the later EXEC is not aborted


def test_discard_clears_a_dirty_transaction() -> None:
    s = open_session(policy=DenyFlushall())
    s.from_client(cmd("MULTI") + cmd("FLUSHALL") + cmd("DISCARD") + cmd("MULTI") + cmd("EXEC"))
    assert requests_in(s.take_upstream()) == [[b"MULTI"], [b"DISCARD"], [b"MULTI"], [b"EXEC"]]


# ---------------------------------------------------------------------------------------------------------------- QUIT


def test_quit() -> None:
    s = open_session()
    s.from_client(cmd("GET", "a") + cmd("QUIT") + cmd("GET", "b"))
    assert s.take_upstream() == cmd("GET", "a")
    assert closed(s.take_events())
    assert s.closing
    assert s.take_client() == b""
    s.from_upstream(bulk(b"1"))
    assert s.take_client() == bulk(b"1") + OK
    s.from_client(cmd("GET", "c"))
    assert s.take_upstream() == b""
    assert s.take_client() == b""
    assert s.pending == 0


def test_quit_before_auth() -> None:
    s = Session(Users({b"alice": b"pw"}))
    s.from_client(cmd("QUIT"))
    assert s.take_client() == OK
    assert closed(s.take_events())
    assert s.take_upstream() == b""


# --------------------------------------------------------------------------------------------------------------- RESET


def test_reset_replays_handshake_and_deauthenticates() -> None:
    s = Session(Users({b"alice": b"pw"}), upstream_handshake=HANDSHAKE)
    s.from_client(cmd("AUTH", "alice", "pw") + cmd("HELLO", "3"))
    s.take_events()
    own = own_part(s.take_upstream(), cmd("HELLO", "3"))
    s.from_upstream(answer_own(own) + HELLO3_REPLY)
    assert s.take_client() == OK + HELLO3_REPLY
    assert s.protocol == 3
    s.from_client(cmd("RESET") + cmd("GET", "a"))
    up = s.take_upstream()
    assert up.startswith(cmd("RESET"))
    own = up[len(cmd("RESET")) :]
    assert requests_in(own)[:2] == HANDSHAKE  # replayed right behind RESET
    assert s.protocol == 2
    assert s.user is None
    assert s.take_client() == b""  # NOAUTH waits behind RESET
    s.from_upstream(b"+RESET\r\n" + answer_own(own))
    assert s.take_client() == b"+RESET\r\n" + NOAUTH
    assert s.pending == 0
    assert s.take_events() == []


def test_reset_without_users_stays_authenticated() -> None:
    s = open_session()
    s.from_client(cmd("HELLO", "3") + cmd("RESET") + cmd("GET", "a"))
    reqs = requests_in(s.take_upstream())
    assert reqs[:2] == [[b"HELLO", b"3"], [b"RESET"]]
    assert reqs[-1] == [b"GET", b"a"]
    assert s.protocol == 2
    assert s.user == "default"


def test_reset_leaves_subscribed_mode() -> None:
    # RESET unsubscribes without confirmations (Redis sends just +RESET). After it, an ordinary reply shaped like
    # a pub/sub message must be taken as the reply it is.
    s = subscribed_session()
    s.from_client(cmd("RESET"))
    up = s.take_upstream()
    assert up.startswith(cmd("RESET"))
    s.from_upstream(b"+RESET\r\n" + answer_own(up[len(cmd("RESET")) :]))
    assert s.take_client() == b"+RESET\r\n"
    assert s.pending == 0
    assert not s.subscribed
    s.from_client(cmd("LRANGE", "l", "0", "-1") + cmd("AUTH", "default", "x"))
    looks_like_message = message(b"x", b"y")
    s.from_upstream(looks_like_message)
    assert s.take_client() == looks_like_message + OK
    assert s.pending == 0


# ----------------------------------------------------------------------------------------------------- protocol errors


def test_protocol_error_after_pending_replies() -> None:
    s = open_session()
    s.from_client(cmd("GET", "a") + b"*abc\r\n" + cmd("GET", "b"))
    assert s.take_upstream() == cmd("GET", "a")
    events = s.take_events()
    assert closed(events) and "invalid multibulk length" in events[0].reason  # type: ignore[union-attr]
    assert s.closing
    assert s.take_client() == b""
    s.from_upstream(bulk(b"1"))
    assert s.take_client() == bulk(b"1") + b"-ERR Protocol error: invalid multibulk length\r\n"
    s.from_client(cmd("GET", "c"))
    assert s.take_upstream() == b""
    assert s.take_client() == b""
    assert s.take_events() == []


def test_protocol_error_with_nothing_pending() -> None:
    s = open_session()
    s.from_client(b"*1\r\nx")
    assert s.take_client() == b"-ERR Protocol error: expected '$', got 'x'\r\n"
    assert closed(s.take_events())
    assert s.take_upstream() == b""


def test_protocol_error_is_sent_even_with_replies_off() -> None:
    s = open_session()
    s.from_client(cmd("CLIENT", "REPLY", "OFF") + b'SET a "b\r\n')
    assert s.take_client() == b"-ERR Protocol error: unbalanced quotes in request\r\n"


def test_protocol_error_from_limits() -> None:
    s = open_session(limits=resp.Limits(max_bulk_length=3))
    s.from_client(cmd("SET", "abc", "abcd"))
    assert s.take_client() == b"-ERR Protocol error: invalid bulk length\r\n"
    assert s.take_upstream() == b""
    s = open_session(limits=resp.Limits(max_buffered_bytes=16))
    s.from_client(b"*2\r\n$3\r\nGET\r\n$9\r")  # 16 bytes buffered: at the limit
    assert s.take_client() == b""
    assert not s.closing
    s.from_client(b"\n")
    assert s.take_client() == b"-ERR Protocol error: client query buffer exceeds the limit\r\n"
    assert closed(s.take_events())


# ----------------------------------------------------------------------------------------------------- no message lost


def gone_with(request: bytes, protocol: int = 2) -> Session:
    s = open_session()
    if protocol == 3:
        s.from_client(cmd("HELLO", "3"))
        s.from_upstream(HELLO3_REPLY)
        s.take_client()
    s.from_client(request)
    s.take_upstream()
    assert s.client_gone() is True
    return s


def test_client_gone_with_brpop_requeues_the_element() -> None:
    s = gone_with(cmd("BRPOP", "q", "0"))
    s.from_upstream(b"*2\r\n$1\r\nq\r\n$3\r\nmsg\r\n")
    assert s.take_requeues() == [[b"RPUSH", b"q", b"msg"]]
    assert s.take_client() == b""
    assert s.take_requeues() == []


def test_client_gone_with_blpop_requeues_at_the_left() -> None:
    s = gone_with(cmd("BLPOP", "q1", "q2", "5"))
    s.from_upstream(arr(bulk(b"q2"), bulk(b"job")))
    assert s.take_requeues() == [[b"LPUSH", b"q2", b"job"]]


def test_client_gone_rpop_count_restores_order() -> None:
    s = gone_with(cmd("RPOP", "q", "2"))
    s.from_upstream(arr(bulk(b"c"), bulk(b"b")))
    assert s.take_requeues() == [[b"RPUSH", b"q", b"b", b"c"]]


@pytest.mark.parametrize(("protocol", "score"), [(2, bulk(b"1.5")), (3, b",1.5\r\n")])
def test_client_gone_bzpopmin_requeues_with_zadd(protocol: int, score: bytes) -> None:
    s = gone_with(cmd("BZPOPMIN", "z", "0"), protocol)
    s.from_upstream(arr(bulk(b"z"), bulk(b"member"), score))
    assert s.take_requeues() == [[b"ZADD", b"z", b"1.5", b"member"]]


@pytest.mark.parametrize(("protocol", "null"), [(2, b"*-1\r\n"), (3, b"_\r\n")])
def test_client_gone_null_pop_requeues_nothing(protocol: int, null: bytes) -> None:
    s = gone_with(cmd("BRPOP", "q", "1"), protocol)
    s.from_upstream(null)
    assert s.take_requeues() == []
    assert s.pending == 0


def test_client_gone_only_pop_replies_are_requeued() -> None:
    s = gone_with(cmd("GET", "a") + cmd("AUTH", "default", "x") + cmd("BRPOP", "q", "0") + cmd("LPOP", "p"))
    s.from_upstream(bulk(b"not-a-pop") + push(bulk(b"message"), bulk(b"c"), bulk(b"m")))
    assert s.take_requeues() == []
    s.from_upstream(arr(bulk(b"q"), bulk(b"x")) + bulk(b"y"))
    assert s.take_requeues() == [[b"RPUSH", b"q", b"x"], [b"LPUSH", b"p", b"y"]]
    assert s.take_client() == b""
    assert s.pending == 0


def test_client_gone_without_pop_outstanding() -> None:
    s = open_session()
    s.from_client(cmd("GET", "a") + cmd("SET", "b", "1"))
    assert s.client_gone() is False
    s = open_session()
    assert s.client_gone() is False


def test_client_gone_after_pop_was_answered() -> None:
    s = open_session()
    s.from_client(cmd("BRPOP", "q", "0") + cmd("GET", "a"))
    s.from_upstream(arr(bulk(b"q"), bulk(b"x")))
    assert s.client_gone() is False  # the pop was answered; only GET is outstanding


def test_blocked_while_a_blocking_command_is_outstanding() -> None:
    s = open_session()
    s.from_client(cmd("GET", "a"))
    assert not s.blocked
    s.from_client(cmd("BRPOP", "q", "0"))
    assert s.blocked
    s.from_upstream(bulk(b"1"))
    assert s.blocked
    s.from_upstream(b"*-1\r\n")
    assert not s.blocked


def undelivered_case() -> tuple[Session, list[bytes]]:
    s = open_session()
    s.from_client(cmd("RPOP", "q") + cmd("GET", "x") + cmd("AUTH", "default", "x") + cmd("LPOP", "p", "2"))
    replies = [bulk(b"m1"), bulk(b"not-a-pop"), arr(bulk(b"m2"), bulk(b"m3"))]
    s.from_upstream(b"".join(replies))
    out = s.take_client()
    parts = [replies[0], replies[1], OK, replies[2]]
    assert out == b"".join(parts)
    assert s.written == len(out)
    return s, parts


def test_undelivered_requeues_pops_in_the_unsent_tail() -> None:
    s, parts = undelivered_case()
    assert s.undelivered(len(parts[3])) == [[b"LPUSH", b"p", b"m3", b"m2"]]


def test_undelivered_skips_non_pops() -> None:
    s, parts = undelivered_case()
    # The unsent tail starts inside GET's reply: GET and the local +OK are not pops, the first RPOP was sent.
    assert s.undelivered(len(parts[3]) + len(parts[2]) + len(parts[1])) == [[b"LPUSH", b"p", b"m3", b"m2"]]


def test_undelivered_counts_a_partly_sent_reply() -> None:
    s, parts = undelivered_case()
    unsent = len(parts[3]) + len(parts[2]) + len(parts[1]) + 1  # the last byte of RPOP's reply is unsent
    assert s.undelivered(unsent) == [[b"RPUSH", b"q", b"m1"], [b"LPUSH", b"p", b"m3", b"m2"]]


def test_undelivered_nothing_unsent() -> None:
    s, _ = undelivered_case()
    assert s.undelivered(0) == []


def test_delivered_forgets_flushed_pops() -> None:
    s, parts = undelivered_case()
    s.delivered(s.written)
    assert s.undelivered(len(parts[3])) == []


@pytest.mark.parametrize(
    "reply",
    [
        b"%1\r\n*1\r\n:1\r\n:2\r\n",  # a map whose key is an array: hiredis raises TypeError on it
        b"!21\r\nSYNTAX invalid syntax\r\n",  # a blob error: hiredis does not know the type
        b"(1234567890123456789012345678901234567890\r\n",  # a big number
    ],
)
def test_replies_hiredis_cannot_read_still_pass_through(reply: bytes) -> None:
    """The fast path hands what hiredis fails on to the exact framer: forwarded byte for byte, in order."""
    s = open_session()
    s.from_client(cmd("GET", "a") + cmd("GET", "b"))
    s.take_upstream()
    s.from_upstream(reply + b"$1\r\nx\r\n")
    assert s.take_client() == reply + b"$1\r\nx\r\n"
    assert s.pending == 0


@pytest.mark.parametrize("kind", [b"+", b"="])
def test_simple_string_argument_is_a_protocol_error_on_every_path(kind: bytes) -> None:
    # hiredis reads a simple (or verbatim) string as bytes, as it reads a bulk string: the fast path must not take
    # the read for a request. Redis answers it with a protocol error and closes the connection; so does the proxy.
    s = open_session()
    s.from_client(cmd("GET", "a") + b"*2\r\n$3\r\nGET\r\n" + kind + b"txt:foo\r\n")
    assert s.take_upstream() == cmd("GET", "a")
    assert closed(s.take_events())
    s.from_upstream(bulk(b"1"))
    assert s.take_client() == bulk(b"1") + b"-ERR Protocol error: expected '$', got '" + kind + b"'\r\n"
