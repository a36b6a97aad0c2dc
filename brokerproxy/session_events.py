"""What the session is given and what it hands back besides bytes: the Protocols of the checks it takes (the
password check, the per-command policy) and the events it emits for the asyncio layer to carry out
(``Session.take_events()``). Sans-IO, like the session. ``brokerproxy.session`` re-exports every name here; import
them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from . import resp


class Authenticator(Protocol):
    """Checks client credentials. Implemented by the config's user table (and by the ACL module later)."""

    @property
    def required(self) -> bool:
        """True when clients must authenticate (users are configured)."""
        ...

    def check(self, username: bytes, password: bytes) -> str | None:
        """The user's name if the password is right for an enabled user, else None. Constant time."""
        ...


class Policy(Protocol):
    """The per-command check that the ACL slots in here. Returns an error reply text, or None to allow."""

    def check(self, user: str | None, request: resp.Request) -> str | None: ...


# Events for the asyncio layer.
@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """The client may now reach Redis: open the pinned upstream connection (if not open yet)."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the client connection once what has been written is flushed."""

    reason: str


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """Redis refused the proxy's own handshake (its AUTH or SELECT)."""

    reason: str


@dataclass(frozen=True, slots=True)
class AuthFailed:
    username: str


@dataclass(frozen=True, slots=True)
class Denied:
    """The ACL refused a command (for the audit trail: never argument values beyond the refused key/channel)."""

    username: str | None
    command: str
    kind: str  # command, key, channel
    object: str


@dataclass(frozen=True, slots=True)
class Audited:
    """A command of the audit list was allowed and sent (its name only, never its arguments)."""

    username: str | None
    command: str


Event = OpenUpstream | Close | UpstreamFailed | AuthFailed | Denied | Audited
