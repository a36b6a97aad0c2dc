"""The container's command line, run outside a container (no Docker engine here) against a real Redis.

The command is read from the Dockerfile: ENTRYPOINT + CMD, the image's ENV, and the config file the image bakes at
BROKERPROXY_CONFIG (written to a temporary directory). The only changes are the ones a deployment makes through
the environment: the listen addresses (loopback and free ports here, where the image says 0.0.0.0 and fixed ports)
and the upstream. The HEALTHCHECK is run as Docker would run it, then SIGTERM must drain and exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import RedisServer, free_port, wait_for_port
from tests.unit.test_container import DOCKERFILE, Dockerfile, baked_files, healthcheck_command, parse_dockerfile

BIN = Path(sys.executable).parent


@pytest.fixture
def image() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def command(df: Dockerfile) -> list[str]:
    """ENTRYPOINT + CMD as Docker joins them, with the entry point found in this venv (the image's PATH has
    /opt/brokerproxy/bin first, where pip put the same console script)."""
    entry = df.final.last("ENTRYPOINT")
    cmd = df.final.last("CMD")
    assert entry is not None and cmd is not None
    argv = [*(entry.exec_form() or []), *(cmd.exec_form() or [])]
    script = BIN / argv[0]
    assert script.exists(), f"{argv[0]} is not installed as a console script in {BIN}"
    return [str(script), *argv[1:]]


def environment(df: Dockerfile, root: Path, **overrides: str) -> dict[str, str]:
    """The process environment the image gives, with its config file placed under ``root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKERPROXY_")}
    for key, value in df.final.env().items():
        if key != "PATH":
            env[key] = value
    config = env["BROKERPROXY_CONFIG"]
    local = root / config.lstrip("/")
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(baked_files(df.final)[config])
    env["BROKERPROXY_CONFIG"] = str(local)
    env.update(overrides)
    return env


def run_healthcheck(df: Dockerfile, env: dict[str, str]) -> int:
    argv = healthcheck_command(df.final)
    assert argv is not None and argv[0] == "python"
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=20).returncode


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_image_command_serves_answers_its_healthcheck_and_drains_on_sigterm(
    image: Dockerfile, redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    port, metrics_port = free_port(), free_port()
    env = environment(
        image,
        tmp_path,
        BROKERPROXY_LISTEN=f"127.0.0.1:{port}",
        BROKERPROXY_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        BROKERPROXY_UPSTREAM=redis_server.url(),
    )
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command(image), env=env, stdout=out, stderr=subprocess.STDOUT)
    processes.append(proc)
    wait_for_port(port, proc=proc)
    wait_for_port(metrics_port, proc=proc)

    assert http_get(metrics_port, "/healthz")[0] == 200
    deadline = time.monotonic() + 10
    while http_get(metrics_port, "/readyz")[0] != 200:  # the first upstream PING comes right after start
        assert time.monotonic() < deadline, http_get(metrics_port, "/readyz")
        time.sleep(0.05)
    client = redis.Redis(port=port, protocol=3)
    assert client.ping() is True
    client.set("container:probe", "ok")
    assert redis_server.client().get("container:probe") == b"ok"
    client.close()

    # Docker's HEALTHCHECK, as the image defines it: the port from BROKERPROXY_METRICS_LISTEN…
    assert run_healthcheck(image, env) == 0
    # …or, without that variable, from the mounted config file's metrics_listen
    mounted = tmp_path / "mounted.toml"
    mounted.write_text(f'metrics_listen = "0.0.0.0:{metrics_port}"\n')
    file_env = {k: v for k, v in env.items() if k != "BROKERPROXY_METRICS_LISTEN"}
    assert run_healthcheck(image, {**file_env, "BROKERPROXY_CONFIG": str(mounted)}) == 0

    stop = image.final.last("STOPSIGNAL")
    assert stop is not None
    proc.send_signal(getattr(signal, stop.args.strip()))
    assert proc.wait(30) == 0, log.read_text()
    events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]
    assert events[0] == "starting" and events[-1] == "stopped", events
    assert run_healthcheck(image, env) != 0  # and the healthcheck can fail: nothing answers now


def test_the_image_defaults_alone_exit_2_naming_protected_mode(
    image: Dockerfile, redis_server: RedisServer, tmp_path: Path
) -> None:
    """0.0.0.0 with no users is refused before anything listens: the safe default of the image."""
    env = environment(image, tmp_path, BROKERPROXY_UPSTREAM=redis_server.url())
    result = subprocess.run(command(image), env=env, capture_output=True, timeout=30)
    assert result.returncode == 2, result
    assert b"protected_mode" in result.stderr


