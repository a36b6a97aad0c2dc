"""Apache Airflow with the Celery provider, in a virtual environment of its own, for the slow end-to-end test
(tests/integration/test_airflow_e2e.py).

The environment lives under ``~/.cache/brokerproxy-airflow-venv/`` (``BROKERPROXY_AIRFLOW_VENV`` overrides the
directory), one per Airflow version, Python version and pin set, and is reused once it is complete (a marker file
written after ``airflow version`` ran). Airflow's own constraints files are on GitHub, which these machines cannot
reach; ``constraints-<version>-py<python>.txt`` beside this file pins every package of an install that passed the
test (``pip freeze`` of it), so installs are reproducible without them.

``python -m tests.airflow.install`` builds (or finds) the environment and prints its path and how long it took.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

AIRFLOW_VERSION = "3.3.2"
CELERY_PROVIDER_VERSION = "3.26.0"
POSTGRES_PROVIDER_VERSION = "7.1.1"
REQUIREMENTS = (
    f"apache-airflow[celery,postgres]=={AIRFLOW_VERSION}",
    f"apache-airflow-providers-celery=={CELERY_PROVIDER_VERSION}",
    f"apache-airflow-providers-postgres=={POSTGRES_PROVIDER_VERSION}",
)
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
CONSTRAINTS = Path(__file__).with_name(f"constraints-{AIRFLOW_VERSION}-py{PY}.txt")
MARKER = ".brokerproxy-airflow-complete"
INSTALL_TIMEOUT = 1200.0


class InstallError(RuntimeError):
    """pip could not install Airflow; the message ends with pip's output."""


def cache_root() -> Path:
    env = os.environ.get("BROKERPROXY_AIRFLOW_VENV")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "brokerproxy-airflow-venv"


def venv_dir() -> Path:
    key = hashlib.sha256("\n".join(REQUIREMENTS).encode())
    if CONSTRAINTS.exists():
        key.update(CONSTRAINTS.read_bytes())
    return cache_root() / f"airflow-{AIRFLOW_VERSION}-py{PY}-{key.hexdigest()[:10]}"


def airflow_bin(venv: Path) -> Path:
    return venv / "bin" / "airflow"


def _run(cmd: list[str], log: Path, timeout: float) -> None:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise InstallError(f"{' '.join(cmd)} exited with {proc.returncode}; pip output ({log}):\n{tail}")


def ensure_venv() -> tuple[Path, float]:
    """The environment's directory, and the seconds spent installing it (0.0 when it was already there)."""
    venv = venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once: the second waits, then reuses
        if (venv / MARKER).exists() and airflow_bin(venv).exists():
            return venv, 0.0
        started = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one from an interrupted run
        log = venv.parent / f"{venv.name}.install.log"
        log.write_text("")
        _run([sys.executable, "-m", "venv", str(venv)], log, 120)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        _run([*pip, "--upgrade", "pip"], log, INSTALL_TIMEOUT)
        constraints = ["-c", str(CONSTRAINTS)] if CONSTRAINTS.exists() else []
        _run([*pip, *constraints, *REQUIREMENTS], log, INSTALL_TIMEOUT)
        env = {**os.environ, "AIRFLOW_HOME": str(venv / "airflow-home-check")}
        version = subprocess.run(
            [str(airflow_bin(venv)), "version"], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        if version.returncode != 0 or version.stdout.strip().splitlines()[-1:] != [AIRFLOW_VERSION]:
            raise InstallError(f"airflow version gave {version.returncode}: {version.stdout}{version.stderr}")
        shutil.rmtree(venv / "airflow-home-check", ignore_errors=True)
        (venv / MARKER).write_text(f"{AIRFLOW_VERSION}\n")
        return venv, time.monotonic() - started


if __name__ == "__main__":
    path, seconds = ensure_venv()
    print(f"{path} (installed in {seconds:.0f} s)" if seconds else f"{path} (already there)")
