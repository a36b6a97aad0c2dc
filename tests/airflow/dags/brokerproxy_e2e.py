"""The DAG of tests/integration/test_airflow_e2e.py: four dependent tasks, each a Celery task that the scheduler
publishes through brokerproxy and the worker consumes through it. ``numbers`` fans out to ``squares`` and
``cubes``, which ``total`` joins (their results go through XCom); ``total`` writes its answer to the file named by
``BROKERPROXY_E2E_OUT``, which only the test's Celery worker has in its environment."""

from __future__ import annotations

import datetime
import os
import socket

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2026, 1, 1), catchup=False, tags=["brokerproxy"])
def brokerproxy_e2e() -> None:
    @task
    def numbers() -> list[int]:
        return list(range(1, 11))

    @task
    def squares(values: list[int]) -> int:
        return sum(v * v for v in values)

    @task
    def cubes(values: list[int]) -> int:
        return sum(v**3 for v in values)

    @task
    def total(a: int, b: int) -> int:
        out = os.environ["BROKERPROXY_E2E_OUT"]  # KeyError, and a failed run, outside the test's worker
        with open(out, "w") as f:
            f.write(f"{a + b} {socket.gethostname()} {os.getpid()}\n")
        return a + b

    values = numbers()
    total(squares(values), cubes(values))


brokerproxy_e2e()
