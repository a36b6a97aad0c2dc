"""Which arguments of a command are keys and channels, found the way Redis 7.0 finds them for its ACL check.

Theory of operation
-------------------
``command_table.py`` holds Redis's command table as data (generated from a real server). This module compiles it
into ``Command`` objects and answers two questions about a request:

* ``get_keys(cmd, args)``: the positions of the key arguments and their key-spec flags. Redis prefers the key
  specs from the table (``begin_search`` index or keyword, then ``find_keys`` range or keynum); when a spec cannot
  be followed (an unknown spec, a bad ``numkeys``, a spec marked ``incomplete``, positions out of range) or a
  command's flags vary with its arguments (``variable_flags``: ``SET … GET``, ``BITFIELD``), it falls back to the
  command's own key-finding procedure. Those procedures are native code in Redis, not data, so the ones Redis 7.0
  has (``EVAL``/``FCALL`` numkeys, ``SORT … STORE``, ``MIGRATE … KEYS``, ``GEORADIUS … STORE``, ``XREAD …
  STREAMS``, ``Z*STORE``/``*MPOP`` numkeys, ``SET``, ``BITFIELD``) are written out below, with the same quirks:
  Redis reads ``numkeys`` with ``string2ll`` in the spec path and with ``atoi`` in the fallback, and the fallback
  reports keys without flags.
* ``get_channels(cmd, args)``: the channel arguments of the pub/sub commands and whether each is a pattern, a
  publish or a subscribe (Redis 7.0 keeps this as a small fixed table, not in the key specs).

Arguments are compared the way Redis's C code compares them: case-insensitively in ASCII, and only up to the
first NUL byte where Redis uses C string functions (``strcasecmp``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from .command_table import COMMANDS, CommandSpec, KeySpec

# Key-spec flags, as bits.
RW = 1 << 0
RO = 1 << 1
OW = 1 << 2
RM = 1 << 3
ACCESS = 1 << 4
UPDATE = 1 << 5
INSERT = 1 << 6
DELETE = 1 << 7
NOT_KEY = 1 << 8
INCOMPLETE = 1 << 9
VARIABLE_FLAGS = 1 << 10

KEY_FLAG_BITS = {
    "RW": RW, "RO": RO, "OW": OW, "RM": RM, "access": ACCESS, "update": UPDATE, "insert": INSERT,
    "delete": DELETE, "not_key": NOT_KEY, "incomplete": INCOMPLETE, "variable_flags": VARIABLE_FLAGS,
}  # fmt: skip

# What a key's flags ask of an ACL key pattern: read (%R) for access, write (%W) for insert, delete or update.
NEED_READ = 1
NEED_WRITE = 2

# Channel flags (Redis's CMD_CHANNEL_*).
CHANNEL_PATTERN = 1
CHANNEL_PUBLISH = 2
CHANNEL_SUBSCRIBE = 4
CHANNEL_UNSUBSCRIBE = 8

#: Redis 7.0's channel table: command -> (flags, first position, count or -1 for all remaining arguments).
CHANNEL_SPECS: dict[str, tuple[int, int, int]] = {
    "subscribe": (CHANNEL_SUBSCRIBE, 1, -1),
    "ssubscribe": (CHANNEL_SUBSCRIBE, 1, -1),
    "unsubscribe": (CHANNEL_UNSUBSCRIBE, 1, -1),
    "sunsubscribe": (CHANNEL_UNSUBSCRIBE, 1, -1),
    "psubscribe": (CHANNEL_PATTERN | CHANNEL_SUBSCRIBE, 1, -1),
    "punsubscribe": (CHANNEL_PATTERN | CHANNEL_UNSUBSCRIBE, 1, -1),
    "publish": (CHANNEL_PUBLISH, 1, 1),
    "spublish": (CHANNEL_PUBLISH, 1, 1),
}

Keys = list[tuple[int, int]]  # (argument position, key-spec flag bits)


def key_need(flags: int) -> int:
    """The ACL permissions a key with these key-spec flags needs (NEED_READ | NEED_WRITE, or 0)."""
    need = NEED_READ if flags & ACCESS else 0
    if flags & (INSERT | DELETE | UPDATE):
        need |= NEED_WRITE
    return need


def flag_names(flags: int) -> list[str]:
    """Key-spec flag bits as the names ``COMMAND GETKEYSANDFLAGS`` prints, in its order."""
    return [name for name, bit in KEY_FLAG_BITS.items() if flags & bit and not bit & (NOT_KEY | INCOMPLETE)]


# ---------------------------------------------------------------------------------------------- C-like helpers


def cstr(arg: bytes) -> bytes:
    """``arg`` as a C function reading it as a string sees it: up to the first NUL."""
    nul = arg.find(b"\0")
    return arg if nul < 0 else arg[:nul]


def string2ll(arg: bytes) -> int | None:
    """Redis's strict integer parse: optional '-', no '+', no spaces, no leading zeros, fits in 64 bits."""
    if arg.isdigit() and len(arg) < 19 and (arg[0] != 0x30 or len(arg) == 1):
        return int(arg)  # the common case: a small non-negative number
    if not arg or len(arg) > 20:
        return None
    if arg == b"0":
        return 0
    digits = arg[1:] if arg[:1] == b"-" else arg
    if not digits or not digits.isdigit() or digits[:1] == b"0" or not digits.isascii():
        return None
    value = int(arg)
    if value < -(1 << 63) or value > (1 << 63) - 1:
        return None
    return value


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def c_atoi(arg: bytes) -> int:
    """glibc ``atoi``: ``(int) strtol(s, NULL, 10)``: leading white space, a sign, digits up to the first
    non-digit; out-of-range values clamp to a long, then the cast to int keeps the low 32 bits."""
    s = cstr(arg).lstrip(b" \t\n\v\f\r")
    sign = 1
    if s[:1] in (b"+", b"-"):
        sign = -1 if s[:1] == b"-" else 1
        s = s[1:]
    n = 0
    for ch in s:
        if not 0x30 <= ch <= 0x39:
            break
        n = n * 10 + ch - 0x30
        if n > 1 << 64:
            break
    value = max(-(1 << 63), min((1 << 63) - 1, sign * n))
    return _int32(value)


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates towards zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


