"""Asyncio glue for one client connection and its pinned upstream connection.

This layer only moves bytes and carries out the session's actions: open the upstream connection, write, pause
and resume reading for backpressure, close, and hand requeues to the server. Every decision is in ``session``.

Teardown, the part that keeps messages safe:

* client gone, no pop outstanding: close the upstream connection;
* client gone with a pop outstanding: half-close upstream (Redis then unblocks a waiting pop without taking
  anything) and read to the end, so an element Redis already sent is not dropped; the session turns it into a
  requeue;
* pop replies the client's transport still held unsent when it died are requeued too;
* upstream gone: close the client (never reconnect a stateful connection behind its back).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import TYPE_CHECKING, cast

from . import resp
from .errors import ProtocolError
from .session import Audited, AuthFailed, Close, Denied, OpenUpstream, Session, UpstreamFailed

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("brokerproxy.proxy")


def keepalive(transport: asyncio.BaseTransport, idle: int) -> None:
    """TCP keepalive with probes after ``idle`` seconds of silence (Redis's tcp-keepalive), where the OS allows."""
    sock = transport.get_extra_info("socket")
    if not idle or sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:
        pass  # a socket type without TCP options (a test's unix socket): nothing to keep alive


#: Errors of a demoted master (sentinel://), at the start of a reply frame: at the start of a read or after a CRLF.
_DEMOTED = (b"-READONLY", b"-UNBLOCKED")


def _demoted_error(data: bytes) -> bool:
    # A message body may contain the words; a reply frame starting with them follows a frame boundary.
    return data.startswith(_DEMOTED) or b"\r\n-READONLY" in data or b"\r\n-UNBLOCKED" in data


class _Detached:
    """The owner of an upstream connection dropped by a failover: whatever the old master still sends is nobody's."""

    def upstream_data(self, data: bytes) -> None:
        pass

    def upstream_lost(self, exc: Exception | None) -> None:
        pass

    def pause_client_reading(self, why: str) -> None:
        pass

    def resume_client_reading(self, why: str) -> None:
        pass


_DETACHED = _Detached()


class _UpstreamProtocol(asyncio.Protocol):
    """Forwards upstream events to the client connection that owns it."""

    def __init__(self, owner: ClientConnection) -> None:
        self.owner: ClientConnection | _Detached = owner

    def data_received(self, data: bytes) -> None:
        self.owner.upstream_data(data)

    def eof_received(self) -> bool | None:
        return False  # let the transport close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_client_reading("upstream")

    def resume_writing(self) -> None:
        self.owner.resume_client_reading("upstream")


#: Why reattach can fail (Session.reattach) with a transaction of the client's cut: MULTI or WATCH in progress.
_IN_TRANSACTION = frozenset({"multi", "watch"})
#: Owed replies that mean a transaction was cut (its EXEC sent, or MULTI and all in one pipeline).
_TRANSACTION_REPLIES = frozenset({"multi", "exec"})

#: The first bytes of a TLS ClientHello (handshake record, SSL 3.0/TLS 1.x): a TLS client on the plaintext port.
_TLS_HELLO = b"\x16\x03"


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: Server, listener: str = "main", identity: str | None = None) -> None:
        self.server = server
        self.listener = listener  # "main" (plaintext) or "tls": a metric label
        self._identity = identity  # the user a verified client certificate maps to
        self.session: Session
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self._pending_up = bytearray()  # requests written before the upstream connection is up
        self._connecting: asyncio.Task[None] | None = None
        self._upstream_error: str | None = None
        self._client_closed = False  # the client transport is gone
        self._left = False  # the client is gone (EOF or transport lost): nothing more is written to it
        self._draining_upstream = False  # half-closed after the client left, reading to the end
        self._paused_by: set[str] = set()
        self._close_after_flush = False
        self._unblock_sent = False
        self.upstream_done = asyncio.Event()  # set when the upstream connection has closed
        self._close_timer: asyncio.TimerHandle | None = None
        self._auth_timer: asyncio.TimerHandle | None = None
        self._held: bytearray | None = None  # what the client sent while it backs off
        self._bytes_in = 0
        self._bytes_out = 0
        self.id = 0
        self._upstream_paused = False
        # With a sentinel:// upstream, replies are checked for a demoted master's errors (never otherwise: a plain
        # upstream's -READONLY is forwarded as Redis sent it).
        self._demoted_marks: bool | None = True if server.config.upstream.sentinel is not None else None
        self.peer = "?"
        self.peer_host = "?"
        self.upstream_addr: tuple[str, int] | None = None  # where this connection's upstream went
        self.rejected = False  # turned away (max_clients): none of the rest applies
        self._limits_on = False
        self._soft_since: float | None = None  # when the output buffer went over the soft limit
        self._last_unsent = 0  # the write buffer's size when last looked at (see connection_lost)
        self._upstream_counted = False  # in brokerproxy_upstream_connections
        self._demoted = False  # closed by a failover (sentinel://): never carried over to the old master
        self.idle_mark = -1  # bytes_in at the last idle sweep (server._sweep_idle)
        self.idle_sweeps = 0  # sweeps in a row that saw no new request bytes

    # ------------------------------------------------------------------------ client transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        cfg = self.server.config
        if self.server.connections >= cfg.max_clients:
            # As Redis: the error, then the close; this connection never counts as served.
            self.rejected = True
            self.server.observer.client_rejected("max_clients")
            transport.write(b"-ERR max number of clients reached\r\n")
            transport.close()
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=cfg.write_buffer_high_water)
        keepalive(transport, cfg.tcp_keepalive)
        # Output limits (Redis's client-output-buffer-limit), checked only when one applies to this client's class.
        self._limits_on = cfg.client_output_buffer_limit_normal.enabled or cfg.client_output_buffer_limit_pubsub.enabled
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.peer_host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        cfg = self.server.config
        sock = transport.get_extra_info("sockname")
        local = f"{sock[0]}:{sock[1]}" if isinstance(sock, tuple) else str(sock)
        self.session = Session(
            self.server.authenticator,
            upstream_handshake=cfg.upstream.handshake(),
            limits=cfg.limits,
            policy=self.server.policy,
            observer=self.server.traffic_observer,
            acl_log=self.server.acl_log,
            client_info=f"addr={self.peer} laddr={local}",
            audited=self.server.audited,
            identity=self._identity,
        )
        self.id = self.server.next_connection_id()
        self._opened = asyncio.get_running_loop().time()
        self._audit_user = self.session.user
        audit = self.server.audit
        if audit.enabled:
            audit.event("connection_opened", self.id, peer=self.peer, listener=local)
        self.server.connection_opened(self)
        if self.session.user is None:
            # Authenticate within auth_timeout, or be closed (a connection that never authenticates holds a slot).
            loop = asyncio.get_running_loop()
            self._auth_timer = loop.call_later(cfg.auth_timeout, self._auth_timed_out)
            delay = self.server.auth_delay(self.peer_host)
            if delay > 0:  # this address failed to authenticate lately: it waits before it is heard
                self._hold_for(delay)
        self._pump()

    def _hold_for(self, delay: float) -> None:
        """Keep what the client sends unprocessed for ``delay`` seconds (reading pauses once anything arrives)."""
        if self._held is None:
            self._held = bytearray()
            asyncio.get_running_loop().call_later(delay, self._release)

    def _release(self) -> None:
        held, self._held = self._held, None
        self.resume_client_reading("auth-backoff")
        if held and not self._left:
            self.data_received(bytes(held))

    def _auth_timed_out(self) -> None:
        if self.session.user is None and self.transport is not None and not self._left:
            log.info("client did not authenticate in time", extra={"peer": self.peer})
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        if self._held is not None:  # backing off after failed authentications
            self._held += data
            self.pause_client_reading("auth-backoff")
            return
        if not self._bytes_in and data.startswith(_TLS_HELLO) and self.listener == "main":
            # A TLS client on the plaintext port: it cannot read a RESP error, so close, count and log once.
            self.server.observer.tls_handshake_failed(self.listener, "plaintext_port")
            log.info("TLS handshake on the plaintext port; closing", extra={"peer": self.peer})
            if self.transport is not None:
                self.transport.abort()
            return
        self.server.observer.bytes_in += len(data)
        self._bytes_in += len(data)
        if self._upstream_error is not None:
            self._fail_upstream(self._upstream_error)
            return
        self.session.from_client(data)
        self._pump()
        if self.session.user != self._audit_user:  # authenticated (or re-authenticated, or RESET)
            self._audit_user = self.session.user
            if self.server.audit.enabled and self._audit_user is not None:
                self.server.audit.event("auth", self.id, peer=self.peer, user=self._audit_user, ok=True)

    def eof_received(self) -> bool | None:
        if self.rejected:
            return False
        # Redis treats a client's EOF as the client gone; so does the proxy, at once: a pop reply that arrives
        # from now on must be requeued, not written to a transport that is closing.
        self._client_left()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rejected:
            return
        self._client_closed = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        transport = self.transport
        # asyncio and uvloop empty the write buffer before calling connection_lost, so its size here is 0: use what
        # was still buffered when last looked at (after each write of a pop reply, and on resume_writing). If it
        # drained since, those pops are put back although sent: a duplicate, never a loss.
        unsent = max(transport.get_write_buffer_size() if transport is not None else 0, self._last_unsent)
        requeue = self.session.undelivered(unsent) if unsent else []
        if requeue:
            self.server.requeue(requeue, "client gone before the reply was sent")
        self._client_left()
        audit = self.server.audit
        if audit.enabled:
            audit.event(
                "connection_closed", self.id, peer=self.peer, user=self.session.user,
                duration_s=round(asyncio.get_running_loop().time() - self._opened, 3),
                bytes_in=self._bytes_in, bytes_out=self._bytes_out,
            )  # fmt: skip
        if not self._draining_upstream:
            self.server.connection_closed(self)

    def _client_left(self) -> None:
        if self._left:
            return
        self._left = True
        outstanding_pop = self.session.client_gone()
        up = self.upstream
        if up is not None and not up.is_closing() and outstanding_pop:
            # Keep the upstream connection until every reply owed is in (see Session.client_gone for why not a
            # half-close); a blocked pop is ended early with CLIENT UNBLOCK.
            self._draining_upstream = True
            if self._upstream_paused:
                up.resume_reading()
                self._upstream_paused = False
            self.server.track_orphan(self)
            self._unblock_if_blocked()
        else:
            self._close_upstream()

    def _unblock_if_blocked(self) -> None:
        """End a blocked command early, as a timeout, from a side connection (once the upstream id is known)."""
        if self._unblock_sent or not self.session.blocked or self.session.upstream_id is None:
            return
        self._unblock_sent = True
        assert self.upstream_addr is not None
        self.server.unblock(self.session.upstream_id, self.upstream_done, self.upstream_addr)

    def pause_writing(self) -> None:
        # The client reads slower than Redis answers: stop reading Redis until it catches up. Not for a subscriber
        # under an output limit: Redis would then buffer for it; the limit disconnects it instead (as Redis does).
        if self._limits_on and self.session.subscribed and self.server.config.client_output_buffer_limit_pubsub.enabled:
            return
        if self.upstream is not None and not self._upstream_paused:
            self.upstream.pause_reading()
            self._upstream_paused = True

    def resume_writing(self) -> None:
        if self.upstream is not None and self._upstream_paused:
            self.upstream.resume_reading()
            self._upstream_paused = False
        self._note_delivered()

    # ------------------------------------------------------------------------ upstream

    def _open_upstream(self) -> None:
        if self.upstream is not None or self._connecting is not None:
            return
        self._connecting = self.server.spawn(self._connect(), f"upstream connect {self.peer}")

    async def _connect(self) -> None:
        up = self.server.config.upstream
        loop = asyncio.get_running_loop()
        # Redis restarting or failing over: retry, with backoff, for up to upstream_wait seconds before the client
        # gets an error (what it sends meanwhile waits in _pending_up, bounded by pausing its reads).
        deadline = loop.time() + self.server.config.upstream_wait
        delay = 0.05
        while True:
            await self.server.master_settled()  # a failover in progress: wait for the new master
            await self.server.upstream_loaded(deadline)  # a restarted Redis still loading: its -LOADING kills workers
            host, port = self.upstream_addr = self.server.upstream_addr  # sentinel://: where the master is now
            tls = self.server.upstream_tls_args(host)
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: _UpstreamProtocol(self), host, port, **tls),
                    self.server.config.connect_timeout,
                )
                if (host, port) != self.server.upstream_addr:  # the master moved while we connected (sentinel://)
                    transport.get_protocol().owner = _DETACHED  # type: ignore[attr-defined]
                    transport.close()
                    continue
                break
            except (TimeoutError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                if not self._left and loop.time() + delay < deadline:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                timeout = isinstance(exc, TimeoutError)
                kind = "timeout" if timeout else "tls" if isinstance(exc, ssl.SSLError) else "connect"
                self.server.observer.upstream_error(kind)
                log.warning(
                    "upstream connect failed", extra={"peer": self.peer, "upstream": str(up), "error": reason}
                )
                self._connecting = None
                if not self._left:
                    self._upstream_unavailable(reason)
                return
        self._connecting = None
        if self._left:
            transport.close()  # the client left while we connected; nothing it sent was forwarded
            return
        transport.set_write_buffer_limits(high=self.server.config.write_buffer_high_water)
        self.upstream = transport
        self.server.outage_ended()
        keepalive(transport, self.server.config.tcp_keepalive)
        self.server.observer.upstream_connections += 1
        self._upstream_counted = True
        if self._pending_up:
            transport.write(bytes(self._pending_up))
            self._pending_up.clear()
        self.resume_client_reading("connect")

    def upstream_data(self, data: bytes) -> None:
        if self._demoted_marks is not None and not self._left and _demoted_error(data):
            # A demoted master (sentinel://): not an answer to forward but the connection lost under a failover.
            if self.server.config.reattach:
                self._note_cut_transaction("demoted")
            self._master_gone("demoted", data)
            return
        try:
            self.session.from_upstream(data)
        except ProtocolError as exc:
            log.error("protocol error from upstream", extra={"peer": self.peer, "error": str(exc)})
            self.server.observer.protocol_error("upstream")
            self._close_both()
            return
        if self._draining_upstream:
            requeue = self.session.take_requeues()
            if requeue:
                self.server.requeue(requeue, "client gone while a pop was outstanding")
            if self.session.pending == 0:
                self._close_upstream()
            else:
                self._unblock_if_blocked()
            return
        self._pump()
        if self.server.draining:
            self._unblock_if_blocked()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream = None
        self.upstream_done.set()
        if self._upstream_counted:  # not a connection closed before it was used (the client left meanwhile)
            self._upstream_counted = False
            self.server.observer.upstream_connections -= 1
        if not self._left and not self.session.closing and self._upstream_error is None and not self.server.draining:
            self.server.observer.upstream_error("reset" if exc is not None else "closed")
        if self._draining_upstream:
            self._draining_upstream = False
            self.server.untrack_orphan(self)
            if self._client_closed:
                self.server.connection_closed(self)
            return
        if self._upstream_error is not None:
            return  # the client gets the error as the reply to its next request
        if self._try_reattach():
            return
        if not self._left and self.transport is not None:
            # Redis went away under a live connection: close the client cleanly so it reconnects.
            if not self.session.closing:
                log.info("upstream closed, closing client", extra={"peer": self.peer})
            self.transport.close()

    def master_switched(self) -> None:
        """The Sentinels moved the master away from this connection's upstream. An idle, subscribed or blocked-pop
        connection is carried over to the new master, a blocked pop first answered as a timeout; the old connection
        is dropped unread. A blocked pop's old connection owes nothing either: from the failover's start the proxy
        writes nothing to the old master, so no element reaches the list that pop waits on (anything written there
        by others now is discarded when the old master resyncs as a replica). Any other connection is closed."""
        if self._left or self.transport is None:
            return
        if self.upstream is None and self._connecting is not None:
            return  # already on its way to the new master
        old = self.upstream
        if old is not None and self.server.config.reattach and not self._demoted:
            out, state = self.session.reattach()
            if out is not None:
                if out:
                    self.transport.write(out)  # the blocked pop's timeout
                old.get_protocol().owner = _DETACHED  # type: ignore[attr-defined]
                old.close()
                if self._upstream_counted:
                    self._upstream_counted = False
                    self.server.observer.upstream_connections -= 1
                self.upstream = None
                self.upstream_done = asyncio.Event()
                self._unblock_sent = False
                if self._upstream_paused:
                    self._upstream_paused = False
                self.server.observer.reattached(state)
                self._open_upstream()  # waits for the new master (server.master_settled)
                self._pump()
                return
            self.server.observer.reattach_failed(state)
            self._note_cut_transaction(state)
        self._master_gone("failover", b"")

    def _master_gone(self, why: str, data: bytes) -> None:
        """Close the client cleanly: a blocked pop is first answered as a timeout (kombu then polls again, on a
        new connection to the new master). Anything the old master still sends is handled as for a client that
        left: a popped element is requeued (to the new master), never delivered to nor lost with this client."""
        transport = self.transport
        assert transport is not None
        null = self.session.timeout_reply()
        if null is not None:
            transport.write(null)
        log.info(
            "closing a client bound to the old master",
            extra={"peer": self.peer, "why": why, "owed": self.session.owed()[:5]},
        )
        self._demoted = True
        self._client_left()
        if data:
            self.upstream_data(data)
        transport.close()

    def _note_cut_transaction(self, state: str) -> None:
        """This connection closes with a transaction of the client's cut (MULTI or WATCH in progress, or EXEC's reply
        owed): tell the server, which resets the client's consumer connections once Redis answers (reply_lost).
        kombu acks, rejects and records deliveries in transactions; an ack that fails leaks a prefetch slot. Other
        commands cut (a producer's LPUSH) leak nothing, and resetting for them would restart consumers for nothing."""
        if state in _IN_TRANSACTION or any(name in _TRANSACTION_REPLIES for name in self.session.owed()):
            self.server.reply_lost(self.peer_host, self.session.user)

    def _try_reattach(self) -> bool:
        """Redis went away under a live client: carry the connection over to a new upstream connection where the
        session can rebuild what it holds (issue 9); False where it cannot (the caller closes the client)."""
        server = self.server
        if self._left or self.transport is None or server.draining or not server.config.reattach:
            return False
        if self.transport.is_closing():
            return False  # being closed already (idle sweep, reload, a protocol error): nothing to carry over
        if self.session.closing or self._demoted:
            return False
        old_id, old_addr, where = self.session.upstream_id, self.session.upstream_addr, self.upstream_addr
        out, state = self.session.reattach()
        if out is None:
            server.observer.reattach_failed(state)
            self._note_cut_transaction(state)
            log.info(
                "upstream lost; the client's connection is closed",
                extra={"peer": self.peer, "why": state, "owed": self.session.owed()[:5]},
            )
            return False
        if out:
            self.transport.write(out)  # the blocked pop's timeout: what the client would have seen had no message come
        server.observer.reattached(state)
        server.outage_started()
        if state == "blocked_pop" and old_id is not None and old_addr is not None and where is not None:
            # Lost to us is not always gone from Redis (a network cut, a middlebox dropping the connection): there
            # the old pop stays blocked and would take the next element for nobody. End it; after a restart the
            # ID and address match no client (both filters must match).
            server.kill_orphan(old_id, old_addr, where)
        self.upstream_done = asyncio.Event()
        self._unblock_sent = False
        self._upstream_paused = False
        self._open_upstream()  # retries for up to upstream_wait; what the client sends meanwhile waits
        self._pump()
        return True

    def _close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        if self._connecting is not None:
            self._connecting.cancel()

    def _close_both(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._close_upstream()

    def _upstream_unavailable(self, reason: str) -> None:
        """Answer the next request (or the one waiting now) with the error, then close."""
        self._upstream_error = reason
        if self.session.pending:
            self._fail_upstream(reason)

    def _fail_upstream(self, reason: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(resp.error(f"ERR upstream unavailable: {reason}"))
            self.transport.close()

    # ------------------------------------------------------------------------ carrying out the session's actions

    def _pump(self) -> None:
        session = self.session
        transport = self.transport
        assert transport is not None
        out = session.take_client()
        if out:
            transport.write(out)
            self.server.observer.bytes_out += len(out)
            self._bytes_out += len(out)
            if session.tracking_pops:
                self._note_delivered()
            if self._limits_on and self._over_output_limit(transport):
                return
        up = session.take_upstream()
        if up:
            if self.upstream is not None:
                self.upstream.write(up)
            else:
                self._pending_up += up
                if len(self._pending_up) > self.server.config.write_buffer_high_water:
                    self.pause_client_reading("connect")
        if self._close_after_flush and session.pending == 0:
            transport.close()
        for event in session.take_events():
            if isinstance(event, OpenUpstream):
                self._open_upstream()
            elif isinstance(event, Close):
                if event.reason.startswith("protocol error"):
                    self.server.observer.protocol_error("client")
                    log.info("client protocol error", extra={"peer": self.peer, "error": event.reason})
                if not session.blocked:
                    transport.pause_reading()  # nothing more will be read (the session ignores it anyway)
                # With a blocked pop outstanding, keep reading (and ignoring) so that the client's going away is
                # seen: the pop must then end with it, as in Redis, not wait for the close timer and take a message.
                self._close_when_flushed()
            elif isinstance(event, UpstreamFailed):
                self.server.observer.upstream_error("auth")
                log.error("upstream refused the proxy's handshake", extra={"error": event.reason})
                self._close_upstream()
                self._upstream_unavailable(event.reason)
            elif isinstance(event, AuthFailed):
                self.server.observer.auth_failed()
                log.info("client auth failed", extra={"peer": self.peer, "user": event.username})
                if self.server.audit.enabled:
                    self.server.audit.event("auth", self.id, peer=self.peer, user=event.username, ok=False)
                delay = self.server.auth_backoff(self.peer_host)
                if delay > 0:
                    self._hold_for(delay)  # slow down guessing: hear nothing more from this client for a while
            elif isinstance(event, Audited):
                if self.server.audit.enabled:
                    self.server.audit.event(
                        "command", self.id, peer=self.peer, user=event.username, command=event.command
                    )
            elif isinstance(event, Denied):
                if self.server.audit.enabled:
                    self.server.audit.event(
                        "denied", self.id, peer=self.peer, user=event.username, command=event.command,
                        kind=event.kind, object=event.object,
                    )  # fmt: skip
                log.info(
                    "command denied",
                    extra={"peer": self.peer, "user": event.username, "command": event.command, "kind": event.kind},
                )

    def _over_output_limit(self, transport: asyncio.Transport) -> bool:
        """Redis's client-output-buffer-limit: past ``hard``, or past ``soft`` for ``soft_seconds``, the client is
        disconnected (its undelivered pops are requeued as for any client that goes away) and counted."""
        cfg = self.server.config
        kind = "pubsub" if self.session.subscribed else "normal"
        limit = cfg.client_output_buffer_limit_pubsub if kind == "pubsub" else cfg.client_output_buffer_limit_normal
        if not limit.enabled:
            return False
        size = transport.get_write_buffer_size()
        now = asyncio.get_running_loop().time()
        over = bool(limit.hard and size > limit.hard)
        if limit.soft and size > limit.soft:
            if self._soft_since is None:
                self._soft_since = now
            elif now - self._soft_since >= limit.soft_seconds:
                over = True
        else:
            self._soft_since = None
        if over:
            self.server.observer.output_limit_exceeded(kind)
            log.warning(
                "client output buffer over its limit; disconnecting",
                extra={"peer": self.peer, "class": kind, "buffered": size},
            )
            transport.abort()
        return over

    def _note_delivered(self) -> None:
        transport = self.transport
        if transport is not None:
            self._last_unsent = transport.get_write_buffer_size()
            self.session.delivered(self.session.written - self._last_unsent)

    def _close_when_flushed(self) -> None:
        """Close once the replies owed ahead of the close point have gone out (they may still come from Redis),
        within the drain timeout."""
        assert self.transport is not None
        if self.session.pending == 0:
            self.transport.close()  # asyncio flushes the write buffer before closing
            return
        self._close_after_flush = True
        loop = asyncio.get_running_loop()
        self._close_timer = loop.call_later(self.server.config.drain_timeout, self.transport.close)

    # ------------------------------------------------------------------------ backpressure

    def pause_client_reading(self, why: str) -> None:
        if not self._paused_by and self.transport is not None and not self._client_closed:
            self.transport.pause_reading()
        self._paused_by.add(why)

    def resume_client_reading(self, why: str) -> None:
        self._paused_by.discard(why)
        if not self._paused_by and self.transport is not None and not self._client_closed:
            if not self.session.closing and not self.server.draining:
                self.transport.resume_reading()

    # ------------------------------------------------------------------------ drain

    def drain(self) -> None:
        """SIGTERM: take no new requests, let Redis answer what is in flight (a blocked pop is ended early as a
        timeout with CLIENT UNBLOCK, so it takes no element), deliver those replies, then close."""
        if self._left or self.transport is None:
            return
        self.transport.pause_reading()
        if self.upstream is None:
            self._close_both()
            return
        self._close_when_flushed()
        self._unblock_if_blocked()

    @property
    def bytes_in(self) -> int:
        return self._bytes_in

    @property
    def user(self) -> str | None:
        return self.session.user if hasattr(self, "session") else None

    def close(self) -> None:
        """Close the client connection (a reload removed or disabled its user; a consumer reset). From here on it
        is a client that left: what Redis still sends for it (a pop's element) is requeued, never written to the
        closing transport, which would drop it unseen."""
        transport = self.transport
        if transport is not None and not self._left:
            self._client_left()
            transport.close()

    @property
    def left(self) -> bool:
        """The client is gone or being closed: nothing more is written to it."""
        return self._left

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.upstream is not None:
            self.upstream.abort()
