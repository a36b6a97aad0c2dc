"""TLS: the listener (with and without client certificates), certificate-mapped users, every handshake failure the
issue lists, certificate rotation under live connections, and a rediss:// upstream with tls-auth-clients yes.

Real parts only: redis-py and raw ssl sockets as clients, real brokerproxy and redis-server processes, and
certificates made by trustme at run time (tests/tls_pki.py).
"""

from __future__ import annotations

import datetime
import hashlib
import re
import signal
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import ProxyProcess, RedisServer, free_port, wait_for_port
from tests.tls_pki import Pki

StartProxy = Callable[..., ProxyProcess]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


class TLSProxy:
    def __init__(self, proc: ProxyProcess, tls_port: int, metrics_port: int, pki: Pki) -> None:
        self.proc, self.tls_port, self.metrics_port, self.pki = proc, tls_port, metrics_port, pki

    def client(self, cert: tuple[Path, Path] | None = None, **kw: object) -> redis.Redis:
        extra: dict[str, object] = {}
        if cert is not None:
            extra = {"ssl_certfile": str(cert[0]), "ssl_keyfile": str(cert[1])}
        return redis.Redis(
            host="localhost", port=self.tls_port, ssl=True, ssl_ca_certs=str(self.pki.ca_file),
            ssl_check_hostname=True, socket_timeout=10, **extra, **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
            if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
                return float(m.group(3))
        return 0.0


def start_tls_proxy(
    start_proxy: StartProxy, upstream: str, pki: Pki, tls_extra: str = "", top: str = "", **tls_keys: str
) -> TLSProxy:
    tls_port, metrics_port = free_port(), free_port()
    config = f'tls_listen = "127.0.0.1:{tls_port}"\nmetrics_listen = "127.0.0.1:{metrics_port}"\n{top}\n'
    config += pki.server_toml(**tls_keys) + tls_extra
    proc = start_proxy(upstream, config=config)
    wait_for_port(tls_port, proc=proc.proc)
    wait_for_port(metrics_port, proc=proc.proc)
    return TLSProxy(proc, tls_port, metrics_port, pki)


ACL_USERS = """
[acl]
rules = [
    "user default off",
    "user worker on nopass ~celery* ~_kombu* &* +@all",
    "user admin on >adminpw ~* &* +@all",
]
"""


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------- the listener


def test_tls_listener_beside_plaintext(redis_server: RedisServer, start_proxy: StartProxy, pki: Pki) -> None:
    p = start_tls_proxy(start_proxy, redis_server.url(), pki)
    c = p.client()
    assert c.ping()
    c.set("k", b"x" * 100_000)
    assert c.get("k") == b"x" * 100_000
    assert redis.Redis(port=p.proc.port).get("k") == b"x" * 100_000  # the plaintext listener, same Redis
    pipe = c.pipeline(transaction=False)
    for i in range(2000):
        pipe.rpush("l", i)
    assert pipe.execute()[-1] == 2000
    resp3 = p.client(protocol=3)
    assert resp3.hgetall("nope") == {}
    assert p.metric("brokerproxy_client_connections_total", listener="tls") >= 2
    assert p.metric("brokerproxy_tls_certificate_expiry_timestamp_seconds", listener="tls", role="server") > time.time()


def test_tls_only(redis_server: RedisServer, start_proxy: StartProxy, pki: Pki, tmp_path: Path) -> None:
    tls_port = free_port()
    cfg = tmp_path / "tls-only.toml"
    cfg.write_text(f'listen = ""\ntls_listen = "127.0.0.1:{tls_port}"\n' + pki.server_toml())
    from tests.conftest import ProxyProcess as PP

    proc = PP(["--config", str(cfg), "--upstream", redis_server.url()], None, tmp_path / "tls-only.log", tls_port)
    try:
        proc.wait_ready()
        c = redis.Redis(host="localhost", port=tls_port, ssl=True, ssl_ca_certs=str(pki.ca_file))
        assert c.ping()
        assert proc.stop() == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
        proc.close()


def test_encrypted_key_passphrase_file_and_env(
    redis_server: RedisServer, start_proxy: StartProxy, pki: Pki, tmp_path: Path
) -> None:
    cert, key = pki.issue("enc", "localhost", passphrase=b"s3cret")
    pass_file = tmp_path / "pass"
    pass_file.write_text("s3cret\n")
    tls_port = free_port()
    base = f'tls_listen = "127.0.0.1:{tls_port}"\n[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n'
    p = start_proxy(redis_server.url(), config=base + f'key_passphrase_file = "{pass_file}"\n')
    wait_for_port(tls_port, proc=p.proc)
    assert redis.Redis(host="localhost", port=tls_port, ssl=True, ssl_ca_certs=str(pki.ca_file)).ping()
    p.stop()
    tls_port2 = free_port()
    base2 = base.replace(str(tls_port), str(tls_port2))
    p2 = start_proxy(redis_server.url(), config=base2 + 'key_passphrase_env = "BP_TEST_KEY_PASS"\n',
                     env={"BP_TEST_KEY_PASS": "s3cret"})  # fmt: skip
    wait_for_port(tls_port2, proc=p2.proc)
    assert redis.Redis(host="localhost", port=tls_port2, ssl=True, ssl_ca_certs=str(pki.ca_file)).ping()
    # The wrong passphrase is refused at start-up, naming the key.
    pass_file.write_text("wrong\n")
    bad = start_proxy(redis_server.url(), config=base.replace(str(tls_port), str(free_port()))
                      + f'key_passphrase_file = "{pass_file}"\n', wait=False)  # fmt: skip
    assert bad.proc.wait(20) == 2
    assert "tls.key_passphrase_file" in bad.logs()


# ------------------------------------------------------------------------------------------------- mTLS identities


def test_certificate_maps_to_acl_user(redis_server: RedisServer, start_proxy: StartProxy, pki: Pki) -> None:
    p = start_tls_proxy(
        start_proxy, redis_server.url(), pki, tls_extra=ACL_USERS, auth_clients='"yes"', identity='"cn"'
    )
    worker = p.client(pki.client("worker"))
    assert worker.execute_command("ACL", "WHOAMI") == b"worker"  # no AUTH: the certificate said who
    assert worker.lpush("celery", "m") == 1
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.get("secret")  # the ACL applies to the certificate's user
    # A RESP3 client with the same certificate is the same user.
    assert p.client(pki.client("worker"), protocol=3).execute_command("ACL", "WHOAMI") in (b"worker", "worker")
    # A certificate that names nobody is refused (unmapped = "refuse", the default): the connection is closed.
    stranger = p.client(pki.client("stranger"))
    with pytest.raises(redis.exceptions.ConnectionError):
        stranger.ping()
    assert p.metric("brokerproxy_auth_failures_total") >= 1
    assert "client certificate maps to no user" in p.proc.logs()


def test_role_user_without_password_logs_in_by_certificate(
    redis_server: RedisServer, start_proxy: StartProxy, pki: Pki
) -> None:
    """An [[acl.roles]] user with no password at all: only a certificate that maps to it can log in as it."""
    roles = '\n[acl]\nrules = ["user default off"]\n[[acl.roles]]\nname = "worker"\nrole = "worker(celery)"\n'
    p = start_tls_proxy(start_proxy, redis_server.url(), pki, tls_extra=roles, auth_clients='"yes"', identity='"cn"')
    worker = p.client(pki.client("worker"))
    assert worker.lpush("celery", "m") == 1  # logged in (default is off) with the worker role's rules
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.lpush("other-queue", "m")
    # No password can log in as it: Redis's answer for a user with no password.
    with pytest.raises(redis.exceptions.AuthenticationError):
        p.client(pki.client("worker")).execute_command("AUTH", "worker", "")


def test_san_uri_identity_table_and_password_fallback(
    redis_server: RedisServer, start_proxy: StartProxy, pki: Pki
) -> None:
    spiffe = "spiffe://cluster.local/ns/airflow/sa/worker"
    p = start_tls_proxy(
        start_proxy, redis_server.url(), pki,
        tls_extra=ACL_USERS + f'\n[tls.identities]\n"{spiffe}" = "worker"\n',
        auth_clients='"optional"', identity='"san_uri"', unmapped='"password"',
    )  # fmt: skip
    by_uri = p.client(pki.issue_uri("spiffe", spiffe, common_name="ignored")).execute_command("ACL", "WHOAMI")
    assert by_uri == b"worker"
    # No certificate at all (optional) and an unmapped one both fall back to a password.
    no_cert = p.client()
    with pytest.raises(redis.exceptions.AuthenticationError):
        no_cert.ping()
    with_pw = p.client(username="admin", password="adminpw")
    assert with_pw.execute_command("ACL", "WHOAMI") == b"admin"
    unmapped = p.client(pki.client("stranger"), username="admin", password="adminpw")
    assert unmapped.execute_command("ACL", "WHOAMI") == b"admin"


# ------------------------------------------------------------------------------------------------- failures


def raw_tls(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(sock, server_hostname="localhost")


def client_ctx(pki: Pki, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def expect_closed(sock: socket.socket, timeout: float = 10.0) -> float:
    """Seconds until the proxy closed the connection (EOF or reset)."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, ssl.SSLError, OSError):
        pass
    return time.monotonic() - t0


def test_handshake_failures_are_counted_by_reason(redis_server: RedisServer, start_proxy: StartProxy, pki: Pki) -> None:

    p = start_tls_proxy(
        start_proxy, redis_server.url(), pki, auth_clients='"yes"', handshake_timeout="1.0", min_version='"1.3"'
    )
    bystander = p.client(pki.client("someone"))
    assert bystander.ping()

    def fails(ctx: ssl.SSLContext) -> None:
        try:
            s = raw_tls(p.tls_port, ctx)
        except (ssl.SSLError, OSError):
            return
        # TLS 1.3: a refused client certificate is only reported after the client's handshake returned.
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        expect_closed(s)
        s.close()

    fails(client_ctx(pki))  # no certificate
    other = Pki(pki.dir / "other")
    fails(client_ctx(pki, other.client("x")))  # a certificate from a CA the proxy does not trust
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    fails(client_ctx(pki, pki.issue("old", "old.test", common_name="old", not_after=past)))  # expired
    old_proto = client_ctx(pki, pki.client("someone"))
    old_proto.maximum_version = ssl.TLSVersion.TLSv1_2
    fails(old_proto)  # the listener's min_version is 1.3
    # A plaintext client on the TLS port, garbage, and a handshake that never starts: closed within the bound.
    for payload in (b"*1\r\n$4\r\nPING\r\n", bytes(range(256)) * 4, b""):
        s = socket.create_connection(("127.0.0.1", p.tls_port))
        s.sendall(payload)
        assert expect_closed(s, timeout=10) < 5  # handshake_timeout is 1 s
        s.close()
    # And a TLS client on the plaintext port.
    plain = socket.create_connection(("127.0.0.1", p.proc.port))
    try:
        client_ctx(pki).wrap_socket(plain, server_hostname="localhost")
    except (ssl.SSLError, OSError):
        pass
    plain.close()
    assert bystander.ping()  # nothing above touched an established connection

    def counted(reason: str, listener: str = "tls") -> float:
        return p.metric("brokerproxy_tls_handshake_failures_total", listener=listener, reason=reason)

    # The RESP request is "not_tls" at once; the garbage (its first bytes read as a record header, OpenSSL waits for
    # the rest) and the silent connection end at the handshake timeout.
    wait_for(lambda: counted("not_tls") + counted("timeout") == 3)
    assert counted("no_certificate") == 1
    assert counted("unknown_ca") == 1
    assert counted("expired") == 1
    assert counted("protocol_version") == 1
    assert counted("not_tls") >= 1
    assert counted("plaintext_port", listener="main") == 1
    logs = p.proc.logs()
    assert counted("closed") == 1  # the fixture's wait for the port: connected and closed without a word
    assert logs.count('"TLS handshake failed"') == 8  # once each, no traceback
    assert "Traceback" not in logs


# ------------------------------------------------------------------------------------------------- rotation


def peer_fingerprint(port: int, pki_ca: Path) -> str:
    with raw_tls(port, ssl.create_default_context(cafile=str(pki_ca))) as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize("trigger", ["file-change", "sighup"])
def test_certificate_rotation_under_live_connections(
    redis_server: RedisServer, start_proxy: StartProxy, pki: Pki, trigger: str
) -> None:
    watch = "0.2" if trigger == "file-change" else "0"
    p = start_tls_proxy(start_proxy, redis_server.url(), pki, watch_interval=watch)
    before = peer_fingerprint(p.tls_port, pki.ca_file)
    live = p.client()
    assert live.set("k", "v")
    # Replace the certificate and key on disk (a new certificate of the same CA), as a secret rotation does.
    new_cert, new_key = pki.issue("server-new", "localhost", "127.0.0.1")
    pki.server_cert.write_bytes(new_cert.read_bytes())
    pki.server_key.write_bytes(new_key.read_bytes())
    if trigger == "sighup":
        p.proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: peer_fingerprint(p.tls_port, pki.ca_file) != before)
    assert live.get("k") == b"v"  # the established connection was untouched
    assert p.metric("brokerproxy_tls_reloads_total", listener="tls", result="ok") >= 1
    # A broken update (a key that does not match) keeps the current certificate, logged and counted.
    current = peer_fingerprint(p.tls_port, pki.ca_file)
    pki.server_key.write_bytes(pki.issue("unrelated", "x.test")[1].read_bytes())
    if trigger == "sighup":
        p.proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: p.metric("brokerproxy_tls_reloads_total", listener="tls", result="failed") >= 1)
    assert peer_fingerprint(p.tls_port, pki.ca_file) == current
    assert p.client().ping()
    assert live.get("k") == b"v"
    assert "the key does not match the certificate" in p.proc.logs()


# ------------------------------------------------------------------------------------------------- upstream TLS


@pytest.fixture
def tls_redis(tmp_path: Path, pki: Pki) -> Iterator[RedisServer]:
    d = tmp_path / "tls-redis"
    d.mkdir()
    tls = ("--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
           "--tls-ca-cert-file", str(pki.ca_file), "--tls-auth-clients", "yes")  # fmt: skip
    server = RedisServer(d, tls=tls)
    yield server
    server.stop()


def direct_tls(server: RedisServer, pki: Pki) -> redis.Redis:
    cert, key = pki.client("direct")
    return redis.Redis(host="localhost", port=server.port, ssl=True, ssl_ca_certs=str(pki.ca_file),
                       ssl_certfile=str(cert), ssl_keyfile=str(key))  # fmt: skip


def upstream_toml(pki: Pki, cert: tuple[Path, Path] | None, ca: Path | None = None) -> str:
    out = f'[upstream_tls]\nca_file = "{ca or pki.ca_file}"\n'
    if cert is not None:
        out += f'cert_file = "{cert[0]}"\nkey_file = "{cert[1]}"\n'
    return out


def test_upstream_rediss_with_client_certificate(tls_redis: RedisServer, start_proxy: StartProxy, pki: Pki) -> None:
    metrics_port = free_port()
    config = f'metrics_listen = "127.0.0.1:{metrics_port}"\n[metrics]\ndepth_poll_interval = 0.2\n'
    config += upstream_toml(pki, pki.client("proxy"))
    p = start_proxy(f"rediss://localhost:{tls_redis.port}/0", config=config)
    c = p.client(socket_timeout=10)
    assert c.ping()
    assert c.lpush("q", "a", "b") == 2
    assert c.brpop(["q"], timeout=1) == (b"q", b"a")
    direct = direct_tls(tls_redis, pki)
    assert direct.lrange("q", 0, -1) == [b"b"]
    # The side connection (readiness, depth) speaks TLS too.
    tp = TLSProxy(p, 0, metrics_port, pki)
    wait_for(lambda: tp.metric("brokerproxy_upstream_up") == 1)
    assert tp.metric("brokerproxy_tls_certificate_expiry_timestamp_seconds", listener="upstream", role="client") > 0
    # The loss guard over TLS: a client blocked in BRPOP leaves; CLIENT UNBLOCK (a TLS side connection) ends its
    # pop, so an element pushed afterwards stays in the list.
    direct.delete("q")
    s = socket.create_connection(("127.0.0.1", p.port))
    s.sendall(b"*3\r\n$5\r\nBRPOP\r\n$1\r\nq\r\n$1\r\n0\r\n")
    wait_for(lambda: b" flags=b " in direct.execute_command("CLIENT", "LIST"))
    s.close()
    wait_for(lambda: b" flags=b " not in direct.execute_command("CLIENT", "LIST"))
    direct.lpush("q", "kept")
    time.sleep(0.3)
    assert direct.lrange("q", 0, -1) == [b"kept"]


def test_upstream_tls_failures(tls_redis: RedisServer, start_proxy: StartProxy, pki: Pki) -> None:
    # Redis wants a client certificate and the proxy has none: the client gets an error, the proxy stays up.
    fail_fast = {"BROKERPROXY_UPSTREAM_WAIT": "0"}  # no retrying for upstream_wait: these fail every time
    no_cert = start_proxy(f"rediss://localhost:{tls_redis.port}/0", config=upstream_toml(pki, None), env=fail_fast)
    with pytest.raises(redis.exceptions.RedisError):
        no_cert.client(socket_timeout=10).ping()
    # The proxy does not trust Redis's certificate: refused with the reason, counted as a TLS upstream error.
    other = Pki(pki.dir / "other")
    wrong_ca = start_proxy(
        f"rediss://localhost:{tls_redis.port}/0",
        config=upstream_toml(pki, pki.client("proxy"), ca=other.ca_file),
        env=fail_fast,
    )
    with pytest.raises(redis.exceptions.RedisError, match=r"upstream unavailable.*certificate verify failed"):
        wrong_ca.client(socket_timeout=10).ping()
    # A name the certificate does not carry fails the hostname check.
    other_name = start_proxy(
        f"rediss://127.0.0.2:{tls_redis.port}/0",
        config=upstream_toml(pki, pki.client("proxy")) + 'server_hostname = "nothere.test"\n',
        env=fail_fast,
    )
    with pytest.raises(redis.exceptions.RedisError, match="upstream unavailable"):
        other_name.client(socket_timeout=10).ping()
    assert no_cert.proc.poll() is None and wrong_ca.proc.poll() is None
