"""tls.py with real material: certificates made per run (tests/tls_pki.py, trustme), real SSLContexts, and real TLS
handshakes run in memory (a client and a server ``SSLObject`` joined by ``MemoryBIO`` pairs: no sockets).

Covers the handshake failures sorted by ``failure_reason`` as the listener sees them, the identities read from
``getpeercert()`` of a completed handshake, the errors of ``server_context``/``client_context`` (each naming its key),
TLS 1.3 ciphersuites (applied, and negotiated), ``Reloadable``, and what a SIGHUP applies.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import ssl
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from brokerproxy import config as config_mod
from brokerproxy import resp
from brokerproxy.errors import ConfigError
from brokerproxy.server import Server
from brokerproxy.session import OpenUpstream, Session
from brokerproxy.tls import (
    REASONS,
    ClientTLS,
    Reloadable,
    ServerTLS,
    certificate_identity,
    client_context,
    expiry,
    failure_reason,
    map_identity,
    server_context,
    set_ciphersuites,
)
from tests.tls_pki import Pki

NOW = datetime.datetime.now(datetime.UTC)
PAST = NOW - datetime.timedelta(days=1)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second CA the listener does not trust."""
    return Pki(tmp_path_factory.mktemp("other-pki"))


def leaf(
    pki: Pki,
    name: str,
    *,
    cn: str | None = None,
    sans: tuple[x509.GeneralName, ...] = (),
    subject_email: str | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """A client certificate signed by ``pki``'s CA with exactly these subject fields and SANs."""
    ca_key = serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    if subject_email:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, subject_email))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or NOW + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    cert_path, key_path = pki.dir / f"{name}.crt", pki.dir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def server_cfg(pki: Pki, **kw: Any) -> ServerTLS:
    base: dict[str, Any] = {
        "cert_file": str(pki.server_cert),
        "key_file": str(pki.server_key),
        "ca_file": str(pki.ca_file),
    }
    return ServerTLS(**(base | kw))


