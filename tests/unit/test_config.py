"""Config: defaults, precedence (flag > env > file), and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from brokerproxy import config
from brokerproxy.cli import build_config
from brokerproxy.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    cfg = config.load()
    assert str(cfg.listen) == config.DEFAULT_LISTEN
    assert (cfg.upstream.host, cfg.upstream.port, cfg.upstream.db) == ("127.0.0.1", 6379, 0)
    assert cfg.upstream.handshake() == []
    assert cfg.protected_mode is True and cfg.users == ()


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = "127.0.0.1:1111"\nupstream = "redis://h1:1/1"\nlog_level = "debug"\n')
    env = {"BROKERPROXY_LISTEN": "127.0.0.1:2222", "BROKERPROXY_UPSTREAM": "redis://h2:2/2"}
    cfg = build_config(["--config", path, "--listen", "127.0.0.1:3333"], env)
    assert str(cfg.listen) == "127.0.0.1:3333"  # flag
    assert cfg.upstream.host == "h2" and cfg.upstream.db == 2  # env over file
    assert cfg.log_level == "debug"  # file over default
    assert build_config([], {"BROKERPROXY_CONFIG": path}).upstream.host == "h1"


def test_upstream_url_credentials_and_db() -> None:
    up = config.parse_upstream("upstream", "redis://user:p%40ss@redis.internal:6390/4")
    assert (up.username, up.password, up.host, up.port, up.db) == ("user", "p@ss", "redis.internal", 6390, 4)
    assert up.handshake() == [[b"AUTH", b"user", b"p@ss"], [b"SELECT", b"4"]]
    assert "p@ss" not in str(up) and "p%40ss" not in str(up)
    assert config.parse_upstream("u", "redis://:secret@h/0").handshake() == [[b"AUTH", b"secret"]]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('listen = "nohost"', "listen"),
        ('listen = "127.0.0.1:99999"', "listen"),
        ('upstream = "http://x"', "upstream"),
        ('upstream = "redis://h/notadb"', "upstream"),
        ('log_level = "loud"', "log_level"),
        ("drain_timeout = -1", "drain_timeout"),
        ("write_buffer_high_water = 4294967296", "write_buffer_high_water"),
        ("protected_mode = 3", "protected_mode"),
        ("surprise = 1", "surprise"),
        ("[limits]\nmax_bulk_length = 0", "limits.max_bulk_length"),
        ("[limits]\nnope = 1", "limits.nope"),
        ('[[users]]\nname = "a"', "users[0].passwords"),
        ('[[users]]\nname = "a"\npassword_sha256 = ["abc"]', "users[0].password_sha256"),
        ('[[acl.roles]]\nname = "w"\nrole = "worker(celery)"', "acl.roles[0].passwords"),
        ('[[users]]\nname = "a"\npasswords = ["x"]\n[[users]]\nname = "a"\npasswords = ["y"]', "users[1].name"),
        ("this is not toml", "config"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")


def test_protected_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(overrides={"listen": "0.0.0.0:6380"})
    assert err.value.key == "protected_mode"
    assert config.load(overrides={"listen": "0.0.0.0:6380", "protected_mode": "no"}).listen.port == 6380
    with_users = write(tmp_path, 'listen = "0.0.0.0:6380"\n[[users]]\nname = "w"\npasswords = ["p"]\n')
    assert config.load(with_users).users[0].name == "w"
    assert config.load(overrides={"listen": "[::1]:6380"}).listen.is_loopback


def test_users_check_passwords_in_constant_time_api(tmp_path: Path) -> None:
    import hashlib

    text = (
        '[[users]]\nname = "w"\npasswords = ["one", "two"]\n'
        f'[[users]]\nname = "h"\npassword_sha256 = ["{hashlib.sha256(b"three").hexdigest()}"]\n'
        '[[users]]\nname = "off"\npasswords = ["x"]\nenabled = false\n'
    )
    users = config.load(write(tmp_path, text)).authenticator()
    assert users.required
    assert users.check(b"w", b"one") == "w" and users.check(b"w", b"two") == "w"
    assert users.check(b"h", b"three") == "h"
    assert users.check(b"w", b"three") is None
    assert users.check(b"nobody", b"one") is None
    assert users.check(b"off", b"x") is None


def test_example_config_is_true_to_the_code() -> None:
    """config.example.toml documents every key with its default: loading it gives exactly the defaults."""
    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    cfg = config.load(str(example))
    assert cfg == config.load()
    text = example.read_text()
    for key in config.SCALARS:
        assert f"{key} =" in text, f"{key} is not documented in config.example.toml"
    for key in (*config.LIMIT_KEYS, *config.METRICS_KEYS):
        assert f"{key} =" in text, f"{key} is not documented in config.example.toml"


def test_secret_sources_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = write(tmp_path, '[[users]]\nname = "a"\npassword_file = "/nonexistent/pw"\n')
    with pytest.raises(ConfigError) as err:
        config.load(missing)
    assert err.value.key == "users[0].password_file"
    monkeypatch.delenv("BP_UNSET_SECRET", raising=False)
    unset = write(tmp_path, '[[users]]\nname = "a"\npassword_env = "BP_UNSET_SECRET"\n')
    with pytest.raises(ConfigError) as err:
        config.load(unset)
    assert err.value.key == "users[0].password_env"
