"""Sans-IO RESP2/RESP3 framing, and the encoders for the replies the proxy makes itself.

Theory of operation
-------------------
The proxy forwards the bytes it received; it never re-encodes a client's request or Redis's reply unless it has
to change it. So this module *frames*: it finds where each request or reply ends, and hands back the original
bytes of that frame.

* ``RequestParser`` frames what clients send: multibulk requests (``*N\\r\\n$len\\r\\narg\\r\\n…``) and inline
  commands (``PING\\r\\n``, as redis-cli and telnet send them). Each request comes out as its argument list plus its
  raw bytes. Violations raise ``ProtocolError`` with Redis's own message; the caller answers
  ``-ERR Protocol error: …`` and closes that connection.
* ``ReplyParser`` frames what Redis sends: every RESP2 and RESP3 type. An attribute (``|``) is framed together
  with the value it annotates, since it is not a reply by itself. Push frames (``>``) are reported as such.
* ``decode`` turns one framed reply into Python values, for the few replies the proxy has to read (a pop's
  ``[key, element]``, a subscribe confirmation).

Both parsers are fed bytes in any split (one byte at a time included) and keep partial frames until the rest
arrives. They consume their buffer from an offset and compact it rarely, so a pipeline of many small frames is
not copied once per frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError

try:  # hiredis frames requests in C; without it the pure-Python parser does the same work, slower
    import hiredis as _hiredis
except ImportError:  # pragma: no cover - hiredis is a dependency, but the proxy works without it
    _hiredis = None  # type: ignore[assignment]

# Named limits, with Redis's own as precedent.
#: Redis ``proto-max-bulk-len`` default: 512 MB.
DEFAULT_MAX_BULK_LENGTH = 512 * 1024 * 1024
#: Redis accepts up to INT_MAX arguments; a Python proxy holding a list that long is a memory attack, and no
#: client of this proxy sends more than a few thousand (BRPOP over every queue). 1 Mi arguments.
DEFAULT_MAX_ARRAY_LENGTH = 1024 * 1024
#: Redis ``PROTO_INLINE_MAX_SIZE``: 64 KB for an inline command or a multibulk header line.
DEFAULT_MAX_INLINE_LENGTH = 64 * 1024
#: Redis ``client-query-buffer-limit`` default: 1 GB of unparsed request bytes per connection.
DEFAULT_MAX_BUFFERED_BYTES = 1024 * 1024 * 1024


def _length(text: bytes | bytearray) -> int:
    """A length as Redis's string2ll reads it: ASCII digits after an optional '-', and no '+', spaces, underscores
    or leading zeros, all of which Python's int() accepts. ValueError for anything Redis would refuse."""
    digits = text[1:] if text[:1] == b"-" else text
    if not digits.isdigit() or (digits[:1] == b"0" and len(text) > 1):
        raise ValueError(text)
    return int(text)


# Compact the consumed prefix of a buffer once it passes this many bytes.
_COMPACT_AT = 64 * 1024
#: An aggregate header (array, map, set, push, attribute) with a count of 7 digits or more. hiredis allocates the
#: count's slots before anything checks it (a count of 2**31 stalls the loop for seconds, 2**32-1 raises
#: MemoryError), so such bytes never reach hiredis: the exact parser checks the count against the limits first.
_HEADER = re.compile(rb"[*%~>|]\+?0*(\d{7,})\r")
#: The same after a newline, or a simple string there: hiredis reads '+x' as the bytes b"x", like a bulk string,
#: where Redis refuses it as an argument. Headers start a read or follow a newline, which keeps the scan off most
#: payload bytes.
_LINE_HIREDIS_MISREADS = re.compile(rb"\n(?:\+|[*%~>|]\+?0*(\d{7,})\r)")
_SUSPECT_AFTER_NEWLINE = frozenset(b"+*%~>|")


