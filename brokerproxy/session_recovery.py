"""What the session does when one side of the connection dies, so that no message is lost by the proxy.

The client side: pop replies written to a client are remembered until the transport has flushed them
(``delivered``); when the client goes (``client_gone``), what a pop took and never reached it becomes requeue
commands (``take_requeues``, ``undelivered``). The upstream side: when Redis's connection dies under a live client,
``reattach`` says whether the connection's state can be rebuilt on a new one, and queues what rebuilds it.

``Recovery`` is a mixin of ``Session``: its methods run as the session's own, and the state they read and set is the
session's, initialised in ``Session.__init__``; the annotations below declare it for the type checker only.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from . import resp
from .commands import BLOCKING, POPS, Requeue, requeue_for
from .observe import Observer
from .session_replies import _CONSUMER_POPS, _FORWARD, _QUEUED, _SWALLOW, _is_null, _Slot

#: Blocking commands whose timeout is a null reply (WAIT and WAITAOF answer counts instead).
_NULL_ON_TIMEOUT = BLOCKING - {"wait", "waitaof"}


class Recovery:
    # The session's state these methods read and set, initialised in Session.__init__.
    protocol: int
    upstream_id: int | None
    upstream_addr: bytes | None
    _observer: Observer | None
    _slots: deque[_Slot]
    _replies: resp.ReplyParser
    _fast_reply_reader: Any
    _out_client: bytearray
    _out_upstream: bytearray
    _requeues: Requeue
    _written: int
    _delivered_pops: deque[tuple[int, _Slot, bytes]]
    _swallow_pushes: int
    _in_multi: bool
    _watching: bool
    _tracking: bool
    _monitor: bool
    _reply_off: bool
    _reply_skip: bool
    _selected: bytes | None
    _client_name: bytes | None
    _channels: set[bytes]
    _patterns: set[bytes]
    _shard: set[bytes]
    _exec_trailing: dict[int, resp.Request]
    _closing: bool
    _gone: bool
    _upstream_failed: bool

    if TYPE_CHECKING:  # Session's, in session.py

        @property
        def subscribed(self) -> bool: ...

        def _send_handshake(self) -> None: ...

    # -------------------------------------------------------------------------------- replies that carry pops

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
        """The commands whose replies are still owed to the client (for logs, and to tell a transaction cut by an
        upstream's death: proxy._note_cut_transaction)."""
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
