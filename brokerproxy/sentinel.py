"""Redis Sentinel: where the master is now, and when that changes.

The upstream is given as a ``sentinel://`` URL (``sentinel_url.py`` parses it and documents the scheme;
``parse_sentinel_url`` and ``SentinelUpstream`` are re-exported here).

Theory of operation
-------------------
``SentinelWatcher.discover()`` asks every Sentinel at once (after AUTH, each within a bounded time)
``SENTINEL get-master-addr-by-name <name>`` and, for its config epoch, ``SENTINEL MASTER <name>``. The address named
with the highest epoch wins, as among the Sentinels themselves: right after a failover a Sentinel that has not
heard of it yet names the old master, and a demoted master that is still alive keeps saying "master" for several
seconds until the Sentinels reconfigure it (measured: over 8 s after ``SENTINEL FAILOVER``), so neither "first
Sentinel that answers" nor ``ROLE`` alone would do. The winner is checked on the data node itself: ``ROLE`` must
say ``master``. Sentinels that are down, time out or do not know the name are skipped; when the winner cannot be
checked or is not (yet) a master, the whole round is asked once more after a short pause. Nothing usable:
``SentinelError`` listing what each Sentinel said. If the data node refuses ``ROLE`` with ``-NOPERM`` (an ACL user
without ``@admin``), the Sentinels' word is taken unchecked.

``run()`` keeps one ``SUBSCRIBE +switch-master`` connection per Sentinel (reconnecting with bounded backoff; a PING
on an idle subscription finds a half-open one) and re-asks the Sentinels every ``requery_interval`` seconds and at
once after any doubt (a subscription (re)established, so events may have been missed; an event whose new master
does not check out). Every change of ``current`` goes through one comparison, so the three Sentinels' copies of one
``+switch-master`` and the re-query that finds the same master make one ``on_switch(old, new)`` call; no lock is
held across a network call, and a check that took time applies its result only if nothing else changed ``current``
meanwhile (a generation counter).
``old`` is None the first time a master becomes known. ``close()`` cancels and awaits every task the watcher
started.

Reply parsing is sans-IO (``resp.ReplyParser`` framing, ``resp.decode``, and the ``parse_*`` functions below);
the asyncio part only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from . import resp
from .errors import ProtocolError, UpstreamError
from .sentinel_url import (
    DEFAULT_SENTINEL_PORT,
    Address,
    SentinelUpstream,
    auth_command,
    format_address,
    parse_sentinel_url,
)

__all__ = [
    "DEFAULT_SENTINEL_PORT", "Address", "SentinelError", "SentinelUpstream", "SentinelWatcher", "SwitchCallback",
    "format_address", "parse_config_epoch", "parse_master_addr", "parse_role", "parse_sentinel_url",
    "parse_switch_master", "pubsub_message",
]  # fmt: skip

log = logging.getLogger("brokerproxy.sentinel")

#: Seconds one Sentinel (or one data node's ROLE check) may take, connect included, before it is skipped.
#: redis-py's Sentinel uses 0.1 s per Sentinel; a TLS handshake over a WAN needs more.
DEFAULT_SENTINEL_TIMEOUT = 1.0
#: Seconds between re-asking the Sentinels while subscribed (the safety net for a missed +switch-master).
DEFAULT_REQUERY_INTERVAL = 5.0
#: Reconnecting a lost subscription waits RECONNECT_MIN, doubling up to RECONNECT_MAX seconds (Jedis waits a flat 5 s).
RECONNECT_MIN = 0.1
RECONNECT_MAX = 5.0
#: An idle subscription is PINGed after this many seconds; no answer within the timeout means it is dead.
SUBSCRIPTION_PING_INTERVAL = 5.0
#: discover() asks the whole list again once, after this pause, when a Sentinel named a node that is not a master.
DOUBT_PAUSE = 0.5
DISCOVER_ROUNDS = 2
#: The Pub/Sub channel Sentinel announces a new master on: "<name> <old-ip> <old-port> <new-ip> <new-port>".
SWITCH_MASTER = b"+switch-master"
#: Published by the Sentinel leading a failover just before it sends REPLICAOF NO ONE to the chosen replica: from
#: then on, what the old master accepts may be lost when it is turned into a replica, so the proxy stops writing
#: to it (``on_failover``) rather than wait for +switch-master, which comes up to a second later.
FAILOVER_START = b"+failover-state-send-slaveof-noone"

#: ``on_switch(old, new)``: old is None when the first master becomes known.
SwitchCallback = Callable[[Address | None, Address], object]


# ---------------------------------------------------------------------------------------------------- replies (sans-IO)


class SentinelError(UpstreamError):
    """No Sentinel gave a master that checks out; the message says what each one answered."""


class ReplyShapeError(ValueError):
    """A reply that does not have the shape Sentinel's protocol gives it."""