def hiredis_misreads(data: bytes | bytearray, limit: int, start: int = 0, frame: int | None = None) -> bool:
    """True if ``data[start:]`` (requests) holds what hiredis must not see: an aggregate header whose count is above
    ``limit``, or a simple string (the exact parser answers both with Redis's protocol error). ``frame``, when
    given, is where a request starts at or before ``start``: large values are then skipped by their lengths."""
    m = _HEADER.match(data, start)
    if m is not None and int(m.group(1)) > limit:
        return True
    if len(data) - start > 4096:
        # A large read is mostly payload: visit its newlines at memchr speed (find), not every byte by regex; if it
        # turns out to hold many lines, the regex takes over from there, or, where the lines so far announced a
        # large value, a walk over the headers alone: a value dense with newlines costs the regex a byte at a time.
        budget = 8  # a value's few header lines; a dense pipeline goes to the regex, cheaper per line
        large = False
        i = data.find(b"\n", start)
        while i >= 0 and budget:
            if i + 1 < len(data):
                c = data[i + 1]
                if c in _SUSPECT_AFTER_NEWLINE:
                    m = _LINE_HIREDIS_MISREADS.match(data, i)
                    if m is not None and (m.group(1) is None or int(m.group(1)) > limit):
                        return True
                elif c == 0x24 and data.find(b"\r", i + 2, i + 6) < 0:  # '$' and 4 digits or more
                    large = True
            i = data.find(b"\n", i + 1)
            budget -= 1
        if i < 0:
            return False
        if frame is not None and (large or frame < start):  # values announced large, or a request cut by a read
            return _walk_misreads(data, frame, limit)
        start = i
    return _regex_misreads(data, start, limit)


#: Canonical request headers, whole or cut short by the end of a read.
_COUNT = re.compile(rb"\*(\d{1,19})\r\n")
_LENGTH = re.compile(rb"\$(\d{1,19})\r\n")
_COUNT_CUT = re.compile(rb"\*\d{0,19}\r?")
_LENGTH_CUT = re.compile(rb"\$\d{0,19}\r?")


def _walk_misreads(data: bytes | bytearray, pos: int, limit: int) -> bool:
    """``hiredis_misreads`` for requests starting at ``pos``, by their headers, each value jumped over by its length:
    True at anything but a canonical '*' count within ``limit`` and '$' lengths (the exact parser then decides).
    A walk costs about a microsecond per header, the regex about a nanosecond per byte: after a run of small
    values the regex takes the rest, from the header the walk stopped at."""
    end = len(data)
    small = 0
    while pos < end:
        m = _COUNT.match(data, pos)
        if m is None:
            return _COUNT_CUT.fullmatch(data, pos) is None
        count = int(m.group(1))
        if count > limit:
            return True
        pos = m.end()
        for _ in range(count):
            if pos >= end:
                return False
            m = _LENGTH.match(data, pos)
            if m is None:
                return _LENGTH_CUT.fullmatch(data, pos) is None
            size = int(m.group(1))
            pos = m.end() + size + 2
            if size < 1024:
                small += 1
                if small > 16:
                    return _regex_misreads(data, pos - 1, limit) if pos <= end else False
            else:
                small = 0
    return False


def _regex_misreads(data: bytes | bytearray, start: int, limit: int) -> bool:
    for m in _LINE_HIREDIS_MISREADS.finditer(data, start):
        if m.group(1) is None or int(m.group(1)) > limit:
            return True
    return False


@dataclass(frozen=True, slots=True)
class Limits:
    max_bulk_length: int = DEFAULT_MAX_BULK_LENGTH
    max_array_length: int = DEFAULT_MAX_ARRAY_LENGTH
    max_inline_length: int = DEFAULT_MAX_INLINE_LENGTH
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES


DEFAULT_LIMITS = Limits()


_NAMES: dict[bytes, str] = {}
_NAMES_MAX = 4096  # distinct spellings remembered; a client sending random names cannot grow it further


def command_name(raw: bytes) -> str:
    """The lower-case name of a command as it arrived (any case), remembered for next time."""
    name = _NAMES.get(raw)
    if name is None:
        name = raw.decode("latin-1").lower()
        if len(_NAMES) < _NAMES_MAX:
            _NAMES[raw] = name
    return name


_command_name = command_name
#: The names remembered so far, for look-ups that skip the call.
COMMAND_NAMES = _NAMES


