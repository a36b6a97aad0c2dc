"""Listeners and lifecycle: start, serve, drain, stop; signals; the side connection that requeues elements.

Every task is tracked (``spawn``); drain waits on events and a bound, never on a sleep loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from . import resp
from .acl import AclPolicy
from .acl_log import AclLog
from .audit import AuditLog, audited_commands
from .commands import Requeue
from .config import AUTH_BACKOFF_BASE, AUTH_BACKOFF_MAX, Config
from .endpoints import HTTPEndpoints
from .errors import ConfigError
from .metrics import build_registry
from .observe import Observer
from .proxy import ClientConnection
from .sentinel import SentinelWatcher
from .status import StatusBoard
from .tls import Material, Reloadable, client_context, server_context
from .tls_listener import SHUTDOWN_TIMEOUT, TLSListener

log = logging.getLogger("brokerproxy.server")

#: Attempts to put requeued elements back before giving up (and logging every element that could not be).
REQUEUE_ATTEMPTS = 6
#: CLIENT UNBLOCK attempts for a pop left behind by a gone client, and the wait between them.
UNBLOCK_ATTEMPTS = 20
#: CLIENT KILL attempts (backing off from 0.1 s to 2 s) for a lost upstream connection Redis may still hold.
KILL_ORPHAN_ATTEMPTS = 8
#: Peer addresses whose failed authentications are remembered (for the backoff).
AUTH_FAILURE_PEERS = 10_000
UNBLOCK_RETRY_SECONDS = 0.25


def _backoff(failures: int) -> float:
    if failures < 2:
        return 0.0  # one typo costs nothing
    return float(min(AUTH_BACKOFF_BASE * 2 ** (failures - 2), AUTH_BACKOFF_MAX))


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.authenticator = config.authenticator()
        #: The ACL check, when users are configured (with none, every client is Redis's all-powerful default user).
        self.policy = AclPolicy(self.authenticator, wording=config.acl.wording) if config.access_controlled else None
        self.acl_log = AclLog()
        self.audit = AuditLog(config.audit.file or None)
        self.audited = audited_commands(config.audit.commands) if self.audit.enabled else frozenset()
        self._connection_ids = 0
        m = config.metrics
        #: Every counter the proxy keeps (the metrics endpoint exports them).
        self.observer = Observer(m.max_queues, m.max_tasks, key_prefix=m.key_prefix.encode())
        #: The observer the sessions feed with traffic: only when metrics are served, since reading traffic costs.
        self.traffic_observer = self.observer if config.metrics_listen is not None else None
        self.upstream_up = False
        self._auth_failures: dict[str, tuple[int, float]] = {}  # peer host -> (failures, last failure time)
        self._endpoints: HTTPEndpoints | None = None
        self.draining = False
        self._connections: set[ClientConnection] = set()
        self._orphans: set[ClientConnection] = set()  # client gone, reading upstream to the end
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._tls_listeners: list[TLSListener] = []
        #: Where the master is: the URL's address, or (sentinel://) what the Sentinels say now.
        self.upstream_addr: tuple[str, int] = (config.upstream.host, config.upstream.port)
        self.sentinel: SentinelWatcher | None = None
        self._settled = asyncio.Event()  # no failover hold in progress (master_settled)
        self._loaded = asyncio.Event()  # Redis has its data: no outage, or it answers PING without -LOADING
        self._loaded.set()
        self._settled.set()
        self._outage_since: float | None = None  # the upstream was lost under live connections (reattach)
        #: (peer host, user) that lost a reply -> the last connection id then (reply_lost): only connections that
        #: were open then are closed, not those a consumer that restarted on its own has opened since.
        self._lost_reply: dict[tuple[str, str | None], int] = {}
        #: --workers: tells the other workers of a lost reply (through the supervisor), since the client's other
        #: connections may have been spread over them (cli._report_ready).
        self.relay_reply_lost: Callable[[str, str | None], None] | None = None
        self._resetting: asyncio.Task[None] | None = None  # _reset_consumers, waiting for Redis to answer
        self._hold_until = 0.0  # a failover in progress: new upstream connections wait until then (or the switch)
        #: The TLS listener's certificate material and the upstream's (rediss://); reloaded on SIGHUP or file change.
        self.tls = Reloadable("tls", lambda: server_context(config.tls), config.tls) if config.tls_listen else None
        self.upstream_tls = (
            Reloadable("upstream", lambda: client_context(config.upstream_tls), config.upstream_tls)
            if config.upstream.tls
            else None
        )
        self._note_expiries()

    # ------------------------------------------------------------------------ bookkeeping

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed", extra={"task": task.get_name(), "error": repr(task.exception())})
        self._check_idle()

    def next_connection_id(self) -> int:
        self._connection_ids += 1
        return self._connection_ids

    def connection_opened(self, conn: ClientConnection) -> None:
        self._connections.add(conn)
        self.observer.connection_opened(conn.listener)
        self._idle.clear()

    def connection_closed(self, conn: ClientConnection) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            self.observer.connection_closed(conn.listener)
            conn.session.close()
        self._check_idle()

    def track_orphan(self, conn: ClientConnection) -> None:
        self._orphans.add(conn)

    def untrack_orphan(self, conn: ClientConnection) -> None:
        self._orphans.discard(conn)

    def _check_idle(self) -> None:
        if not self._connections and not self._tasks:
            self._idle.set()

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def open_connections(self) -> tuple[ClientConnection, ...]:
        """The client connections open now (the status page counts them by user and listener)."""
        return tuple(self._connections)

    async def _sweep_idle(self, timeout: float) -> None:
        """Redis's ``timeout``: close a client that sent nothing for ``timeout`` seconds, unless it is subscribed or
        blocked in a pop (as in Redis). Counted by request bytes between sweeps: nothing on the hot path."""
        interval = min(1.0, timeout / 4)
        while True:
            try:
                await asyncio.wait_for(self._stop.wait(), interval)
                return
            except TimeoutError:
                pass
            for conn in list(self._connections):
                session = conn.session
                if conn.bytes_in != conn.idle_mark or session.subscribed or session.blocked or session.pending:
                    conn.idle_mark, conn.idle_sweeps = conn.bytes_in, 0
                    continue
                conn.idle_sweeps += 1
                if conn.idle_sweeps * interval >= timeout:
                    self.observer.idle_disconnects += 1
                    log.info("closing an idle client", extra={"peer": conn.peer, "idle_timeout": timeout})
                    conn.close()

    # ------------------------------------------------------------------------ Sentinel

    def _master_switched(self, old: tuple[str, int] | None, new: tuple[str, int]) -> None:
        """The Sentinels moved the master. New connections go to ``new`` at once; every connection bound to another
        address is carried over to it where it can be (ClientConnection.master_switched) or closed cleanly, so that
        nothing more is written to the demoted one."""
        self.upstream_addr = new
        self._hold_until = 0.0
        self._settled.set()
        if old is None:
            return
        self.observer.upstream_error("failover")
        moved = [c for c in self._connections if c.upstream_addr not in (None, new)]
        log.warning(
            "master switched; closing the connections bound to the old one",
            extra={"old": f"{old[0]}:{old[1]}", "new": f"{new[0]}:{new[1]}", "connections": len(moved)},
        )
        for conn in moved:
            conn.master_switched()

    def outage_started(self) -> None:
        """A connection is being carried over a lost upstream: the outage is logged once, with its length at the end."""
        if self._outage_since is None:
            self._outage_since = asyncio.get_running_loop().time()
            log.warning("upstream lost; carrying client connections over to new upstream connections")
        if self._loaded.is_set():
            self._loaded.clear()
            self.spawn(self._probe_loaded(), "loading probe")

    def reply_lost(self, peer_host: str, user: str | None, relayed: bool = False) -> None:
        """A client's connection was closed with a transaction of its cut when its upstream went
        (Redis killed, a failover). To a Celery worker that is most often an ack (MULTI/ZREM/HDEL/EXEC), and kombu
        frees a prefetch slot only when an ack succeeds: each such ack takes a slot for good, and once
        ``concurrency`` of them are gone the worker consumes nothing more, alive and silent. Straight to Redis, the
        same outage also breaks the worker's other connections and its consumer restarts, which resets its slots;
        carried over, they do not break. So once Redis answers again (_reset_consumers), the subscribed and
        blocked-pop connections that the same host and user had open then are closed: kombu polls those (the
        remote-control subscription even with every slot gone), sees the connection error and restarts its
        consumer, which restores its unacknowledged messages."""
        if not self.config.reattach_reset_consumers or self.draining:
            return
        key = (peer_host, user)
        fresh = key not in self._lost_reply
        self._lost_reply[key] = self._connection_ids
        if fresh and not relayed and self.relay_reply_lost is not None:
            self.relay_reply_lost(peer_host, user)  # once per client and outage, not once per connection
        if self._resetting is None:
            self._resetting = self.spawn(self._reset_consumers(), "consumer reset")

    async def _reset_consumers(self) -> None:
        try:
            await self._until_answering()  # down longer than upstream_wait: the reset is due all the same
        finally:
            self._resetting = None  # cancelled (a stop): nothing is closed
        lost, self._lost_reply = self._lost_reply, {}
        if self.draining:
            return
        for conn in list(self._connections):
            session = conn.session
            if conn.left or conn.id > lost.get((conn.peer_host, session.user), 0):
                continue
            if not (session.subscribed or session.blocked):
                continue
            state = "subscribed" if session.subscribed else "blocked_pop"
            self.observer.reattach_reset(state)
            log.info(
                "closing a carried-over connection of a client whose transaction was cut, so its consumer restarts",
                extra={"peer": conn.peer, "state": state},
            )
            conn.close()

    async def _until_answering(self) -> bool:
        """PING on a side connection until Redis answers other than -LOADING (True), for at most upstream_wait (at
        least 1 s) or until a stop (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self.config.upstream_wait, 1.0)
        delay = 0.05
        # Also ends on a stop: on Python 3.11 wait_for can swallow the drain's cancellation (see sentinel.close).
        while loop.time() < deadline and not self._stop.is_set():
            try:
                (reply,) = await self.side_commands([[b"PING"]])
                if not reply.startswith(b"-LOADING"):
                    return True
            except (TimeoutError, OSError, ConnectionError, ValueError):
                pass  # not up yet, or killed again while we asked
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        return False

    async def _probe_loaded(self) -> None:
        """A restarted Redis accepts connections while it loads its data, and answers -LOADING to nearly every
        command meanwhile: to kombu a connection error, on which a Celery worker restarts its consumer (the crash
        issue 9 is about). Wait until it answers (_until_answering), so that carried-over connections resume only
        then."""
        try:
            if not await self._until_answering() and not self._stop.is_set():
                log.warning("upstream still loading its data after upstream_wait; carrying on")
        finally:
            self._loaded.set()

    async def upstream_loaded(self, deadline: float) -> None:
        """Return once Redis has loaded its data after an outage (see _probe_loaded), or at ``deadline``."""
        if self._loaded.is_set():
            return
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._loaded.wait(), remaining)

    def outage_ended(self) -> None:
        if self._outage_since is not None:
            took = asyncio.get_running_loop().time() - self._outage_since
            self._outage_since = None
            log.warning("upstream back", extra={"outage_s": round(took, 3)})

    def _failover_started(self) -> None:
        """A Sentinel is promoting a replica: stop writing to the current master now (what it accepts from here on
        may be lost), by closing its connections and holding new ones until the switch (bounded)."""
        loop = asyncio.get_running_loop()
        self._hold_until = loop.time() + max(self.config.upstream_wait, 1.0)
        self._settled.clear()
        log.warning("failover started; holding new connections until the new master is known")
        for conn in [c for c in self._connections if c.upstream_addr is not None]:
            conn.master_switched()

    async def master_settled(self) -> None:
        """Return once no failover is in progress (or its hold has run out)."""
        loop = asyncio.get_running_loop()
        remaining = self._hold_until - loop.time()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), remaining)

    # ------------------------------------------------------------------------ TLS

    def upstream_tls_args(self, host: str | None = None) -> dict[str, Any]:
        """Keyword arguments for create_connection/open_connection to the upstream: TLS when it is rediss://."""
        if self.upstream_tls is None:
            return {}
        cfg = self.config.upstream_tls
        return {
            "ssl": self.upstream_tls.context,
            "server_hostname": cfg.server_hostname or host or self.upstream_addr[0],
            "ssl_handshake_timeout": self.config.connect_timeout,
            "ssl_shutdown_timeout": SHUTDOWN_TIMEOUT,
        }

    def handshake_started(self, coro: Coroutine[Any, Any, None], peer: str) -> None:
        """A TLS handshake (tls_listener): tracked, and cancelled at once by a drain."""
        if self.draining:
            coro.close()
            return
        task = self.spawn(coro, f"tls handshake {peer}")
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _note_expiries(self) -> None:
        for material in (self.tls, self.upstream_tls):
            if material is not None:
                for key in [k for k in self.observer.tls_expiry if k[0] == material.listener]:
                    del self.observer.tls_expiry[key]
                for role, t in material.certificate_expiries().items():
                    self.observer.tls_expiry[(material.listener, role)] = t

    def reload_tls(self, new: Config | None = None) -> None:
        """Rebuild the TLS contexts (from ``new``'s settings when given). New handshakes use them; established
        connections keep theirs. A failure keeps the old material, logged and counted."""
        builds: list[tuple[Reloadable | None, Material | None, Callable[[], ssl.SSLContext] | None]] = [
            (self.tls, None, None),
            (self.upstream_tls, None, None),
        ]
        if new is not None and new.tls_listen is not None:
            builds[0] = (self.tls, new.tls, lambda: server_context(new.tls))
        if new is not None and new.upstream.tls:
            builds[1] = (self.upstream_tls, new.upstream_tls, lambda: client_context(new.upstream_tls))
        for material, settings, build in builds:
            if material is not None:
                self._reload_material(material, "SIGHUP", settings, build)
        self._note_expiries()

    def _reload_material(
        self,
        material: Reloadable,
        why: str,
        settings: Material | None = None,
        build: Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        """One reload: counted either way; a failure keeps the old certificate and says why."""
        extra: dict[str, Any] = {"listener": material.listener, "trigger": why}
        try:
            material.reload(settings, build)
        except ConfigError as exc:
            self.observer.tls_reloaded(material.listener, ok=False)
            extra.update(key=exc.key, error=exc.why)
            log.error("TLS reload failed; keeping the old certificate", extra=extra)
            return
        self.observer.tls_reloaded(material.listener, ok=True)
        log.info("TLS material reloaded", extra=extra)

    async def _watch_tls(self, interval: float) -> None:
        """Reload when a certificate, key or CA file changes on disk (Kubernetes secret rotation)."""
        while True:
            try:
                await asyncio.wait_for(self._stop.wait(), interval)
                return
            except TimeoutError:
                pass
            for material in (self.tls, self.upstream_tls):
                if material is not None and material.changed():
                    self._reload_material(material, "files changed")
                    self._note_expiries()

    # ------------------------------------------------------------------------ requeue

    async def side_commands(
        self, commands: list[list[bytes]], address: tuple[str, int] | None = None
    ) -> list[bytes]:
        """Run commands on a short-lived connection of the proxy's own (with its upstream AUTH/SELECT) to the
        master (or ``address``); the raw replies to ``commands``. Raises OSError/TimeoutError/ConnectionError when
        Redis cannot be reached."""
        up = self.config.upstream
        host, port = address or self.upstream_addr
        handshake = up.handshake()
        payload = b"".join(resp.encode_command(c) for c in handshake + commands)
        timeout = self.config.connect_timeout
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, **self.upstream_tls_args(host)), timeout
        )
        try:
            try:
                writer.write(payload)
            except RuntimeError as exc:  # uvloop: the transport closed under us (Redis killed as we connected)
                raise ConnectionError(str(exc)) from None
            parser = resp.ReplyParser()
            replies: list[bytes] = []
            while len(replies) < len(handshake) + len(commands):
                data = await asyncio.wait_for(reader.read(65536), timeout)
                if not data:
                    raise ConnectionError("upstream closed the side connection")
                parser.feed(data)
                while (frame := parser.next()) is not None:
                    replies.append(frame[1])
        finally:
            writer.close()
            if self.upstream_tls is not None:
                # Let TLS finish its close_notify: an SSL transport dropped half-closed logs a "Fatal error".
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), SHUTDOWN_TIMEOUT)
        for reply in replies[: len(handshake)]:
            if reply.startswith(b"-"):
                raise ConnectionError(reply[1:].strip().decode("utf-8", "replace"))
        return replies[len(handshake) :]

    def kill_orphan(self, upstream_id: int, client_addr: bytes, address: tuple[str, int]) -> None:
        """Close, on the Redis at ``address``, an upstream connection of ours that we lost but Redis may still hold
        (a blocked pop in it would take an element for nobody): CLIENT KILL ID with ADDR (as Redis saw it, from
        CLIENT INFO), so that after a restart (IDs start again) it matches no one else."""
        self.spawn(self._kill_orphan(upstream_id, client_addr, address), f"kill orphan {upstream_id}")

    async def _kill_orphan(self, upstream_id: int, client_addr: bytes, address: tuple[str, int]) -> None:
        cmd = [b"CLIENT", b"KILL", b"ID", str(upstream_id).encode(), b"ADDR", client_addr]
        delay = 0.1
        for _ in range(KILL_ORPHAN_ATTEMPTS):
            try:
                (reply,) = await self.side_commands([cmd], address)
            except (TimeoutError, OSError, ConnectionError):
                await asyncio.sleep(delay)  # Redis restarting: the old connection died with it anyway
                delay = min(delay * 2, 2.0)
                continue
            if reply.startswith(b":1"):
                log.warning("closed an upstream connection Redis still held for us", extra={"id": upstream_id})
            elif reply.startswith(b"-"):
                log.warning("CLIENT KILL of a lost upstream connection failed", extra={"error": reply.strip().decode()})
            return

    def requeue(self, commands: Requeue, why: str) -> None:
        """Put popped elements back, on a connection of their own."""
        self.spawn(self._requeue(commands, why), "requeue")

    async def _requeue(self, commands: Requeue, why: str) -> None:
        delay = 0.1
        elements = sum(len(c) - 2 for c in commands)
        for attempt in range(REQUEUE_ATTEMPTS):
            await self.master_settled()  # never put an element back on a master being demoted
            try:
                replies = await self.side_commands(commands)
            except (TimeoutError, OSError, ConnectionError) as exc:
                log.warning("requeue attempt failed", extra={"attempt": attempt + 1, "error": str(exc)})
                await asyncio.sleep(delay)  # back off before the next attempt
                delay = min(delay * 2, 2.0)
                continue
            errors = [r.strip().decode("utf-8", "replace") for r in replies if r.startswith(b"-")]
            if errors:
                log.error("requeue command failed", extra={"errors": errors})
                self.observer.requeue_failed(len(errors))
            for command, reply in zip(commands, replies, strict=True):
                if not reply.startswith(b"-"):
                    self.observer.requeued(command[1], len(command) - 2)
            log.warning("requeued popped elements", extra={"elements": elements, "why": why})
            return
        self.observer.requeue_failed(elements)
        for c in commands:
            log.error(
                "could not requeue element; it is in this log line only",
                extra={"command": [a.decode("utf-8", "backslashreplace") for a in c]},
            )

    def unblock(self, upstream_id: int, done: asyncio.Event, address: tuple[str, int]) -> None:
        """End the blocked command of upstream connection ``upstream_id`` (on the Redis at ``address``: after a
        failover, the old master) as a timeout."""
        self.spawn(self._unblock(upstream_id, done, address), f"unblock {upstream_id}")

    async def _unblock(self, upstream_id: int, done: asyncio.Event, address: tuple[str, int]) -> None:
        # The blocking command may still be on its way to Redis when the first UNBLOCK lands (it then answers 0
        # and the command blocks after it): try again until the connection is done, with a bound.
        cmd = [b"CLIENT", b"UNBLOCK", str(upstream_id).encode(), b"TIMEOUT"]
        for _ in range(UNBLOCK_ATTEMPTS):
            try:
                await self.side_commands([cmd], address)
            except (TimeoutError, OSError, ConnectionError) as exc:
                log.warning("CLIENT UNBLOCK failed", extra={"error": str(exc)})
            try:
                await asyncio.wait_for(done.wait(), UNBLOCK_RETRY_SECONDS)
                return
            except TimeoutError:
                continue

    # ------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        su = self.config.upstream.sentinel
        if su is not None:
            ctx = self.upstream_tls.context if self.upstream_tls is not None else None
            self.sentinel = SentinelWatcher(
                su, self._master_switched, sentinel_ssl=ctx, redis_ssl=ctx, timeout=self.config.connect_timeout
            )
            self.sentinel.on_failover = self._failover_started
            self.upstream_addr = await self.sentinel.discover()  # raises SentinelError: nothing to serve without it
            log.info("master found", extra={"master": f"{self.upstream_addr[0]}:{self.upstream_addr[1]}"})
            self.sentinel.start()
        addr = self.config.listen
        if addr is not None:
            server = await loop.create_server(
                lambda: ClientConnection(self), addr.host, addr.port, reuse_address=True, backlog=self.config.backlog,
                reuse_port=self.config.workers > 1,  # --workers N: every worker listens on the same port
            )  # fmt: skip
            self._servers.append(server)
            for sock in getattr(server, "sockets", ()):
                name = sock.getsockname()
                where, upstream = f"{name[0]}:{name[1]}", str(self.config.upstream)
                log.info("listening", extra={"listener": "main", "address": where, "upstream": upstream})
        if self.config.tls_listen is not None:
            listener = TLSListener(self, self.config.tls_listen)
            await listener.start()
            self._tls_listeners.append(listener)
            log.info("listening", extra={"listener": "tls", "address": str(self.config.tls_listen)})
        if self.config.idle_timeout > 0:
            self.spawn(self._sweep_idle(self.config.idle_timeout), "idle sweep")
        intervals = [
            m.material.watch_interval  # type: ignore[attr-defined]
            for m in (self.tls, self.upstream_tls)
            if m is not None and m.material.watch_interval > 0  # type: ignore[attr-defined]
        ]
        if intervals:
            self.spawn(self._watch_tls(min(intervals)), "tls file watch")
        maddr = self.config.metrics_listen
        if maddr is not None:
            self._endpoints = HTTPEndpoints(
                build_registry(self.observer), self.ready, status=StatusBoard(self),
                auth_token=self.config.metrics.auth_token,
            )  # fmt: skip
            await self._endpoints.start(maddr.host, maddr.port)
            # Readiness and queue depth exist only for the endpoints: without them, no side connection every few
            # seconds and no "upstream does not answer" log lines.
            self.spawn(self._poll_upstream(), "upstream poller")

    def auth_backoff(self, host: str) -> float:
        """One more failed authentication from ``host``: how long to wait before reading from it again. Bounded, and
        the table of peers is bounded too (oldest dropped); a success does not reset it, time does."""
        now = asyncio.get_running_loop().time()
        failures, last = self._auth_failures.pop(host, (0, now))
        if now - last > AUTH_BACKOFF_MAX * 30:
            failures = 0  # quiet for a while: start over
        failures += 1
        self._auth_failures[host] = (failures, now)
        while len(self._auth_failures) > AUTH_FAILURE_PEERS:
            del self._auth_failures[next(iter(self._auth_failures))]
        return _backoff(failures)

    def auth_delay(self, host: str) -> float:
        """How long a new connection from ``host`` waits before it is read, after its recent failures."""
        failures, last = self._auth_failures.get(host, (0, 0.0))
        if not failures or asyncio.get_running_loop().time() - last > AUTH_BACKOFF_MAX * 30:
            return 0.0
        return _backoff(failures)

    def ready(self) -> tuple[bool, str]:
        """/readyz: serving, and the upstream answered the last poll."""
        if self.draining:
            return False, "draining"
        if not self.upstream_up:
            return False, f"upstream {self.upstream_addr[0]}:{self.upstream_addr[1]} does not answer"
        return True, "ready"

    @property
    def metrics_ports(self) -> list[int]:
        return self._endpoints.ports if self._endpoints is not None else []

    async def _poll_upstream(self) -> None:
        """Every depth_poll_interval: PING the upstream on a side connection (readiness, upstream_up) and, when
        traffic is observed, LLEN every queue key seen, in the same round trip. Never on the scrape path."""
        interval = self.config.metrics.depth_poll_interval
        while not self._stop.is_set():
            keys = self.traffic_observer.queues_to_poll() if self.traffic_observer is not None else []
            try:
                replies = await self.side_commands([[b"PING"]] + [[b"LLEN", k] for k in keys])
                up = replies[0].startswith(b"+")
            except (TimeoutError, OSError, ConnectionError):
                up, replies = False, []
            if up:
                for key, reply in zip(keys, replies[1:], strict=False):
                    if reply.startswith(b":"):
                        self.observer.set_depth(key, int(reply[1:]))
            if up != self.upstream_up:
                log.info("upstream is up" if up else "upstream does not answer")
            self.upstream_up = up
            self.observer.upstream_up = int(up)
            self.observer.audit_written, self.observer.audit_dropped = self.audit.written, self.audit.dropped
            self.observer.sweep()
            try:
                await asyncio.wait_for(self._stop.wait(), interval)
            except TimeoutError:
                pass

    @property
    def ports(self) -> list[int]:
        plain = [s.getsockname()[1] for srv in self._servers for s in getattr(srv, "sockets", ())]
        return plain + [listener.port for listener in self._tls_listeners]

    def install_signals(self, reload: Callable[[], Config] | None = None) -> None:
        """SIGTERM/SIGINT drain; SIGHUP calls ``reload`` for a new config and applies its users and rules."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._sigint)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, self._sighup, reload)

    def _sighup(self, reload: Callable[[], Config]) -> None:
        try:
            new = reload()
        except ConfigError as exc:
            self.observer.reload_failures += 1
            for material in (self.tls, self.upstream_tls):
                prefix = "upstream_tls." if material is not None and material.listener == "upstream" else "tls."
                if material is not None and exc.key.startswith(prefix):
                    self.observer.tls_reloaded(material.listener, ok=False)  # its certificate stays, as all else
            log.error("reload failed; keeping the old users and rules", extra={"key": exc.key, "error": exc.why})
            self.audit.event("reload", ok=False, error=str(exc))
            return
        self.reload_users(new)
        self.reload_tls(new)
        # Settings read per connection (TLS identity mapping, handshake timeout, upstream_tls.server_hostname...)
        # come from the new config; listeners, the upstream address and limits need a restart.
        self.config = dataclasses.replace(
            self.config, tls=new.tls, upstream_tls=new.upstream_tls, acl_users=new.acl_users, users=new.users,
            acl=new.acl,
        )  # fmt: skip
        self.audit.event("reload", ok=True, users=len(self.authenticator.users))

    def reload_users(self, new: Config) -> None:
        """Apply a new config's users and rules without dropping connections: sessions see them from their next
        command (the table is updated in place); connections of a removed or disabled user are closed."""
        if self.policy is None and new.access_controlled:
            log.warning("reload: access control cannot be turned on without a restart; users not applied")
            self.observer.reload_failures += 1
            return
        self.authenticator.load(new.acl_users)
        closed = 0
        for conn in list(self._connections):
            user = conn.user
            if user is None:
                continue
            u = self.authenticator.get(user)
            if u is None or not u.enabled:
                conn.close()
                closed += 1
        log.info("reloaded users and rules", extra={"users": len(self.authenticator.users), "closed": closed})

    def _sigint(self) -> None:
        if self._stop.is_set():
            log.warning("second SIGINT: exiting at once")
            raise SystemExit(130)
        self.request_stop("SIGINT")

    def request_stop(self, why: str = "requested") -> None:
        if not self._stop.is_set():
            log.info("shutdown requested", extra={"signal": why})
            self._stop.set()

    async def serve(self) -> bool:
        """Serve until asked to stop, then drain. True if the drain finished within its bound."""
        await self._stop.wait()
        return await self.drain()

    async def drain(self) -> bool:
        self.draining = True
        for server in self._servers:
            server.close()
        for listener in self._tls_listeners:
            listener.close()
        if self.sentinel is not None:
            await self.sentinel.close()
        for task in list(self._handshakes):
            task.cancel()  # a handshake in progress is not a client yet: nothing of its is in flight
        for conn in list(self._connections):
            conn.drain()
        self._check_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout)
            clean = True
        except TimeoutError:
            log.warning("drain timed out; closing what is left", extra={"connections": len(self._connections)})
            clean = False
        for conn in list(self._connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        if self._endpoints is not None:
            await self._endpoints.close()
        self.audit.close()
        o = self.observer
        log.info(
            "stopped",
            extra={
                "clean": clean,
                "connections_total": sum(o.client_connections_total.values()),
                "protocol_errors": o.protocol_errors,
                "auth_failures": o.auth_failures,
                "upstream_errors": o.upstream_errors,
                "requeued": sum(q.requeued for q in o.queues.values()),
                "requeue_failures": o.requeue_failures,
            },
        )
        return clean
