"""Configuration: frozen dataclasses, validated up front, inert (no sockets or files opened here).

Sources, lowest precedence first: defaults, the TOML file (``--config``), ``BROKERPROXY_<KEY>`` environment
variables, command-line flags. Every error names the key (``limits.max_bulk_length``) and says why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import unquote, urlsplit

from . import resp
from .acl import WORDING, AclError, UserTable, parse_acl_file
from .acl import User as AclUser
from .acl_roles import RoleError, expand, role_user
from .errors import ConfigError
from .sentinel_url import SentinelUpstream, parse_sentinel_url
from .tls import AUTH_CLIENTS, IDENTITY_FIELDS, UNMAPPED, VERSIONS, ClientTLS, ServerTLS, client_context, server_context

DEFAULT_LISTEN = "127.0.0.1:6380"
DEFAULT_UPSTREAM = "redis://127.0.0.1:6379/0"
DEFAULT_LOG_LEVEL = "info"
#: Seconds a SIGTERM drain may take before what is left is closed.
DEFAULT_DRAIN_TIMEOUT = 30.0
#: Seconds to wait for Redis to accept a connection.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Seconds a client's new upstream connection keeps retrying (Redis restarting, a failover) before its commands get
#: "-ERR upstream unavailable".
DEFAULT_UPSTREAM_WAIT = 10.0
#: Bytes waiting to be written to one side before reading from the other side pauses (per connection).
DEFAULT_WRITE_BUFFER_HIGH_WATER = 1024 * 1024
#: uvloop takes the write-buffer limits as a C int.
MAX_WRITE_BUFFER_HIGH_WATER = 2**31 - 1

#: Pending connections the kernel queues for accept(); Redis's tcp-backlog default. asyncio's own default (100)
#: drops connections in a burst of thousands (measured: 5 000 at once).
DEFAULT_BACKLOG = 511

#: Event-loop processes serving the listeners (``workers``; "auto" = the CPUs this process may run on). With 1 the
#: one process serves, as always; with more, a supervisor starts them on SO_REUSEPORT listeners (supervisor.py).
DEFAULT_WORKERS = 1
#: The most ``workers`` accepts: a typo (1000) would otherwise start a thousand interpreters.
MAX_WORKERS = 256

#: Seconds a connection may stay unauthenticated (when authentication is required) before it is closed.
DEFAULT_AUTH_TIMEOUT = 10.0
#: Failed authentications from one peer address slow it down: each further attempt waits
#: min(AUTH_BACKOFF_BASE * 2**(failures-1), AUTH_BACKOFF_MAX) seconds before it is read.
AUTH_BACKOFF_BASE = 0.05
AUTH_BACKOFF_MAX = 2.0

#: Client connections served at once (Redis's maxclients); the next gets "-ERR max number of clients reached".
DEFAULT_MAX_CLIENTS = 10_000
#: Seconds of silence before TCP keepalive probes start, on both sides (Redis's tcp-keepalive); 0 turns it off.
DEFAULT_TCP_KEEPALIVE = 300
#: Redis's client-output-buffer-limit defaults: "hard soft soft-seconds" per class (0 = no limit). A normal client
#: is held back by backpressure instead (the proxy stops reading Redis for it); a subscriber is not (Redis would
#: then buffer for it), so past these it is disconnected.
DEFAULT_OUTPUT_LIMIT_NORMAL = "0 0 0"
DEFAULT_OUTPUT_LIMIT_PUBSUB = "32mb 8mb 60"

LOG_LEVELS = ("debug", "info", "warning", "error")
ENV_PREFIX = "BROKERPROXY_"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False  # rediss:// (or sentinels://: TLS to the Sentinels and to the master)
    #: sentinel:// : the master is found and followed through these Sentinels; host and port above are only the
    #: first Sentinel's (the server asks the watcher where the master is now).
    sentinel: SentinelUpstream | None = None

    def handshake(self) -> list[list[bytes]]:
        """The commands the proxy sends first on every upstream connection; their replies are swallowed."""
        cmds: list[list[bytes]] = []
        if self.password is not None:
            auth = [b"AUTH"]
            if self.username:
                auth.append(self.username.encode())
            cmds.append([*auth, self.password.encode()])
        if self.db:
            cmds.append([b"SELECT", str(self.db).encode()])
        return cmds

    def __str__(self) -> str:  # never shows the password
        if self.sentinel is not None:
            return str(self.sentinel).replace("sentinel://", "sentinels://", 1) if self.tls else str(self.sentinel)
        who = f"{self.username}@" if self.username else ""
        return f"{'rediss' if self.tls else 'redis'}://{who}{self.host}:{self.port}/{self.db}"


@dataclass(frozen=True)
class OutputLimit:
    """One class of Redis's client-output-buffer-limit: bytes (0 = none) and the seconds over ``soft`` allowed."""

    hard: int = 0
    soft: int = 0
    soft_seconds: float = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.hard or self.soft)


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}


