"""Celery-aware observation of the traffic that passes: the numbers behind every metric, kept as plain counters.

Theory of operation
-------------------
One ``Observer`` per process. The sessions call it synchronously on the hot path; the metrics collector
(``metrics.py``) reads its counters when Prometheus scrapes. Nothing here does IO, imports prometheus_client, or
parses a whole message: every hot-path update is a few bounded ``find``s and dict increments.

What the session hands in:

* requests whose lower-cased name is in ``WATCH_REQUESTS`` (one set lookup per request decides), to
  ``on_request(args, in_multi)``, inside a transaction or not (kombu pushes inside ``MULTI`` for queues with an
  expiry, and its restores are ``WATCH``/``MULTI``/``RPUSH``/``EXEC``):

  - ``LPUSH``/``RPUSH`` of a kombu envelope: *published* (and *redelivered* when kombu's restore marked it) per
    queue, *tasks published* per task and queue, the message size; the pairing maps remember
    ``delivery_tag -> (queue, task, push time, task id)`` and ``task id -> (task, start time)``;
  - ``SET``/``SETEX``/``PSETEX`` of ``[prefix]celery-task-meta-<id>``: a *task result* by state, the task name
    looked up by id, and the *runtime* from the start (the pop, or ``STARTED`` when the worker reports it, which is
    later and closer to the real start) to ``SUCCESS``/``FAILURE``/``RETRY`` (a retry ends one attempt);
  - ``PUBLISH`` to ``[prefix]/<db>.celeryev/worker.heartbeat|online|offline``: *workers online*;

* replies to commands in ``WATCH_REPLIES``, to ``on_reply(args, raw)``: a pop's element is *consumed* from its
  queue, its *wait* is the time since this process saw it pushed (paired by ``delivery_tag``), and its pop time
  starts the task's runtime clock; a push's integer reply is the length of that sub-queue (its *depth*);
* ``consumer_blocked``/``consumer_unblocked`` around blocking pops, ``requeued`` from the loss guard, ``set_depth``
  from the periodic ``LLEN`` poller (over ``queues_to_poll()``);
* the proxy-level counters (connections, commands by outcome, bytes, errors) are public ints and dicts that the
  asyncio layer bumps directly, or through the small methods below that fold unbounded values into bounded labels.

What counts as a message (decided, and in the README): only **kombu envelopes** count as published or consumed,
i.e. a JSON object whose ``properties`` carry a ``delivery_tag``, which every kombu Redis publish has. A plain
string pushed onto some list (an application's own list on a shared Redis, a ``redis-cli LPUSH``) is not a queue
message: counting it would spend the label budget on keys that are not queues. ``LLEN`` still sees it, so it shows
in the depth. Only envelopes with ``headers.task`` (Celery protocol 2) count as tasks. The keys of a blocking pop
are queues too (a consumer waits on them): they get labels when they first appear. kombu's remote-control reply
queues (``<uuid>.reply.celery.pidbox``, one new name per ``celery inspect``) are left out of every queue metric.
Results count only with Celery's JSON result serializer (its default); other serializers are not read.

Queue name = the key minus ``key_prefix`` (kombu's ``global_keyprefix``) minus the priority suffix ``\\x06\\x16N``.
The first ``max_queues`` names get their own label, later ones fold into ``other`` (likewise ``max_tasks``); a
name, once labelled, keeps its label (a queue really named ``other`` shares the fold's series). Depth is kept for
labelled queues only, as the sum over their sub-queues (kombu's default priority steps 3, 6, 9 from the start, and
any other suffix once seen): the depth of ``other`` would need an ``LLEN`` of every folded key. A push's reply sets
its sub-queue's length, a pop takes one off, a requeue adds its count, and the poller's ``LLEN`` overrides them all.

Pairing degrades gracefully: counts stay exact whatever this process saw, but a wait is observed only when this
process saw both the push and the pop, and a runtime only when it saw the start and the result. The pairing maps
are bounded in size and age, and what they drop is counted in ``dropped`` (where producers and consumers use
different proxy processes, the producer's entries all end up there: it never sees their pops). Each map is two
generations of plain dicts: new entries go into the young one; every ``pending_ttl`` seconds, or when the young one
holds ``max_pending / 2`` entries, the old generation is dropped and the young one becomes old. So an entry is kept
at least ``pending_ttl`` after it was last touched (pushed, popped, STARTED) unless the size bound pushes it out,
at most twice that, and a map never holds more than ``max_pending``. (Cheaper on the hot path than an ordered dict
swept entry by entry.)

Known limit: a push inside a transaction that is then discarded (``EXEC`` failing after ``WATCH``) was counted when
it was queued; the observer does not see ``EXEC``'s reply.

Not thread-safe: one event loop calls it, and the scrape runs on that same loop.
"""

from __future__ import annotations

import binascii
import re
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Final, Literal

from . import resp
from .command_table import COMMANDS
from .commands import BLOCKING

OTHER: Final = "other"  # label of everything past the label bounds
UNKNOWN: Final = "unknown"  # command outside the table; task whose name this process never saw

