"""endpoints.py over real sockets: a real HTTP client (http.client, in a thread) against the server in an event loop."""

from __future__ import annotations

import asyncio
import http.client
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from brokerproxy import metrics
from brokerproxy.endpoints import HTTPEndpoints
from brokerproxy.observe import Observer

T = TypeVar("T")


class Ready:
    def __init__(self) -> None:
        self.state: tuple[bool, str] = (True, "ready")
        self.raise_error = False

    def __call__(self) -> tuple[bool, str]:
        if self.raise_error:
            raise RuntimeError("boom")
        return self.state


def run(test: Callable[[HTTPEndpoints, int, Ready, Observer], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        observer = Observer()
        observer.upstream_up = 1
        ready = Ready()
        endpoints = HTTPEndpoints(metrics.build_registry(observer, process_metrics=False), ready, **options)
        await endpoints.start("127.0.0.1", 0)
        try:
            (port,) = endpoints.ports
            await asyncio.wait_for(test(endpoints, port, ready, observer), 30)
        finally:
            await endpoints.close()

    asyncio.run(main())


async def in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn)


Response = tuple[int, dict[str, str], bytes]


def get(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def raw(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send bytes, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:  # a refused connection may be reset rather than closed
            pass
    return out


def read_response(s: socket.socket) -> bytes:
    """One complete response (headers and the Content-Length body) from a socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    length = int(lengths[0])
    while len(body) < length:
        body += s.recv(65536)
    return data


def test_healthz_and_unknown_paths() -> None:
    async def t(_: HTTPEndpoints, port: int, ready: Ready, o: Observer) -> None:
        status, headers, body = await in_thread(lambda: get(port, "/healthz"))
        assert (status, body) == (200, b"ok\n")
        assert headers["content-type"].startswith("text/plain")
        status, _, _ = await in_thread(lambda: get(port, "/nope"))
        assert status == 404
        status, headers, _ = await in_thread(lambda: get(port, "/metrics", method="POST"))
        assert status == 405 and headers["allow"] == "GET, HEAD"
        status, headers, body = await in_thread(lambda: get(port, "/healthz", method="HEAD"))
        assert status == 200 and body == b"" and headers["content-length"] == "3"

    run(t)


def test_readyz_follows_the_callback() -> None:
    async def t(_: HTTPEndpoints, port: int, ready: Ready, o: Observer) -> None:
        assert (await in_thread(lambda: get(port, "/readyz")))[::2] == (200, b"ready\n")
        ready.state = (False, "upstream redis://127.0.0.1:6390 unreachable:\nconnection refused")
        status, _, body = await in_thread(lambda: get(port, "/readyz"))
        assert status == 503
        assert body == b"upstream redis://127.0.0.1:6390 unreachable: connection refused\n"  # one line
        ready.state = (False, "draining")
        assert (await in_thread(lambda: get(port, "/readyz")))[::2] == (503, b"draining\n")
        ready.raise_error = True
        status, _, body = await in_thread(lambda: get(port, "/readyz"))
        assert status == 503 and body.startswith(b"readiness check failed")
        ready.raise_error = False
        ready.state = (True, "")
        assert (await in_thread(lambda: get(port, "/readyz")))[::2] == (200, b"ready\n")

    run(t)


def test_metrics_text_and_openmetrics() -> None:
    async def t(_: HTTPEndpoints, port: int, ready: Ready, o: Observer) -> None:
        o.command("get", "ok")
        status, headers, body = await in_thread(lambda: get(port, "/metrics"))
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = {s.name: s for f in parse_text(body.decode()) for s in f.samples}
        assert samples["brokerproxy_upstream_up"].value == 1
        assert samples["brokerproxy_commands_total"].labels == {"command": "get", "outcome": "ok"}
        # Values are read at scrape time.
        o.command("get", "ok")
        accept = {"Accept": "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"}
        status, headers, body = await in_thread(lambda: get(port, "/metrics?x=1", headers=accept))
        assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
        families = {f.name: f for f in parse_openmetrics(body.decode())}
        assert families["brokerproxy_commands"].samples[0].value == 2

    run(t)


def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async def t(_: HTTPEndpoints, port: int, ready: Ready, o: Observer) -> None:
        def session() -> list[int]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            statuses = []
            sockets = set()
            for path in ("/healthz", "/metrics", "/readyz", "/missing"):
                conn.request("GET", path)
                sockets.add(id(conn.sock))
                r = conn.getresponse()
                r.read()
                statuses.append(r.status)
            conn.close()
            assert len(sockets) == 1  # http.client reconnects if the server closed: it never had to
            return statuses

        assert await in_thread(session) == [200, 200, 200, 404]
        # HTTP/1.0 without keep-alive: one response, then the server closes.
        out = await in_thread(lambda: raw(port, b"GET /healthz HTTP/1.0\r\n\r\n"))
        assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nok\n")
        assert b"Connection: close" in out

    run(t)


def test_bad_and_oversized_requests_are_refused_and_closed() -> None:
    async def t(_: HTTPEndpoints, port: int, ready: Ready, o: Observer) -> None:
        out = await in_thread(lambda: raw(port, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"))
        assert out.startswith(b"HTTP/1.1 431 ")
        out = await in_thread(lambda: raw(port, b"NONSENSE\r\n\r\n"))
        assert out.startswith(b"HTTP/1.1 400 ")
        out = await in_thread(lambda: raw(port, b"GET /healthz HTTP/2.0\r\n\r\n"))
        assert out.startswith(b"HTTP/1.1 400 ")
        out = await in_thread(lambda: raw(port, b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"))
        assert out.startswith(b"HTTP/1.1 413 ")
        chunked = b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        out = await in_thread(lambda: raw(port, chunked))
        assert out.startswith(b"HTTP/1.1 413 ")
        # The server still serves afterwards.
        assert (await in_thread(lambda: get(port, "/healthz")))[0] == 200

    run(t, max_request_head=4096)


def test_slow_and_idle_clients_are_dropped() -> None:
    async def t(_: HTTPEndpoints, port: int, ready: Ready, o: Observer) -> None:
        def slow() -> tuple[float, bytes]:
            start = time.monotonic()
            out = raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            return time.monotonic() - start, out

        elapsed, out = await in_thread(slow)
        assert out == b"" and 0.2 <= elapsed < 1.9  # dropped at once: no lingering for a request never read

        def idle() -> float:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
                start = time.monotonic()
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                assert data.endswith(b"ok\n")
                return time.monotonic() - start

        assert 0.3 <= await in_thread(idle) < 5  # the keep-alive connection is closed after the idle timeout

    run(t, head_timeout=0.3, idle_timeout=0.5)


def test_connection_limit_and_close() -> None:
    async def t(endpoints: HTTPEndpoints, port: int, ready: Ready, o: Observer) -> None:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            for s in socks:
                s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            for s in socks:
                assert (await in_thread(lambda s=s: read_response(s))).startswith(b"HTTP/1.1 200")
            # Both held open (keep-alive): a third connection is closed at once.
            assert await in_thread(lambda: raw(port, b"GET /healthz HTTP/1.1\r\n\r\n")) == b""
            # close() drops the idle keep-alive connections too.
            await endpoints.close()
            for s in socks:
                assert await in_thread(lambda s=s: s.recv(65536)) == b""
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
        finally:
            for s in socks:
                s.close()

    run(t, max_connections=2)


def test_close_ends_a_connection_that_lingers_after_an_error() -> None:
    async def t(endpoints: HTTPEndpoints, port: int, ready: Ready, o: Observer) -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            s.sendall(b"BAD\r\n\r\n")
            assert (await in_thread(lambda: read_response(s))).startswith(b"HTTP/1.1 400 ")
            # The server half-closed and waits for the client's EOF, which does not come; close() ends it.
            start = time.monotonic()
            await endpoints.close()
            assert time.monotonic() - start < 1.5
            assert await in_thread(lambda: s.recv(65536)) == b""
        finally:
            s.close()

    run(t)
