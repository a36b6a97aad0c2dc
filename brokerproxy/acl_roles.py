"""Celery-aware roles: least-privilege Redis ACL rules for Celery/kombu producers, workers, result readers and
monitors, built from what Celery 5.7 / kombu 5.7 / redis-py 8.1 send on the wire (shared/celery-wire.md).

A role expands into ordinary Redis ACL rules (``Role.rules``, usable in an ACL file line or with ``User.apply``)
plus an allowlist of Lua script SHA1s (``Role.scripts``): ``EVALSHA``/``EVAL`` run only those scripts, because
kombu's binding sweep touches keys that are not in ``KEYS`` and key patterns cannot bound what a script does.

Names used below: ``P`` is kombu's ``global_keyprefix`` (broker keys *and* pub/sub channels get it as is,
``tenantA:celery``, ``tenantA:/0.celeryev/…``); ``R`` the result backend's prefix (``global_keyprefix`` of
``result_backend_transport_options``; Celery appends ``_`` unless it already ends in one of ``:_-.``); ``Q`` a
queue name or glob pattern; ``Q⁺`` the queue and its priority lists ``Q\\x06\\x16[369]`` (kombu's separator and
its default ``priority_steps`` 0, 3, 6, 9; every role takes a ``priority_steps`` argument for other steps, e.g.
``range(10)`` gives ``Q\\x06\\x16[123456789]``); ``db`` the database number in kombu's fanout channel names
(``/0.celery.pidbox``). Prefixes are matched literally (their glob characters are escaped, and a channel kombu
``PSUBSCRIBE``s is also given unescaped, since Redis compares those literally); queue names are glob patterns.

The rules were checked with real Celery 5.7 against Redis 7.0 enforcing them (tests/integration/
test_acl_roles_celery.py: tasks, retries, groups, chords, events, ``inspect``, warm shutdown, no ACL denial logged),
and brokerproxy's check agrees with Redis's on them (tests/integration/test_acl_differential.py).

Every role also gets the connection commands redis-py and kombu send: ``PING``, ``ECHO``, ``SELECT``, ``CLIENT
SETNAME|GETNAME|ID``, ``MULTI``/``EXEC``/``DISCARD``/``WATCH``/``UNWATCH`` (``AUTH``, ``HELLO``, ``QUIT``, ``RESET``
need no permission). redis-py 8's ``CLIENT SETINFO`` and ``CLIENT MAINT_NOTIFICATIONS`` do not exist in Redis 7.0:
they get Redis's "unknown subcommand" error, which redis-py ignores.

Roles (``expand("worker(default, high*)", keyprefix="tenantA:")`` or the functions below):

``producer(queues, control=False, results=True)``: sends tasks.
    Keys: ``%W~P Q⁺`` (write-only: ``LPUSH``/``RPUSH``, and ``LLEN``/``EXISTS``/``PEXPIRE`` for queue declare
    and x-expires, which need no read permission; ``RPOP``/``BRPOP`` need read and are refused: a producer cannot
    consume, and has no ``DEL``), ``~P_kombu.binding*`` (queue declare binds with ``SADD``; named exchanges route
    with ``SMEMBERS``). Channels: ``&P/db.celeryev/*`` (``task.sent`` events).
    Commands: ``+lpush +rpush +llen +exists +pexpire +sadd +smembers +publish`` and the connection commands.
    With ``results`` (default), a selector for the result backend: ``(%R~R celery-task-meta-*
    ~R celery-taskset-meta-* &R celery-task-meta-* +get +mget +set +del +subscribe +unsubscribe)``:
    ``apply_async`` subscribes to the result and ``get()`` reads it; applying a chord or saving a group writes the
    ``celery-taskset-meta-*`` keys (``DEL …​.c``, ``SET …​.s``). Being a selector, its ``SET``/``DEL`` reach only
    those keys. (``AsyncResult.forget()``, a ``DEL`` of a task result, is refused.)
    With ``control`` (``celery inspect``, ``control.revoke``, Airflow's ``inspect().active_queues()``), a second
    selector: its reply queues ``~P*.reply.celery.pidbox`` (+ priority lists), consumed with ``BRPOP``, declared
    and deleted at close; ``~P_kombu.binding*``; the ``restore_visible`` sweep kombu runs at close
    (``~P unacked``, ``~P unacked_index``, ``~P unacked_mutex``; restored messages go back with ``RPUSH`` under the
    root rules); ``&P/db.celery.pidbox`` for the broadcast; ``+brpop +llen +exists +del +sadd +srem +smembers
    +get +set +zadd +zrange +zrangebyscore +zrevrangebyscore +zrem +hget +hdel +watch +time +publish +evalsha
    +script|load +script|exists`` (``ZREVRANGEBYSCORE``: kombu 5.6's sweep, which Airflow's Celery provider uses)
    (with what the scripts call: Redis checks a script's commands against its caller's ACL).
    Scripts: kombu's binding refresh and sweep and redis-py's lock release.

``worker(queues)``: consumes tasks and writes results.
    Keys: ``~P Q⁺`` (``BRPOP``, restore with ``LPUSH``/``RPUSH``, purge, chord callbacks), ``~P unacked``,
    ``~P unacked_index``, ``~P unacked_mutex`` (ack emulation and visibility timeout), ``~P_kombu.binding*``,
    ``~P*.celery.pidbox`` (+ priority lists: its node queue and the reply queues of ``inspect``/mingle),
    ``~P celeryev.*`` (the gossip event queue), ``~R celery-task-meta-*``, ``~R celery-taskset-meta-*`` (results,
    groups, chords).
    Channels: ``&P/db.celery.pidbox`` and ``&P/db.celeryev/worker.*`` (exactly what it ``PSUBSCRIBE``s: Redis
    compares a subscribed pattern literally), ``&P/db.celeryev/*`` (publishing events),
    ``&R celery-task-meta-*``, ``&R celery-taskset-meta-*`` (result notifications).
    Commands: list ``+brpop +rpop +lpush +rpush +llen +lrange``, keys ``+exists +del +pexpire +expire``, unacked
    ``+zadd +zrem +zrange +zrangebyscore +zrevrangebyscore +zcount +hset +hget +hdel +hlen`` (kombu 5.6 restores with
    ``ZREVRANGEBYSCORE``), strings ``+get +mget +set +setex +incr``, bindings ``+sadd +srem +smembers +sismember``,
    pub/sub ``+publish +subscribe +psubscribe +unsubscribe +punsubscribe``, scripts ``+evalsha +script|load
    +script|exists +time`` (``TIME``: kombu's scripts
    call it, and Redis checks a script's commands against its caller's ACL) and the connection commands.
    Scripts: all six of the wire study (kombu binding refresh and sweep, redis-py lock release, Celery chord part,
    claim-extend and cleanup). Not ``FLUSHALL``, ``FLUSHDB``, ``KEYS``, ``CONFIG``, ``DEBUG``, or any key outside
    the patterns above.

``result_reader()``: reads results (Airflow's scheduler state polling, ``AsyncResult.get()``).
    Keys: ``%R~R celery-task-meta-*``, ``%R~R celery-taskset-meta-*``. Channels: ``&R celery-task-meta-*``.
    Commands: ``+get +mget +subscribe +unsubscribe`` and the connection commands.

``monitor(queues="*")``: watches queue lengths and events (Flower, dashboards); cannot publish or write.
    Keys: ``%R~P Q⁺``, ``%R~P unacked``, ``%R~P unacked_index``. Channels: ``&P/db.celeryev/*`` (its
    ``PSUBSCRIBE /0.celeryev/*``, literally). Commands: ``+llen +hlen +zcard +psubscribe +subscribe +punsubscribe
    +unsubscribe`` and the connection commands.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .acl import User

#: kombu's priority separator and its default priority_steps (a message of priority p goes to the list of the
#: largest step <= p; step 0 is the queue itself, the others are ``Q + sep + step``).
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)

#: The Lua scripts Celery 5.7, kombu 5.7 and redis-py 8.1 run (shared/celery-wire.md §1.8).
SCRIPT_LOCK_RELEASE = "c3f8721cbb97f72bc19e972846bd7aaf91901658"  # redis-py Lock.release (kombu unacked_mutex)
SCRIPT_REFRESH_BINDING = "ef7a9e205fbaf46bf959e1522ff796622fc676c7"  # kombu
SCRIPT_SWEEP_BINDINGS = "9a2b966a0a2d2d0e36ec32bc30fc89342b94a4bf"  # kombu; touches keys built from ARGV
SCRIPT_CHORD_PART_RETURN = "b8fc152c83a7e634103ccebd49dcd3146a8f4366"  # celery
SCRIPT_CHORD_CLAIM_EXTEND = "dc87180d6bcb7f73c7275eb0fe7a70baf0a8b7c7"  # celery
SCRIPT_CHORD_CLEANUP = "59d7aab41242d82196947ba8926cab712416da4f"  # celery
KOMBU_SCRIPTS = frozenset({SCRIPT_LOCK_RELEASE, SCRIPT_REFRESH_BINDING, SCRIPT_SWEEP_BINDINGS})
CELERY_SCRIPTS = frozenset({SCRIPT_CHORD_PART_RETURN, SCRIPT_CHORD_CLAIM_EXTEND, SCRIPT_CHORD_CLEANUP})

CONNECTION_COMMANDS = (
    "+ping", "+echo", "+select", "+client|setname", "+client|getname", "+client|id",
    "+multi", "+exec", "+discard", "+watch", "+unwatch",
)  # fmt: skip


class RoleError(ValueError):
    """A role spec that cannot be expanded (unknown role, bad arguments)."""


@dataclass(frozen=True)
class Role:
    """ACL rules and the Lua scripts (SHA1 hex) ``EVALSHA``/``EVAL`` may run."""

    rules: tuple[str, ...]
    scripts: frozenset[str]

    def __add__(self, other: Role) -> Role:
        return Role(self.rules + other.rules, self.scripts | other.scripts)

    def line(self, name: str, *credentials: str) -> str:
        """An ACL file line for a user with this role: ``user <name> on <credentials…> <rules…>``."""
        return " ".join(["user", name, "on", *credentials, *self.rules])

    def apply_to(self, user: User) -> User:
        """Add the role's rules and scripts to ``user`` (its passwords and on/off are left as they are)."""
        user.apply(self.rules)
        user.scripts = (user.scripts or frozenset()) | {s.encode() for s in self.scripts}
        return user.freeze()


