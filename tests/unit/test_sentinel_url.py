"""The sentinel:// URL: what it accepts, what it refuses (ConfigError naming the key), and that str() hides secrets."""

from __future__ import annotations

import pytest

from brokerproxy.errors import ConfigError
from brokerproxy.sentinel import parse_sentinel_url as reexported
from brokerproxy.sentinel_url import DEFAULT_SENTINEL_PORT, SentinelUpstream, parse_sentinel_url


def test_three_sentinels_master_and_db() -> None:
    up = parse_sentinel_url("upstream", "sentinel://s1:26379,s2:26380,10.0.0.3:26381/mymaster/2")
    assert up == SentinelUpstream((("s1", 26379), ("s2", 26380), ("10.0.0.3", 26381)), "mymaster", 2)
    assert up.username is up.password is up.sentinel_username is up.sentinel_password is None
    assert up.handshake() == [[b"SELECT", b"2"]]


def test_defaults_port_and_db() -> None:
    up = parse_sentinel_url("upstream", "sentinel://s1,s2/mymaster")
    assert up.addresses == (("s1", DEFAULT_SENTINEL_PORT), ("s2", DEFAULT_SENTINEL_PORT))
    assert up.db == 0
    assert up.handshake() == []
    assert parse_sentinel_url("upstream", "sentinel://s1/mymaster/").db == 0


def test_ipv6_in_brackets() -> None:
    up = parse_sentinel_url("upstream", "sentinel://[::1]:26379,[fe80::1]/m")
    assert up.addresses == (("::1", 26379), ("fe80::1", DEFAULT_SENTINEL_PORT))
    assert str(up) == "sentinel://[::1]:26379,[fe80::1]:26379/m/0"


def test_scheme_is_case_insensitive_and_reexported() -> None:
    assert reexported is parse_sentinel_url
    assert parse_sentinel_url("k", "SENTINEL://h:1/m").addresses == (("h", 1),)


@pytest.mark.parametrize(
    ("url", "username", "password"),
    [
        ("sentinel://user:p%40ss@h/m", "user", "p@ss"),
        ("sentinel://:secret@h/m", None, "secret"),
        ("sentinel://secret@h/m", None, "secret"),  # a lone word is a password, as redis-py reads redis://secret@
        ("sentinel://u:a:b@h/m", "u", "a:b"),
    ],
)
def test_userinfo_is_the_data_nodes_credentials(url: str, username: str | None, password: str) -> None:
    up = parse_sentinel_url("upstream", url)
    assert (up.username, up.password) == (username, password)
    assert up.sentinel_username is None and up.sentinel_password is None
    assert up.handshake()[0] == [b"AUTH", *([username.encode()] if username else []), password.encode()]


def test_sentinel_credentials_in_the_query() -> None:
    up = parse_sentinel_url(
        "upstream", "sentinel://app:redispw@h1,h2/m/1?sentinel_username=watch&sentinel_password=s%26ntinel"
    )
    assert (up.username, up.password) == ("app", "redispw")
    assert (up.sentinel_username, up.sentinel_password) == ("watch", "s&ntinel")
    assert up.handshake() == [[b"AUTH", b"app", b"redispw"], [b"SELECT", b"1"]]
    only_password = parse_sentinel_url("upstream", "sentinel://h/m?sentinel_password=x")
    assert (only_password.sentinel_username, only_password.sentinel_password) == (None, "x")


def test_str_and_repr_never_show_passwords() -> None:
    up = parse_sentinel_url(
        "upstream", "sentinel://app:TOPSECRET1@h1:1,h2:2/mymaster/3?sentinel_username=w&sentinel_password=TOPSECRET2"
    )
    for text in (str(up), repr(up)):
        assert "TOPSECRET" not in text
    assert str(up) == "sentinel://app@h1:1,h2:2/mymaster/3?sentinel_username=w"
    # Without its passwords, what str() prints parses back to the same Sentinels, master and database.
    bare = parse_sentinel_url("upstream", "sentinel://h1:1,[::1]:2/my%2Fmaster/3")
    again = parse_sentinel_url("upstream", str(bare))
    assert again == bare and again.master_name == "my/master"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (None, "expected a URL"),
        (26379, "expected a URL"),
        ("redis://h:6379/0", "unsupported scheme 'redis'"),
        ("sentinels://h/m", "unsupported scheme"),
        ("sentinel:///m", "no Sentinel addresses"),
        ("sentinel://h1,,h2/m", "empty Sentinel address"),
        ("sentinel://h1,/m", "empty Sentinel address"),
        ("sentinel://h:/m", "empty port"),
        ("sentinel://:26379/m", "has no host"),
        ("sentinel://h:abc/m", "is not a number"),
        ("sentinel://h:0/m", "out of range"),
        ("sentinel://h:65536/m", "out of range"),
        ("sentinel://h:-1/m", "is not a number"),
        ("sentinel://::1:26379/m", "IPv6 addresses go in brackets"),
        ("sentinel://[::1/m", "not a valid URL"),
        ("sentinel://[::1]x/m", "expected [IPv6]:PORT"),
        ("sentinel://h:1,h:1/m", "listed twice"),
        ("sentinel://h,h:26379/m", "listed twice"),
        ("sentinel://h", "no master name"),
        ("sentinel://h/", "no master name"),
        ("sentinel://h/m/0/extra", "expected /<master-name>[/<db>]"),
        ("sentinel://h/m/x", "database 'x' is not a number"),
        ("sentinel://h/m/-1", "is not a number"),
        ("sentinel://h/my%20master", "invalid master name"),
        ("sentinel://user:@h/m", "empty password"),
        ("sentinel://@h/m", "empty password"),
        ("sentinel://h/m#frag", "no #fragment"),
        ("sentinel://h/m?password=x", "the Redis password goes in the userinfo"),
        ("sentinel://h/m?username=x", "the Redis username goes in the userinfo"),
        ("sentinel://h/m?ssl=true", "unknown query parameter 'ssl'"),
        ("sentinel://h/m?sentinel_password=a&sentinel_password=b", "given twice"),
        ("sentinel://h/m?sentinel_password=", "is empty"),
        ("sentinel://h/m?sentinel_username=u", "sentinel_username without sentinel_password"),
        ("sentinel://h/m?sentinel_password", "malformed query string"),
    ],
)
def test_bad_urls_name_the_key(url: object, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sentinel_url("upstream.sentinel", url)
    assert info.value.key == "upstream.sentinel"
    assert why in info.value.why
    assert str(info.value).startswith("upstream.sentinel: ")


def test_errors_never_echo_a_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_sentinel_url("upstream", "sentinel://u:TOPSECRET@h:bad/m")
    assert "TOPSECRET" not in str(info.value)