def _memory(key: str, text: str) -> int:
    """Redis's memory units: 1k = 1000, 1kb = 1024 (and m/mb, g/gb)."""
    t = text.strip().lower()
    digits = t.rstrip("kmgb")
    unit = t[len(digits) :]
    if not digits.isdigit() or unit not in _UNITS:
        raise ConfigError(key, f"expected a size such as 32mb, got {text!r}")
    return int(digits) * _UNITS[unit]


def parse_output_limit(key: str, value: Any) -> OutputLimit:
    if not isinstance(value, str) or len(value.split()) != 3:
        why = f'expected "hard soft soft-seconds" as Redis writes it, such as "32mb 8mb 60", got {value!r}'
        raise ConfigError(key, why)
    hard, soft, seconds = value.split()
    if not seconds.isdigit():
        raise ConfigError(key, f"soft-seconds must be a whole number, got {seconds!r}")
    return OutputLimit(_memory(key, hard), _memory(key, soft), float(seconds))


@dataclass(frozen=True)
class User:
    """A ``[[users]]`` entry: a user with every permission (``~* &* +@all``) and these passwords."""

    name: str
    # SHA-256 digests of the user's passwords; several at once allow rotation.
    password_hashes: tuple[bytes, ...] = field(repr=False)
    enabled: bool = True

    def acl_user(self) -> AclUser:
        user = AclUser(self.name)
        rules = ["on" if self.enabled else "off", *(f"#{h.hex()}" for h in self.password_hashes)]
        user.apply([*rules, "~*", "&*", "+@all"])
        return user


@dataclass(frozen=True)
class Acl:
    """``[acl]``: Redis ACL users, from a file in Redis's aclfile format and/or inline rule lines."""

    file: str | None = None
    rules: tuple[str, ...] = ()
    #: Which Redis's wording NOPERM replies use: "7.2" (Redis 7.2 and later) or "7.0".
    wording: str = "7.2"
    #: ``[[acl.roles]]``: users given a Celery role (acl_roles.expand), with its Lua script allowlist.
    roles: tuple[RoleUser, ...] = ()

    @property
    def configured(self) -> bool:
        return self.file is not None or bool(self.rules) or bool(self.roles)


@dataclass(frozen=True)
class Audit:
    """``[audit]``: where the audit trail goes ("" = off, "stderr", or a file path) and which commands it lists."""

    file: str = ""
    commands: tuple[str, ...] = ("@admin", "@dangerous")


@dataclass(frozen=True)
class RoleUser:
    name: str
    role: str  # e.g. "worker(default, high*)" or "producer(default) + result_reader"
    passwords: tuple[str, ...] = field(default=(), repr=False)
    password_sha256: tuple[str, ...] = ()
    key_prefix: str = ""  # kombu's global_keyprefix
    result_key_prefix: str | None = None  # the result backend's, when it differs
    db: int = 0
    control: bool = False  # producer: may use celery inspect / control


