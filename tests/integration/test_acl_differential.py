"""Differential test: brokerproxy.acl against a real redis-server 7.0 loaded with the same ACL file.

One ACL file (users with every rule kind: categories in both orders, subcommands, first arguments, key patterns with
%R/%W, glob features, channel patterns, selectors, allkeys/allchannels tricks) is loaded into a real Redis
(``--aclfile``) and into ``UserTable``. A generated corpus (every command and subcommand of the table with random
arguments, plus hand-shaped forms of every command family whose keys move: EVAL/FCALL numkeys, XREAD STREAMS, SORT
STORE, MIGRATE KEYS, GEORADIUS STORE, Z*STORE, *MPOP, SET GET, BITFIELD, pub/sub channels and patterns) is then
judged for every user three ways, and all must agree exactly:

1. ``ACL DRYRUN <user> <command…>`` (Redis's verdict with the refused key or channel named) against
   ``AclPolicy.dryrun``;
2. the same commands sent for real as that user (AUTH), inside MULTI … DISCARD so nothing runs: each reply
   (+QUEUED, or Redis's own -NOPERM / -ERR) against ``AclPolicy.check``; and Redis's ACL LOG entries against
   ``AclPolicy.explain``;
3. ``COMMAND GETKEYSANDFLAGS`` against ``keyspec.get_keys`` (positions and flags), and ``KEYS <pattern>`` against
   the glob matcher.

Besides: 3000 random rule lists through ``ACL SETUSER`` against ``User.apply`` (same acceptance, same error
message, then the same DRYRUN verdicts), the bytes of ``ACL LOG``/``CAT``/``WHOAMI`` in RESP2 and RESP3, and the
committed command table against a fresh generation. The ACL file includes users made by the Celery roles, and the
corpus includes the recorded Celery traffic (tests/data/celery57-resp3), also rewritten for a tenant prefix.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from brokerproxy import acl_log, acl_roles, keyspec, resp
from brokerproxy.acl import AclError, User, UserTable, unknown_command_error
from brokerproxy.command_table import CATEGORIES
from brokerproxy.globmatch import glob_match
from brokerproxy.keyspec import ALL_COMMANDS, Command
from tests.conftest import REDIS_SERVER, RedisServer

PASSWORD = "pw"

# Users: each line exercises some part of the rule language. All are "on >pw" so that they can AUTH.
USERS: dict[str, str] = {
    "default": "on nopass ~* &* +@all",
    "reader": "%R~r:* ~both:* +@read +@connection -@dangerous",
    "writer": "%W~w:* ~both:* +@write -@dangerous &ch:*",
    "celery": "~celery* ~unacked* ~_kombu.* &/0.* +@list +@hash +@sortedset +@set +@string +@keyspace "
    "+@scripting +@pubsub +@transaction +@connection -@dangerous",
    "sel": "~a:* +get (+set ~b:*) (%R~c:* +@read) (&news.* +publish +subscribe +psubscribe)",
    "firstarg": "~* +select|0 +select|1 +debug|object +client|setname +object|encoding",
    "subcmds": "+@all -config +config|get -client|kill ~* &*",
    "cats": "+@all -@dangerous -@admin ~k* &k*",
    "nothing": "",
    "allcmds": "+@all",
    "globs": "+@all ~x?y ~[abc]* ~\\** ~*[^0-9] %RW~lit %R~ro* %W~wo* ~[z-a]? ~[^ ~e\\ &p[0-9] &lit &b?c",
    "rw": "%R~* %W~w* +@all",
    "pubsub": "+@pubsub ~* &a* &b?c &lit",
    "multisel": "(+@read ~r*) (+@write ~w*) (+@pubsub &c*) (+@scripting %R~s* %W~t*)",
    "ordering": "-@all +@all -@dangerous +flushall +@keyspace -del ~* &*",
    "resetkeys": "allkeys resetkeys ~q* allchannels resetchannels &q* +@all -@all +@read +@write",
    "empty": "~ %R~ & +@all",
    "containers": "+@slow -@admin +acl +config -config|set ~* (+client|list +client|info) (+@fast ~f*)",
    "scripting": "+@scripting +@read ~s:* (+@write ~t:*)",
    "starpat": "%RW~* +@all &*",
    "negate": "+@all -@keyspace -@string +get +@sortedset -zadd ~* &*",
    "nocmd": "~* &* +@all nocommands +ping",
    "twosel": "(+@all ~a* ~k*) (+@all ~b* ~k*) (+@all &x* &k*) (+@all &y* &k*) (+@all -@keyspace ~r*)",
    # The Celery roles, as ACL rules: Redis must read them and judge them as brokerproxy does.
    "r_worker": " ".join(acl_roles.worker(["celery", "alpha", "beta", "q*"]).rules),
    "r_producer": " ".join(acl_roles.producer(["celery", "alpha", "beta"], control=True).rules),
    "r_plain": " ".join(acl_roles.producer(["celery", "alpha"], keyprefix="t[1]:").rules),
    "r_tenant": " ".join(acl_roles.worker(["default"], keyprefix="t[1]:", db=2).rules),
    "r_monitor": " ".join(acl_roles.monitor().rules),
    "r_reader": " ".join(acl_roles.result_reader().rules),
}
CAPTURE = Path(__file__).resolve().parent.parent / "data" / "celery57-resp3"

KEYS = [
    b"r:1", b"w:1", b"both:x", b"a:1", b"b:1", b"c:1", b"celery", b"celery\x06\x163", b"unacked", b"unacked_index",
    b"_kombu.binding.celery", b"x1y", b"xy", b"a", b"bz", b"*", b"**", b"k9", b"lit", b"ro1", b"wo1", b"", b"q1",
    b"s:1", b"t:1", b"other", b"tenantA:celery", b"\xff\x01", b"e ", b"e\\", b"[^", b"f1", b"b", b"5", b"ka",
]  # fmt: skip
WORDS = [
    b"0", b"1", b"2", b"3", b"-1", b"01", b"abc", b" 2", b"+1", b"99999999999", b"4294967297", b"STORE", b"store",
    b"STOREDIST", b"STREAMS", b"streams", b"KEYS", b"GET", b"get", b"BY", b"LIMIT", b"GROUP", b"COUNT", b"BLOCK",
    b"NOACK", b"LEFT", b"RIGHT", b"MIN", b"MAX", b"WEIGHTS", b"AGGREGATE", b"SET", b"INCRBY", b"OVERFLOW", b"AUTH",
    b"AUTH2", b"COPY", b"REPLACE", b"$", b"10", b"u8", b"#0", b"x", b"KEYS\x00x", b"WITHSCORES", b"STREAMS\x00",
    b"STORE\x00y", b"1\x00",
]  # fmt: skip
CHANNELS = [
    b"x1", b"y1", b"ch:1", b"news.x", b"/0.celeryev/worker.heartbeat", b"a1", b"b?c", b"bxc", b"p5", b"lit", b"*",
    b"k1", b"q1", b"c1", b"other", b"a*", b"p[0-9]", b"lit\x00x",
]  # fmt: skip

# WATCH runs at once even inside MULTI, and then refuses: that is its "allowed" reply here.
WATCH_IN_MULTI = resp.ErrorReply(b"ERR WATCH inside MULTI is not allowed")
# Commands never sent for real inside MULTI: they act at once (or are refused in MULTI) instead of queuing.
NOT_QUEUED = {"multi", "exec", "discard", "quit", "reset", "auth", "hello", "module"}


def acl_file_text() -> str:
    # Every user may also MULTI and DISCARD (added last, after any -@all), for test_real_commands_match_redis.
    return "".join(f"user {name} on >{PASSWORD} {rules} +multi +discard\n" for name, rules in USERS.items())


# ---------------------------------------------------------------------------------------------- the corpus


def _name_parts(cmd: Command) -> list[bytes]:
    return [p.encode() for p in cmd.name.split("|")]


def _random_arg(rng: random.Random) -> bytes:
    pool = rng.choice((KEYS, KEYS, WORDS, CHANNELS))
    return rng.choice(pool)


def _generic(cmd: Command, rng: random.Random, count: int) -> Iterator[list[bytes]]:
    head = _name_parts(cmd)
    for i in range(count):
        if cmd.arity > 0:
            n = cmd.arity
        else:
            n = -cmd.arity + rng.randrange(0, 6)
        if i == count - 1 and cmd.arity < 0:
            n = -cmd.arity  # the shortest form
        args = head + [_random_arg(rng) for _ in range(n - len(head))]
        if rng.random() < 0.2:
            args[0] = bytes(c ^ 0x20 if rng.random() < 0.5 and chr(c).isalpha() else c for c in args[0])
        yield args


def _keys(rng: random.Random, n: int) -> list[bytes]:
    return [rng.choice(KEYS) for _ in range(n)]


def _shaped(rng: random.Random) -> Iterator[list[bytes]]:
    """Hand-shaped forms of the commands whose keys move."""
    k = lambda: rng.choice(KEYS)  # noqa: E731
    for _ in range(6):
        for name in (b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL", b"FCALL_RO"):
            n = rng.randrange(0, 4)
            yield [name, b"return 1", str(n).encode(), *_keys(rng, n), b"arg"]
            yield [name, b"body", rng.choice(WORDS[:11]), *_keys(rng, rng.randrange(0, 3))]
        for name in (b"ZUNIONSTORE", b"ZINTERSTORE", b"ZDIFFSTORE"):
            n = rng.randrange(1, 4)
            yield [name, k(), str(n).encode(), *_keys(rng, n), b"WEIGHTS", b"1"][: rng.randrange(4, 9)]
            yield [name, k(), rng.choice(WORDS[:11]), *_keys(rng, 2)]
        for name in (b"ZUNION", b"ZINTER", b"ZDIFF", b"ZINTERCARD", b"SINTERCARD"):
            n = rng.randrange(1, 4)
            yield [name, str(n).encode(), *_keys(rng, n), b"LIMIT", b"1"][: rng.randrange(3, 8)]
        for name, extra in ((b"LMPOP", b"LEFT"), (b"ZMPOP", b"MIN")):
            n = rng.randrange(1, 4)
            yield [name, rng.choice((str(n).encode(), b"01", b"0", b"-1")), *_keys(rng, n), extra, b"COUNT", b"2"]
        for name, extra in ((b"BLMPOP", b"LEFT"), (b"BZMPOP", b"MAX")):
            n = rng.randrange(1, 4)
            yield [name, b"0", rng.choice((str(n).encode(), b"9", b" 1")), *_keys(rng, n), extra]
        yield [b"SORT", k(), *rng.sample([b"BY", k(), b"LIMIT", b"0", b"1", b"GET", k(), b"STORE", k(), b"ASC"], 6)]
        yield [b"SORT", k(), b"STORE", k(), b"STORE", k()]
        yield [b"SORT", k(), b"LIMIT", b"STORE", k(), b"STORE"]
        yield [b"SORT", k(), b"GET", b"STORE", b"STORE", k()]
        yield [b"SORT_RO", k(), b"STORE", k()]
        yield [b"MIGRATE", b"127.0.0.1", b"1", k(), b"0", b"10"]
        yield [b"MIGRATE", b"127.0.0.1", b"1", b"", b"0", b"10", b"COPY", b"KEYS", *_keys(rng, 2)]
        yield [b"MIGRATE", b"127.0.0.1", b"1", b"", b"0", b"10", b"AUTH", b"KEYS", b"KEYS", k()]
        yield [b"MIGRATE", b"127.0.0.1", b"1", b"", b"0", b"10", b"AUTH2", b"u", b"KEYS", k()]
        yield [b"MIGRATE", b"127.0.0.1", b"1", k(), b"0", b"10", b"REPLACE", b"KEYS", k()]
        yield [b"MIGRATE", b"127.0.0.1", b"1", b"\x00k", b"0", b"10", b"KEYS", k()]
        yield [b"GEORADIUS", k(), b"0", b"0", b"1", b"km", *rng.sample([b"STORE", k(), b"STOREDIST", k(), b"ASC"], 4)]
        yield [b"GEORADIUSBYMEMBER", k(), b"m", b"1", b"km", b"STOREDIST", k(), b"STORE"]
        yield [b"GEORADIUS_RO", k(), b"0", b"0", b"1", b"km", b"STORE", k()]
        yield [b"XREAD", *rng.sample([b"COUNT", b"1", b"BLOCK", b"0"], 2), b"STREAMS", *_keys(rng, 2), b"0", b"0"]
        yield [b"XREAD", b"STREAMS", *_keys(rng, 3), b"0", b"0"]
        yield [b"XREAD", b"COUNT", b"STREAMS", b"STREAMS", k(), b"0"]
        yield [b"XREADGROUP", b"GROUP", b"g", b"c", b"NOACK", b"STREAMS", *_keys(rng, 2), b">", b">"]
        yield [b"XREADGROUP", b"GROUP", b"STREAMS", b"c", b"STREAMS", k(), b">"]
        yield [b"XREADGROUP", b"GROUP", b"g", b"STREAMS", b"STREAMS", k(), b">"]
        yield [b"SET", k(), b"v", *rng.sample([b"GET", b"NX", b"EX", b"10", b"get\x00"], 2)]
        yield [b"BITFIELD", k(), *rng.sample([b"GET", b"u8", b"0", b"OVERFLOW", b"WRAP", b"SET", b"INCRBY"], 5)]
        yield [b"BITFIELD", k(), b"GET", b"u8", b"0", b"OVERFLOW", b"SAT", b"GET", b"u8", b"8"]
        yield [b"BITFIELD_RO", k(), b"GET", b"u8", b"0"]
        yield [b"OBJECT", b"ENCODING", k()]
        yield [b"MEMORY", b"USAGE", k(), b"SAMPLES", b"1"]
        yield [b"XINFO", b"STREAM", k(), b"FULL"]
        yield [b"XGROUP", b"CREATE", k(), b"g", b"$", b"MKSTREAM"]
        yield [b"BRPOP", *_keys(rng, rng.randrange(1, 5)), b"1"]
        yield [b"LPUSH", k(), b"msg"]
        yield [b"MSET", k(), b"1", k(), b"2"]
        yield [b"RENAME", k(), k()]
        yield [b"COPY", k(), k(), b"REPLACE"]
        yield [b"LMOVE", k(), k(), b"LEFT", b"RIGHT"]
        yield [b"SMOVE", k(), k(), b"m"]
        yield [b"PFMERGE", k(), k(), k()]
        yield [b"GEOSEARCHSTORE", k(), k(), b"FROMMEMBER", b"m", b"BYRADIUS", b"1", b"km"]
    ch = lambda: rng.choice(CHANNELS)  # noqa: E731
    for _ in range(10):
        yield [b"PUBLISH", ch(), b"msg"]
        yield [b"SPUBLISH", ch(), b"msg"]
        yield [b"SUBSCRIBE", *[ch() for _ in range(rng.randrange(1, 4))]]
        yield [b"SSUBSCRIBE", *[ch() for _ in range(rng.randrange(1, 4))]]
        yield [b"PSUBSCRIBE", *[ch() for _ in range(rng.randrange(1, 4))]]
        yield [b"UNSUBSCRIBE", ch()]
        yield [b"PUNSUBSCRIBE", ch()]
        yield [b"SUNSUBSCRIBE", ch()]
        yield [b"PUBSUB", b"NUMSUB", ch()]
    for first in (b"0", b"1", b"2", b"00", b"0\x001"):
        yield [b"SELECT", first]
    yield [b"DEBUG", b"OBJECT", b"k9"]
    yield [b"DEBUG", b"object", b"x"]
    yield [b"CLIENT", b"SETNAME", b"n"]
    yield [b"client", b"setname", b"n"]
    yield [b"CLIENT", b"KILL", b"ID", b"1"]
    yield [b"CONFIG", b"GET", b"maxmemory"]
    yield [b"CONFIG", b"SET", b"maxmemory", b"0"]
    yield [b"ACL", b"WHOAMI"]
    yield [b"ACL", b"CAT"]
    yield [b"PING"]
    yield [b"nosuchcommand", b"a", b"b"]
    yield [b"CONFIG", b"nosuchsub"]
    yield [b"CONFIG"]
    yield [b"GET"]
    yield [b"GET", b"a", b"b"]


def captured() -> list[list[bytes]]:
    """Real Celery 5.7 traffic (tests/data/celery57-resp3), one request per command and first two arguments, plus
    the same with the keys and channels of a tenant (prefix "t[1]:", db 2)."""
    seen: dict[tuple[bytes, ...], list[bytes]] = {}
    for path in sorted(CAPTURE.glob("*.c2s")):
        parser = resp.RequestParser()
        parser.feed(path.read_bytes())
        for r in iter(parser.next, None):
            if r.args:
                seen.setdefault(tuple(r.args[:2]), r.args)
    out = list(seen.values())
    for args in list(out):
        cmd = keyspec.lookup(args)
        if cmd is None or not (cmd.has_keys or cmd.channel_spec):
            continue
        positions = {p for p, _ in keyspec.get_keys(cmd, args)} | {p for p, _ in keyspec.get_channels(cmd, args)}
        tenant = [b"t[1]:" + a.replace(b"/0.", b"/2.") if i in positions else a for i, a in enumerate(args)]
        out.append(tenant)
    return out


def corpus(seed: int = 20261125, per_command: int = 10) -> list[list[bytes]]:
    rng = random.Random(seed)
    out: list[list[bytes]] = []
    for cmd in ALL_COMMANDS:
        if cmd.subcommands is not None:
            # Containers: their subcommands are listed on their own; the container alone too (COMMAND alone is a
            # command of its own; the others are arity errors), and with an unknown subcommand.
            out += [[cmd.name.upper().encode()], [cmd.name.upper().encode(), b"NO-SUCH-SUBCOMMAND"]]
            continue
        out += _generic(cmd, rng, per_command)
    out += _shaped(rng)
    out += captured()
    return out


# ---------------------------------------------------------------------------------------------- a raw client


class Raw:
    """Pipelines raw commands and returns raw RESP2 replies decoded: bytes, int, list, or ErrorReply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.parser = resp.ReplyParser()

    def pipeline(self, commands: Sequence[Sequence[bytes]]) -> list[resp.Value]:
        out: list[resp.Value] = []
        for start in range(0, len(commands), 2000):
            chunk = commands[start : start + 2000]
            self.sock.sendall(b"".join(resp.encode_command(list(c)) for c in chunk))
            while len(out) < start + len(chunk):
                framed = self.parser.next()
                if framed is None:
                    data = self.sock.recv(1 << 20)
                    assert data, "redis-server closed the connection"
                    self.parser.feed(data)
                    continue
                out.append(resp.decode(framed[1]))
        return out

    def close(self) -> None:
        self.sock.close()


