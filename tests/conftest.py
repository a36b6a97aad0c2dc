"""Fixtures: real redis-server processes and real brokerproxy processes, each on free loopback ports.

Never port 6379 and never a shared server: every test gets its own Redis (and its own temp dir), so FLUSHALL only
ever hits what the test started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak-minutes", type=float, default=0.5, help="test_soak's duration (default 0.5)")
    parser.addoption("--soak-report", default=None, help="test_soak writes PREFIX.json and PREFIX.md")


# Sockets that the client libraries in this test process abandon under the faults (kombu's channels dropped in a
# reference cycle after a connection error; Celery's Redis result consumer, which is not thread-safe, racing its
# Pub/Sub reconnect when an AsyncResult is collected on another thread) are closed by the garbage collector with a
# ResourceWarning. They are the clients' own sockets, not the proxy's (its open descriptors are checked separately):
# that one warning is not a failure here.
ABANDONED_CLIENT_SOCKETS = "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert port != 6379
    return port


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def exchange(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes the connection (end the payload with QUIT)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return data


class RedisServer:
    """A redis-server of the test's own. ``stop()``/``start()`` restart it on the same port."""

    def __init__(self, directory: Path, *extra: str, tls: tuple[str, ...] = ()) -> None:
        if not os.path.exists(REDIS_SERVER):
            raise RuntimeError("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
        self.port = free_port()
        self.dir = directory
        # With ``tls`` (the --tls-* options), the port is a TLS port and there is no plaintext one.
        self.extra = (*extra, "--tls-port", str(self.port), *tls) if tls else extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        port = "0" if "--tls-port" in self.extra else str(self.port)
        cmd = [
            REDIS_SERVER, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), "--daemonize", "no", "--enable-debug-command", "yes",
            "--logfile", str(self.dir / "redis.log"), *self.extra,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(port=self.port, **kw)


def freeze_in_transaction(sock: socket.socket, server: RedisServer) -> None:
    """Queue ``MULTI``/``INCR`` on ``sock`` (a client of a proxy in front of ``server``), then freeze Redis
    (SIGSTOP): an ``EXEC`` the caller sends now stays owed until Redis is killed, as a kombu ack's when Redis dies
    under it."""
    sock.sendall(b"MULTI\r\nINCR n\r\n")
    queued = b""
    while len(queued) < 14:
        queued += sock.recv(100)
    assert queued == b"+OK\r\n+QUEUED\r\n"
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)


class ProxyProcess:
    """``python -m brokerproxy`` as users run it, with its JSON log captured to a file."""

    def __init__(self, args: list[str], env: dict[str, str] | None, log_path: Path, port: int) -> None:
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "brokerproxy", *args], stdout=self._log, stderr=subprocess.STDOUT, env=full_env
        )

    def wait_ready(self) -> ProxyProcess:
        wait_for_port(self.port, proc=self.proc)
        return self

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(port=self.port, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def close(self) -> None:
        self._log.close()

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    d = tmp_path / "redis"
    d.mkdir()
    server = RedisServer(d)
    yield server
    server.stop()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start a proxy: ``start_proxy(upstream_url, *more_args, env=…, config=toml_text)``; stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(
        upstream: str | None,
        *args: str,
        env: dict[str, str] | None = None,
        config: str | None = None,
        wait: bool = True,
    ) -> ProxyProcess:
        port = free_port()
        argv = ["--listen", f"127.0.0.1:{port}", *args]
        if upstream is not None:
            argv += ["--upstream", upstream]
        if config is not None:
            path = tmp_path / f"proxy{len(started)}.toml"
            path.write_text(config)
            argv += ["--config", str(path)]
        p = ProxyProcess(argv, env, tmp_path / f"proxy{len(started)}.log", port)
        started.append(p)
        return p.wait_ready() if wait else p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
        p.close()


@pytest.fixture
def proxy(redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    """A proxy in front of this test's Redis, db 0, no users."""
    return start_proxy(redis_server.url())
