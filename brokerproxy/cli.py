"""Command line: flags, environment, logging set-up, exit codes. The only module that exits.

``brokerproxy [flags]`` runs the proxy. Three subcommands, dispatched on the first argument before the proxy's own
parser sees it (so the flag-only command line stays exactly as it was):

* ``brokerproxy check-config FILE``: load FILE (and the BROKERPROXY_* environment) as the proxy would, print the
  effective config as JSON with every secret masked, exit 0; or exit 2 with the error naming the key;
* ``brokerproxy hash-password``: one password from stdin (not echoed on a terminal) -> ``#<sha256 hex>``;
* ``brokerproxy status [--metrics-url URL]``: a one-screen summary of ``/api/status``; exit 1 when unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import hashlib
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .config import DEFAULT_LISTEN, DEFAULT_UPSTREAM, LOG_LEVELS, Address, Config, Upstream, load
from .errors import ConfigError, UpstreamError
from .server import Server
from .supervisor import WORKER_FLAG, Outcome, Supervisor, lost_line, parse_lost_line

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_START = 3
EXIT_DRAIN_TIMEOUT = 4
#: A second SIGINT: exit at once (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130
#: ``brokerproxy status``: the metrics listener could not be reached or did not answer with a status.
EXIT_UNREACHABLE = 1
#: ``brokerproxy hash-password``: no password, or the two entries on a terminal differ.
EXIT_USAGE = 2

DEFAULT_METRICS_URL = "http://127.0.0.1:9180"

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
        usage="%(prog)s [options]\n       %(prog)s {check-config,hash-password,status} ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A RESP proxy in front of Redis for Celery and Airflow. Every flag can also be set in the\n"
        "config file or as BROKERPROXY_<FLAG> (for example BROKERPROXY_UPSTREAM); flags win over the\n"
        "environment, which wins over the file.",
        epilog="subcommands (each has its own --help):\n"
        "  check-config FILE     validate a config file (with the BROKERPROXY_* environment) and print the\n"
        "                        effective config as JSON, secrets masked; exit 2 naming the bad key\n"
        "  hash-password         read a password from stdin, print #<sha256> for an ACL file\n"
        "  status [--metrics-url URL]\n"
        "                        summary of queues and health from a running proxy's /api/status\n"
        f"                        (default {DEFAULT_METRICS_URL})",
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
        help=f"Redis to forward to: redis://[user:pass@]host:port/db, rediss:// (TLS), or "
        f"sentinel://[user:pass@]s1:26379,s2:26379/master/db (sentinels:// for TLS) (default {DEFAULT_UPSTREAM})",
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
        help="address for /metrics, /healthz, /readyz and the status page (/, /api/status) (default: none, and no "
        "observation)",
    )
    p.add_argument(
        "--workers",
        metavar="N|auto",
        help="event-loop processes sharing the listeners, under a supervisor that restarts them and sums their "
        "metrics; auto = one per CPU (default 1: this process serves)",
    )
    # A worker of --workers: INDEX:FD of its channel to the supervisor (supervisor.py). Not for people.
    p.add_argument(WORKER_FLAG, dest="worker_channel", metavar="INDEX:FD", help=argparse.SUPPRESS)
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
        "workers": args.workers,
    }
    return load(args.config or env.get("BROKERPROXY_CONFIG"), env, overrides)


class _WorkerField(logging.Filter):
    """Adds ``"worker": INDEX`` to every line of a --workers worker (they share the supervisor's stderr)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def _setup_logging(level: str, worker: int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    if worker is not None:
        handler.addFilter(_WorkerField(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is Linux/macOS only; the stdlib loop works, slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _run(config: Config, reload: Callable[[], Config], started: Callable[[Server], None] | None = None) -> int:
    """Serve until stopped; ``started`` is called once the listeners are up and the signal handlers installed."""
    server = Server(config)
    try:
        await server.start()
    except OSError as exc:
        logging.getLogger("brokerproxy").error(
            "cannot listen", extra={"address": str(config.listen or config.tls_listen), "error": str(exc)}
        )
        return EXIT_START
    except UpstreamError as exc:  # sentinel://: no Sentinel named a master that checks out
        logging.getLogger("brokerproxy").error("cannot find the master", extra={"error": str(exc)})
        return EXIT_START
    server.install_signals(reload)
    if started is not None:
        started(server)
    clean = await server.serve()
    return EXIT_OK if clean else EXIT_DRAIN_TIMEOUT


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        return SUBCOMMANDS[args[0]](args[1:])
    try:
        config = build_config(argv, dict(os.environ))
    except ConfigError as exc:
        print(f"brokerproxy: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    channel = parser().parse_args(args).worker_channel
    worker = _worker_channel(channel) if channel else None
    _setup_logging(config.log_level, worker[0] if worker else None)
    logging.getLogger("brokerproxy").info("starting", extra={"version": __version__, "workers": config.workers})
    loop = _new_loop()
    try:
        if worker is not None:
            # A worker serves its metrics on a loopback port of its own, which it reports to the supervisor.
            if config.metrics_listen is not None:
                # Open to the supervisor's scrapes (the supervisor's own listener checks the auth token).
                metrics = dataclasses.replace(config.metrics, auth_token="")
                config = dataclasses.replace(config, metrics_listen=Address("127.0.0.1", 0), metrics=metrics)
            return loop.run_until_complete(
                _run(config, lambda: build_config(argv, dict(os.environ)), lambda s: _report_ready(s, worker[1]))
            )
        if config.workers > 1:
            return _OUTCOMES[loop.run_until_complete(Supervisor(config, args).run())]
        # SIGHUP reads the same flags, environment and file again.
        return loop.run_until_complete(_run(config, lambda: build_config(argv, dict(os.environ))))
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        loop.close()


_OUTCOMES: dict[Outcome, int] = {
    "clean": EXIT_OK,
    "unclean": EXIT_DRAIN_TIMEOUT,
    "start": EXIT_START,
    "config": EXIT_CONFIG,
    "interrupted": EXIT_INTERRUPTED,
}


def _worker_channel(value: str) -> tuple[int, socket.socket]:
    """``INDEX:FD`` of the hidden worker flag: the worker's index and its channel to the supervisor."""
    index, _, fd = value.partition(":")
    return int(index), socket.socket(fileno=int(fd))


def _report_ready(server: Server, channel: socket.socket) -> None:
    """Tell the supervisor this worker serves (and where its metrics are), then watch the channel: its end means the
    supervisor is gone, and the worker drains rather than outlive it. The channel also carries lost replies both ways
    (``lost`` lines, see Server.reply_lost): a client's connections may be spread over the workers."""
    ports = server.metrics_ports
    try:
        channel.sendall(f"ready {ports[0] if ports else 0}\n".encode())
    except OSError:  # the supervisor is already gone
        server.request_stop("supervisor exited")
        return
    channel.setblocking(False)
    loop = asyncio.get_running_loop()
    pending = bytearray()

    def relay(host: str, user: str | None) -> None:
        # A line per client and outage. A socket buffer too full to take it whole would mean a supervisor that reads
        # nothing any more: the line is lost (a part of it makes the supervisor's next line unreadable, then ignored).
        line = lost_line(host, user)
        sent = 0
        with contextlib.suppress(OSError):
            sent = channel.send(line)
        if sent != len(line):
            logging.getLogger("brokerproxy").warning("lost reply not relayed: the supervisor's channel is full")

    server.relay_reply_lost = relay

    def readable() -> None:
        try:
            data = channel.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(channel.fileno())
            server.relay_reply_lost = None
            server.request_stop("supervisor exited")
            return
        pending.extend(data)
        while (end := pending.find(b"\n")) >= 0:
            lost = parse_lost_line(bytes(pending[:end]))
            del pending[: end + 1]
            if lost is not None:
                server.reply_lost(*lost, relayed=True)
        if len(pending) > 65536:  # not a line of ours
            pending.clear()

    loop.add_reader(channel.fileno(), readable)


# ---------------------------------------------------------------------------------------------------- check-config

MASK = "***"
#: Field names that hold secrets even where the dataclass shows them: password digests too (the SHA-256 of a weak
#: password falls to a dictionary attack).
_SECRET_WORDS = ("password", "passphrase", "secret")
#: ...but a field naming where a secret is kept (a file path, an environment variable's name) is not one.
_SECRET_POINTERS = ("_file", "_env")


def _is_secret(f: dataclasses.Field[Any]) -> bool:
    if f.name.endswith(_SECRET_POINTERS):
        return False
    return not f.repr or any(word in f.name for word in _SECRET_WORDS)


def _mask(value: Any) -> Any:
    if value is None or value == "" or value == ():
        return value
    if isinstance(value, (list, tuple)):
        return [MASK] * len(value)
    return MASK


def mask_acl_rule(rule: str) -> str:
    """An ACL rule line with its passwords (``>pw``, ``<pw``) and password digests (``#hex``, ``!hex``) masked."""
    return " ".join(t[0] + MASK if t[:1] in (">", "<", "#", "!") and len(t) > 1 else t for t in rule.split(" "))


def effective_config(value: Any, name: str = "") -> Any:
    """The config as plain JSON values, every secret masked (see ``_is_secret``; inline ACL rules token by token)."""
    if isinstance(value, Address):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.name == "acl_users":  # the parsed users (their rules hold digests): their names and state only
                out["effective_users"] = [
                    {"name": getattr(u, "name", "?"), "enabled": bool(getattr(u, "enabled", False))} for u in item
                ]
            elif _is_secret(f):
                out[f.name] = _mask(item)
            elif f.name == "rules" and isinstance(item, (list, tuple)):
                out[f.name] = [mask_acl_rule(str(r)) for r in item]
            else:
                out[f.name] = effective_config(item, f.name)
        if isinstance(value, Upstream):
            out["url"] = str(value)  # Upstream.__str__ never shows the password
        return out
    if isinstance(value, dict):
        return {str(k): effective_config(v, name) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [effective_config(v, name) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, bytes):
        return MASK  # only digests are bytes in the config
    return str(value)


def check_config(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="brokerproxy check-config",
        description="Load a config file as the proxy would (with the BROKERPROXY_* environment applied), and print "
        "the effective config as JSON with every password, password digest and upstream password masked. Exit 0 "
        "when it is valid, 2 with the error (naming the key) when it is not.",
    )
    p.add_argument("file", metavar="FILE", help="the TOML config file")
    args = p.parse_args(argv)
    try:
        config = load(args.file, dict(os.environ))
    except ConfigError as exc:
        print(f"brokerproxy: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(effective_config(config), indent=2))
    print(f"brokerproxy: {args.file} is valid", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- hash-password


def hash_password(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="brokerproxy hash-password",
        description="Read one password from stdin (the first line; not echoed, and asked twice, on a terminal) and "
        "print its SHA-256 as an ACL file takes it: #<64 hex digits>. In [[users]] and [[acl.roles]], "
        "password_sha256 takes the digits without the #.",
    )
    p.parse_args(argv)
    if sys.stdin.isatty():
        try:
            first = getpass.getpass("Password: ")
            again = getpass.getpass("Again: ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return EXIT_USAGE
        if first != again:
            print("brokerproxy: the two passwords differ", file=sys.stderr)
            return EXIT_USAGE
        password = first.encode()
    else:
        password = sys.stdin.buffer.readline().rstrip(b"\r\n")
    if not password:
        print("brokerproxy: no password on stdin", file=sys.stderr)
        return EXIT_USAGE
    print("#" + hashlib.sha256(password).hexdigest())
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- status

#: Rows of the summary: it must fit one screen.
SUMMARY_QUEUES = 12
SUMMARY_TASKS = 8


def fetch_status(base: str, timeout: float, token: str = "") -> dict[str, Any]:
    """GET <base>/api/status?history=0, straight (no HTTP proxy from the environment: the listener is local or
    in-cluster), with the metrics auth token if given. Raises OSError (urllib.error.URLError is one) or ValueError."""
    url = base.rstrip("/") + "/api/status?history=0"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with opener.open(request, timeout=timeout) as response:
        body = response.read()
    data = json.loads(body)
    if not isinstance(data, dict) or "queues" not in data or "upstream" not in data:
        raise ValueError("the answer is not a brokerproxy status")
    return data


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms" if s >= 0.01 else f"{s * 1000:.1f} ms"
    if s < 60:
        return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _rate(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}" if r < 100 else f"{r:.0f}"


def _uptime(s: float) -> str:
    s = int(s)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


def _cut(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"


def summary(data: dict[str, Any], source: str) -> str:
    """The one-screen terminal summary of a status snapshot."""
    up = data["upstream"]
    sec = data["security"]
    conns = data["connections"]
    state = "up" if up["up"] else "DOWN"
    ready = "draining" if up["draining"] else "ready" if up["ready"] else f"NOT READY ({up['reason']})"
    listeners = ", ".join(f"{k} {v}" for k, v in conns["by_listener"].items())
    denials = sum(d["count"] for d in sec["acl_denials"])
    protocol = sum(sec["protocol_errors"].values())
    lines = [
        f"brokerproxy {data['version']} at {source}, up {_uptime(data['uptime'])}",
        f"upstream {up['address']}: {state}, {ready}",
        f"workers online {data['workers_online']} | client connections {conns['open']}"
        + (f" ({listeners})" if listeners else "")
        + f" | auth failures {sec['auth_failures']} | ACL denials {denials} | protocol errors {protocol}",
        "",
    ]
    queues = sorted(data["queues"], key=lambda q: (-(q["depth"] or 0), q["name"]))
    window = data.get("rate_window")
    head = ("QUEUE", "DEPTH", "PUB/S", "CONS/S", "WAIT P50", "WAIT P95", "CONSUMERS", "PUBLISHED", "CONSUMED")
    fmt = "{:<24} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>10} {:>10}"
    lines.append(fmt.format(*head))
    for q in queues[:SUMMARY_QUEUES]:
        lines.append(
            fmt.format(
                _cut(q["name"], 24), "-" if q["depth"] is None else q["depth"], _rate(q["publish_rate"]),
                _rate(q["consume_rate"]), _seconds(q["wait"]["p50"]), _seconds(q["wait"]["p95"]), q["consumers"],
                q["published"], q["consumed"],
            )
        )  # fmt: skip
    if not queues:
        lines.append("(no queue seen yet)")
    elif len(queues) > SUMMARY_QUEUES:
        lines.append(f"... and {len(queues) - SUMMARY_QUEUES} more queues (the deepest are shown)")
    if window:
        lines.append(f"rates over the last {window:.0f} s")
    lines.append("")
    tasks = sorted(data["tasks"], key=lambda t: (-t["published"], t["name"]))
    tfmt = "{:<32} {:>10} {:>8} {:>8} {:>6} {:>6} {:>11}"
    lines.append(tfmt.format("TASK", "PUBLISHED", "SUCCESS", "FAILURE", "RETRY", "OTHER", "RUNTIME P95"))
    for t in tasks[:SUMMARY_TASKS]:
        r = t["results"]
        other = sum(n for state, n in r.items() if state not in ("SUCCESS", "FAILURE", "RETRY", "STARTED"))
        lines.append(
            tfmt.format(
                _cut(t["name"], 32), t["published"], r.get("SUCCESS", 0), r.get("FAILURE", 0), r.get("RETRY", 0),
                other, _seconds(t["runtime"]["p95"]),
            )
        )  # fmt: skip
    if not tasks:
        lines.append("(no task seen yet)")
    elif len(tasks) > SUMMARY_TASKS:
        lines.append(f"... and {len(tasks) - SUMMARY_TASKS} more tasks")
    return "\n".join(lines)


def status(argv: Sequence[str]) -> int:
    default = os.environ.get("BROKERPROXY_METRICS_URL", DEFAULT_METRICS_URL)
    p = argparse.ArgumentParser(
        prog="brokerproxy status",
        description="A one-screen summary of queues and health, from a running proxy's /api/status (the proxy "
        "must run with --metrics-listen). Exit 0 when it answered, 1 when it cannot be reached.",
    )
    p.add_argument(
        "--metrics-url",
        metavar="URL",
        default=default,
        help=f"the proxy's metrics listener (default {DEFAULT_METRICS_URL}; env BROKERPROXY_METRICS_URL)",
    )
    p.add_argument(
        "--auth-token-file",
        metavar="FILE",
        default=os.environ.get("BROKERPROXY_METRICS_AUTH_TOKEN_FILE", ""),
        help="a file holding the listener's auth token ([metrics] auth_token_file; env "
        "BROKERPROXY_METRICS_AUTH_TOKEN_FILE)",
    )
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=5.0, help="bound on the request (default 5)")
    p.add_argument("--json", action="store_true", help="print the status as JSON instead")
    args = p.parse_args(argv)
    base = args.metrics_url if "://" in args.metrics_url else "http://" + args.metrics_url
    token = ""
    if args.auth_token_file:
        try:
            with open(args.auth_token_file, encoding="utf-8") as fh:
                token = fh.read().rstrip("\r\n")
        except OSError as exc:
            print(f"brokerproxy: cannot read --auth-token-file {args.auth_token_file}: {exc.strerror}", file=sys.stderr)
            return EXIT_UNREACHABLE
    try:
        data = fetch_status(base, args.timeout, token)
    except urllib.error.HTTPError as exc:
        hint = " (is it a brokerproxy metrics listener, of a version with the status page?)" if exc.code == 404 else ""
        if exc.code == 401:
            hint = " (the listener wants its auth token: --auth-token-file)"
        print(f"brokerproxy: {base}/api/status answered HTTP {exc.code}{hint}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except urllib.error.URLError as exc:
        print(f"brokerproxy: cannot reach the metrics listener at {base}: {exc.reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (OSError, ValueError) as exc:
        print(f"brokerproxy: cannot read the status from {base}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(data, indent=2) if args.json else summary(data, base))
    return EXIT_OK


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "check-config": check_config,
    "hash-password": hash_password,
    "status": status,
}