# ---------------------------------------------------------------------------------------------------- limits
#: Messages are scanned only in their last this-many bytes: kombu writes ``headers`` and ``properties`` after the
#: body, and Celery caps ``argsrepr``/``kwargsrepr`` at 1 KiB each, so the fields sit in the tail (a few KiB at
#: most). A message whose headers are larger still counts (the tag is at the very end); only its task name is then
#: not found. This bounds the worst case (a miss scans the whole window) to some microseconds.
TAIL_WINDOW = 16 * 1024
#: ``"status"`` is the first key of Celery's result meta; it is looked for in the first this-many bytes only.
STATUS_WINDOW = 1024
#: kombu's restore marks ``properties.delivery_info.redelivered``. kombu adds ``delivery_info`` after the caller's
#: properties and then only ``priority``, ``body_encoding`` and ``delivery_tag``, so the flag ends some 60-80 bytes
#: before the tag: it is looked for in this many bytes in front of ``"delivery_tag"`` (the scan costs per byte).
REDELIVERED_WINDOW = 160
#: The task name is looked for by a regular expression, which scans slower than ``bytes.find``: over at most this
#: many bytes in front of the tag directly, and in a longer message from ``"headers"`` on (found by ``rfind``
#: from the tag backwards, past the properties), so that a large body is never scanned.
DIRECT_SCAN = 2048
#: Longest identifier (tag, task id, task name, hostname) taken from a message.
MAX_FIELD_LENGTH = 256
#: A queue or task name longer than this folds into ``other`` (a label value, not a payload).
MAX_LABEL_LENGTH = 200
#: Cache of raw key -> queue (and raw task name -> task); beyond this many entries, computed each time.
KEY_CACHE_MAX = 8192
#: Sub-queue keys remembered for the depth poller, per labelled queue on average.
SUBQUEUES_PER_QUEUE = 16
#: kombu's default priority steps: every labelled queue's depth covers these sub-queues from the start.
DEFAULT_PRIORITY_STEPS = (b"3", b"6", b"9")
PRIORITY_SEP = b"\x06\x16"
#: Workers remembered for the online count (hostnames; each worker sends a heartbeat every ``freq`` seconds).
MAX_WORKERS = 10_000
#: A worker that missed this many heartbeat intervals is offline (Celery's own rule for its event state).
HEARTBEAT_MISSES = 3
DEFAULT_HEARTBEAT_FREQ = 2.0
#: Distinct listeners, ACL users and upstream error reasons with their own label.
MAX_SMALL_LABELS = 32

#: Queues left out of every queue metric: kombu remote-control reply queues (a fresh uuid per ``inspect``).
EXCLUDED_QUEUE_SUFFIXES = (b".reply.celery.pidbox",)

# Histogram bucket bounds (upper bounds, seconds or bytes). metrics.py exports them as they are.
#: Push to pop, and task runtime: from milliseconds to a day (Airflow's visibility timeout).
WAIT_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
)  # fmt: skip
RUNTIME_BUCKETS: Final = WAIT_BUCKETS
#: Message sizes: 128 B to 64 MiB.
SIZE_BUCKETS: Final = (
    128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
)  # fmt: skip
#: Upstream round trip of one command: 100 µs to 10 s.
DURATION_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: Task result states with a label of their own; anything else (custom states) is ``other``.
RESULT_STATES: Final = ("SUCCESS", "FAILURE", "RETRY", "REVOKED", "STARTED")
_STATE_LABELS = {s.encode(): s for s in RESULT_STATES}
_ENDS_ATTEMPT = frozenset({"SUCCESS", "FAILURE", "RETRY"})  # runtime observed
_FINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED"})  # task id forgotten

Outcome = Literal["ok", "error", "denied"]
OUTCOMES: Final = ("ok", "error", "denied")
Side = Literal["client", "upstream"]
#: Upstream error reasons with a label; others fold into ``other``.
UPSTREAM_ERROR_REASONS: Final = frozenset(
    {"connect", "timeout", "closed", "reset", "protocol", "auth", "readonly", "unblocked", "tls", "failover", "other"}
)
#: ACL denial kinds (what was refused).
ACL_KINDS: Final = frozenset({"command", "key", "channel", "other"})

#: Commands with a ``command`` label of their own: the names in the command table (Redis's own ``COMMAND INFO``);
#: anything else counts as ``unknown``.
KNOWN_COMMANDS: frozenset[str] = frozenset(COMMANDS)

# Bounded-scan needles: kombu and Celery write JSON with json.dumps' default separators.
_TAG = b'"delivery_tag": "'
_REDELIVERED = b'"redelivered": true'
_STATUS = b'"status": "'
_HEADERS = b'"headers": {'
_META_START = b'{"status": "'
_HOSTNAME = b'"hostname": "'
_ROUTING_KEY = b'"routing_key": "'
_BODY = b'{"body": "'
_BASE64 = b'"body_encoding": "base64"'
_FREQ = b'"freq": '
_RESULT_KEY = b"celery-task-meta-"
_WORKER_CHANNELS = (b"worker.heartbeat", b"worker.online", b"worker.offline", b".celeryev")


