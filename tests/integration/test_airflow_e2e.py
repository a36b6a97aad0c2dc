"""A real Apache Airflow through brokerproxy: the CeleryExecutor's broker and result backend are the proxy, which
enforces the Celery roles of the README (the scheduler ``producer(default) + result_reader`` with ``control``, the
worker ``worker(default)``) in front of the test's own Redis.

Airflow (tests/airflow/install.py: 3.3.2 and the Celery provider, in a virtual environment of its own, built once
under ~/.cache/brokerproxy-airflow-venv/) runs as its components: ``db migrate`` on a PostgreSQL database of the
test's own (created on the machine's server at 127.0.0.1:5432, dropped at the end), ``api-server`` (Airflow 3's
workers report task state and XComs through its execution API), ``dag-processor``, ``scheduler`` and ``celery
worker``, each in its own process group. The test triggers the DAG of tests/airflow/dags/brokerproxy_e2e.py (four
dependent tasks, results through XCom), waits for the run to succeed, and checks what the proxy saw: the four
``execute_workload`` messages published to and consumed from ``default``, their four SUCCESS results (which are
in Redis, db 1), authentications only as the two role users, no ACL denial, no failed authentication.

Marked slow (not in the default run): ``python -m pytest -q -m slow tests/integration/test_airflow_e2e.py``. It
prints how long the install (0 when the environment is cached) and the run took.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.airflow import install
from tests.conftest import ProxyProcess, RedisServer, free_port, wait_for_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

DAGS = Path(__file__).resolve().parents[1] / "airflow" / "dags"
DAG_ID = "brokerproxy_e2e"
TASKS = ("numbers", "squares", "cubes", "total")
EXPECTED_TOTAL = sum(v * v for v in range(1, 11)) + sum(v**3 for v in range(1, 11))  # 3410
QUEUE = "default"  # Airflow's [operators] default_queue
CELERY_TASK = "execute_workload"  # the provider's Celery task for Airflow 3 workloads
RUN_TIMEOUT = 300.0
PG = {"host": "127.0.0.1", "port": "5432", "user": "postgres"}
PASSWORDS = {"airflow-scheduler": secrets.token_hex(12), "airflow-worker": secrets.token_hex(12)}


def proxy_config(mport: int, audit: Path) -> str:
    return f"""
metrics_listen = "127.0.0.1:{mport}"

[metrics]
depth_poll_interval = 1.0

[acl]
rules = ["user default off"]

[[acl.roles]]
name = "airflow-worker"
role = "worker({QUEUE})"
passwords = ["{PASSWORDS["airflow-worker"]}"]

[[acl.roles]]
name = "airflow-scheduler"
role = "producer({QUEUE}) + result_reader"
control = true
passwords = ["{PASSWORDS["airflow-scheduler"]}"]

