"""AuditLog never stops the proxy: lines it cannot write are dropped and counted, and writing resumes."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest

from brokerproxy import audit
from brokerproxy.audit import AuditLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_writes_json_lines(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    log = AuditLog(str(trail))
    log.event("connection_opened", 1, peer="127.0.0.1:1")
    log.event("auth", 1, user="u", ok=True)
    assert [e["event"] for e in lines(trail)] == ["connection_opened", "auth"]  # written at once, no buffering
    log.close()
    assert (log.written, log.dropped) == (2, 0)
    log.event("after_close", 1)
    assert log.written == 2 and len(lines(trail)) == 2


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_disk_full_drops_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="brokerproxy.audit")
    log = AuditLog("/dev/full")  # every write fails with ENOSPC
    assert log.enabled
    for i in range(5):
        log.event("connection_opened", i, peer="x")
    assert (log.written, log.dropped) == (0, 5)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "one error line when writing starts to fail, not one per event"
    log.close()
    closing = [r for r in caplog.records if r.getMessage() == "audit events dropped"]
    assert closing and closing[0].dropped == 5  # type: ignore[attr-defined]


def test_unopenable_path_is_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="brokerproxy.audit")
    clock = Clock()
    trail = tmp_path / "not-yet" / "audit.jsonl"
    log = AuditLog(str(trail), clock=clock)  # the directory does not exist: no exception, events dropped
    log.event("connection_opened", 1)
    (tmp_path / "not-yet").mkdir()
    log.event("connection_opened", 2)  # within REOPEN_INTERVAL: not tried again yet
    assert (log.written, log.dropped) == (0, 2)
    clock.now += audit.REOPEN_INTERVAL
    log.event("connection_opened", 3)
    log.close()
    assert (log.written, log.dropped) == (1, 2)
    assert [e["conn"] for e in lines(trail)] == [3]
    assert any(r.getMessage() == "audit trail writable again" for r in caplog.records)


class ShortThenFull(io.RawIOBase):
    """A file whose disk fills up in the middle of a line, then has room again."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.room: int | None = None  # bytes left; None = unlimited

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        if self.room is not None:
            if self.room == 0:
                raise OSError(28, "No space left on device")
            b = bytes(b)[: self.room]
            self.room -= len(b)
        self.data += b
        return len(b)


def test_torn_line_is_ended_before_the_next(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"))
    fake = ShortThenFull()
    assert log._file is not None
    log._file.close()
    log._file = fake  # type: ignore[assignment]
    log.event("connection_opened", 1)
    fake.room = 10  # the next line is cut after 10 bytes
    log.event("connection_opened", 2)
    log.event("connection_opened", 3)  # no room at all
    fake.room = None
    log.event("connection_opened", 4)
    assert (log.written, log.dropped) == (2, 2)
    text = fake.data.decode()
    good = []
    for line in text.splitlines():
        try:
            good.append(json.loads(line)["conn"])
        except ValueError:
            assert len(line) == 10  # the one torn fragment
    assert good == [1, 4]


def test_stderr_failure_is_counted() -> None:
    stream = io.StringIO()
    stream.close()
    log = AuditLog("stderr")
    log._stream = stream  # a closed stderr: ValueError on write
    log.event("connection_opened", 1)
    assert (log.written, log.dropped) == (0, 1)
