"""The sans-IO half of the Sentinel watcher: reading Sentinel's and Redis's replies from raw RESP bytes."""

from __future__ import annotations

import pytest

from brokerproxy import resp
from brokerproxy.sentinel import (
    ReplyReader,
    ReplyShapeError,
    parse_config_epoch,
    parse_master_addr,
    parse_role,
    parse_switch_master,
    pubsub_message,
)


def decoded(raw: bytes) -> list[resp.Value]:
    """Feed raw bytes one at a time, as a slow socket would, and return every reply."""
    reader = ReplyReader()
    out: list[resp.Value] = []
    for i in range(len(raw)):
        reader.feed(raw[i : i + 1])
        out += reader.replies()
    return out


def test_get_master_addr_by_name() -> None:
    (value,) = decoded(b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n")
    assert parse_master_addr(value) == ("127.0.0.1", 6380)
    (unknown,) = decoded(b"*-1\r\n")  # the name is not monitored by this Sentinel
    assert parse_master_addr(unknown) is None
    (resp3_null,) = decoded(b"_\r\n")
    assert parse_master_addr(resp3_null) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"-ERR unknown\r\n",
        b"*1\r\n$1\r\nh\r\n",
        b"*2\r\n$1\r\nh\r\n$1\r\nx\r\n",
        b"*2\r\n$1\r\nh\r\n$1\r\n0\r\n",
        b"*2\r\n$0\r\n\r\n$1\r\n1\r\n",
        b":1\r\n",
    ],
)
def test_get_master_addr_malformed(raw: bytes) -> None:
    (value,) = decoded(raw)
    with pytest.raises(ReplyShapeError):
        parse_master_addr(value)


def test_config_epoch() -> None:
    flat = b"*6\r\n$4\r\nname\r\n$8\r\nmymaster\r\n$12\r\nconfig-epoch\r\n$1\r\n7\r\n$5\r\nflags\r\n$6\r\nmaster\r\n"
    assert parse_config_epoch(decoded(flat)[0]) == 7
    as_map = b"%1\r\n$12\r\nconfig-epoch\r\n:3\r\n"
    assert parse_config_epoch(decoded(as_map)[0]) == 3
    assert parse_config_epoch(decoded(b"-NOPERM no\r\n")[0]) == -1
    assert parse_config_epoch(decoded(b"*2\r\n$4\r\nname\r\n$1\r\nm\r\n")[0]) == -1


def test_role() -> None:
    master = b"*3\r\n$6\r\nmaster\r\n:42\r\n*0\r\n"
    replica = b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:42\r\n"
    assert parse_role(decoded(master)[0]) == "master"
    assert parse_role(decoded(replica)[0]) == "slave"
    with pytest.raises(ReplyShapeError, match="NOAUTH"):
        parse_role(decoded(b"-NOAUTH Authentication required.\r\n")[0])


def test_switch_master_message() -> None:
    raw = (
        b"*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n"
        b"*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n$38\r\nmymaster 127.0.0.1 6379 127.0.0.1 6380\r\n"
        b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    )
    confirm, message, pong = decoded(raw)
    assert pubsub_message(confirm) is None
    assert pubsub_message(pong) is None
    msg = pubsub_message(message)
    assert msg == (b"+switch-master", b"mymaster 127.0.0.1 6379 127.0.0.1 6380")
    assert parse_switch_master(msg[1], "mymaster") == (("127.0.0.1", 6379), ("127.0.0.1", 6380))
    assert parse_switch_master(msg[1], "other") is None
    assert parse_switch_master(msg[1], "mymaste") is None


@pytest.mark.parametrize("payload", [b"mymaster 1.2.3.4 6379 1.2.3.4", b"mymaster a 6379 b x", b""])
def test_switch_master_malformed(payload: bytes) -> None:
    with pytest.raises(ReplyShapeError):
        parse_switch_master(payload, "mymaster")


def test_subscription_errors_raise() -> None:
    with pytest.raises(ReplyShapeError, match="NOAUTH"):
        pubsub_message(decoded(b"-NOAUTH Authentication required.\r\n")[0])
    with pytest.raises(ReplyShapeError):
        pubsub_message(decoded(b"+OK\r\n")[0])