#: Seconds between the side connection's PING (for /readyz and brokerproxy_upstream_up) and LLEN of the queues seen.
DEFAULT_DEPTH_POLL_INTERVAL = 5.0


@dataclass(frozen=True)
class Metrics:
    """``[metrics]``: what the observer keeps, and how often it polls queue depth."""

    max_queues: int = 100
    max_tasks: int = 100
    key_prefix: str = ""  # kombu's global_keyprefix, stripped from queue names
    depth_poll_interval: float = DEFAULT_DEPTH_POLL_INTERVAL
    #: Where the secret that guards /metrics, /api/status and / is kept (a file or an environment variable); the
    #: probes /healthz and /readyz stay open. Given as a bearer token or as a Basic password (any user name).
    auth_token_file: str = ""
    auth_token_env: str = ""
    auth_token: str = field(default="", repr=False)  # read from one of the two above at load


@dataclass(frozen=True)
class Config:
    listen: Address | None  # None: TLS only (listen = "")
    upstream: Upstream
    log_level: str = DEFAULT_LOG_LEVEL
    protected_mode: bool = True
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    upstream_wait: float = DEFAULT_UPSTREAM_WAIT
    limits: resp.Limits = resp.DEFAULT_LIMITS
    write_buffer_high_water: int = DEFAULT_WRITE_BUFFER_HIGH_WATER
    users: tuple[User, ...] = ()
    metrics_listen: Address | None = None
    backlog: int = DEFAULT_BACKLOG
    auth_timeout: float = DEFAULT_AUTH_TIMEOUT
    metrics: Metrics = Metrics()
    acl: Acl = Acl()
    audit: Audit = Audit()
    tls_listen: Address | None = None
    tls: ServerTLS = field(default_factory=ServerTLS)
    upstream_tls: ClientTLS = field(default_factory=ClientTLS)
    workers: int = DEFAULT_WORKERS
    max_clients: int = DEFAULT_MAX_CLIENTS
    #: Carry client connections over to a new upstream connection when Redis goes away (see proxy._try_reattach).
    reattach: bool = True
    #: After an outage, close the subscribed and blocked-pop connections of a client (host and user) whose
    #: transaction it cut (a kombu ack), so that the kombu consumer restarts (see Server.reply_lost).
    reattach_reset_consumers: bool = True
    idle_timeout: float = 0.0  # Redis's timeout: close a client idle this long (never a subscriber or a blocked pop)
    tcp_keepalive: int = DEFAULT_TCP_KEEPALIVE
    client_output_buffer_limit_normal: OutputLimit = OutputLimit()
    client_output_buffer_limit_pubsub: OutputLimit = OutputLimit(32 * 1024**2, 8 * 1024**2, 60.0)
    #: The parsed users of [acl] and [[users]] (validated at load; re-read by ``acl_users()`` on reload).
    acl_users: tuple[AclUser, ...] = field(default=(), repr=False, compare=False)

    def authenticator(self) -> UserTable:
        """The user table: [[users]] and [acl] users. With [acl], Redis's default user is added when not defined
        (nopass, every permission: as in Redis); with [[users]] only, clients must authenticate."""
        return UserTable(self.acl_users, implicit_default=not self.users or self.acl.configured)

    @property
    def access_controlled(self) -> bool:
        return bool(self.acl_users)


# ---------------------------------------------------------------------------------------------------- parsing

#: Top-level scalar keys: name → (parser, default). Each is also a flag and a BROKERPROXY_<NAME> variable.
def parse_address(key: str, value: Any) -> Address:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected HOST:PORT as a string, got {type(value).__name__}")
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    try:
        port_n = int(port)
    except ValueError:
        raise ConfigError(key, f"port {port!r} is not a number") from None
    if not 0 <= port_n <= 65535:
        raise ConfigError(key, f"port {port_n} is out of range 0-65535")
    return Address(host, port_n)


