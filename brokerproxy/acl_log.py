"""The proxy's own answers to ``ACL WHOAMI``, ``ACL CAT [category]`` and ``ACL LOG [count|RESET]``, and the
in-memory ACL log behind the last one. Pure: the session feeds the log and sends the bytes these functions make.

Redis 7.0's shapes: ``ACL LOG`` is an array of maps (flat arrays in RESP2) with ``count``, ``reason``
(``command``, ``key``, ``channel``, ``auth``), ``context`` (``toplevel``, ``multi``), ``object`` (the command's
full name, the key, the channel, or ``AUTH``/``HELLO`` for a failed authentication), ``username``,
``age-seconds`` (a double: a bulk string in RESP2) and ``client-info``; newest first. Like Redis, an event equal to
one of the 10 newest entries in reason, context, object and user, within 60 seconds of it, bumps that entry's count
and moves it to the front instead of adding one; the log keeps at most ``max_len`` entries (Redis's
``acllog-max-len``, 128).

Wiring: when ``AclPolicy.check`` refuses a request, ``log.record_denial(policy.explain(user, request), user,
context="multi" if in MULTI else "toplevel", client_info=…)``; when AUTH or HELLO … AUTH fails,
``log.record_auth_failure(username, argv0)``; and for an ``ACL`` request the policy allowed,
``answer(args, user, log, protocol)`` gives the reply for WHOAMI/CAT/LOG (None for other subcommands).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import resp
from .acl import Denial
from .command_table import CATEGORIES
from .keyspec import ALL_COMMANDS, string2ll

#: Redis's ``acllog-max-len`` default.
DEFAULT_MAX_LEN = 128
#: Redis groups equal events this close together (ACL_LOG_GROUPING_MAX_TIME_DELTA, milliseconds).
GROUPING_MS = 60_000
#: How many of the newest entries Redis looks at to group an event.
GROUPING_SCAN = 10

CONTEXTS = ("toplevel", "multi", "lua", "module")


@dataclass
class LogEntry:
    count: int
    reason: str
    context: str
    object: bytes
    username: bytes
    ctime_ms: int
    client_info: bytes


class AclLog:
    """A bounded log of denials and authentication failures. ``clock`` returns seconds (``time.time``)."""

    def __init__(self, max_len: int = DEFAULT_MAX_LEN, clock: Callable[[], float] = time.time) -> None:
        self.max_len = max_len
        self._clock = clock
        self._entries: list[LogEntry] = []  # newest first

    @property
    def entries(self) -> list[LogEntry]:
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def record(
        self,
        reason: str,
        obj: bytes | str,
        username: bytes | str,
        *,
        context: str = "toplevel",
        client_info: bytes | str = b"",
    ) -> None:
        now = int(self._clock() * 1000)
        obj_b = obj.encode("utf-8", "surrogateescape") if isinstance(obj, str) else obj
        user_b = username.encode("utf-8", "surrogateescape") if isinstance(username, str) else username
        info_b = client_info.encode("utf-8", "surrogateescape") if isinstance(client_info, str) else client_info
        for i, e in enumerate(self._entries[:GROUPING_SCAN]):
            if (
                e.reason == reason
                and e.context == context
                and abs(e.ctime_ms - now) <= GROUPING_MS
                and e.object == obj_b
                and e.username == user_b
            ):
                del self._entries[i]
                e.count += 1
                e.ctime_ms = now
                e.client_info = info_b
                self._entries.insert(0, e)
                return
        self._entries.insert(0, LogEntry(1, reason, context, obj_b, user_b, now, info_b))
        del self._entries[self.max_len :]

    def record_denial(
        self, denial: Denial, username: str, *, context: str = "toplevel", client_info: bytes | str = b""
    ) -> None:
        """A command refused by ``AclPolicy`` (``AclPolicy.explain`` gives the Denial)."""
        self.record(denial.reason, denial.object, username, context=context, client_info=client_info)

    def record_auth_failure(
        self, username: bytes | str, command: bytes | str = b"AUTH", *, context: str = "toplevel",
        client_info: bytes | str = b"",
    ) -> None:  # fmt: skip
        """A failed AUTH or HELLO … AUTH (``command`` as the client spelled it, like Redis's argv[0])."""
        self.record("auth", command, username, context=context, client_info=client_info)

    def reply(self, args: Sequence[bytes], protocol: int = 2) -> bytes:
        """The reply to ``ACL LOG [count|RESET]`` (``args`` is the whole request)."""
        count = 10
        if len(args) > 3:
            return syntax_error(args)
        if len(args) == 3:
            if args[2].lower() == b"reset":
                self.clear()
                return resp.OK
            parsed = string2ll(args[2])  # Redis's getLongFromObject: strict
            if parsed is None:
                return resp.error("ERR value is not an integer or out of range")
            count = max(parsed, 0)
        now = int(self._clock() * 1000)
        shown = self._entries[:count]
        out = [_array(len(shown))]
        for e in shown:
            fields = [
                (b"count", _int(e.count)),
                (b"reason", _bulk(e.reason.encode())),
                (b"context", _bulk(e.context.encode())),
                (b"object", _bulk(e.object)),
                (b"username", _bulk(e.username)),
                (b"age-seconds", _double((now - e.ctime_ms) / 1000, protocol)),
                (b"client-info", _bulk(e.client_info)),
            ]
            out.append(b"%%%d\r\n" % len(fields) if protocol == 3 else b"*%d\r\n" % (2 * len(fields)))
            for k, v in fields:
                out += [_bulk(k), v]
        return b"".join(out)


# ------------------------------------------------------------------------------------------------ ACL CAT/WHOAMI


def whoami(username: str | None, protocol: int = 2) -> bytes:
    """The reply to ``ACL WHOAMI``."""
    if username is None:
        return resp.null(protocol)
    return _bulk(username.encode("utf-8", "surrogateescape"))


def category_commands(category: str) -> list[str] | None:
    """Full names of the commands and subcommands in a category (case-insensitive), or None if unknown."""
    cat = category.lower()
    if cat not in CATEGORIES:
        return None
    return [c.name for c in ALL_COMMANDS if cat in c.categories]


def cat(args: Sequence[bytes]) -> bytes:
    """The reply to ``ACL CAT [category]`` (``args`` is the whole request)."""
    if len(args) == 2:
        return _strings([c.encode() for c in CATEGORIES])
    if len(args) == 3:
        name = args[2].decode("utf-8", "surrogateescape")
        names = category_commands(name) if "\0" not in name else None
        if names is None:
            shown = args[2].split(b"\0", 1)[0][:128].decode("utf-8", "replace")
            return resp.error(f"ERR Unknown category '{shown}'")
        return _strings([n.encode() for n in names])
    return syntax_error(args)


def syntax_error(args: Sequence[bytes]) -> bytes:
    sub = args[1].split(b"\0", 1)[0][:128].decode("utf-8", "replace")
    return resp.error(f"ERR unknown subcommand or wrong number of arguments for '{sub}'. Try ACL HELP.")


def answer(args: Sequence[bytes], username: str | None, log: AclLog, protocol: int = 2) -> bytes | None:
    """The proxy's reply to ``ACL WHOAMI``/``CAT``/``LOG``, or None for another ACL subcommand (which the proxy
    refuses or forwards, as it decides). Call it only once ``AclPolicy.check`` allowed the request."""
    if len(args) < 2:
        return None
    sub = args[1].lower()
    if sub == b"whoami" and len(args) == 2:
        return whoami(username, protocol)
    if sub == b"cat":
        return cat(args)
    if sub == b"log":
        return log.reply(args, protocol)
    return None


# ------------------------------------------------------------------------------------------------ encoders


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _int(n: int) -> bytes:
    return b":%d\r\n" % n


def _array(n: int) -> bytes:
    return b"*%d\r\n" % n


def _strings(items: Sequence[bytes]) -> bytes:
    return resp.encode_command(list(items))  # an array of bulk strings, as a request is


def _double(d: float, protocol: int) -> bytes:
    text = (b"%.17g" % d) if d == d and abs(d) != float("inf") else (b"inf" if d > 0 else b"-inf")
    return b",%s\r\n" % text if protocol == 3 else _bulk(text)