class Request:
    """One framed client request: its arguments and the exact bytes it arrived as."""

    __slots__ = ("args", "name", "raw")

    def __init__(self, args: list[bytes], raw: bytes) -> None:
        self.args = args
        self.raw = raw
        # Lower-cased command name as str: the key into the command table.
        self.name = _command_name(args[0]) if args else ""

    def __repr__(self) -> str:
        return f"Request({self.args!r})"


#: From this many bytes, copy a slice of a bytearray through a memoryview: one copy instead of two.
_COPY_VIEW_AT = 4096


def _copy(buf: bytearray, start: int, stop: int) -> bytes:
    with memoryview(buf) as view:  # released at once: a bytearray with a live view cannot be resized
        return view[start:stop].tobytes()


class RequestParser:
    """Frames client requests. ``feed()`` bytes, then call ``next()`` until it returns None."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._limits = limits

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._pos >= _COMPACT_AT:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data
        if len(self._buf) - self._pos > self._limits.max_buffered_bytes:
            raise ProtocolError("client query buffer exceeds the limit")

    def next(self) -> Request | None:
        """The next complete request, or None if the buffer holds no complete one."""
        while True:
            buf = self._buf
            pos = self._pos
            if pos >= len(buf):
                return None
            if buf[pos] == 0x2A:  # '*'
                return self._multibulk(buf, pos)
            req = self._inline(buf, pos)
            if req is None or req.args:
                return req
            # An empty inline line is ignored, as Redis does: look at what follows.

    def _multibulk(self, buf: bytearray, pos: int) -> Request | None:
        limits = self._limits
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            if len(buf) - pos > limits.max_inline_length:
                raise ProtocolError("too big mbulk count string")
            return None
        try:
            count = _length(buf[pos + 1 : nl])
        except ValueError:
            raise ProtocolError("invalid multibulk length") from None
        if count > limits.max_array_length:
            raise ProtocolError("invalid multibulk length")
        cur = nl + 2
        if count <= 0:
            # Redis answers nothing to '*0' or '*-1' and moves on; so does the proxy (an empty request).
            self._pos = cur
            return Request([], bytes(buf[pos:cur]))
        args: list[bytes] = []
        end = len(buf)
        for _ in range(count):
            if cur >= end:
                return None
            if buf[cur] != 0x24:  # '$'
                raise ProtocolError(f"expected '$', got '{chr(buf[cur])}'")
            nl = buf.find(b"\r\n", cur)
            if nl < 0:
                if end - cur > limits.max_inline_length:
                    raise ProtocolError("too big bulk count string")
                return None
            try:
                size = _length(buf[cur + 1 : nl])
            except ValueError:
                raise ProtocolError("invalid bulk length") from None
            if size < 0 or size > limits.max_bulk_length:
                raise ProtocolError("invalid bulk length")
            start = nl + 2
            stop = start + size
            if stop + 2 > end:
                return None
            if buf[stop : stop + 2] != b"\r\n":
                raise ProtocolError("bulk string not terminated by CRLF")
            args.append(bytes(buf[start:stop]) if size < _COPY_VIEW_AT else _copy(buf, start, stop))
            cur = stop + 2
        self._pos = cur
        return Request(args, bytes(buf[pos:cur]) if cur - pos < _COPY_VIEW_AT else _copy(buf, pos, cur))

    def _inline(self, buf: bytearray, pos: int) -> Request | None:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(buf) - pos > self._limits.max_inline_length:
                raise ProtocolError("too big inline request")
            return None
        if nl - pos > self._limits.max_inline_length:
            raise ProtocolError("too big inline request")
        line = bytes(buf[pos:nl])
        if line.endswith(b"\r"):
            line = line[:-1]
        self._pos = nl + 1
        args = split_inline(line)
        if len(args) > self._limits.max_array_length:
            raise ProtocolError("invalid multibulk length")
        # Inline requests are forwarded re-encoded as multibulk: the canonical form every Redis accepts.
        return Request(args, encode_command(args) if args else b"")


class HiredisRequestParser(RequestParser):
    """RequestParser with hiredis doing the framing in C, about four times faster per request.

    hiredis hands back the arguments but not where the request ended. Clients send canonical multibulk (redis-py,
    kombu, redis-cli, redis-benchmark all do), whose length follows from the arguments; the frame is accepted only if
    it ends on a CRLF exactly there. Anything else (inline commands, hiredis errors, lengths that do not line up,
    a non-bulk element) goes to the pure-Python parser, which is exact and words errors as Redis does, and hiredis
    restarts after that frame. Redis itself refuses non-canonical lengths, so what it executes is what was checked.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(limits)
        self._reader = _hiredis.Reader()
        self._fed = 0  # offset in the buffer up to which hiredis has been fed
        self._checked = -1  # start of the incomplete request whose headers were last checked
        self._large = False  # the request at _pos is large: the exact parser frames it (see next)

    def feed(self, data: bytes) -> None:
        if self._pos >= _COMPACT_AT:
            self._fed -= self._pos
            self._checked = -1
        super().feed(data)

    def _exact(self) -> Request | None:
        """Parse at the current position with the exact parser; hiredis restarts after what it consumed."""
        req = RequestParser.next(self)
        self._reader = _hiredis.Reader()
        self._fed = self._pos
        return req

    def next(self) -> Request | None:
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            return None
        if buf[pos] != 0x2A or self._large:  # an inline command, or a large request
            self._large = False
            req = self._exact()
            self._large = req is None and len(buf) - pos > _LARGE_REQUEST
            return req
        if self._fed < len(buf):
            if len(buf) - self._fed > _LARGE_REQUEST and _request_end(buf, pos) - pos > _LARGE_REQUEST:
                self._large = True  # see below; found before hiredis copies the read
                return self.next()
            # From a little before the new bytes: a header may have been split across two reads.
            if hiredis_misreads(buf, self._limits.max_array_length, max(self._fed - 24, pos), pos):
                return self._exact()  # raises the protocol error, before hiredis allocates or misreads anything
            self._reader.feed(buf, self._fed)  # type: ignore[arg-type]  # any buffer works, stubs say bytes
            self._fed = len(buf)
        try:
            args = self._reader.gets()
        except (_hiredis.ProtocolError, TypeError, ValueError):  # TypeError: a map with an aggregate key
            return self._exact()
        if args is False:
            if len(buf) - pos > _LARGE_REQUEST:
                # A large request (a big value, most likely): the exact parser frames it from here on, by its
                # lengths, in one copy; hiredis would copy each read into its own buffer, then the value again.
                self._large = True
                return self.next()
            if pos != self._checked:
                self._checked = pos
                # An incomplete request (seen for the first time, or large): let the exact parser check its
                # headers against the limits now (it raises on a bad one, says None while it is incomplete).
                req = RequestParser.next(self)
                if req is not None:  # the exact parser saw a whole request where hiredis did not: trust it
                    self._reader = _hiredis.Reader()
                    self._fed = self._pos
                return req
            return None
        # The canonical length: '*' n CRLF, then per argument '$' len CRLF data CRLF. A loop with a digit-count
        # table is several times cheaper here than str() per argument.
        ok = type(args) is list and 0 < len(args) <= self._limits.max_array_length
        if ok:
            n = len(args)
            end = pos + 3 + (_DIGITS[n] if n < _DIGITS_MAX else len(str(n))) + 5 * n
            max_bulk = self._limits.max_bulk_length
            for a in args:
                if type(a) is not bytes:
                    ok = False
                    break
                size = len(a)
                if size > max_bulk:
                    ok = False
                    break
                end += size + (_DIGITS[size] if size < _DIGITS_MAX else len(str(size)))
            ok = ok and buf[end - 2 : end] == b"\r\n"
        if not ok:
            self._pos = pos
            return self._exact()
        self._pos = end
        return Request(args, bytes(buf[pos:end]))


