"""Listeners and lifecycle: start, serve, drain, stop; signals; the side connection that requeues elements.

Every task is tracked (``spawn``); drain waits on events and a bound, never on a sleep loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from . import resp
from .commands import Requeue
from .config import Config
from .proxy import ClientConnection

log = logging.getLogger("brokerproxy.server")

#: Attempts to put requeued elements back before giving up (and logging every element that could not be).
REQUEUE_ATTEMPTS = 6
#: CLIENT UNBLOCK attempts for a pop left behind by a gone client, and the wait between them.
UNBLOCK_ATTEMPTS = 20
UNBLOCK_RETRY_SECONDS = 0.25


@dataclass
class Stats:
    """Counters of what went wrong and what was saved. The metrics endpoint exports them."""

    connections_total: int = 0
    protocol_errors: int = 0
    auth_failures: int = 0
    upstream_connect_failures: int = 0
    upstream_protocol_errors: int = 0
    requeued_elements: int = 0
    requeue_failures: int = 0


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.authenticator = config.authenticator()
        self.stats = Stats()
        self.draining = False
        self._connections: set[ClientConnection] = set()
        self._orphans: set[ClientConnection] = set()  # client gone, reading upstream to the end
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()

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

    def connection_opened(self, conn: ClientConnection) -> None:
        self._connections.add(conn)
        self.stats.connections_total += 1
        self._idle.clear()

    def connection_closed(self, conn: ClientConnection) -> None:
        self._connections.discard(conn)
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

    # ------------------------------------------------------------------------ requeue

    async def side_commands(self, commands: list[list[bytes]]) -> list[bytes]:
        """Run commands on a short-lived connection of the proxy's own (with its upstream AUTH/SELECT); the raw
        replies to ``commands``. Raises OSError/TimeoutError/ConnectionError when Redis cannot be reached."""
        up = self.config.upstream
        handshake = up.handshake()
        payload = b"".join(resp.encode_command(c) for c in handshake + commands)
        timeout = self.config.connect_timeout
        reader, writer = await asyncio.wait_for(asyncio.open_connection(up.host, up.port), timeout)
        try:
            writer.write(payload)
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
        for reply in replies[: len(handshake)]:
            if reply.startswith(b"-"):
                raise ConnectionError(reply[1:].strip().decode("utf-8", "replace"))
        return replies[len(handshake) :]

    def requeue(self, commands: Requeue, why: str) -> None:
        """Put popped elements back, on a connection of their own."""
        self.spawn(self._requeue(commands, why), "requeue")

    async def _requeue(self, commands: Requeue, why: str) -> None:
        delay = 0.1
        elements = sum(len(c) - 2 for c in commands)
        for attempt in range(REQUEUE_ATTEMPTS):
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
                self.stats.requeue_failures += len(errors)
            self.stats.requeued_elements += elements
            log.warning("requeued popped elements", extra={"elements": elements, "why": why})
            return
        self.stats.requeue_failures += len(commands)
        for c in commands:
            log.error(
                "could not requeue element; it is in this log line only",
                extra={"command": [a.decode("utf-8", "backslashreplace") for a in c]},
            )

    def unblock(self, upstream_id: int, done: asyncio.Event) -> None:
        """End the blocked command of upstream connection ``upstream_id`` as a timeout."""
        self.spawn(self._unblock(upstream_id, done), f"unblock {upstream_id}")

    async def _unblock(self, upstream_id: int, done: asyncio.Event) -> None:
        # The blocking command may still be on its way to Redis when the first UNBLOCK lands (it then answers 0
        # and the command blocks after it): try again until the connection is done, with a bound.
        cmd = [b"CLIENT", b"UNBLOCK", str(upstream_id).encode(), b"TIMEOUT"]
        for _ in range(UNBLOCK_ATTEMPTS):
            try:
                await self.side_commands([cmd])
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
        addr = self.config.listen
        server = await loop.create_server(lambda: ClientConnection(self), addr.host, addr.port, reuse_address=True)
        self._servers.append(server)
        for sock in getattr(server, "sockets", ()):
            name = sock.getsockname()
            log.info("listening", extra={"address": f"{name[0]}:{name[1]}", "upstream": str(self.config.upstream)})

    @property
    def ports(self) -> list[int]:
        return [s.getsockname()[1] for srv in self._servers for s in getattr(srv, "sockets", ())]

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._sigint)

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
        log.info("stopped", extra={"clean": clean, **self.stats.__dict__})
        return clean
