"""commands.requeue_for: the commands that put back what a pop took, for each pop and each reply shape.

Every case is checked two ways: the exact requeue command, and (on a small model of a Redis list or sorted set)
that popping and then running the requeue leaves the key as it was.
"""

from __future__ import annotations

import pytest

from brokerproxy import commands, resp


def decoded(raw: bytes) -> resp.Value:
    return resp.decode(raw)


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def arr(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


# -------------------------------------------------------------------------------------------------------- a tiny model


def apply(lists: dict[bytes, list[bytes]], zsets: dict[bytes, dict[bytes, float]], cmd: list[bytes]) -> None:
    name = cmd[0].upper()
    if name == b"RPUSH":
        lists.setdefault(cmd[1], []).extend(cmd[2:])
    elif name == b"LPUSH":
        for x in cmd[2:]:
            lists.setdefault(cmd[1], []).insert(0, x)
    elif name == b"ZADD":
        z = zsets.setdefault(cmd[1], {})
        for score, member in zip(cmd[2::2], cmd[3::2], strict=True):
            z[member] = float(score)
    else:
        raise AssertionError(f"unexpected requeue command {cmd!r}")


# --------------------------------------------------------------------------------------------------------------- lists

LIST = [b"a", b"b", b"c", b"d"]


@pytest.mark.parametrize(
    ("args", "raw", "expected", "after_pop"),
    [
        ([b"RPOP", b"q"], bulk(b"d"), [[b"RPUSH", b"q", b"d"]], [b"a", b"b", b"c"]),
        ([b"LPOP", b"q"], bulk(b"a"), [[b"LPUSH", b"q", b"a"]], [b"b", b"c", b"d"]),
        ([b"RPOP", b"q", b"2"], arr(bulk(b"d"), bulk(b"c")), [[b"RPUSH", b"q", b"c", b"d"]], [b"a", b"b"]),
        ([b"LPOP", b"q", b"3"], arr(bulk(b"a"), bulk(b"b"), bulk(b"c")), [[b"LPUSH", b"q", b"c", b"b", b"a"]],
         [b"d"]),
        ([b"rpop", b"q", b"1"], arr(bulk(b"d")), [[b"RPUSH", b"q", b"d"]], [b"a", b"b", b"c"]),
        ([b"BRPOP", b"other", b"q", b"0"], arr(bulk(b"q"), bulk(b"d")), [[b"RPUSH", b"q", b"d"]], [b"a", b"b", b"c"]),
        ([b"BLPOP", b"q", b"1.5"], arr(bulk(b"q"), bulk(b"a")), [[b"LPUSH", b"q", b"a"]], [b"b", b"c", b"d"]),
        ([b"LMPOP", b"2", b"x", b"q", b"LEFT", b"COUNT", b"2"], arr(bulk(b"q"), arr(bulk(b"a"), bulk(b"b"))),
         [[b"LPUSH", b"q", b"b", b"a"]], [b"c", b"d"]),
        ([b"LMPOP", b"1", b"q", b"right", b"COUNT", b"2"], arr(bulk(b"q"), arr(bulk(b"d"), bulk(b"c"))),
         [[b"RPUSH", b"q", b"c", b"d"]], [b"a", b"b"]),
        ([b"LMPOP", b"1", b"q", b"RIGHT"], arr(bulk(b"q"), arr(bulk(b"d"))), [[b"RPUSH", b"q", b"d"]],
         [b"a", b"b", b"c"]),
        ([b"BLMPOP", b"0", b"2", b"x", b"q", b"RIGHT", b"COUNT", b"3"],
         arr(bulk(b"q"), arr(bulk(b"d"), bulk(b"c"), bulk(b"b"))), [[b"RPUSH", b"q", b"b", b"c", b"d"]], [b"a"]),
        ([b"blmpop", b"0.5", b"1", b"q", b"left"], arr(bulk(b"q"), arr(bulk(b"a"))), [[b"LPUSH", b"q", b"a"]],
         [b"b", b"c", b"d"]),
    ],
    ids=lambda v: v[0].decode() if isinstance(v, list) and v and isinstance(v[0], bytes) else None,
)
def test_list_pops(args: list[bytes], raw: bytes, expected: list[list[bytes]], after_pop: list[bytes]) -> None:
    requeue = commands.requeue_for(args, decoded(raw))
    assert requeue == expected
    lists = {b"q": list(after_pop)}
    for cmd in requeue:
        apply(lists, {}, cmd)
    assert lists[b"q"] == LIST


# --------------------------------------------------------------------------------------------------------- sorted sets

ZSET = {b"m1": 1.0, b"m2": 2.5, b"m3": 3.0}


def d3(score: bytes) -> bytes:
    return b"," + score + b"\r\n"


@pytest.mark.parametrize(
    ("args", "raw", "popped"),
    [
        # ZPOPMIN key: RESP2 flat [member, score]; RESP3 flat too (no count).
        ([b"ZPOPMIN", b"z"], arr(bulk(b"m1"), bulk(b"1")), [b"m1"]),
        ([b"ZPOPMIN", b"z"], arr(bulk(b"m1"), d3(b"1")), [b"m1"]),
        # ZPOPMIN/MAX key count: RESP2 flat pairs, RESP3 nested pairs.
        ([b"ZPOPMIN", b"z", b"2"], arr(bulk(b"m1"), bulk(b"1"), bulk(b"m2"), bulk(b"2.5")), [b"m1", b"m2"]),
        ([b"ZPOPMIN", b"z", b"2"], arr(arr(bulk(b"m1"), d3(b"1")), arr(bulk(b"m2"), d3(b"2.5"))), [b"m1", b"m2"]),
        ([b"ZPOPMAX", b"z", b"1"], arr(arr(bulk(b"m3"), d3(b"3"))), [b"m3"]),
        ([b"zpopmax", b"z"], arr(bulk(b"m3"), bulk(b"3")), [b"m3"]),
        # BZPOPMIN/MAX: [key, member, score], the score a bulk (RESP2) or a double (RESP3).
        ([b"BZPOPMIN", b"other", b"z", b"0"], arr(bulk(b"z"), bulk(b"m1"), bulk(b"1")), [b"m1"]),
        ([b"BZPOPMAX", b"z", b"0"], arr(bulk(b"z"), bulk(b"m3"), d3(b"3")), [b"m3"]),
        # ZMPOP/BZMPOP: [key, [[member, score]…]]
        ([b"ZMPOP", b"1", b"z", b"MIN", b"COUNT", b"2"],
         arr(bulk(b"z"), arr(arr(bulk(b"m1"), bulk(b"1")), arr(bulk(b"m2"), bulk(b"2.5")))), [b"m1", b"m2"]),
        ([b"ZMPOP", b"1", b"z", b"MAX"], arr(bulk(b"z"), arr(arr(bulk(b"m3"), d3(b"3")))), [b"m3"]),
        ([b"BZMPOP", b"0", b"2", b"x", b"z", b"MIN", b"COUNT", b"3"],
         arr(bulk(b"z"), arr(arr(bulk(b"m1"), d3(b"1")), arr(bulk(b"m2"), d3(b"2.5")), arr(bulk(b"m3"), d3(b"3")))),
         [b"m1", b"m2", b"m3"]),
    ],
)
def test_zset_pops(args: list[bytes], raw: bytes, popped: list[bytes]) -> None:
    requeue = commands.requeue_for(args, decoded(raw))
    assert len(requeue) == 1
    cmd = requeue[0]
    assert cmd[:2] == [b"ZADD", b"z"]
    # ZADD key score member [score member …], each member with the score it had.
    pairs = list(zip(cmd[3::2], (float(s) for s in cmd[2::2]), strict=True))
    assert pairs == [(m, ZSET[m]) for m in popped]
    zsets = {b"z": {m: s for m, s in ZSET.items() if m not in popped}}
    apply({}, zsets, cmd)
    assert zsets[b"z"] == ZSET


def test_zset_score_precision_survives_resp3_double() -> None:
    requeue = commands.requeue_for([b"ZPOPMIN", b"z"], decoded(arr(bulk(b"m"), d3(b"0.1"))))
    assert requeue == [[b"ZADD", b"z", b"0.1", b"m"]]
    requeue = commands.requeue_for([b"ZPOPMIN", b"z"], decoded(arr(bulk(b"m"), d3(b"1.7976931348623157e+308"))))
    assert float(requeue[0][2]) == 1.7976931348623157e308


# ------------------------------------------------------------------------------------------------- nothing to put back


@pytest.mark.parametrize(
    ("args", "raw"),
    [
        ([b"RPOP", b"q"], b"$-1\r\n"),
        ([b"RPOP", b"q"], b"_\r\n"),
        ([b"RPOP", b"q", b"2"], b"*-1\r\n"),
        ([b"RPOP", b"q", b"2"], b"*0\r\n"),
        ([b"BRPOP", b"q", b"1"], b"*-1\r\n"),
        ([b"BLPOP", b"q", b"1"], b"_\r\n"),
        ([b"BZPOPMIN", b"z", b"1"], b"*-1\r\n"),
        ([b"ZPOPMIN", b"z"], b"*0\r\n"),
        ([b"ZPOPMIN", b"z", b"0"], b"*0\r\n"),
        ([b"LMPOP", b"1", b"q", b"LEFT"], b"*-1\r\n"),
        ([b"ZMPOP", b"1", b"z", b"MIN"], b"_\r\n"),
        ([b"BRPOP", b"q", b"0"], b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
        ([b"RPOP", b"q"], b"-UNBLOCKED client unblocked via CLIENT UNBLOCK\r\n"),
        # Moves keep their element in the destination list: nothing to put back.
        ([b"LMOVE", b"a", b"b", b"LEFT", b"RIGHT"], bulk(b"x")),
        ([b"BRPOPLPUSH", b"a", b"b", b"0"], bulk(b"x")),
        ([b"GET", b"q"], bulk(b"x")),
    ],
)
def test_nothing_to_requeue(args: list[bytes], raw: bytes) -> None:
    assert commands.requeue_for(args, decoded(raw)) == []


def test_blocking_table_names_the_blocking_pops() -> None:
    for name in ("blpop", "brpop", "blmpop", "bzpopmin", "bzpopmax", "bzmpop"):
        assert name in commands.BLOCKING
        assert name in commands.POPS