def parse_master_addr(value: resp.Value) -> Address | None:
    """The reply to ``SENTINEL get-master-addr-by-name``: ``[ip, port]``, or a null array when the Sentinel does
    not know the name (None). An error reply or any other shape raises ReplyShapeError."""
    if value is None:
        return None
    if isinstance(value, resp.ErrorReply):
        raise ReplyShapeError(value.decode("utf-8", "replace"))
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, bytes) for v in value):
        raise ReplyShapeError(f"expected [ip, port], got {value!r}")
    host, port = value
    try:
        port_n = int(port)
    except ValueError:
        raise ReplyShapeError(f"port {port!r} is not a number") from None
    if not host or not 0 < port_n < 65536:
        raise ReplyShapeError(f"not an address: {value!r}")
    return host.decode("utf-8", "replace"), port_n


def parse_config_epoch(value: resp.Value) -> int:
    """The ``config-epoch`` field of ``SENTINEL MASTER <name>`` (a flat field/value array in RESP2, a map in
    RESP3); -1 when the reply is an error (an ACL that allows only get-master-addr-by-name) or lacks it."""
    fields: dict[bytes, resp.Value] = {}
    if isinstance(value, list):
        for i in range(0, len(value) - 1, 2):
            key = value[i]
            if isinstance(key, bytes):
                fields[key] = value[i + 1]
    elif isinstance(value, dict):
        fields = {k: v for k, v in value.items() if isinstance(k, bytes)}
    epoch = fields.get(b"config-epoch")
    if isinstance(epoch, int):
        return epoch
    if isinstance(epoch, bytes) and epoch.isdigit():
        return int(epoch)
    return -1


def parse_role(value: resp.Value) -> str:
    """The role ``ROLE`` reports: ``master``, ``slave``, or ``sentinel``. An error reply raises ReplyShapeError."""
    if isinstance(value, resp.ErrorReply):
        raise ReplyShapeError(value.decode("utf-8", "replace"))
    if not isinstance(value, list) or not value or not isinstance(value[0], bytes):
        raise ReplyShapeError(f"unexpected ROLE reply {value!r}")
    return value[0].decode("latin-1").lower()


def parse_switch_master(payload: bytes, master_name: str) -> tuple[Address, Address] | None:
    """``(old, new)`` from a ``+switch-master`` message about ``master_name``; None for another master. A
    malformed message raises ReplyShapeError."""
    parts = payload.split(b" ")
    if len(parts) != 5:
        raise ReplyShapeError(f"malformed +switch-master message {payload!r}")
    if parts[0].decode("utf-8", "replace") != master_name:
        return None
    try:
        old = (parts[1].decode("utf-8", "replace"), int(parts[2]))
        new = (parts[3].decode("utf-8", "replace"), int(parts[4]))
    except ValueError:
        raise ReplyShapeError(f"malformed +switch-master message {payload!r}") from None
    return old, new