def escape_glob(text: str) -> str:
    """``text`` as a Redis glob pattern that matches only itself."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def result_prefix(keyprefix: str) -> str:
    """The prefix Celery's result backend puts in front of its keys for a ``global_keyprefix``."""
    if keyprefix and keyprefix[-1] not in ":_-.":
        return keyprefix + "_"
    return keyprefix


def _check_names(names: Sequence[str], what: str) -> None:
    # Rules are words of an ACL line, and selectors are read like redis-cli arguments: no spaces, quotes or
    # parentheses, which would change how Redis splits them.
    for name in names:
        if not name or any(c.isspace() or c in "\0\"'()" for c in name):
            raise RoleError(f"bad {what} {name!r}: empty, or with a space, quote or parenthesis")


def _queue_keys(prefix: str, queues: Sequence[str], flags: str, steps: Sequence[int] = PRIORITY_STEPS) -> list[str]:
    _check_names(queues, "queue")
    if prefix:
        _check_names([prefix], "key prefix")
    p = escape_glob(prefix)
    suffixes = sorted({str(s) for s in steps if s})
    if any(not s.isdigit() for s in suffixes):
        raise RoleError(f"bad priority steps {list(steps)!r}: expected non-negative integers")
    # One class when every step is one digit ([369]); else one pattern per step.
    lists = [f"[{''.join(suffixes)}]"] if all(len(s) == 1 for s in suffixes) else suffixes
    out: list[str] = []
    for q in queues:
        out.append(f"{flags}~{p}{q}")
        out += [f"{flags}~{p}{q}{PRIORITY_SEP}{suffix}" for suffix in (lists if suffixes else [])]
    return out


