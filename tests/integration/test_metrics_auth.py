"""The metrics listener's auth token ([metrics] auth_token_file / auth_token_env): /metrics, /api/status and the
status page need it, as Prometheus sends it (a bearer token, or Basic auth with the token as the password); the
probes stay open; a refusal is a 401 with a Basic challenge, counted. Real proxy processes (one and two workers)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from brokerproxy.endpoints import authorized
from tests.conftest import ProxyProcess, RedisServer, free_port, wait_for_port

StartProxy = Callable[..., ProxyProcess]
TOKEN = "s3cret-scrape-token"


def get(port: int, path: str, auth: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), dict(exc.headers)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_authorized_header_forms() -> None:
    token = TOKEN.encode()
    assert authorized(f"Bearer {TOKEN}", token)
    assert authorized(f"bearer  {TOKEN} ", token)
    assert authorized(basic("prometheus", TOKEN), token)
    assert authorized(basic("", TOKEN), token)
    assert not authorized(None, token)
    assert not authorized("", token)
    assert not authorized("Bearer wrong", token)
    assert not authorized(f"Token {TOKEN}", token)
    assert not authorized(basic(TOKEN, "wrong"), token)  # the token is the password, not the user name
    assert not authorized("Basic !!!not-base64", token)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_token_guards_everything_but_the_probes(
    redis_server: RedisServer, start_proxy: StartProxy, tmp_path: Path, workers: int
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # a trailing newline, as secret files often have, is not part of it
    metrics = free_port()
    config = f'workers = {workers}\nmetrics_listen = "127.0.0.1:{metrics}"\n'
    config += f'[metrics]\nauth_token_file = "{token_file}"\n'
    proxy = start_proxy(redis_server.url(), config=config)
    wait_for_port(metrics, proc=proxy.proc)
    assert proxy.client().ping()

    for path in ("/metrics", "/api/status", "/"):
        status, _, headers = get(metrics, path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Basic realm=")
        assert get(metrics, path, "Bearer wrong")[0] == 401
    assert get(metrics, "/healthz")[0] == 200
    assert get(metrics, "/readyz")[0] in (200, 503)  # open: the answer, not the token, says ready or not

    status, body, _ = get(metrics, "/metrics", f"Bearer {TOKEN}")
    assert status == 200
    text = body.decode()
    assert "brokerproxy_connections_total" in text or "brokerproxy_client_connections" in text
    assert "brokerproxy_metrics_auth_failures_total 6.0" in text  # 3 paths, refused twice each
    assert get(metrics, "/api/status", basic("prometheus", TOKEN))[0] == 200

    # brokerproxy status reads the token from a file; without it, it says what is missing.
    base = [sys.executable, "-m", "brokerproxy", "status", "--metrics-url", f"127.0.0.1:{metrics}", "--json"]
    ok = subprocess.run([*base, "--auth-token-file", str(token_file)], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "queues" in json.loads(ok.stdout)
    refused = subprocess.run(base, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1
    assert "401" in refused.stderr and "--auth-token-file" in refused.stderr


def test_token_config_errors_name_the_key(tmp_path: Path) -> None:
    def check(text: str, env: dict[str, str] | None = None) -> str:
        path = tmp_path / "c.toml"
        path.write_text(text)
        run = subprocess.run(
            [sys.executable, "-m", "brokerproxy", "check-config", str(path)],
            capture_output=True, text=True, timeout=30, env=env,
        )  # fmt: skip
        return run.stderr if run.returncode else run.stdout

    assert "metrics.auth_token_file: cannot read /nonexistent/token" in check(
        '[metrics]\nauth_token_file = "/nonexistent/token"\n'
    )
    assert "metrics.auth_token_env: environment variable NO_SUCH_VAR_X is not set or empty" in check(
        '[metrics]\nauth_token_env = "NO_SUCH_VAR_X"\n'
    )
    shown = check('[metrics]\nauth_token_env = "SCRAPE_TOKEN"\n', env={"SCRAPE_TOKEN": TOKEN, "PATH": "/usr/bin"})
    assert TOKEN not in shown
    assert '"auth_token": "***"' in shown
