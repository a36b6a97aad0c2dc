"""The command table: what the proxy must know about a command to route its reply and keep its promises.

The proxy forwards every command, known or not; this table only names the commands that need something from it:
the ones it answers itself, the ones that change how replies are counted (pub/sub, MONITOR, CLIENT REPLY), and the
pops whose element it must put back when the client that asked for it is gone.
"""

from __future__ import annotations

from collections.abc import Callable

from .resp import ErrorReply, Value

#: Commands Redis runs before authentication (its ``no-auth`` flag in ``COMMAND INFO``).
NO_AUTH = frozenset({"auth", "hello", "reset", "quit"})

#: Pub/sub (un)subscribe commands, by the kind of subscription they touch.
SUBSCRIBE = {"subscribe": "channel", "psubscribe": "pattern", "ssubscribe": "shard"}
UNSUBSCRIBE = {"unsubscribe": "channel", "punsubscribe": "pattern", "sunsubscribe": "shard"}

#: Commands allowed on a RESP2 connection in subscribed mode (Redis's own list).
SUBSCRIBED_MODE_ALLOWED = frozenset(
    {"subscribe", "psubscribe", "ssubscribe", "unsubscribe", "punsubscribe", "sunsubscribe", "ping", "quit", "reset"}
)

#: Commands that may block the connection for as long as their timeout (0 = forever); the proxy never times them
#: out itself. XREAD/XREADGROUP block only with BLOCK.
BLOCKING = frozenset(
    {
        "blpop", "brpop", "brpoplpush", "blmove", "blmpop", "bzpopmin", "bzpopmax", "bzmpop", "wait", "waitaof",
        "xread", "xreadgroup",  # block only with BLOCK; CLIENT UNBLOCK on a client that is not blocked is harmless
    }
)

Requeue = list[list[bytes]]


def _as_bytes(v: Value) -> bytes:
    if isinstance(v, float):
        return repr(v).encode()
    if isinstance(v, int):
        return str(v).encode()
    assert isinstance(v, bytes)
    return bytes(v)


def _list_end(direction: bytes) -> bytes:
    """The push that puts elements back at the end they were popped from."""
    return b"RPUSH" if direction.upper() == b"RIGHT" else b"LPUSH"


def _key_element(push: bytes) -> Callable[[list[bytes], Value], Requeue]:
    # BRPOP/BLPOP: [key, element]
    def undo(args: list[bytes], reply: Value) -> Requeue:
        assert isinstance(reply, list)
        return [[push, _as_bytes(reply[0]), _as_bytes(reply[1])]]

    return undo


def _single_or_many(push: bytes) -> Callable[[list[bytes], Value], Requeue]:
    # RPOP/LPOP key [count]: one bulk, or an array in pop order. Pushing them back in reverse order restores the
    # list exactly: RPOP 2 of [a b c] gives [c b]; RPUSH b c restores it.
    def undo(args: list[bytes], reply: Value) -> Requeue:
        items = reply if isinstance(reply, list) else [reply]
        if not items:
            return []
        return [[push, args[1], *(_as_bytes(x) for x in reversed(items))]]

    return undo


def _mpop(args: list[bytes], reply: Value) -> Requeue:
    # LMPOP/BLMPOP …  LEFT|RIGHT [COUNT n]: [key, [elements…]]
    assert isinstance(reply, list)
    numkeys_at = 2 if args[0].lower() == b"blmpop" else 1
    direction = args[numkeys_at + 1 + int(args[numkeys_at])]
    items = reply[1]
    assert isinstance(items, list)
    return [[_list_end(direction), _as_bytes(reply[0]), *(_as_bytes(x) for x in reversed(items))]]


def _zpairs(values: list[Value]) -> list[bytes]:
    """Member/score pairs, flat (RESP2) or nested (RESP3), as ZADD's score member arguments."""
    flat: list[Value] = []
    for v in values:
        if isinstance(v, list):
            flat.extend(v)
        else:
            flat.append(v)
    out: list[bytes] = []
    for member, score in zip(flat[0::2], flat[1::2], strict=False):
        out += [_as_bytes(score), _as_bytes(member)]
    return out


def _bzpop(args: list[bytes], reply: Value) -> Requeue:
    # BZPOPMIN/MAX: [key, member, score]
    assert isinstance(reply, list)
    return [[b"ZADD", _as_bytes(reply[0]), *_zpairs(reply[1:])]]


def _zpop(args: list[bytes], reply: Value) -> Requeue:
    # ZPOPMIN/MAX key [count]: pairs, flat or nested
    assert isinstance(reply, list)
    pairs = _zpairs(reply)
    return [[b"ZADD", args[1], *pairs]] if pairs else []


def _zmpop(args: list[bytes], reply: Value) -> Requeue:
    # ZMPOP/BZMPOP: [key, [[member, score]…]]
    assert isinstance(reply, list) and isinstance(reply[1], list)
    return [[b"ZADD", _as_bytes(reply[0]), *_zpairs(reply[1])]]


#: Pops whose element the proxy puts back when it cannot deliver the reply. Moves (LMOVE, BLMOVE, RPOPLPUSH,
#: BRPOPLPUSH) are absent on purpose: their element is already safe in the destination list, which is what the
#: reliable-queue pattern they serve relies on.
POPS: dict[str, Callable[[list[bytes], Value], Requeue]] = {
    "brpop": _key_element(b"RPUSH"),
    "blpop": _key_element(b"LPUSH"),
    "rpop": _single_or_many(b"RPUSH"),
    "lpop": _single_or_many(b"LPUSH"),
    "lmpop": _mpop,
    "blmpop": _mpop,
    "bzpopmin": _bzpop,
    "bzpopmax": _bzpop,
    "zpopmin": _zpop,
    "zpopmax": _zpop,
    "zmpop": _zmpop,
    "bzmpop": _zmpop,
}


def requeue_for(args: list[bytes], reply: Value) -> Requeue:
    """The commands that put back what ``reply`` (to the pop ``args``) took out; [] when it took nothing."""
    if reply is None or isinstance(reply, ErrorReply) or reply == []:
        return []
    undo = POPS.get(args[0].decode("latin-1").lower())
    return undo(args, reply) if undo else []
