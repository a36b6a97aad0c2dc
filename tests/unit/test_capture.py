"""Replay the real Celery 5.7 RESP3 capture (tests/data/celery57-resp3) through the framing and the session."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from brokerproxy import resp, session

CAPTURE = Path(__file__).resolve().parent.parent / "data" / "celery57-resp3"
CONNECTIONS = sorted(p.stem for p in CAPTURE.glob("*.c2s"))


def chunked(data: bytes, seed: str) -> list[bytes]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rng.choice((1, 2, 3, 7, 64, 1000, 4096, 65536))
        out.append(data[i : i + n])
        i += n
    return out


def frame_requests(chunks: list[bytes]) -> tuple[list[resp.Request], resp.RequestParser]:
    parser = resp.RequestParser()
    out: list[resp.Request] = []
    for chunk in chunks:
        parser.feed(chunk)
        while (req := parser.next()) is not None:
            out.append(req)
    return out, parser


def frame_replies(chunks: list[bytes]) -> tuple[list[tuple[int, bytes]], resp.ReplyParser]:
    parser = resp.ReplyParser()
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        parser.feed(chunk)
        while (frame := parser.next()) is not None:
            out.append(frame)
    return out, parser


def test_capture_is_present() -> None:
    assert len(CONNECTIONS) == 22
    for stem in CONNECTIONS:
        assert (CAPTURE / f"{stem}.s2c").exists()


@pytest.mark.parametrize("stem", CONNECTIONS)
def test_capture_frames_exactly(stem: str) -> None:
    c2s = (CAPTURE / f"{stem}.c2s").read_bytes()
    s2c = (CAPTURE / f"{stem}.s2c").read_bytes()
    for chunks in ([c2s], chunked(c2s, stem)):
        reqs, parser = frame_requests(chunks)
        assert parser.buffered == 0
        assert b"".join(r.raw for r in reqs) == c2s
        assert all(r.args for r in reqs)
    for chunks in ([s2c], chunked(s2c, stem)):
        frames, rparser = frame_replies(chunks)
        assert rparser.buffered == 0
        assert b"".join(raw for _, raw in frames) == s2c
        for _, raw in frames:
            resp.decode(raw)  # every frame decodes, with nothing left over


def test_capture_totals_match_readme() -> None:
    requests: Counter[str] = Counter()
    replies = pushes = 0
    for stem in CONNECTIONS:
        reqs, _ = frame_requests([(CAPTURE / f"{stem}.c2s").read_bytes()])
        requests.update(r.name for r in reqs)
        frames, _ = frame_replies([(CAPTURE / f"{stem}.s2c").read_bytes()])
        replies += sum(1 for kind, _ in frames if kind == resp.REPLY)
        pushes += sum(1 for kind, _ in frames if kind == resp.PUSH)
    # README: "Totals: 3,861 requests and 4,146 replies or pushes", and its top commands.
    assert sum(requests.values()) == 3861
    assert replies + pushes == 4146
    assert pushes > 0
    assert {
        name: requests[name]
        for name in ("publish", "multi", "exec", "get", "setex", "subscribe", "unsubscribe", "brpop", "lpush", "zadd",
                     "hset", "zrem", "hdel", "client", "llen", "evalsha", "hello")
    } == {
        "publish": 682, "multi": 589, "exec": 589, "get": 314, "setex": 280, "subscribe": 150, "unsubscribe": 150,
        "brpop": 149, "lpush": 141, "zadd": 140, "hset": 140, "zrem": 140, "hdel": 140, "client": 66, "llen": 52,
        "evalsha": 30, "hello": 22,
    }


class NoUsers:
    required = False

    def check(self, username: bytes, password: bytes) -> str | None:
        return None


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "exact-path-only"])
@pytest.mark.parametrize("stem", CONNECTIONS)
def test_capture_through_session_is_transparent(stem: str, fast: bool) -> None:
    # With no users and no upstream handshake the proxy forwards every request byte for byte and hands every
    # reply and push back byte for byte, owing nothing at the end, in whatever pieces the bytes arrive. Both with
    # the hiredis fast paths and with the exact framers alone (as without hiredis).
    c2s = (CAPTURE / f"{stem}.c2s").read_bytes()
    s2c = (CAPTURE / f"{stem}.s2c").read_bytes()
    s = session.Session(NoUsers())
    if not fast:
        s._fast_reader = s._fast_reply_reader = None
    assert s.take_events() == [session.OpenUpstream()]
    # What the proxy sends for itself on a new upstream connection (CLIENT ID), answered first, as Redis would.
    own, _ = frame_requests([s.take_upstream()])
    own_replies = b"".join(b":42\r\n" if [a.upper() for a in r.args] == [b"CLIENT", b"ID"] else b"+OK\r\n" for r in own)
    up = bytearray()
    for chunk in chunked(c2s, stem + "c"):
        s.from_client(chunk)
        up += s.take_upstream()
    assert bytes(up) == c2s
    client = bytearray()
    for chunk in chunked(own_replies + s2c, stem + "s"):
        s.from_upstream(chunk)
        client += s.take_client()
    assert bytes(client) == s2c
    assert s.pending == 0
    assert s.take_events() == []
