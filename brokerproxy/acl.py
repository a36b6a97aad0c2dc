"""Redis-compatible ACLs: users and their rules, ACL files, and the per-command check. Pure; deny by default.

Theory of operation
-------------------
A ``User`` is what Redis 7.0 keeps for one: on/off, SHA-256 password digests (several at once, for rotation) or
``nopass``, and a list of *selectors*. The first, the root selector, holds the rules written outside parentheses;
each ``(…)`` rule adds another. A selector holds the commands it allows (a bit per command and subcommand of the
table in ``keyspec``, plus "allowed first arguments" for ``+select|0``), its key patterns with read/write
permissions (``~p`` = read and write, ``%R~p``, ``%W~p``), and its channel patterns (``&p``).

Rules are parsed as Redis's ``ACL SETUSER`` parses them, in order, each changing the user as it comes
(``+@all -@dangerous`` differs from ``-@dangerous +@all``); a user defined by a file line is built from scratch
(``off``, no passwords, no commands/keys/channels), and a line with any bad rule rejects the file. Errors carry the
file, line, column and offending token, with Redis's wording for the reason.

The check (``AclPolicy.check``) follows Redis's ``processCommand`` and ``ACLCheckAllUserCommandPerm``: an unknown
command or subcommand and a wrong number of arguments get Redis's own error (the command never reaches Redis);
then a user may run a command if *any* selector allows it: the command (or subcommand, or first argument) allowed,
every key the command names (found from the key specs, see ``keyspec``) matched by a pattern with the read/write
permission the key's flags ask for, and every channel of ``PUBLISH``/``SUBSCRIBE``/``PSUBSCRIBE``/``SPUBLISH``/
``SSUBSCRIBE`` matched by a channel pattern (a ``PSUBSCRIBE`` pattern must equal an ACL pattern literally). When
none does, the reply names the most relevant failure as Redis picks it: a channel over a key over a command.

Hot path: the verdict for a (user, command) pair that needs no key or channel check (the command is denied by
every selector, or allowed by one with ``allkeys``/``allchannels`` or for a command that names none) is computed
once and cached on the user. Commands with keys are checked against precompiled patterns (a literal or prefix
pattern is a bytes comparison, the rest a compiled regular expression with Redis's glob semantics).

Beyond Redis: a user may carry a list of allowed Lua script SHA1s (``User.scripts``); ``EVALSHA``/``EVALSHA_RO``
are then allowed only for those, and ``EVAL``/``EVAL_RO`` only for a script whose SHA1 is listed, after the usual
ACL check. Celery roles built on this live in ``acl_roles``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from . import keyspec
from .command_table import CATEGORIES
from .globmatch import compile_set
from .keyspec import (
    ALL_COMMANDS,
    CHANNEL_PATTERN,
    CHANNEL_PUBLISH,
    CHANNEL_SUBSCRIBE,
    NEED_READ,
    NEED_WRITE,
    Command,
    key_needs,
)
from .keyspec import cstr as _cstr
from .resp import Request

# Verdicts, numbered as Redis numbers them (it reports the highest one when every selector refuses).
OK: Final = 0
DENIED_CMD: Final = 1
DENIED_KEY: Final = 2
DENIED_AUTH: Final = 3
DENIED_CHANNEL: Final = 4
REASONS: Final = {DENIED_CMD: "command", DENIED_KEY: "key", DENIED_AUTH: "auth", DENIED_CHANNEL: "channel"}

#: Commands whose script the SHA1 allowlist governs; the first argument is the script (EVAL) or its SHA1.
SCRIPT_COMMANDS: Final = {"eval": False, "eval_ro": False, "evalsha": True, "evalsha_ro": True}

_ALL_KNOWN = (1 << len(ALL_COMMANDS)) - 1
_C_SPACE = b" \t\n\v\f\r"


class AclError(ValueError):
    """A rule, a user definition or an ACL file Redis would refuse. ``reason`` is Redis's wording; ``token`` the
    offending rule; ``filename``/``line``/``column`` (1-based) where it is, for a file; ``errors`` every error found
    in a file (this one first)."""

    def __init__(
        self,
        reason: str,
        token: str | None = None,
        *,
        filename: str | None = None,
        line: int | None = None,
        column: int | None = None,
        message: str | None = None,
    ) -> None:
        self.reason = reason
        self.token = token
        self.filename = filename
        self.line = line
        self.column = column
        self.errors: list[AclError] = [self]
        if message is None:
            message = reason if token is None else f"Error in ACL SETUSER modifier '{token}': {reason}"
            if filename is not None:
                where = f"{filename}:{line}:{column}" if column is not None else f"{filename}:{line}"
                message = f"{where}: {message}"
        super().__init__(message)


# Redis's reasons (ACLSetUserStringError).
E_SYNTAX = "Syntax error"
E_UNKNOWN = "Unknown command or category name in ACL"
E_KEYS_AFTER_ALL = (
    "Adding a pattern after the * pattern (or the 'allkeys' flag) is not valid and does not have any effect. Try "
    "'resetkeys' to start with an empty list of patterns"
)
E_CHANNELS_AFTER_ALL = (
    "Adding a pattern after the * pattern (or the 'allchannels' flag) is not valid and does not have any effect. "
    "Try 'resetchannels' to start with an empty list of channels"
)
E_NO_SUCH_PASSWORD = "The password you are trying to remove from the user does not exist"
E_BAD_HASH = "The password hash must be exactly 64 characters and contain only lowercase hexadecimal characters"
E_FIRSTARG_OF_SUB = "Allowing first-arg of a subcommand is not supported"


class _RuleError(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


# ------------------------------------------------------------------------------------------------ selectors

_READ, _WRITE = NEED_READ, NEED_WRITE


class Selector:
    """One set of permissions: commands, key patterns, channel patterns. A user may run a command if any of its
    selectors allows it."""

    __slots__ = (
        "allchannels",
        "allcommands",
        "allkeys",
        "allowed",
        "channel_literals",
        "channel_ok",
        "channels",
        "firstargs",
        "future",
        "key_ok",
        "patterns",
        "root",
    )

    def __init__(self, root: bool = False) -> None:
        self.root = root
        self.allkeys = False
        self.allchannels = False  # Redis 7.0's acl-pubsub-default is resetchannels
        self.allcommands = False
        self.future = False  # commands the table does not know (a newer Redis, modules): allowed by +@all only
        self.allowed = 0  # a bit per command id
        self.firstargs: dict[int, list[bytes]] = {}  # command id -> allowed first arguments (lower-case)
        self.patterns: dict[bytes, int] = {}  # key pattern -> _READ|_WRITE, in the order added
        self.channels: dict[bytes, None] = {}  # channel patterns, in the order added
        # Compiled by ``freeze``: whether a key may be used, per permission asked (index NEED_READ|NEED_WRITE);
        # whether a channel matches a pattern; the patterns a PSUBSCRIBE may name (C strings).
        self.key_ok: tuple[Callable[[bytes], bool], ...] = (_never,) * 4
        self.channel_ok: Callable[[bytes], bool] = _never
        self.channel_literals: frozenset[bytes] = frozenset()

    def copy(self) -> Selector:
        new = Selector(self.root)
        new.allkeys, new.allchannels, new.allcommands = self.allkeys, self.allchannels, self.allcommands
        new.future, new.allowed = self.future, self.allowed
        new.firstargs = {k: list(v) for k, v in self.firstargs.items()}
        new.patterns = dict(self.patterns)
        new.channels = dict(self.channels)
        return new

    def freeze(self) -> None:
        self.key_ok = tuple(
            compile_set([p for p, flags in self.patterns.items() if flags & need == need]) for need in range(4)
        )
        self.channel_ok = compile_set(self.channels)
        self.channel_literals = frozenset(_cstr(p) for p in self.channels)

    # -- rules (Redis's ACLSetSelector)

    def apply(self, op: bytes) -> None:
        word = _cstr(op).lower()
        if word in (b"allkeys", b"~*"):
            self.allkeys = True
            self.patterns.clear()
        elif word == b"resetkeys":
            self.allkeys = False
            self.patterns.clear()
        elif word in (b"allchannels", b"&*"):
            self.allchannels = True
            self.channels.clear()
        elif word == b"resetchannels":
            self.allchannels = False
            self.channels.clear()
        elif word in (b"allcommands", b"+@all"):
            self.allowed = _ALL_KNOWN
            self.allcommands = self.future = True
            self.firstargs.clear()
        elif word in (b"nocommands", b"-@all"):
            self.allowed = 0
            self.allcommands = self.future = False
            self.firstargs.clear()
        elif op[:1] in (b"~", b"%"):
            self._key_pattern(op)
        elif op[:1] == b"&":
            if self.allchannels:
                raise _RuleError(E_CHANNELS_AFTER_ALL)
            pattern = op[1:]
            if any(c in _C_SPACE or c == 0 for c in pattern):
                raise _RuleError(E_SYNTAX)
            self.channels.setdefault(pattern, None)
        elif op[:1] == b"+" and op[1:2] != b"@":
            self._allow_command(_cstr(op)[1:])
        elif op[:1] == b"-" and op[1:2] != b"@":
            cmd = keyspec.lookup_rule_name(_cstr(op)[1:].decode("latin-1"))
            if cmd is None:
                raise _RuleError(E_UNKNOWN)
            self._change(cmd, False)
        elif op[:1] in (b"+", b"-") and op[1:2] == b"@":
            category = _cstr(op)[2:].lower().decode("latin-1")
            if category not in _CATEGORY_INDEX:
                raise _RuleError(E_UNKNOWN)
            allow = op[:1] == b"+"
            for cmd in _CATEGORY_CHANGES[category]:
                self._change(cmd, allow)
        else:
            raise _RuleError(E_SYNTAX)

    def _key_pattern(self, op: bytes) -> None:
        if self.allkeys:
            raise _RuleError(E_KEYS_AFTER_ALL)
        flags = 0
        offset = 1
        if op[:1] == b"%":
            while offset < len(op):
                c = op[offset : offset + 1].upper()
                if c == b"R" and not flags & _READ:
                    flags |= _READ
                elif c == b"W" and not flags & _WRITE:
                    flags |= _WRITE
                elif c == b"~" and flags:
                    offset += 1
                    break
                else:
                    raise _RuleError(E_SYNTAX)
                offset += 1
            if not flags:
                raise _RuleError(E_SYNTAX)
        else:
            flags = _READ | _WRITE
        pattern = op[offset:]
        if any(c in _C_SPACE or c == 0 for c in pattern):
            raise _RuleError(E_SYNTAX)
        self.patterns[pattern] = self.patterns.get(pattern, 0) | flags

    def _allow_command(self, name: bytes) -> None:
        bar = name.rfind(b"|")
        if bar < 0:
            cmd = keyspec.lookup_rule_name(name.decode("latin-1"))
            if cmd is None:
                raise _RuleError(E_UNKNOWN)
            self._change(cmd, True)
            return
        cmd = keyspec.lookup_rule_name(name[:bar].decode("latin-1"))
        if cmd is None:
            raise _RuleError(E_UNKNOWN)
        if cmd.parent is not None:
            raise _RuleError(E_FIRSTARG_OF_SUB)
        first = name[bar + 1 :]
        if not first:
            raise _RuleError(E_SYNTAX)
        if cmd.subcommands is not None:
            sub = keyspec.lookup_rule_name(name.decode("latin-1"))
            if sub is None:
                raise _RuleError(E_UNKNOWN)
            self._change(sub, True)
        else:
            # "+select|0": a first argument allowed for an otherwise denied command (deprecated in Redis).
            allowed = self.firstargs.setdefault(cmd.id, [])
            if first.lower() not in allowed:
                allowed.append(first.lower())

    def _change(self, cmd: Command, allow: bool) -> None:
        # Allowing or denying a container applies to its subcommands too.
        if allow:
            self.allowed |= cmd.mask
        else:
            self.allowed &= ~cmd.mask
            self.allcommands = False
        self.firstargs.pop(cmd.id, None)

    # -- the check (Redis's ACLSelectorCheckCmd), in pieces

    def allows_command(self, cmd: Command) -> bool:
        return self.allcommands or cmd.no_auth or bool(self.allowed >> cmd.id & 1)

    def key_allowed(self, key: bytes, need: int) -> bool:
        return self.allkeys or self.key_ok[need](key)

    def channel_allowed(self, channel: bytes, is_pattern: bool) -> bool:
        if self.allchannels:
            return True
        if is_pattern:  # a pattern subscription must name an ACL pattern literally (C string compare)
            return _cstr(channel) in self.channel_literals
        return self.channel_ok(channel)


def _never(subject: bytes) -> bool:
    return False


_CATEGORY_INDEX = {c: i for i, c in enumerate(CATEGORIES)}


def _category_changes() -> dict[str, list[Command]]:
    # Redis walks the table: a container in the category takes all its subcommands with it; each subcommand in
    # the category counts on its own too.
    out: dict[str, list[Command]] = {c: [] for c in CATEGORIES}
    for cmd in ALL_COMMANDS:
        for cat in cmd.categories:
            out[cat].append(cmd)
    return out


_CATEGORY_CHANGES = _category_changes()


# ------------------------------------------------------------------------------------------------ users


def _split_args(line: bytes) -> list[bytes] | None:
    """Redis's ``sdssplitargs``: words, "double quotes" with \\n \\r \\t \\b \\a \\xHH escapes, 'single quotes';
    None for unbalanced quotes or a closing quote not followed by a space."""
    out: list[bytes] = []
    n = len(line)
    i = 0
    while True:
        while i < n and line[i] in _C_SPACE:
            i += 1
        if i >= n or line[i] == 0:
            return out
        cur = bytearray()
        inq = insq = done = False
        while not done:
            c = line[i] if i < n else 0
            nxt = line[i + 1] if i + 1 < n else 0
            if inq:
                if c == 0x5C and nxt == 0x78 and i + 3 < n and _ishex(line[i + 2]) and _ishex(line[i + 3]):
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 0x5C and nxt:
                    i += 1
                    cur.append({0x6E: 10, 0x72: 13, 0x74: 9, 0x62: 8, 0x61: 7}.get(nxt, nxt))
                elif c == 0x22:
                    if nxt and nxt not in _C_SPACE:
                        return None
                    done = True
                elif not c:
                    return None
                else:
                    cur.append(c)
            elif insq:
                if c == 0x5C and nxt == 0x27:
                    i += 1
                    cur.append(0x27)
                elif c == 0x27:
                    if nxt and nxt not in _C_SPACE:
                        return None
                    done = True
                elif not c:
                    return None
                else:
                    cur.append(c)
            elif c in (0x20, 0x0A, 0x0D, 0x09, 0):
                done = True
            elif c == 0x22:
                inq = True
            elif c == 0x27:
                insq = True
            else:
                cur.append(c)
            if c:
                i += 1
        out.append(bytes(cur))


def _ishex(c: int) -> bool:
    return c in b"0123456789abcdefABCDEF"


def merge_selector_args(args: Sequence[bytes]) -> tuple[list[bytes], list[int]] | int:
    """Redis's ``ACLMergeSelectorArguments``: rejoin a ``(…)`` selector split over several arguments. Returns the
    merged arguments and, for each, the index of the argument it starts at; or the index of an unclosed '('."""
    merged: list[bytes] = []
    starts: list[int] = []
    open_at = -1
    selector = b""
    for j, op in enumerate(args):
        if op[:1] == b"(" and op[-1:] != b")":
            selector, open_at = op, j
            continue
        if open_at >= 0:
            selector += b" " + op
            if op[-1:] == b")":
                merged.append(selector)
                starts.append(open_at)
                open_at = -1
            continue
        merged.append(op)
        starts.append(j)
    return open_at if open_at >= 0 else (merged, starts)


def _hash_hex(password: bytes) -> bytes:
    return hashlib.sha256(password).hexdigest().encode()


class User:
    """A Redis ACL user. Build with ``User(name)`` then ``apply([...rules])`` (ACL SETUSER semantics)."""

    __slots__ = ("_cache", "enabled", "name", "nopass", "passwords", "sanitize_payload", "scripts", "selectors")

    def __init__(self, name: str) -> None:
        self.name = name
        self.enabled = False
        self.nopass = False
        self.sanitize_payload = True
        self.passwords: list[bytes] = []  # SHA-256 hex digests, lower case, in the order added
        self.selectors: list[Selector] = [Selector(root=True)]
        #: Lua scripts this user may run with EVAL/EVALSHA (lower-case SHA1 hex), or None for no such limit.
        self.scripts: frozenset[bytes] | None = None
        self._cache: dict[str, tuple[int, object, Command]] = {}  # command name -> (arity, verdict, command)

    @property
    def root(self) -> Selector:
        return self.selectors[0]

    def copy(self) -> User:
        new = User(self.name)
        new.enabled, new.nopass, new.sanitize_payload = self.enabled, self.nopass, self.sanitize_payload
        new.passwords = list(self.passwords)
        new.selectors = [s.copy() for s in self.selectors]
        new.scripts = self.scripts
        return new

    def freeze(self) -> User:
        """Compile the patterns and drop cached verdicts; call after changing the user by hand."""
        for s in self.selectors:
            s.freeze()
        self._cache = {}
        return self

    def apply(self, rules: Iterable[str | bytes]) -> None:
        """Apply ACL rules as ``ACL SETUSER`` does: all or nothing; AclError names the first bad rule."""
        ops = [r.encode("utf-8", "surrogateescape") if isinstance(r, str) else r for r in rules]
        merged = merge_selector_args(ops)
        if isinstance(merged, int):
            token = ops[merged].decode("utf-8", "surrogateescape")
            raise AclError(
                "Unmatched parenthesis", token, message=f"Unmatched parenthesis in acl selector starting at '{token}'."
            )
        staged = self.copy()
        for op in merged[0]:
            try:
                staged.apply_op(op)
            except _RuleError as exc:
                raise AclError(exc.reason, op.decode("utf-8", "surrogateescape")) from None
        self._take(staged)

    def _take(self, other: User) -> None:
        self.enabled, self.nopass, self.sanitize_payload = other.enabled, other.nopass, other.sanitize_payload
        self.passwords, self.selectors, self.scripts = other.passwords, other.selectors, other.scripts
        self.freeze()

    def apply_op(self, op: bytes) -> None:
        """One rule (Redis's ACLSetUser). Raises _RuleError; the user may be half-changed then."""
        if not op:
            return
        word = _cstr(op).lower()
        if word == b"on":
            self.enabled = True
        elif word == b"off":
            self.enabled = False
        elif word == b"skip-sanitize-payload":
            self.sanitize_payload = False
        elif word == b"sanitize-payload":
            self.sanitize_payload = True
        elif word == b"nopass":
            self.nopass = True
            self.passwords.clear()
        elif word == b"resetpass":
            self.nopass = False
            self.passwords.clear()
        elif op[:1] in (b">", b"#"):
            digest = _hash_hex(op[1:]) if op[:1] == b">" else _valid_hash(op[1:])
            if digest not in self.passwords:
                self.passwords.append(digest)
            self.nopass = False
        elif op[:1] in (b"<", b"!"):
            digest = _hash_hex(op[1:]) if op[:1] == b"<" else _valid_hash(op[1:])
            if digest not in self.passwords:
                raise _RuleError(E_NO_SUCH_PASSWORD)
            self.passwords.remove(digest)
        elif op[:1] == b"(" and op[-1:] == b")":
            selector = Selector()
            words = _split_args(op[1:-1]) or []
            for w in words:
                selector.apply(w)
            self.selectors.append(selector)
        elif word == b"clearselectors":
            del self.selectors[1:]
        elif word == b"reset":
            self.nopass = False
            self.passwords.clear()
            root = self.selectors[0]
            root.apply(b"resetkeys")
            root.apply(b"resetchannels")
            self.enabled = False
            self.sanitize_payload = True
            del self.selectors[1:]
            root.apply(b"-@all")
        else:
            self.selectors[0].apply(op)

    def password_ok(self, password: bytes) -> bool:
        """Constant time over every stored digest (and the same work when there is none)."""
        digest = _hash_hex(password)
        ok = False
        for h in self.passwords or (b"0" * 64,):
            ok |= hmac.compare_digest(digest, h)
        return ok and bool(self.passwords)

    def __repr__(self) -> str:
        return f"User({self.name!r})"


def _valid_hash(text: bytes) -> bytes:
    if len(text) != 64 or any(c not in b"0123456789abcdef" for c in text):
        raise _RuleError(E_BAD_HASH)
    return text


def default_user() -> User:
    """Redis's default user when nothing defines it: ``on nopass ~* &* +@all``."""
    user = User("default")
    user.apply(["+@all", "~*", "&*", "on", "nopass"])
    return user


def _has_space(text: bytes) -> bool:
    return any(c in _C_SPACE or c == 0 for c in text)


def parse_acl_file(text: str | bytes, filename: str = "<acl>", *, allow_comments: bool = False) -> dict[str, User]:
    """Users from an ACL file (Redis 7.0's format: one ``user <name> <rules…>`` per line, words separated by
    single spaces). Adds Redis's default user when the file does not define one. Raises AclError naming the file,
    line, column and token of the first error (``errors`` holds one per bad line); one bad line rejects the whole
    file, as in Redis. ``allow_comments`` also skips lines starting with '#', which Redis 7.0 refuses."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    users: dict[str, User] = {}
    errors: list[AclError] = []
    for lineno, raw_line in enumerate(data.split(b"\n"), 1):
        line = raw_line.strip(b" \t\r\n")
        if not line or (allow_comments and line.startswith(b"#")):
            continue
        indent = len(raw_line) - len(raw_line.lstrip(b" \t\r\n"))
        error = _parse_line(line, indent, _Where(filename, lineno), users)
        if error is not None:
            errors.append(error)
    if errors:
        first = errors[0]
        if len(errors) > 1:
            first.args = (f"{first.args[0]} (and {len(errors) - 1} more)",)
        first.errors = errors
        raise first
    if "default" not in users:
        users["default"] = default_user()
    return {name: u.freeze() for name, u in users.items()}


@dataclass(frozen=True, slots=True)
class _Where:
    filename: str
    line: int


def _parse_line(line: bytes, indent: int, where: _Where, users: dict[str, User]) -> AclError | None:
    words = line.split(b" ")
    columns = []
    col = indent + 1
    for w in words:
        columns.append(col)
        col += len(w) + 1

    def error(reason: str, j: int, message: str) -> AclError:
        token = words[j].decode("utf-8", "surrogateescape")
        return AclError(reason, token, filename=where.filename, line=where.line, column=columns[j], message=message)

    prefix = f"{where.filename}:{where.line}"
    if _cstr(words[0]) != b"user" or len(words) < 2:
        reason = "should start with user keyword followed by the username"
        return error(reason, 0, f"{prefix}: {reason}")
    name = words[1].decode("utf-8", "surrogateescape")
    if _has_space(words[1]):
        return error("invalid username", 1, f"{prefix}: username '{name}' contains invalid characters")
    if name in users:
        return error("duplicate user", 1, f"{prefix}: Duplicate user '{name}' found")
    user = users[name] = User(name)
    merged = merge_selector_args(words[2:])
    if isinstance(merged, int):
        j = merged + 2
        return error(
            "Unmatched parenthesis",
            j,
            f"{prefix}:{columns[j]}: Unmatched parenthesis in selector definition starting at "
            f"'{words[j].decode('utf-8', 'surrogateescape')}'",
        )
    for op, start in zip(*merged, strict=True):
        op = op.strip(b"\t\r\n")
        try:
            user.apply_op(op)
        except _RuleError as exc:
            token = op.decode("utf-8", "surrogateescape")
            j = start + 2
            err = error(exc.reason, j, f"{prefix}:{columns[j]}: Error in applying operation '{token}': {exc.reason}")
            err.token = token
            return err
    return None


# ------------------------------------------------------------------------------------------------ the table

_NOBODY = User("")  # compared against when the user is unknown, so that timing does not tell


class UserTable:
    """The users the proxy knows. Implements ``session.Authenticator``; ``policy`` is its ``session.Policy``.

    ``load()`` replaces the users in place, so every session holding this table (and its policy) sees new rules
    from its next command, as Redis does after ``ACL LOAD``."""

    def __init__(self, users: Iterable[User] = (), *, implicit_default: bool = True) -> None:
        self._users: dict[str, User] = {}
        self._implicit_default = implicit_default
        self.load(users)
        self.policy = AclPolicy(self)

    @classmethod
    def from_acl(cls, text: str | bytes, filename: str = "<acl>", *, allow_comments: bool = False) -> UserTable:
        return cls(parse_acl_file(text, filename, allow_comments=allow_comments).values())

    @classmethod
    def from_file(cls, path: str, *, allow_comments: bool = False) -> UserTable:
        with open(path, "rb") as f:
            return cls.from_acl(f.read(), path, allow_comments=allow_comments)

    def load(self, users: Iterable[User]) -> None:
        """Replace every user (in place: policies hold this table's dict)."""
        new = {u.name: u.freeze() for u in users}
        if "default" not in new and self._implicit_default:
            new["default"] = default_user().freeze()
        self._users.clear()
        self._users.update(new)

    def get(self, name: str) -> User | None:
        return self._users.get(name)

    @property
    def users(self) -> dict[str, User]:
        return dict(self._users)

    @property
    def required(self) -> bool:
        """Clients must authenticate unless the default user is on and nopass (Redis's authRequired)."""
        d = self._users.get("default")
        return d is None or not (d.enabled and d.nopass)

    def check(self, username: bytes, password: bytes) -> str | None:
        """The user's name if the credentials are right and the user is on, else None. The password is compared
        against every digest of the user in constant time, and against a dummy for an unknown user."""
        user = self._users.get(username.decode("utf-8", "surrogateescape"))
        ok = (user or _NOBODY).password_ok(password)
        if user is None or not user.enabled:
            return None
        return user.name if (user.nopass or ok) else None


# ------------------------------------------------------------------------------------------------ the check


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a command was refused: ``reason`` is command/key/channel (Redis's ACL LOG reasons), ``object`` the
    command's full name, the key or the channel (the SHA1 for a script), ``position`` its argument index."""

    reason: str
    object: bytes
    position: int
    message: str


class _Plan:
    """A (user, command) verdict that depends on the arguments: the selectors that allow the command (None when
    first-argument rules are involved: check every selector), and whether the script allowlist applies."""

    __slots__ = ("cmd", "fast", "scripts", "selectors")

    def __init__(
        self,
        cmd: Command,
        selectors: tuple[Selector, ...] | None,
        scripts: bool,
        allowed: frozenset[bytes] = frozenset(),
    ) -> None:
        self.cmd = cmd
        self.selectors = selectors
        self.scripts = scripts
        #: A quick yes: True when the first selector allowing the command allows these arguments (False: ask
        #: ``evaluate``, which also words the refusal).
        self.fast = _fast_lane(cmd, selectors[0], allowed if scripts else None) if selectors else None


Lane = Callable[[list[bytes]], bool]


def _fast_lane(cmd: Command, s: Selector, scripts: frozenset[bytes] | None) -> Lane | None:
    lane = _keys_lane(cmd, s) if cmd.has_keys and not s.allkeys else _channels_lane(cmd, s)
    if lane is None or scripts is None:
        return lane
    by_sha = SCRIPT_COMMANDS[cmd.name]
    inner = lane

    def script_lane(args: list[bytes]) -> bool:
        sha = args[1].lower() if by_sha else hashlib.sha1(args[1]).hexdigest().encode()
        return sha in scripts and inner(args)

    return script_lane


def _keys_lane(cmd: Command, s: Selector) -> Lane | None:
    spec = cmd.channel_spec
    if spec is not None and spec[0] & (CHANNEL_PUBLISH | CHANNEL_SUBSCRIBE) and not s.allchannels:
        return None  # keys and channels at once: no such command in Redis 7.0; leave it to evaluate
    fixed = cmd.fixed_needs
    if fixed is not None:
        if len(fixed) == 1:
            position, need = fixed[0]
            ok = s.key_ok[need]

            def one_key(args: list[bytes]) -> bool:
                return ok(args[position])

            return one_key
        pairs = tuple((p, s.key_ok[need]) for p, need in fixed)

        def fixed_keys(args: list[bytes]) -> bool:
            for p, ok in pairs:
                if not ok(args[p]):
                    return False
            return True

        return fixed_keys
    if cmd.simple_range is not None:
        first, lastkey, step, need = cmd.simple_range
        ok = s.key_ok[need]

        def ranged_keys(args: list[bytes]) -> bool:
            argc = len(args)
            last = argc + lastkey if lastkey < 0 else first + lastkey
            if not first <= last < argc:
                return False
            for p in range(first, last + 1, step):
                if not ok(args[p]):
                    return False
            return True

        return ranged_keys
    if cmd.simple_keynum is not None:
        at, start, kstep, kneed = cmd.simple_keynum
        kok = s.key_ok[kneed]

        def counted_keys(args: list[bytes]) -> bool:
            argc = len(args)
            count = args[at] if at < argc else b""
            if not count.isdigit() or len(count) > 9 or count[0] == 0x30:
                return False  # not a plain positive number: evaluate follows Redis through the odd cases
            numkeys = int(count)
            if start + numkeys > argc:
                return False
            for p in range(start, start + numkeys, kstep):
                if not kok(args[p]):
                    return False
            return True

        return counted_keys
    return None


def _channels_lane(cmd: Command, s: Selector) -> Lane | None:
    spec = cmd.channel_spec
    if spec is None or not spec[0] & (CHANNEL_PUBLISH | CHANNEL_SUBSCRIBE) or s.allchannels:
        return _yes
    flags, start, count = spec
    if flags & CHANNEL_PATTERN:
        literals = s.channel_literals

        def patterns(args: list[bytes]) -> bool:
            return all(_cstr(arg) in literals for arg in args[start:])

        return patterns
    ok = s.channel_ok
    if count == 1:

        def one_channel(args: list[bytes]) -> bool:
            return ok(args[start])

        return one_channel

    def channels(args: list[bytes]) -> bool:
        for arg in args[start:]:
            if not ok(arg):
                return False
        return True

    return channels


def _yes(args: list[bytes]) -> bool:
    return True


#: Reply texts by Redis version. "7.0" is what Redis 7.0 answers; "7.2" what Redis 7.2+ answers.
WORDING: Final = {
    "7.0": (
        "NOPERM this user has no permissions to run the '{cmd}' command",
        "NOPERM this user has no permissions to access one of the keys used as arguments",
        "NOPERM this user has no permissions to access one of the channels used as arguments",
    ),
    "7.2": (
        "NOPERM User {user} has no permissions to run the '{cmd}' command",
        "NOPERM No permissions to access a key",
        "NOPERM No permissions to access a channel",
    ),
}
NOAUTH: Final = "NOAUTH Authentication required."


def _text(arg: bytes, limit: int = 128) -> str:
    return _cstr(arg)[:limit].decode("utf-8", "replace")


def unknown_command_error(args: Sequence[bytes]) -> str:
    """Redis's reply to a command (or subcommand) it does not know."""
    if not args:
        return "ERR unknown command '', with args beginning with: "
    container = keyspec.TABLE.get(args[0].decode("latin-1").lower())
    if container is not None and container.subcommands is not None and len(args) > 1:
        text = f"ERR unknown subcommand '{_text(args[1])}'. Try {_cstr(args[0]).decode('latin-1').upper()} HELP."
    else:
        shown = ""
        for arg in args[1:]:
            if len(shown) >= 128:
                break
            shown += f"'{_text(arg, 128 - len(shown))}' "
        text = f"ERR unknown command '{_text(args[0])}', with args beginning with: {shown}"
    return text.replace("\r", " ").replace("\n", " ")


def arity_error(cmd: Command) -> str:
    return f"ERR wrong number of arguments for '{cmd.name}' command"


class AclPolicy:
    """``session.Policy``: ``check(user, request)`` is None to allow, else the error reply (without '-')."""

    def __init__(self, table: UserTable, *, wording: str = "7.0") -> None:
        self._table = table
        self._users = table._users  # the table updates this dict in place on load()
        self._deny_cmd, self.deny_key, self.deny_channel = WORDING[wording]

    def check(self, user: str | None, request: Request) -> str | None:
        args = request.args
        u = self._users.get(user)  # type: ignore[arg-type]
        if u is None:
            return NOAUTH if user is None else self._deny_cmd.format(user=user, cmd=request.name)
        entry = u._cache.get(request.name)
        if entry is None:
            entry = self._entry(u, request.name, args)
            if entry is None:
                return self._unknown(u, args)
        arity, verdict, cmd = entry
        if verdict is None:  # allowed whatever the arguments: only their number is left to check
            n = len(args)
            if (n == arity) if arity > 0 else (n >= -arity):
                return None
            return arity_error(cmd)
        if verdict.__class__ is dict:  # a container: its subcommands' entries are cached in it
            if len(args) < 2:
                if cmd.arity == -1:  # COMMAND alone is a command of its own: its permission is the container's
                    if any(sel.allows_command(cmd) for sel in u.selectors):
                        return None
                    return self._deny_cmd.format(user=u.name, cmd=cmd.name)
                return arity_error(cmd)  # the other containers need a subcommand (arity -2)
            subs: dict[bytes, tuple[int, object, Command]] = verdict
            sub_entry = subs.get(args[1].lower())
            if sub_entry is None:
                sub = cmd.subcommands.get(args[1].lower()) if cmd.subcommands else None
                if sub is None:
                    return self._unknown(u, args)
                sub_entry = subs[args[1].lower()] = (sub.arity, self._verdict(u, sub), sub)
            arity, verdict, cmd = sub_entry
        n = len(args)
        if (n != arity) if arity > 0 else (n < -arity):
            return arity_error(cmd)
        if verdict.__class__ is _Plan:
            fast = verdict.fast
            if fast is not None and fast(args):
                return None
            return self._check_args(u, verdict, args)
        return verdict  # type: ignore[return-value]

    def _entry(self, u: User, name: str, args: list[bytes]) -> tuple[int, object, Command] | None:
        top = keyspec.TABLE.get(name)
        if top is None:
            return None
        entry = u._cache[name] = (top.arity, self._verdict(u, top), top)
        return entry

    def _verdict(self, u: User, cmd: Command) -> object:
        """The verdict for a (user, command) pair if it does not depend on the arguments, else _DYNAMIC. For a
        container, a dict to hold its subcommands' verdicts."""
        if cmd.subcommands is not None:
            return {}
        scripts = u.scripts is not None and cmd.name in SCRIPT_COMMANDS
        channels = cmd.channel_spec is not None and bool(cmd.channel_spec[0] & (CHANNEL_PUBLISH | CHANNEL_SUBSCRIBE))
        allowing = [s for s in u.selectors if s.allows_command(cmd)]
        by_first_arg = any(cmd.id in s.firstargs for s in u.selectors)
        if not allowing and not by_first_arg:
            return self._deny_cmd.format(user=u.name, cmd=cmd.name)
        if not scripts:
            for s in allowing:
                if (s.allkeys or not cmd.has_keys) and (s.allchannels or not channels):
                    return None
        # Depends on the arguments. Without first-argument rules only the selectors allowing the command matter.
        return _Plan(cmd, None if by_first_arg else tuple(allowing), scripts, u.scripts or frozenset())

    def _unknown(self, u: User, args: list[bytes]) -> str | None:
        # A command the table does not know (a newer Redis, a module): only a selector that allows every command,
        # key and channel may send it on; Redis 7.0 then answers it itself.
        for s in u.selectors:
            if s.future and s.allkeys and s.allchannels:
                return None
        return unknown_command_error(args)

    def _check_args(self, u: User, plan: _Plan, args: list[bytes]) -> str | None:
        cmd = plan.cmd
        result, _ = evaluate(u, cmd, args, plan.selectors)
        if result == OK:
            if plan.scripts and _script_sha(cmd, args) not in u.scripts:  # type: ignore[operator]
                return f"NOPERM this user has no permissions to run the script '{_script_sha(cmd, args).decode()}'"
            return None
        if result == DENIED_KEY:
            return self.deny_key
        if result == DENIED_CHANNEL:
            return self.deny_channel
        return self._deny_cmd.format(user=u.name, cmd=cmd.name)

    # -- off the hot path

    def explain(self, user: str | None, request: Request) -> Denial | None:
        """Why ``check`` refuses this request (for ACL LOG and the audit trail); None if it allows it or refuses
        it for another reason (unknown command, arity)."""
        if self.check(user, request) is None:
            return None
        args = request.args
        u = self._users.get(user) if user is not None else None
        cmd = keyspec.lookup(args) if args else None
        if cmd is None or u is None or ((len(args) != cmd.arity) if cmd.arity > 0 else (len(args) < -cmd.arity)):
            return None
        message = self.check(user, request) or ""
        result, position = evaluate(u, cmd, args)
        if result == OK:  # allowed by the ACL, refused by the script allowlist
            if cmd.name not in SCRIPT_COMMANDS:
                return None  # refused for another reason (arity, a container without its subcommand)
            return Denial("command", _script_sha(cmd, args), 1, message)
        if result == DENIED_CMD:
            return Denial("command", cmd.name.encode(), 0, message)
        return Denial(REASONS[result], args[position], position, message)

    def dryrun(self, user: str, args: Sequence[bytes]) -> str:
        """What ``ACL DRYRUN <user> <args…>`` answers: "OK" or the reason, worded as Redis 7.0 words it."""
        u = self._users.get(user)
        if u is None:
            return f"ERR User '{user}' not found"
        if not args:
            return "ERR wrong number of arguments for 'acl|dryrun' command"
        cmd = keyspec.lookup(list(args))
        if cmd is None:
            return f"ERR Command '{_text(args[0], 1 << 30)}' not found"
        n = len(args)
        if (n != cmd.arity) if cmd.arity > 0 else (n < -cmd.arity):
            return arity_error(cmd)
        result, position = evaluate(u, cmd, list(args))
        if result == DENIED_CMD:
            return f"This user has no permissions to run the '{cmd.name}' command"
        if result == DENIED_KEY:
            return f"This user has no permissions to access the '{_text(args[position], 1 << 30)}' key"
        if result == DENIED_CHANNEL:
            return f"This user has no permissions to access the '{_text(args[position], 1 << 30)}' channel"
        return "OK"


def _script_sha(cmd: Command, args: list[bytes]) -> bytes:
    if SCRIPT_COMMANDS[cmd.name]:
        return args[1].lower()
    return hashlib.sha1(args[1]).hexdigest().encode()


def evaluate(u: User, cmd: Command, args: list[bytes], allowing: Sequence[Selector] | None = None) -> tuple[int, int]:
    """Redis's ACLCheckAllUserCommandPerm for a known command with the right number of arguments: (OK, 0) or
    (DENIED_CMD/KEY/CHANNEL, position of the refused key or channel). Scripts' SHA1s are not checked here.
    ``allowing``: the user's selectors that allow this command, when the caller knows them (and no first-argument
    rule is involved); the command check is then skipped."""
    keys: Sequence[tuple[int, int]] | None = None
    best, best_pos = DENIED_CMD, 0
    spec = cmd.channel_spec
    channels = spec is not None and bool(spec[0] & (CHANNEL_PUBLISH | CHANNEL_SUBSCRIBE))
    for s in u.selectors if allowing is None else allowing:
        if allowing is None and not (s.allcommands or cmd.no_auth or s.allowed >> cmd.id & 1):
            first = s.firstargs.get(cmd.id)
            if not first or len(args) < 2 or _cstr(args[2 if cmd.parent else 1]).lower() not in first:
                continue  # DENIED_CMD: never more relevant than what is already recorded
        if not s.allkeys and cmd.has_keys:
            if keys is None:
                keys = key_needs(cmd, args)
            ok = s.key_ok
            refused = -1
            for position, need in keys:
                if not ok[need](args[position]):
                    refused = position
                    break
            if refused >= 0:
                if best < DENIED_KEY or (best == DENIED_KEY and refused > best_pos):
                    best, best_pos = DENIED_KEY, refused
                continue
        if channels and not s.allchannels:
            is_pattern = bool(spec[0] & CHANNEL_PATTERN)  # type: ignore[index]
            refused = -1
            for position, _ in keyspec.get_channels(cmd, args):
                if not s.channel_allowed(args[position], is_pattern):
                    refused = position
                    break
            if refused >= 0:
                if best < DENIED_CHANNEL or refused > best_pos:
                    best, best_pos = DENIED_CHANNEL, refused
                continue
        return OK, 0
    return best, best_pos