class Histogram:
    """Bucket counts of one series, not cumulative (``counts[i]`` holds values in (bounds[i-1], bounds[i]], the
    last one those above every bound). metrics.py makes them cumulative at scrape time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class QueueStats:
    """Every per-queue series of one queue label."""

    __slots__ = ("consumed", "consumers", "name", "published", "redelivered", "requeued", "sizes", "wait")

    def __init__(self, name: str) -> None:
        self.name = name
        self.published = 0
        self.redelivered = 0
        self.consumed = 0
        self.requeued = 0
        self.consumers = 0  # gauge: clients blocked in a pop on this queue
        self.sizes = Histogram(SIZE_BUCKETS)
        self.wait = Histogram(WAIT_BUCKETS)


class TaskStats:
    """Every per-task series of one task label."""

    __slots__ = ("name", "published", "results", "runtime")

    def __init__(self, name: str) -> None:
        self.name = name
        self.published: dict[str, int] = {}  # by queue label
        self.results: dict[str, int] = {}  # by state
        self.runtime = Histogram(RUNTIME_BUCKETS)


class _Task:
    """What the task id map keeps per task id."""

    __slots__ = ("start", "stats")

    def __init__(self, stats: TaskStats) -> None:
        self.stats = stats
        self.start = -1.0  # start of the running attempt (pop or STARTED); -1 when none


_Pending = tuple[QueueStats, TaskStats | None, float, bytes]

#: Stands for an excluded queue in the key cache (never exported).
_EXCLUDED = QueueStats("")
_TAG_LEN = len(_TAG)
#: headers.task and headers.id of a Celery protocol-2 message (one search finds both; a compiled pattern with a
#: literal prefix costs half of four ``find``s).
_TASK_ID = re.compile(rb'"task": "([^"]{1,%d})", "id": "([^"]{1,%d})"' % (MAX_FIELD_LENGTH, MAX_FIELD_LENGTH))


def _field(buf: bytes, needle: bytes, lo: int, hi: int) -> bytes | None:
    """The JSON string value after ``needle`` (which ends with the opening quote) in buf[lo:hi], or None."""
    i = buf.find(needle, lo, hi)
    if i < 0:
        return None
    start = i + len(needle)
    end = buf.find(b'"', start, min(hi, start + MAX_FIELD_LENGTH + 1))
    if end < 0:
        return None
    return buf[start:end]


class Observer:
    """Process-wide counters derived from the traffic. See the module docstring."""

    #: Requests the session must hand to ``on_request`` (lower-case command names).
    WATCH_REQUESTS: frozenset[str] = frozenset(
        {"lpush", "rpush", "lpushx", "rpushx", "set", "setex", "psetex", "publish"}
    )
    #: Commands whose replies the session must hand to ``on_reply``: pops, moves (consumed from their source) and
    #: pushes (their integer reply is the sub-queue's length).
    WATCH_REPLIES: frozenset[str] = frozenset(
        {"brpop", "blpop", "rpop", "lpop", "lmpop", "blmpop", "brpoplpush", "rpoplpush", "lmove", "blmove",
         "lpush", "rpush", "lpushx", "rpushx"}
    )  # fmt: skip

    def __init__(
        self,
        max_queues: int = 100,
        max_tasks: int = 100,
        key_prefix: bytes = b"",
        clock: Callable[[], float] = time.monotonic,
        max_pending: int = 100_000,
        pending_ttl: float = 86400.0,
    ) -> None:
        self.max_queues = max_queues
        self.max_tasks = max_tasks
        self.key_prefix = key_prefix
        self._clock = clock
        self.max_pending = max_pending
        self.pending_ttl = pending_ttl

        # --- per-queue and per-task series, read by metrics.py: labelled ones, then "other" once used
        self.queues: dict[str, QueueStats] = {}
        self.tasks: dict[str, TaskStats] = {}
        self._named_queues = 0
        self._named_tasks = 0
        self._key_queues: dict[bytes, QueueStats] = {}  # raw key -> its queue (_EXCLUDED for excluded ones)
        self._task_names: dict[bytes, TaskStats] = {}  # raw task name -> its task
        self._subqueues: dict[bytes, QueueStats] = {}  # sub-queue key (as stored in Redis) -> labelled queue
        self._subdepth: dict[bytes, int] = {}  # sub-queue key -> last known length
        #: Pairing entries dropped by the bounds, by map.
        self.dropped: dict[str, int] = {"delivery_tag": 0, "task_id": 0}

        # --- pairing maps, two generations each (see the module docstring)
        # delivery_tag -> (queue, task or None, push time, task id or b"")
        self._tags: dict[bytes, _Pending] = {}
        self._tags_old: dict[bytes, _Pending] = {}
        self._ids: dict[bytes, _Task] = {}
        self._ids_old: dict[bytes, _Task] = {}
        self._generation_size = max(1, max_pending // 2)
        self._generation_start = clock()
        # Blocking pops' key lists -> their distinct queues (kombu re-sends the same few lists every second).
        self._key_sets: dict[tuple[bytes, ...], tuple[QueueStats, ...]] = {}
        # hostname -> (last event time, heartbeat frequency)
        self._workers: dict[bytes, tuple[float, float]] = {}

        # --- proxy-level counters, bumped directly by the asyncio layer
        self.client_connections: dict[str, int] = {}  # gauge, by listener
        self.client_connections_total: dict[str, int] = {}
        self.commands: dict[tuple[str, str], int] = {}  # (command, outcome)
        self.command_duration: dict[str, Histogram] = {}
        self.bytes_in = 0  # client -> proxy
        self.bytes_out = 0  # proxy -> client
        self.upstream_connections = 0  # gauge
        self.upstream_up = 0  # gauge: 1 while the upstream answers
        self.upstream_errors: dict[str, int] = {}
        self.protocol_errors: dict[str, int] = {"client": 0, "upstream": 0}
        self.auth_failures = 0
        self.reload_failures = 0
        self.acl_denials: dict[tuple[str, str], int] = {}  # (user, kind)
        self.requeue_failures = 0
        self.client_rejections: dict[str, int] = {}  # reason: max_clients
        self.output_limit_disconnects: dict[str, int] = {}  # class: normal, pubsub
        self.idle_disconnects = 0
        self.reattached_total: dict[str, int] = {}  # state: idle, blocked_pop
        self.reattach_failures: dict[str, int] = {}  # reason: pending, multi, watch, subscribed...
        self.reattach_resets: dict[str, int] = {}  # state: subscribed, blocked_pop
        self.audit_written = 0  # copied from the audit trail at scrape time (server)
        self.audit_dropped = 0
        self.tls_handshake_failures: dict[tuple[str, str], int] = {}  # (listener, reason)
        self.tls_reloads: dict[tuple[str, str], int] = {}  # (listener, "ok" | "failed")
        self.tls_expiry: dict[tuple[str, str], float] = {}  # (listener, role) -> notAfter, Unix seconds
        self._acl_users: set[str] = set()
        self._known_commands = KNOWN_COMMANDS

        self._on_request: dict[bytes, Callable[[list[bytes]], None]] = {}
        self._on_reply: dict[bytes, Callable[[list[bytes], bytes], None]] = {}
        for name, handler in (
            (b"lpush", self._push), (b"rpush", self._push), (b"lpushx", self._push), (b"rpushx", self._push),
            (b"set", self._set), (b"setex", self._setex), (b"psetex", self._setex), (b"publish", self._publish),
        ):  # fmt: skip
            self._on_request[name] = handler
            self._on_request[name.upper()] = handler
        for name, reply_handler in (
            (b"brpop", self._key_element_reply), (b"blpop", self._key_element_reply),
            (b"lpush", self._push_reply), (b"rpush", self._push_reply),
            (b"lpushx", self._push_reply), (b"rpushx", self._push_reply),
        ):  # fmt: skip
            self._on_reply[name] = reply_handler
            self._on_reply[name.upper()] = reply_handler
        for name in (b"rpop", b"lpop", b"lmpop", b"blmpop", b"brpoplpush", b"rpoplpush", b"lmove", b"blmove"):
            self._on_reply[name] = self._other_pop_reply
            self._on_reply[name.upper()] = self._other_pop_reply

    # ================================================================================ hot path: requests

    def on_request(self, args: list[bytes], in_multi: bool) -> None:
        """A request whose name is in ``WATCH_REQUESTS``. ``in_multi``: queued inside MULTI (counted all the same:
        kombu pushes inside transactions, and its restores are WATCH/MULTI/EXEC)."""
        handler = self._on_request.get(args[0]) or self._on_request.get(args[0].lower())
        if handler is not None:
            handler(args)

    def _push(self, args: list[bytes]) -> None:
        if len(args) < 3:
            return
        key = args[1]
        queue: QueueStats | None = None
        now = 0.0
        for msg in args[2:]:
            n = len(msg)
            # A kombu envelope is a JSON object whose last field is properties.delivery_tag.
            if n < 2 or msg[0] != 0x7B or msg[n - 1] != 0x7D:
                continue
            lo = n - TAIL_WINDOW if n > TAIL_WINDOW else 0
            t = msg.rfind(_TAG, lo)
            if t < 0:
                continue
            end = msg.find(b'"', t + _TAG_LEN, t + _TAG_LEN + MAX_FIELD_LENGTH)
            if end < 0:
                continue
            if queue is None:
                queue = self._key_queues.get(key) or self._queue_of(key)
                if queue is _EXCLUDED:
                    return
                now = self._clock()
                if now - self._generation_start >= self.pending_ttl:
                    self._age(now)
            queue.published += 1
            redelivered = msg.find(_REDELIVERED, t - REDELIVERED_WINDOW if t - lo > REDELIVERED_WINDOW else lo, t) >= 0
            if redelivered:
                queue.redelivered += 1
            sizes = queue.sizes
            sizes.counts[bisect_left(SIZE_BUCKETS, n)] += 1
            sizes.sum += n

            # headers.task and headers.id, which Celery writes side by side. The body before them is a base64
            # string, and a quote inside any JSON string is escaped, so the first match is the header.
            task: TaskStats | None = None
            tid = b""
            h = lo if t - lo <= DIRECT_SCAN else msg.rfind(_HEADERS, lo, t)
            found = _TASK_ID.search(msg, h, t) if h >= 0 else None
            if found is not None:
                name, tid = found.groups()
                task = self._task_names.get(name) or self._task_of(name)
                published = task.published
                published[queue.name] = published.get(queue.name, 0) + 1
                entry = self._ids.get(tid) or self._ids_old.pop(tid, None)
                if entry is None:
                    if len(self._ids) >= self._generation_size:
                        self._age_ids()
                    self._ids[tid] = _Task(task)
                else:
                    # Published again (a retry, an Airflow re-send): keep the running attempt's start for its
                    # RETRY result.
                    entry.stats = task
                    self._ids[tid] = entry

            tags = self._tags
            if len(tags) >= self._generation_size:
                self._age_tags()
                tags = self._tags
            tag = msg[t + _TAG_LEN : end]
            if redelivered:
                self._tags_old.pop(tag, None)  # a restore re-pushes the same tag: only the latest push counts
            tags[tag] = (queue, task, now, tid)

    def _set(self, args: list[bytes]) -> None:
        if len(args) >= 3:  # SET key value [EX s | PX ms | ...]
            self._result(args[1], args[2])

    def _setex(self, args: list[bytes]) -> None:
        if len(args) >= 4:  # SETEX key seconds value / PSETEX key ms value
            self._result(args[1], args[3])

    def _result(self, key: bytes, value: bytes) -> None:
        i = key.find(_RESULT_KEY)
        if i < 0:
            return
        if value.startswith(_META_START):  # Celery writes the status first: read it in place
            end = value.find(b'"', len(_META_START), len(_META_START) + 32)
            status = value[len(_META_START) : end] if end > 0 else None
        else:
            status = _field(value, _STATUS, 0, min(len(value), STATUS_WINDOW))
        if status is None:
            return  # not Celery's JSON result meta (another serializer, or not a result at all)
        state = _STATE_LABELS.get(status, OTHER)
        tid = key[i + len(_RESULT_KEY) :]
        ids = self._ids
        entry = ids.get(tid)
        if entry is None:
            entry = self._ids_old.pop(tid, None)
            if entry is not None:
                ids[tid] = entry  # touched: into the young generation
        task = self._unknown_task() if entry is None else entry.stats
        task.results[state] = task.results.get(state, 0) + 1
        if entry is None:
            return
        now = self._clock()
        if state == "STARTED":
            entry.start = now
            return
        if state in _ENDS_ATTEMPT:
            if entry.start >= 0.0:
                task.runtime.observe(max(0.0, now - entry.start))
            entry.start = -1.0
        if state in _FINAL:
            del ids[tid]

    def _publish(self, args: list[bytes]) -> None:
        if len(args) < 3:
            return
        channel = args[1]
        if not channel.endswith(_WORKER_CHANNELS) or b"celeryev" not in channel:
            return
        msg = args[2]
        n = len(msg)
        lo = n - TAIL_WINDOW if n > TAIL_WINDOW else 0
        if channel.endswith(b".celeryev"):  # kombu without fanout_patterns: the event type is the routing key
            kind = _field(msg, _ROUTING_KEY, lo, n)
            if kind is None or not kind.startswith(b"worker."):
                return
        else:
            kind = channel[channel.rfind(b"worker.") :]
        host = _field(msg, _HOSTNAME, lo, n)
        body = self._event_body(msg)
        if host is None and body is not None:
            host = _field(body, _HOSTNAME, 0, len(body))
        if not host:
            return
        workers = self._workers
        if kind == b"worker.offline":
            workers.pop(host, None)
            return
        freq = DEFAULT_HEARTBEAT_FREQ
        if body is not None:
            i = body.find(_FREQ)
            if i >= 0:
                start = stop = i + len(_FREQ)
                while stop < len(body) and stop - start < 32 and body[stop] not in b",}":
                    stop += 1
                try:
                    freq = float(body[start:stop]) or DEFAULT_HEARTBEAT_FREQ
                except ValueError:
                    pass
        now = self._clock()
        if host not in workers and len(workers) >= MAX_WORKERS:
            self._expire_workers(now)
            if len(workers) >= MAX_WORKERS:
                return
        workers[host] = (now, freq)

    @staticmethod
    def _event_body(msg: bytes) -> bytes | None:
        """The decoded body of a kombu event envelope (base64, a few hundred bytes), or None."""
        if not msg.startswith(_BODY) or msg.find(_BASE64) < 0:
            return None
        end = msg.find(b'"', len(_BODY))
        if end < 0:
            return None
        try:
            return binascii.a2b_base64(msg[len(_BODY) : end])
        except (binascii.Error, ValueError):
            return None

    # ================================================================================ hot path: replies

    def on_reply(self, args: list[bytes], raw: bytes) -> None:
        """The reply ``raw`` (one framed RESP2/RESP3 reply) to ``args``, a command in ``WATCH_REPLIES``."""
        handler = self._on_reply.get(args[0]) or self._on_reply.get(args[0].lower())
        if handler is not None:
            handler(args, raw)

    def _push_reply(self, args: list[bytes], raw: bytes) -> None:
        if raw[:1] != b":" or len(args) < 2:
            return  # an error, or +QUEUED inside MULTI
        key = args[1]
        if key in self._subqueues:
            try:
                self._subdepth[key] = int(raw[1:-2])
            except ValueError:
                pass

    def _key_element_reply(self, args: list[bytes], raw: bytes) -> None:
        """BRPOP/BLPOP: ``*2 $key $element`` (the same in RESP2 and RESP3), read in place."""
        if not raw.startswith(b"*2\r\n$"):
            if raw[:1] in (b"*", b"|"):  # something unusual (an attribute): the exact decoder
                self._other_pop_reply(args, raw)
            return  # null (timeout), error, +QUEUED
        try:
            nl = raw.index(b"\r\n", 5)
            ks = nl + 2
            ke = ks + int(raw[5:nl])
            nl = raw.index(b"\r\n", ke + 3)
            me = nl + 2 + int(raw[ke + 3 : nl])
        except ValueError:
            return
        if me + 2 != len(raw) or raw[ke : ke + 3] != b"\r\n$":
            return
        self._consumed(raw[ks:ke], raw, nl + 2, me)

    def _other_pop_reply(self, args: list[bytes], raw: bytes) -> None:
        """The rarer pops, decoded exactly: RPOP/LPOP [count], LMPOP/BLMPOP, and the moves."""
        if raw[:1] in (b"-", b"!", b"_", b"+") or raw in (b"$-1\r\n", b"*-1\r\n"):
            return
        try:
            value = resp.decode(raw)
        except Exception:  # a malformed reply is the session's business, not the observer's
            return
        name = args[0].lower()
        key: object
        items: object
        if name in (b"brpop", b"blpop", b"lmpop", b"blmpop"):  # [key, element] / [key, [elements]]
            if not (isinstance(value, list) and len(value) == 2):
                return
            key, items = value
            if not isinstance(items, list):
                items = [items]
        else:  # RPOP/LPOP key [count], and the moves: the source key is the first argument
            if len(args) < 2:
                return
            key = args[1]
            items = value if isinstance(value, list) else [value]
        if not isinstance(key, bytes):
            return
        for element in items:
            if isinstance(element, bytes):
                self._consumed(key, element, 0, len(element))

    def _consumed(self, key: bytes, buf: bytes, lo: int, hi: int) -> None:
        """One element popped from ``key``; it is ``buf[lo:hi]`` (not copied out of the reply)."""
        depth = self._subdepth.get(key)
        if depth:
            self._subdepth[key] = depth - 1
        if hi - lo < 2 or buf[lo] != 0x7B or buf[hi - 1] != 0x7D:
            return
        tail = hi - TAIL_WINDOW if hi - lo > TAIL_WINDOW else lo
        t = buf.rfind(_TAG, tail, hi)
        if t < 0:
            return
        end = buf.find(b'"', t + _TAG_LEN, t + _TAG_LEN + MAX_FIELD_LENGTH)
        if end < 0:
            return
        queue = self._key_queues.get(key) or self._queue_of(key)
        if queue is _EXCLUDED:
            return
        queue.consumed += 1
        now = self._clock()
        if now - self._generation_start >= self.pending_ttl:
            self._age(now)
        tag = buf[t + _TAG_LEN : end]
        entry = self._tags.pop(tag, None) or self._tags_old.pop(tag, None)
        if entry is not None:
            wait = now - entry[2]
            hist = queue.wait
            hist.counts[bisect_left(WAIT_BUCKETS, wait)] += 1
            hist.sum += wait
            tid = entry[3]
            if not tid:
                return
            task = entry[1]
        else:
            # Pushed through another process (or before this one started): learn the task from the message, so
            # that its result gets a name and a runtime here.
            h = tail if t - tail <= DIRECT_SCAN else buf.rfind(_HEADERS, tail, t)
            found = _TASK_ID.search(buf, h, t) if h >= 0 else None
            if found is None:
                return
            name, tid = found.groups()
            task = self._task_names.get(name) or self._task_of(name)
        ids = self._ids
        known = ids.get(tid)
        if known is None:
            known = self._ids_old.pop(tid, None)
            if known is None:
                if task is None:
                    return
                if len(ids) >= self._generation_size:
                    self._age_ids()
                    ids = self._ids
                known = _Task(task)
            ids[tid] = known
        known.start = now

    # ================================================================================ consumers, depth, requeues

    def _queues_of(self, keys: list[bytes]) -> tuple[QueueStats, ...]:
        """The distinct queues among a blocking pop's keys (cached: workers repeat the same few lists)."""
        ident = tuple(keys)
        queues = self._key_sets.get(ident)
        if queues is None:
            found: dict[QueueStats, None] = {}
            cache = self._key_queues
            for key in keys:
                queue = cache.get(key) or self._queue_of(key)
                if queue is not _EXCLUDED:
                    found[queue] = None
            queues = tuple(found)
            if len(self._key_sets) < KEY_CACHE_MAX:
                self._key_sets[ident] = queues
        return queues

    def consumer_blocked(self, keys: list[bytes]) -> None:
        """A client is now blocked in a pop on ``keys`` (one count per distinct queue among them)."""
        for queue in self._queues_of(keys):
            queue.consumers += 1

    def consumer_unblocked(self, keys: list[bytes]) -> None:
        """The pop that ``consumer_blocked(keys)`` announced has ended (reply, timeout, or connection gone)."""
        for queue in self._queues_of(keys):
            if queue.consumers > 0:
                queue.consumers -= 1

    def requeued(self, key: bytes, count: int) -> None:
        """The loss guard put ``count`` popped elements back on ``key``."""
        queue = self._queue_of(key)
        if queue is _EXCLUDED:
            return
        queue.requeued += count
        if key in self._subdepth:
            self._subdepth[key] += count

    def set_depth(self, queue_key: bytes, length: int) -> None:
        """``LLEN queue_key`` as the poller read it (``queue_key`` from ``queues_to_poll()``)."""
        if queue_key in self._subqueues:
            self._subdepth[queue_key] = length

    def queues_to_poll(self) -> list[bytes]:
        """Every sub-queue key of every labelled queue: the keys as stored in Redis, prefix and suffix included."""
        return list(self._subqueues)

    def depths(self) -> dict[str, int]:
        """Queue depth per labelled queue: the sum of the known lengths of its sub-queues."""
        out: dict[str, int] = {}
        sub = self._subdepth
        for key, queue in self._subqueues.items():
            d = sub.get(key)
            if d is not None:
                out[queue.name] = out.get(queue.name, 0) + d
        return out

    # ================================================================================ workers

    def workers_online(self) -> int:
        """Workers whose last event is younger than ``HEARTBEAT_MISSES`` heartbeat intervals."""
        self._expire_workers(self._clock())
        return len(self._workers)

    def _expire_workers(self, now: float) -> None:
        gone = [h for h, (seen, freq) in self._workers.items() if now - seen > HEARTBEAT_MISSES * freq]
        for h in gone:
            del self._workers[h]

    # ================================================================================ labels

    def _queue_of(self, key: bytes) -> QueueStats:
        """The queue of a list key (``_EXCLUDED`` for an excluded queue, ``other`` past the bound)."""
        queue = self._key_queues.get(key)
        if queue is not None:
            return queue
        prefix = self.key_prefix
        name = key
        used_prefix = b""
        if prefix and name.startswith(prefix):
            name = name[len(prefix) :]
            used_prefix = prefix
        i = name.rfind(PRIORITY_SEP)
        if i >= 0 and name[i + 2 :].isdigit():
            name = name[:i]
        if not name or name.endswith(EXCLUDED_QUEUE_SUFFIXES):
            queue = _EXCLUDED
        else:
            text = name.decode("utf-8", "replace")
            found = self.queues.get(text)
            if found is not None:
                queue = found  # a queue really named "other" shares the fold's series
            elif text != OTHER and self._named_queues < self.max_queues and len(text) <= MAX_LABEL_LENGTH:
                queue = self.queues[text] = QueueStats(text)
                self._named_queues += 1
                base = used_prefix + name
                self._add_subqueue(base, queue)
                for step in DEFAULT_PRIORITY_STEPS:
                    self._add_subqueue(base + PRIORITY_SEP + step, queue)
            else:
                queue = self._fold_queue()
            if queue.name != OTHER:
                self._add_subqueue(key, queue)
        if len(self._key_queues) < KEY_CACHE_MAX:
            self._key_queues[key] = queue
        return queue

    def _fold_queue(self) -> QueueStats:
        queue = self.queues.get(OTHER)
        if queue is None:
            queue = self.queues[OTHER] = QueueStats(OTHER)
        return queue

    def _add_subqueue(self, key: bytes, queue: QueueStats) -> None:
        subqueues = self._subqueues
        if key not in subqueues and len(subqueues) < SUBQUEUES_PER_QUEUE * max(1, self.max_queues):
            subqueues[key] = queue

    def _task_of(self, name: bytes) -> TaskStats:
        task = self._task_names.get(name)
        if task is not None:
            return task
        text = name.decode("utf-8", "replace")
        task = self.tasks.get(text)
        if task is None:
            if text not in (OTHER, UNKNOWN) and self._named_tasks < self.max_tasks and len(text) <= MAX_LABEL_LENGTH:
                task = self.tasks[text] = TaskStats(text)
                self._named_tasks += 1
            else:
                task = self._special_task(OTHER)
        if len(self._task_names) < KEY_CACHE_MAX:
            self._task_names[name] = task
        return task

    def _special_task(self, name: str) -> TaskStats:
        task = self.tasks.get(name)
        if task is None:
            task = self.tasks[name] = TaskStats(name)
        return task

    def _unknown_task(self) -> TaskStats:
        """Results of task ids this process never saw published or popped."""
        return self._special_task(UNKNOWN)

    # ================================================================================ pairing maps

    def _age(self, now: float) -> None:
        """pending_ttl has passed since the young generations started: age both maps. Generations start on a grid
        of pending_ttl, so that sparse calls do not stretch the bound; after a long quiet spell both go."""
        ttl = self.pending_ttl
        due = int((now - self._generation_start) // ttl) if ttl > 0 else 2
        self._age_tags()
        self._age_ids()
        if due >= 2:
            self._age_tags()
            self._age_ids()
        self._generation_start = self._generation_start + due * ttl if ttl > 0 else now

    def _age_tags(self) -> None:
        self.dropped["delivery_tag"] += len(self._tags_old)
        self._tags_old = self._tags
        self._tags = {}

    def _age_ids(self) -> None:
        self.dropped["task_id"] += len(self._ids_old)
        self._ids_old = self._ids
        self._ids = {}

    def sweep(self) -> None:
        """Age the pairing maps if their time has come (the hot path does it too; the server calls this on its
        polling interval so that an idle proxy lets go of old entries as well)."""
        now = self._clock()
        if now - self._generation_start >= self.pending_ttl:
            self._age(now)

    @property
    def pending_messages(self) -> int:
        """Pushed messages waiting for their pop (the delivery_tag map's size)."""
        return len(self._tags) + len(self._tags_old)

    @property
    def pending_tasks(self) -> int:
        """Task ids remembered for their result (the task id map's size)."""
        return len(self._ids) + len(self._ids_old)

    # ================================================================================ proxy-level counters

    def connection_opened(self, listener: str = "main") -> None:
        listener = self._small_label(self.client_connections_total, listener)
        self.client_connections[listener] = self.client_connections.get(listener, 0) + 1
        self.client_connections_total[listener] = self.client_connections_total.get(listener, 0) + 1

    def connection_closed(self, listener: str = "main") -> None:
        listener = self._small_label(self.client_connections_total, listener)
        n = self.client_connections.get(listener, 0)
        self.client_connections[listener] = n - 1 if n > 0 else 0

    def command(self, name: str, outcome: Outcome) -> None:
        """One command's outcome: ``ok``, ``error`` (an error reply from Redis) or ``denied`` (by the proxy).
        ``name`` is the lower-case command name (``Request.name``)."""
        key = (name if name in self._known_commands else UNKNOWN, outcome)
        commands = self.commands
        commands[key] = commands.get(key, 0) + 1

    def observe_command_duration(self, name: str, seconds: float) -> None:
        """The upstream round trip of one command. Blocking commands are ignored: they are waits, not latency."""
        if name in BLOCKING:
            return
        if name not in self._known_commands:
            name = UNKNOWN
        h = self.command_duration.get(name)
        if h is None:
            h = self.command_duration[name] = Histogram(DURATION_BUCKETS)
        h.observe(seconds)

    def upstream_error(self, reason: str) -> None:
        reason = reason if reason in UPSTREAM_ERROR_REASONS else OTHER
        self.upstream_errors[reason] = self.upstream_errors.get(reason, 0) + 1

    def protocol_error(self, side: Side) -> None:
        self.protocol_errors[side] = self.protocol_errors.get(side, 0) + 1

    def auth_failed(self) -> None:
        self.auth_failures += 1

    def reattached(self, state: str) -> None:
        self.reattached_total[state] = self.reattached_total.get(state, 0) + 1

    def reattach_failed(self, reason: str) -> None:
        self.reattach_failures[reason] = self.reattach_failures.get(reason, 0) + 1

    def reattach_reset(self, state: str) -> None:
        self.reattach_resets[state] = self.reattach_resets.get(state, 0) + 1

    def client_rejected(self, reason: str) -> None:
        self.client_rejections[reason] = self.client_rejections.get(reason, 0) + 1

    def output_limit_exceeded(self, kind: str) -> None:
        self.output_limit_disconnects[kind] = self.output_limit_disconnects.get(kind, 0) + 1

    def tls_handshake_failed(self, listener: str, reason: str) -> None:
        """``reason`` is one of tls.REASONS (or "plaintext_port"): a bounded set, checked by the caller."""
        key = (listener, reason)
        self.tls_handshake_failures[key] = self.tls_handshake_failures.get(key, 0) + 1

    def tls_reloaded(self, listener: str, ok: bool) -> None:
        key = (listener, "ok" if ok else "failed")
        self.tls_reloads[key] = self.tls_reloads.get(key, 0) + 1

    def acl_denied(self, user: str | None, kind: str) -> None:
        kind = kind if kind in ACL_KINDS else OTHER
        name = user or "(none)"
        users = self._acl_users
        if name not in users:
            if len(users) >= MAX_SMALL_LABELS:
                name = OTHER
            else:
                users.add(name)
        key = (name, kind)
        self.acl_denials[key] = self.acl_denials.get(key, 0) + 1

    def requeue_failed(self, count: int) -> None:
        """Elements the loss guard could not put back (each is in the log, and nowhere else)."""
        self.requeue_failures += count

    @staticmethod
    def _small_label(seen: dict[str, int], value: str) -> str:
        if value in seen or len(seen) < MAX_SMALL_LABELS:
            return value
        return OTHER
