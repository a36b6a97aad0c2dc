"""Redis's glob patterns (``stringmatchlen``, case-sensitive), compiled for fast matching of many patterns at once.

Semantics, as Redis 7.0 implements them: ``*`` any run of bytes, ``?`` one byte, ``[…]`` one byte from a class
(``^`` negates, ``a-z`` is a range compared as *signed* chars in either order, ``\\x`` is x, ``]`` right after ``[``
ends an empty class, a class left open runs to the end of the pattern), ``\\x`` outside a class is x and a trailing
``\\`` is itself; a pattern that has to descend more than 1000 ``*`` deep never matches (the CVE-2024-31228 fix);
the empty string matches only the empty pattern (``*`` does not match it).

A set of patterns (a selector's key patterns for one kind of access, its channel patterns) compiles into one
function: patterns without wildcards and with small classes expand into a set of literals (``Q\\x06\\x16[369]`` is
three strings) or, with one trailing ``*``, into a tuple of prefixes for a single ``bytes.startswith``; the rest are
joined into one regular expression. The differential test checks all this against ``KEYS <pattern>`` on a real
Redis.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from itertools import product

#: Redis gives up on a pattern that nests deeper than this many '*' (CVE-2024-31228).
MAX_NESTING = 1000
#: A pattern whose classes expand to at most this many strings becomes literals or prefixes.
MAX_EXPANSION = 64

_LIT, _SET, _STAR = range(3)
Token = tuple[int, frozenset[int]]
_ALL = frozenset(range(256))


def _signed(c: int) -> int:
    return c - 256 if c >= 128 else c


def tokens(p: bytes) -> list[Token]:
    """The pattern as tokens: (_LIT, {byte}), (_SET, bytes) for '?' and classes, (_STAR, ∅) for a run of '*'."""
    out: list[Token] = []
    n = len(p)
    i = 0
    while i < n:
        c = p[i]
        if c == 0x2A:  # '*'
            while i + 1 < n and p[i + 1] == 0x2A:
                i += 1
            out.append((_STAR, frozenset()))
        elif c == 0x3F:  # '?'
            out.append((_SET, _ALL))
        elif c == 0x5B:  # '['
            i += 1
            negate = i < n and p[i] == 0x5E
            if negate:
                i += 1
            members: set[int] = set()
            while True:
                if i < n and p[i] == 0x5C and n - i >= 2:  # an escaped member
                    i += 1
                    members.add(p[i])
                elif i < n and p[i] == 0x5D:  # ']'
                    break
                elif i >= n:  # left open: the class ends with the pattern
                    i -= 1
                    break
                elif n - i >= 3 and p[i + 1] == 0x2D:  # a range, as signed chars, either order
                    lo, hi = sorted((_signed(p[i]), _signed(p[i + 2])))
                    members.update(b for b in range(256) if lo <= _signed(b) <= hi)
                    i += 2
                else:
                    members.add(p[i])
                i += 1
            out.append((_SET, _ALL - members if negate else frozenset(members)))
        else:
            if c == 0x5C and n - i >= 2:  # '\x' is x; a trailing '\' is itself
                i += 1
            out.append((_LIT, frozenset((p[i],))))
        i += 1
    return out


def _regex(toks: list[Token]) -> bytes:
    out: list[bytes] = []
    for kind, members in toks:
        if kind == _STAR:
            out.append(b".*")
        elif kind == _LIT:
            out.append(re.escape(bytes(members)))
        elif not members:
            out.append(b"(?!)")
        elif len(members) == 256:
            out.append(b".")
        else:
            out.append(b"[" + b"".join(b"\\x%02x" % m for m in sorted(members)) + b"]")
    return b"".join(out)


class Glob:
    """One compiled pattern: ``literals`` (a frozenset), ``prefixes`` (a tuple), ``nonempty`` (True: every
    non-empty string), ``regex`` (bytes, for fullmatch; at most one interior '*', so matching is linear) or
    ``segments`` (two or more interior '*') describe it; none set means it matches nothing."""

    __slots__ = ("literals", "nonempty", "pattern", "prefixes", "regex", "segments")

    def __init__(self, pattern: bytes) -> None:
        self.pattern = pattern
        self.literals: frozenset[bytes] = frozenset()
        self.prefixes: tuple[bytes, ...] = ()
        self.nonempty = False
        self.regex: bytes | None = None
        self.segments: Callable[[bytes], bool] | None = None
        toks = tokens(pattern)
        stars = sum(1 for k, _ in toks if k == _STAR)
        trailing = bool(toks) and toks[-1][0] == _STAR
        if stars - trailing > MAX_NESTING:
            return  # Redis never gets to the end of such a pattern
        body = toks[:-1] if trailing else toks
        if all(k != _STAR for k, _ in body):
            count = 1
            for _, members in body:
                count *= len(members)
                if count > MAX_EXPANSION:
                    break
            if count <= MAX_EXPANSION:
                strings = frozenset(bytes(t) for t in product(*(sorted(m) for _, m in body)))
                if not trailing:
                    self.literals = strings
                elif b"" in strings:
                    self.nonempty = True
                else:
                    self.prefixes = tuple(sorted(strings))
                return
        if stars <= 1:
            self.regex = _regex(toks)
        else:
            self.segments = _segments(toks)

    def match(self, subject: bytes) -> bool:
        return compile_set([self.pattern])(subject)


def _segments(toks: list[Token]) -> Callable[[bytes], bool]:
    """A matcher for a pattern with two or more '*': the parts between the stars have fixed lengths, so the first
    must match at the start, the last at the end, and each one between at its leftmost place after the previous one
    (the classic glob argument: an earlier match never leaves less room for the rest). Linear in the subject, where
    a backtracking regular expression would be exponential in the number of stars (Redis fixed the same problem in
    its own matcher, CVE-2022-36021)."""
    parts: list[list[Token]] = [[]]
    for tok in toks:
        if tok[0] == _STAR:
            parts.append([])
        else:
            parts[-1].append(tok)
    head = re.compile(_regex(parts[0]), re.DOTALL)
    tail = re.compile(_regex(parts[-1]), re.DOTALL)
    middle = [re.compile(_regex(p), re.DOTALL) for p in parts[1:-1]]
    head_len, tail_len = len(parts[0]), len(parts[-1])
    need = head_len + tail_len + sum(len(p) for p in parts[1:-1])

    def match(subject: bytes) -> bool:
        n = len(subject)
        if not n or n < need:
            return False  # the empty string matches only the empty pattern
        if head.fullmatch(subject, 0, head_len) is None or tail.fullmatch(subject, n - tail_len, n) is None:
            return False
        pos, end = head_len, n - tail_len
        for part in middle:
            found = part.search(subject, pos, end)
            if found is None:
                return False
            pos = found.end()
        return True

    return match


def compile_set(patterns: Iterable[bytes]) -> Callable[[bytes], bool]:
    """One function telling whether a string matches any of ``patterns``."""
    globs = [Glob(p) for p in patterns]
    literals = frozenset().union(*(g.literals for g in globs))
    prefixes = tuple(sorted({p for g in globs for p in g.prefixes}))
    nonempty = any(g.nonempty for g in globs)
    regexes = [g.regex for g in globs if g.regex is not None]
    segmented = tuple(g.segments for g in globs if g.segments is not None)
    if nonempty:
        if b"" in literals:
            return _always
        return bool
    rx = re.compile(b"|".join(b"(?:%s)" % r for r in regexes), re.DOTALL).fullmatch if regexes else None
    # One function per combination, so that the common cases cost one C call or two.
    if rx is None and not segmented:
        if not prefixes:
            return literals.__contains__
        if not literals:

            def starts(subject: bytes) -> bool:
                return subject.startswith(prefixes)

            return starts

        def literal_or_starts(subject: bytes) -> bool:
            return subject in literals or subject.startswith(prefixes)

        return literal_or_starts
    full = rx

    def match(subject: bytes) -> bool:
        if subject in literals or subject.startswith(prefixes) or (full is not None and full(subject) is not None):
            return True
        return any(m(subject) for m in segmented)

    return match


def _always(subject: bytes) -> bool:
    return True


def glob_match(pattern: bytes, subject: bytes) -> bool:
    """Whether ``subject`` matches ``pattern`` (Redis's stringmatchlen, case-sensitive)."""
    return compile_set([pattern])(subject)
