"""Sans-IO state machine for one client connection and the upstream connection pinned to it.

Theory of operation
-------------------
Bytes in, actions out. The asyncio layer calls ``from_client(data)`` and ``from_upstream(data)`` and then sends
``take_client()`` to the client and ``take_upstream()`` to Redis, and carries out ``take_events()``. Nothing here
does IO.

Replies go back in request order. Every request that gets a reply pushes one *slot* onto a FIFO:

* a forwarded request's slot waits for ``expected`` frames from Redis (one, or one confirmation per channel for an
  ``(UN)SUBSCRIBE a b``: RESP2 arrays, or RESP3 push frames, which Redis also sends before anything it answers
  later, and even with CLIENT REPLY OFF);
* a request the proxy answers itself (``AUTH``, ``QUIT``, a refusal) gets a slot that already holds its reply;
* the proxy's own upstream handshake (``AUTH``, ``SELECT`` with the upstream credentials) gets *swallow* slots, whose
  replies the client never sees.

Local slots can only wait behind forwarded ones: whenever the head of the FIFO holds a finished reply it is written
at once. So the head, if any, is always waiting for Redis, and the next frame from Redis belongs to it.

Frames that are not replies consume no slot: RESP3 push frames (``>``) other than those confirmations, RESP2
pub/sub messages (arrays starting with ``message``/``pmessage``/``smessage`` while subscribed), and everything after
``MONITOR``. Nothing is written after a closing connection's last reply (its protocol error, QUIT's ``+OK``).

State mirrored from the connection, in the order Redis sees commands: the authenticated user, the RESP version
(``HELLO``), ``MULTI``, the subscriptions (to count confirmations), ``CLIENT REPLY``, ``RESET``. A command Redis
refuses in RESP2 subscribed mode changes none of it. One case cannot be told in advance: an ``EXEC`` whose
transaction queued (un)subscriptions sends their confirmations past the end of its array, and only if it ran; the
requests after it wait, unparsed, for its reply.

Two fast paths come first. A read of whole, ordinary requests (no command the proxy must look at, the
connection in no special state, every request allowed by the ACL) is counted by hiredis and forwarded exactly as it
arrived, one shared slot per command name; a read of whole replies to such requests goes back the same way. Any
doubt (a partial frame, a push, a command with a handler, a pop, a refusal) and the read goes to the exact framers
instead, untouched; ``at_frame_boundary`` is how a hiredis reader proves it holds no partial frame.

When the client goes away with a pop outstanding (``client_gone()`` returns True), the asyncio layer half-closes
the upstream connection and keeps feeding what Redis still sends; every element that arrives for the gone client
becomes a requeue command in ``take_requeues()``. Pop replies written to the client but still in the transport's
buffer when it died are recovered by ``undelivered()``.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import acl_log, resp
from .acl_log import AclLog
from .commands import (
    BLOCKING,
    NO_AUTH,
    POPS,
    SUBSCRIBE,
    SUBSCRIBED_MODE_ALLOWED,
    UNSUBSCRIBE,
    Requeue,
    requeue_for,
)
from .errors import ProtocolError
from .observe import KNOWN_COMMANDS, UNKNOWN, Observer

# Replies, worded as Redis words them so that redis-py raises the same exception classes.
NOAUTH = "NOAUTH Authentication required."
NOAUTH_HELLO = (
    "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> "
    "<pass> option can be used to authenticate the client and select the RESP protocol version at the same time"
)
WRONGPASS = "WRONGPASS invalid username-password pair or user is disabled."
AUTH_NO_PASSWORD = (
    "ERR AUTH <password> called without any password configured for the default user. Are you sure your "
    "configuration is correct?"
)
NOPROTO = "NOPROTO unsupported protocol version"
EXECABORT = "EXECABORT Transaction discarded because of previous errors."
NOT_IN_MULTI = "ERR Command not allowed inside a transaction"
PUBSUB_ONLY = (
    "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
)


def wrong_args(name: str) -> str:
    return f"ERR wrong number of arguments for '{name}' command"


class Authenticator(Protocol):
    """Checks client credentials. Implemented by the config's user table (and by the ACL module later)."""

    @property
    def required(self) -> bool:
        """True when clients must authenticate (users are configured)."""
        ...

    def check(self, username: bytes, password: bytes) -> str | None:
        """The user's name if the password is right for an enabled user, else None. Constant time."""
        ...


class Policy(Protocol):
    """The per-command check that the ACL slots in here. Returns an error reply text, or None to allow."""

    def check(self, user: str | None, request: resp.Request) -> str | None: ...


# Events for the asyncio layer.
@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """The client may now reach Redis: open the pinned upstream connection (if not open yet)."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the client connection once what has been written is flushed."""

    reason: str


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """Redis refused the proxy's own handshake (its AUTH or SELECT)."""

    reason: str


@dataclass(frozen=True, slots=True)
class AuthFailed:
    username: str


@dataclass(frozen=True, slots=True)
class Denied:
    """The ACL refused a command (for the audit trail: never argument values beyond the refused key/channel)."""

    username: str | None
    command: str
    kind: str  # command, key, channel
    object: str


@dataclass(frozen=True, slots=True)
class Audited:
    """A command of the audit list was allowed and sent (its name only, never its arguments)."""

    username: str | None
    command: str


Event = OpenUpstream | Close | UpstreamFailed | AuthFailed | Denied | Audited

# Slot kinds
_FORWARD = 0  # reply from Redis goes to the client
_LOCAL = 1  # reply already known
_SWALLOW = 2  # reply from Redis to the proxy's own handshake: dropped, an error fails the connection
_REPLACE = 3  # reply from Redis dropped, a local reply sent instead (EXEC turned into DISCARD)
_TRAILING = 4  # frames of a reply past its end: EXEC's, after its array (see Session._exec_reply)


class _Slot:
    __slots__ = ("data", "expected", "hook", "kind", "name", "ok_key", "plain", "queued", "request")

    def __init__(
        self,
        kind: int,
        expected: int = 1,
        data: bytes = b"",
        request: resp.Request | None = None,
        hook: str = "",
        name: str = "",
    ) -> None:
        self.kind = kind
        self.expected = expected
        self.data = data
        self.request = request
        self.hook = hook  # "" on the hot path; names a reply handler otherwise
        self.name = name if request is None else request.name
        # An ordinary forwarded request: one reply, nothing to do with it but forward it (and count it).
        self.plain = kind == _FORWARD and expected == 1 and not hook and request is None
        # Its key in the observer's command counter, made once per name rather than once per command.
        self.ok_key = (self.name if self.name in KNOWN_COMMANDS else UNKNOWN, "ok")
        # EXEC: the pops queued in its transaction, by position in its reply (their own replies were +QUEUED).
        self.queued: Sequence[tuple[int, resp.Request]] = ()  # a list only on EXEC's slot (no allocation per slot)


