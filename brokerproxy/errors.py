"""The exception tree. Redis error *replies* are data and are forwarded; these are for the proxy's own failures."""

from __future__ import annotations


class BrokerProxyError(Exception):
    """Base of every error the proxy raises."""


class ProtocolError(BrokerProxyError):
    """A peer broke RESP. The message is Redis's own wording (``invalid bulk length``…); the proxy answers
    ``-ERR Protocol error: <message>`` and closes that one connection."""


class ConfigError(BrokerProxyError):
    """A configuration value is invalid. ``key`` is its dotted path (``limits.max_bulk_length``)."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key
        self.why = why


class UpstreamError(BrokerProxyError):
    """Redis could not be reached, or refused the proxy's own handshake (AUTH, SELECT)."""