def _reply_text(value: resp.Value) -> str:
    if isinstance(value, resp.ErrorReply):
        return bytes(value).decode("utf-8", "replace")
    assert isinstance(value, bytes), value
    return value.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    d = tmp_path_factory.mktemp("acl-redis")
    path = d / "users.acl"
    path.write_text(acl_file_text())
    server = RedisServer(d, "--aclfile", str(path), "--acllog-max-len", "1000000")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def table() -> UserTable:
    # Built from the same file as Redis's, so the role users carry no script allowlist here: the scripts rule is
    # brokerproxy's own (tests/unit/test_acl.py covers it).
    return UserTable.from_acl(acl_file_text(), "users.acl")


@pytest.fixture(scope="module")
def commands() -> list[list[bytes]]:
    return corpus()


def _admin(server: RedisServer) -> Raw:
    raw = Raw(server.port)
    assert raw.pipeline([[b"AUTH", b"default", PASSWORD.encode()]]) == [b"OK"]
    return raw


# ---------------------------------------------------------------------------------------------- the tests


def test_corpus_is_large_and_covers_every_command(commands: list[list[bytes]]) -> None:
    named = {keyspec.lookup(c).name for c in commands if keyspec.lookup(c) is not None}  # type: ignore[union-attr]
    every = {c.name for c in ALL_COMMANDS if c.subcommands is None}
    assert every <= named
    assert len(commands) * len(USERS) > 50_000


