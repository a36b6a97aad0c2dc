"""The Observer, fed the real Celery 5.7 capture (tests/data/celery57-resp3) and hand-made traffic.

The capture is replayed through the project's own RESP parsers, each request paired with its reply as the session
pairs them. Its connections carry no global clock, so the replay runs in causal phases (every publish, then every
pop, then every result write, each connection in its own order): what a consumer pops was pushed before, and a
result is written after its pop. Expected counts come from an independent oracle, ``json.loads`` of every message,
and from the numbers the capture's README states.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerproxy import observe as observe_module
from brokerproxy import resp
from brokerproxy.observe import OTHER, UNKNOWN, Observer

CAPTURE = Path(__file__).resolve().parent.parent / "data" / "celery57-resp3"
CONNECTIONS = sorted(p.stem for p in CAPTURE.glob("*.c2s"))
# RESP3: (un)subscribe confirmations are push frames, not replies.
NO_REPLY = {"subscribe", "unsubscribe", "psubscribe", "punsubscribe", "ssubscribe", "sunsubscribe"}


class Clock:
    def __init__(self, start: float = 1000.0, step: float = 0.0) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def replay_pairs(stem: str) -> list[tuple[resp.Request, bytes | None, bool]]:
    """(request, its reply or None, inside MULTI) for one connection of the capture, in order."""
    parser = resp.RequestParser()
    parser.feed((CAPTURE / f"{stem}.c2s").read_bytes())
    requests = []
    while (req := parser.next()) is not None:
        requests.append(req)
    rparser = resp.ReplyParser()
    rparser.feed((CAPTURE / f"{stem}.s2c").read_bytes())
    replies = []
    while (frame := rparser.next()) is not None:
        if frame[0] == resp.REPLY:
            replies.append(frame[1])
    out: list[tuple[resp.Request, bytes | None, bool]] = []
    it = iter(replies)
    in_multi = False
    for req in requests:
        if req.name == "multi":
            in_multi = True
        reply = None if req.name in NO_REPLY else next(it)
        out.append((req, reply, in_multi and req.name != "multi"))
        if req.name in ("exec", "discard"):
            in_multi = False
    assert next(it, None) is None, f"{stem}: replies left over"
    return out


ALL_PAIRS = {stem: replay_pairs(stem) for stem in CONNECTIONS}


def watched(o: Observer, names: set[str]) -> Iterator[tuple[resp.Request, bytes | None, bool]]:
    for stem in CONNECTIONS:
        for req, reply, in_multi in ALL_PAIRS[stem]:
            if req.name in names:
                yield req, reply, in_multi


def feed(o: Observer, req: resp.Request, reply: bytes | None, in_multi: bool) -> None:
    """What the session does for one request and its reply."""
    if req.name in o.WATCH_REQUESTS:
        o.on_request(req.args, in_multi)
    if reply is not None and req.name in o.WATCH_REPLIES:
        o.on_reply(req.args, reply)


def replay_capture(clock: Clock) -> Observer:
    o = Observer(clock=clock)
    for req, reply, in_multi in watched(o, {"lpush", "rpush", "publish"}):
        feed(o, req, reply, in_multi)
    clock.now += 1.0
    for req, reply, in_multi in watched(o, {"brpop", "blpop", "rpop", "lpop"}):
        keys = req.args[1:-1]
        o.consumer_blocked(keys)
        feed(o, req, reply, in_multi)
        o.consumer_unblocked(keys)
    clock.now += 1.0
    for req, reply, in_multi in watched(o, {"set", "setex", "psetex"}):
        feed(o, req, reply, in_multi)
    return o


def oracle() -> dict[str, Counter[object]]:
    """What the capture holds, by json.loads of every message."""
    published: Counter[object] = Counter()
    tasks: Counter[object] = Counter()
    results: Counter[object] = Counter()
    names: dict[str, str] = {}
    for stem in CONNECTIONS:
        for req, _, _ in ALL_PAIRS[stem]:
            if req.name == "lpush":
                msg = json.loads(req.args[2])
                queue = req.args[1].split(b"\x06\x16")[0].decode()
                if queue.endswith(".reply.celery.pidbox"):
                    continue
                published[queue] += 1
                if "task" in msg["headers"]:
                    tasks[(msg["headers"]["task"], queue)] += 1
                    names[msg["headers"]["id"]] = msg["headers"]["task"]
    for stem in CONNECTIONS:
        for req, _, _ in ALL_PAIRS[stem]:
            if req.name == "setex" and req.args[1].startswith(b"celery-task-meta-"):
                meta = json.loads(req.args[3])
                results[(names[meta["task_id"]], meta["status"])] += 1
    return {"published": published, "tasks": tasks, "results": results}


# -------------------------------------------------------------------------------------------- the real capture


def test_capture_counts_match_what_was_sent() -> None:
    clock = Clock()
    o = replay_capture(clock)
    truth = oracle()
    # The README: LPUSH 141 = 140 task messages + the one `inspect ping` reply on a pidbox reply queue (left out).
    lpush = sum(1 for _ in watched(o, {"lpush"}))
    assert lpush == 141
    assert sum(truth["published"].values()) == 140
    # The client sent 120 over alpha/beta (i % 3 picks beta), a chord of 8 + callback and one failing task on
    # celery, a group of 10 on alpha.
    assert truth["published"] == {"alpha": 90, "beta": 40, "celery": 10}

    assert set(o.queues) == {"alpha", "beta", "celery"}
    assert {q.name: q.published for q in o.queues.values()} == truth["published"]
    assert {q.name: q.consumed for q in o.queues.values()} == truth["published"]
    assert all(q.redelivered == 0 and q.requeued == 0 for q in o.queues.values())
    tasks = {(t.name, queue): n for t in o.tasks.values() for queue, n in t.published.items()}
    assert tasks == truth["tasks"]
    assert tasks[("recapp.mul", "alpha")] == 90
    results = {(t.name, state): n for t in o.tasks.values() for state, n in t.results.items()}
    assert results == truth["results"]
    by_state: Counter[str] = Counter()
    for (_, state), n in results.items():
        by_state[state] += n
    assert by_state == {"STARTED": 140, "SUCCESS": 139, "FAILURE": 1}

    # Every message was pushed then popped through this observer: one wait each, of the phase gap.
    for q in o.queues.values():
        assert q.wait.count == q.consumed
        assert q.wait.sum == pytest.approx(q.consumed * 1.0)
        assert q.sizes.count == q.published
    # Every task ran (STARTED) and finished (SUCCESS/FAILURE): one runtime each.
    assert sum(t.runtime.count for t in o.tasks.values()) == 140
    assert o.pending_messages == 0 and o.pending_tasks == 0
    assert o.dropped == {"delivery_tag": 0, "task_id": 0}
    assert all(q.consumers == 0 for q in o.queues.values())


def test_capture_message_sizes_are_the_real_sizes() -> None:
    o = replay_capture(Clock())
    sizes = [len(req.args[2]) for req, _, _ in watched(o, {"lpush"}) if b"pidbox" not in req.args[1]]
    assert sum(q.sizes.sum for q in o.queues.values()) == sum(sizes)


def test_capture_depth_follows_push_replies_and_pops() -> None:
    o = Observer(clock=Clock())
    last: dict[bytes, int] = {}
    for req, reply, in_multi in watched(o, {"lpush"}):
        feed(o, req, reply, in_multi)
        assert reply is not None
        if b"pidbox" not in req.args[1]:
            last[req.args[1]] = int(reply[1:-2])
    expected: Counter[str] = Counter()
    for key, n in last.items():
        expected[key.split(b"\x06\x16")[0].decode()] += n
    assert o.depths() == expected
    # The priority sub-queues are among the keys to poll, with kombu's default steps, and nothing else.
    assert set(o.queues_to_poll()) == {
        q + s for q in (b"alpha", b"beta", b"celery") for s in (b"", b"\x06\x163", b"\x06\x166", b"\x06\x169")
    }
    for req, reply, in_multi in watched(o, {"brpop"}):
        feed(o, req, reply, in_multi)
    assert all(v >= 0 for v in o.depths().values())


def test_capture_worker_events() -> None:
    clock = Clock()
    o = Observer(clock=clock)
    seen = []
    for req, reply, in_multi in watched(o, {"publish"}):
        channel = req.args[1]
        feed(o, req, reply, in_multi)
        if b"celeryev/worker." in channel:
            seen.append((channel.rsplit(b"/", 1)[1], o.workers_online()))
    # worker.online, three heartbeats, worker.offline: one worker (rec@host) online in between.
    assert seen[0] == (b"worker.online", 1)
    assert [n for kind, n in seen if kind == b"worker.heartbeat"] == [1, 1, 1]
    assert seen[-1] == (b"worker.offline", 0)


def test_capture_without_the_pushes_still_counts_and_names_tasks() -> None:
    # A consumer-side proxy process that never saw the publishes: counts stay exact, no waits, and the task names
    # come from the popped messages, so results still get their names and runtimes.
    o = Observer(clock=Clock())
    for req, reply, in_multi in watched(o, {"brpop"}):
        feed(o, req, reply, in_multi)
    for req, reply, in_multi in watched(o, {"setex"}):
        feed(o, req, reply, in_multi)
    assert {q.name: q.consumed for q in o.queues.values()} == {"alpha": 90, "beta": 40, "celery": 10}
    assert all(q.wait.count == 0 for q in o.queues.values())
    results = {(t.name, state): n for t in o.tasks.values() for state, n in t.results.items()}
    assert results == oracle()["results"]
    assert UNKNOWN not in o.tasks
    assert sum(t.runtime.count for t in o.tasks.values()) == 140


def test_capture_results_without_publish_are_unknown() -> None:
    o = Observer(clock=Clock())
    for req, reply, in_multi in watched(o, {"setex"}):
        feed(o, req, reply, in_multi)
    assert set(o.tasks) == {UNKNOWN}
    assert o.tasks[UNKNOWN].results == {"STARTED": 140, "SUCCESS": 139, "FAILURE": 1}
    assert o.tasks[UNKNOWN].runtime.count == 0


def test_unwatched_capture_requests_are_not_looked_at() -> None:
    o = Observer()
    names = Counter(req.name for stem in CONNECTIONS for req, _, _ in ALL_PAIRS[stem])
    watched_names = {n for n in names if n in o.WATCH_REQUESTS}
    assert watched_names == {"lpush", "set", "setex", "publish"}
    assert {"brpop", "lpush"} <= o.WATCH_REPLIES


# -------------------------------------------------------------------------------------------- hand-made traffic


def envelope(
    task: str | None = "app.add",
    queue: str = "celery",
    tid: str | None = None,
    tag: str | None = None,
    redelivered: bool = False,
    size: int = 0,
) -> bytes:
    """A kombu/Celery message as kombu 5.7 writes it (json.dumps, protocol 2)."""
    tid = tid or str(uuid.uuid4())
    headers: dict[str, object] = {"lang": "py"}
    if task is not None:
        headers.update({"task": task, "id": tid, "shadow": None, "retries": 0, "root_id": tid, "argsrepr": "(2, 3)"})
    delivery_info: dict[str, object] = {"exchange": "", "routing_key": queue}
    if redelivered:
        headers["redelivered"] = True
        delivery_info["redelivered"] = True
    msg = {
        "body": base64.b64encode(b"[[2, 3], {}, {}]").decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": tid,
            "reply_to": "r",
            "delivery_mode": 2,
            "delivery_info": delivery_info,
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": tag or str(uuid.uuid4()),
        },
    }
    if size:
        msg["body"] = base64.b64encode(b"x" * size).decode()
    return json.dumps(msg).encode()


def pop_reply(key: bytes, msg: bytes) -> bytes:
    return b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(msg), msg)


def result(status: str, tid: str) -> bytes:
    return json.dumps({"status": status, "result": None, "traceback": None, "children": [], "date_done": None,
                       "task_id": tid}).encode()  # fmt: skip


def test_prefix_and_priority_suffix_are_stripped() -> None:
    o = Observer(key_prefix=b"tenantA:")
    o.on_request([b"LPUSH", b"tenantA:orders\x06\x169", envelope(queue="orders")], False)
    o.on_request([b"lpush", b"tenantA:orders", envelope(queue="orders")], False)
    o.on_request([b"RPUSH", b"tenantA:orders\x06\x163", envelope(queue="orders")], False)
    assert set(o.queues) == {"orders"}
    assert o.queues["orders"].published == 3
    assert set(o.queues_to_poll()) == {b"tenantA:orders", b"tenantA:orders\x06\x163", b"tenantA:orders\x06\x166",
                                       b"tenantA:orders\x06\x169"}  # fmt: skip
    # A key without the prefix is kept whole (another tenant, or no prefix configured there).
    o.on_request([b"LPUSH", b"plain", envelope()], False)
    assert "plain" in o.queues
    # A suffix that is not \x06\x16 + digits is part of the name.
    o.on_request([b"LPUSH", b"tenantA:odd\x06\x16x", envelope()], False)
    assert "odd\x06\x16x" in o.queues


def test_depth_sums_priority_sub_queues() -> None:
    o = Observer()
    for key, length in ((b"q", 5), (b"q\x06\x163", 2), (b"q\x06\x169", 1)):
        o.on_request([b"LPUSH", key, envelope()], False)
        o.on_reply([b"LPUSH", key, b"..."], b":%d\r\n" % length)
    assert o.depths() == {"q": 8}
    o.on_reply([b"LPUSH", b"q", b"..."], b"+QUEUED\r\n")  # inside MULTI: no length
    o.on_reply([b"LPUSH", b"q", b"..."], b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
    assert o.depths() == {"q": 8}
    o.set_depth(b"q\x06\x166", 4)  # the poller
    o.set_depth(b"unrelated", 100)  # not a queue key: ignored
    assert o.depths() == {"q": 12}
    o.on_reply([b"BRPOP", b"q", b"1"], pop_reply(b"q\x06\x163", envelope()))
    assert o.depths() == {"q": 11}
    o.requeued(b"q\x06\x163", 3)
    assert o.depths() == {"q": 14}
    assert o.queues["q"].requeued == 3
    # The poller's view wins when it comes.
    for key in o.queues_to_poll():
        o.set_depth(key, 0)
    assert o.depths() == {"q": 0}


def test_redelivered_and_restore_of_the_same_tag() -> None:
    clock = Clock()
    o = Observer(clock=clock)
    tag = str(uuid.uuid4())
    tid = str(uuid.uuid4())
    o.on_request([b"LPUSH", b"celery", envelope(tid=tid, tag=tag)], False)
    clock.now += 10
    # kombu's restore: WATCH/MULTI/RPUSH of the same message, marked redelivered, same tag.
    o.on_request([b"RPUSH", b"celery", envelope(tid=tid, tag=tag, redelivered=True)], True)
    q = o.queues["celery"]
    assert (q.published, q.redelivered) == (2, 1)
    assert o.tasks["app.add"].published == {"celery": 2}
    assert o.pending_messages == 1
    clock.now += 2
    o.on_reply([b"BRPOP", b"celery", b"1"], pop_reply(b"celery", envelope(tid=tid, tag=tag, redelivered=True)))
    # The wait runs from the latest push of that tag.
    assert q.wait.count == 1 and q.wait.sum == pytest.approx(2.0)


def test_redelivered_is_found_whatever_the_routing_key() -> None:
    o = Observer()
    o.on_request([b"RPUSH", b"celery", envelope(queue="q" * 300, redelivered=True)], True)
    o.on_request([b"RPUSH", b"celery", envelope(queue="q" * 300)], True)
    assert o.queues["celery"].redelivered == 1


def test_redelivered_text_in_a_header_value_is_not_a_flag() -> None:
    o = Observer()
    msg = envelope(task='app."redelivered": true')
    assert b'\\"redelivered\\": true' in msg
    o.on_request([b"LPUSH", b"celery", msg], False)
    assert o.queues["celery"].redelivered == 0


def test_non_envelopes_are_not_messages() -> None:
    o = Observer()
    for value in (b"hello", b"", b"{}", b'{"a": 1}', b"[1, 2]", b'{"properties": {"priority": 0}}'):
        o.on_request([b"LPUSH", b"jobs", value], False)
        o.on_reply([b"BRPOP", b"jobs", b"0"], pop_reply(b"jobs", value))
    assert o.queues == {}
    # kombu messages without a Celery task header count for the queue, not for any task.
    o.on_request([b"LPUSH", b"kq", envelope(task=None)], False)
    assert o.queues["kq"].published == 1
    assert o.tasks == {}


def test_pidbox_reply_queues_are_left_out() -> None:
    o = Observer()
    key = b"ca88ffdb-fd6a-3a33-a4c7-e0f91121743c.reply.celery.pidbox"
    o.on_request([b"LPUSH", key, envelope(task=None)], False)
    o.consumer_blocked([key, key + b"\x06\x163"])
    o.on_reply([b"BRPOP", key, b"1"], pop_reply(key, envelope(task=None)))
    o.requeued(key, 1)
    assert o.queues == {} and o.queues_to_poll() == []


def test_multi_element_push_counts_each_message() -> None:
    o = Observer()
    o.on_request([b"LPUSH", b"celery", envelope(), envelope(), b"junk", envelope()], False)
    assert o.queues["celery"].published == 3


def test_large_messages_are_read_from_their_tail() -> None:
    clock = Clock()
    o = Observer(clock=clock)
    big = envelope(task="app.big", size=300_000)  # a 400 KB body before the headers
    o.on_request([b"LPUSH", b"celery", big], False)
    assert o.tasks["app.big"].published == {"celery": 1}
    assert o.queues["celery"].sizes.sum == len(big)
    # Popped by a process that never saw the push: the task is still found behind the body.
    other = Observer(clock=clock)
    other.on_reply([b"BRPOP", b"celery", b"1"], pop_reply(b"celery", big))
    assert other.queues["celery"].consumed == 1 and other.pending_tasks == 1
    # Headers larger than the tail window: the message counts, its task name is not looked for that far.
    huge_headers = envelope(task="app.x" + "y" * 100).replace(
        b'"argsrepr": "(2, 3)"', b'"argsrepr": "' + b"z" * 70_000 + b'"'
    )
    o.on_request([b"LPUSH", b"celery", huge_headers], False)
    assert o.queues["celery"].published == 2
    assert set(o.tasks) == {"app.big"}


def test_pop_reply_forms() -> None:
    clock = Clock()
    o = Observer(clock=clock)
    msgs = [envelope() for _ in range(8)]
    for m in msgs:
        o.on_request([b"LPUSH", b"q", m], False)
    clock.now += 1
    q = o.queues["q"]
    o.on_reply([b"BRPOP", b"q", b"1"], b"_\r\n")  # RESP3 timeout
    o.on_reply([b"BRPOP", b"q", b"1"], b"*-1\r\n")  # RESP2 timeout
    o.on_reply([b"BRPOP", b"q", b"1"], b"+QUEUED\r\n")
    o.on_reply([b"BRPOP", b"q", b"1"], b"-UNBLOCKED force unblock\r\n")
    assert q.consumed == 0
    o.on_reply([b"brpop", b"q", b"1"], pop_reply(b"q", msgs[0]))
    o.on_reply([b"BLPOP", b"q", b"1"], pop_reply(b"q", msgs[1]))
    o.on_reply([b"RPOP", b"q"], b"$%d\r\n%s\r\n" % (len(msgs[2]), msgs[2]))
    o.on_reply([b"LPOP", b"q", b"2"], resp.encode_command([msgs[3], msgs[4]]))
    o.on_reply([b"LMPOP", b"1", b"q", b"LEFT"], b"*2\r\n$1\r\nq\r\n" + resp.encode_command([msgs[5]]))
    o.on_reply([b"BLMOVE", b"q", b"processing", b"RIGHT", b"LEFT", b"0"], b"$%d\r\n%s\r\n" % (len(msgs[6]), msgs[6]))
    # An attribute in front of a BRPOP reply goes to the exact decoder.
    o.on_reply([b"BRPOP", b"q", b"1"], b"|1\r\n+a\r\n+b\r\n" + pop_reply(b"q", msgs[7]))
    assert q.consumed == 8
    assert q.wait.count == 8
    assert o.pending_messages == 0
    # Malformed replies are ignored, never raised.
    o.on_reply([b"BRPOP", b"q", b"1"], b"*2\r\n$x\r\n")
    o.on_reply([b"RPOP", b"q"], b"$5\r\nab")
    assert q.consumed == 8


def test_results_runtime_and_states() -> None:
    clock = Clock()
    o = Observer(clock=clock)
    tids = [str(uuid.uuid4()) for _ in range(5)]
    msgs = [envelope(task="app.t", tid=t) for t in tids]
    for m in msgs:
        o.on_request([b"LPUSH", b"celery", m], False)
    clock.now += 5
    for m in msgs:
        o.on_reply([b"BRPOP", b"celery", b"1"], pop_reply(b"celery", m))
    clock.now += 1
    # tids[0]: STARTED then SUCCESS: runtime from STARTED (2 s), not from the pop (3 s).
    o.on_request([b"SETEX", b"celery-task-meta-" + tids[0].encode(), b"86400", result("STARTED", tids[0])], True)
    clock.now += 2
    o.on_request([b"SETEX", b"celery-task-meta-" + tids[0].encode(), b"86400", result("SUCCESS", tids[0])], True)
    # tids[1]: no STARTED (task_track_started off): runtime from the pop; SET ... EX form.
    o.on_request([b"SET", b"celery-task-meta-" + tids[1].encode(), result("FAILURE", tids[1]), b"EX", b"60"], False)
    # tids[2]: RETRY ends an attempt (runtime observed) and keeps the id for the next attempt.
    o.on_request([b"SETEX", b"celery-task-meta-" + tids[2].encode(), b"60", result("RETRY", tids[2])], False)
    assert o.pending_tasks == 3
    o.on_request([b"LPUSH", b"celery", envelope(task="app.t", tid=tids[2])], False)
    o.on_reply([b"BRPOP", b"celery", b"1"], pop_reply(b"celery", envelope(task="app.t", tid=tids[2])))
    clock.now += 1
    o.on_request([b"PSETEX", b"celery-task-meta-" + tids[2].encode(), b"60000", result("SUCCESS", tids[2])], False)
    # tids[3]: REVOKED counts, no runtime; tids[4]: a custom state folds into "other".
    o.on_request([b"SETEX", b"celery-task-meta-" + tids[3].encode(), b"60", result("REVOKED", tids[3])], False)
    o.on_request([b"SETEX", b"celery-task-meta-" + tids[4].encode(), b"60", result("PROGRESS", tids[4])], False)
    t = o.tasks["app.t"]
    assert t.results == {"STARTED": 1, "SUCCESS": 2, "FAILURE": 1, "RETRY": 1, "REVOKED": 1, OTHER: 1}
    assert t.runtime.count == 4
    assert t.runtime.sum == pytest.approx(2.0 + 3.0 + 3.0 + 1.0)
    assert o.pending_tasks == 1  # tids[4] has no final state yet
    # A result key with the backend's own prefix; a non-JSON result (another serializer) is ignored.
    o.on_request([b"SETEX", b"tenantA:celery-task-meta-" + tids[4].encode(), b"60", result("SUCCESS", tids[4])], False)
    o.on_request([b"SETEX", b"celery-task-meta-x", b"60", b"\x82\xa6status\xa7SUCCESS"], False)
    # Another writer's key order: the status is still found (in the first STATUS_WINDOW bytes).
    tid5 = str(uuid.uuid4())
    o.on_request([b"LPUSH", b"celery", envelope(task="app.t", tid=tid5)], False)
    meta = json.dumps({"task_id": tid5, "result": 3, "status": "SUCCESS"}).encode()
    o.on_request([b"SETEX", b"celery-task-meta-" + tid5.encode(), b"60", meta], False)
    assert t.results["SUCCESS"] == 4
    o.on_request([b"SET", b"unacked_mutex", b"token", b"NX", b"PX", b"300000"], False)
    assert o.pending_tasks == 0
    assert UNKNOWN not in o.tasks  # the msgpack value and the mutex counted nowhere


def test_worker_heartbeats_go_offline_after_three_intervals() -> None:
    clock = Clock()
    o = Observer(clock=clock)

    def event(host: str, kind: str, freq: float = 2.0) -> bytes:
        body = json.dumps({"hostname": host, "freq": freq, "type": kind.replace(".", "-")}).encode()
        return json.dumps({"body": base64.b64encode(body).decode(), "content-encoding": "utf-8",
                           "headers": {"hostname": host},
                           "properties": {"delivery_info": {"exchange": "celeryev", "routing_key": kind},
                                          "body_encoding": "base64", "delivery_tag": "t"}}).encode()  # fmt: skip

    o.on_request([b"PUBLISH", b"/0.celeryev/worker.online", event("w1@h", "worker.online", 5.0)], False)
    o.on_request([b"PUBLISH", b"/0.celeryev/worker.heartbeat", event("w2@h", "worker.heartbeat")], False)
    # kombu without fanout_patterns publishes on the exchange's channel; the routing key names the event.
    o.on_request([b"PUBLISH", b"/0.celeryev", event("w3@h", "worker.heartbeat")], False)
    o.on_request([b"PUBLISH", b"/0.celeryev", event("w4@h", "task.succeeded")], False)
    o.on_request([b"PUBLISH", b"/0.celeryev/task.multi", event("w5@h", "task.multi")], False)
    o.on_request([b"PUBLISH", b"celery-task-meta-x", b"{}"], False)
    assert o.workers_online() == 3
    clock.now += 6.5  # past 3 x 2 s for w2 and w3, within 3 x 5 s for w1
    assert o.workers_online() == 1
    o.on_request([b"PUBLISH", b"/0.celeryev/worker.offline", event("w1@h", "worker.offline")], False)
    assert o.workers_online() == 0


def test_consumers_count_blocked_clients_per_queue() -> None:
    o = Observer()
    keys = [q + s for s in (b"", b"\x06\x163", b"\x06\x166", b"\x06\x169") for q in (b"celery", b"alpha", b"beta")]
    o.consumer_blocked(keys)
    o.consumer_blocked([b"alpha"])
    assert {q.name: q.consumers for q in o.queues.values()} == {"celery": 1, "alpha": 2, "beta": 1}
    o.consumer_unblocked(keys)
    o.consumer_unblocked([b"alpha"])
    o.consumer_unblocked([b"alpha"])  # never below zero
    assert {q.name: q.consumers for q in o.queues.values()} == {"celery": 0, "alpha": 0, "beta": 0}


def test_ten_thousand_queue_names_fold_into_other() -> None:
    o = Observer(max_queues=100, max_tasks=100)
    for i in range(10_000):
        key = b"q%05d" % i
        o.on_request([b"LPUSH", key, envelope(task=f"t{i}")], False)
        o.consumer_blocked([key])
        o.on_reply([b"BRPOP", key, b"1"], pop_reply(key, envelope(task=f"t{i}")))
        o.consumer_unblocked([key])
        o.on_reply([b"LPUSH", key, b"x"], b":1\r\n")
    assert len(o.queues) == 101 and OTHER in o.queues
    assert o.queues[OTHER].published == 9_900 and o.queues[OTHER].consumed == 9_900
    assert sum(q.published for q in o.queues.values()) == 10_000
    assert len(o.tasks) == 101 and o.tasks[OTHER].published == {OTHER: 9_900}
    pairs = {(t.name, q) for t in o.tasks.values() for q in t.published}
    assert len(pairs) <= 101 * 101
    # The bookkeeping behind the labels stays bounded too.
    assert len(o.queues_to_poll()) <= 16 * 100
    assert len(o._key_queues) <= observe_module.KEY_CACHE_MAX
    assert set(o.depths()) <= set(o.queues) - {OTHER}


def test_pairing_maps_are_bounded_in_size() -> None:
    clock = Clock()
    o = Observer(clock=clock, max_pending=10)
    msgs = [envelope() for _ in range(25)]
    for m in msgs:
        o.on_request([b"LPUSH", b"celery", m], False)
    assert o.pending_messages == 10 and o.pending_tasks == 10
    assert o.dropped == {"delivery_tag": 15, "task_id": 15}
    clock.now += 1
    for m in msgs:
        o.on_reply([b"BRPOP", b"celery", b"1"], pop_reply(b"celery", m))
    q = o.queues["celery"]
    assert q.consumed == 25  # counts stay exact
    assert q.wait.count == 10  # waits only for the pairs still held


def test_pairing_maps_are_bounded_in_age() -> None:
    # Every entry is kept at least pending_ttl after it was last touched and dropped by twice that, whatever the
    # pattern of pushes and sweeps.
    rng = random.Random(7)
    clock = Clock()
    ttl = 60.0
    o = Observer(clock=clock, pending_ttl=ttl)
    pushed: dict[str, tuple[float, bytes]] = {}
    for _ in range(400):
        clock.now += rng.choice((0.0, 0.5, 3.0, 17.0, 45.0))
        if rng.random() < 0.5:
            tag = str(uuid.uuid4())
            pushed[tag] = (clock.now, envelope(tag=tag))
            o.on_request([b"LPUSH", b"celery", pushed[tag][1]], False)
        else:
            o.sweep()
        held = {tag for tag in pushed if tag.encode() in o._tags or tag.encode() in o._tags_old}
        for tag, (at, _) in pushed.items():
            age = clock.now - at
            if age < ttl:
                assert tag in held, age
            if age > 2 * ttl:
                assert tag not in held, age
    assert o.dropped["delivery_tag"] == len(pushed) - o.pending_messages
    # A pop finds its push only while it is held.
    q = o.queues["celery"]
    for _, msg in pushed.values():
        o.on_reply([b"BRPOP", b"celery", b"1"], pop_reply(b"celery", msg))
    assert q.consumed == len(pushed) and q.wait.count == len(held)


def test_a_pop_keeps_its_task_id_alive_for_the_result() -> None:
    clock = Clock()
    o = Observer(clock=clock, pending_ttl=60.0)
    tid = str(uuid.uuid4())
    msg = envelope(tid=tid)
    o.on_request([b"LPUSH", b"celery", msg], False)
    clock.now += 50
    o.on_reply([b"BRPOP", b"celery", b"1"], pop_reply(b"celery", msg))
    for _ in range(5):  # prefetched: it starts 50 s after its pop
        clock.now += 10
        o.sweep()
    o.on_request([b"SETEX", b"celery-task-meta-" + tid.encode(), b"60", result("STARTED", tid)], False)
    for _ in range(5):  # and runs 50 s
        clock.now += 10
        o.sweep()
    # 150 s since the push, more than twice the bound, but the pop and STARTED touched it since.
    assert o.pending_tasks == 1
    o.on_request([b"SETEX", b"celery-task-meta-" + tid.encode(), b"60", result("SUCCESS", tid)], False)
    assert o.tasks["app.add"].results == {"STARTED": 1, "SUCCESS": 1}
    assert o.tasks["app.add"].runtime.sum == pytest.approx(50.0)  # from STARTED
    assert o.pending_tasks == 0 and o.dropped == {"delivery_tag": 0, "task_id": 0}
    # One left alone for more than twice the bound is dropped and counted; its result is then of an unknown task.
    tid2 = str(uuid.uuid4())
    o.on_request([b"LPUSH", b"celery", envelope(tid=tid2)], False)
    clock.now += 121
    o.sweep()
    clock.now += 1
    o.sweep()
    assert o.pending_tasks == 0 and o.dropped == {"delivery_tag": 1, "task_id": 1}
    o.on_request([b"SETEX", b"celery-task-meta-" + tid2.encode(), b"60", result("SUCCESS", tid2)], False)
    assert o.tasks[UNKNOWN].results == {"SUCCESS": 1}


def test_proxy_level_counters_and_label_bounds() -> None:
    o = Observer()
    o.acl_denied(None, "weird")
    o.command("get", "ok")
    o.command("get", "ok")
    o.command("frobnicate", "error")
    o.command("flushall", "denied")
    assert o.commands == {("get", "ok"): 2, ("unknown", "error"): 1, ("flushall", "denied"): 1}
    o.observe_command_duration("get", 0.0002)
    o.observe_command_duration("brpop", 1.0)  # blocking: a wait, not latency
    o.observe_command_duration("nosuch", 0.001)
    assert set(o.command_duration) == {"get", "unknown"}
    for i in range(100):
        o.connection_opened(f"listener{i}")
        o.acl_denied(f"user{i}", "key")
    assert len(o.client_connections_total) == observe_module.MAX_SMALL_LABELS + 1
    assert o.client_connections_total[OTHER] == 100 - observe_module.MAX_SMALL_LABELS
    assert len({u for u, _ in o.acl_denials}) == observe_module.MAX_SMALL_LABELS + 1  # the bound, and "other"
    o.connection_closed("listener0")
    o.connection_closed("listener0")
    assert o.client_connections["listener0"] == 0
    o.upstream_error("connect")
    o.upstream_error("something new")
    assert o.upstream_errors == {"connect": 1, OTHER: 1}
    assert o.acl_denials[("(none)", OTHER)] == 1
    assert o.acl_denials[(OTHER, "key")] == 100 - (observe_module.MAX_SMALL_LABELS - 1)
    o.protocol_error("client")
    o.auth_failed()
    o.requeue_failed(2)
    o.bytes_in += 10
    assert (o.protocol_errors["client"], o.auth_failures, o.requeue_failures, o.bytes_in) == (1, 1, 2, 10)


def test_command_labels_are_the_command_table() -> None:
    from brokerproxy.command_table import COMMANDS

    assert observe_module.KNOWN_COMMANDS == set(COMMANDS)
    o = Observer()
    for name in ("brpop", "evalsha", "client", "hello"):
        o.command(name, "ok")
    assert set(o.commands) == {(n, "ok") for n in ("brpop", "evalsha", "client", "hello")}


def test_every_watched_command_has_a_handler() -> None:
    o = Observer()
    for name in o.WATCH_REQUESTS:
        assert name.encode() in o._on_request and name.upper().encode() in o._on_request
    for name in o.WATCH_REPLIES:
        assert name.encode() in o._on_reply
    # Mixed case still reaches its handler.
    o.on_request([b"LPush", b"celery", envelope()], False)
    assert o.queues["celery"].published == 1


def test_histogram_bucket_edges() -> None:
    h = observe_module.Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 2.0, 3.0):
        h.observe(v)
    assert h.counts == [2, 2, 1]  # le=1 holds 1.0 itself, as Prometheus's le means
    assert h.count == 5 and h.sum == 8.0


def test_observe_imports_no_io() -> None:
    from tests.unit.test_layering import FORBIDDEN, NOT_FROM_SANS_IO, imported_modules

    names = imported_modules("observe")
    assert {n for n in names if n.split(".")[0] in FORBIDDEN} == set()
    assert {n.split(".")[1] for n in names if n.startswith("brokerproxy.")} & NOT_FROM_SANS_IO == set()
