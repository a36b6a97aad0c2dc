"""The ``sentinel://`` upstream URL: which Sentinels to ask, for which master, with which credentials.

Inert and sans-IO (config can import it); the asyncio part that asks the Sentinels is ``sentinel.py``.

The URL
-------
::

    sentinel://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/MASTER_NAME[/DB][?sentinel_username=U&sentinel_password=P]

* ``HOST[:PORT]`` list: the Sentinels, comma-separated, asked in this order. The port defaults to 26379. IPv6
  addresses go in brackets (``[::1]:26379``). At least one; none twice.
* ``MASTER_NAME``: the name the Sentinels monitor (``sentinel monitor <name> …``); no spaces (Sentinel's
  ``+switch-master`` message is space-separated). ``DB``: the database the proxy SELECTs on the master (default 0).
* The userinfo is what the proxy authenticates to **the Redis data nodes** with (the master, and the address it
  checks with ``ROLE``), exactly as in a ``redis://`` upstream: ``user:password@``, ``:password@``, or
  ``password@`` (a lone word is a password, as redis-py reads it). Kombu and redis-py put the master's password
  there too; the Sentinels' credentials are separate (kombu's ``sentinel_kwargs``).
* ``sentinel_password`` (and optionally ``sentinel_username``), in the query: what the proxy authenticates to **the
  Sentinels** with (their ``requirepass`` / ACL user). Unset: the Sentinels are asked without AUTH.
* Anything else in the query, a fragment, or ``username``/``password`` in the query is refused: one place per
  credential. Percent-encode ``@ : / , ? & # %`` in names and passwords.

Errors are ``ConfigError(key, why)`` naming the configuration key. ``str()`` of the result never shows a password.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .errors import ConfigError

#: The port Sentinels listen on unless told otherwise (Redis's own default for ``redis-sentinel``).
DEFAULT_SENTINEL_PORT = 26379

Address = tuple[str, int]


def format_address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def auth_command(username: str | None, password: str | None) -> list[list[bytes]]:
    if password is None:
        return []
    return [[b"AUTH", *([username.encode()] if username else []), password.encode()]]


@dataclass(frozen=True)
class SentinelUpstream:
    """A Sentinel-managed upstream: which Sentinels to ask, for which master, and the credentials for each side."""

    addresses: tuple[Address, ...]
    master_name: str
    db: int = 0
    #: Credentials for the Redis data nodes (the master).
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: Credentials for the Sentinels themselves.
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:  # never shows a password
        who = f"{quote(self.username, safe='')}@" if self.username else ""
        hosts = ",".join(format_address(a) for a in self.addresses)
        query = f"?sentinel_username={quote(self.sentinel_username, safe='')}" if self.sentinel_username else ""
        return f"sentinel://{who}{hosts}/{quote(self.master_name, safe='')}/{self.db}{query}"

    def handshake(self) -> list[list[bytes]]:
        """AUTH (and SELECT) for a connection to the master: what ``config.Upstream.handshake`` sends."""
        cmds = auth_command(self.username, self.password)
        if self.db:
            cmds.append([b"SELECT", str(self.db).encode()])
        return cmds


_QUERY_KEYS = ("sentinel_username", "sentinel_password")


def parse_sentinel_url(key: str, value: Any) -> SentinelUpstream:
    """Parse a ``sentinel://`` URL (see the module docstring). Raises ConfigError(key, why)."""
    if not isinstance(value, str):
        raise ConfigError(key, "expected a URL such as sentinel://host1:26379,host2:26379/mymaster/0")
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise ConfigError(key, f"not a valid URL: {exc}") from None
    if parts.scheme.lower() != "sentinel":
        raise ConfigError(key, f"unsupported scheme {parts.scheme!r}; expected sentinel://host:port,…/master/db")
    if parts.fragment:
        raise ConfigError(key, "a sentinel:// URL has no #fragment")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username, password = _userinfo(key, userinfo) if at else (None, None)
    addresses = _addresses(key, hostlist)
    master_name, db = _path(key, parts.path)
    sentinel_username, sentinel_password = _query(key, parts.query)
    return SentinelUpstream(addresses, master_name, db, username, password, sentinel_username, sentinel_password)


