"""Make the TLS material and passwords of the compose demo: a throwaway CA, brokerproxy's server certificate, one
client certificate per ACL user, and random passwords. Nothing of it is checked in.

    python gen-certs.py OUT [--proxy-uid 10001] [--airflow-uid 50000] [--force]

The compose file runs it as its "certs" service (in the brokerproxy image, which has ``cryptography``) into the
named volume mounted at /certs; run it by hand the same way to look at the files. It writes:

    OUT/ca.crt                              the CA certificate (its key is never written: no one can issue more)
    OUT/brokerproxy/tls.crt, tls.key        the proxy's server certificate: DNS brokerproxy, localhost, IP 127.0.0.1
    OUT/<user>/tls.crt, tls.key             a client certificate whose subject CN is the ACL user <user>
    OUT/passwords/<user>                    a random password for each Celery role user (AUTH without a certificate)

As root, it gives each key to the account that reads it (--proxy-uid for the proxy's, --airflow-uid for Airflow's).
When OUT/ca.crt exists it does nothing (so that "docker compose up" keeps the certificates), unless --force.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("brokerproxy", "localhost")
SERVER_IPS = ("127.0.0.1",)
#: Client certificates, by ACL user, and who reads each key: "airflow" or "proxy" (root-only otherwise).
CLIENTS = {"airflow-worker": "airflow", "airflow-scheduler": "airflow", "flower": "airflow", "ops": None}
#: Users of brokerproxy.toml's [[acl.roles]] (password_file = "/certs/passwords/<user>").
PASSWORD_USERS = ("airflow-worker", "airflow-scheduler", "flower")
VALID_DAYS = 365


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8, plain = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, plain)


def make_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("brokerproxy demo CA"))
        .issuer_name(_name("brokerproxy demo CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str, *, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(path: Path, data: bytes, mode: int, uid: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o755)
    path.unlink(missing_ok=True)  # --force over a read-only file
    path.write_bytes(data)
    path.chmod(mode)
    if uid is not None and os.geteuid() == 0:
        os.chown(path, uid, 0)


def generate(out: Path, proxy_uid: int | None = None, airflow_uid: int | None = None) -> None:
    ca, ca_key = make_ca()
    owners = {"proxy": proxy_uid, "airflow": airflow_uid, None: None}
    cert, key = issue(ca, ca_key, "brokerproxy", server=True)
    _write(out / "brokerproxy" / "tls.crt", cert.public_bytes(serialization.Encoding.PEM), 0o444, proxy_uid)
    _write(out / "brokerproxy" / "tls.key", _pem_key(key), 0o400, proxy_uid)
    for user, reader in CLIENTS.items():
        cert, key = issue(ca, ca_key, user, server=False)
        _write(out / user / "tls.crt", cert.public_bytes(serialization.Encoding.PEM), 0o444, owners[reader])
        _write(out / user / "tls.key", _pem_key(key), 0o400, owners[reader])
    for user in PASSWORD_USERS:
        _write(out / "passwords" / user, (secrets.token_urlsafe(24) + "\n").encode(), 0o400, proxy_uid)
    # Last: its presence means a complete set (see main).
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), 0o444, None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--proxy-uid", type=int, help="owner of the proxy's key and the passwords (when run as root)")
    p.add_argument("--airflow-uid", type=int, help="owner of the Airflow components' keys (when run as root)")
    p.add_argument("--force", action="store_true", help="make a new set even if OUT/ca.crt exists")
    args = p.parse_args(argv)
    if (args.out / "ca.crt").exists() and not args.force:
        print(f"{args.out}/ca.crt exists: keeping the certificates (--force makes new ones)")
        return 0
    generate(args.out, args.proxy_uid, args.airflow_uid)
    print(f"wrote a CA, brokerproxy's certificate, {len(CLIENTS)} client certificates and passwords to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
