"""The audit trail: structured events an auditor or a SIEM can read, as JSON lines to a file or stderr.

One event per line: ``ts`` (UTC, ISO 8601), ``event``, ``conn`` (a connection id, so events correlate), then the
event's fields. Events: ``connection_opened`` (peer, listener), ``connection_closed`` (peer, user, duration_s,
bytes_in, bytes_out), ``auth`` (user, ok), ``denied`` (user, command, kind, object: the first refused key or
channel, never a value), ``command`` (user, command: the commands of the audit list, default ``@admin`` and
``@dangerous``; never arguments), ``reload`` (ok, error). Never a password, never a message body.

Writes are synchronous line writes to a file opened once (line-buffered): an audit line is small, and losing one
to an asynchronous queue at a crash is worse than the microseconds a write costs on these rare events.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from .keyspec import ALL_COMMANDS

#: What ``[audit] commands`` defaults to.
DEFAULT_AUDITED = ("@admin", "@dangerous")


def audited_commands(spec: tuple[str, ...] | list[str]) -> frozenset[str]:
    """Full command names (``flushall``, ``config|set``) for a list of categories (``@admin``) and names."""
    out: set[str] = set()
    for item in spec:
        item = item.lower()
        if item.startswith("@"):
            out.update(c.name for c in ALL_COMMANDS if item[1:] in c.categories)
        else:
            out.update(c.name for c in ALL_COMMANDS if c.name == item or c.name.startswith(item + "|"))
    return frozenset(out)


def top_level(names: frozenset[str]) -> frozenset[str]:
    """The command names a request starts with, for the full names given (``config|set`` → ``config``)."""
    return frozenset(n.split("|", 1)[0] for n in names)


class AuditLog:
    """Writes audit events; ``AuditLog(None)`` writes nothing (audit off)."""

    def __init__(self, target: str | None) -> None:
        self.enabled = bool(target)
        self._own = False
        self._out: IO[str] | None = None
        if target == "stderr":
            self._out = sys.stderr
        elif target:
            self._out = open(target, "a", buffering=1, encoding="utf-8")
            self._own = True

    def event(self, event: str, conn: int = 0, **fields: Any) -> None:
        out = self._out
        if out is None:
            return
        now = time.time()
        record = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
            "event": event,
            "conn": conn,
            **fields,
        }
        out.write(json.dumps(record, default=str) + "\n")

    def close(self) -> None:
        if self._own and self._out is not None:
            self._out.close()
        self._out = None
