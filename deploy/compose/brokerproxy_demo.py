"""The compose demo's DAG: three dependent tasks, each a Celery task the scheduler sends through brokerproxy and a
worker consumes through it. Trigger it in the UI or with
``docker compose exec airflow-scheduler airflow dags trigger brokerproxy_demo``."""

from __future__ import annotations

import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2026, 1, 1), catchup=False, tags=["brokerproxy"])
def brokerproxy_demo() -> None:
    @task
    def extract() -> list[int]:
        return list(range(1, 11))

    @task
    def transform(numbers: list[int]) -> list[int]:
        return [n * n for n in numbers]

    @task
    def load(squares: list[int]) -> int:
        total = sum(squares)
        print(f"sum of squares: {total}")
        return total

    load(transform(extract()))


brokerproxy_demo()