[audit]
file = "{audit}"
"""


def psql(sql: str, db: str = "test") -> str:
    psql_bin = shutil.which("psql")
    if psql_bin is None:
        raise RuntimeError("psql is not installed (apt-get install postgresql-client)")
    out = subprocess.run(
        [psql_bin, "-h", PG["host"], "-p", PG["port"], "-U", PG["user"], "-d", db, "-v", "ON_ERROR_STOP=1", "-Atc",
         sql],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"psql {sql!r}: {out.stderr.strip()}")
    return out.stdout


class Airflow:
    """Airflow's components, each started in a process group of its own, with a marker in its environment so
    that teardown also finds what they forked into groups of their own (Airflow 3's task supervisor does)."""

    def __init__(self, venv: Path, home: Path, env: dict[str, str]) -> None:
        self.venv = venv
        self.home = home
        self.marker = f"brokerproxy-airflow-e2e-{secrets.token_hex(8)}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON", "VIRTUAL_ENV"))},
            "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "VIRTUAL_ENV": str(venv),
            "AIRFLOW_HOME": str(home),
            "BROKERPROXY_AIRFLOW_E2E": self.marker,
            **env,
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = home / "logs-components"
        self.logs.mkdir(parents=True, exist_ok=True)

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
        out = subprocess.run(
            [str(install.airflow_bin(self.venv)), *args], capture_output=True, text=True,
            env={**self.env, **(env or {})}, timeout=timeout, check=False, start_new_session=True,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} exited with {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [str(install.airflow_bin(self.venv)), *args], stdout=log, stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})}, start_new_session=True,
            )  # fmt: skip
        self.procs[name] = proc
        return proc

    def check_running(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"airflow {name} exited with {proc.returncode}\n{self.diag()}")

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def diag(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.log_tail(name)}" for name in self.procs)

    def marked_pids(self) -> list[int]:
        needle = f"BROKERPROXY_AIRFLOW_E2E={self.marker}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        # The worker first, warm (it finishes its tasks and acknowledges), then the rest; each whole group.
        order = sorted(self.procs, key=lambda n: (n != "worker", n != "scheduler"))
        for name in order:
            proc = self.procs[name]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for pid in self.marked_pids():  # anything they forked into other groups or sessions
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def json_out(text: str) -> Any:
    """The JSON document of an ``airflow … -o json`` command: its last line that is one (log lines come first)."""
    for line in reversed(text.splitlines()):
        if line.startswith(("[", "{")):
            return json.loads(line)
    raise AssertionError(f"no JSON in the output:\n{text}")


