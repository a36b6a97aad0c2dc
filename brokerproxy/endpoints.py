"""The HTTP listener for Prometheus, Kubernetes probes and people: ``/metrics``, ``/healthz``, ``/readyz``, ``/``.

A deliberately tiny HTTP/1.1 server on asyncio streams: GET and HEAD, keep-alive, no request bodies, no
framework. Nothing it does blocks the event loop the proxy runs on: rendering the exposition reads plain counters
(milliseconds for thousands of series), and every read and write has a size limit and a timeout, so a slow or
malicious scraper holds one bounded buffer and then is dropped.

* ``/metrics``: the registry's exposition, OpenMetrics when the ``Accept`` header asks for it (``metrics.render``);
* ``/healthz``: 200 ``ok`` while the process serves;
* ``/readyz``: 200 when the ``ready()`` callback says so, else 503; the body is the callback's one-line reason;
* ``/api/status``: the status source's snapshot as JSON (``status.py``), and ``/``: the status page that polls it
  (``status_page.html``, self-contained: no external scripts, styles or fonts, so it works air-gapped); both only
  when a status source is given, which the endpoint also samples every ``status.interval`` seconds for the history;
* anything else: 404; a method other than GET/HEAD: 405; a malformed or oversized request: 400/431, then close.

With an ``auth_token`` (``[metrics] auth_token_file`` / ``auth_token_env``), everything but the probes needs it,
as Prometheus sends it: ``Authorization: Bearer <token>`` (``authorization.credentials_file``) or Basic auth with
the token as the password and any user name (``basic_auth``, and what a browser prompts for). Otherwise 401,
counted in ``brokerproxy_metrics_auth_failures_total``. The probes stay open: kubelets and load balancers send no
credentials, and they tell nothing but up or ready.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import importlib.resources
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from . import metrics

log = logging.getLogger("brokerproxy.endpoints")

#: Longest request head (request line and headers) accepted; Prometheus sends a few hundred bytes. nginx's
#: ``large_client_header_buffers`` default is 8 KiB per line, 32 KiB in all.
MAX_REQUEST_HEAD = 16 * 1024
#: Time allowed for a request head to arrive (slowloris), and for a response to be taken by the peer.
HEAD_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
#: A keep-alive connection with no new request for this long is closed (Prometheus scrapes every 15-60 s and
#: reconnects when needed).
IDLE_TIMEOUT = 75.0
#: After the last response, unread input is discarded for at most this long and this many bytes before closing.
LINGER_TIMEOUT = 2.0
LINGER_MAX_BYTES = 256 * 1024
#: close() waits this long for handlers to end once their connections are closed, then cancels them.
CLOSE_TIMEOUT = 1.0
#: Connections served at once; more are closed at once. Scrapers and probes need a handful.
MAX_CONNECTIONS = 64

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_HTML = "text/html; charset=utf-8"
#: The status page loads nothing from anywhere but this listener: a browser enforces it, and a copy of the page saved
#: or served elsewhere cannot be made to fetch from another origin either.
_PAGE_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]

# What became of a connection after one request.
_KEEP = 0  # keep-alive: wait for the next request
_CLOSE = 1  # a response was sent and the connection ends: half-close and drain first
_DROP = 2  # nothing (more) to answer: close at once

ReadyCheck = Callable[[], tuple[bool, str]]
Renderer = Callable[[CollectorRegistry, str | None], tuple[bytes, str]]
#: Awaited with the path before a GET/HEAD is answered (the supervisor of ``--workers`` scrapes its workers there);
#: it bounds its own time.
Refresh = Callable[[str], Awaitable[None]]


class StatusSource(Protocol):
    """What ``/api/status`` serves (``status.StatusBoard``): a snapshot, and a history sampled on a timer."""

    interval: float

    def snapshot(self, query: Mapping[str, str] | None = None) -> dict[str, Any]: ...

    def sample(self) -> None: ...


def status_page() -> bytes:
    """The status page, shipped as package data next to this module."""
    return importlib.resources.files(__package__ or "brokerproxy").joinpath("status_page.html").read_bytes()


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


#: Paths served without the auth token: the probes.
OPEN_PATHS = frozenset(("/healthz", "/readyz"))
_CHALLENGE = [("WWW-Authenticate", 'Basic realm="brokerproxy", charset="UTF-8"')]
_UNAUTHORIZED = b"auth token required (Bearer, or Basic with the token as the password)\n"


def authorized(header: str | None, token: bytes) -> bool:
    """Whether an Authorization header carries ``token``: as a bearer token, or as a Basic password."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        given = value.encode("utf-8", "surrogateescape")
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value, validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return False
    else:
        return False
    return hmac.compare_digest(given, token)


