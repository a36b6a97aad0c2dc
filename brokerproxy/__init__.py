"""brokerproxy: a RESP proxy in front of Redis for Celery and Airflow."""

__version__ = "0.1.0"

from .config import Config, load
from .server import Server

__all__ = ["Config", "Server", "__version__", "load"]