def _results(keyprefix: str, *, write: bool) -> list[str]:
    if keyprefix:
        _check_names([keyprefix], "result key prefix")
    r = escape_glob(result_prefix(keyprefix))
    flags = "" if write else "%R"
    rules = [f"{flags}~{r}celery-task-meta-*", f"{flags}~{r}celery-taskset-meta-*", f"&{r}celery-task-meta-*"]
    if write:
        rules.append(f"&{r}celery-taskset-meta-*")
    return rules


def _subscribed(keyprefix: str, channel: str) -> list[str]:
    """Channel rules for a channel pattern kombu PSUBSCRIBEs: Redis requires the subscribed pattern to equal an ACL
    pattern literally, so the prefix goes in as is; and, when escaping changes it, escaped too (for PUBLISH)."""
    rules = [f"&{keyprefix}{channel}"]
    if escape_glob(keyprefix) != keyprefix:
        rules.append(f"&{escape_glob(keyprefix)}{channel}")
    return rules


def _selector(rules: Iterable[str]) -> str:
    return "(" + " ".join(rules) + ")"


def result_reader(*, result_keyprefix: str = "") -> Role:
    rules = [*_results(result_keyprefix, write=False), "+get", "+mget", "+subscribe", "+unsubscribe"]
    return Role((*rules, *CONNECTION_COMMANDS), frozenset())