def test_the_sidecar_prestop_waits_for_the_pods_clients_to_leave(
    image: Dockerfile, redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """deploy/kubernetes/airflow-worker-sidecar.yaml's preStop, run as the kubelet runs it (with the metrics port
    moved to a free one): it returns only once no client is connected, so an ordinary-container sidecar keeps the
    broker up through the worker's warm shutdown."""
    manifest = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "airflow-worker-sidecar.yaml"
    deployment = next(d for d in yaml.safe_load_all(manifest.read_text()) if d and d["kind"] == "Deployment")
    sidecar = next(c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == "brokerproxy")
    argv = sidecar["lifecycle"]["preStop"]["exec"]["command"]
    assert argv[:2] == ["python", "-c"]

    port, metrics_port = free_port(), free_port()
    env = environment(
        image,
        tmp_path,
        BROKERPROXY_LISTEN=f"127.0.0.1:{port}",
        BROKERPROXY_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        BROKERPROXY_UPSTREAM=redis_server.url(),
    )
    proc = subprocess.Popen(command(image), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.append(proc)
    wait_for_port(port, proc=proc)
    wait_for_port(metrics_port, proc=proc)

    worker = redis.Redis(port=port)
    assert worker.ping() is True
    code = argv[2].replace("127.0.0.1:9180", f"127.0.0.1:{metrics_port}")
    assert code != argv[2]
    hook = subprocess.Popen([sys.executable, "-c", code, "60"])
    processes.append(hook)
    time.sleep(1.5)  # the hook has looked at least once
    assert hook.poll() is None, "the preStop hook returned while a client was still connected"
    worker.close()
    assert hook.wait(10) == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0

    # bounded: with a client that never leaves, the hook gives up after its limit
    proc = subprocess.Popen(command(image), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.append(proc)
    wait_for_port(port, proc=proc)
    wait_for_port(metrics_port, proc=proc)
    stuck = redis.Redis(port=port)
    stuck.ping()
    started = time.monotonic()
    assert subprocess.run([sys.executable, "-c", code, "1.5"], timeout=30).returncode == 0
    assert 1.4 < time.monotonic() - started < 10
    stuck.close()


def test_the_compose_proxy_config_serves_airflow_identities_over_tls(
    image: Dockerfile, redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """deploy/compose's brokerproxy.toml and users.acl with gen-certs.py's certificates, run by the image's command
    (listen addresses moved to loopback and free ports): each Airflow component's certificate logs it in as its ACL
    user with its role, the operator's as ops, and a client with neither certificate nor password gets nothing."""
    compose_dir = Path(__file__).resolve().parents[2] / "deploy" / "compose"
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, str(compose_dir / "gen-certs.py"), str(certs)], check=True, capture_output=True)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.toml").write_text((compose_dir / "brokerproxy.toml").read_text().replace('"/certs/', f'"{certs}/'))
    (etc / "users.acl").write_text((compose_dir / "users.acl").read_text())

    port, tls_port, metrics_port = free_port(), free_port(), free_port()
    env = environment(
        image,
        tmp_path,
        BROKERPROXY_CONFIG=str(etc / "config.toml"),
        BROKERPROXY_LISTEN=f"127.0.0.1:{port}",
        BROKERPROXY_TLS_LISTEN=f"127.0.0.1:{tls_port}",
        BROKERPROXY_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        BROKERPROXY_UPSTREAM=redis_server.url(),
    )
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command(image), env=env, stdout=out, stderr=subprocess.STDOUT)
    processes.append(proc)
    wait_for_port(tls_port, proc=proc)
    wait_for_port(metrics_port, proc=proc)

    def tls_client(user: str | None) -> redis.Redis:
        extra: dict[str, object] = {"retry": Retry(NoBackoff(), 0)}  # a refusal is final: no reconnect loop
        if user is not None:
            extra |= {"ssl_certfile": str(certs / user / "tls.crt"), "ssl_keyfile": str(certs / user / "tls.key")}
        return redis.Redis(
            host="localhost",  # a name the server certificate carries: redis-py checks the hostname
            port=tls_port,
            ssl=True,
            ssl_ca_certs=str(certs / "ca.crt"),
            ssl_cert_reqs="required",
            **extra,
        )

    ops = tls_client("ops")
    assert ops.execute_command("ACL", "WHOAMI") == b"ops"
    ops.close()
    worker = tls_client("airflow-worker")
    assert worker.ping() is True
    worker.lpush("default", "a task")  # its queue
    assert worker.brpop(["default"], timeout=1) == (b"default", b"a task")
    with pytest.raises(redis.exceptions.NoPermissionError, match="airflow-worker"):
        worker.flushall()
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.get("someone-else's-key")
    worker.close()
    scheduler = tls_client("airflow-scheduler")
    scheduler.lpush("default", "sent")
    with pytest.raises(redis.exceptions.NoPermissionError, match="airflow-scheduler"):  # a producer cannot consume
        scheduler.rpop("default")
    scheduler.close()
    anonymous = tls_client(None)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    # the plaintext port, inside the compose network: AUTH with a role's generated password
    password = (certs / "passwords" / "flower").read_text().strip()
    flower = redis.Redis(port=port, username="flower", password=password)
    assert flower.llen("default") == 1
    flower.close()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()
