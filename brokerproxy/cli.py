"""Command line: flags, environment, logging set-up, exit codes. The only module that exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

from . import __version__
from .config import DEFAULT_LISTEN, DEFAULT_UPSTREAM, LOG_LEVELS, Config, load
from .errors import ConfigError
from .server import Server

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_START = 3
EXIT_DRAIN_TIMEOUT = 4

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="brokerproxy",
        description="A RESP proxy in front of Redis for Celery and Airflow. Every flag can also be set in the "
        "config file or as BROKERPROXY_<FLAG> (for example BROKERPROXY_UPSTREAM); flags win over the environment, "
        "which wins over the file.",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"address for Redis clients (default {DEFAULT_LISTEN}; '' for none, with --tls-listen)",
    )
    p.add_argument(
        "--tls-listen",
        metavar="HOST:PORT",
        help="address for TLS clients (rediss://), beside or instead of --listen; needs [tls] cert_file and key_file",
    )
    p.add_argument(
        "--upstream",
        metavar="URL",
        help=f"Redis to forward to, redis://[user:pass@]host:port/db (default {DEFAULT_UPSTREAM})",
    )
    p.add_argument(
        "--config", metavar="FILE", help="TOML config file (see config.example.toml); env BROKERPROXY_CONFIG"
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    p.add_argument("--drain-timeout", metavar="SECONDS", help="bound on the SIGTERM drain (default 30)")
    p.add_argument("--connect-timeout", metavar="SECONDS", help="bound on connecting to Redis (default 5)")
    p.add_argument(
        "--protected-mode",
        choices=("yes", "no"),
        help="refuse to listen on a non-loopback address with no users configured (default yes)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="address for /metrics, /healthz and /readyz (default: no metrics listener, no observation)",
    )
    p.add_argument("--version", action="version", version=f"brokerproxy {__version__}")
    return p


def build_config(argv: Sequence[str] | None, env: dict[str, str]) -> Config:
    args = parser().parse_args(argv)
    overrides = {
        "listen": args.listen,
        "tls_listen": args.tls_listen,
        "upstream": args.upstream,
        "log_level": args.log_level,
        "drain_timeout": args.drain_timeout,
        "connect_timeout": args.connect_timeout,
        "protected_mode": args.protected_mode,
        "metrics_listen": args.metrics_listen,
    }
    return load(args.config or env.get("BROKERPROXY_CONFIG"), env, overrides)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is Linux/macOS only; the stdlib loop works, slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _run(config: Config, reload: Callable[[], Config]) -> int:
    server = Server(config)
    try:
        await server.start()
    except OSError as exc:
        logging.getLogger("brokerproxy").error(
            "cannot listen", extra={"address": str(config.listen or config.tls_listen), "error": str(exc)}
        )
        return EXIT_START
    server.install_signals(reload)
    clean = await server.serve()
    return EXIT_OK if clean else EXIT_DRAIN_TIMEOUT


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = build_config(argv, dict(os.environ))
    except ConfigError as exc:
        print(f"brokerproxy: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(config.log_level)
    logging.getLogger("brokerproxy").info("starting", extra={"version": __version__})
    loop = _new_loop()
    try:
        # SIGHUP reads the same flags, environment and file again.
        return loop.run_until_complete(_run(config, lambda: build_config(argv, dict(os.environ))))
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        loop.close()