class _AuthFailures(Collector):
    def __init__(self, endpoints: HTTPEndpoints) -> None:
        self.endpoints = endpoints

    def collect(self) -> Any:
        yield CounterMetricFamily(
            "brokerproxy_metrics_auth_failures",
            "Requests to the metrics listener refused for a missing or wrong auth token (the probes need none).",
            value=self.endpoints.auth_failures,
        )


class HTTPEndpoints:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one listener. ``await start(host, port)``, ``await close()``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: ReadyCheck,
        *,
        render: Renderer = metrics.render,
        status: StatusSource | None = None,
        refresh: Refresh | None = None,
        max_request_head: int = MAX_REQUEST_HEAD,
        head_timeout: float = HEAD_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        auth_token: str = "",
    ) -> None:
        self.registry = registry
        self._token = auth_token.encode("utf-8", "surrogateescape")
        self.auth_token = bool(auth_token)
        self.auth_failures = 0
        if auth_token:
            registry.register(_AuthFailures(self))
        self.ready = ready
        self.render = render
        self.status = status
        self.refresh = refresh
        self._page = status_page() if status is not None else b""
        self._closing = asyncio.Event()
        self._sampler: asyncio.Task[None] | None = None
        self.max_request_head = max_request_head
        self.head_timeout = head_timeout
        self.write_timeout = write_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (port 0: any free port; see ``ports``)."""
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=self.max_request_head, reuse_address=True
        )
        for sock in self._server.sockets:
            name = sock.getsockname()
            log.info("metrics endpoint listening", extra={"address": f"{name[0]}:{name[1]}"})
        if self.status is not None and self._sampler is None:
            self._closing.clear()
            self._sampler = asyncio.get_running_loop().create_task(self._sample(self.status), name="status sampler")

    async def _sample(self, status: StatusSource) -> None:
        """The status history: one sample now, then one every ``status.interval`` seconds until close()."""
        while True:
            try:
                status.sample()
            except Exception:  # a broken sample must not end the history, nor the listener
                log.exception("status sample failed")
            try:
                await asyncio.wait_for(self._closing.wait(), status.interval)
                return
            except TimeoutError:
                continue

    @property
    def ports(self) -> list[int]:
        if self._server is None:
            return []
        return [int(s.getsockname()[1]) for s in self._server.sockets]

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self._closing.set()
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            await sampler
        for writer in list(self._writers):
            writer.close()  # a handler waiting for a request reads EOF and returns
        if self._handlers:
            _, late = await asyncio.wait(list(self._handlers), timeout=CLOSE_TIMEOUT)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if server is not None:
            await server.wait_closed()

    # ------------------------------------------------------------------------ one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._writers) >= self.max_connections:
            writer.close()
            return
        self._writers.add(writer)
        self._handlers.add(task)
        outcome = _DROP
        try:
            wait = self.head_timeout
            while (outcome := await self._one_request(reader, writer, wait)) == _KEEP:
                wait = self.idle_timeout
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # Only close() cancels a handler, and only one that did not finish when its connection closed. The
            # task is this listener's own: ending it quietly keeps asyncio from logging the cancellation.
            pass
        finally:
            # Still tracked while it closes, so that close() waits for it (or cancels it) too.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                if outcome == _CLOSE:
                    await asyncio.wait_for(self._lingering_close(reader, writer), LINGER_TIMEOUT)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), self.write_timeout)
            self._writers.discard(writer)
            self._handlers.discard(task)

    @staticmethod
    async def _lingering_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard what the client still sends: closing a socket with unread input sends a
        reset, which can destroy the error response before the client reads it (Apache's lingering close)."""
        if writer.is_closing() or not writer.can_write_eof():
            return
        writer.write_eof()
        discarded = 0
        while discarded < LINGER_MAX_BYTES:
            chunk = await reader.read(65536)
            if not chunk:
                return
            discarded += len(chunk)

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wait: float) -> int:
        """Serve one request: _KEEP the connection for the next, _CLOSE it after this response, or _DROP it (no
        request came, or it came too slowly)."""
        try:
            # The first byte may take the idle timeout; once it is there, the rest of the head gets head_timeout.
            first = await asyncio.wait_for(reader.read(1), wait)
            if not first:
                return _DROP
            head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.head_timeout)
        except asyncio.LimitOverrunError:
            await self._respond(writer, 431, b"request head too large\n", close=True)
            return _CLOSE
        except (asyncio.IncompleteReadError, TimeoutError):
            return _DROP
        if len(head) > self.max_request_head:
            await self._respond(writer, 431, b"request head too large\n", close=True)
            return _CLOSE
        try:
            method, target, version, headers = _parse_head(head)
        except _BadRequest as exc:
            await self._respond(writer, exc.status, b"bad request\n", close=True)
            return _CLOSE
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            await self._respond(writer, 413, b"request bodies are not accepted\n", close=True)
            return _CLOSE
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        head_only = method == "HEAD"
        path, _, query = target.partition("?")
        if method not in ("GET", "HEAD"):
            status, body, ctype = 405, b"only GET and HEAD\n", _TEXT
            extra = [("Allow", "GET, HEAD")]
        elif self.auth_token and path not in OPEN_PATHS and not authorized(headers.get("authorization"), self._token):
            self.auth_failures += 1
            status, body, ctype, extra = 401, _UNAUTHORIZED, _TEXT, _CHALLENGE
        else:
            if self.refresh is not None:
                try:
                    await self.refresh(path)
                except Exception:  # answer from what is there
                    log.exception("refreshing before the response failed")
            extra = _PAGE_HEADERS if path == "/" and self.status is not None else []
            status, body, ctype = self._route(path, headers.get("accept"), query)
        await self._respond(writer, status, body, ctype, close=not keep_alive, head_only=head_only, extra=extra)
        return _KEEP if keep_alive else _CLOSE

    def _route(self, path: str, accept: str | None, query: str = "") -> tuple[int, bytes, str]:
        if path == "/metrics":
            try:
                body, ctype = self.render(self.registry, accept)
            except Exception:
                log.exception("rendering the metrics failed")
                return 500, b"rendering the metrics failed\n", _TEXT
            return 200, body, ctype
        if path == "/healthz":
            return 200, b"ok\n", _TEXT
        if path == "/readyz":
            try:
                ok, reason = self.ready()
            except Exception as exc:  # a failing check means not ready, never a dead endpoint
                ok, reason = False, f"readiness check failed: {exc!r}"
            line = " ".join(reason.split()) or ("ready" if ok else "not ready")
            return (200 if ok else 503), line.encode("utf-8", "replace") + b"\n", _TEXT
        if self.status is not None:
            if path == "/api/status":
                try:
                    snapshot = self.status.snapshot(dict(parse_qsl(query)))
                    body = json.dumps(snapshot, separators=(",", ":"), allow_nan=False).encode()
                except Exception:
                    log.exception("building the status failed")
                    return 500, b"building the status failed\n", _TEXT
                return 200, body, _JSON
            if path == "/":
                return 200, self._page, _HTML
        return 404, b"not found\n", _TEXT

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str = _TEXT,
        *,
        close: bool,
        head_only: bool = False,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
        ]
        lines += [f"{k}: {v}" for k, v in extra or ()]
        if close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(head if head_only else head + body)
        await asyncio.wait_for(writer.drain(), self.write_timeout)


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Request line and headers (names lower-cased; a repeated header keeps its last value)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise _BadRequest(400) from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise _BadRequest(400)
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(400)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400)
        headers[name.lower()] = value.strip()
    return method, target, version, headers