#: Commands that never take a plain slot: their replies are read (pops), or they may block (CLIENT UNBLOCK).
_NOT_PLAIN = POPS.keys() | BLOCKING
#: Blocking commands whose timeout is a null reply (WAIT and WAITAOF answer counts instead).
_NULL_ON_TIMEOUT = BLOCKING - {"wait", "waitaof"}
#: Commands the fast path hands to the exact path: the above, and every command with a handler.
_NO_EVENTS: list[Event] = []
#: Watched commands whose reply is a plain integer (a push's new length): the fast paths can observe them.
_INT_REPLY_WATCHED = frozenset({"lpush", "rpush", "lpushx", "rpushx"})
#: Reads of replies longer than this skip the hiredis fast path: decoding a large value costs more than framing it.
_FAST_REPLY_MAX = 16 * 1024
_ReplyError = resp.ReplyErrorType
#: Pops whose keys are all between the name and a trailing timeout: the ones the consumers gauge follows.
_QUEUED = b"+QUEUED\r\n"
#: RESP3 (p/s)subscribe confirmations, as push frames.
_CONFIRMATIONS = (b">3\r\n$9\r\nsubscribe\r\n", b">3\r\n$10\r\npsubscribe\r\n", b">3\r\n$10\r\nssubscribe\r\n")
#: RESP3 (un)subscribe confirmations of every kind (the first element of the push frame).
_PUSH_CONFIRMATIONS = tuple(
    b">3\r\n$%d\r\n%s\r\n" % (len(k), k)
    for k in (b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe", b"ssubscribe", b"sunsubscribe")
)
#: Hooks of slots that RESP3 (un)subscribe confirmations (push frames) belong to: an (un)subscribe's, and EXEC's
#: past the end of its array.
_CONFIRMED = ("subscribe", "exec-rest")
#: A request's arguments are all bulk strings; hiredis would also hand back integers, arrays, nulls, errors...
_BYTES_ONLY = frozenset({bytes})
_CONSUMER_POPS = frozenset({"brpop", "blpop", "bzpopmin", "bzpopmax"})
_NOT_FAST: frozenset[str] = frozenset()  # filled in below, once _HANDLERS exists
_BROKEN = object()  # what _gets returns when hiredis cannot read a frame


def _gets(reader: Any) -> Any:
    """The next frame from a fast-path hiredis reader, False if incomplete, _BROKEN if hiredis fails on it: it raises
    ProtocolError on a type it does not know, and TypeError on a RESP3 map whose key is an aggregate. The exact
    framers take such a read instead."""
    try:
        return reader.gets()
    except Exception:  # see above; only hiredis runs inside this try
        return _BROKEN


_PushNotification = resp.PushNotification

#: The slots of ordinary forwarded requests, one shared object per command name, so that the hot path allocates
#: no slot. Bounded: past the bound, names share one slot named "unknown".
_PLAIN_SLOTS: dict[str, _Slot] = {}
_PLAIN_SLOTS_MAX = 1024


def _plain_slot(name: str) -> _Slot:
    slot = _PLAIN_SLOTS.get(name)
    if slot is None:
        if len(_PLAIN_SLOTS) >= _PLAIN_SLOTS_MAX:
            name = "unknown"
        slot = _PLAIN_SLOTS.setdefault(name, _Slot(_FORWARD, name=name))
    return slot


_CLIENT_ID = resp.encode_command([b"CLIENT", b"ID"])
_CLIENT_INFO = resp.encode_command([b"CLIENT", b"INFO"])
_ADDR_FIELD = re.compile(rb"(?:^|\s)addr=(\S+)")
_HELLO = resp.encode_command([b"HELLO"])
_PING = resp.encode_command([b"PING"])
_MESSAGE_PREFIXES = (b"*3\r\n$7\r\nmessage\r\n", b"*4\r\n$8\r\npmessage\r\n", b"*3\r\n$8\r\nsmessage\r\n")


class Session:
    def __init__(
        self,
        authenticator: Authenticator,
        *,
        upstream_handshake: list[list[bytes]] = (),  # type: ignore[assignment]
        limits: resp.Limits = resp.DEFAULT_LIMITS,
        policy: Policy | None = None,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        acl_log: AclLog | None = None,
        client_info: str = "",
        audited: frozenset[str] = frozenset(),
        identity: str | None = None,
    ) -> None:
        self._auth = authenticator
        # The user a verified client certificate maps to: authenticated from the start, and again after RESET.
        self._identity = identity
        self._policy = policy
        self._observer = observer
        self._clock = clock
        self._acl_log = acl_log
        self.client_info = client_info  # for ACL LOG entries: "addr=… laddr=…"
        self._probe = resp.Request([b""], b"")
        self._auth_command = b"AUTH"  # reused for the policy check on the fast path
        # Requests the fast path must leave to the exact one: those whose replies the observer reads. Those it
        # reads only the request of (SET, PUBLISH…) the fast path hands it itself.
        self._watch_requests = observer.WATCH_REQUESTS if observer else frozenset()
        self._watch_replies = observer.WATCH_REPLIES if observer else frozenset()
        # Pushes: the observer reads their request and their integer reply; the fast paths hand it both.
        self._fast_observed = self._watch_replies & _INT_REPLY_WATCHED
        # Commands the audit trail lists (full names, "config|set") and the names they start with.
        self._audited = audited
        self._audit_top = frozenset(n.split("|", 1)[0] for n in audited)
        self._not_fast = _NOT_FAST | (self._watch_replies - self._fast_observed) | self._audit_top
        self._watch_inline = self._watch_requests - self._not_fast
        self._timed = 0.0  # when the first request of a batch sent on an idle connection was read (metrics)
        self._timed_name = ""
        self._requests = resp.request_parser(limits)
        self._replies = resp.ReplyParser()
        # hiredis readers for the fast paths (None without hiredis): see _fast_requests and _fast_replies.
        self._fast_reader = resp.fast_reader()
        self._fast_reply_reader = resp.fast_reader()
        # Each argument takes at least 6 bytes ("$0\r\n\r\n").
        self._max_array = limits.max_array_length
        self._fast_limit = min(limits.max_bulk_length, 6 * limits.max_array_length, limits.max_buffered_bytes)
        self._handshake = [resp.encode_command(c) for c in upstream_handshake]
        self._slots: deque[_Slot] = deque()
        self._out_client = bytearray()
        self._out_upstream = bytearray()
        self._events: list[Event] = []
        self._requeues: Requeue = []

        self.user: str | None = identity or (None if authenticator.required else "default")
        self.upstream_id: int | None = None  # CLIENT ID of the pinned upstream connection
        self.upstream_addr: bytes | None = None  # its addr= in CLIENT INFO: ip:port as Redis sees it
        self.protocol = 2
        self.db = 0
        self._in_multi = False
        self._multi_dirty = False
        self._selected: bytes | None = None  # the client's last successful SELECT, replayed on a new connection
        self._swallow_pushes = 0  # RESP3 confirmations of the proxy's own re-subscriptions still to come
        self._watching = False  # WATCH since the last EXEC/DISCARD/UNWATCH: the keys are watched on this connection
        self._tracking = False  # CLIENT TRACKING on
        self._client_name: bytes | None = None  # CLIENT SETNAME (or HELLO SETNAME), replayed on a new connection
        self._multi_pops: list[tuple[int, resp.Request]] = []  # pops queued in this MULTI, by position
        self._multi_queued = 0  # commands queued in this MULTI so far
        self._multi_subs: list[tuple[int, resp.Request]] = []  # (un)subscriptions queued in this MULTI, by position
        # EXEC of a transaction that queued (un)subscriptions: the requests after it wait (unparsed) for its reply,
        # which alone tells how many frames it takes and what is subscribed after it (see _exec_reply).
        self._hold = False
        self._released = False  # the hold ended in this read of replies: parse the requests that waited
        self._exec_subs: list[tuple[int, resp.Request]] = []
        self._exec_pops: list[tuple[int, resp.Request]] = []
        self._exec_trailing: dict[int, resp.Request] = {}  # pops whose replies come after EXEC's array, by frame
        self._exec_seen = 0  # frames after EXEC's array so far
        self._channels: set[bytes] = set()
        self._patterns: set[bytes] = set()
        self._shard: set[bytes] = set()
        self._subscribed_seen = 0  # subscriptions Redis last confirmed (channels + patterns, shard channels)
        self._shard_seen = 0
        self._monitor = False
        self._reply_off = False
        self._reply_skip = False
        self._closing = False  # QUIT or a protocol error: read no more requests
        self._gone = False  # client disconnected
        self._upstream_failed = False  # Redis refused the proxy's handshake
        # Pop replies written to the client: (end offset in the client byte stream, request, raw reply).
        self._written = 0
        self._delivered_pops: deque[tuple[int, _Slot, bytes]] = deque()

        if self.user is not None:
            self._open_upstream()

    # -------------------------------------------------------------------------------- outputs

    # The take_* methods hand over the buffer itself (no copy) and start a new one.

    def take_client(self) -> bytes | bytearray:
        out = self._out_client
        if not out:
            return b""
        self._out_client = bytearray()
        self._written += len(out)
        return out

    def take_upstream(self) -> bytes | bytearray:
        out = self._out_upstream
        if not out:
            return b""
        self._out_upstream = bytearray()
        return out

    def take_events(self) -> list[Event]:
        ev = self._events
        if not ev:
            return _NO_EVENTS  # shared and never appended to: the common case allocates nothing
        self._events = []
        return ev

    @property
    def tracking_pops(self) -> bool:
        """Pop replies were written whose delivery is not yet confirmed (see ``delivered``)."""
        return bool(self._delivered_pops)

    def take_requeues(self) -> Requeue:
        rq = self._requeues
        self._requeues = []
        return rq

    @property
    def pending(self) -> int:
        """Replies still owed to the client."""
        return len(self._slots)

    @property
    def written(self) -> int:
        """Bytes handed to the client so far (by ``take_client``)."""
        return self._written

    @property
    def subscribed(self) -> bool:
        return bool(self._channels or self._patterns or self._shard)

    @property
    def closing(self) -> bool:
        return self._closing

    # -------------------------------------------------------------------------------- client side

    def from_client(self, data: bytes) -> None:
        if self._closing or self._gone:
            return
        if self._fast_requests(data):
            return
        parser = self._requests
        try:
            parser.feed(data)
            while not self._closing and not self._hold:  # held: what follows waits in the parser
                req = parser.next()
                if req is None:
                    break
                if req.args:
                    self._request(req)
        except ProtocolError as exc:
            self._local(resp.error(f"ERR Protocol error: {exc}"), force=True)
            self._closing = True
            self._events.append(Close(f"protocol error: {exc}"))

    def _fast_requests(self, data: bytes) -> bool:
        """The common case in one tight loop: a read holding only whole, ordinary requests (no command the proxy
        must look at, in a connection in no special state) is forwarded as it arrived, one slot per request.
        False (and nothing done) when anything is out of the ordinary: the exact path then takes the read."""
        reader = self._fast_reader
        if (
            reader is None
            or self.user is None
            or self._reply_off
            or self._reply_skip
            or self._in_multi  # commands queued in MULTI are counted (_forward), for EXEC's reply
            or self._requests.buffered
            or data[:1] != b"*"
            # A read this short cannot hold an argument or an argument count over the limits.
            or len(data) > self._fast_limit
            # A read that ends inside a frame would be parsed twice: leave it to the exact path.
            or data[-2:] != b"\r\n"
            or _first_name(data) in self._not_fast
            # A huge count hiredis would allocate first; a simple string it would read as a bulk string.
            or resp.hiredis_misreads(data, self._max_array, 0, 0)
        ):
            return False
        reader.feed(data)
        names: list[str] = []
        names_cache = resp.COMMAND_NAMES
        not_fast = self._not_fast
        policy = self._policy
        probe = self._probe
        user = self.user
        watch_inline = self._watch_inline
        watched: list[list[bytes]] = []
        fast_observed = self._fast_observed
        observed: dict[int, list[bytes]] = {}  # index in names -> args, for pushes whose reply is observed
        while (args := _gets(reader)) is not False:
            if type(args) is not list or not args or type(args[0]) is not bytes:
                break  # not a request (or hiredis could not read it: _BROKEN)
            if len(args) > 1 and not _BYTES_ONLY.issuperset(map(type, args)):
                break  # an integer, array, null... as an argument: the exact path answers Redis's protocol error
            name = names_cache.get(args[0]) or resp.command_name(args[0])
            if name in not_fast:
                break
            if policy is not None:
                probe.args = args
                probe.name = name
                if policy.check(user, probe) is not None:
                    break  # refused: the exact path answers it
            if name in watch_inline:
                watched.append(args)
                if name in fast_observed:
                    observed[len(names)] = args
            names.append(name)
        else:
            if resp.at_frame_boundary(reader):
                self._out_upstream += data
                slots = self._slots
                observer = self._observer
                if observer is not None:
                    if not slots and names:
                        self._timed = self._clock()
                        self._timed_name = names[0]
                    for args in watched:
                        observer.on_request(args, self._in_multi)
                append = slots.append
                if observed:
                    for i, name in enumerate(names):
                        args = observed.get(i)
                        if args is None:
                            append(_plain_slot(name))
                        else:
                            append(_Slot(_FORWARD, request=resp.Request(args, b"")))
                else:
                    for name in names:
                        append(_plain_slot(name))
                return True
        # Out of the ordinary: start the fast reader afresh, let the exact path parse this read.
        self._fast_reader = resp.fast_reader()
        return False

    def _request(self, req: resp.Request) -> None:
        name = req.name
        if self.user is None and name not in NO_AUTH:
            self._refuse(NOAUTH)
            return
        if self._policy is not None and name not in NO_AUTH:
            denial = self._policy.check(self.user, req)
            if denial is not None:
                if denial.startswith("NOPERM"):  # not Redis's arity or unknown-command errors
                    self._denied(req, denial)
                self._refuse(denial)
                return
        if name in self._audit_top:
            sub = req.args[1].decode("latin-1").lower() if len(req.args) >= 2 and name not in self._audited else ""
            full = f"{name}|{sub}" if sub else name
            if full in self._audited:
                self._events.append(Audited(self.user, full))
        handler = _HANDLERS.get(name)
        if handler is None:
            self._forward(req)
        elif (
            self.protocol == 2
            and (self._channels or self._patterns or self._shard)
            and name not in SUBSCRIBED_MODE_ALLOWED
        ):
            self._refused_in_pubsub(req)
        else:
            handler(self, req)

    def _forward(self, req: resp.Request, raw: bytes | None = None, expected: int = 1, hook: str = "") -> None:
        self._out_upstream += req.raw if raw is None else raw
        observer = self._observer
        if observer is not None:
            name = req.name
            if not self._slots and not self._timed:
                self._timed = self._clock()
                self._timed_name = name
            if name in self._watch_requests:
                observer.on_request(req.args, self._in_multi)
            if name in _CONSUMER_POPS:
                observer.consumer_blocked(req.args[1:-1])
        if self._in_multi and req.name not in ("multi", "exec", "discard"):
            if req.name in POPS:
                self._multi_pops.append((self._multi_queued, req))
            self._multi_queued += 1
        if self._reply_off or self._reply_skip:
            self._reply_skip = False
            if hook != "subscribe":  # (un)subscribe confirmations are pushes: Redis sends them even so
                expected = 0
                hook = ""
        if expected == 1 and not hook and req.name not in _NOT_PLAIN and req.name not in self._watch_replies:
            self._slots.append(_plain_slot(req.name))
        elif expected:
            self._slots.append(_Slot(_FORWARD, expected, request=req, hook=hook))

    def _local(self, data: bytes, force: bool = False) -> None:
        if not force and (self._reply_off or self._reply_skip):
            if self._reply_skip:
                # Redis's own SKIP is armed for the next command it runs, which is not this one (Redis never sees
                # it): spend it on a PING whose reply Redis then drops, so the next forwarded reply is not dropped.
                self._out_upstream += _PING
            self._reply_skip = False
            return
        if self._slots:
            self._slots.append(_Slot(_LOCAL, data=data))
        else:
            self._out_client += data

    def _denied(self, req: resp.Request, text: str) -> None:
        """Record a refusal by the ACL: in ACL LOG, the metrics and the events (for the audit trail)."""
        explain = getattr(self._policy, "explain", None)
        denial = explain(self.user, req) if explain is not None else None
        kind = denial.reason if denial is not None else "other"
        if self._acl_log is not None and denial is not None and self.user is not None:
            context = "multi" if self._in_multi else "toplevel"
            self._acl_log.record_denial(denial, self.user, context=context, client_info=self.client_info)
        if self._observer is not None:
            self._observer.acl_denied(self.user, kind)
            self._observer.command(req.name, "denied")  # never reached Redis: neither ok nor error
        obj = denial.object.decode("utf-8", "backslashreplace") if denial is not None else ""
        self._events.append(Denied(self.user, req.name, kind, obj))

    def _refused_in_pubsub(self, req: resp.Request) -> None:
        """A command with a handler, in RESP2 subscribed mode: Redis refuses it ("Can't execute") and changes
        nothing, so neither may the proxy (a HELLO 3 taken as switching to RESP3, a MULTI as started...). It goes to
        Redis as it is, for Redis to refuse in its own words; the proxy refuses here the ones it answers itself."""
        name = req.name
        if name == "hello":
            self._forward(req, _HELLO)  # the client's credentials never reach Redis, not even to be refused
        elif name in ("auth", "acl"):
            if len(req.args) < 2:
                self._local(resp.error(wrong_args(name)))  # Redis checks the arity first
            else:
                full = name if name == "auth" else f"acl|{req.args[1].decode('utf-8', 'replace').lower()}"
                self._local(resp.error(PUBSUB_ONLY.format(full)))
        else:
            self._forward(req)

    def _refuse(self, text: str) -> None:
        """A request the proxy answers with an error and does not forward."""
        if self._in_multi:
            self._multi_dirty = True
        self._local(resp.error(text))

    def _open_upstream(self) -> None:
        self._events.append(OpenUpstream())
        self._send_handshake()

    def _send_handshake(self) -> None:
        for cmd in self._handshake:
            self._out_upstream += cmd
            self._slots.append(_Slot(_SWALLOW))
        # The upstream connection's id, so that a pop left behind by a gone client can be ended with
        # CLIENT UNBLOCK from a side connection. Its error (an upstream ACL without CLIENT) is not fatal.
        self._out_upstream += _CLIENT_ID
        self._slots.append(_Slot(_SWALLOW, hook="id"))
        # And its address as Redis sees it (through NAT or a relay, not our socket's), so that an upstream connection
        # lost to us but not to Redis can be closed with CLIENT KILL ID … ADDR …, which matches no one else after a
        # restart. Redis before 6.2 has no CLIENT INFO: its error only leaves the address unknown.
        self._out_upstream += _CLIENT_INFO
        self._slots.append(_Slot(_SWALLOW, hook="info"))

    def _authenticated(self, user: str) -> None:
        first = self.user is None
        self.user = user
        if first:
            self._open_upstream()

    # Handlers of the commands the proxy must look at. Each either answers locally or forwards.

    def _cmd_auth(self, req: resp.Request) -> None:
        args = req.args
        self._auth_command = args[0]
        if self._in_multi:
            self._refuse(NOT_IN_MULTI)
            return
        if len(args) == 2:
            if not self._auth.required:
                self._local(resp.error(AUTH_NO_PASSWORD))
                return
            username, password = b"default", args[1]
        elif len(args) == 3:
            username, password = args[1], args[2]
        else:
            self._local(resp.error(wrong_args("auth")))
            return
        user = self._check_password(username, password)
        if user is None:
            self._local(resp.error(WRONGPASS))
            return
        self._local(resp.OK)
        self._authenticated(user)

    def _check_password(self, username: bytes, password: bytes) -> str | None:
        if not self._auth.required and username == b"default":
            user: str | None = "default"  # Redis's default user with nopass: any password
        else:
            user = self._auth.check(username, password)  # another user authenticates as usual, as in Redis
        if user is None:
            self._events.append(AuthFailed(username.decode("utf-8", "replace")))
            if self._acl_log is not None:
                self._acl_log.record_auth_failure(username, self._auth_command, client_info=self.client_info)
        return user

    def _cmd_hello(self, req: resp.Request) -> None:
        args = req.args
        self._auth_command = args[0]
        if self._in_multi:
            self._refuse(NOT_IN_MULTI)
            return
        version = None
        if len(args) >= 2:
            try:
                version = int(args[1])
            except ValueError:
                self._local(resp.error("ERR Protocol version is not an integer or out of range"))
                return
            if version not in (2, 3):
                self._local(resp.error(NOPROTO))
                return
        forwarded = [b"HELLO"] + ([args[1]] if version is not None else [])
        credentials = None
        i = 2
        while i < len(args):
            opt = args[i].lower()
            if opt == b"auth" and i + 2 < len(args):
                credentials = (args[i + 1], args[i + 2])
                i += 3
            elif opt == b"setname" and i + 1 < len(args):
                forwarded += [b"SETNAME", args[i + 1]]
                self._client_name = args[i + 1]
                i += 2
            else:
                self._local(resp.error(f"ERR Syntax error in HELLO option '{args[i].decode('utf-8', 'replace')}'"))
                return
        if credentials is not None:
            user = self._check_password(*credentials)
            if user is None:
                self._local(resp.error(WRONGPASS))
                return
            self._authenticated(user)
        elif self.user is None:
            self._local(resp.error(NOAUTH_HELLO))
            return
        # The client's credentials are never forwarded: Redis sees HELLO <version> [SETNAME name].
        raw = req.raw if credentials is None else resp.encode_command(forwarded)
        previous = self.protocol
        if version is not None:
            self.protocol = version
        self._forward(req, raw, hook=f"hello:{previous}")

    def _cmd_quit(self, req: resp.Request) -> None:
        self._local(resp.OK, force=True)
        self._closing = True
        self._events.append(Close("client sent QUIT"))

    def _cmd_reset(self, req: resp.Request) -> None:
        # RESET also de-authenticates the upstream connection and selects db 0 there: replay the proxy's own
        # handshake right behind it, in the same write, so no command of the client's runs in between.
        self._reply_off = False  # Redis turns replies back on before it answers RESET (a running SKIP still holds)
        self._forward(req, hook="reset")
        self._send_handshake()
        self.protocol = 2
        self.db = 0
        self._in_multi = self._multi_dirty = False
        if self._multi_subs:
            self._multi_subs = []
        self._channels.clear()
        self._patterns.clear()
        self._shard.clear()
        self._reply_off = self._reply_skip = False
        self._monitor = False
        self._watching = self._tracking = False
        self._client_name = self._selected = None
        if self._identity is not None:
            self.user = self._identity
        elif self._auth.required:
            self.user = None

    def _cmd_multi(self, req: resp.Request) -> None:
        if not self._in_multi:
            self._in_multi = True
            self._multi_dirty = False
            self._multi_pops, self._multi_queued = [], 0  # (_multi_subs is empty outside MULTI)
        self._forward(req)

    def _cmd_exec(self, req: resp.Request) -> None:
        if self._in_multi and self._multi_dirty:
            # A command the proxy refused would have failed at queue time in Redis: abort as Redis does.
            self._out_upstream += resp.encode_command([b"DISCARD"])
            if self._reply_off or self._reply_skip:
                self._reply_skip = False  # Redis answers the DISCARD with nothing, and the client expects nothing
            else:
                self._slots.append(_Slot(_REPLACE, data=resp.error(EXECABORT)))
            if self._multi_subs:
                self._multi_subs = []
        else:
            pops = self._multi_pops if self._in_multi else []
            slots = len(self._slots)
            if self._multi_subs:  # only ever filled inside MULTI
                self._forward(req, hook="exec")
                self._slots[-1].queued = pops  # where their replies are is known at EXEC's reply (_exec_reply)
                self._exec_subs, self._exec_pops = self._multi_subs, pops
                self._multi_subs = []
                self._hold = True
                self._fast_reader = None  # the fast path declines while requests are held
            else:
                self._forward(req)
                if pops and len(self._slots) > slots:
                    # Its reply carries what the queued pops took: read it (not a plain slot) if the client is gone.
                    slot = self._slots[-1] = _Slot(_FORWARD, request=req)
                    slot.queued = pops
        self._in_multi = self._multi_dirty = False
        self._multi_pops, self._multi_queued = [], 0
        self._watching = False

    def _cmd_discard(self, req: resp.Request) -> None:
        self._in_multi = self._multi_dirty = False
        if self._multi_subs:
            self._multi_subs = []
        self._watching = False
        self._forward(req)

    def _cmd_watch(self, req: resp.Request) -> None:
        self._watching = True
        self._forward(req)

    def _cmd_unwatch(self, req: resp.Request) -> None:
        self._watching = False
        self._forward(req)

    def _cmd_select(self, req: resp.Request) -> None:
        self._forward(req, hook="" if self._in_multi else "select")

    def _cmd_subscribe(self, req: resp.Request) -> None:
        if len(req.args) < 2:
            self._forward(req)  # Redis answers an arity error: one reply
        elif self._in_multi:
            # SSUBSCRIBE is refused inside EXEC (one error reply, as any command's); the others subscribe there.
            self._queue_subscription(req, req.name != "ssubscribe")
        else:
            # One confirmation per channel: an array in RESP2, a push frame in RESP3. A push is no reply, but the
            # proxy's own replies to later requests must still wait for it, as Redis's do.
            self._forward(req, expected=self._subscription_change(req), hook="subscribe")

    def _cmd_unsubscribe(self, req: resp.Request) -> None:
        if self._in_multi:
            self._queue_subscription(req, True)
        else:
            self._forward(req, expected=self._subscription_change(req), hook="subscribe")

    def _queue_subscription(self, req: resp.Request, subscribes: bool) -> None:
        """An (un)subscription inside MULTI: Redis queues it (+QUEUED) and runs it at EXEC."""
        if subscribes:
            if self._reply_off:
                # With replies off, what EXEC sends is its confirmations if it ran, nothing if it did not: the proxy
                # could not tell how many frames to wait for. Refused (silently, as replies are off): EXEC aborts.
                self._refuse(NOT_IN_MULTI)
                return
            self._multi_subs.append((self._multi_queued, req))
        self._forward(req)

    def _subscription_change(self, req: resp.Request) -> int:
        """Apply an (un)subscription to the subscriptions mirrored from Redis; how many confirmations it gets."""
        channels = req.args[1:]
        kind = SUBSCRIBE.get(req.name)
        if kind is not None:
            self._subscriptions(kind).update(channels)
            return len(channels)
        subs = self._subscriptions(UNSUBSCRIBE[req.name])
        if channels:
            subs.difference_update(channels)
            return len(channels)
        count = max(1, len(subs))  # with none, Redis still confirms once (channel nil, count 0)
        subs.clear()
        return count

    def _subscriptions(self, kind: str) -> set[bytes]:
        return self._channels if kind == "channel" else self._patterns if kind == "pattern" else self._shard

    def _cmd_acl(self, req: resp.Request) -> None:
        """ACL WHOAMI/CAT/LOG are the proxy's own (about its users, not Redis's). Any other subcommand reaches
        Redis only for a user the ACL explicitly allows it; without an ACL, never."""
        log = self._acl_log
        reply = acl_log.answer(req.args, self.user, log, self.protocol) if log is not None else None
        if reply is not None:
            self._local(reply)
        elif self._policy is not None and len(req.args) >= 2:
            self._forward(req)  # the policy already allowed this user acl|<subcommand>
        else:
            sub = req.args[1].decode("utf-8", "replace").lower() if len(req.args) >= 2 else ""
            self._refuse(f"NOPERM this user has no permissions to run the 'acl|{sub}' command")

    def _cmd_monitor(self, req: resp.Request) -> None:
        self._forward(req, hook="monitor")

    def _cmd_client(self, req: resp.Request) -> None:
        args = req.args
        if len(args) == 3 and args[1].lower() == b"reply":
            if self._in_multi:
                # Redis queues it and switches replies at EXEC, in the middle of EXEC's own reply (whose array
                # header still counts the replies it then drops): refused, as AUTH and HELLO are there.
                self._refuse(NOT_IN_MULTI)
                return
            mode = args[2].lower()
            if mode == b"off":
                self._forward(req, expected=0)
                self._reply_off = True
                return
            if mode == b"skip":
                self._forward(req, expected=0)
                self._reply_skip = not self._reply_off
                return
            if mode == b"on":
                self._reply_off = self._reply_skip = False
        if len(args) == 3 and args[1].lower() == b"setname":
            self._client_name = args[2]
        if len(args) >= 3 and args[1].lower() == b"tracking":
            self._tracking = args[2].lower() == b"on"
        self._forward(req)

    # -------------------------------------------------------------------------------- upstream side

    def from_upstream(self, data: bytes) -> None:
        if self._upstream_failed:
            return
        if self._fast_replies(data):
            return
        if self._timed:
            self._end_timing()
        observer = self._observer
        parser = self._replies
        parser.feed(data)
        out = self._out_client
        slots = self._slots
        # Hot path: consecutive replies to plain forwarded requests are written as one span of the upstream
        # buffer, without copying each frame. Anything else flushes the span and takes the slow path.
        span_start = span_end = 0
        while True:
            kind = parser.advance()
            if kind < 0:
                break
            if (
                kind == resp.REPLY
                and slots
                and slots[0].plain
                and not self._monitor
                and not self._subscribed_seen
                and not self._shard_seen
                and not self._gone
            ):
                slot = slots.popleft()
                if observer is not None:
                    observer.command(slot.name, "error" if parser.first == 0x2D else "ok")
                if span_end != parser.start:
                    if span_end:
                        out += parser.span(span_start, span_end)
                    span_start = parser.start
                span_end = parser.pos
                if slots and slots[0].kind == _LOCAL:
                    out += parser.span(span_start, span_end)
                    span_start = span_end = 0
                    self._flush_local()
                continue
            if span_end:
                out += parser.span(span_start, span_end)
                span_start = span_end = 0
            self._frame(kind, parser.frame())
            if self._upstream_failed:
                return
        if span_end:
            out += parser.span(span_start, span_end)
        if self._released:
            self._released = False
            if not self._closing and not self._gone:
                self.from_client(b"")  # the requests that waited for EXEC's reply

    def _fast_replies(self, data: bytes) -> bool:
        """The common case: a read holding only whole replies to ordinary requests is written as it arrived.
        False (and nothing done) otherwise; the exact framer then takes the read."""
        reader = self._fast_reply_reader
        if (
            reader is None
            or self._replies.buffered
            or self._gone
            or self._monitor
            or self._subscribed_seen
            or self._shard_seen
            or data[-2:] != b"\r\n"  # ends inside a frame
            or not self._slots
            or not self._slots[0].plain  # the first reply is not an ordinary one: no use trying
            or len(data) > _FAST_REPLY_MAX  # a big value: framing it in place is cheaper than decoding it
            # hiredis returns a RESP3 attribute as a reply of its own; Redis sends none, but never miscount one.
            or data[:1] == b"|"
            or b"\r\n|" in data
        ):
            return False
        reader.feed(data)
        slots = self._slots
        count = 0
        it = iter(slots)
        errors: list[str] = []
        pushes: list[tuple[list[bytes], int]] = []
        fast_observed = self._fast_observed
        while (reply := _gets(reader)) is not False:
            slot = next(it, None)
            if slot is None or reply is _BROKEN or type(reply) is _PushNotification:
                break
            if not slot.plain:
                req = slot.request
                # A push whose integer reply the observer reads (the queue's new length).
                if slot.hook or req is None or req.name not in fast_observed or type(reply) is not int:
                    break
                pushes.append((req.args, reply))
            if type(reply) is _ReplyError:
                errors.append(slot.name)
            count += 1
        else:
            if resp.at_frame_boundary(reader):
                popleft = slots.popleft
                observer = self._observer
                if observer is None:
                    for _ in range(count):
                        popleft()
                else:
                    self._end_timing()
                    commands = observer.commands
                    for _ in range(count):
                        key = popleft().ok_key
                        commands[key] = commands.get(key, 0) + 1
                    for name in errors:
                        observer.command(name, "error")
                        key = _plain_slot(name).ok_key
                        commands[key] -= 1
                    for args, length in pushes:
                        observer.on_reply(args, b":%d\r\n" % length)
                self._out_client += data
                if slots and slots[0].kind == _LOCAL:
                    self._flush_local()
                return True
        self._fast_reply_reader = resp.fast_reader()
        return False

    def _end_timing(self) -> None:
        """The first reply after a batch sent on an idle connection: its round trip, for the duration histogram
        (one sample per batch: the first command of a pipeline)."""
        if self._timed and self._observer is not None:
            self._observer.observe_command_duration(self._timed_name, self._clock() - self._timed)
        self._timed = 0.0

    def close(self) -> None:
        """The connection is over (both sides): release what the observer counts for it."""
        observer = self._observer
        if observer is not None:
            for slot in self._slots:
                if slot.request is not None and slot.request.name in _CONSUMER_POPS:
                    observer.consumer_unblocked(slot.request.args[1:-1])
        self._slots.clear()

    def _flush_local(self) -> None:
        """Write the local replies now at the head of the FIFO."""
        slots = self._slots
        while slots and slots[0].kind == _LOCAL:
            data = slots.popleft().data
            if not self._gone:
                self._out_client += data

    def _frame(self, kind: int, raw: bytes) -> None:
        """One upstream frame, off the hot path."""
        out = self._out_client
        slots = self._slots
        if kind == resp.PUSH:
            if self._swallow_pushes and raw.startswith(_CONFIRMATIONS):
                self._swallow_pushes -= 1  # a re-subscription's confirmation (reattach): the client saw its own
                return
            if not (
                slots and slots[0].hook in _CONFIRMED and not self._monitor and raw.startswith(_PUSH_CONFIRMATIONS)
            ):
                if not self._gone and not (self._closing and not slots):
                    out += raw
                return
            slot = slots[0]
            if slot.hook == "subscribe":  # an (un)subscribe's: short, as Celery's result backend sends two per task
                if slot.expected == 1 and self._observer is not None:
                    self._observer.command(slot.name, "ok")
                slot.expected -= 1
                if not self._gone:
                    out += raw
                if slot.expected <= 0:
                    slots.popleft()
                    if slots and slots[0].kind == _LOCAL:
                        self._flush_local()
                return
            # Past the end of EXEC's array: EXEC's, below.
        elif self._monitor or ((self._subscribed_seen or self._shard_seen) and raw.startswith(_MESSAGE_PREFIXES)):
            # Not after the last reply of a closing connection (QUIT's +OK, the protocol error): Redis sends
            # nothing after those.
            if not self._gone and not (self._closing and not slots):
                out += raw
            return
        if not slots:
            raise ProtocolError("reply from upstream with no request waiting for it")
        slot = slots[0]
        observer = self._observer
        if observer is not None and slot.kind == _FORWARD and (slot.expected == 1 or raw[:1] == b"-"):
            # Once per command: on its last (or only) reply frame, or its error.
            observer.command(slot.name, "error" if raw[:1] in (b"-", b"!") else "ok")
        if slot.kind == _FORWARD and not slot.hook:
            slots.popleft()
            req = slot.request
            if observer is not None and req is not None:
                if req.name in self._watch_replies:
                    observer.on_reply(req.args, raw)
                if req.name in _CONSUMER_POPS:
                    observer.consumer_unblocked(req.args[1:-1])
            if self._gone:
                self._lost_reply(slot, raw)
            else:
                out += raw
                if req is not None and (req.name in POPS or slot.queued) and not _is_null(raw) and raw != _QUEUED:
                    self._delivered_pops.append((self._written + len(out), slot, raw))
        else:
            self._special_reply(slot, raw)
        self._flush_local()

    def _special_reply(self, slot: _Slot, raw: bytes) -> None:
        is_error = raw[:1] in (b"-", b"!")
        if slot.kind == _SWALLOW:
            self._slots.popleft()
            if slot.hook == "id":
                value = None if is_error else resp.decode(raw)
                self.upstream_id = value if isinstance(value, int) else None
            elif slot.hook == "info":
                match = None if is_error else _ADDR_FIELD.search(raw)
                self.upstream_addr = match.group(1) if match else None
            elif is_error:
                # Nothing after a failed handshake is the client's to see: the proxy answers with the error.
                self._upstream_failed = True
                self._events.append(UpstreamFailed(raw[1:].strip().decode("utf-8", "replace")))
            return
        if slot.kind == _REPLACE:
            self._slots.popleft()
            if not self._gone:
                self._out_client += slot.data
            return
        hook = slot.hook
        if hook == "exec" or hook == "exec-rest":
            self._exec_reply(slot, raw, is_error)
            return
        if hook == "resubscribe":
            self._confirmation(raw)
            slot.expected -= 1
            if slot.expected <= 0 or is_error:
                self._slots.popleft()
            return  # the proxy's own re-subscription (reattach): the client saw its confirmations long ago
        if hook == "subscribe":  # a RESP2 confirmation (RESP3's are pushes, counted in _frame), or an error
            self._confirmation(raw)
            slot.expected -= 1
            if slot.expected <= 0 or is_error:
                self._slots.popleft()
        else:
            self._slots.popleft()
            if hook.startswith("hello:"):
                if is_error:
                    self.protocol = int(hook[6:])
                elif hook == "hello:3" and slot.request is not None and self._hello_version(slot.request) == 2:
                    # Back to RESP2 while subscribed (Redis allows it in RESP3): messages are arrays from now on.
                    self._subscribed_seen = len(self._channels) + len(self._patterns)
                    self._shard_seen = len(self._shard)
            elif hook == "select" and not is_error and slot.request is not None:
                self.db = int(slot.request.args[1])
                self._selected = slot.request.args[1]
            elif hook == "monitor" and not is_error:
                self._monitor = True
            elif hook == "reset" and not is_error:
                # RESET unsubscribed everything without confirmations: messages may arrive up to +RESET, none after.
                self._subscribed_seen = self._shard_seen = 0
        if not self._gone:
            self._out_client += raw

    @staticmethod
    def _hello_version(req: resp.Request) -> int | None:
        """The protocol version a HELLO asks for (already checked to be 2 or 3 when given)."""
        return int(req.args[1]) if len(req.args) >= 2 else None

    def _exec_reply(self, slot: _Slot, raw: bytes, is_error: bool) -> None:
        """A frame of the reply to an EXEC whose transaction queued (un)subscriptions.

        Inside EXEC, an (un)subscription's confirmations (one per channel: RESP2 arrays or RESP3 pushes) take the
        place of its reply, so EXEC's array header counts one frame per command while Redis sends one per
        confirmation: the frames past the array's end are EXEC's too. How many, and what is subscribed after, is
        known once EXEC has run (a WATCHed key or a queuing error and nothing ran); so the requests after EXEC
        were held until its first frame, and are parsed once its last one has come."""
        if slot.hook == "exec-rest":
            pop = self._exec_trailing.get(self._exec_seen)
            self._exec_seen += 1
            if pop is not None:
                self._deliver(_Slot(_FORWARD, request=pop), raw)
            elif not self._gone:
                self._out_client += raw
            slot.expected -= 1
            if slot.expected <= 0:
                self._slots.popleft()
                self._exec_done()
            return
        if is_error or _is_null(raw) or raw[:1] != b"*":
            self._slots.popleft()  # not run: nothing subscribed, and no more frames
            self._deliver(slot, raw)
            self._exec_done()
            return
        size = int(raw[1 : raw.index(b"\r\n")])
        # Run the (un)subscriptions as Redis did: (command position, frames it took beyond the one counted).
        extra = [(position, self._subscription_change(sub) - 1) for position, sub in self._exec_subs]
        trailing: dict[int, resp.Request] = {}
        inside: list[tuple[int, resp.Request]] = []
        for position, pop in self._exec_pops:
            frame = position + sum(n for p, n in extra if p < position)  # where the pop's reply is
            if frame < size:
                inside.append((frame, pop))
            else:
                trailing[frame - size] = pop
        slot.queued = inside
        self._deliver(slot, raw)
        rest = sum(n for _, n in extra)
        if rest > 0:
            # Not _FORWARD any more: EXEC has been counted (observer), on its array.
            slot.kind, slot.hook, slot.expected = _TRAILING, "exec-rest", rest
            self._exec_trailing, self._exec_seen = trailing, 0
        else:
            self._slots.popleft()
            self._exec_done()

    def _exec_done(self) -> None:
        if self.protocol == 2:  # messages may come from now on, as arrays
            self._subscribed_seen = len(self._channels) + len(self._patterns)
            self._shard_seen = len(self._shard)
        self._exec_subs, self._exec_pops, self._exec_trailing = [], [], {}
        self._hold = False
        self._released = True
        self._fast_reader = resp.fast_reader()

    def _deliver(self, slot: _Slot, raw: bytes) -> None:
        """A reply for the client, as _frame hands one over: pops it carries are tracked, or put back if it is gone."""
        req = slot.request
        if self._gone:
            self._lost_reply(slot, raw)
            return
        out = self._out_client
        out += raw
        if req is not None and (req.name in POPS or slot.queued) and not _is_null(raw) and raw != _QUEUED:
            self._delivered_pops.append((self._written + len(out), slot, raw))

    def _confirmation(self, raw: bytes) -> None:
        """Track how many subscriptions Redis reports, from a RESP2 (un)subscribe confirmation."""
        value = resp.decode(raw)
        if isinstance(value, list) and len(value) == 3 and isinstance(value[2], int):
            kind = value[0]
            if kind in (b"ssubscribe", b"sunsubscribe"):
                self._shard_seen = value[2]
            else:
                self._subscribed_seen = value[2]

    def _lost_reply(self, slot: _Slot, raw: bytes) -> None:
        """A reply whose client is gone: put back what a pop took (or the pops of a transaction, from EXEC's)."""
        self._requeues += self._taken(slot, raw)

    def _taken(self, slot: _Slot, raw: bytes) -> Requeue:
        """The requeue commands that undo what ``raw``, the reply to ``slot``, took from the queues."""
        req = slot.request
        if req is None or _is_null(raw) or raw == _QUEUED:  # a pop queued in MULTI answers +QUEUED: nothing taken
            return []
        if req.name in POPS:
            return requeue_for(req.args, resp.decode(raw))
        out: Requeue = []
        if slot.queued:
            results = resp.decode(raw)
            if isinstance(results, list):
                for position, pop in slot.queued:
                    if position < len(results) and results[position] is not None:
                        if not isinstance(results[position], resp.ErrorReply):
                            out += requeue_for(pop.args, results[position])
        return out

    # -------------------------------------------------------------------------------- teardown

    def client_gone(self) -> bool:
        """The client disconnected. True if a pop is outstanding: the caller must then keep the upstream
        connection open and feed what Redis still sends until ``pending`` is 0 (each element that arrives becomes
        a requeue), ending a blocked pop early with ``CLIENT UNBLOCK upstream_id`` from a side connection.

        Not a half-close: Redis frees a client whose socket reads EOF without flushing its output buffer, so a
        pop served in the same event-loop turn as the EOF would be lost inside Redis."""
        self._gone = True
        self._out_client.clear()
        if self._exec_trailing:  # pops whose replies come after EXEC's array
            return True
        return any(s.queued or (s.request is not None and s.request.name in POPS) for s in self._slots)

    @property
    def blocked(self) -> bool:
        """A blocking command is outstanding (it may wait in Redis for as long as its timeout)."""
        return any(s.request is not None and s.request.name in BLOCKING for s in self._slots)

    def reattach(self) -> tuple[bytes | None, str]:
        """The upstream connection died under a live client. If what the connection holds can be rebuilt on a new
        one, make ready to: a blocked pop is answered as a timeout (the returned bytes, for the client), the proxy's
        handshake and what the client had set (HELLO 3, SELECT, CLIENT SETNAME; their replies swallowed) are queued
        for the new connection, and the state is "idle" or "blocked_pop". Otherwise (None, why): the client's
        connection must close. A command whose reply has not come is never retried: nobody knows if Redis ran it."""
        if self._closing or self._gone or self._upstream_failed:
            return None, "closing"
        if self._in_multi:
            return None, "multi"
        if self._watching:
            return None, "watch"
        if self._monitor:
            return None, "monitor"
        if self._tracking:
            return None, "tracking"
        if self._reply_off or self._reply_skip:
            return None, "client_reply"
        fast = self._fast_reply_reader
        if self._replies.buffered or (fast is not None and fast.has_data()):
            return None, "partial"  # a reply (or a request) had started: never invent an answer for it
        state, out = ("subscribed" if self.subscribed else "idle"), b""
        # The proxy's own slots (a handshake, re-subscriptions from an earlier reattach whose connection died too:
        # Redis killed as it accepted it) are rebuilt below; only the client's own replies owed count.
        if any(s.kind != _SWALLOW and s.hook != "resubscribe" for s in self._slots):
            null = self.timeout_reply()
            if null is None:
                return None, "pending"
            state, out = "blocked_pop", null
            req = self._slots[0].request
            if self._observer is not None and req is not None and req.name in _CONSUMER_POPS:
                self._observer.consumer_unblocked(req.args[1:-1])
        self._slots.clear()
        self._swallow_pushes = 0  # the old connection's confirmations will never come
        self._replies = resp.ReplyParser()
        self._fast_reply_reader = resp.fast_reader()
        self.upstream_id = None
        self.upstream_addr = None
        self._out_upstream.clear()
        self._send_handshake()
        if self.protocol == 3:
            self._swallow([b"HELLO", b"3"])
        if self._selected is not None:
            self._swallow([b"SELECT", self._selected])
        if self._client_name is not None:
            self._swallow([b"CLIENT", b"SETNAME", self._client_name])
        # Subscriptions: subscribed again on the new connection, their confirmations swallowed (RESP2: replies to a
        # slot of the proxy's own; RESP3: push frames, counted off). Messages published meanwhile are lost, as
        # pub/sub allows.
        resubscribe = ((self._channels, b"SUBSCRIBE"), (self._patterns, b"PSUBSCRIBE"), (self._shard, b"SSUBSCRIBE"))
        for subs, command in resubscribe:
            if subs:
                self._out_upstream += resp.encode_command([command, *sorted(subs)])
                if self.protocol == 3:
                    self._swallow_pushes += len(subs)
                else:
                    self._slots.append(_Slot(_FORWARD, len(subs), hook="resubscribe"))
        return out, state

    def _swallow(self, command: list[bytes]) -> None:
        self._out_upstream += resp.encode_command(command)
        self._slots.append(_Slot(_SWALLOW))

    def owed(self) -> list[str]:
        """The commands whose replies are still owed to the client (for logs)."""
        return [s.name or "?" for s in self._slots if s.kind != _SWALLOW and s.hook != "resubscribe"]

    def timeout_reply(self) -> bytes | None:
        """What the client would read had its blocking pop timed out: the null reply of its protocol, when the only
        reply owed is that of one blocking pop (outside MULTI). None otherwise. Used when the upstream must be
        dropped under the pop (a failover): the client sees a timeout, never an error, and calls again."""
        if len(self._slots) != 1 or self._in_multi:
            return None
        req = self._slots[0].request
        if req is None or req.name not in _NULL_ON_TIMEOUT:
            return None
        if self.protocol == 3:
            return b"_\r\n"
        return b"$-1\r\n" if req.name in ("brpoplpush", "blmove") else b"*-1\r\n"

    def delivered(self, flushed: int) -> None:
        """The transport has handed everything up to byte ``flushed`` of the client stream to the kernel."""
        pops = self._delivered_pops
        while pops and pops[0][0] <= flushed:
            pops.popleft()

    def undelivered(self, unsent: int) -> Requeue:
        """The client died with ``unsent`` bytes still in the transport's buffer: requeue the pops among them."""
        cutoff = self._written - unsent
        out: Requeue = []
        for end, slot, raw in self._delivered_pops:
            if end > cutoff:
                out += self._taken(slot, raw)
        self._delivered_pops.clear()
        return out


def _first_name(data: bytes) -> str:
    """The command name of the first request in a read starting with '*', from its first bulk header, without
    parsing the rest ("" when it cannot be told cheaply)."""
    i = data.find(b"\r\n$", 1, 24)
    if i < 0:
        return ""
    j = data.find(b"\r\n", i + 3, i + 16)
    if j < 0:
        return ""
    try:
        size = int(data[i + 3 : j])
    except ValueError:
        return ""
    return resp.command_name(data[j + 2 : j + 2 + size])


def _is_null(raw: bytes) -> bool:
    return raw in (b"_\r\n", b"$-1\r\n", b"*-1\r\n")


_HANDLERS = {
    "auth": Session._cmd_auth,
    "hello": Session._cmd_hello,
    "quit": Session._cmd_quit,
    "reset": Session._cmd_reset,
    "multi": Session._cmd_multi,
    "exec": Session._cmd_exec,
    "discard": Session._cmd_discard,
    "select": Session._cmd_select,
    "monitor": Session._cmd_monitor,
    "watch": Session._cmd_watch,
    "unwatch": Session._cmd_unwatch,
    "acl": Session._cmd_acl,
    "client": Session._cmd_client,
    **{name: Session._cmd_subscribe for name in SUBSCRIBE},
    **{name: Session._cmd_unsubscribe for name in UNSUBSCRIBE},
}
_NOT_FAST = frozenset(_NOT_PLAIN | _HANDLERS.keys() | NO_AUTH)