def test_dryrun_matches_redis(acl_redis: RedisServer, table: UserTable, commands: list[list[bytes]]) -> None:
    admin = _admin(acl_redis)
    try:
        requests = [[b"ACL", b"DRYRUN", user.encode(), *c] for user in USERS for c in commands]
        replies = admin.pipeline(requests)
    finally:
        admin.close()
    mismatches = []
    for request, reply in zip(requests, replies, strict=True):
        user, args = request[2].decode(), request[3:]
        ours = table.policy.dryrun(user, args)
        theirs = _reply_text(reply)
        if ours != theirs:
            mismatches.append((user, args, theirs, ours))
    assert not mismatches, f"{len(mismatches)} of {len(requests)} differ, e.g. {mismatches[:10]}"
    outcomes = {_reply_text(r).split(" ")[0] for r in replies}
    assert {"OK", "This", "ERR"} <= outcomes  # allowed, refused, and rejected before the ACL all occur


def test_real_commands_match_redis(acl_redis: RedisServer, table: UserTable, commands: list[list[bytes]]) -> None:
    # As each user, inside MULTI … DISCARD: Redis runs its full check at queue time, and nothing executes.
    queued = [c for c in commands if (cmd := keyspec.lookup(c)) is None or _queueable(cmd)]
    admin = _admin(acl_redis)
    admin.pipeline([[b"ACL", b"LOG", b"RESET"]])
    mismatches = []
    denials: set[tuple[str, str, bytes]] = set()
    for user in USERS:
        raw = Raw(acl_redis.port)
        try:
            replies = raw.pipeline([[b"AUTH", user.encode(), PASSWORD.encode()], [b"MULTI"], *queued, [b"DISCARD"]])
        finally:
            raw.close()
        assert replies[:2] == [b"OK", b"OK"] and replies[-1] == b"OK", (user, replies[:2], replies[-1])
        for args, reply in zip(queued, replies[2:-1], strict=True):
            request = resp.Request(list(args), b"")
            ours = table.policy.check(user, request)
            if ours is not None and ours.startswith("NOPERM this user has no permissions to run the script"):
                ours = None  # the script allowlist is brokerproxy's own: Redis has no such rule
            if ours is None and keyspec.lookup(args) is None:
                # A command the table does not know goes on for a user allowed everything, and Redis refuses it.
                ours = unknown_command_error(args)
            theirs = None if reply in (b"QUEUED", WATCH_IN_MULTI) else _reply_text(reply)
            if ours != theirs:
                mismatches.append((user, args, theirs, ours))
            denial = table.policy.explain(user, request)
            if denial is not None and ours is not None:
                denials.add((user, denial.reason, denial.object))
    assert not mismatches, f"{len(mismatches)} differ, e.g. {mismatches[:10]}"
    log = admin.pipeline([[b"ACL", b"LOG", b"1000000"]])[0]
    admin.close()
    assert isinstance(log, list)
    theirs_log = set()
    for entry in log:
        fields = dict(zip(entry[::2], entry[1::2], strict=True))
        assert fields[b"context"] == b"multi"
        theirs_log.add((fields[b"username"].decode(), fields[b"reason"].decode(), fields[b"object"]))
    assert theirs_log == denials


