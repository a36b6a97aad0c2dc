"""The TLS listener: accept TCP, run the TLS handshake with a bound, map the client certificate to a user, then serve
the connection with a ClientConnection exactly as the plaintext listener does.

Why the proxy accepts these sockets itself and hands each to ``loop.connect_accepted_socket(ssl=…)`` rather than
``create_server(ssl=…)``: a failed server-side handshake is an ``OSError`` that asyncio and uvloop swallow (logged
only in debug mode), but the proxy must count each one by reason and log it once; ``connect_accepted_socket``
raises it to its caller. (``start_tls`` on an accepted transport raises it too, but uvloop may deliver the
ClientHello to the first protocol before ``start_tls`` takes over: measured, the first connection then stalled.)

The context is read at accept time, so a certificate reload applies to new handshakes and never to established
connections.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any, cast

from .proxy import ClientConnection
from .tls import failure_reason, map_identity

if TYPE_CHECKING:
    from .config import Address
    from .server import Server

log = logging.getLogger("brokerproxy.tls")

#: Seconds a closing TLS connection waits for the peer's close_notify. asyncio's default (30 s) would hold a drain
#: for as long on every idle client that does not answer it (redis-py does not while it is not reading).
SHUTDOWN_TIMEOUT = 2.0


class TLSClientConnection(ClientConnection):
    """A ClientConnection whose transport has finished its handshake: the certificate may name its user."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self.server
        cfg = server.config.tls
        if cfg.identity:
            peercert: dict[str, Any] | None = transport.get_extra_info("peercert")
            identity, value = map_identity(cfg, peercert, self._known_user)
            if identity is None and peercert and cfg.unmapped == "refuse":
                server.observer.auth_failed()
                peer = transport.get_extra_info("peername")
                log.info(
                    "client certificate maps to no user; refused",
                    extra={"peer": str(peer), "field": cfg.identity, "value": value},
                )
                self.refused = True
                cast(asyncio.Transport, transport).abort()
                return
            self._identity = identity
        super().connection_made(transport)
        if self.rejected:
            return
        if self._identity is not None and server.audit.enabled:
            server.audit.event("auth", self.id, peer=self.peer, user=self._identity, ok=True, method="certificate")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.refused:
            super().connection_lost(exc)

    def _known_user(self, name: str) -> bool:
        user = self.server.authenticator.get(name)
        return user is not None and user.enabled

    refused = False


class TLSListener:
    """A listening socket whose connections are handshaken one task each (tracked by the server)."""

    def __init__(self, server: Server, address: Address) -> None:
        self.server = server
        self.address = address
        self.sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        host, port = self.address.host, self.address.port
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.server.config.workers > 1:  # --workers N: every worker listens on the same port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
            sock.listen(self.server.config.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._accepting = self.server.spawn(self._accept_loop(sock), "tls accept")

    @property
    def port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        if self.sock is not None:
            self.sock.close()

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and the like: wait a little rather than spin
                log.warning("TLS accept failed", extra={"error": str(exc)})
                await asyncio.sleep(0.1)
                continue
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            self.server.handshake_started(self._handshake(conn, peer), peer)

    async def _handshake(self, conn: socket.socket, peer: str) -> None:
        server = self.server
        tls = server.tls
        assert tls is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: TLSClientConnection(server, listener="tls"), conn, ssl=tls.context,
                ssl_handshake_timeout=server.config.tls.handshake_timeout, ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
            )  # fmt: skip
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as exc:  # every failure ends here: counted by reason, logged once, the socket closed
            reason = failure_reason(exc)
            server.observer.tls_handshake_failed("tls", reason)
            log.info("TLS handshake failed", extra={"peer": peer, "reason": reason, "error": str(exc)[:200]})
            conn.close()
