"""The replies a session owes its client: the reply slot (one per request on the session's FIFO, see the theory of
operation in ``session.py``), the slots of ordinary requests shared per command name, and the texts of the error
replies the proxy makes itself. Sans-IO. The slot kinds and helpers are package-private: they are the session's
modules' shared vocabulary, not an API.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import resp
from .observe import KNOWN_COMMANDS, UNKNOWN

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


#: Pops whose keys are all between the name and a trailing timeout: the ones the consumers gauge follows.
_CONSUMER_POPS = frozenset({"brpop", "blpop", "bzpopmin", "bzpopmax"})
#: A pop queued in MULTI answers +QUEUED: it took nothing (yet).
_QUEUED = b"+QUEUED\r\n"

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


def _is_null(raw: bytes) -> bool:
    return raw in (b"_\r\n", b"$-1\r\n", b"*-1\r\n")