def _queueable(cmd: Command) -> bool:
    top = cmd.parent or cmd
    return top.name not in NOT_QUEUED and "no_multi" not in cmd.flags


def test_keys_match_getkeysandflags(acl_redis: RedisServer, commands: list[list[bytes]]) -> None:
    admin = _admin(acl_redis)
    try:
        probes = []
        for c in commands:
            cmd = keyspec.lookup(c)
            if cmd is None or not cmd.has_keys:
                continue
            if (len(c) != cmd.arity) if cmd.arity > 0 else (len(c) < -cmd.arity):
                continue
            probes.append((cmd, c))
        replies = admin.pipeline([[b"COMMAND", b"GETKEYSANDFLAGS", *c] for _, c in probes])
    finally:
        admin.close()
    mismatches = []
    for (cmd, c), reply in zip(probes, replies, strict=True):
        ours = [[c[p], [f.encode() for f in keyspec.flag_names(f)]] for p, f in keyspec.get_keys(cmd, c)]
        if isinstance(reply, resp.ErrorReply):
            theirs: object = [] if b"Invalid arguments" in reply else bytes(reply)
        else:
            theirs = reply
        if ours != theirs:
            mismatches.append((c, theirs, ours))
    assert not mismatches, f"{len(mismatches)} of {len(probes)} differ, e.g. {mismatches[:10]}"
    assert len(probes) > 2000