def parse_upstream(key: str, value: Any) -> Upstream:
    if not isinstance(value, str):
        raise ConfigError(key, "expected a URL such as redis://user:pass@host:6379/0")
    scheme = value.partition("://")[0].lower()
    if scheme in ("sentinel", "sentinels"):
        su = parse_sentinel_url(key, "sentinel" + value[len(scheme) :])
        host, port = su.addresses[0]
        return Upstream(host, port, su.db, su.username, su.password, tls=scheme == "sentinels", sentinel=su)
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(
            key, f"unsupported scheme {parts.scheme!r}; expected redis://host:port/db, rediss://, sentinel://"
        )
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
    if not parts.hostname:
        raise ConfigError(key, "the URL has no host")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ConfigError(key, f"database {path!r} is not a number") from None
    if db < 0:
        raise ConfigError(key, "database must be >= 0")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username and password is None:
        password, username = username, None  # redis://secret@host means a password, as redis-py reads it
    return Upstream(parts.hostname, port, db, username, password, tls=parts.scheme == "rediss")


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("yes", "true", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("no", "false", "0", "off"):
        return False
    raise ConfigError(key, f"expected true/false (or yes/no), got {value!r}")


def _positive(kind: type) -> Any:
    def parse(key: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(key, f"expected a positive number, got {value!r}")
        try:
            n = kind(value)
        except ValueError:
            raise ConfigError(key, f"expected a positive number, got {value!r}") from None
        if n <= 0:
            raise ConfigError(key, f"must be > 0, got {value!r}")
        return n

    return parse


def _non_negative(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(key, f"expected a number of seconds >= 0, got {value!r}")
    try:
        n = float(value)
    except ValueError:
        raise ConfigError(key, f"expected a number of seconds >= 0, got {value!r}") from None
    if not n >= 0:
        raise ConfigError(key, f"must be >= 0, got {value!r}")
    return n


def _bounded_int(limit: int) -> Any:
    positive = _positive(int)

    def parse(key: str, value: Any) -> Any:
        n = positive(key, value)
        if n > limit:
            raise ConfigError(key, f"must be at most {limit}, got {value!r}")
        return n

    return parse


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's cpuset), which ``workers = "auto"`` means."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _workers(key: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, min(usable_cpus(), MAX_WORKERS))
    try:
        n: int = _bounded_int(MAX_WORKERS)(key, value)
    except ConfigError as exc:
        raise ConfigError(key, f'{exc.why} (a number of processes, or "auto")') from None
    return n


def _log_level(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ConfigError(key, f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.lower()


SCALARS: dict[str, Any] = {
    "listen": lambda key, value: None if value == "" else parse_address(key, value),
    "upstream": parse_upstream,
    "log_level": _log_level,
    "protected_mode": _bool,
    "drain_timeout": _positive(float),
    "connect_timeout": _positive(float),
    "upstream_wait": lambda key, value: _non_negative(key, value),
    "write_buffer_high_water": _bounded_int(MAX_WRITE_BUFFER_HIGH_WATER),
    "metrics_listen": parse_address,
    "backlog": _positive(int),
    "auth_timeout": _positive(float),
    "tls_listen": parse_address,
    "workers": _workers,
    "max_clients": _positive(int),
    "reattach": _bool,
    "reattach_reset_consumers": _bool,
    "idle_timeout": lambda key, value: _non_negative(key, value),
    "tcp_keepalive": lambda key, value: int(_non_negative(key, value)),
    "client_output_buffer_limit_normal": parse_output_limit,
    "client_output_buffer_limit_pubsub": parse_output_limit,
}
METRICS_KEYS = {
    "max_queues": _positive(int),
    "max_tasks": _positive(int),
    "key_prefix": lambda key, value: value if isinstance(value, str) else _fail(key, "expected a string"),
    "depth_poll_interval": _positive(float),
    "auth_token_file": lambda key, value: value if isinstance(value, str) else _fail(key, "expected a path"),
    "auth_token_env": lambda key, value: value if isinstance(value, str) else _fail(key, "expected a variable name"),
}


def _fail(key: str, why: str) -> Any:
    raise ConfigError(key, why)
LIMIT_KEYS = tuple(f.name for f in fields(resp.Limits))


def _users(raw: Any) -> tuple[User, ...]:
    if not isinstance(raw, list):
        raise ConfigError("users", "expected an array of tables ([[users]])")
    out: list[User] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        key = f"users[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(key, "expected a table with name and passwords")
        unknown = set(entry) - {"name", "passwords", "password_sha256", "enabled", "password_file", "password_env"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key")
        name = entry.get("name")
        if not isinstance(name, str) or not name or " " in name:
            raise ConfigError(f"{key}.name", "expected a non-empty name without spaces")
        if name in seen:
            raise ConfigError(f"{key}.name", f"user {name!r} is defined twice")
        seen.add(name)
        hashes: list[bytes] = []
        for pw in _str_list(f"{key}.passwords", entry.get("passwords", [])) + _secrets(key, entry):
            hashes.append(hashlib.sha256(pw.encode()).digest())
        for hx in _str_list(f"{key}.password_sha256", entry.get("password_sha256", [])):
            try:
                digest = bytes.fromhex(hx)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ConfigError(f"{key}.password_sha256", "expected 64 hex digits (a SHA-256 digest)")
            hashes.append(digest)
        if not hashes:
            raise ConfigError(f"{key}.passwords", f"user {name!r} has no password")
        out.append(User(name, tuple(hashes), _bool(f"{key}.enabled", entry.get("enabled", True))))
    return tuple(out)


def _acl(raw: Any, config_path: str | None) -> Acl:
    if not isinstance(raw, dict):
        raise ConfigError("acl", "expected a table")
    for key in raw:
        if key not in ("file", "rules", "wording", "roles"):
            raise ConfigError(f"acl.{key}", "unknown key")
    file = raw.get("file")
    if file is not None:
        if not isinstance(file, str) or not file:
            raise ConfigError("acl.file", "expected a path")
        if config_path is not None and not os.path.isabs(file):
            file = os.path.join(os.path.dirname(os.path.abspath(config_path)), file)  # relative to the config
    wording = raw.get("wording", "7.2")
    if wording not in WORDING:
        raise ConfigError("acl.wording", f"expected one of {', '.join(WORDING)}, got {wording!r}")
    roles = raw.get("roles", [])
    if not isinstance(roles, list):
        raise ConfigError("acl.roles", "expected an array of tables ([[acl.roles]])")
    role_users = []
    allowed = {
        "name", "role", "passwords", "password_sha256", "key_prefix", "result_key_prefix", "db", "control",
        "password_file", "password_env",
    }  # fmt: skip
    for i, entry in enumerate(roles):
        key = f"acl.roles[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(key, "expected a table with name, role and passwords")
        for k in entry:
            if k not in allowed:
                raise ConfigError(f"{key}.{k}", "unknown key")
        name, role = entry.get("name"), entry.get("role")
        if not isinstance(name, str) or not name or " " in name:
            raise ConfigError(f"{key}.name", "expected a non-empty name without spaces")
        if not isinstance(role, str):
            raise ConfigError(f"{key}.role", "expected a role such as \"worker(default)\"")
        passwords = tuple(_str_list(f"{key}.passwords", entry.get("passwords", [])) + _secrets(key, entry))
        hashes = tuple(_str_list(f"{key}.password_sha256", entry.get("password_sha256", [])))
        db = entry.get("db", 0)
        if not isinstance(db, int) or db < 0:
            raise ConfigError(f"{key}.db", "expected a database number")
        result_prefix = entry.get("result_key_prefix")
        role_users.append(
            RoleUser(
                name, role, passwords, hashes, str(entry.get("key_prefix", "")),
                None if result_prefix is None else str(result_prefix), db,
                _bool(f"{key}.control", entry.get("control", False)),
            )
        )  # fmt: skip
    return Acl(file, tuple(_str_list("acl.rules", raw.get("rules", []))), wording, tuple(role_users))


def load_acl_users(cfg: Acl, users: tuple[User, ...] = ()) -> tuple[AclUser, ...]:
    """The users the ACL file and inline rules define (and [[users]] as ACL users). Raises ConfigError naming the
    key, and for a file its line, column and token."""
    sources: list[tuple[str, str, bytes]] = []
    if cfg.file is not None:
        try:
            with open(cfg.file, "rb") as fh:
                sources.append(("acl.file", cfg.file, fh.read()))
        except OSError as exc:
            raise ConfigError("acl.file", f"cannot read {cfg.file}: {exc.strerror}") from None
    if cfg.rules:
        sources.append(("acl.rules", "acl.rules", "\n".join(cfg.rules).encode()))
    out: dict[str, AclUser] = {}
    for key, filename, text in sources:
        try:
            parsed = parse_acl_file(text, filename)
        except AclError as exc:
            raise ConfigError(key, str(exc)) from None
        for name in _defined_names(text):  # parse_acl_file adds a default user the text may not define
            if name in out:
                raise ConfigError(key, f"user {name!r} is defined twice in [acl]")
            out[name] = parsed[name]
    for i, ru in enumerate(cfg.roles):
        key = f"acl.roles[{i}]"
        if ru.name in out:
            raise ConfigError(f"{key}.name", f"user {ru.name!r} is defined twice in [acl]")
        try:
            role = expand(
                ru.role, keyprefix=ru.key_prefix, result_keyprefix=ru.result_key_prefix, db=ru.db, control=ru.control
            )
            out[ru.name] = role_user(
                ru.name, role, passwords=ru.passwords, password_sha256=ru.password_sha256
            ).freeze()
        except (RoleError, AclError) as exc:
            raise ConfigError(f"{key}.role", str(exc)) from None
    for u in users:
        if u.name in out:
            raise ConfigError("users", f"user {u.name!r} is defined both in [[users]] and in [acl]")
        out[u.name] = u.acl_user().freeze()
    return tuple(out.values())


def _defined_names(text: bytes) -> list[str]:
    names = []
    for line in text.split(b"\n"):
        parts = line.split()
        if len(parts) >= 2 and parts[0] == b"user":
            names.append(parts[1].decode("utf-8", "surrogateescape"))
    return names


def _audit(raw: Any) -> Audit:
    if not isinstance(raw, dict):
        raise ConfigError("audit", "expected a table")
    for key in raw:
        if key not in ("file", "commands"):
            raise ConfigError(f"audit.{key}", "unknown key")
    file = raw.get("file", "")
    if not isinstance(file, str):
        raise ConfigError("audit.file", 'expected "stderr", a path, or "" for no audit trail')
    commands = tuple(_str_list("audit.commands", raw.get("commands", ["@admin", "@dangerous"])))
    from .audit import audited_commands  # a leaf module; imported here to keep config's imports light

    for item in commands:
        if not audited_commands([item]):
            raise ConfigError("audit.commands", f"unknown command or category {item!r}")
    return Audit(file, commands)


_MATERIAL_KEYS = {
    "cert_file", "key_file", "key_passphrase_file", "key_passphrase_env", "ca_file", "min_version", "ciphers",
    "ciphersuites",
}  # fmt: skip
_PATH_KEYS = {"cert_file", "key_file", "key_passphrase_file", "ca_file"}
_SERVER_TLS_KEYS = {
    "auth_clients", "prefer_server_ciphers", "identity", "identities", "unmapped", "handshake_timeout",
    "watch_interval",
}  # fmt: skip
_CLIENT_TLS_KEYS = {"server_hostname", "verify", "check_hostname", "watch_interval"}


def _tls_table(prefix: str, raw: Any, config_path: str | None, extra: set[str]) -> dict[str, Any]:
    """The common keys of [tls] and [upstream_tls], type-checked; paths relative to the config file."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix, "expected a table")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}"
        if key not in _MATERIAL_KEYS | extra:
            raise ConfigError(name, "unknown key")
        if key in _PATH_KEYS:
            if not isinstance(value, str) or not value:
                raise ConfigError(name, "expected a path")
            if config_path is not None and not os.path.isabs(value):
                value = os.path.join(os.path.dirname(os.path.abspath(config_path)), value)
        elif key in ("prefer_server_ciphers", "verify", "check_hostname"):
            value = _bool(name, value)
        elif key in ("handshake_timeout",):
            value = _positive(float)(name, value)
        elif key == "watch_interval":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(name, f"expected seconds >= 0 (0: reload on SIGHUP only), got {value!r}")
            value = float(value)
        elif key == "identities":
            if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
                raise ConfigError(name, 'expected a table of certificate value = "user"')
            value = dict(value)
        elif not isinstance(value, str):
            raise ConfigError(name, "expected a string")
        out[key] = value
    if "min_version" in out and out["min_version"] not in VERSIONS:
        raise ConfigError(f"{prefix}.min_version", f"expected one of {', '.join(VERSIONS)}, got {out['min_version']!r}")
    return out


def _server_tls(raw: Any, config_path: str | None) -> ServerTLS:
    values = _tls_table("tls", raw, config_path, _SERVER_TLS_KEYS)
    if values.get("auth_clients", "no") not in AUTH_CLIENTS:
        raise ConfigError("tls.auth_clients", f"expected no, optional or yes, got {values['auth_clients']!r}")
    if values.get("identity", "") not in IDENTITY_FIELDS:
        raise ConfigError("tls.identity", f"expected one of cn, san_dns, san_uri, email, got {values['identity']!r}")
    if values.get("unmapped", "refuse") not in UNMAPPED:
        raise ConfigError("tls.unmapped", f"expected refuse or password, got {values['unmapped']!r}")
    if values.get("identity") and values.get("auth_clients", "no") == "no":
        raise ConfigError("tls.identity", 'needs client certificates: set auth_clients = "yes" (or "optional")')
    return ServerTLS(**values)


def _secrets(key: str, entry: dict[str, Any], name: str = "password") -> list[str]:
    """Secrets a secret manager supplies: ``<name>_file`` (a file holding one, a trailing newline ignored) and
    ``<name>_env`` (the name of an environment variable)."""
    out: list[str] = []
    path = entry.get(f"{name}_file") or None
    if path is not None:
        if not isinstance(path, str):
            raise ConfigError(f"{key}.{name}_file", "expected a path")
        try:
            with open(path, encoding="utf-8") as fh:
                secret = fh.read().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{key}.{name}_file", f"cannot read {path}: {exc.strerror}") from None
        if not secret:
            raise ConfigError(f"{key}.{name}_file", f"{path} is empty")
        out.append(secret)
    var = entry.get(f"{name}_env") or None
    if var is not None:
        if not isinstance(var, str):
            raise ConfigError(f"{key}.{name}_env", "expected an environment variable name")
        secret = os.environ.get(var, "")
        if not secret:
            raise ConfigError(f"{key}.{name}_env", f"environment variable {var} is not set or empty")
        out.append(secret)
    return out


def _str_list(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, "expected an array of strings")
    return value


def load(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config from a TOML file, the environment and flag overrides (None values are ignored)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    known = set(SCALARS) | {"limits", "users", "metrics", "acl", "audit", "tls", "upstream_tls"}
    for key in raw:
        if key not in known:
            raise ConfigError(key, "unknown key")
    values: dict[str, Any] = {k: raw[k] for k in SCALARS if k in raw}
    for key in SCALARS:
        var = ENV_PREFIX + key.upper()
        if env and var in env:
            values[key] = env[var]
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    values.setdefault("listen", DEFAULT_LISTEN)
    values.setdefault("upstream", DEFAULT_UPSTREAM)
    parsed = {key: SCALARS[key](key, value) for key, value in values.items()}

    limits_raw = raw.get("limits", {})
    if not isinstance(limits_raw, dict):
        raise ConfigError("limits", "expected a table")
    for key in limits_raw:
        if key not in LIMIT_KEYS:
            raise ConfigError(f"limits.{key}", "unknown key")
    limits = resp.Limits(**{k: _positive(int)(f"limits.{k}", v) for k, v in limits_raw.items()})
    users = _users(raw.get("users", []))
    metrics_raw = raw.get("metrics", {})
    if not isinstance(metrics_raw, dict):
        raise ConfigError("metrics", "expected a table")
    for key in metrics_raw:
        if key not in METRICS_KEYS:
            raise ConfigError(f"metrics.{key}", "unknown key")
    metrics = Metrics(**{k: METRICS_KEYS[k](f"metrics.{k}", v) for k, v in metrics_raw.items()})
    tokens = _secrets("metrics", metrics_raw, "auth_token")
    if len(tokens) > 1:
        raise ConfigError("metrics.auth_token_env", "auth_token_file is set too: give one of the two")
    if tokens:
        metrics = dataclasses.replace(metrics, auth_token=tokens[0])

    acl_cfg = _acl(raw.get("acl", {}), path)
    audit = _audit(raw.get("audit", {}))
    acl_users = load_acl_users(acl_cfg, users)

    tls = _server_tls(raw.get("tls", {}), path)
    upstream_tls = ClientTLS(**_tls_table("upstream_tls", raw.get("upstream_tls", {}), path, _CLIENT_TLS_KEYS))
    cfg = Config(
        limits=limits, users=users, metrics=metrics, acl=acl_cfg, acl_users=acl_users, audit=audit, tls=tls,
        upstream_tls=upstream_tls, **parsed,
    )  # fmt: skip
    # Build the contexts once now, so that a bad certificate, key, passphrase or cipher fails at start-up with its
    # key named (the server builds its own again; nothing here stays open).
    if cfg.listen is None and cfg.tls_listen is None:
        raise ConfigError("listen", 'no listener: listen = "" needs tls_listen')
    if cfg.tls_listen is not None:
        server_context(cfg.tls)
    elif "tls" in raw:
        raise ConfigError("tls_listen", "[tls] is set but tls_listen is not: no listener would use it")
    if cfg.upstream.tls:
        client_context(cfg.upstream_tls)
    elif "upstream_tls" in raw:
        raise ConfigError("upstream_tls", "[upstream_tls] is set but the upstream URL is redis://, not rediss://")
    for user in tls.identities.values():
        if not any(u.name == user for u in acl_users):
            raise ConfigError("tls.identities", f"user {user!r} is not defined in [[users]] or [acl]")
    # A role user with no password can still log in with a client certificate that maps to it (as a Redis user
    # with no password and no nopass cannot AUTH); without a TLS listener that reads identities it could not log in.
    for i, ru in enumerate(acl_cfg.roles):
        if not ru.passwords and not ru.password_sha256 and not (cfg.tls_listen is not None and tls.identity):
            raise ConfigError(
                f"acl.roles[{i}].passwords",
                f"user {ru.name!r} has no password, and no client certificate can log in as it (set tls.identity)",
            )
    if cfg.workers > 1:
        for key, addr in (("listen", cfg.listen), ("tls_listen", cfg.tls_listen)):
            if addr is not None and addr.port == 0:
                raise ConfigError(key, "port 0 with workers > 1 would give each worker a port of its own: set a port")
    open_listeners = [a for a in (cfg.listen, cfg.tls_listen) if a is not None and not a.is_loopback]
    if cfg.protected_mode and not cfg.authenticator().required and open_listeners:
        raise ConfigError(
            "protected_mode",
            f"refusing to listen on non-loopback {open_listeners[0]} with no users configured: add [[users]], or set "
            "protected_mode = false to accept unauthenticated clients from the network",
        )
    return cfg