def producer(
    queues: Sequence[str] = ("celery",),
    *,
    keyprefix: str = "",
    result_keyprefix: str | None = None,
    db: int = 0,
    control: bool = False,
    results: bool = True,
    priority_steps: Sequence[int] = PRIORITY_STEPS,
) -> Role:
    p = escape_glob(keyprefix)
    rules = [
        *_queue_keys(keyprefix, queues, "%W", priority_steps),
        f"~{p}_kombu.binding*",
        f"&{p}/{db}.celeryev/*",
        *("+lpush", "+rpush", "+llen", "+exists", "+pexpire", "+sadd", "+smembers", "+publish"),
        *CONNECTION_COMMANDS,
    ]
    scripts: frozenset[str] = frozenset()
    if results:
        rprefix = keyprefix if result_keyprefix is None else result_keyprefix
        if rprefix:
            _check_names([rprefix], "result key prefix")
        r = escape_glob(result_prefix(rprefix))
        # Results in a selector of their own, so that its SET and DEL reach only chord and group keys.
        rules.append(
            _selector(
                [
                    f"%R~{r}celery-task-meta-*",
                    f"~{r}celery-taskset-meta-*",
                    f"&{r}celery-task-meta-*",
                    "+get",
                    "+mget",
                    "+set",
                    "+del",
                    "+subscribe",
                    "+unsubscribe",
                ]
            )
        )
    if control:
        # Remote control in a selector of its own: its BRPOP/DEL reach only its reply queues and kombu's
        # bookkeeping, not the task queues.
        rules.append(
            _selector(
                [
                    *_queue_keys(keyprefix, ["*.reply.celery.pidbox"], "", priority_steps),
                    f"~{p}_kombu.binding*",
                    f"~{p}unacked",
                    f"~{p}unacked_index",
                    f"~{p}unacked_mutex",
                    *_subscribed(keyprefix, f"/{db}.celery.pidbox"),
                    *("+brpop", "+llen", "+exists", "+del", "+sadd", "+srem", "+smembers", "+get", "+set", "+zadd"),
                    *("+zrange", "+zrangebyscore", "+zrevrangebyscore", "+zrem", "+hget", "+hdel", "+watch"),
                    *("+time", "+publish"),
                    *("+evalsha", "+script|load", "+script|exists"),
                ]
            )
        )
        scripts = KOMBU_SCRIPTS
    return Role(tuple(rules), scripts)


WORKER_COMMANDS = (
    "+brpop", "+rpop", "+lpush", "+rpush", "+llen", "+lrange",
    "+exists", "+del", "+pexpire", "+expire",
    "+zadd", "+zrem", "+zrange", "+zrangebyscore", "+zrevrangebyscore", "+zcount", "+hset", "+hget", "+hdel", "+hlen",
    "+get", "+mget", "+set", "+setex", "+incr",
    "+sadd", "+srem", "+smembers", "+sismember",
    "+publish", "+subscribe", "+psubscribe", "+unsubscribe", "+punsubscribe",
    "+evalsha", "+script|load", "+script|exists", "+time",
)  # fmt: skip