_DIGITS_MAX = 1 << 16
_DIGITS = bytes(len(str(i)) for i in range(_DIGITS_MAX))  # decimal digits of each length below 64 Ki

def _request_end(buf: bytearray, pos: int) -> int:
    """Where the canonical request at ``pos`` ends, from its headers alone (past the buffer if it is incomplete);
    ``pos`` where its headers are not canonical or not all there: the parsers decide."""
    m = _COUNT.match(buf, pos)
    if m is None:
        return pos
    end = m.end()
    for _ in range(int(m.group(1))):
        m = _LENGTH.match(buf, end)
        if m is None:
            return end if end >= len(buf) else pos
        end = m.end() + int(m.group(1)) + 2
    return end


#: Above this many bytes, an incomplete request is left to the exact parser (HiredisRequestParser.next).
_LARGE_REQUEST = 16 * 1024


if _hiredis is not None:
    FastParseError: type[Exception] = _hiredis.ProtocolError
    PushNotification: type = _hiredis.PushNotification
    ReplyErrorType: type = _hiredis.ReplyError
else:  # pragma: no cover

    class FastParseError(Exception):  # type: ignore[no-redef]
        pass

    class PushNotification(list):  # type: ignore[no-redef,type-arg]
        pass

    class ReplyErrorType(Exception):  # type: ignore[no-redef]
        pass


