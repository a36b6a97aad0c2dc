"""TLS material: the settings of ``[tls]`` and ``[upstream_tls]``, the ``SSLContext`` each builds, the identity a
client certificate maps to, handshake failures sorted into a bounded set of reasons, and certificate reloads.

No asyncio here: ``tls_listener`` does the accepting and handshaking; this module builds contexts from files,
validates them (a reload that fails keeps the old context) and says what happened.

The names follow Redis's own ``tls-*`` directives where one exists (``auth_clients`` is ``tls-auth-clients``,
``ciphersuites`` is ``tls-ciphersuites``, ``prefer_server_ciphers`` is ``tls-prefer-server-ciphers``).
"""

from __future__ import annotations

import ctypes
import datetime
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

AUTH_CLIENTS = {"no": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "yes": ssl.CERT_REQUIRED}
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
#: Client-certificate fields an identity can be read from ("" = certificates are not mapped to users).
IDENTITY_FIELDS = ("", "cn", "san_dns", "san_uri", "email")
#: What a verified certificate that maps to no enabled user gets: closed, or asked for a password as usual.
UNMAPPED = ("refuse", "password")
#: Seconds a TLS handshake may take before the connection is closed.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Seconds between checks of the certificate files for changes (0: reload on SIGHUP only).
DEFAULT_WATCH_INTERVAL = 5.0

