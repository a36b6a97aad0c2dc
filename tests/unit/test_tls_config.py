"""config.load and the TLS tables: [tls] and [upstream_tls] checked up front, every error naming its key, paths
relative to the config file, and protected mode on a TLS listener. Certificates are made per run (tests/tls_pki.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from brokerproxy import config
from brokerproxy.errors import ConfigError
from tests.tls_pki import Pki

USERS = '[acl]\nrules = ["user default off", "user worker on nopass ~* +@all"]\n'


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return config.load(str(path))


def error_key(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    return e.value.key


def test_tls_listener_loads(tmp_path: Path, pki: Pki) -> None:
    cfg = load(tmp_path, 'tls_listen = "127.0.0.1:6390"\n' + pki.server_toml(auth_clients='"optional"'))
    assert str(cfg.tls_listen) == "127.0.0.1:6390"
    assert str(cfg.listen) == config.DEFAULT_LISTEN  # beside the plaintext listener
    assert cfg.tls.cert_file == str(pki.server_cert) and cfg.tls.auth_clients == "optional"
    assert cfg.tls.min_version == "1.2" and cfg.tls.unmapped == "refuse"


def test_tls_table_without_tls_listen(tmp_path: Path, pki: Pki) -> None:
    assert error_key(tmp_path, pki.server_toml()) == "tls_listen"


def test_upstream_tls_table_without_rediss(tmp_path: Path, pki: Pki) -> None:
    text = f'upstream = "redis://127.0.0.1:6379/0"\n[upstream_tls]\nca_file = "{pki.ca_file}"\n'
    assert error_key(tmp_path, text) == "upstream_tls"
    cfg = load(tmp_path, text.replace("redis://", "rediss://"))
    assert cfg.upstream.tls and cfg.upstream_tls.ca_file == str(pki.ca_file)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("tls", "certfile"),
        ("tls", "server_hostname"),  # an [upstream_tls] key
        ("tls", "tls-auth-clients"),
        ("upstream_tls", "auth_clients"),  # a [tls] key
        ("upstream_tls", "identity"),
        ("upstream_tls", "nope"),
    ],
)
def test_unknown_keys(tmp_path: Path, pki: Pki, table: str, key: str) -> None:
    text = (
        'tls_listen = "127.0.0.1:6390"\nupstream = "rediss://127.0.0.1:6379/0"\n'
        + pki.server_toml(**({key: '"x"'} if table == "tls" else {}))
        + f'[upstream_tls]\nca_file = "{pki.ca_file}"\n'
        + (f'{key} = "x"\n' if table == "upstream_tls" else "")
    )
    assert error_key(tmp_path, text) == f"{table}.{key}"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('auth_clients = "required"', "tls.auth_clients"),
        ('identity = "serial"', "tls.identity"),
        ('unmapped = "allow"', "tls.unmapped"),
        ('min_version = "1.1"', "tls.min_version"),
        ("handshake_timeout = 0", "tls.handshake_timeout"),
        ("watch_interval = -1", "tls.watch_interval"),
        ('prefer_server_ciphers = "sometimes"', "tls.prefer_server_ciphers"),
        ('ciphers = "NO-SUCH-CIPHER"', "tls.ciphers"),
        ('ciphersuites = "TLS_NO_SUCH_SUITE"', "tls.ciphersuites"),
        ("ciphers = 3", "tls.ciphers"),
        ('key_passphrase_env = "BP_UNIT_SURELY_UNSET"', "tls.key_passphrase_env"),
    ],
)
def test_bad_tls_values_name_the_key(tmp_path: Path, pki: Pki, extra: str, key: str) -> None:
    text = 'tls_listen = "127.0.0.1:6390"\n' + pki.server_toml() + extra + "\n"
    assert error_key(tmp_path, text) == key


def test_missing_files_fail_at_load(tmp_path: Path, pki: Pki) -> None:
    text = 'tls_listen = "127.0.0.1:6390"\n' + pki.server_toml().replace(str(pki.server_key), "absent.key")
    assert error_key(tmp_path, text) == "tls.key_file"
    text = f'upstream = "rediss://127.0.0.1:6379/0"\n[upstream_tls]\nca_file = "{tmp_path / "absent-ca.pem"}"\n'
    assert error_key(tmp_path, text) == "upstream_tls.ca_file"


def test_listen_empty(tmp_path: Path, pki: Pki) -> None:
    assert error_key(tmp_path, 'listen = ""\n') == "listen"  # no listener at all
    cfg = load(tmp_path, 'listen = ""\ntls_listen = "127.0.0.1:6390"\n' + pki.server_toml())
    assert cfg.listen is None and cfg.tls_listen is not None  # TLS only


def test_identity_needs_client_certificates(tmp_path: Path, pki: Pki) -> None:
    base = 'tls_listen = "127.0.0.1:6390"\n' + USERS
    assert error_key(tmp_path, base + pki.server_toml(identity='"cn"')) == "tls.identity"
    assert error_key(tmp_path, base + pki.server_toml(identity='"cn"', auth_clients='"no"')) == "tls.identity"
    cfg = load(tmp_path, base + pki.server_toml(identity='"cn"', auth_clients='"optional"'))
    assert cfg.tls.identity == "cn"


def test_identities_must_name_defined_users(tmp_path: Path, pki: Pki) -> None:
    base = 'tls_listen = "127.0.0.1:6390"\n' + USERS + pki.server_toml(identity='"san_uri"', auth_clients='"yes"')
    spiffe = "spiffe://cluster.local/ns/airflow/sa/worker"
    assert error_key(tmp_path, base + f'[tls.identities]\n"{spiffe}" = "ghost"\n') == "tls.identities"
    assert error_key(tmp_path, base + f'[tls.identities]\n"{spiffe}" = 3\n') == "tls.identities"
    cfg = load(tmp_path, base + f'[tls.identities]\n"{spiffe}" = "worker"\n')
    assert cfg.tls.identities == {spiffe: "worker"}


def test_relative_paths_are_resolved_against_the_config_file(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc" / "brokerproxy"
    local = Pki(etc / "certs")  # certs/ next to the config file
    (etc / "pass").write_text("unused\n")
    (etc / "proxy.toml").write_text(
        'tls_listen = "127.0.0.1:6390"\nupstream = "rediss://127.0.0.1:6379/0"\n'
        '[tls]\ncert_file = "certs/server.crt"\nkey_file = "certs/server.key"\nca_file = "./certs/ca.crt"\n'
        'key_passphrase_file = "pass"\n'
        '[upstream_tls]\nca_file = "certs/ca.crt"\ncert_file = "certs/server.crt"\nkey_file = "certs/server.key"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory does not matter
    cfg = config.load("../etc/brokerproxy/proxy.toml")
    assert cfg.tls.cert_file == str(local.server_cert)
    assert cfg.tls.key_file == str(local.server_key)
    assert cfg.tls.key_passphrase_file == str(etc / "pass")
    assert Path(cfg.tls.ca_file or "").resolve() == local.ca_file
    assert cfg.upstream_tls.ca_file == str(local.ca_file)
    assert cfg.upstream_tls.cert_file == str(local.server_cert)
    # Absolute paths stay as they are.
    cfg = load(tmp_path, 'tls_listen = "127.0.0.1:6390"\n' + pki.server_toml())
    assert cfg.tls.cert_file == str(pki.server_cert)


@pytest.mark.parametrize("address", ["0.0.0.0:6390", "10.1.2.3:6390", "[::]:6390", "proxy.internal:6390"])
def test_protected_mode_covers_the_tls_listener(tmp_path: Path, pki: Pki, address: str) -> None:
    top = f'tls_listen = "{address}"\n'  # the plaintext listener stays on loopback
    with pytest.raises(ConfigError) as e:
        load(tmp_path, top + pki.server_toml())
    assert e.value.key == "protected_mode" and str(config.parse_address("x", address)) in e.value.why
    assert load(tmp_path, "protected_mode = false\n" + top + pki.server_toml()).tls_listen is not None
    assert load(tmp_path, top + USERS + pki.server_toml()).tls_listen is not None  # with users: allowed


@pytest.mark.parametrize("address", ["127.0.0.1:6390", "localhost:6390", "[::1]:6390"])
def test_loopback_tls_listener_needs_no_users(tmp_path: Path, pki: Pki, address: str) -> None:
    assert load(tmp_path, f'tls_listen = "{address}"\n' + pki.server_toml()).tls_listen is not None


def test_tls_listen_from_the_environment(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(pki.server_toml())
    cfg = config.load(str(path), env={"BROKERPROXY_TLS_LISTEN": "127.0.0.1:6391"})
    assert str(cfg.tls_listen) == "127.0.0.1:6391"
    with pytest.raises(ConfigError) as e:
        config.load(str(path), env={"BROKERPROXY_TLS_LISTEN": "0.0.0.0:6391"})
    assert e.value.key == "protected_mode"