def fast_reader() -> Any:
    """A hiredis reader for the session's fast paths, or None without hiredis. It decodes in C; the session
    uses it only to count whole frames and see their types, and forwards the bytes as they arrived."""
    return _hiredis.Reader() if _hiredis is not None else None


_PROBE = b"*0\r\n"


def at_frame_boundary(reader: Any) -> bool:
    """True if a hiredis reader that has returned every whole frame holds no part of another one.

    ``has_data()`` cannot tell: hiredis consumes the bytes of a partial frame into its own state. So feed an empty
    array: it comes back as exactly ``[]`` only if nothing was pending (pending state would absorb it into a
    bigger frame, or leave it incomplete). A reader that says False is left in an unknown state; drop it."""
    reader.feed(_PROBE)
    try:
        probe = reader.gets()
    except Exception:  # any failure means the reader was not at a boundary
        return False
    return type(probe) is list and not probe


def request_parser(limits: Limits = DEFAULT_LIMITS) -> RequestParser:
    """The fastest request parser available: hiredis-backed when hiredis is installed."""
    return HiredisRequestParser(limits) if _hiredis is not None else RequestParser(limits)


_HEX = b"0123456789abcdefABCDEF"
_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command the way Redis's ``sdssplitargs`` does: spaces, "double" quotes with escapes
    (``\\n``, ``\\xHH``…), 'single' quotes with only ``\\'``. A closing quote must be followed by a space."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \t\n\r\v\f":
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        in_dq = in_sq = False
        while True:
            if in_dq:
                if i >= n:
                    raise ProtocolError("unbalanced quotes in request")
                c = line[i]
                if c == 0x5C and i + 3 < n and line[i + 1] == 0x78 and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 0x5C and i + 1 < n:
                    i += 1
                    cur += _ESCAPES.get(line[i], bytes((line[i],)))
                elif c == 0x22:
                    if i + 1 < n and line[i + 1] not in b" \t\n\r\v\f":
                        raise ProtocolError("unbalanced quotes in request")
                    in_dq = False
                    i += 1
                    break
                else:
                    cur.append(c)
            elif in_sq:
                if i >= n:
                    raise ProtocolError("unbalanced quotes in request")
                c = line[i]
                if c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    i += 1
                    cur.append(0x27)
                elif c == 0x27:
                    if i + 1 < n and line[i + 1] not in b" \t\n\r\v\f":
                        raise ProtocolError("unbalanced quotes in request")
                    in_sq = False
                    i += 1
                    break
                else:
                    cur.append(c)
            else:
                if i >= n:
                    break
                c = line[i]
                if c in b" \t\n\r\v\f":
                    break
                if c == 0x22:
                    in_dq = True
                elif c == 0x27:
                    in_sq = True
                else:
                    cur.append(c)
            i += 1
        args.append(bytes(cur))


# ---------------------------------------------------------------------------------------------------- replies

#: Frame kinds ReplyParser reports.
REPLY = 0
PUSH = 1

