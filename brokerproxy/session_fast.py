"""The session's two hiredis fast paths: a read of whole, ordinary requests forwarded as it arrived
(``_fast_requests``), and a read of whole replies to such requests written back as it arrived (``_fast_replies``).

Each either takes the whole read, or declines and leaves it untouched to the exact framers in ``session.py``: any
doubt (a partial frame, a push, a command with a handler, a pop, a refusal) is a decline. When a read may take a
fast path is the theory of operation's (``session.py``); this module holds the loops that make that case cheap.

``FastPaths`` is a mixin of ``Session``: its methods run as the session's own (``self._fast_requests``, no extra call
on the hot path) and the state they read is the session's, initialised in ``Session.__init__``; the annotations
below declare it for the type checker only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import resp
from .observe import Observer
from .session_events import Policy
from .session_replies import _FORWARD, _LOCAL, _plain_slot, _Slot

#: Watched commands whose reply is a plain integer (a push's new length): the fast paths can observe them.
_INT_REPLY_WATCHED = frozenset({"lpush", "rpush", "lpushx", "rpushx"})
#: Reads of replies longer than this skip the hiredis fast path: decoding a large value costs more than framing it.
_FAST_REPLY_MAX = 16 * 1024
_ReplyError = resp.ReplyErrorType
#: A request's arguments are all bulk strings; hiredis would also hand back integers, arrays, nulls, errors...
_BYTES_ONLY = frozenset({bytes})
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


class FastPaths:
    # The session's state the fast paths read (and a few fields they set), initialised in Session.__init__.
    user: str | None
    _policy: Policy | None
    _observer: Observer | None
    _clock: Callable[[], float]
    _probe: resp.Request
    _requests: resp.RequestParser
    _replies: resp.ReplyParser
    _fast_reader: Any
    _fast_reply_reader: Any
    _max_array: int
    _fast_limit: int
    _not_fast: frozenset[str]
    _watch_inline: frozenset[str]
    _fast_observed: frozenset[str]
    _slots: deque[_Slot]
    _out_client: bytearray
    _out_upstream: bytearray
    _timed: float
    _timed_name: str
    _in_multi: bool
    _reply_off: bool
    _reply_skip: bool
    _monitor: bool
    _subscribed_seen: int
    _shard_seen: int
    _gone: bool

    if TYPE_CHECKING:  # Session's, in session.py

        def _end_timing(self) -> None: ...

        def _flush_local(self) -> None: ...

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