GLOB_ALPHABET = [b"a", b"b", b"z", b"*", b"?", b"[", b"]", b"^", b"-", b"\\", b"\xff", b"\x80", b"0", b"9"]


def test_glob_matches_redis_keys_command(redis_server: RedisServer) -> None:
    # KEYS <pattern> runs Redis's stringmatchlen over every key (except the pattern "*" alone, which it
    # short-cuts to every key, the empty one included).
    rng = random.Random(7)
    subjects = {b"", b"a", b"b", b"ab", b"ba", b"aab", b"z", b"-", b"]", b"[", b"\\", b"*", b"?", b"^", b"\xff",
                b"\x80", b"a\xff", b"0", b"9", b"a-z", b"zz", b"a]b", b"[ab]", b"\xffa"}  # fmt: skip
    subjects |= {bytes(rng.choice(GLOB_ALPHABET)[0] for _ in range(rng.randrange(1, 5))) for _ in range(300)}
    patterns = {b"".join(rng.choice(GLOB_ALPHABET) for _ in range(rng.randrange(0, 7))) for _ in range(1500)}
    patterns -= {b"*"}
    raw = Raw(redis_server.port)
    try:
        raw.pipeline([[b"FLUSHALL"], *[[b"SET", s, b"1"] for s in subjects]])
        ordered = sorted(patterns)
        replies = raw.pipeline([[b"KEYS", p] for p in ordered])
    finally:
        raw.close()
    mismatches = []
    for pattern, reply in zip(ordered, replies, strict=True):
        assert isinstance(reply, list)
        ours = {s for s in subjects if glob_match(pattern, s)}
        if ours != set(reply):
            mismatches.append((pattern, sorted(set(reply) ^ ours)))
    assert not mismatches, f"{len(mismatches)} of {len(ordered)} differ, e.g. {mismatches[:10]}"


