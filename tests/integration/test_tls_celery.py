"""Celery end to end over TLS to the proxy, with mutual TLS and the certificate-mapped user.

The worker (a real ``celery worker`` process) uses the URL form Celery's docs give,
``rediss://…?ssl_cert_reqs=required&ssl_ca_certs=…&ssl_certfile=…&ssl_keyfile=…``, for the broker and the result
backend; the producer uses the settings form, ``broker_use_ssl`` and ``redis_backend_use_ssl``. Both present client
certificates whose CN is an ACL user with no usable password, and hostname checking is on (the proxy's certificate
carries the name the clients dial: localhost). The proxy talks plaintext to Redis.
"""

from __future__ import annotations

import json
import ssl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import ProxyProcess, RedisServer, free_port, wait_for_port
from tests.integration.celery_app import make_app
from tests.integration.test_celery_e2e import BROKER_DB, RESULT_DB, STATE_DB, TIMEOUT, Stack, T
from tests.tls_pki import Pki

# Users exist only through their certificates: the password hashes are of nothing anyone knows.
ACL = """
[acl]
rules = [
    "user default off",
    "user celery-worker on #{h} ~* &* +@all",
    "user celery-producer on #{h} ~* &* +@all",
]
""".replace("{h}", "0" * 64)


class TLSStack(Stack):
    """Celery through the proxy's TLS port: the worker with URL parameters, the producer with settings."""

    pki: Pki
    tls_port: int

    def worker_url(self, db: int) -> str:
        cert, key = self.pki.client("celery-worker")
        query = urllib.parse.urlencode(
            {"ssl_cert_reqs": "required", "ssl_ca_certs": self.pki.ca_file, "ssl_certfile": cert, "ssl_keyfile": key}
        )
        return f"rediss://localhost:{self.tls_port}/{db}?{query}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "BROKER_URL": self.worker_url(BROKER_DB),
            "RESULT_URL": self.worker_url(RESULT_DB),
            "STATE_URL": self.redis.url(STATE_DB),  # the tasks' side effects, straight to Redis
        }

    def app(self, result_url: str | None = None) -> Celery:
        cert, key = self.pki.client("celery-producer")
        base = f"rediss://localhost:{self.tls_port}"
        a = make_app(f"{base}/{BROKER_DB}", f"{base}/{RESULT_DB}", self.redis.url(STATE_DB), main="client")
        ssl_opts = {
            "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(self.pki.ca_file),
            "ssl_certfile": str(cert), "ssl_keyfile": str(key),
        }  # fmt: skip
        a.conf.broker_use_ssl = ssl_opts
        a.conf.redis_backend_use_ssl = ssl_opts
        self.apps.append(a)
        return a


@pytest.fixture
def tls_stack(tmp_path: Path) -> Iterator[TLSStack]:
    rdir = tmp_path / "redis"
    rdir.mkdir()
    server = RedisServer(rdir)
    pki = Pki(tmp_path / "pki")
    port, tls_port = free_port(), free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'tls_listen = "127.0.0.1:{tls_port}"\n'
        + pki.server_toml(auth_clients='"yes"', identity='"cn"')
        + ACL
        + f'[audit]\nfile = "{tmp_path / "audit.log"}"\n'
    )
    proxy = ProxyProcess(
        ["--listen", f"127.0.0.1:{port}", "--upstream", server.url(0), "--config", str(config)],
        None, tmp_path / "proxy.log", port,
    )  # fmt: skip
    stack = TLSStack(server, proxy, tmp_path)
    stack.pki, stack.tls_port = pki, tls_port
    try:
        proxy.wait_ready()
        wait_for_port(tls_port, proc=proxy.proc)
        yield stack
    finally:
        stack.close()


def test_celery_over_mutual_tls_with_certificate_users(tls_stack: TLSStack) -> None:
    app = tls_stack.app()
    worker = tls_stack.worker("celery,alpha")
    try:
        worker.wait_ready(app)
        results = [T(app, "add").delay(i, i) for i in range(20)]
        assert [r.get(timeout=TIMEOUT) for r in results] == [2 * i for i in range(20)]
        assert T(app, "mul").apply_async((6, 7), queue="alpha").get(timeout=TIMEOUT) == 42
        failed = T(app, "boom").delay("over tls")
        with pytest.raises(ValueError, match="over tls"):
            failed.get(timeout=TIMEOUT)
    except BaseException:
        print(tls_stack.diag())
        raise
    # Every connection came in over TLS as its certificate's user (the audit trail records each login and how),
    # and nobody authenticated with a password or failed a handshake.
    audit = [json.loads(line) for line in (tls_stack.tmp / "audit.log").read_text().splitlines()]
    logins = [e for e in audit if e.get("event") == "auth"]
    assert {e["user"] for e in logins} == {"celery-worker", "celery-producer"}
    assert all(e.get("method") == "certificate" and e["ok"] for e in logins)
    over_tls = [
        e for e in audit if e.get("event") == "connection_opened" and e["listener"].endswith(f":{tls_stack.tls_port}")
    ]
    assert len(over_tls) == len(logins) > 2
    log = tls_stack.proxy.logs() if tls_stack.proxy is not None else ""
    assert '"client auth failed"' not in log
    failures = [line for line in log.splitlines() if '"TLS handshake failed"' in line]
    assert all('"reason": "closed"' in line for line in failures)  # only the fixture's port probe
    assert worker.proc.poll() is None
