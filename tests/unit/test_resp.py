"""RequestParser, ReplyParser and decode: every RESP2/RESP3 type, in any split, and Redis's wording for errors."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brokerproxy import resp
from brokerproxy.errors import ProtocolError

# ------------------------------------------------------------------------------------------------------------- helpers


def frame_requests(parser: resp.RequestParser, chunks: list[bytes]) -> list[resp.Request]:
    out: list[resp.Request] = []
    for chunk in chunks:
        parser.feed(chunk)
        while (req := parser.next()) is not None:
            out.append(req)
    return out


def frame_replies(chunks: list[bytes]) -> tuple[list[tuple[int, bytes]], resp.ReplyParser]:
    parser = resp.ReplyParser()
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        parser.feed(chunk)
        while (frame := parser.next()) is not None:
            out.append(frame)
    return out, parser


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks, prev = [], 0
    for p in points:
        chunks.append(data[prev:p])
        prev = p
    chunks.append(data[prev:])
    return chunks


def same(a: Any, b: Any) -> bool:
    """Deep equality that also checks the decoded types (bool vs int, ErrorReply vs bytes, Push vs list) and NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, resp.Verbatim):
        return bytes(a) == bytes(b) and a.format == b.format
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# ---------------------------------------------------------------------------------------------------- every reply type


def verbatim(fmt: str, data: bytes) -> resp.Verbatim:
    v = resp.Verbatim(data)
    v.format = fmt
    return v


