"""The audit trail: structured events an auditor or a SIEM can read, as JSON lines to a file or stderr.

One event per line: ``ts`` (UTC, ISO 8601), ``event``, ``conn`` (a connection id, so events correlate), then the
event's fields. Events: ``connection_opened`` (peer, listener), ``connection_closed`` (peer, user, duration_s,
bytes_in, bytes_out), ``auth`` (user, ok), ``denied`` (user, command, kind, object: the first refused key or
channel, never a value), ``command`` (user, command: the commands of the audit list, default ``@admin`` and
``@dangerous``; never arguments), ``reload`` (ok, error). Never a password, never a message body.

Writes are synchronous: one ``write(2)`` per line to a file opened once in append mode, unbuffered. An audit line
is small, and losing one to an asynchronous queue at a crash is worse than the microseconds a write costs on these
rare events.

The trail never stops the proxy. A line that cannot be written (disk full, I/O error, a path that cannot be opened)
is dropped and counted in ``dropped`` (exported as ``brokerproxy_audit_events_dropped_total``), with one error log
line when writing starts to fail and one when it works again; a path that could not be opened is tried again at
most every ``REOPEN_INTERVAL`` seconds, so the trail resumes once the directory or mount is back. A line cut short
by a full disk is ended by a newline before the next one, so that only that line is unreadable.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from .keyspec import ALL_COMMANDS

log = logging.getLogger("brokerproxy.audit")

#: Seconds between attempts to open an audit file that could not be opened.
REOPEN_INTERVAL = 5.0

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
    """Writes audit events; ``AuditLog(None)`` writes nothing (audit off).

    ``written`` and ``dropped`` count the events written and the events lost to write errors."""

    def __init__(self, target: str | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = bool(target)
        self.written = 0
        self.dropped = 0
        self._target = target or ""
        self._clock = clock
        self._stream: IO[str] | None = None  # stderr
        self._file: IO[bytes] | None = None  # an audit file, unbuffered: one write(2) per line
        self._next_open = 0.0  # when to try opening the file again
        self._failing = False  # the last write failed (logged once until one succeeds)
        self._torn = False  # the last line was cut short in the file: end it before the next one
        self._closed = False
        if target == "stderr":
            self._stream = sys.stderr
        elif target:
            self._open()

    def _open(self) -> bool:
        try:
            self._file = open(self._target, "ab", buffering=0)  # kept open until close()
        except OSError as exc:
            self._next_open = self._clock() + REOPEN_INTERVAL
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: BaseException) -> None:
        if not self._failing:
            self._failing = True
            log.error(
                "audit trail not writable; dropping audit events until it is",
                extra={"file": self._target, "error": str(exc) or type(exc).__name__},
            )

    def event(self, event: str, conn: int = 0, **fields: Any) -> None:
        if not self.enabled or self._closed:
            return
        now = time.time()
        record = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
            "event": event,
            "conn": conn,
            **fields,
        }
        line = json.dumps(record, default=str) + "\n"
        if self._write(line):
            self.written += 1
            if self._failing:
                self._failing = False
                log.warning("audit trail writable again", extra={"file": self._target, "dropped": self.dropped})
        else:
            self.dropped += 1

    def _write(self, line: str) -> bool:
        stream = self._stream
        if stream is not None:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError) as exc:  # ValueError: stderr closed
                self._failed(exc)
                return False
            return True
        f = self._file
        if f is None:
            if self._clock() < self._next_open or not self._open():
                return False
            f = self._file
            assert f is not None
        data = line.encode("utf-8")
        prefix = 0
        if self._torn:
            data = b"\n" + data
            prefix = 1
        done = 0
        try:
            while done < len(data):
                n = f.write(data[done:])  # a short write when the disk fills up; the next one raises
                if not n:
                    raise OSError("audit file write made no progress")
                done += n
        except OSError as exc:
            # What was written of the line stays in the file without its newline: end it before the next line.
            if done:
                self._torn = done > prefix
            self._failed(exc)
            return False
        self._torn = False
        return True

    def close(self) -> None:
        self._closed = True
        if self.dropped:
            log.warning(
                "audit events dropped", extra={"file": self._target, "dropped": self.dropped, "written": self.written}
            )
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None
        self._stream = None