def pubsub_message(value: resp.Value) -> tuple[bytes, bytes] | None:
    """``(channel, payload)`` of a Pub/Sub ``message``; None for the other Pub/Sub frames (``subscribe``
    confirmations, ``pong``). An error reply raises ReplyShapeError."""
    if isinstance(value, resp.ErrorReply):
        raise ReplyShapeError(value.decode("utf-8", "replace"))
    if not isinstance(value, list) or not value or not isinstance(value[0], bytes):
        raise ReplyShapeError(f"unexpected frame on a subscription: {value!r}")
    kind = value[0].lower()
    if kind == b"message" and len(value) == 3 and isinstance(value[1], bytes) and isinstance(value[2], bytes):
        return value[1], value[2]
    if kind in (b"subscribe", b"pong"):
        return None
    raise ReplyShapeError(f"unexpected frame on a subscription: {value!r}")


class ReplyReader:
    """Bytes in, decoded replies out: ``feed()`` then iterate ``replies()``."""

    def __init__(self) -> None:
        self._parser = resp.ReplyParser()

    def feed(self, data: bytes) -> None:
        self._parser.feed(data)

    def replies(self) -> list[resp.Value]:
        out: list[resp.Value] = []
        while (frame := self._parser.next()) is not None:
            out.append(resp.decode(frame[1]))
        return out


# ---------------------------------------------------------------------------------------------------- the watcher


class _Doubt(Exception):
    """A Sentinel named a node whose ROLE is not master, or that cannot be reached to ask."""


class _AuthFailed(ConnectionError):
    """AUTH was refused: wrong credentials in the URL."""