def test_command_table_is_current(tmp_path: Path) -> None:
    # The committed table is what the generator reads from this redis-server (when it is the same version).
    from brokerproxy import command_table, gen_command_table

    text = gen_command_table.generate(REDIS_SERVER)
    if f'REDIS_VERSION = "{command_table.REDIS_VERSION}"' not in text:
        pytest.skip("a redis-server of another version than the committed table's")
    assert text == Path(command_table.__file__).read_text()


def test_acl_file_loads_the_same_users(acl_redis: RedisServer, table: UserTable, tmp_path: Path) -> None:
    admin = _admin(acl_redis)
    try:
        users = admin.pipeline([[b"ACL", b"USERS"]])[0]
    finally:
        admin.close()
    assert isinstance(users, list)
    assert {u.decode() for u in users} == set(table.users)


def _raw_replies(port: int, payload: bytes, count: int) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        parser = resp.ReplyParser()
        frames: list[bytes] = []
        while len(frames) < count:
            framed = parser.next()
            if framed is None:
                data = sock.recv(1 << 20)
                assert data
                parser.feed(data)
            else:
                frames.append(framed[1])
    return frames


@pytest.mark.parametrize("protocol", [2, 3])
def test_acl_log_cat_whoami_replies_match_redis(acl_redis: RedisServer, protocol: int) -> None:
    hello = resp.encode_command([b"HELLO", str(protocol).encode(), b"AUTH", b"default", PASSWORD.encode()])
    denied = resp.encode_command([b"AUTH", b"reader", PASSWORD.encode()]) + resp.encode_command([b"SET", b"r:1", b"v"])
    _raw_replies(acl_redis.port, denied, 2)  # one denial in Redis's log: reason key, object r:1
    queries = [[b"ACL", b"LOG", b"1"], [b"ACL", b"whoami"], [b"ACL", b"CAT", b"nope"], [b"ACL", b"Log", b"x"],
               [b"ACL", b"LOG", b"1", b"2"], [b"ACL", b"cat"]]  # fmt: skip
    frames = _raw_replies(acl_redis.port, hello + b"".join(resp.encode_command(q) for q in queries), 1 + len(queries))
    theirs = frames[1:]
    entry = resp.decode(theirs[0])
    assert isinstance(entry, list) and len(entry) == 1
    fields = entry[0] if protocol == 3 else dict(zip(entry[0][::2], entry[0][1::2], strict=True))
    assert isinstance(fields, dict)
    # Our log, holding the same event, must answer with the same bytes.
    age_ms = round(float(fields[b"age-seconds"]) * 1000)
    log = acl_log.AclLog(clock=lambda: 1_000_000.0)
    log.record(fields[b"reason"].decode(), fields[b"object"], fields[b"username"], context=fields[b"context"].decode(),
               client_info=fields[b"client-info"])  # fmt: skip
    log._entries[0].ctime_ms -= age_ms
    log._entries[0].count = fields[b"count"]
    assert log.reply(queries[0], protocol) == theirs[0]
    assert acl_log.whoami("default", protocol) == theirs[1]
    assert acl_log.cat(queries[2]) == theirs[2]
    assert log.reply(queries[3], protocol) == theirs[3]
    assert log.reply(queries[4], protocol) == theirs[4]
    assert acl_log.cat(queries[5]) == theirs[5]
    # ACL CAT <category> lists the same commands (Redis's order is its hash table's).
    admin = _admin(acl_redis)
    try:
        listed = admin.pipeline([[b"ACL", b"CAT", c.encode()] for c in CATEGORIES])
    finally:
        admin.close()
    for category, names in zip(CATEGORIES, listed, strict=True):
        ours = resp.decode(acl_log.cat([b"ACL", b"CAT", category.encode()]))
        assert isinstance(ours, list) and isinstance(names, list)
        assert sorted(ours) == sorted(names), category