_LINE_TYPES = frozenset(b"+-:_,#(")  # one line: simple, error, integer, null, double, boolean, big number
_BULK_TYPES = frozenset(b"$!=")  # length-prefixed: bulk, blob error, verbatim
_AGG_TYPES = frozenset(b"*~>")  # N elements: array, set, push
_MAP_TYPES = frozenset(b"%|")  # N pairs: map, attribute


class ReplyParser:
    """Frames replies from Redis. ``feed()`` bytes, then call ``next()`` until it returns None.

    ``next()`` returns ``(kind, raw)`` with kind ``REPLY`` or ``PUSH``. An attribute frame is returned together
    with the value that follows it, as one ``REPLY`` (or ``PUSH``) frame.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.start = 0
        self.first = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._pos >= _COMPACT_AT:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def advance(self) -> int:
        """Frame the next reply in place: -1 if incomplete, else its kind (REPLY or PUSH), with the frame at
        ``start``..``pos``. The hot path: no copy, and the common one-line and bulk replies take no call."""
        buf = self._buf
        start = self._pos
        self.start = start
        if start >= len(buf):
            return -1
        t = buf[start]
        self.first = t  # the type byte of the frame being framed ('-' for an error)
        try:
            if t in _LINE_TYPES:
                nl = buf.find(b"\r\n", start)
                if nl < 0:
                    return -1
                self._pos = nl + 2
                return REPLY
            if t == 0x24:  # '$'
                nl = buf.find(b"\r\n", start)
                if nl < 0:
                    return -1
                size = int(buf[start + 1 : nl])
                end = nl + 2 if size < 0 else nl + 4 + size
                if end > len(buf):
                    return -1
                self._pos = end
                return REPLY
            end = _skip(buf, start, len(buf))
        except ValueError:
            raise ProtocolError("malformed length in reply from upstream") from None
        if end < 0:
            return -1
        self._pos = end
        # Skip attributes to find the kind of the value they annotate.
        first = start
        while buf[first] == 0x7C:  # '|'
            first = _skip_attribute(buf, first, end)
        return PUSH if buf[first] == 0x3E else REPLY

    @property
    def pos(self) -> int:
        return self._pos

    def frame(self) -> bytes:
        """The bytes of the frame ``advance()`` just framed."""
        return bytes(self._buf[self.start : self._pos])

    def span(self, start: int, end: int) -> memoryview:
        """A view of frames ``start``..``end`` (offsets from ``advance``), valid until the next ``feed``."""
        return memoryview(self._buf)[start:end]

    def next(self) -> tuple[int, bytes] | None:
        kind = self.advance()
        if kind < 0:
            return None
        return kind, self.frame()


def _skip_one(buf: bytearray, pos: int, end: int) -> int:
    """End offset of the one value starting at pos, with the attributes in front of it and inside it, or -1 if
    incomplete."""
    # Iterative: a stack of how many frames are still owed at each open aggregate level.
    owed = 1
    stack: list[int] = []
    while True:
        if pos >= end:
            return -1
        t = buf[pos]
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return -1
        if t in _LINE_TYPES:
            pos = nl + 2
        elif t in _BULK_TYPES:
            size = int(buf[pos + 1 : nl])
            if size < 0:
                pos = nl + 2
            else:
                pos = nl + 2 + size + 2
                if pos > end:
                    return -1
        elif t in _AGG_TYPES or t in _MAP_TYPES:
            n = int(buf[pos + 1 : nl])
            pos = nl + 2
            if t in _MAP_TYPES:
                n *= 2
            if t == 0x7C:  # '|': an attribute annotates the value after it and is not one of the owed values
                if n > 0:
                    stack.append(owed)
                    owed = n
                continue
            if n > 0:
                stack.append(owed - 1)
                owed = n
                continue
        else:
            raise ProtocolError(f"unexpected reply type byte {t!r} from upstream")
        owed -= 1
        while owed == 0:
            if not stack:
                return pos
            owed = stack.pop()


def _skip(buf: bytearray, pos: int, end: int) -> int:
    """End of the next reply: one value, with any attributes in front of it."""
    return _skip_one(buf, pos, end)


def _skip_attribute(buf: bytearray, pos: int, end: int) -> int:
    """End of the complete attribute at pos (its pairs only, not the value it annotates)."""
    nl = buf.find(b"\r\n", pos)
    count = 2 * int(buf[pos + 1 : nl])
    pos = nl + 2
    for _ in range(count):
        pos = _skip_one(buf, pos, end)
    return pos


class Verbatim(bytes):
    """A RESP3 verbatim string; ``format`` is its three-letter format (``txt``, ``mkd``)."""

    format: str


class Push(list):  # type: ignore[type-arg]
    """A RESP3 push frame's elements."""


