"""The TLS listener: accept TCP, run the TLS handshake with a bound, map the client certificate to a user, then hand
the connection to a ClientConnection exactly as the plaintext listener does.

The handshake is run with ``loop.start_tls`` rather than ``create_server(ssl=…)`` so that its failure reaches this
code: asyncio swallows a failed server-side handshake (an ``OSError``) unless the loop is in debug mode, and the
proxy must count each one by reason and log it once. The context is taken at accept time, so a certificate
reload applies to new handshakes and never to established connections.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, cast

from .proxy import ClientConnection
from .tls import failure_reason, map_identity

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("brokerproxy.tls")


class _Waiting(asyncio.Protocol):
    """Holds what arrives between the end of the handshake and the hand-over to the ClientConnection."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return True  # keep the transport: the ClientConnection decides

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)


class TLSAccept(asyncio.Protocol):
    """One accepted TCP connection on the TLS port, until its handshake ends."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        # Nothing may be read before start_tls takes the transport over (it resumes reading itself).
        transport.pause_reading()
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.handshake_started(self._handshake(transport), self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # the handshake task sees the failure

    async def _handshake(self, raw: asyncio.Transport) -> None:
        server = self.server
        tls = server.tls
        assert tls is not None
        cfg = server.config.tls
        waiting = _Waiting()
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                raw, waiting, tls.context, server_side=True, ssl_handshake_timeout=cfg.handshake_timeout
            )
        except asyncio.CancelledError:
            raw.abort()
            raise
        except Exception as exc:  # every failure ends here: counted by reason, logged once, the socket closed
            reason = failure_reason(exc)
            server.observer.tls_handshake_failed("tls", reason)
            log.info("TLS handshake failed", extra={"peer": self.peer, "reason": reason, "error": str(exc)[:200]})
            raw.abort()
            return
        if transport is None:  # the peer went away as the handshake ended
            raw.abort()
            return
        identity: str | None = None
        if cfg.identity:
            peercert: dict[str, Any] | None = transport.get_extra_info("peercert")
            identity, value = map_identity(cfg, peercert, self._known_user)
            if identity is None and peercert and cfg.unmapped == "refuse":
                server.observer.auth_failed()
                log.info(
                    "client certificate maps to no user; refused",
                    extra={"peer": self.peer, "field": cfg.identity, "value": value},
                )
                transport.abort()
                return
        conn = ClientConnection(server, listener="tls", identity=identity)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        if identity is not None and server.audit.enabled:
            server.audit.event("auth", conn.id, peer=conn.peer, user=identity, ok=True, method="certificate")
        for chunk in waiting.data:
            conn.data_received(chunk)
        if waiting.lost is not None:
            conn.connection_lost(waiting.lost[0])
        elif waiting.eof:
            conn.eof_received()

    def _known_user(self, name: str) -> bool:
        user = self.server.authenticator.get(name)
        return user is not None and user.enabled
