"""``brokerproxy check-config``, ``hash-password`` and ``status``, run as users run them (subprocesses)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ProxyProcess, RedisServer, free_port
from tests.integration.test_celery_e2e import wait_until
from tests.integration.test_metrics_e2e import CONFIG, Scrape, envelope, http_get, start_metrics_proxy


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKERPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "brokerproxy", *args],
        input=stdin, capture_output=True, text=True, timeout=30, env={**clean, **(env or {})},
    )  # fmt: skip


def test_help_lists_the_subcommands_and_still_every_flag() -> None:
    out = run("--help")
    assert out.returncode == 0
    for word in ("check-config", "hash-password", "status", "--metrics-url"):
        assert word in out.stdout, word
    for flag in ("--listen", "--tls-listen", "--upstream", "--config", "--log-level", "--metrics-listen"):
        assert flag in out.stdout, flag
    for sub in ("check-config", "hash-password", "status"):
        out = run(sub, "--help")
        assert out.returncode == 0 and f"brokerproxy {sub}" in out.stdout, sub


# ------------------------------------------------------------------------------------------------ check-config

SECRETS = {
    "upstream": "up-secret-1",
    "users": "user-secret-2",
    "rules": "rule-secret-3",
    "roles": "role-secret-4",
}
DIGEST = hashlib.sha256(b"digest-secret-5").hexdigest()
RULE_DIGEST = hashlib.sha256(b"digest-secret-6").hexdigest()


def full_config(tmp_path: Path) -> Path:
    path = tmp_path / "full.toml"
    path.write_text(
        f"""
listen = "127.0.0.1:7001"
upstream = "redis://proxy:{SECRETS["upstream"]}@127.0.0.1:7002/3"
metrics_listen = "127.0.0.1:7003"

[limits]
max_bulk_length = 1048576

[metrics]
max_queues = 7

[[users]]
name = "alice"
passwords = ["{SECRETS["users"]}"]
password_sha256 = ["{DIGEST}"]

[acl]
rules = ["user default off", "user bob on >{SECRETS["rules"]} #{RULE_DIGEST} ~q:* +@all"]