class SentinelWatcher:
    """Finds the master through the Sentinels and follows its changes. See the module docstring."""

    def __init__(
        self,
        upstream: SentinelUpstream,
        on_switch: SwitchCallback | None = None,
        *,
        sentinel_ssl: ssl.SSLContext | None = None,
        redis_ssl: ssl.SSLContext | None = None,
        timeout: float = DEFAULT_SENTINEL_TIMEOUT,
        requery_interval: float = DEFAULT_REQUERY_INTERVAL,
    ) -> None:
        self.upstream = upstream
        self.on_switch = on_switch
        #: Called (no arguments) when a Sentinel starts promoting a replica of our master (FAILOVER_START).
        self.on_failover: Callable[[], object] | None = None
        self._sentinel_ssl = sentinel_ssl
        self._redis_ssl = redis_ssl
        self._timeout = timeout
        self._requery_interval = requery_interval
        self._current: Address | None = None
        #: Bumped at every change of ``current``: a check that took time applies its result only if nothing else
        #: changed ``current`` meanwhile (no lock held across network calls, so no event waits behind a slow one).
        self._generation = 0
        self._doubt = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscribed: set[Address] = set()
        self._role_unchecked_logged = False

    # ------------------------------------------------------------------------ state

    @property
    def current(self) -> Address | None:
        """The master as last verified, or None before the first discovery."""
        return self._current

    @property
    def subscribed(self) -> frozenset[Address]:
        """The Sentinels whose ``+switch-master`` subscription is live right now."""
        return frozenset(self._subscribed)

    def _set_current(self, new: Address, why: str) -> None:
        """The one place ``current`` changes: one on_switch call per change."""
        old = self._current
        if new == old:
            return
        self._current = new
        self._generation += 1
        log.warning(
            "sentinel master changed",
            extra={
                "master_name": self.upstream.master_name,
                "old": None if old is None else format_address(old),
                "new": format_address(new),
                "why": why,
            },
        )
        if self.on_switch is not None:
            try:
                self.on_switch(old, new)
            except Exception:
                log.exception("on_switch callback failed")

    # ------------------------------------------------------------------------ discovery

    async def discover(self) -> Address:
        """Ask the Sentinels for the master and check it with ROLE; the master's address. Raises SentinelError
        when none gives a master that checks out. Updates ``current`` (and calls on_switch if it changed). If
        ``current`` changed while the Sentinels were being asked (a +switch-master came in), that newer change
        stands and is returned."""
        generation = self._generation
        addr, source = await self._ask_sentinels()
        if self._generation != generation and self._current is not None:
            return self._current
        self._set_current(addr, f"discovered via sentinel {source}")
        return addr

    async def _ask_sentinels(self) -> tuple[Address, str]:
        up = self.upstream
        problems: list[str] = []
        for round_ in range(DISCOVER_ROUNDS):
            if round_:
                await asyncio.sleep(DOUBT_PAUSE)
            doubt = False
            problems = []
            answers = await asyncio.gather(*(self._ask_one(s) for s in up.addresses), return_exceptions=True)
            # Each address named, with the highest config epoch any Sentinel gave it and the first Sentinel to name it.
            named: dict[Address, tuple[int, str]] = {}
            for sentinel, answer in zip(up.addresses, answers, strict=True):
                where = format_address(sentinel)
                if isinstance(answer, (OSError, TimeoutError, ConnectionError, ReplyShapeError, ProtocolError)):
                    problems.append(f"{where}: {_describe(answer, self._timeout)}")
                elif isinstance(answer, BaseException):
                    raise answer
                elif answer is None:
                    problems.append(f"{where} does not know master {up.master_name!r}")
                else:
                    addr, epoch = answer
                    if addr not in named or epoch > named[addr][0]:
                        named[addr] = (epoch, named[addr][1] if addr in named else where)
            if named:
                # The configuration with the highest epoch wins, as among the Sentinels themselves: a Sentinel
                # that has not heard of a failover yet names the old master, which may still say "master" for
                # a while (a demoted master that is alive is reconfigured as a replica only seconds later).
                top = max(epoch for epoch, _ in named.values())
                for addr, (epoch, where) in named.items():
                    if epoch < top:
                        problems.append(f"{where} named {format_address(addr)} with an older config epoch {epoch}")
                        continue
                    try:
                        await self._check_master(addr)
                        return addr, where
                    except _Doubt as exc:
                        doubt = True
                        problems.append(f"{where} {exc}")
                    except (OSError, TimeoutError, ConnectionError, ReplyShapeError, ProtocolError) as exc:
                        problems.append(f"{where}: {_describe(exc, self._timeout)}")
            if not doubt:
                break
        raise SentinelError(f"no Sentinel gave a usable master for {up.master_name!r}: " + "; ".join(problems))

    async def _ask_one(self, sentinel: Address) -> tuple[Address, int] | None:
        """The master one Sentinel names, with its config epoch (-1 if SENTINEL MASTER is refused); None if the
        Sentinel does not know the name."""
        up = self.upstream
        auth = auth_command(up.sentinel_username, up.sentinel_password)
        name = up.master_name.encode()
        commands = [[b"SENTINEL", b"get-master-addr-by-name", name], [b"SENTINEL", b"MASTER", name]]
        replies = await self._exchange(sentinel, self._sentinel_ssl, auth, commands, "Sentinel")
        addr = parse_master_addr(replies[0])
        return None if addr is None else (addr, parse_config_epoch(replies[1]))

    async def _check_master(self, addr: Address) -> None:
        """Raise _Doubt unless ROLE on ``addr`` says master (OSError and the like if it cannot be reached)."""
        up = self.upstream
        try:
            replies = await self._exchange(
                addr, self._redis_ssl, auth_command(up.username, up.password), [[b"ROLE"]], "Redis"
            )
        except _AuthFailed as exc:  # a configuration problem, not a failover in progress
            raise ConnectionError(f"named {format_address(addr)}: {exc}") from None
        except (OSError, TimeoutError, ConnectionError, ProtocolError) as exc:
            raise _Doubt(
                f"named {format_address(addr)}, which cannot be checked: {_describe(exc, self._timeout)}"
            ) from None
        value = replies[0]
        if isinstance(value, resp.ErrorReply) and value.startswith(b"NOPERM"):
            if not self._role_unchecked_logged:
                self._role_unchecked_logged = True
                log.warning("ROLE is not permitted to the upstream user: trusting the Sentinels unchecked")
            return
        try:
            role = parse_role(value)
        except ReplyShapeError as exc:
            raise ConnectionError(f"named {format_address(addr)}, whose ROLE check failed: {exc}") from None
        if role != "master":
            raise _Doubt(f"named {format_address(addr)}, whose ROLE is {role}")

    async def _exchange(
        self,
        addr: Address,
        ssl_context: ssl.SSLContext | None,
        auth: list[list[bytes]],
        commands: list[list[bytes]],
        what: str,
    ) -> list[resp.Value]:
        """Open a connection, AUTH, send ``commands``, return their decoded replies; all within the timeout."""
        async with asyncio.timeout(self._timeout):
            reader, writer = await asyncio.open_connection(addr[0], addr[1], ssl=ssl_context)
            try:
                writer.write(b"".join(resp.encode_command(c) for c in auth + commands))
                replies = await _read_replies(reader, len(auth) + len(commands))
            finally:
                await _close(writer)
        for reply in replies[: len(auth)]:
            if isinstance(reply, resp.ErrorReply):
                raise _AuthFailed(f"{what} AUTH failed: {reply.decode('utf-8', 'replace')}")
        return replies[len(auth) : len(auth) + len(commands)]

    # ------------------------------------------------------------------------ following

    def start(self) -> None:
        """Run ``run()`` as a task the watcher owns (``close()`` ends it)."""
        self._spawn(self.run(), "sentinel-watcher")

    async def run(self) -> None:
        """Follow the master until ``close()``: one subscription per Sentinel, and the periodic re-query."""
        children = [
            self._spawn(self._subscription(s), f"sentinel-subscribe-{format_address(s)}")
            for s in self.upstream.addresses
        ]
        children.append(self._spawn(self._requery_loop(), "sentinel-requery"))
        try:
            await self._closed.wait()
        finally:
            for task in children:
                task.cancel()
            await asyncio.gather(*children, return_exceptions=True)

    async def close(self) -> None:
        """Stop following: cancel and await every task the watcher started.

        Cancelled again until each has ended: on Python 3.11 ``asyncio.wait_for`` can swallow a cancellation that
        arrives as its inner wait completes (a Sentinel's message, the doubt event), and the loop it sits in would
        then run on; the loops also stop at ``_closed``. Seen as a close that never returned, under load."""
        self._closed.set()
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=1.0)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sentinel task failed", extra={"task": task.get_name(), "error": repr(task.exception())})

    async def _requery_loop(self) -> None:
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._doubt.wait(), self._requery_interval)
            self._doubt.clear()
            try:
                await self.discover()
            except SentinelError as exc:
                log.warning("sentinel re-query failed", extra={"error": str(exc)})
            except Exception:  # a bug must not end the re-query for good
                log.exception("sentinel re-query failed unexpectedly")

    async def _on_switch_message(self, new: Address, sentinel: Address) -> None:
        if new == self._current:
            return  # another Sentinel's copy of the same event
        generation = self._generation
        try:
            await self._check_master(new)
        except (_Doubt, OSError, TimeoutError, ConnectionError, ReplyShapeError, ProtocolError) as exc:
            log.warning(
                "+switch-master did not check out; re-asking the Sentinels",
                extra={"sentinel": format_address(sentinel), "error": str(exc)},
            )
            self._doubt.set()
            return
        if self._generation != generation:  # current changed while checking: settle it by asking again
            if new != self._current:
                self._doubt.set()
            return
        self._set_current(new, f"+switch-master from sentinel {format_address(sentinel)}")

    async def _subscription(self, sentinel: Address) -> None:
        delay = RECONNECT_MIN
        while not self._closed.is_set():
            try:
                await self._subscribe_once(sentinel)
                error = "closed the connection"
            except (OSError, TimeoutError, ConnectionError, ReplyShapeError, ProtocolError) as exc:
                error = _describe(exc, self._timeout)
            except Exception as exc:  # a bug must not end this Sentinel's subscription for good
                log.exception("sentinel subscription failed unexpectedly")
                error = repr(exc)
            finally:
                was_subscribed = sentinel in self._subscribed
                self._subscribed.discard(sentinel)
            if was_subscribed:
                delay = RECONNECT_MIN  # it was up: retry soon
                self._doubt.set()  # events may be missed until it is back: ask the others
            log.info(
                "sentinel subscription lost",
                extra={"sentinel": format_address(sentinel), "error": error, "retry_in": delay},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _subscribe_once(self, sentinel: Address) -> None:
        up = self.upstream
        auth = auth_command(up.sentinel_username, up.sentinel_password)
        async with asyncio.timeout(self._timeout):
            reader, writer = await asyncio.open_connection(sentinel[0], sentinel[1], ssl=self._sentinel_ssl)
        try:
            async with asyncio.timeout(self._timeout):
                subscribe = [b"SUBSCRIBE", SWITCH_MASTER, FAILOVER_START]
                writer.write(b"".join(resp.encode_command(c) for c in [*auth, subscribe]))
                parser = ReplyReader()
                replies = await _read_replies(reader, len(auth) + 2, parser)
            for reply in replies[: len(auth)]:
                if isinstance(reply, resp.ErrorReply):
                    raise _AuthFailed(f"Sentinel AUTH failed: {reply.decode('utf-8', 'replace')}")
            pubsub_message(replies[len(auth)])  # the subscribe confirmations (raise on an error reply)
            pubsub_message(replies[len(auth) + 1])
            self._subscribed.add(sentinel)
            self._doubt.set()  # events before this subscription are unseen: re-ask now
            log.info("sentinel subscribed", extra={"sentinel": format_address(sentinel)})
            for value in replies[len(auth) + 2 :]:  # read together with the confirmations
                await self._on_frame(value, sentinel)
            pinged = False
            while not self._closed.is_set():
                try:
                    data = await asyncio.wait_for(
                        reader.read(65536), self._timeout if pinged else SUBSCRIPTION_PING_INTERVAL
                    )
                except TimeoutError:
                    if pinged:
                        raise TimeoutError("no answer to PING on the subscription") from None
                    writer.write(resp.encode_command([b"PING"]))
                    pinged = True
                    continue
                if not data:
                    return
                pinged = False
                parser.feed(data)
                for value in parser.replies():
                    await self._on_frame(value, sentinel)
        finally:
            await _close(writer)

    async def _on_frame(self, value: resp.Value, sentinel: Address) -> None:
        message = pubsub_message(value)
        if message is None:
            return
        if message[0] == FAILOVER_START:
            # "slave <name> <ip> <port> @ <master-name> <master-ip> <master-port>"
            parts = message[1].split(b" ")
            at = parts.index(b"@") if b"@" in parts else -1
            name = parts[at + 1].decode("utf-8", "replace") if 0 <= at < len(parts) - 1 else None
            if name == self.upstream.master_name:
                if self.on_failover is not None:
                    try:
                        self.on_failover()
                    except Exception:
                        log.exception("on_failover failed")
            return
        if message[0] != SWITCH_MASTER:
            return
        switch = parse_switch_master(message[1], self.upstream.master_name)
        if switch is not None:
            await self._on_switch_message(switch[1], sentinel)


async def _read_replies(
    reader: asyncio.StreamReader, count: int, parser: ReplyReader | None = None
) -> list[resp.Value]:
    parser = parser or ReplyReader()
    replies: list[resp.Value] = []
    while len(replies) < count:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("closed the connection")
        parser.feed(data)
        replies += parser.replies()
    return replies


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ConnectionError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return str(exc) or f"timed out after {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__