# (raw frame, kind, decoded value)
REPLY_CASES: list[tuple[str, bytes, int, Any]] = [
    ("simple", b"+OK\r\n", resp.REPLY, b"OK"),
    ("simple-empty", b"+\r\n", resp.REPLY, b""),
    ("error", b"-ERR unknown command 'FOO'\r\n", resp.REPLY, resp.ErrorReply(b"ERR unknown command 'FOO'")),
    ("integer", b":1000\r\n", resp.REPLY, 1000),
    ("integer-negative", b":-42\r\n", resp.REPLY, -42),
    ("bulk", b"$5\r\nhello\r\n", resp.REPLY, b"hello"),
    ("bulk-empty", b"$0\r\n\r\n", resp.REPLY, b""),
    ("bulk-binary-crlf", b"$6\r\na\r\n\r\nb\r\n", resp.REPLY, b"a\r\n\r\nb"),
    ("bulk-null", b"$-1\r\n", resp.REPLY, None),
    ("array", b"*2\r\n$3\r\nfoo\r\n:7\r\n", resp.REPLY, [b"foo", 7]),
    ("array-empty", b"*0\r\n", resp.REPLY, []),
    ("array-null", b"*-1\r\n", resp.REPLY, None),
    (
        "array-nested",
        b"*3\r\n*2\r\n:1\r\n*0\r\n$-1\r\n*1\r\n*1\r\n+deep\r\n",
        resp.REPLY,
        [[1, []], None, [[b"deep"]]],
    ),
    ("resp3-null", b"_\r\n", resp.REPLY, None),
    ("map", b"%2\r\n+first\r\n:1\r\n$6\r\nsecond\r\n:2\r\n", resp.REPLY, {b"first": 1, b"second": 2}),
    ("map-empty", b"%0\r\n", resp.REPLY, {}),
    ("map-nested", b"%1\r\n+k\r\n%1\r\n+k2\r\n*1\r\n:3\r\n", resp.REPLY, {b"k": {b"k2": [3]}}),
    ("set", b"~3\r\n+a\r\n+b\r\n:1\r\n", resp.REPLY, {b"a", b"b", 1}),
    ("set-empty", b"~0\r\n", resp.REPLY, set()),
    ("double", b",3.14\r\n", resp.REPLY, 3.14),
    ("double-exponent", b",1.5e+20\r\n", resp.REPLY, 1.5e20),
    ("double-integral", b",10\r\n", resp.REPLY, 10.0),
    ("double-inf", b",inf\r\n", resp.REPLY, math.inf),
    ("double-neg-inf", b",-inf\r\n", resp.REPLY, -math.inf),
    ("double-nan", b",nan\r\n", resp.REPLY, math.nan),
    ("boolean-true", b"#t\r\n", resp.REPLY, True),
    ("boolean-false", b"#f\r\n", resp.REPLY, False),
    ("big-number", b"(3492890328409238509324850943850943825024385\r\n", resp.REPLY,
     3492890328409238509324850943850943825024385),
    ("big-number-negative", b"(-3492890328409238509324850943850943825024385\r\n", resp.REPLY,
     -3492890328409238509324850943850943825024385),
    ("verbatim", b"=15\r\ntxt:Some string\r\n", resp.REPLY, verbatim("txt", b"Some string")),
    ("verbatim-crlf", b"=8\r\nmkd:a\r\nb\r\n", resp.REPLY, verbatim("mkd", b"a\r\nb")),
    ("blob-error", b"!21\r\nSYNTAX invalid syntax\r\n", resp.REPLY, resp.ErrorReply(b"SYNTAX invalid syntax")),
    (
        "attribute",
        b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n*2\r\n:2039123\r\n:9543892\r\n",
        resp.REPLY,
        [2039123, 9543892],
    ),
    ("attribute-two", b"|1\r\n+a\r\n:1\r\n|0\r\n+OK\r\n", resp.REPLY, b"OK"),
    ("push", b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n", resp.PUSH, resp.Push([b"message", b"ch", b"hi"])),
    ("push-after-attribute", b"|1\r\n+a\r\n:1\r\n>2\r\n+invalidate\r\n*1\r\n+k\r\n", resp.PUSH,
     resp.Push([b"invalidate", [b"k"]])),
]


@pytest.mark.parametrize(("raw", "kind", "value"), [c[1:] for c in REPLY_CASES], ids=[c[0] for c in REPLY_CASES])
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_reply_parser_frames_every_type(raw: bytes, kind: int, value: Any, split: str) -> None:
    parser = resp.ReplyParser()
    chunks = [raw] if split == "whole" else bytewise(raw)
    frames = []
    for i, chunk in enumerate(chunks):
        parser.feed(chunk)
        frame = parser.next()
        if i < len(chunks) - 1:
            assert frame is None, f"framed {frame!r} from an incomplete prefix"
        else:
            frames.append(frame)
    assert frames == [(kind, raw)]
    assert parser.next() is None
    assert parser.buffered == 0
    assert same(resp.decode(raw), value), resp.decode(raw)


def test_reply_parser_back_to_back_frames_in_one_feed() -> None:
    raws = [c[1] for c in REPLY_CASES]
    frames, parser = frame_replies([b"".join(raws)])
    assert frames == [(c[2], c[1]) for c in REPLY_CASES]
    assert parser.buffered == 0


def test_reply_parser_keeps_trailing_partial_frame() -> None:
    frames, parser = frame_replies([b"+OK\r\n$5\r\nhel"])
    assert frames == [(resp.REPLY, b"+OK\r\n")]
    assert parser.buffered == len(b"$5\r\nhel")
    parser.feed(b"lo\r\n")
    assert parser.next() == (resp.REPLY, b"$5\r\nhello\r\n")


def test_reply_parser_attribute_alone_is_not_a_frame() -> None:
    # The attribute is complete, the value it annotates is not: nothing is framed yet.
    frames, parser = frame_replies([b"|1\r\n+ttl\r\n:3600\r\n"])
    assert frames == []
    parser.feed(b":1\r\n")
    assert parser.next() == (resp.REPLY, b"|1\r\n+ttl\r\n:3600\r\n:1\r\n")


NESTED_ATTRIBUTES = [
    # The RESP3 spec's own example: the attribute annotates the array's third element; it is not an element.
    (b"*3\r\n:1\r\n:2\r\n|1\r\n+ttl\r\n:3600\r\n:3\r\n", [1, 2, 3]),
    (b"*2\r\n|0\r\n+a\r\n+b\r\n", [b"a", b"b"]),
    (b"%1\r\n+k\r\n|1\r\n+x\r\n+y\r\n*1\r\n:5\r\n", {b"k": [5]}),
    (b">2\r\n+message\r\n|1\r\n+x\r\n*1\r\n|1\r\n+y\r\n:1\r\n+z\r\n:9\r\n", resp.Push([b"message", 9])),
    (b"|1\r\n+a\r\n+b\r\n*1\r\n|1\r\n+c\r\n+d\r\n:7\r\n", [7]),
]


def test_reply_parser_attribute_inside_an_aggregate() -> None:
    # An attribute may annotate any value, also one inside an aggregate; the aggregate is still one frame.
    misframed = []
    for raw, value in NESTED_ATTRIBUTES:
        kind = resp.PUSH if isinstance(value, resp.Push) else resp.REPLY
        for chunks in ([raw + b"+next\r\n"], bytewise(raw + b"+next\r\n")):
            frames, parser = frame_replies(chunks)
            if frames != [(kind, raw), (resp.REPLY, b"+next\r\n")] or parser.buffered:
                misframed.append((raw, frames))
        assert same(resp.decode(raw), value)
    assert misframed == []


def test_reply_parser_rejects_unknown_type_byte() -> None:
    parser = resp.ReplyParser()
    parser.feed(b"?what\r\n")
    with pytest.raises(ProtocolError):
        parser.next()


@pytest.mark.parametrize("raw", [b"$abc\r\nxyz\r\n", b"*x\r\n", b"%zz\r\n"])
def test_reply_parser_rejects_malformed_length(raw: bytes) -> None:
    parser = resp.ReplyParser()
    parser.feed(raw)
    with pytest.raises(ProtocolError, match="malformed length"):
        parser.next()


def test_decode_rejects_trailing_bytes() -> None:
    with pytest.raises(ProtocolError, match="trailing bytes"):
        resp.decode(b"+OK\r\n+OK\r\n")


# ---------------------------------------------------------------------------------------- property: random RESP values


@dataclass
class Node:
    raw: bytes
    value: Any
    kind: int = resp.REPLY


line_text = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
blob = st.binary(max_size=20)


def _scalar_nodes() -> st.SearchStrategy[Node]:
    def bulk(b: bytes) -> Node:
        return Node(b"$%d\r\n%s\r\n" % (len(b), b), b)

    def double(f: float) -> Node:
        text = b"inf" if f == math.inf else b"-inf" if f == -math.inf else b"nan" if math.isnan(f) else repr(f).encode()
        return Node(b"," + text + b"\r\n", f)

    def verb(args: tuple[str, bytes]) -> Node:
        fmt, data = args
        body = fmt.encode() + b":" + data
        return Node(b"=%d\r\n%s\r\n" % (len(body), body), verbatim(fmt, data))

    return st.one_of(
        line_text.map(lambda b: Node(b"+" + b + b"\r\n", b)),
        line_text.map(lambda b: Node(b"-" + b + b"\r\n", resp.ErrorReply(b))),
        st.integers(-(2**63), 2**63 - 1).map(lambda i: Node(b":%d\r\n" % i, i)),
        blob.map(bulk),
        st.just(Node(b"$-1\r\n", None)),
        st.just(Node(b"*-1\r\n", None)),
        st.just(Node(b"_\r\n", None)),
        st.floats(allow_nan=True, allow_infinity=True).map(double),
        st.booleans().map(lambda v: Node(b"#t\r\n" if v else b"#f\r\n", v)),
        st.integers(-(10**40), 10**40).map(lambda i: Node(b"(%d\r\n" % i, i)),
        st.tuples(st.sampled_from(["txt", "mkd"]), blob).map(verb),
        blob.map(lambda b: Node(b"!%d\r\n%s\r\n" % (len(b), b), resp.ErrorReply(b))),
    )


def _hashable_nodes() -> st.SearchStrategy[Node]:
    # Set members and map keys: values that decode to something hashable and compare sanely.
    return st.one_of(
        line_text.map(lambda b: Node(b"+" + b + b"\r\n", b)),
        st.integers(-1000, 1000).map(lambda i: Node(b":%d\r\n" % i, i)),
        blob.map(lambda b: Node(b"$%d\r\n%s\r\n" % (len(b), b), b)),
    )


def _aggregates(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    def array(items: list[Node]) -> Node:
        return Node(b"*%d\r\n" % len(items) + b"".join(n.raw for n in items), [n.value for n in items])

    def set_(items: list[Node]) -> Node:
        return Node(b"~%d\r\n" % len(items) + b"".join(n.raw for n in items), {n.value for n in items})

    def map_(pairs: list[tuple[Node, Node]]) -> Node:
        raw = b"%%%d\r\n" % len(pairs) + b"".join(k.raw + v.raw for k, v in pairs)
        return Node(raw, {k.value: v.value for k, v in pairs})

    return st.one_of(
        st.lists(children, max_size=5).map(array),
        st.lists(_hashable_nodes(), max_size=5).map(set_),
        st.lists(st.tuples(_hashable_nodes(), children), max_size=4).map(map_),
    )


values = st.recursive(_scalar_nodes(), _aggregates, max_leaves=20)


@st.composite
def top_level_frames(draw: st.DrawFn) -> Node:
    node = draw(values)
    if draw(st.booleans()) and isinstance(node.value, list):
        # A push frame: the same elements behind '>'.
        items = node.raw[node.raw.index(b"\r\n") + 2 :]
        node = Node(b">%d\r\n" % len(node.value) + items, resp.Push(node.value), resp.PUSH)
    if draw(st.integers(0, 4)) == 0:
        # An attribute in front: framed with the value, dropped by decode.
        attr = draw(st.lists(st.tuples(_hashable_nodes(), values), min_size=0, max_size=2))
        node = Node(b"|%d\r\n" % len(attr) + b"".join(k.raw + v.raw for k, v in attr) + node.raw, node.value, node.kind)
    return node


@settings(max_examples=100, deadline=None)
@given(frames=st.lists(top_level_frames(), min_size=1, max_size=6), cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_reply_parser_random_values_random_splits(frames: list[Node], cuts: list[int]) -> None:
    stream = b"".join(f.raw for f in frames)
    got, parser = frame_replies(split_at(stream, cuts))
    assert got == [(f.kind, f.raw) for f in frames]
    assert parser.buffered == 0
    for (_, raw), f in zip(got, frames, strict=True):
        assert same(resp.decode(raw), f.value)


@settings(max_examples=30, deadline=None)
@given(frames=st.lists(top_level_frames(), min_size=1, max_size=3))
def test_reply_parser_random_values_bytewise(frames: list[Node]) -> None:
    stream = b"".join(f.raw for f in frames)
    got, parser = frame_replies(bytewise(stream))
    assert got == [(f.kind, f.raw) for f in frames]
    assert parser.buffered == 0


def test_reply_parser_many_small_frames_across_compaction() -> None:
    # Enough frames to pass the compaction threshold several times, fed in odd-sized chunks.
    raws = [b":%d\r\n" % i for i in range(40000)] + [b"$3\r\nend\r\n"]
    stream = b"".join(raws)
    chunks = [stream[i : i + 4093] for i in range(0, len(stream), 4093)]
    got, parser = frame_replies(chunks)
    assert [r for _, r in got] == raws
    assert parser.buffered == 0


# ------------------------------------------------------------------------------------------------- requests: multibulk


def test_request_multibulk_whole_and_bytewise() -> None:
    raw = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$6\r\nva\r\nlu\r\n"
    for chunks in ([raw], bytewise(raw)):
        parser = resp.RequestParser()
        reqs = []
        for i, chunk in enumerate(chunks):
            parser.feed(chunk)
            req = parser.next()
            if i < len(chunks) - 1:
                assert req is None
            else:
                reqs.append(req)
        assert len(reqs) == 1 and reqs[0] is not None
        assert reqs[0].args == [b"SET", b"key", b"va\r\nlu"]
        assert reqs[0].raw == raw
        assert reqs[0].name == "set"
        assert parser.buffered == 0


def test_request_name_is_lowercased() -> None:
    [req] = frame_requests(resp.RequestParser(), [resp.encode_command([b"bRPoP", b"q", b"0"])])
    assert req.name == "brpop"


def test_request_empty_multibulk_is_consumed() -> None:
    parser = resp.RequestParser()
    reqs = frame_requests(parser, [b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n"])
    assert [r.args for r in reqs] == [[], [], [b"PING"]]
    assert parser.buffered == 0


def test_request_pipeline_in_one_feed() -> None:
    cmds = [[b"LPUSH", b"q%d" % i, b"x" * (i % 50)] for i in range(5000)]
    stream = b"".join(resp.encode_command(c) for c in cmds)
    parser = resp.RequestParser()
    reqs = frame_requests(parser, [stream])
    assert [r.args for r in reqs] == cmds
    assert b"".join(r.raw for r in reqs) == stream
    assert parser.buffered == 0


request_args = st.lists(st.binary(max_size=30), min_size=1, max_size=6)
# Words an inline command can carry unquoted (and that do not start with '*', which would make it multibulk).
inline_word = st.text(alphabet="abcXYZ019-_:{}.$", min_size=1, max_size=8).map(str.encode)


@settings(max_examples=200, deadline=None)
@given(
    reqs=st.lists(
        st.one_of(request_args.map(lambda a: ("mb", a)), st.lists(inline_word, min_size=1, max_size=4).map(
            lambda a: ("inline", a))),
        min_size=1,
        max_size=10,
    ),
    cuts=st.lists(st.integers(0, 2000), max_size=15),
)
def test_request_parser_random_pipelines_random_splits(reqs: list[tuple[str, list[bytes]]], cuts: list[int]) -> None:
    stream = b"".join(resp.encode_command(a) if k == "mb" else b" ".join(a) + b"\r\n" for k, a in reqs)
    parser = resp.RequestParser()
    got = frame_requests(parser, split_at(stream, cuts))
    assert [r.args for r in got] == [a for _, a in reqs]
    # Multibulk requests are forwarded as they came; inline ones re-encoded as multibulk.
    assert [r.raw for r in got] == [resp.encode_command(a) for _, a in reqs]
    assert parser.buffered == 0


# ---------------------------------------------------------------------------------------------------- requests: inline


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b"PING\r\n", [b"PING"]),
        (b"PING\n", [b"PING"]),
        (b"SET a \"b c\"\r\n", [b"SET", b"a", b"b c"]),
        (b"SET a 'b c'\r\n", [b"SET", b"a", b"b c"]),
        (b"SET a \"\"\r\n", [b"SET", b"a", b""]),
        (b"  SET\t a   b  \r\n", [b"SET", b"a", b"b"]),
        (b"SET k \"\\x41\\x42z\"\r\n", [b"SET", b"k", b"ABz"]),
        (b"SET k \"\\xff\\x00\"\r\n", [b"SET", b"k", b"\xff\x00"]),
        (b"SET k \"a\\nb\\tc\\\\d\\\"e\"\r\n", [b"SET", b"k", b"a\nb\tc\\d\"e"]),
        (b"SET k 'it\\'s'\r\n", [b"SET", b"k", b"it's"]),
        (b"SET k 'a\\nb'\r\n", [b"SET", b"k", b"a\\nb"]),
        (b"SET k '\"'\r\n", [b"SET", b"k", b"\""]),
        (b"SET k \"'\"\r\n", [b"SET", b"k", b"'"]),
    ],
)
def test_inline_commands(line: bytes, args: list[bytes]) -> None:
    for chunks in ([line], bytewise(line)):
        parser = resp.RequestParser()
        [req] = frame_requests(parser, chunks)
        assert req.args == args
        assert req.raw == resp.encode_command(args)
        assert parser.buffered == 0


@pytest.mark.parametrize(
    "line",
    [b"SET a \"b\r\n", b"SET a 'b\r\n", b"SET a \"b\"c\r\n", b"SET a 'b'c\r\n", b"\"\r\n", b"ECHO \"a\\\"\r\n"],
)
def test_inline_unbalanced_quotes(line: bytes) -> None:
    parser = resp.RequestParser()
    parser.feed(line)
    with raises("unbalanced quotes in request"):
        parser.next()


def test_inline_empty_lines_are_ignored() -> None:
    parser = resp.RequestParser()
    reqs = frame_requests(parser, [b"\r\n\n   \r\nPING\r\n\r\n\t\nECHO x\n"])
    assert [r.args for r in reqs] == [[b"PING"], [b"ECHO", b"x"]]
    assert parser.buffered == 0


def test_inline_and_multibulk_mixed() -> None:
    stream = b"PING\r\n*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\nGET k\n"
    for chunks in ([stream], bytewise(stream)):
        reqs = frame_requests(resp.RequestParser(), chunks)
        assert [r.args for r in reqs] == [[b"PING"], [b"ECHO", b"hi"], [b"GET", b"k"]]


# ---------------------------------------------------------------------------------- requests: malformed, at each limit


def feed_and_frame(data: bytes, limits: resp.Limits | None = None) -> list[resp.Request]:
    return frame_requests(resp.RequestParser(limits or resp.Limits()), [data])


def raises(message: str) -> Any:
    """ProtocolError with exactly this message (Redis's wording)."""
    return pytest.raises(ProtocolError, match=f"^{re.escape(message)}$")


def test_invalid_multibulk_length() -> None:
    with raises("invalid multibulk length"):
        feed_and_frame(b"*abc\r\n")


def test_max_array_length() -> None:
    limits = resp.Limits(max_array_length=3)
    ok = resp.encode_command([b"a", b"b", b"c"])
    assert [r.args for r in feed_and_frame(ok, limits)] == [[b"a", b"b", b"c"]]
    with raises("invalid multibulk length"):
        feed_and_frame(resp.encode_command([b"a", b"b", b"c", b"d"]), limits)
    # Refused from the header alone, before the arguments arrive.
    with raises("invalid multibulk length"):
        feed_and_frame(b"*4\r\n", limits)


def test_max_array_length_inline() -> None:
    limits = resp.Limits(max_array_length=3)
    assert [r.args for r in feed_and_frame(b"a b c\r\n", limits)] == [[b"a", b"b", b"c"]]
    with raises("invalid multibulk length"):
        feed_and_frame(b"a b c d\r\n", limits)


def test_expected_dollar() -> None:
    with raises("expected '$', got 'x'"):
        feed_and_frame(b"*1\r\nx3\r\nGET\r\n")
    # At the second argument too.
    with raises("expected '$', got ':'"):
        feed_and_frame(b"*2\r\n$3\r\nGET\r\n:1\r\n")


def test_max_bulk_length() -> None:
    limits = resp.Limits(max_bulk_length=5)
    assert feed_and_frame(resp.encode_command([b"12345"]), limits)[0].args == [b"12345"]
    with raises("invalid bulk length"):
        feed_and_frame(resp.encode_command([b"123456"]), limits)
    # Refused from the bulk header alone, before the payload arrives.
    with raises("invalid bulk length"):
        feed_and_frame(b"*1\r\n$6\r\n", limits)


@pytest.mark.parametrize("header", [b"$-1", b"$-5", b"$abc", b"$"])
def test_invalid_bulk_length(header: bytes) -> None:
    with raises("invalid bulk length"):
        feed_and_frame(b"*1\r\n" + header + b"\r\nxyz\r\n")


def test_lengths_redis_rejects_are_rejected() -> None:
    # The proxy forwards the bytes it framed, so it must not accept a length that Redis's string2ll refuses
    # (a sign, spaces, leading zeros, underscores, "-0"): the proxy would count a request where Redis answers a
    # protocol error and drops the upstream connection.
    cases = [
        b"*+1\r\n$4\r\nPING\r\n",
        b"* 1\r\n$4\r\nPING\r\n",
        b"*1 \r\n$4\r\nPING\r\n",
        b"*01\r\n$4\r\nPING\r\n",
        b"*1_0\r\n" + b"$1\r\na\r\n" * 10,
        b"*1\r\n$+4\r\nPING\r\n",
        b"*1\r\n$ 4\r\nPING\r\n",
        b"*1\r\n$04\r\nPING\r\n",
        b"*1\r\n$-0\r\n\r\n",
    ]
    accepted = []
    for data in cases:
        try:
            feed_and_frame(data)
        except ProtocolError as exc:
            assert str(exc) in ("invalid multibulk length", "invalid bulk length"), (data, exc)
        else:
            accepted.append(data)
    assert accepted == []


def test_bulk_not_followed_by_crlf() -> None:
    with pytest.raises(ProtocolError):
        feed_and_frame(b"*1\r\n$3\r\nGETxx")
    with pytest.raises(ProtocolError):
        feed_and_frame(b"*2\r\n$3\r\nGET\n$1\r\na\r\n")


def test_max_inline_length() -> None:
    limits = resp.Limits(max_inline_length=8)
    # The limit counts the bytes of the line before its '\n' ('\r' included).
    assert feed_and_frame(b"ECHO abc\n", limits)[0].args == [b"ECHO", b"abc"]
    assert feed_and_frame(b"ECHO ab\r\n", limits)[0].args == [b"ECHO", b"ab"]
    with raises("too big inline request"):
        feed_and_frame(b"ECHO abcd\n", limits)
    with raises("too big inline request"):
        feed_and_frame(b"ECHO abc\r\n", limits)
    # No newline yet: at the limit it waits for more, one byte past it fails.
    parser = resp.RequestParser(limits)
    parser.feed(b"ECHO abc")
    assert parser.next() is None
    parser.feed(b"d")
    with raises("too big inline request"):
        parser.next()


def test_too_big_count_strings() -> None:
    limits = resp.Limits(max_inline_length=8)
    parser = resp.RequestParser(limits)
    parser.feed(b"*" + b"1" * 7)
    assert parser.next() is None
    parser.feed(b"1")
    with raises("too big mbulk count string"):
        parser.next()
    parser = resp.RequestParser(limits)
    parser.feed(b"*1\r\n$" + b"1" * 7)
    assert parser.next() is None
    parser.feed(b"1")
    with raises("too big bulk count string"):
        parser.next()


def test_max_buffered_bytes() -> None:
    limits = resp.Limits(max_buffered_bytes=10)
    parser = resp.RequestParser(limits)
    parser.feed(b"*1\r\n$4\r\nPI")  # 10 bytes unparsed: at the limit
    assert parser.next() is None
    with raises("client query buffer exceeds the limit"):
        parser.feed(b"N")
    # What was consumed does not count.
    parser = resp.RequestParser(limits)
    parser.feed(b"PING\r\nPING\r\n"[:10])
    assert [r.args for r in iter(parser.next, None)] == [[b"PING"]]
    parser.feed(b"\r\nECHO")  # 16 bytes fed in all, 6 consumed: 10 buffered
    with raises("client query buffer exceeds the limit"):
        parser.feed(b"x")


# ------------------------------------------------------------------------------------------------------------ encoders


def test_encoders() -> None:
    assert resp.encode_command([b"SET", b"k", b""]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
    assert resp.simple(b"PONG") == b"+PONG\r\n"
    assert resp.error("ERR bad\r\nthing") == b"-ERR bad  thing\r\n"
    assert resp.null(2) == b"$-1\r\n" and resp.null(3) == b"_\r\n"
    assert resp.null_array(2) == b"*-1\r\n" and resp.null_array(3) == b"_\r\n"


# ------------------------------------------------------------------------------------- what hiredis must never see


DENSE = (b"v" * 15 + b"\n") * 4096  # a 64 KiB value with a newline every 16 bytes


@pytest.mark.parametrize("frame", [None, 0])
@pytest.mark.parametrize(
    ("tail", "misread"),
    [
        (resp.encode_command([b"GET", b"k"]), False),
        (b"*99999999\r\n", True),  # a count hiredis would allocate before anything checks it
        (b"*2\r\n$3\r\nGET\r\n+k\r\n", True),  # a simple string, which hiredis reads as a bulk one
        (b"*1\r\n*99999999\r\n", True),
    ],
)
def test_hiredis_misreads_after_a_large_value(frame: int | None, tail: bytes, misread: bool) -> None:
    # Both scans (the regex, and the walk over headers that large values take) find what follows a value dense with
    # newlines. The walk jumps over values, so what a value holds cannot fool it; the regex would take such bytes for
    # headers (which costs only the exact parser), so it gets a value without them.
    bait = b"\n*99999999\r\n+x\r\n" if frame is not None else b""
    data = resp.encode_command([b"LPUSH", b"q", DENSE + bait]) + tail
    assert resp.hiredis_misreads(data, 1 << 20, 0, frame) is misread


@pytest.mark.parametrize("cut", [3, 20, 40, 65_000])
def test_hiredis_misreads_walk_on_a_partial_request(cut: int) -> None:
    data = resp.encode_command([b"LPUSH", b"q", DENSE]) + b"*99999999\r\n"
    assert resp.hiredis_misreads(data[: len(data) - 11 - cut], 1 << 20, 0, 0) is False
    assert resp.hiredis_misreads(data, 1 << 20, 0, 0) is True


def test_hiredis_parser_frames_large_values_dense_with_newlines() -> None:
    reqs = [[b"LPUSH", b"q", DENSE], [b"SET", b"k", DENSE[:20_000]], [b"GET", b"k"]]
    stream = b"".join(resp.encode_command(r) for r in reqs)
    for size in (1000, 65536, len(stream)):
        parser = resp.HiredisRequestParser(resp.Limits())
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert [r.args for r in frame_requests(parser, chunks)] == reqs
    with raises("invalid multibulk length"):
        frame_requests(resp.HiredisRequestParser(resp.Limits()), [stream + b"*99999999\r\n"])


@pytest.mark.parametrize("size", [1000, 20_000])
def test_hiredis_parser_large_request_over_the_bulk_limit(size: int) -> None:
    # A large request is framed by the exact parser, which checks the limits as the bytes come.
    stream = resp.encode_command([b"SET", b"k", DENSE[:30_000]])
    parser = resp.HiredisRequestParser(resp.Limits(max_bulk_length=25_000))
    with raises("invalid bulk length"):
        frame_requests(parser, [stream[i : i + size] for i in range(0, len(stream), size)])