# ---------------------------------------------------------------------------------------------- the commands


class Command:
    """One command or subcommand of the table, compiled for the ACL check."""

    __slots__ = (
        "arity",
        "categories",
        "channel_spec",
        "fixed_keys",
        "fixed_needs",
        "flags",
        "getkeys",
        "has_keys",
        "id",
        "mask",
        "name",
        "no_auth",
        "parent",
        "simple_keynum",
        "simple_range",
        "specs",
        "subcommands",
        "use_specs",
    )

    def __init__(self, spec: CommandSpec, cid: int, parent: Command | None) -> None:
        self.name = spec.name  # full name: "get", "config|get"
        self.id = cid
        self.arity = spec.arity
        self.flags = frozenset(spec.flags)
        self.categories = spec.categories
        self.parent = parent
        self.no_auth = "no_auth" in self.flags
        self.subcommands: dict[bytes, Command] | None = None
        # Key specs: (flag bits, begin search, find keys), begin/find as in the table.
        self.specs = tuple(_compile_spec(k) for k in spec.key_specs)
        has_keyspec = any(not k.flags & NOT_KEY for k in self.specs)
        has_varflags = any(k.flags & VARIABLE_FLAGS for k in self.specs)
        self.use_specs = has_keyspec and not has_varflags
        self.getkeys: Callable[[list[bytes]], Keys] | None = GETKEYS_PROCS.get(self.name)
        self.has_keys = self.getkeys is not None or has_keyspec
        self.channel_spec = CHANNEL_SPECS.get(self.name)
        self.fixed_keys = self._fixed_keys()
        # The same with what each key asks of the ACL (NEED_READ/NEED_WRITE), for the check's fast path.
        self.fixed_needs = None if self.fixed_keys is None else tuple((p, key_need(f)) for p, f in self.fixed_keys)
        # One spec, "index then range" or "index then keynum": the shapes of DEL/MGET/BRPOP and EVAL/LMPOP, whose
        # key positions the check computes directly (anything unusual falls back to get_keys).
        self.simple_range: tuple[int, int, int, int] | None = None
        self.simple_keynum: tuple[int, int, int, int] | None = None
        keyed = [k for k in self.specs if not k.flags & NOT_KEY]
        if self.use_specs and len(keyed) == 1 and keyed[0].begin == "index" and not keyed[0].flags & INCOMPLETE:
            k = keyed[0]
            if k.find == "range" and not k.c and k.b > 0:
                self.simple_range = (k.pos, k.a, k.b, key_need(k.flags))
            elif k.find == "keynum" and k.c > 0:
                self.simple_keynum = (k.pos + k.a, k.pos + k.b, k.c, key_need(k.flags))
        self.mask = 1 << cid  # this command's bit, and (for containers, set later) its subcommands' bits

    def _fixed_keys(self) -> tuple[tuple[int, int], ...] | None:
        """Key positions that do not depend on the arguments: every spec an index begin and a non-negative
        range within the arity, nothing incomplete, no fallback needed. None when the positions move."""
        if not self.use_specs:
            return None
        out: list[tuple[int, int]] = []
        minimum = abs(self.arity)
        for k in self.specs:
            if k.flags & NOT_KEY:
                continue
            if k.begin != "index" or k.find != "range" or k.flags & INCOMPLETE:
                return None
            first, lastkey, step = k.pos, k.a, k.b
            if lastkey < 0 or first + lastkey >= minimum or step <= 0:
                return None
            out += [(i, k.flags) for i in range(first, first + lastkey + 1, step)]
        return tuple(out)

    def __repr__(self) -> str:
        return f"Command({self.name!r})"