RULE_PIECES = [
    "on", "off", "nopass", "resetpass", ">pw", "<pw", "#" + "a" * 64, "!" + "a" * 64, "#abc", "~", "%R~", "%W~",
    "%RW~", "%", "%X~", "&", "+", "-", "+@", "-@", "@", "(", ")", "|", "*", "?", "[", "]", "^", "\\", "\"", "'", "get",
    "config", "set", "client", "select", "0", "all", "read", "write", "dangerous", "keyspace", "pubsub", "allkeys",
    "resetkeys", "allchannels", "resetchannels", "allcommands", "nocommands", "reset", "clearselectors", "a", "k",
    "skip-sanitize-payload", "x",
]  # fmt: skip


WHOLE_RULES = [
    "on", "+@all", "-@all", "+@read", "-@write", "+@dangerous", "-@keyspace", "+get", "-get", "+config|get",
    "-config|set", "+client", "+select|0", "~k*", "%R~r*", "%W~w*", "~*", "allkeys", "resetkeys", "&c*", "&*",
    "resetchannels", "(+set ~s*)", "(%R~x* +@read)", "(&p* +publish)", "clearselectors", "reset", "nocommands",
]  # fmt: skip


def _random_rules(rng: random.Random) -> list[bytes]:
    rules = []
    for _ in range(rng.randrange(1, 6)):
        rule = "".join(rng.choice(RULE_PIECES) for _ in range(rng.randrange(1, 4)))
        if rng.random() < 0.7:
            rule = rng.choice(WHOLE_RULES)
        elif rng.random() < 0.15:
            rule = "(" + " ".join(rng.choice(RULE_PIECES) for _ in range(rng.randrange(0, 4))) + ")"
        rules.append(rule.encode())
    return rules


