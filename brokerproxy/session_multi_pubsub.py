"""Transactions and subscriptions in the session: what MULTI/EXEC/DISCARD/WATCH and the (un)subscriptions change in
the state mirrored from Redis, the commands RESP2 subscribed mode refuses, and the reply of an EXEC whose transaction
(un)subscribed, which alone tells how many frames it takes (see ``_exec_reply``). The two live together because
they meet there.

``MultiPubSub`` is a mixin of ``Session``: its handlers are entries of the session's handler table, and the state
they read and set is the session's, initialised (with a comment per field) in ``Session.__init__``; the annotations
below declare it for the type checker only.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from . import resp
from .commands import SUBSCRIBE, UNSUBSCRIBE
from .session_replies import (
    _FORWARD,
    _REPLACE,
    _TRAILING,
    EXECABORT,
    NOT_IN_MULTI,
    PUBSUB_ONLY,
    _is_null,
    _Slot,
    wrong_args,
)

#: What a HELLO refused in RESP2 subscribed mode is forwarded as: the client's credentials never reach Redis.
_HELLO = resp.encode_command([b"HELLO"])


class MultiPubSub:
    # The session's state these methods read and set, initialised in Session.__init__.
    protocol: int
    _slots: deque[_Slot]
    _out_client: bytearray
    _out_upstream: bytearray
    _fast_reader: Any
    _gone: bool
    _reply_off: bool
    _reply_skip: bool
    _in_multi: bool
    _multi_dirty: bool
    _multi_queued: int
    _multi_pops: list[tuple[int, resp.Request]]
    _multi_subs: list[tuple[int, resp.Request]]
    _watching: bool
    _hold: bool
    _released: bool
    _exec_subs: list[tuple[int, resp.Request]]
    _exec_pops: list[tuple[int, resp.Request]]
    _exec_trailing: dict[int, resp.Request]
    _exec_seen: int
    _channels: set[bytes]
    _patterns: set[bytes]
    _shard: set[bytes]
    _subscribed_seen: int
    _shard_seen: int

    if TYPE_CHECKING:  # Session's, in session.py, and Recovery's (_deliver), in session_recovery.py

        def _forward(self, req: resp.Request, raw: bytes | None = None, expected: int = 1, hook: str = "") -> None: ...

        def _refuse(self, text: str) -> None: ...

        def _local(self, data: bytes, force: bool = False) -> None: ...

        def _deliver(self, slot: _Slot, raw: bytes) -> None: ...

    # -------------------------------------------------------------------------------- MULTI, EXEC, WATCH

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

    # -------------------------------------------------------------------------------- subscriptions

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

    def _confirmation(self, raw: bytes) -> None:
        """Track how many subscriptions Redis reports, from a RESP2 (un)subscribe confirmation."""
        value = resp.decode(raw)
        if isinstance(value, list) and len(value) == 3 and isinstance(value[2], int):
            kind = value[0]
            if kind in (b"ssubscribe", b"sunsubscribe"):
                self._shard_seen = value[2]
            else:
                self._subscribed_seen = value[2]