class Spec(NamedTuple):
    """A key spec compiled: ``begin`` is index/keyword/unknown, ``find`` range/keynum/unknown; ``a``, ``b``, ``c``
    are range's (lastkey, keystep, limit) or keynum's (keynumidx, firstkey, keystep)."""

    flags: int
    begin: str
    pos: int
    keyword: bytes
    startfrom: int
    find: str
    a: int
    b: int
    c: int


def _compile_spec(k: KeySpec) -> Spec:
    flags = 0
    for name in k.flags:
        flags |= KEY_FLAG_BITS[name]
    begin = str(k.begin_search[0])
    pos, keyword, startfrom = 0, b"", 0
    if begin == "index":
        pos = int(k.begin_search[1])
    elif begin == "keyword":
        keyword, startfrom = str(k.begin_search[1]).lower().encode(), int(k.begin_search[2])
    find = str(k.find_keys[0])
    a, b, c = (int(x) for x in k.find_keys[1:4]) if find in ("range", "keynum") else (0, 0, 0)
    return Spec(flags, begin, pos, keyword, startfrom, find, a, b, c)


# ------------------------------------------------------------------------------------ Redis's getkeys procedures


def _generic(store_at: int, count_at: int, first_at: int, step: int) -> Callable[[list[bytes]], Keys]:
    """COMMAND [destkey] numkeys key… : EVAL, FCALL, ZUNIONSTORE, LMPOP… (keys reported without flags)."""

    def getkeys(args: list[bytes]) -> Keys:
        argc = len(args)
        num = c_atoi(args[count_at]) if count_at < argc else 0
        if num < 1 or num > _cdiv(argc - first_at, step):
            return []
        keys = [(first_at + i * step, 0) for i in range(num)]
        if store_at:
            keys.append((store_at, 0))
        return keys

    return getkeys


def _sort_ro(args: list[bytes]) -> Keys:
    return [(1, RO | ACCESS)]


_SORT_SKIP = {b"limit": 2, b"get": 1, b"by": 1}


def _sort(args: list[bytes]) -> Keys:
    # The sorted key, and the last STORE's key; LIMIT takes two arguments, GET and BY one.
    keys: Keys = [(1, RO | ACCESS)]
    store: tuple[int, int] | None = None
    argc = len(args)
    i = 2
    while i < argc:
        word = cstr(args[i]).lower()
        skip = _SORT_SKIP.get(word)
        if skip is not None:
            i += skip
        elif word == b"store" and i + 1 < argc:
            store = (i + 1, OW | UPDATE)
        i += 1
    if store is not None:
        keys.append(store)
    return keys


_MIGRATE_SKIP = {b"copy": 0, b"replace": 0, b"auth": 1, b"auth2": 2}


def _migrate(args: list[bytes]) -> Keys:
    # MIGRATE host port key|"" db timeout [COPY] [REPLACE] [AUTH pw | AUTH2 user pw] [KEYS key…]
    argc = len(args)
    first, num = 3, 1
    if argc > 6:
        i = 6
        while i < argc:
            word = cstr(args[i]).lower()
            if word == b"keys":
                if args[3]:  # a key and KEYS at once is a syntax error: no keys, the command reports it
                    num = 0
                else:
                    first = i + 1
                    num = argc - first
                break
            i += _MIGRATE_SKIP.get(word, 0) + 1
    return [(first + i, RW | ACCESS | DELETE) for i in range(num)]


def _georadius(args: list[bytes]) -> Keys:
    # GEORADIUS key … [STORE key] [STOREDIST key]: the last store option wins.
    stored = -1
    argc = len(args)
    i = 5
    while i < argc:
        word = cstr(args[i]).lower()
        if word in (b"store", b"storedist") and i + 1 < argc:
            stored = i + 1
            i += 1
        i += 1
    return [(1, 0)] if stored < 0 else [(1, 0), (stored, 0)]