def scrape(mport: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(what: str, check: Callable[[], Any], timeout: float, airflow: Airflow, every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        airflow.check_running()
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s\n{airflow.diag()}")
        time.sleep(every)


@pytest.fixture
def airflow_venv() -> tuple[Path, float]:
    try:
        return install.ensure_venv()
    except install.InstallError as exc:
        pytest.fail(f"Apache Airflow could not be installed: {exc}")


@pytest.fixture
def airflow_db() -> Iterator[str]:
    try:
        psql("SELECT 1")
    except RuntimeError as exc:
        pytest.fail(f"needs the PostgreSQL server at {PG['host']}:{PG['port']} (trust auth): {exc}")
    name = f"brokerproxy_airflow_{os.getpid()}_{secrets.token_hex(4)}"
    psql(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_airflow_dag_runs_through_the_proxy(
    airflow_venv: tuple[Path, float],
    airflow_db: str,
    redis_server: RedisServer,
    start_proxy: Callable[..., ProxyProcess],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    venv, install_seconds = airflow_venv
    started = time.monotonic()
    mport = free_port()
    audit = tmp_path / "audit.jsonl"
    proxy = start_proxy(redis_server.url(), config=proxy_config(mport, audit))
    wait_for_port(mport)

    def urls(user: str) -> dict[str, str]:
        base = f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{proxy.port}"
        return {"AIRFLOW__CELERY__BROKER_URL": f"{base}/0", "AIRFLOW__CELERY__RESULT_BACKEND": f"{base}/1"}

    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(DAGS / f"{DAG_ID}.py", dags)
    out_file = tmp_path / "total.txt"
    api_port = free_port()
    airflow = Airflow(
        venv,
        tmp_path / "airflow-home",
        {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),  # every component signs and checks with it
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": (
                f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{airflow_db}"
            ),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # The scheduler's credentials for the components and the CLI: only the worker gets its own.
            **urls("airflow-scheduler"),
        },
    )
    try:
        airflow.cli("db", "migrate", timeout=600)
        airflow.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1")
        airflow.start("dag-processor", "dag-processor")
        airflow.start("scheduler", "scheduler")
        airflow.start(
            "worker", "celery", "worker", "--queues", QUEUE, "--concurrency", "2", "--skip-serve-logs",
            "--celery-hostname", f"brokerproxy-e2e-{os.getpid()}@%h",
            env={**urls("airflow-worker"), "BROKERPROXY_E2E_OUT": str(out_file)},
        )  # fmt: skip
        wait_for_port(api_port, timeout=120, proc=airflow.procs["api-server"])

        def dag_registered() -> bool:
            listed = json_out(airflow.cli("dags", "list", "-o", "json"))
            return any(d.get("dag_id") == DAG_ID for d in listed)

        wait_until(f"the DAG {DAG_ID} parsed", dag_registered, 180, airflow, every=3)
        ready = time.monotonic()

        run_id = f"brokerproxy_e2e_{secrets.token_hex(4)}"
        airflow.cli("dags", "trigger", DAG_ID, "--run-id", run_id)

        def run_state() -> str | None:
            runs = json_out(airflow.cli("dags", "list-runs", DAG_ID, "-o", "json"))
            state = next((r["state"] for r in runs if r.get("run_id") == run_id), None)
            return state if state in ("success", "failed") else None

        state = wait_until(f"run {run_id} finished", run_state, RUN_TIMEOUT, airflow, every=3)
        finished = time.monotonic()
        tis = json_out(airflow.cli("tasks", "states-for-dag-run", DAG_ID, run_id, "-o", "json"))
        states = {ti["task_id"]: ti["state"] for ti in tis}
        assert state == "success", f"{states}\n{airflow.diag()}"
        assert states == dict.fromkeys(TASKS, "success"), states
        total, _host, _pid = out_file.read_text().split()
        assert int(total) == EXPECTED_TOTAL

        # What the proxy saw: each task instance one Celery message on "default", consumed, and its result.
        def proxy_counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            m = scrape(mport)
            done = sample(m, "brokerproxy_task_results_total", task=CELERY_TASK, state="SUCCESS") >= len(TASKS)
            return m if done else None

        metrics = wait_until("the proxy's counts", proxy_counted, 30, airflow, every=1)
        n = len(TASKS)
        assert sample(metrics, "brokerproxy_tasks_published_total", task=CELERY_TASK, queue=QUEUE) == n
        assert sample(metrics, "brokerproxy_queue_messages_published_total", queue=QUEUE) == n
        assert sample(metrics, "brokerproxy_queue_messages_consumed_total", queue=QUEUE) == n
        assert sample(metrics, "brokerproxy_task_results_total", task=CELERY_TASK, state="SUCCESS") == n
        assert sample(metrics, "brokerproxy_queue_depth", queue=QUEUE) == 0
        assert sample(metrics, "brokerproxy_auth_failures_total") == 0
        denials = {k: v for k, v in metrics.items() if k[0] == "brokerproxy_acl_denials_total" and v}
        assert denials == {}, denials
        # The results are in Redis, written by the worker through the proxy.
        assert len(redis_server.client(db=1).keys("celery-task-meta-*")) == n

        # Every client authenticated as one of the two role users, both did, and the ACL refused nothing.
        events = [json.loads(line) for line in audit.read_text().splitlines()]
        auths = [e for e in events if e["event"] == "auth"]
        assert {e["user"] for e in auths} == set(PASSWORDS), auths
        assert all(e["ok"] for e in auths), auths
        assert [e for e in events if e["event"] == "denied"] == []
    finally:
        airflow.stop()
    leftovers = airflow.marked_pids()
    assert leftovers == [], f"Airflow processes left running: {leftovers}"
    # Nor at shutdown (the worker's warm shutdown restores and unbinds; the scheduler closes its connections).
    denied = [e for e in map(json.loads, audit.read_text().splitlines()) if e["event"] in ("denied", "auth")]
    assert [e for e in denied if e["event"] == "denied" or not e["ok"]] == []
    assert proxy.proc.poll() is None, proxy.logs()
    with capsys.disabled():
        print(
            f"\nairflow e2e: Airflow {install.AIRFLOW_VERSION}, celery provider {install.CELERY_PROVIDER_VERSION}; "
            f"install {install_seconds:.0f} s ({'cached' if not install_seconds else 'fresh'}), "
            f"migrate + start {ready - started:.0f} s, DAG run {finished - ready:.0f} s, "
            f"test total {time.monotonic() - started:.0f} s"
        )
