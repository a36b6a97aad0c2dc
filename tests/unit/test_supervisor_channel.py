"""The lines a worker and the supervisor exchange about lost replies (supervisor.lost_line, parse_lost_line)."""

from __future__ import annotations

import pytest

from brokerproxy.supervisor import lost_line, parse_lost_line


@pytest.mark.parametrize(("host", "user"), [("10.0.0.7", "worker"), ("::1", None), ("/run/redis.sock", "we ird\n")])
def test_lost_lines_round_trip(host: str, user: str | None) -> None:
    line = lost_line(host, user)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, whatever the names hold
    assert parse_lost_line(line[:-1]) == (host, user)


@pytest.mark.parametrize(
    "line",
    [b"ready 9180", b"lost ", b"lost [1, 2]", b'lost ["h"]', b"lost {", b'lost ["h", 3]', b'lost {"a": 1, "b": 2}'],
)
def test_anything_else_is_ignored(line: bytes) -> None:
    assert parse_lost_line(line) is None