def client_ctx(
    pki: Pki, cert: tuple[Path, Path] | None = None, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """What a redis-py client with ssl_ca_certs (and ssl_certfile/ssl_keyfile) builds."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


# ------------------------------------------------------------------------------------------------- in-memory TLS


@dataclass
class Link:
    """One TLS connection run in memory: the client's and the server's SSLObject and how each handshake ended."""

    client: ssl.SSLObject
    server: ssl.SSLObject
    to_client: ssl.MemoryBIO
    to_server: ssl.MemoryBIO
    from_client: ssl.MemoryBIO
    from_server: ssl.MemoryBIO
    client_error: BaseException | None = None
    server_error: BaseException | None = None

    def _move(self) -> bool:
        moved = False
        if data := self.from_client.read():
            self.to_server.write(data)
            moved = True
        if data := self.from_server.read():
            self.to_client.write(data)
            moved = True
        return moved

    def request(self, payload: bytes = b"*1\r\n$4\r\nPING\r\n") -> bytes:
        """The client writes a request and the server reads it (raises what the server's read raises)."""
        self.client.write(payload)
        self._move()
        return self.server.read(65536)


def _step(obj: ssl.SSLObject) -> tuple[bool, BaseException | None]:
    try:
        obj.do_handshake()
        return True, None
    except ssl.SSLWantReadError:
        return False, None
    except (ssl.SSLError, OSError) as exc:
        return False, exc


def connect(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "localhost") -> Link:
    """Run a handshake to its end on both sides (each side's exception kept, as the listener would see it)."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    link = Link(
        client=client.wrap_bio(bios[0], bios[2], server_hostname=hostname),
        server=server.wrap_bio(bios[1], bios[3], server_side=True),
        to_client=bios[0], to_server=bios[1], from_client=bios[2], from_server=bios[3],
    )  # fmt: skip
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, obj in (("client", link.client), ("server", link.server)):
            if done[side] or getattr(link, f"{side}_error") is not None:
                continue
            ok, exc = _step(obj)
            done[side] = ok
            setattr(link, f"{side}_error", exc)
            link._move()
        if all(done[s] or getattr(link, f"{s}_error") is not None for s in done):
            break
    return link


def server_failure(server: ssl.SSLContext, client: ssl.SSLContext) -> BaseException:
    """The exception the listener's side of the handshake ends with (with TLS 1.3 the client's handshake returns
    before the server has checked its certificate: the server finds out on its side of the same exchange)."""
    link = connect(server, client)
    if link.server_error is None:
        link.request()  # raises here if the server only finds out on reading
        pytest.fail("the handshake did not fail")
    return link.server_error


def fingerprint(obj: ssl.SSLObject) -> str:
    der = obj.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


# ------------------------------------------------------------------------------------------------- failure_reason

TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize("maximum", [TLS12, TLS13], ids=["tls1.2", "tls1.3"])
def test_no_client_certificate_with_auth_clients_yes(pki: Pki, maximum: ssl.TLSVersion) -> None:
    exc = server_failure(server_context(server_cfg(pki, auth_clients="yes")), client_ctx(pki, maximum=maximum))
    assert failure_reason(exc) == "no_certificate", exc


@pytest.mark.parametrize("maximum", [TLS12, TLS13], ids=["tls1.2", "tls1.3"])
def test_client_certificate_of_an_unknown_ca(pki: Pki, other_pki: Pki, maximum: ssl.TLSVersion) -> None:
    ctx = client_ctx(pki, other_pki.client("stranger"), maximum=maximum)
    exc = server_failure(server_context(server_cfg(pki, auth_clients="yes")), ctx)
    assert isinstance(exc, ssl.SSLCertVerificationError)
    assert failure_reason(exc) == "unknown_ca", exc


def test_self_signed_client_certificate_is_unknown_ca(pki: Pki) -> None:
    own = trustme.CA()  # a CA certificate used as the client's own: self-signed, depth 0
    cert, key = pki.dir / "self.crt", pki.dir / "self.key"
    cert.write_bytes(own.cert_pem.bytes())
    key.write_bytes(own.private_key_pem.bytes())
    exc = server_failure(server_context(server_cfg(pki, auth_clients="yes")), client_ctx(pki, (cert, key)))
    assert failure_reason(exc) == "unknown_ca", exc


@pytest.mark.parametrize("maximum", [TLS12, TLS13], ids=["tls1.2", "tls1.3"])
def test_expired_client_certificate(pki: Pki, maximum: ssl.TLSVersion) -> None:
    old = pki.issue("expired-client", "old.test", common_name="old", not_after=PAST)
    exc = server_failure(server_context(server_cfg(pki, auth_clients="yes")), client_ctx(pki, old, maximum=maximum))
    assert failure_reason(exc) == "expired", exc


def test_client_certificate_not_yet_valid_counts_as_expired(pki: Pki) -> None:
    future = NOW + datetime.timedelta(days=2)
    cert = leaf(pki, "future", cn="future", not_before=future, not_after=future + datetime.timedelta(days=1))
    exc = server_failure(server_context(server_cfg(pki, auth_clients="yes")), client_ctx(pki, cert))
    assert failure_reason(exc) == "expired", exc


def test_protocol_version_below_min_version(pki: Pki) -> None:
    exc = server_failure(server_context(server_cfg(pki, min_version="1.3")), client_ctx(pki, maximum=TLS12))
    assert failure_reason(exc) == "protocol_version", exc


def test_no_shared_tls12_cipher_is_a_protocol_failure(pki: Pki) -> None:
    srv = server_context(server_cfg(pki, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384"))
    cli = client_ctx(pki, maximum=TLS12)
    cli.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    assert failure_reason(server_failure(srv, cli)) == "protocol_version"


@pytest.mark.parametrize(
    "payload",
    [b"*1\r\n$4\r\nPING\r\n", b"PING\r\n", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x09\x09\x00\x05hello"],
    ids=["resp", "inline", "http", "bad-record-version"],
)
def test_plaintext_bytes_fed_to_the_server(pki: Pki, payload: bytes) -> None:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context(server_cfg(pki)).wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(payload)
    with pytest.raises(ssl.SSLError) as info:
        server.do_handshake()
    assert failure_reason(info.value) == "not_tls", info.value


def test_peer_gone_mid_handshake_is_closed(pki: Pki) -> None:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context(server_cfg(pki)).wrap_bio(incoming, outgoing, server_side=True)
    hello = ssl.MemoryBIO()
    client = client_ctx(pki).wrap_bio(ssl.MemoryBIO(), hello, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    incoming.write(hello.read()[:40])  # half a ClientHello, then the client is gone
    incoming.write_eof()
    with pytest.raises(ssl.SSLEOFError) as info:
        server.do_handshake()
    assert failure_reason(info.value) == "closed"


def test_non_tls_exceptions() -> None:
    # What asyncio and uvloop raise around the handshake (not OpenSSL errors).
    assert failure_reason(TimeoutError()) == "timeout"
    aborted = ConnectionAbortedError("SSL handshake is taking longer than 10.0 seconds: aborting the connection")
    assert failure_reason(aborted) == "timeout"
    assert failure_reason(ConnectionResetError(104, "Connection reset by peer")) == "closed"
    assert failure_reason(BrokenPipeError()) == "closed"
    assert failure_reason(ValueError("odd")) == "other"


def test_client_side_alerts_sort_the_same_way(pki: Pki, other_pki: Pki) -> None:
    """The side that receives the alert (a TLS 1.2 client here) gets the alert's name; it sorts alike."""
    cases = {
        "unknown_ca": client_ctx(pki, other_pki.client("x"), maximum=TLS12),
        "expired": client_ctx(pki, pki.issue("expired-12", "e.test", common_name="e", not_after=PAST), maximum=TLS12),
    }
    srv = server_context(server_cfg(pki, auth_clients="yes"))
    for reason, ctx in cases.items():
        link = connect(srv, ctx)
        assert link.client_error is not None
        assert failure_reason(link.client_error) == reason, link.client_error
    # A client that does not trust the server's CA: a verification error on the client's side.
    link = connect(server_context(server_cfg(other_pki)), client_ctx(pki))
    assert failure_reason(link.client_error or Exception()) == "unknown_ca"


def test_every_reason_is_bounded() -> None:
    assert len(set(REASONS)) == len(REASONS)
    for exc in (OSError(), RuntimeError(), KeyError("a"), ConnectionRefusedError()):
        assert failure_reason(exc) in REASONS


# ------------------------------------------------------------------------------------------------- identities

SPIFFE = "spiffe://cluster.local/ns/airflow/sa/worker"


@pytest.fixture(scope="module")
def worker_peercert(pki: Pki) -> dict[str, Any]:
    """getpeercert() of a verified client certificate carrying every kind of identity."""
    cert = leaf(
        pki, "worker-all", cn="worker",
        sans=(
            x509.DNSName("worker.dns.test"), x509.DNSName("alt.dns.test"),
            x509.UniformResourceIdentifier(SPIFFE), x509.RFC822Name("worker@example.org"),
        ),
    )  # fmt: skip
    link = connect(server_context(server_cfg(pki, auth_clients="yes")), client_ctx(pki, cert))
    assert link.server_error is None and link.client_error is None
    assert link.request() == b"*1\r\n$4\r\nPING\r\n"
    peercert = link.server.getpeercert()
    assert peercert
    return peercert


@pytest.mark.parametrize(
    ("fieldname", "value"),
    [("cn", "worker"), ("san_dns", "worker.dns.test"), ("san_uri", SPIFFE), ("email", "worker@example.org")],
)
def test_certificate_identity_fields(worker_peercert: dict[str, Any], fieldname: str, value: str) -> None:
    assert certificate_identity(worker_peercert, fieldname) == value


def test_email_from_the_subject_when_no_san(pki: Pki) -> None:
    cert = leaf(pki, "subject-email", cn="mailer", subject_email="ops@example.org")
    link = connect(server_context(server_cfg(pki, auth_clients="yes")), client_ctx(pki, cert))
    peercert = link.server.getpeercert()
    assert certificate_identity(peercert, "email") == "ops@example.org"
    assert certificate_identity(peercert, "san_dns") is None
    assert certificate_identity(peercert, "san_uri") is None


def test_certificate_without_the_field_or_without_a_certificate(pki: Pki) -> None:
    cert = leaf(pki, "no-cn", sans=(x509.DNSName("only.dns.test"),))
    link = connect(server_context(server_cfg(pki, auth_clients="yes")), client_ctx(pki, cert))
    peercert = link.server.getpeercert()
    assert certificate_identity(peercert, "cn") is None
    assert certificate_identity(peercert, "san_dns") == "only.dns.test"
    # auth_clients = "optional" and no certificate: the handshake succeeds and there is nothing to read.
    link = connect(server_context(server_cfg(pki, auth_clients="optional")), client_ctx(pki))
    assert link.server_error is None and link.server.getpeercert() is None
    assert certificate_identity(link.server.getpeercert(), "cn") is None
    assert certificate_identity({"subject": ((("commonName", "x"),),)}, "") is None  # identity = "": not mapped


def test_map_identity_direct_table_and_unknown(worker_peercert: dict[str, Any]) -> None:
    users = {"worker", "celery-worker", "ops"}
    known = users.__contains__
    cn = ServerTLS(identity="cn")
    assert map_identity(cn, worker_peercert, known) == ("worker", "worker")
    by_uri = ServerTLS(identity="san_uri", identities={SPIFFE: "celery-worker"})
    assert map_identity(by_uri, worker_peercert, known) == ("celery-worker", SPIFFE)
    # The table names a user that is not (or no longer) known: not mapped, and the value is reported for the log.
    gone = ServerTLS(identity="san_uri", identities={SPIFFE: "retired"})
    assert map_identity(gone, worker_peercert, known) == (None, SPIFFE)
    # A value with no entry and no user of that name.
    assert map_identity(ServerTLS(identity="san_dns"), worker_peercert, known) == (None, "worker.dns.test")
    assert map_identity(ServerTLS(identity="email"), worker_peercert, known) == (None, "worker@example.org")
    assert map_identity(ServerTLS(identity="cn"), None, known) == (None, "")
    assert map_identity(ServerTLS(identity=""), worker_peercert, known) == (None, "")


# ------------------------------------------------------------------------------------------------- context errors


def key_of(exc_info: pytest.ExceptionInfo[ConfigError]) -> str:
    return exc_info.value.key


def test_server_context_needs_a_certificate(pki: Pki) -> None:
    with pytest.raises(ConfigError) as e:
        server_context(ServerTLS())
    assert key_of(e) == "tls.cert_file"


@pytest.mark.parametrize("key", ["cert_file", "key_file", "ca_file"])
def test_missing_files_name_their_key(pki: Pki, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        server_context(server_cfg(pki, **{key: str(pki.dir / "absent.pem")}))
    assert key_of(e) == f"tls.{key}"
    assert "absent.pem" in e.value.why


def test_key_that_does_not_match(pki: Pki) -> None:
    _, other_key = pki.issue("unrelated", "x.test")
    with pytest.raises(ConfigError) as e:
        server_context(server_cfg(pki, key_file=str(other_key)))
    assert key_of(e) == "tls.key_file" and "does not match" in e.value.why
    with pytest.raises(ConfigError) as e:
        client_context(ClientTLS(cert_file=str(pki.server_cert), key_file=str(other_key)))
    assert key_of(e) == "upstream_tls.key_file"


@pytest.fixture(scope="module")
def encrypted(pki: Pki) -> tuple[Path, Path]:
    return pki.issue("encrypted", "localhost", passphrase=b"s3cret")


def test_encrypted_key_without_passphrase(pki: Pki, encrypted: tuple[Path, Path]) -> None:
    # In a process without a controlling terminal and with stdin at EOF, as in a container.
    code = f"""
        from brokerproxy.tls import ServerTLS, server_context
        from brokerproxy.errors import ConfigError
        try:
            server_context(ServerTLS(cert_file={str(encrypted[0])!r}, key_file={str(encrypted[1])!r}))
        except ConfigError as exc:
            print(exc.key, "|", exc.why)
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=30,
        start_new_session=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert "pass phrase" not in out.stderr
    assert out.stdout.startswith("tls.key_file | the key is encrypted"), (out.stdout, out.stderr)


def test_encrypted_key_without_passphrase_never_prompts(encrypted: tuple[Path, Path]) -> None:
    # The proxy started by hand in a terminal: the child gets a controlling terminal (pty.fork), the parent watches.
    code = f"""
        import os, pty, select, sys, time
        pid, fd = pty.fork()
        if pid == 0:
            from brokerproxy.tls import ServerTLS, server_context
            from brokerproxy.errors import ConfigError
            try:
                server_context(ServerTLS(cert_file={str(encrypted[0])!r}, key_file={str(encrypted[1])!r}))
                print("LOADED", flush=True)
            except ConfigError as exc:
                print("CONFIGERROR", exc.key, flush=True)
            os._exit(0)
        out, deadline = b"", time.monotonic() + 10
        while time.monotonic() < deadline and b"\\n" not in out and b"pass phrase" not in out:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    chunk = os.read(fd, 1024)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
        if b"pass phrase" in out:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
        sys.stdout.write(out.decode(errors="replace"))
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert "pass phrase" not in out.stdout
    assert "CONFIGERROR tls.key_file" in out.stdout, (out.stdout, out.stderr)


def test_passphrase_from_file_and_env(
    pki: Pki, encrypted: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = map(str, encrypted)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("s3cret\n")  # a trailing newline, as editors and `echo` leave it
    bad.write_text("wrong\n")
    server_context(ServerTLS(cert_file=cert, key_file=key, key_passphrase_file=str(good)))
    with pytest.raises(ConfigError) as e:
        server_context(ServerTLS(cert_file=cert, key_file=key, key_passphrase_file=str(bad)))
    assert key_of(e) == "tls.key_passphrase_file" and "wrong passphrase" in e.value.why
    with pytest.raises(ConfigError) as e:
        server_context(ServerTLS(cert_file=cert, key_file=key, key_passphrase_file=str(tmp_path / "absent")))
    assert key_of(e) == "tls.key_passphrase_file"

    monkeypatch.setenv("BP_UNIT_KEY_PASS", "s3cret")
    server_context(ServerTLS(cert_file=cert, key_file=key, key_passphrase_env="BP_UNIT_KEY_PASS"))
    client_context(ClientTLS(cert_file=cert, key_file=key, key_passphrase_env="BP_UNIT_KEY_PASS"))
    monkeypatch.setenv("BP_UNIT_KEY_PASS", "wrong")
    with pytest.raises(ConfigError) as e:
        server_context(ServerTLS(cert_file=cert, key_file=key, key_passphrase_env="BP_UNIT_KEY_PASS"))
    assert key_of(e) == "tls.key_passphrase_env" and "wrong passphrase" in e.value.why
    with pytest.raises(ConfigError) as e:
        client_context(ClientTLS(cert_file=cert, key_file=key, key_passphrase_env="BP_UNIT_KEY_PASS"))
    assert key_of(e) == "upstream_tls.key_passphrase_env"
    monkeypatch.delenv("BP_UNIT_KEY_PASS")
    with pytest.raises(ConfigError) as e:
        server_context(ServerTLS(cert_file=cert, key_file=key, key_passphrase_env="BP_UNIT_KEY_PASS"))
    assert key_of(e) == "tls.key_passphrase_env" and "not set" in e.value.why


def test_expired_certificate_is_refused(pki: Pki) -> None:
    cert, key = pki.issue("expired-server", "localhost", not_after=PAST)
    with pytest.raises(ConfigError) as e:
        server_context(server_cfg(pki, cert_file=str(cert), key_file=str(key)))
    assert key_of(e) == "tls.cert_file" and "expired" in e.value.why
    with pytest.raises(ConfigError) as e:
        client_context(ClientTLS(cert_file=str(cert), key_file=str(key)))
    assert key_of(e) == "upstream_tls.cert_file" and "expired" in e.value.why


def test_bad_ciphers(pki: Pki) -> None:
    with pytest.raises(ConfigError) as e:
        server_context(server_cfg(pki, ciphers="NO-SUCH-CIPHER"))
    assert key_of(e) == "tls.ciphers"
    with pytest.raises(ConfigError) as e:
        client_context(ClientTLS(ciphers="NO-SUCH-CIPHER"))
    assert key_of(e) == "upstream_tls.ciphers"


def tls13_suites(ctx: ssl.SSLContext) -> list[str]:
    return [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]


def suite(obj: ssl.SSLObject) -> str:
    cipher = obj.cipher()
    assert cipher is not None
    return cipher[0]


def test_ciphersuites_are_applied_and_negotiated(pki: Pki) -> None:
    # The client (Python's defaults) prefers AES-256-GCM: the server's single suite must win.
    srv = server_context(server_cfg(pki, ciphersuites="TLS_CHACHA20_POLY1305_SHA256"))
    assert tls13_suites(srv) == ["TLS_CHACHA20_POLY1305_SHA256"]
    assert tls13_suites(client_ctx(pki))[0] == "TLS_AES_256_GCM_SHA384"
    link = connect(srv, client_ctx(pki))
    assert link.server_error is None
    assert link.server.version() == "TLSv1.3"
    assert suite(link.server) == suite(link.client) == "TLS_CHACHA20_POLY1305_SHA256"

    # Two suites, and the upstream side too: the proxy's client offers only what it was given.
    both = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"
    up = client_context(ClientTLS(ca_file=str(pki.ca_file), ciphersuites=both))
    assert sorted(tls13_suites(up)) == sorted(both.split(":"))
    link = connect(server_context(server_cfg(pki)), up)
    assert link.client_error is None and suite(link.client) in both.split(":")

    # No suite in common: the handshake fails (and is sorted as a protocol failure).
    srv_only = server_context(server_cfg(pki, ciphersuites="TLS_AES_128_GCM_SHA256"))
    cli_only = client_context(ClientTLS(ca_file=str(pki.ca_file), ciphersuites="TLS_AES_256_GCM_SHA384"))
    assert failure_reason(server_failure(srv_only, cli_only)) == "protocol_version"


@pytest.mark.parametrize("suites", ["TLS_NO_SUCH_SUITE", "ECDHE-RSA-AES128-GCM-SHA256", "tls_aes_128_gcm_sha256"])
def test_invalid_ciphersuites_are_refused(pki: Pki, suites: str) -> None:
    with pytest.raises(ConfigError) as e:
        server_context(server_cfg(pki, ciphersuites=suites))
    assert key_of(e) == "tls.ciphersuites"
    with pytest.raises(ConfigError) as e:
        client_context(ClientTLS(ciphersuites=suites))
    assert key_of(e) == "upstream_tls.ciphersuites"


def test_a_misspelt_suite_beside_a_valid_one_is_refused(pki: Pki) -> None:
    with pytest.raises(ConfigError) as e:
        server_context(server_cfg(pki, ciphersuites="TLS_AES_256_GCM_SHA384:TLS_AES_256_GCM_SHA38"))
    assert key_of(e) == "tls.ciphersuites"


def test_set_ciphersuites_leaves_no_error_behind(pki: Pki) -> None:
    # A refused call leaves OpenSSL's error queue as it was for the next ssl operation (reported reasons stay right).
    with pytest.raises(ConfigError):
        set_ciphersuites("tls", ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "TLS_NO_SUCH_SUITE")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context(server_cfg(pki)).wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(b"*1\r\n$4\r\nPING\r\n")
    with pytest.raises(ssl.SSLError) as info:
        server.do_handshake()
    assert info.value.reason == "WRONG_VERSION_NUMBER"


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython's PySSLContext layout")
def test_set_ciphersuites_pointer_is_the_contexts_ssl_ctx() -> None:
    """set_ciphersuites writes through the pointer it reads after the object header; check it is this context's
    SSL_CTX (its options, as OpenSSL reports them, follow ctx.options) on this Python."""
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
    get_options = lib.SSL_CTX_get_options
    get_options.argtypes, get_options.restype = [ctypes.c_void_p], ctypes.c_uint64
    for ctx in (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)):
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        assert get_options(pointer) == int(ctx.options)
        ctx.options |= ssl.OP_NO_TICKET
        assert get_options(pointer) == int(ctx.options)


def test_min_version(pki: Pki) -> None:
    with pytest.raises(ConfigError) as e:
        server_context(server_cfg(pki, min_version="1.1"))
    assert key_of(e) == "tls.min_version"
    with pytest.raises(ConfigError) as e:
        client_context(ClientTLS(min_version="1.0"))
    assert key_of(e) == "upstream_tls.min_version"
    assert server_context(server_cfg(pki)).minimum_version == ssl.TLSVersion.TLSv1_2  # the default
    strict = server_context(server_cfg(pki, min_version="1.3"))
    assert strict.minimum_version == ssl.TLSVersion.TLSv1_3
    assert connect(strict, client_ctx(pki)).server.version() == "TLSv1.3"
    up = client_context(ClientTLS(ca_file=str(pki.ca_file), min_version="1.3"))
    link = connect(server_context(server_cfg(pki, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")), up)
    assert link.server.version() == "TLSv1.3"


def test_auth_clients(pki: Pki) -> None:
    for value, mode in (("no", ssl.CERT_NONE), ("optional", ssl.CERT_OPTIONAL), ("yes", ssl.CERT_REQUIRED)):
        assert server_context(server_cfg(pki, auth_clients=value)).verify_mode == mode
    for value in ("optional", "yes"):
        with pytest.raises(ConfigError) as e:
            server_context(server_cfg(pki, auth_clients=value, ca_file=None))
        assert key_of(e) == "tls.ca_file"
    server_context(server_cfg(pki, auth_clients="no", ca_file=None))  # no client certificates: no CA needed
    with pytest.raises(ConfigError) as e:
        server_context(server_cfg(pki, auth_clients="required"))
    assert key_of(e) == "tls.auth_clients"


def test_prefer_server_ciphers(pki: Pki) -> None:
    assert server_context(server_cfg(pki)).options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert not server_context(server_cfg(pki, prefer_server_ciphers=False)).options & ssl.OP_CIPHER_SERVER_PREFERENCE


def test_client_context(pki: Pki, other_pki: Pki) -> None:
    with pytest.raises(ConfigError) as e:
        client_context(ClientTLS(key_file=str(pki.server_key)))
    assert key_of(e) == "upstream_tls.cert_file"
    with pytest.raises(ConfigError) as e:
        client_context(ClientTLS(cert_file=str(pki.dir / "absent.crt")))
    assert key_of(e) == "upstream_tls.cert_file"
    with pytest.raises(ConfigError) as e:
        client_context(ClientTLS(ca_file=str(pki.dir / "absent-ca.crt")))
    assert key_of(e) == "upstream_tls.ca_file"
    # Verified, with hostname checking, and a client certificate a tls-auth-clients server accepts.
    cert = pki.client("proxy")
    up = client_context(ClientTLS(ca_file=str(pki.ca_file), cert_file=str(cert[0]), key_file=str(cert[1])))
    assert up.verify_mode == ssl.CERT_REQUIRED and up.check_hostname
    link = connect(server_context(server_cfg(pki, auth_clients="yes")), up)
    assert link.client_error is None and link.server_error is None
    assert certificate_identity(link.server.getpeercert(), "cn") == "proxy"
    wrong_name = connect(server_context(server_cfg(pki)), up, hostname="redis.elsewhere.test")
    assert isinstance(wrong_name.client_error, ssl.SSLCertVerificationError)
    untrusted = connect(server_context(server_cfg(other_pki)), up)
    assert failure_reason(untrusted.client_error or Exception()) == "unknown_ca"
    # verify = false: anything goes (and check_hostname cannot stay on without verification).
    loose = client_context(ClientTLS(verify=False))
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname
    assert connect(server_context(server_cfg(other_pki)), loose, hostname="whatever").client_error is None
    assert not client_context(ClientTLS(ca_file=str(pki.ca_file), check_hostname=False)).check_hostname


# ------------------------------------------------------------------------------------------------- Reloadable


@pytest.fixture
def rotating(tmp_path: Path, pki: Pki) -> tuple[Pki, ServerTLS]:
    """A server certificate and key at paths of their own, which the test rewrites."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    return pki, server_cfg(pki, cert_file=str(cert), key_file=str(key))


def rewrite(cfg: ServerTLS, pair: tuple[Path, Path]) -> None:
    assert cfg.cert_file and cfg.key_file
    Path(cfg.cert_file).write_bytes(pair[0].read_bytes())
    Path(cfg.key_file).write_bytes(pair[1].read_bytes())


def test_reloadable_changed_and_reload(rotating: tuple[Pki, ServerTLS]) -> None:
    pki, cfg = rotating
    r = Reloadable("tls", lambda: server_context(cfg), cfg)
    assert not r.changed()
    first = r.context
    old_link = connect(first, client_ctx(pki))  # an established connection on the old context
    rewrite(cfg, pki.issue("rotated", "localhost", "127.0.0.1"))
    assert r.changed()
    r.reload()
    assert not r.changed() and r.reloads == 1 and r.reload_failures == 0
    assert r.context is not first
    new_link = connect(r.context, client_ctx(pki))
    assert fingerprint(new_link.client) != fingerprint(old_link.client)
    assert old_link.request(b"still here") == b"still here"  # untouched by the reload


def test_reload_failure_keeps_the_old_context(rotating: tuple[Pki, ServerTLS]) -> None:
    pki, cfg = rotating
    r = Reloadable("tls", lambda: server_context(cfg), cfg)
    before = r.context
    served = fingerprint(connect(before, client_ctx(pki)).client)
    assert cfg.key_file
    Path(cfg.key_file).write_bytes(pki.issue("stray", "x.test")[1].read_bytes())  # a key that does not match
    assert r.changed()
    with pytest.raises(ConfigError) as e:
        r.reload()
    assert e.value.key == "tls.key_file"
    assert r.context is before and r.reload_failures == 1 and r.reloads == 0
    assert fingerprint(connect(r.context, client_ctx(pki)).client) == served
    assert not r.changed()  # the same broken files are not retried every interval...
    Path(cfg.key_file).unlink()  # ...but any further change is: a missing file
    assert r.changed()
    with pytest.raises(ConfigError) as e:
        r.reload()
    assert e.value.key == "tls.key_file" and r.reload_failures == 2
    rewrite(cfg, pki.issue("fixed", "localhost"))  # and the repaired pair loads
    assert r.changed()
    r.reload()
    assert r.reloads == 1 and fingerprint(connect(r.context, client_ctx(pki)).client) != served
    # An expired certificate is a failed reload too.
    rewrite(cfg, pki.issue("expired-rotation", "localhost", not_after=PAST))
    with pytest.raises(ConfigError, match="expired"):
        r.reload()
    assert r.reload_failures == 3


def test_reload_with_new_paths_is_not_seen_as_a_change(rotating: tuple[Pki, ServerTLS], tmp_path: Path) -> None:
    pki, cfg = rotating
    r = Reloadable("tls", lambda: server_context(cfg), cfg)
    cert, key = pki.issue("moved", "localhost")
    moved = replace(cfg, cert_file=str(cert), key_file=str(key))
    r.reload(moved, lambda: server_context(moved))
    assert r.material is moved
    assert not r.changed()


def test_a_rotation_during_the_first_build_is_not_missed(rotating: tuple[Pki, ServerTLS]) -> None:
    pki, cfg = rotating
    rotated = pki.issue("rotated-at-start", "localhost")

    def build() -> ssl.SSLContext:
        ctx = server_context(cfg)
        rewrite(cfg, rotated)  # the secret is updated just after the files were read
        return ctx

    r = Reloadable("tls", build, cfg)
    assert r.changed()


def test_certificate_expiries_roles(pki: Pki, other_pki: Pki, tmp_path: Path) -> None:
    server = Reloadable("tls", lambda: server_context(server_cfg(pki)), server_cfg(pki))
    assert server.certificate_expiries() == {"server": expiry(str(pki.server_cert)), "ca": expiry(str(pki.ca_file))}
    assert server.certificate_expiries()["server"] > NOW.timestamp()
    cert = pki.client("proxy")
    up_cfg = ClientTLS(ca_file=str(pki.ca_file), cert_file=str(cert[0]), key_file=str(cert[1]))
    upstream = Reloadable("upstream", lambda: client_context(up_cfg), up_cfg)
    assert set(upstream.certificate_expiries()) == {"client", "ca"}
    bare = ClientTLS(ca_file=str(pki.ca_file))
    assert set(Reloadable("upstream", lambda: client_context(bare), bare).certificate_expiries()) == {"ca"}
    # A bundle of two CAs: the earliest one.
    short = trustme.CA()
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca.cert_pem.bytes() + short.cert_pem.bytes() + other_pki.ca.cert_pem.bytes())
    notafters = [
        x509.load_pem_x509_certificate(c.cert_pem.bytes()).not_valid_after_utc.timestamp()
        for c in (pki.ca, short, other_pki.ca)
    ]
    b_cfg = ClientTLS(ca_file=str(bundle))
    assert Reloadable("upstream", lambda: client_context(b_cfg), b_cfg).certificate_expiries() == {"ca": min(notafters)}


# ------------------------------------------------------------------------------------------------- SIGHUP


def write_config(path: Path, pki: Pki, tls_extra: str, upstream_extra: str = "") -> Path:
    path.write_text(
        'tls_listen = "127.0.0.1:0"\n'
        'upstream = "rediss://localhost:6390/0"\n'
        '[acl]\nrules = ["user default off", "user worker on nopass ~* +@all", "user celery on nopass ~* +@all"]\n'
        + pki.server_toml(auth_clients='"yes"', identity='"san_uri"')
        + tls_extra
        + f'[upstream_tls]\nca_file = "{pki.ca_file}"\n'
        + upstream_extra
    )
    return path


def test_sighup_applies_the_new_tls_settings(pki: Pki, tmp_path: Path, worker_peercert: dict[str, Any]) -> None:
    path = tmp_path / "proxy.toml"
    old = config_mod.load(str(write_config(path, pki, f'[tls.identities]\n"{SPIFFE}" = "worker"\n')))
    server = Server(old)
    known = server.authenticator.get
    assert map_identity(server.config.tls, worker_peercert, lambda u: known(u) is not None)[0] == "worker"
    new = config_mod.load(
        str(write_config(path, pki, f'[tls.identities]\n"{SPIFFE}" = "celery"\n', 'server_hostname = "redis.test"\n'))
    )
    server._sighup(lambda: new)
    assert server.tls is not None and server.tls.reloads == 1  # the TLS material was reloaded...
    # ...and what the listener reads for each new connection is the new config's.
    assert map_identity(server.config.tls, worker_peercert, lambda u: known(u) is not None)[0] == "celery"
    assert server.upstream_tls_args()["server_hostname"] == "redis.test"


def test_sighup_with_new_certificate_paths(pki: Pki, tmp_path: Path) -> None:
    path = write_config(tmp_path / "proxy.toml", pki, "")
    server = Server(config_mod.load(str(path)))
    assert server.tls is not None
    before = fingerprint(connect(server.tls.context, client_ctx(pki)).client)
    cert, key = pki.issue("sighup-new", "localhost", "127.0.0.1")
    text = path.read_text().replace(str(pki.server_cert), str(cert)).replace(str(pki.server_key), str(key))
    path.write_text(text)
    server._sighup(lambda: config_mod.load(str(path)))
    assert server.tls.material.cert_file == str(cert)  # the watcher follows the new files from now on
    assert fingerprint(connect(server.tls.context, client_ctx(pki)).client) != before
    assert server.observer.tls_reloads == {("tls", "ok"): 1, ("upstream", "ok"): 1}
    assert server.observer.tls_expiry[("tls", "server")] == expiry(str(cert))


def test_sighup_with_a_broken_certificate_keeps_everything(pki: Pki, tmp_path: Path) -> None:
    path = write_config(tmp_path / "proxy.toml", pki, "")
    server = Server(config_mod.load(str(path)))
    assert server.tls is not None
    context = server.tls.context
    _, stray = pki.issue("sighup-stray", "x.test")
    text = path.read_text().replace(str(pki.server_key), str(stray)).replace('"user celery', '"user beat')
    path.write_text(text)
    server._sighup(lambda: config_mod.load(str(path)))
    # config.load builds the contexts, so the whole reload fails: the certificate, and the users with it.
    assert server.tls.context is context
    assert server.observer.tls_reloads == {("tls", "failed"): 1}
    assert server.observer.reload_failures == 1
    assert server.authenticator.get("celery") is not None and server.authenticator.get("beat") is None


# ------------------------------------------------------------------------------------------------- certificate logins


def command(*args: str) -> bytes:
    return resp.encode_command([a.encode() for a in args])


@pytest.fixture
def cert_session(tmp_path: Path) -> Session:
    """A session whose client certificate mapped to ``worker`` (as TLSClientConnection hands it over)."""
    path = tmp_path / "users.toml"
    path.write_text(
        '[acl]\nrules = ["user default off", "user worker on nopass ~* +@all", "user admin on >adminpw ~* +@all"]\n'
    )
    s = Session(config_mod.load(str(path)).authenticator(), identity="worker")
    assert s.user == "worker" and s.take_events() == [OpenUpstream()]  # no AUTH needed: upstream opens at once
    assert bytes(s.take_upstream()) == command("CLIENT", "ID") + command("CLIENT", "INFO")
    s.from_upstream(b":7\r\n$4\r\nid=7\r\n")
    assert bytes(s.take_client()) == b""
    return s


def test_certificate_user_then_auth_as_another(cert_session: Session) -> None:
    s = cert_session
    s.from_client(command("AUTH", "admin", "wrong"))
    assert bytes(s.take_client()).startswith(b"-WRONGPASS")
    assert s.user == "worker"  # a failed AUTH leaves the certificate's user in place, as Redis leaves the current one
    s.from_client(command("AUTH", "admin", "adminpw"))
    assert bytes(s.take_client()) == b"+OK\r\n" and s.user == "admin"
    assert bytes(s.take_upstream()) == b""  # the upstream connection is the same one; no password reaches Redis


def test_reset_returns_to_the_certificate_user(cert_session: Session) -> None:
    s = cert_session
    s.from_client(command("AUTH", "admin", "adminpw"))
    s.take_client()
    s.from_client(command("RESET"))
    assert bytes(s.take_upstream()) == command("RESET") + command("CLIENT", "ID") + command("CLIENT", "INFO")
    assert s.user == "worker"  # not de-authenticated: the certificate still says who this is
    s.from_upstream(b"+RESET\r\n:7\r\n$4\r\nid=7\r\n")
    assert bytes(s.take_client()) == b"+RESET\r\n"
    s.from_client(command("HELLO", "3"))  # HELLO without AUTH is allowed: the connection is authenticated
    assert bytes(s.take_upstream()) == command("HELLO", "3")


def test_password_in_the_url_beside_a_certificate_fails(cert_session: Session) -> None:
    # redis-py sends AUTH <password> when the URL carries one; with default off that is WRONGPASS even though the
    # certificate was accepted (as Redis answers it), and redis-py then fails the connection.
    cert_session.from_client(command("AUTH", "leftover-password"))
    assert bytes(cert_session.take_client()).startswith(b"-WRONGPASS")
    assert cert_session.user == "worker"