[[acl.roles]]
name = "worker"
role = "worker(default)"
passwords = ["{SECRETS["roles"]}"]
password_sha256 = ["{DIGEST}"]
"""
    )
    return path


def test_check_config_prints_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    path = full_config(tmp_path)
    out = run("check-config", str(path), env={"BROKERPROXY_LOG_LEVEL": "debug"})
    assert out.returncode == 0, out.stderr
    for secret in [*SECRETS.values(), DIGEST, RULE_DIGEST]:
        assert secret not in out.stdout and secret not in out.stderr, secret
    cfg = json.loads(out.stdout)
    assert cfg["listen"] == "127.0.0.1:7001" and cfg["metrics_listen"] == "127.0.0.1:7003"
    assert cfg["log_level"] == "debug"  # the environment applies, as when the proxy starts
    assert cfg["limits"]["max_bulk_length"] == 1048576 and cfg["metrics"]["max_queues"] == 7
    assert cfg["upstream"]["password"] == "***" and cfg["upstream"]["username"] == "proxy"
    assert cfg["upstream"]["url"] == "redis://proxy@127.0.0.1:7002/3" and cfg["upstream"]["db"] == 3
    assert cfg["users"] == [{"name": "alice", "password_hashes": ["***", "***"], "enabled": True}]
    assert cfg["acl"]["rules"] == ["user default off", "user bob on >*** #*** ~q:* +@all"]
    (role,) = cfg["acl"]["roles"]
    assert role["name"] == "worker" and role["passwords"] == ["***"] and role["password_sha256"] == ["***"]
    assert {u["name"] for u in cfg["effective_users"]} == {"default", "bob", "worker", "alice"}
    assert "valid" in out.stderr


def test_check_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_bulk_length = -3\n")
    out = run("check-config", str(bad))
    assert out.returncode == 2 and out.stdout == ""
    assert "limits.max_bulk_length" in out.stderr
    bad.write_text('[acl]\nrules = ["user bob on >pw +nosuchcommand"]\n')
    out = run("check-config", str(bad))
    assert out.returncode == 2 and "acl.rules" in out.stderr
    bad.write_text('listen = "0.0.0.0:7001"\n')
    out = run("check-config", str(bad))
    assert out.returncode == 2 and "protected_mode" in out.stderr
    out = run("check-config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "cannot read" in out.stderr
    out = run("check-config")
    assert out.returncode == 2 and "FILE" in out.stderr  # argparse: the file is required


# ------------------------------------------------------------------------------------------------ hash-password


def test_hash_password_from_stdin_works_in_an_acl(
    tmp_path: Path, redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]
) -> None:
    password = "pä ss:word#1"  # spaces and non-ASCII: the digest is of the UTF-8 bytes, as the proxy hashes them
    out = run("hash-password", stdin=password + "\n")
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line == "#" + hashlib.sha256(password.encode()).hexdigest()
    assert run("hash-password", stdin=password + "\r\n").stdout.strip() == line  # a Windows line end
    assert run("hash-password", stdin=password).stdout.strip() == line  # no line end
    assert password not in out.stdout + out.stderr

    # The line goes into an ACL rule as it is, and the password then authenticates through the proxy.
    proxy = start_proxy(
        redis_server.url(), config=f'[acl]\nrules = ["user default off", "user app on {line} ~* +@all"]\n'
    )
    assert proxy.client(username="app", password=password).ping()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:  # redis-py would retry
        raw.sendall(b"*3\r\n$4\r\nAUTH\r\n$3\r\napp\r\n$5\r\nother\r\n")
        assert raw.recv(1024).startswith(b"-WRONGPASS")

    out = run("hash-password", stdin="")
    assert out.returncode == 2 and "no password" in out.stderr and out.stdout == ""
    out = run("hash-password", stdin="\n")
    assert out.returncode == 2


def test_hash_password_on_a_terminal_does_not_echo() -> None:
    secret = "tty-secret-7"
    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty
        os.execve(sys.executable, [sys.executable, "-m", "brokerproxy", "hash-password"], dict(os.environ))
    output = b""

    def read_until(marker: bytes, timeout: float = 20.0) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} in {output!r}")
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(fd, 1024)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {marker!r}; output {output!r}")
                output += chunk

    try:
        read_until(b"Password: ")
        os.write(fd, secret.encode() + b"\n")
        read_until(b"Again: ")
        os.write(fd, secret.encode() + b"\n")
        digest = hashlib.sha256(secret.encode()).hexdigest()
        read_until(digest.encode())
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.WEXITSTATUS(status) == 0
    assert secret.encode() not in output, output  # the terminal echoed nothing of it
    assert b"#" + digest.encode() in output


# ------------------------------------------------------------------------------------------------ status


def test_status_summarises_a_running_proxy(redis_server: RedisServer, start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy, mport = start_metrics_proxy(redis_server, start_proxy, CONFIG)
    c = proxy.client()
    for _ in range(4):
        c.lpush("orders", envelope("orders", "shop.place_order"))
    for _ in range(2):
        c.lpush("mail", envelope("mail", "shop.send_mail"))
    assert c.brpop(["mail"], timeout=1) is not None
    c.close()
    wait_until(
        "the depth poll", lambda: Scrape(mport).by("brokerproxy_queue_depth", "queue") == {"orders": 4, "mail": 1}
    )

    out = run("status", "--metrics-url", f"http://127.0.0.1:{mport}")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    lines = text.splitlines()
    assert len(lines) <= 40  # one screen
    assert lines[0].startswith("brokerproxy ") and f"127.0.0.1:{mport}" in lines[0]
    assert lines[1] == f"upstream {redis_server.url()}: up, ready"
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in ("orders", "mail")}
    # QUEUE DEPTH PUB/S CONS/S WAIT-P50 (2 words) WAIT-P95 (2 words) CONSUMERS PUBLISHED CONSUMED
    assert rows["orders"][1] == "4" and rows["orders"][-2:] == ["4", "0"]
    assert rows["mail"][1] == "1" and rows["mail"][-2:] == ["2", "1"]
    tasks = {line.split()[0]: line.split() for line in lines if line.startswith("shop.")}
    assert tasks["shop.place_order"][1] == "4" and tasks["shop.send_mail"][1] == "2"

    # Without a scheme, and from the environment; --json gives the endpoint's JSON.
    out = run("status", "--json", env={"BROKERPROXY_METRICS_URL": f"127.0.0.1:{mport}"})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {q["name"]: q["published"] for q in data["queues"]} == {"orders": 4, "mail": 2}
    assert "history" not in data

    # Redis down: still a summary, saying so.
    redis_server.stop()
    wait_until("upstream down", lambda: Scrape(mport).get("brokerproxy_upstream_up") == 0, 10)
    out = run("status", "--metrics-url", f"http://127.0.0.1:{mport}")
    assert out.returncode == 0
    assert out.stdout.splitlines()[1].startswith(f"upstream {redis_server.url()}: DOWN, NOT READY (")


class NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def not_a_proxy() -> Iterator[int]:
    """An HTTP server that is not brokerproxy (404 everywhere)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_status_unreachable_exits_nonzero_with_a_clear_message(not_a_proxy: int) -> None:
    port = free_port()
    out = run("status", "--metrics-url", f"http://127.0.0.1:{port}")
    assert out.returncode == 1 and out.stdout == ""
    assert f"cannot reach the metrics listener at http://127.0.0.1:{port}" in out.stderr
    assert "refused" in out.stderr.lower()
    out = run("status", "--metrics-url", f"http://127.0.0.1:{not_a_proxy}")
    assert out.returncode == 1 and out.stdout == ""
    assert f"http://127.0.0.1:{not_a_proxy}/api/status answered HTTP 404 (is it a brokerproxy" in out.stderr
    out = run("status", env={"BROKERPROXY_METRICS_URL": f"http://127.0.0.1:{port}"})
    assert out.returncode == 1 and f"127.0.0.1:{port}" in out.stderr
    # The default is the documented one.
    assert "http://127.0.0.1:9180" in run("status", "--help").stdout


def test_flag_only_command_line_is_unchanged(redis_server: RedisServer, tmp_path: Path) -> None:
    """``brokerproxy --listen … --upstream …`` still runs the proxy (the subcommands did not take the argv)."""
    port, mport = free_port(), free_port()
    p = ProxyProcess(
        ["--listen", f"127.0.0.1:{port}", "--upstream", redis_server.url(), "--metrics-listen", f"127.0.0.1:{mport}"],
        None, tmp_path / "p.log", port,
    ).wait_ready()  # fmt: skip
    try:
        assert p.client().ping()
        wait_until("the metrics listener", lambda: http_get(mport, "/healthz")[0] == 200, 10)
        assert http_get(mport, "/")[0] == 200
    finally:
        assert p.stop() == 0
