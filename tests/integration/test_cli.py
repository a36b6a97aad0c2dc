"""The command line as users and Dockerfiles run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ProxyProcess, RedisServer, free_port


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "brokerproxy", *args],
        capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})},
    )


def test_help_lists_the_contract_flags() -> None:
    out = run("--help")
    assert out.returncode == 0
    for flag in ("--listen", "--upstream", "--config", "--log-level"):
        assert flag in out.stdout


def test_invalid_config_exits_nonzero_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_bulk_length = -3\n")
    out = run("--config", str(bad))
    assert out.returncode == 2
    assert "limits.max_bulk_length" in out.stderr
    out = run("--upstream", "redis://h/x")
    assert out.returncode == 2 and "upstream" in out.stderr
    out = run("--listen", "0.0.0.0:1")
    assert out.returncode == 2 and "protected_mode" in out.stderr


def test_env_configures_and_logs_are_json(redis_server: RedisServer, tmp_path: Path) -> None:
    import json

    port = free_port()
    p = ProxyProcess([], {"BROKERPROXY_LISTEN": f"127.0.0.1:{port}", "BROKERPROXY_UPSTREAM": redis_server.url()},
                     tmp_path / "p.log", port).wait_ready()
    assert p.client().ping()
    assert p.stop() == 0
    lines = [json.loads(line) for line in p.logs().splitlines()]
    assert {"ts", "level", "event"} <= set(lines[0])
    assert any(entry["event"] == "listening" and entry["address"] == f"127.0.0.1:{port}" for entry in lines)


def test_port_in_use_exits_with_error(redis_server: RedisServer) -> None:
    out = run("--listen", f"127.0.0.1:{redis_server.port}", "--upstream", redis_server.url())
    assert out.returncode == 3
    assert "cannot listen" in out.stderr


def test_console_script_installed() -> None:
    import shutil

    exe = shutil.which("brokerproxy") or str(Path(sys.executable).with_name("brokerproxy"))
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("brokerproxy ")
