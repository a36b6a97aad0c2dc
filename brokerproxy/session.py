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

Where it lives
--------------
This module is the state machine's core: the request and reply loops, the slot FIFO, the handlers of the commands
that change the connection's state (QUIT, RESET, SELECT, CLIENT, MONITOR), and the handler table. The concerns
with a job of their own are mixins of ``Session``, each in its module (their methods run as the session's own,
``self._x``, so the split costs no call; every field is initialised here, in ``Session.__init__``):

* ``session_auth``: AUTH, HELLO and ACL (the client authenticates to the proxy, never to Redis), and the record
  of what the ACL refuses;
* ``session_multi_pubsub``: MULTI/EXEC/WATCH and the subscriptions (RESP2 subscribed mode's refusals, the reply of
  an EXEC that (un)subscribed);
* ``session_fast``: the two hiredis fast paths;
* ``session_recovery``: pops written but not yet delivered, a gone client's pops put back, and ``reattach``.

``session_replies`` holds the reply slot and the texts of the proxy's own replies, ``session_events`` the events
and the Protocols; both are re-exported here, where callers import them from.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable

from . import resp
from .acl_log import AclLog
from .commands import (
    BLOCKING,
    NO_AUTH,
    POPS,
    SUBSCRIBE,
    SUBSCRIBED_MODE_ALLOWED,
    UNSUBSCRIBE,
    Requeue,
)
from .errors import ProtocolError
from .observe import Observer
from .session_auth import Auth
from .session_events import (
    Audited,
    Authenticator,
    AuthFailed,
    Close,
    Denied,
    Event,
    OpenUpstream,
    Policy,
    UpstreamFailed,
)
from .session_fast import _INT_REPLY_WATCHED, FastPaths
from .session_multi_pubsub import MultiPubSub
from .session_recovery import Recovery
from .session_replies import (
    _CONSUMER_POPS,
    _FORWARD,
    _LOCAL,
    _QUEUED,
    _REPLACE,
    _SWALLOW,
    AUTH_NO_PASSWORD,
    EXECABORT,
    NOAUTH,
    NOAUTH_HELLO,
    NOPROTO,
    NOT_IN_MULTI,
    PUBSUB_ONLY,
    WRONGPASS,
    _is_null,
    _plain_slot,
    _Slot,
    wrong_args,
)

__all__ = [
    "AUTH_NO_PASSWORD",
    "EXECABORT",
    "NOAUTH",
    "NOAUTH_HELLO",
    "NOPROTO",
    "NOT_IN_MULTI",
    "PUBSUB_ONLY",
    "WRONGPASS",
    "Audited",
    "AuthFailed",
    "Authenticator",
    "Close",
    "Denied",
    "Event",
    "OpenUpstream",
    "Policy",
    "Session",
    "UpstreamFailed",
    "wrong_args",
]

#: Commands that never take a plain slot: their replies are read (pops), or they may block (CLIENT UNBLOCK).
_NOT_PLAIN = POPS.keys() | BLOCKING
_NO_EVENTS: list[Event] = []
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
#: Commands the fast path hands to the exact path: those that never take a plain slot, those with a handler, and
#: those allowed before AUTH.
_NOT_FAST: frozenset[str] = frozenset()  # filled in below, once _HANDLERS exists

_CLIENT_ID = resp.encode_command([b"CLIENT", b"ID"])
_CLIENT_INFO = resp.encode_command([b"CLIENT", b"INFO"])
_ADDR_FIELD = re.compile(rb"(?:^|\s)addr=(\S+)")
_PING = resp.encode_command([b"PING"])
_MESSAGE_PREFIXES = (b"*3\r\n$7\r\nmessage\r\n", b"*4\r\n$8\r\npmessage\r\n", b"*3\r\n$8\r\nsmessage\r\n")


class Session(Auth, MultiPubSub, FastPaths, Recovery):
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

    # Handlers of the commands the proxy must look at. Each either answers locally or forwards. AUTH, HELLO and ACL
    # are in session_auth.py; MULTI, EXEC, DISCARD, WATCH, UNWATCH and the (un)subscriptions in session_multi_pubsub.py.

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

    def _cmd_select(self, req: resp.Request) -> None:
        self._forward(req, hook="" if self._in_multi else "select")

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