def _xread(args: list[bytes]) -> Keys:
    # XREAD/XREADGROUP [BLOCK ms] [COUNT n] [GROUP g c] [NOACK] STREAMS key… id…
    argc = len(args)
    streams = -1
    i = 1
    while i < argc:
        word = cstr(args[i]).lower()
        if word in (b"block", b"count"):
            i += 1
        elif word == b"group":
            i += 2
        elif word == b"noack":
            pass
        elif word == b"streams":
            streams = i
            break
        else:
            break
        i += 1
    if streams < 0:
        return []
    num = argc - streams - 1
    if num == 0 or num % 2:
        return []
    return [(p, 0) for p in range(streams + 1, argc - num // 2)]


def _set(args: list[bytes]) -> Keys:
    # SET key value [… GET …]: reads the old value only with GET.
    for arg in args[3:]:
        if cstr(arg).lower() == b"get":
            return [(1, RW | ACCESS | UPDATE)]
    return [(1, OW | UPDATE)]


def _bitfield(args: list[bytes]) -> Keys:
    # Read-only when every operation is a GET (with OVERFLOW allowed); anything else writes.
    argc = len(args)
    readonly = True
    i = 2
    while i < argc:
        remaining = argc - i - 1
        word = cstr(args[i]).lower()
        if word == b"get" and remaining >= 2:
            i += 2
        elif word in (b"set", b"incrby") and remaining >= 3:
            readonly = False
            break
        elif word == b"overflow" and remaining >= 1:
            i += 1
        else:
            readonly = False
            break
        i += 1
    return [(1, RO | ACCESS)] if readonly else [(1, RW | ACCESS | UPDATE)]


GETKEYS_PROCS: dict[str, Callable[[list[bytes]], Keys]] = {
    "bitfield": _bitfield,
    "migrate": _migrate,
    "sort": _sort,
    "sort_ro": _sort_ro,
    "georadius": _georadius,
    "georadiusbymember": _georadius,
    "blmpop": _generic(0, 2, 3, 1),
    "bzmpop": _generic(0, 2, 3, 1),
    "lmpop": _generic(0, 1, 2, 1),
    "zmpop": _generic(0, 1, 2, 1),
    "eval": _generic(0, 2, 3, 1),
    "evalsha": _generic(0, 2, 3, 1),
    "eval_ro": _generic(0, 2, 3, 1),
    "evalsha_ro": _generic(0, 2, 3, 1),
    "fcall": _generic(0, 2, 3, 1),
    "fcall_ro": _generic(0, 2, 3, 1),
    "sintercard": _generic(0, 1, 2, 1),
    "zdiff": _generic(0, 1, 2, 1),
    "zinter": _generic(0, 1, 2, 1),
    "zintercard": _generic(0, 1, 2, 1),
    "zunion": _generic(0, 1, 2, 1),
    "zdiffstore": _generic(1, 2, 3, 1),
    "zinterstore": _generic(1, 2, 3, 1),
    "zunionstore": _generic(1, 2, 3, 1),
    "xread": _xread,
    "xreadgroup": _xread,
    "set": _set,
}


# ------------------------------------------------------------------------------------------ finding the keys


def _keys_from_specs(cmd: Command, args: list[bytes]) -> Keys | None:
    """Redis's key-spec walk. None where Redis gives up on the specs (and falls back to the procedure)."""
    argc = len(args)
    keys: Keys = []
    for spec in cmd.specs:
        flags = spec.flags
        if flags & NOT_KEY:
            continue
        if spec.begin == "index":
            first = spec.pos
        elif spec.begin == "keyword":
            startfrom = spec.startfrom
            if startfrom > 0:
                start, end = startfrom, argc - 1
            else:
                start, end = argc + startfrom, 1
            step = 1 if start <= end else -1
            first = 0
            i = start
            while i != end:
                if i >= argc or i < 1:
                    break
                if cstr(args[i]).lower() == spec.keyword:
                    first = i + 1
                    break
                i += step
            if not first:
                continue  # keyword absent: this spec names no key
        else:
            return None
        if spec.find == "range":
            lastkey, step, limit = spec.a, spec.b, spec.c
            if lastkey >= 0:
                last = first + lastkey
            elif not limit:
                last = argc + lastkey
            else:
                last = first + (_cdiv(argc - first, limit) + lastkey)
        elif spec.find == "keynum":
            keynumidx, firstkey, step = spec.a, spec.b, spec.c
            if keynumidx >= argc or first + keynumidx >= argc:
                return None
            numkeys = string2ll(args[first + keynumidx])
            if numkeys is None or numkeys < 0:
                return None
            first += firstkey
            last = _int32(first + _int32(numkeys) - 1)
        else:
            return None
        if last >= argc or last < first or first >= argc:
            return None
        keys += [(i, flags) for i in range(first, last + 1, step)]
        if flags & INCOMPLETE:
            return None
    return keys


def get_keys(cmd: Command, args: list[bytes]) -> Keys:
    """The key arguments of ``args`` (the whole request, command name included) as Redis 7.0's ACL check finds
    them: [(position, key-spec flags)], in Redis's order. ``args`` must satisfy the command's arity."""
    fixed = cmd.fixed_keys
    if fixed is not None and len(args) >= abs(cmd.arity):
        return list(fixed)
    if cmd.use_specs:
        keys = _keys_from_specs(cmd, args)
        if keys is not None:
            return keys
    if cmd.getkeys is not None:
        return cmd.getkeys(args)
    return []


def key_needs(cmd: Command, args: list[bytes]) -> Sequence[tuple[int, int]]:
    """``get_keys`` with what each key asks of the ACL instead of its flags: [(position, NEED_READ|NEED_WRITE)].
    The check's fast path: fixed positions, one range (DEL, MGET, BRPOP) or one numkeys (EVALSHA) are computed
    directly."""
    argc = len(args)
    fixed = cmd.fixed_needs
    if fixed is not None and argc >= abs(cmd.arity):
        return fixed
    simple = cmd.simple_range
    if simple is not None:
        first, lastkey, step, need = simple
        last = argc + lastkey if lastkey < 0 else first + lastkey
        if first <= last < argc:
            return [(p, need) for p in range(first, last + 1, step)]
    simple = cmd.simple_keynum
    if simple is not None:
        at, first, step, need = simple
        numkeys = string2ll(args[at]) if at < argc else None
        if numkeys is not None and 0 < numkeys < argc:
            last = first + numkeys - 1
            if last < argc:
                return [(p, need) for p in range(first, last + 1, step)]
    return [(p, key_need(f)) for p, f in get_keys(cmd, args)]


def get_channels(cmd: Command, args: list[bytes]) -> list[tuple[int, int]]:
    """The channel arguments of a pub/sub command: [(position, CHANNEL_* flags)]."""
    spec = cmd.channel_spec
    if spec is None:
        return []
    flags, start, count = spec
    stop = len(args) if count < 0 else min(start + count, len(args))
    return [(i, flags) for i in range(start, stop)]


# ------------------------------------------------------------------------------------------ the table


def _build() -> tuple[dict[str, Command], list[Command]]:
    table: dict[str, Command] = {}
    by_id: list[Command] = []
    for name in sorted(COMMANDS):
        spec = COMMANDS[name]
        cmd = Command(spec, len(by_id), None)
        by_id.append(cmd)
        table[name] = cmd
        if spec.subcommands:
            cmd.subcommands = {}
            for subname in sorted(spec.subcommands):
                sub = Command(spec.subcommands[subname], len(by_id), cmd)
                by_id.append(sub)
                cmd.subcommands[subname.encode()] = sub
                cmd.mask |= sub.mask
    missing = set(GETKEYS_PROCS) - set(table)
    if missing:  # pragma: no cover - the table and the procedures must describe the same Redis
        raise RuntimeError(f"getkeys procedures for commands the table lacks: {sorted(missing)}")
    return table, by_id


#: Top-level commands by lower-case name.
TABLE, ALL_COMMANDS = _build()
#: Every command and subcommand by full name ("config|get").
BY_NAME: dict[str, Command] = {c.name: c for c in ALL_COMMANDS}


def lookup(args: list[bytes], name: str | None = None) -> Command | None:
    """The command (or subcommand) ``args`` names, as Redis's lookupCommand finds it; None if unknown.
    ``name`` is the lower-case command name when the caller already has it (``Request.name``)."""
    cmd = TABLE.get(name if name is not None else args[0].decode("latin-1").lower())
    if cmd is None or cmd.subcommands is None or len(args) < 2:
        return cmd
    return cmd.subcommands.get(args[1].lower())


def lookup_rule_name(name: str) -> Command | None:
    """A command named in an ACL rule: ``get``, ``config|get`` (case-insensitive). None if unknown."""
    parts = name.split("|")
    if len(parts) > 2:
        return None
    cmd = TABLE.get(parts[0].lower())
    if len(parts) == 1 or cmd is None:
        return cmd
    if cmd.subcommands is None:
        return None
    return cmd.subcommands.get(parts[1].lower().encode("utf-8", "surrogateescape"))