#: Reasons of brokerproxy_tls_handshake_failures_total: a bounded set, so a flood of odd handshakes cannot grow the
#: metric. Each maps OpenSSL's reason strings (``SSLError.reason``) or verification codes to one word.
REASONS = ("no_certificate", "unknown_ca", "expired", "protocol_version", "not_tls", "timeout", "closed", "other")
_REASON_CODES = {
    "no_certificate": {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"},
    "unknown_ca": {"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED"},
    "expired": {"SSLV3_ALERT_CERTIFICATE_EXPIRED"},
    "protocol_version": {
        "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "WRONG_SSL_VERSION", "NO_PROTOCOLS_AVAILABLE",
        "VERSION_TOO_LOW", "NO_SHARED_CIPHER", "TLSV1_ALERT_INSUFFICIENT_SECURITY",
    },
    "not_tls": {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "RECORD_LAYER_FAILURE",
                "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL", "RECORD_LENGTH_MISMATCH"},
}  # fmt: skip
_BY_CODE = {code: reason for reason, codes in _REASON_CODES.items() for code in codes}
# X509 verification results (X509_V_ERR_*): expired, not yet valid; and the ones that mean "not our CA".
_VERIFY_EXPIRED = {9, 10}
_VERIFY_UNKNOWN_CA = {2, 18, 19, 20, 21}


def failure_reason(exc: BaseException) -> str:
    """Sort a handshake's exception into one of REASONS."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _VERIFY_EXPIRED:
            return "expired"
        if exc.verify_code in _VERIFY_UNKNOWN_CA:
            return "unknown_ca"
        return "other"
    if isinstance(exc, ssl.SSLError):
        return _BY_CODE.get(exc.reason or "", "closed" if isinstance(exc, ssl.SSLEOFError) else "other")
    if isinstance(exc, TimeoutError) or "handshake is taking longer" in str(exc):
        return "timeout"  # asyncio and uvloop end a slow handshake with ConnectionAbortedError and this message
    if isinstance(exc, (ConnectionError, EOFError)):
        return "closed"
    return "other"


# ------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Material:
    """What both sides share: our certificate and key, the CAs to verify the peer with, versions and ciphers."""

    cert_file: str | None = None
    key_file: str | None = None
    key_passphrase_file: str | None = None
    key_passphrase_env: str | None = None
    ca_file: str | None = None
    min_version: str = "1.2"
    ciphers: str = ""  # TLS 1.2 and below, OpenSSL's cipher-list syntax
    ciphersuites: str = ""  # TLS 1.3, colon-separated

    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.cert_file, self.key_file, self.ca_file, self.key_passphrase_file) if f)


@dataclass(frozen=True)
class ServerTLS(Material):
    """``[tls]``: the TLS listener."""

    auth_clients: str = "no"
    prefer_server_ciphers: bool = True
    identity: str = ""  # which certificate field names the user: cn | san_dns | san_uri | email
    #: Certificate field values that name a user other than themselves: {"spiffe://cluster/ns/airflow/worker": "worker"}
    identities: dict[str, str] = field(default_factory=dict)
    unmapped: str = "refuse"
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    watch_interval: float = DEFAULT_WATCH_INTERVAL


@dataclass(frozen=True)
class ClientTLS(Material):
    """``[upstream_tls]``: the proxy's connections to a ``rediss://`` upstream."""

    server_hostname: str = ""  # SNI and the name checked; "" = the upstream URL's host
    verify: bool = True  # verify Redis's certificate (against ca_file, or the system store)
    check_hostname: bool = True
    watch_interval: float = DEFAULT_WATCH_INTERVAL


# ------------------------------------------------------------------------------------------------- contexts


def _passphrase(prefix: str, m: Material) -> str | None:
    if m.key_passphrase_file:
        try:
            with open(m.key_passphrase_file, encoding="utf-8") as fh:
                return fh.read().rstrip("\r\n")
        except OSError as exc:
            why = f"cannot read {m.key_passphrase_file}: {exc.strerror}"
            raise ConfigError(f"{prefix}.key_passphrase_file", why) from None
    if m.key_passphrase_env:
        value = os.environ.get(m.key_passphrase_env)
        if not value:
            raise ConfigError(f"{prefix}.key_passphrase_env", f"environment variable {m.key_passphrase_env} is not set")
        return value
    return None


def _load_chain(prefix: str, ctx: ssl.SSLContext, m: Material) -> None:
    assert m.cert_file is not None
    for key in ("cert_file", "key_file"):
        path = getattr(m, key)
        if path and not os.path.isfile(path):
            raise ConfigError(f"{prefix}.{key}", f"cannot read {path}: no such file")
    password = _passphrase(prefix, m)
    try:
        # Never None: OpenSSL would then prompt for a passphrase on the terminal (and block) or read stdin.
        ctx.load_cert_chain(m.cert_file, m.key_file or None, password=_no_password if password is None else password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{prefix}.key_file", "the key does not match the certificate") from None
        if _encrypted(m.key_file or m.cert_file):  # OpenSSL says only "PEM lib" for a wrong passphrase
            if password is None:
                why = "the key is encrypted: set key_passphrase_file or key_passphrase_env"
                raise ConfigError(f"{prefix}.key_file", why) from None
            source = "key_passphrase_file" if m.key_passphrase_file else "key_passphrase_env"
            raise ConfigError(f"{prefix}.{source}", "wrong passphrase for the key") from None
        raise ConfigError(f"{prefix}.cert_file", f"cannot load the certificate and key: {exc}") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix}.cert_file", f"cannot load the certificate and key: {exc}") from None
    not_after = expiry(m.cert_file)
    if not_after is not None and not_after < datetime.datetime.now(datetime.UTC).timestamp():
        raise ConfigError(f"{prefix}.cert_file", f"the certificate in {m.cert_file} has expired")


def _no_password() -> bytes:
    return b""


def _encrypted(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return b"ENCRYPTED" in fh.read()
    except OSError:
        return False


def _common(prefix: str, ctx: ssl.SSLContext, m: Material) -> None:
    if m.min_version not in VERSIONS:
        raise ConfigError(f"{prefix}.min_version", f"expected one of {', '.join(VERSIONS)}, got {m.min_version!r}")
    ctx.minimum_version = VERSIONS[m.min_version]
    if m.ciphers:
        try:
            ctx.set_ciphers(m.ciphers)
        except ssl.SSLError:
            raise ConfigError(f"{prefix}.ciphers", f"no cipher matches {m.ciphers!r}") from None
    if m.ciphersuites:
        set_ciphersuites(prefix, ctx, m.ciphersuites)
    if m.ca_file:
        try:
            ctx.load_verify_locations(cafile=m.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{prefix}.ca_file", f"cannot load CA certificates from {m.ca_file}: {exc}") from None


def server_context(cfg: ServerTLS, prefix: str = "tls") -> ssl.SSLContext:
    """The listener's context. Raises ConfigError naming the key at fault."""
    if not cfg.cert_file:
        raise ConfigError(f"{prefix}.cert_file", "required for a TLS listener")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(prefix, ctx, cfg)
    _load_chain(prefix, ctx, cfg)
    if cfg.auth_clients not in AUTH_CLIENTS:
        raise ConfigError(f"{prefix}.auth_clients", f"expected no, optional or yes, got {cfg.auth_clients!r}")
    ctx.verify_mode = AUTH_CLIENTS[cfg.auth_clients]
    if ctx.verify_mode != ssl.CERT_NONE and not cfg.ca_file:
        raise ConfigError(f"{prefix}.ca_file", f"auth_clients = {cfg.auth_clients!r} needs the CA that signs clients")
    if cfg.prefer_server_ciphers:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def client_context(cfg: ClientTLS, prefix: str = "upstream_tls") -> ssl.SSLContext:
    """The context for connections to a ``rediss://`` upstream."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _common(prefix, ctx, cfg)
    if not cfg.ca_file and cfg.verify:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = cfg.verify and cfg.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED if cfg.verify else ssl.CERT_NONE
    if cfg.cert_file:
        _load_chain(prefix, ctx, cfg)
    elif cfg.key_file:
        raise ConfigError(f"{prefix}.cert_file", "key_file is set but cert_file is not")
    return ctx


# Python's ssl module sets TLS 1.2 ciphers only (set_ciphers); TLS 1.3 suites need OpenSSL's
# SSL_CTX_set_ciphersuites, reached through the context's SSL_CTX pointer (the first field after the object header
# in CPython's PySSLContext). The result is checked with get_ciphers(), so a layout change fails loudly at start-up.
def set_ciphersuites(prefix: str, ctx: ssl.SSLContext, suites: str) -> None:
    key = f"{prefix}.ciphersuites"
    try:
        lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
        setter = lib.SSL_CTX_set_ciphersuites
    except (OSError, AttributeError):
        raise ConfigError(key, "this Python's OpenSSL does not allow setting TLS 1.3 ciphersuites") from None
    setter.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    setter.restype = ctypes.c_int
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or setter(pointer, suites.encode()) != 1:
        raise ConfigError(key, f"no TLS 1.3 ciphersuite matches {suites!r}")
    wanted = set(suites.split(":"))
    have = {c["name"] for c in ctx.get_ciphers() if c.get("protocol") == "TLSv1.3"}
    if have and have != wanted:  # OpenSSL 3 skips unknown names: a misspelt one must not pass silently
        raise ConfigError(key, f"unknown TLS 1.3 ciphersuite(s): {', '.join(sorted(wanted - have))}")
    if not have:
        raise ConfigError(key, f"could not apply {suites!r} (this Python's ssl module is not the expected layout)")


# ------------------------------------------------------------------------------------------------- identities


def certificate_identity(peercert: dict[str, Any] | None, fieldname: str) -> str | None:
    """The value of ``fieldname`` in a verified peer certificate (``SSLObject.getpeercert()``), or None."""
    if not peercert or not fieldname:
        return None
    if fieldname == "cn":
        for rdn in peercert.get("subject", ()):
            for name, value in rdn:
                if name == "commonName":
                    return str(value)
        return None
    kind = {"san_dns": "DNS", "san_uri": "URI", "email": "email"}[fieldname]
    for san_kind, value in peercert.get("subjectAltName", ()):
        if san_kind == kind:
            return str(value)
    if fieldname == "email":
        for rdn in peercert.get("subject", ()):
            for name, value in rdn:
                if name == "emailAddress":
                    return str(value)
    return None


def map_identity(
    cfg: ServerTLS, peercert: dict[str, Any] | None, known: Callable[[str], bool]
) -> tuple[str | None, str]:
    """(user, value): the user a client certificate authenticates as (None: not mapped), and the field's value."""
    value = certificate_identity(peercert, cfg.identity)
    if value is None:
        return None, ""
    user = cfg.identities.get(value, value)
    return (user if known(user) else None), value


# ------------------------------------------------------------------------------------------------- expiry, reload


def expiry(path: str) -> float | None:
    """The notAfter of the first certificate in a PEM file, as a Unix timestamp (None if it cannot be read)."""
    return min(expiries(path), default=None)


def expiries(path: str) -> list[float]:
    """The notAfter of every certificate in a PEM file (a CA bundle holds several)."""
    from cryptography import x509  # imported here: only needed with TLS on

    try:
        with open(path, "rb") as fh:
            data = fh.read()
        certs = x509.load_pem_x509_certificates(data)
    except (OSError, ValueError):
        return []
    return [c.not_valid_after_utc.timestamp() for c in certs]


@dataclass
class Reloadable:
    """One side's current context, rebuilt when its files change or on request; a failed rebuild keeps the old."""

    listener: str  # metric label: "tls" (the listener) or "upstream"
    build: Callable[[], ssl.SSLContext]
    material: Material
    context: ssl.SSLContext = field(init=False)
    _stamp: tuple[tuple[int, int, int], ...] = field(init=False, default=())
    reloads: int = 0
    reload_failures: int = 0

    def __post_init__(self) -> None:
        self._stamp = self._files_stamp()  # before building: a change while it builds is seen by the next check
        self.context = self.build()

    def _files_stamp(self, files: tuple[str, ...] | None = None) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in self.material.files() if files is None else files:
            try:
                st = os.stat(path)  # follows symlinks: Kubernetes swaps a ..data symlink on secret updates
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)

    def changed(self) -> bool:
        return self._files_stamp() != self._stamp

    def reload(self, material: Material | None = None, build: Callable[[], ssl.SSLContext] | None = None) -> None:
        """Build a new context (from new settings, when given). Raises ConfigError and keeps the old on failure."""
        files = (material or self.material).files()
        stamp = self._files_stamp(files)
        try:
            ctx = (build or self.build)()
        except ConfigError:
            if material is None:
                self._stamp = stamp  # do not retry the same broken files every interval; the next change retries
            self.reload_failures += 1
            raise
        self.context = ctx
        if material is not None and build is not None:
            self.material, self.build = material, build
        self._stamp = stamp
        self.reloads += 1

    def certificate_expiries(self) -> dict[str, float]:
        """role -> notAfter timestamp: our certificate ("server" or "client") and the earliest CA ("ca")."""
        out: dict[str, float] = {}
        m = self.material
        if m.cert_file and (t := expiry(m.cert_file)) is not None:
            out["server" if self.listener != "upstream" else "client"] = t
        if m.ca_file and (ts := expiries(m.ca_file)):
            out["ca"] = min(ts)
        return out
