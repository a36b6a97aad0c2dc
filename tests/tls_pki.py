"""Certificates for the TLS tests, made at run time with trustme (no key is checked in).

``Pki(directory)`` writes a CA, a server certificate for the names the clients dial (localhost, 127.0.0.1), client
certificates for named users, and the odd ones the failure tests need (another CA's, an expired one).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = self._write("ca.crt", self.ca.cert_pem.bytes())
        self.server_cert, self.server_key = self.issue("server", "localhost", "127.0.0.1")

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def issue(
        self,
        name: str,
        *identities: str,
        common_name: str | None = None,
        ca: trustme.CA | None = None,
        not_after: datetime.datetime | None = None,
        passphrase: bytes | None = None,
    ) -> tuple[Path, Path]:
        """(certificate chain file, key file) for a new leaf certificate."""
        kw = {"not_after": not_after} if not_after is not None else {}
        leaf = (ca or self.ca).issue_cert(*identities, common_name=common_name, **kw)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        key = leaf.private_key_pem.bytes()
        if passphrase is not None:
            loaded = serialization.load_pem_private_key(key, password=None)
            key = loaded.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(passphrase),
            )
        return self._write(f"{name}.crt", chain), self._write(f"{name}.key", key)

    def issue_uri(self, name: str, uri: str, common_name: str) -> tuple[Path, Path]:
        """A client certificate with a URI SAN (a SPIFFE ID), which trustme does not make: signed here with the
        CA's key (trustme exports it)."""
        ca_key = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        pem_key = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)), self._write(
            f"{name}.key", pem_key
        )

    def client(self, user: str, *sans: str) -> tuple[Path, Path]:
        """A client certificate whose subject CN is ``user`` (and these SANs)."""
        return self.issue(f"client-{user}", *(sans or (f"{user}.clients.test",)), common_name=user)

    def server_toml(self, **extra: str) -> str:
        """A [tls] table serving this PKI's server certificate."""
        lines = [
            "[tls]",
            f'cert_file = "{self.server_cert}"',
            f'key_file = "{self.server_key}"',
            f'ca_file = "{self.ca_file}"',
        ]
        lines += [f"{k} = {v}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"