def test_setuser_rules_match_redis(acl_redis: RedisServer, commands: list[list[bytes]]) -> None:
    # Random rule lists through ACL SETUSER: Redis and User.apply accept the same ones and refuse the others with
    # the same message; the users they accept then judge a sample of the corpus alike (ACL DRYRUN).
    rng = random.Random(99)
    cases = [(f"fz{i}", _random_rules(rng)) for i in range(3000)]
    sample = rng.sample(commands, 40)
    admin = _admin(acl_redis)
    try:
        replies = admin.pipeline([[b"ACL", b"SETUSER", name.encode(), *rules] for name, rules in cases])
        accepted = [(name, rules) for (name, rules), r in zip(cases, replies, strict=True) if r == b"OK"]
        verdicts = admin.pipeline([[b"ACL", b"DRYRUN", n.encode(), *c] for n, _ in accepted for c in sample])
        admin.pipeline([[b"ACL", b"DELUSER", *[n.encode() for n, _ in cases]]])
    finally:
        admin.close()
    mismatches: list[object] = []
    ours_accepted: list[User] = []
    for (name, rules), reply in zip(cases, replies, strict=True):
        user = User(name)
        try:
            user.apply(rules)
            ours = "OK"
        except AclError as e:
            ours = f"ERR {e}"
        if ours != _reply_text(reply):
            mismatches.append((rules, _reply_text(reply), ours))
        elif ours == "OK":
            ours_accepted.append(user)
    table = UserTable(ours_accepted)
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ, e.g. {mismatches[:10]}"
    assert 300 < len(accepted) < len(cases)  # both outcomes are well represented
    judged = [(n, c) for n, _ in accepted for c in sample]
    differ = []
    for (n, c), v in zip(judged, verdicts, strict=True):
        ours = table.policy.dryrun(n, c)
        if ours != _reply_text(v):
            differ.append((n, c, _reply_text(v), ours))
    assert not differ, f"{len(differ)} of {len(judged)} differ, e.g. {differ[:10]}"