def _userinfo(key: str, userinfo: str) -> tuple[str | None, str | None]:
    user, colon, secret = userinfo.partition(":")
    username: str | None = unquote(user) if user else None
    password: str | None = unquote(secret) if colon else None
    if not colon and username:
        username, password = None, username  # sentinel://secret@… is a password, as redis-py reads redis://secret@
    if password is None or password == "":
        raise ConfigError(key, "the userinfo has an empty password; give user:password@ or :password@, or none")
    return username, password


def _addresses(key: str, hostlist: str) -> tuple[Address, ...]:
    if not hostlist:
        raise ConfigError(key, "no Sentinel addresses: expected sentinel://host1:26379,host2:26379/master")
    out: list[Address] = []
    for item in hostlist.split(","):
        if not item:
            raise ConfigError(key, f"empty Sentinel address in {hostlist!r}")
        if item.startswith("["):
            host, bracket, rest = item[1:].partition("]")
            if not bracket or not host:
                raise ConfigError(key, f"unbalanced brackets in Sentinel address {item!r}")
            if rest and not rest.startswith(":"):
                raise ConfigError(key, f"expected [IPv6]:PORT, got {item!r}")
            port_text = rest[1:] if rest else ""
        else:
            host, colon, port_text = item.partition(":")
            if ":" in port_text:
                raise ConfigError(key, f"IPv6 addresses go in brackets ([::1]:26379), got {item!r}")
            if colon and not port_text:
                raise ConfigError(key, f"Sentinel address {item!r} has an empty port")
            if not host:
                raise ConfigError(key, f"Sentinel address {item!r} has no host")
        if any(c in host for c in " /?#@"):
            raise ConfigError(key, f"invalid Sentinel host {host!r}")
        port = DEFAULT_SENTINEL_PORT
        if port_text:
            if not port_text.isdigit():
                raise ConfigError(key, f"port {port_text!r} of Sentinel {item!r} is not a number")
            port = int(port_text)
            if not 1 <= port <= 65535:
                raise ConfigError(key, f"port {port} of Sentinel {item!r} is out of range 1-65535")
        addr = (host, port)
        if addr in out:
            raise ConfigError(key, f"Sentinel {format_address(addr)} is listed twice")
        out.append(addr)
    return tuple(out)


def _path(key: str, path: str) -> tuple[str, int]:
    segments = path.strip("/").split("/") if path.strip("/") else []
    if not segments:
        raise ConfigError(key, "no master name: expected sentinel://host:26379/<master-name>[/<db>]")
    if len(segments) > 2:
        raise ConfigError(key, f"expected /<master-name>[/<db>], got {path!r}")
    name = unquote(segments[0])
    if not name or any(c.isspace() for c in name):
        raise ConfigError(key, f"invalid master name {name!r} (empty, or with spaces)")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ConfigError(key, f"database {segments[1]!r} is not a number")
        db = int(segments[1])
    return name, db


def _query(key: str, query: str) -> tuple[str | None, str | None]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(key, f"malformed query string {query!r}") from None
    values: dict[str, str] = {}
    for name, val in pairs:
        if name in ("password", "username"):
            raise ConfigError(
                key,
                f"{name}= in the query is ambiguous: the Redis {name} goes in the userinfo "
                f"(sentinel://user:password@…), the Sentinels' in sentinel_{name}=",
            )
        if name not in _QUERY_KEYS:
            raise ConfigError(key, f"unknown query parameter {name!r}; expected {' or '.join(_QUERY_KEYS)}")
        if name in values:
            raise ConfigError(key, f"query parameter {name!r} is given twice")
        if not val:
            raise ConfigError(key, f"query parameter {name!r} is empty")
        values[name] = val
    s_user, s_pass = values.get("sentinel_username"), values.get("sentinel_password")
    if s_user is not None and s_pass is None:
        raise ConfigError(key, "sentinel_username without sentinel_password")
    return s_user, s_pass