class ErrorReply(bytes):
    """An error reply's text (without the leading '-')."""


Value = None | bytes | int | float | bool | list | dict | set | ErrorReply  # type: ignore[type-arg]


def decode(raw: bytes) -> Value:
    """Decode one framed reply. Attributes are dropped. Used only off the hot path."""
    value, pos = _decode(raw, 0)
    if pos != len(raw):
        raise ProtocolError("trailing bytes after reply")
    return value


def _decode(raw: bytes, pos: int) -> tuple[Value, int]:
    t = raw[pos]
    nl = raw.index(b"\r\n", pos)
    line = raw[pos + 1 : nl]
    nxt = nl + 2
    if t == 0x2B:  # +
        return line, nxt
    if t == 0x2D:  # -
        return ErrorReply(line), nxt
    if t == 0x3A or t == 0x28:  # : (
        return int(line), nxt
    if t == 0x5F:  # _
        return None, nxt
    if t == 0x2C:  # ,
        return float(line), nxt
    if t == 0x23:  # #
        return line == b"t", nxt
    if t in _BULK_TYPES:
        size = int(line)
        if size < 0:
            return None, nxt
        data = raw[nxt : nxt + size]
        if t == 0x21:  # !
            return ErrorReply(data), nxt + size + 2
        if t == 0x3D:  # =
            verbatim = Verbatim(data[4:])
            verbatim.format = data[:3].decode("latin-1")
            return verbatim, nxt + size + 2
        return data, nxt + size + 2
    n = int(line)
    if t in _AGG_TYPES:
        if n < 0:
            return None, nxt
        items: list[Value] = []
        for _ in range(n):
            item, nxt = _decode(raw, nxt)
            items.append(item)
        if t == 0x7E:  # ~
            return set(items), nxt
        if t == 0x3E:  # >
            return Push(items), nxt
        return items, nxt
    if t in _MAP_TYPES:
        mapping: dict[Value, Value] = {}
        for _ in range(n):
            k, nxt = _decode(raw, nxt)
            v, nxt = _decode(raw, nxt)
            mapping[k if not isinstance(k, list) else tuple(k)] = v  # type: ignore[index]
        if t == 0x7C:  # attribute: decode and return the value it annotates
            return _decode(raw, nxt)
        return mapping, nxt
    raise ProtocolError(f"unexpected reply type byte {t!r}")


# ---------------------------------------------------------------------------------------------------- encoders


def encode_command(args: list[bytes]) -> bytes:
    """A request as multibulk: what the proxy sends upstream when it writes a command of its own."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def simple(text: bytes) -> bytes:
    return b"+" + text + b"\r\n"


def error(text: str) -> bytes:
    """An error reply. ``text`` starts with Redis's prefix (``ERR``, ``NOAUTH``, ``WRONGPASS``…), which redis-py
    maps to its exception classes. CR and LF are not allowed in a simple error, so they become spaces."""
    return b"-" + text.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + b"\r\n"


def null(protocol: int) -> bytes:
    """The null reply of the connection's protocol (RESP2 null bulk, RESP3 ``_``)."""
    return b"_\r\n" if protocol == 3 else b"$-1\r\n"


def null_array(protocol: int) -> bytes:
    """What a timed-out blocking pop answers: RESP2 null array, RESP3 ``_``."""
    return b"_\r\n" if protocol == 3 else b"*-1\r\n"


OK = b"+OK\r\n"