def worker(
    queues: Sequence[str] = ("celery",),
    *,
    keyprefix: str = "",
    result_keyprefix: str | None = None,
    db: int = 0,
    priority_steps: Sequence[int] = PRIORITY_STEPS,
) -> Role:
    p = escape_glob(keyprefix)
    rules = [
        *_queue_keys(keyprefix, queues, "", priority_steps),
        f"~{p}unacked",
        f"~{p}unacked_index",
        f"~{p}unacked_mutex",
        f"~{p}_kombu.binding*",
        *_queue_keys(keyprefix, ["*.celery.pidbox"], "", priority_steps),
        f"~{p}celeryev.*",
        *_results(keyprefix if result_keyprefix is None else result_keyprefix, write=True),
        *_subscribed(keyprefix, f"/{db}.celery.pidbox"),
        *_subscribed(keyprefix, f"/{db}.celeryev/worker.*"),
        f"&{p}/{db}.celeryev/*",
        *WORKER_COMMANDS,
        *CONNECTION_COMMANDS,
    ]
    return Role(tuple(rules), KOMBU_SCRIPTS | CELERY_SCRIPTS)


def monitor(
    queues: Sequence[str] = ("*",), *, keyprefix: str = "", db: int = 0, priority_steps: Sequence[int] = PRIORITY_STEPS
) -> Role:
    p = escape_glob(keyprefix)
    rules = [
        *_queue_keys(keyprefix, queues, "%R", priority_steps),
        f"%R~{p}unacked",
        f"%R~{p}unacked_index",
        *_subscribed(keyprefix, f"/{db}.celeryev/*"),
        *("+llen", "+hlen", "+zcard", "+psubscribe", "+subscribe", "+punsubscribe", "+unsubscribe"),
        *CONNECTION_COMMANDS,
    ]
    return Role(tuple(rules), frozenset())


_SPEC = re.compile(r"\s*([a-z_]+)\s*(?:\(([^()]*)\))?\s*$")


def expand(
    spec: str,
    *,
    keyprefix: str = "",
    result_keyprefix: str | None = None,
    db: int = 0,
    control: bool = False,
    priority_steps: Sequence[int] = PRIORITY_STEPS,
) -> Role:
    """A role from its spec: ``producer(q1, q2*)``, ``worker(q1)``, ``result_reader``, ``monitor(q*)``; several
    joined with ``+`` (``worker(default) + monitor``). ``control`` is the producer's remote-control option; the
    other options are Celery's settings the roles must follow (``global_keyprefix``, the db number in channel
    names, ``priority_steps``)."""
    role = Role((), frozenset())
    results = keyprefix if result_keyprefix is None else result_keyprefix
    for part in spec.split("+"):
        m = _SPEC.match(part)
        if m is None:
            raise RoleError(f"cannot read role {part.strip()!r}: expected name or name(queue, …)")
        name, arg = m.group(1), m.group(2)
        queues = [q.strip() for q in arg.split(",")] if arg and arg.strip() else []
        steps = priority_steps
        if name == "producer":
            role += producer(
                queues or ["celery"], keyprefix=keyprefix, result_keyprefix=results, db=db, control=control,
                priority_steps=steps,
            )  # fmt: skip
        elif name == "worker":
            role += worker(
                queues or ["celery"], keyprefix=keyprefix, result_keyprefix=results, db=db, priority_steps=steps
            )
        elif name == "monitor":
            role += monitor(queues or ["*"], keyprefix=keyprefix, db=db, priority_steps=steps)
        elif name == "result_reader":
            if queues:
                raise RoleError("result_reader takes no queues")
            role += result_reader(result_keyprefix=results)
        else:
            raise RoleError(f"unknown role {name!r}: expected producer, worker, result_reader or monitor")
    return role


def role_user(name: str, role: Role, *, passwords: Iterable[str] = (), password_sha256: Iterable[str] = ()) -> User:
    """An enabled user with ``role``'s rules and scripts and the given passwords (plain or SHA-256 hex)."""
    user = User(name)
    user.apply(["on", *(f">{pw}" for pw in passwords), *(f"#{h}" for h in password_sha256)])
    return role.apply_to(user)
