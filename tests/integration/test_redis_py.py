"""redis-py through the proxy, RESP2 and RESP3: what Celery's stack relies on, answered as Redis answers it."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from tests.conftest import ProxyProcess, RedisServer

PROTOCOLS = [2, 3]


@pytest.fixture(params=PROTOCOLS, ids=["resp2", "resp3"])
def r(request: pytest.FixtureRequest, proxy: ProxyProcess) -> redis.Redis:
    client = proxy.client(protocol=request.param)
    yield client
    client.close()


def test_strings_and_keys(r: redis.Redis, redis_server: RedisServer) -> None:
    assert r.set("s", "v") is True
    assert r.get("s") == b"v"
    assert r.get("missing") is None
    assert r.execute_command("SETEX", "e", 100, "x") in (True, b"OK")
    assert 0 < r.ttl("e") <= 100
    assert r.mget(["s", "missing", "e"]) == [b"v", None, b"x"]
    assert r.incr("n") == 1
    assert r.delete("s", "e", "n") == 3
    # The write really reached this test's Redis.
    r.set("seen", "1")
    assert redis_server.client().get("seen") == b"1"


def test_resp3_types_pass_through(r: redis.Redis) -> None:
    r.sadd("set", "a", "b")
    assert r.smembers("set") == {b"a", b"b"}
    r.zadd("z", {"a": 1.5, "b": 2})
    assert [tuple(x) for x in r.zrange("z", 0, -1, withscores=True)] == [(b"a", 1.5), (b"b", 2.0)]
    r.hset("h", mapping={"f": "v", "g": "w"})
    assert r.hgetall("h") == {b"f": b"v", b"g": b"w"}
    assert r.exists("h", "set", "nope") == 2


def test_lists_and_blocking_pops(r: redis.Redis) -> None:
    r.delete("q1", "q2")
    assert r.lpush("q2", "a", "b") == 2
    assert tuple(r.brpop(["q1", "q2"], timeout=1)) == (b"q2", b"a")
    assert r.rpop("q2") == b"b"
    assert r.brpop(["q1", "q2"], timeout=1) is None  # timeout: the null of the connection's protocol
    assert r.blpop(["q1"], timeout=0.1) is None
    r.rpush("src", "1", "2")
    assert r.blmove("src", "dst", 1, "RIGHT", "LEFT") == b"2"
    assert r.brpoplpush("src", "dst", 1) == b"1"
    assert r.lrange("dst", 0, -1) == [b"1", b"2"]
    assert r.blmpop(1, 2, "nope", "dst", direction="LEFT", count=2) == [b"dst", [b"1", b"2"]]
    r.zadd("zq", {"m": 3, "n": 4})
    assert tuple(r.bzpopmin(["zq"], timeout=1)) == (b"zq", b"m", 3.0)
    assert tuple(r.bzpopmax(["zq"], timeout=1)) == (b"zq", b"n", 4.0)
    assert r.bzpopmax(["zq"], timeout=0.1) is None


def test_blocking_pop_waits_for_a_push(r: redis.Redis, proxy: ProxyProcess) -> None:
    """A BRPOP with a long timeout is not timed out by the proxy: it waits for the element."""
    r.delete("wait")
    pusher = proxy.client()

    def push_later() -> None:
        time.sleep(0.5)
        pusher.lpush("wait", "late")

    t = threading.Thread(target=push_later)
    t.start()
    started = time.monotonic()
    assert tuple(r.brpop(["nothing", "wait"], timeout=0)) == (b"wait", b"late")
    t.join()
    assert time.monotonic() - started >= 0.4


def test_brpop_reply_shape(proxy: ProxyProcess) -> None:
    for protocol in PROTOCOLS:
        r = proxy.client(protocol=protocol)
        r.lpush("shape", "x")
        assert tuple(r.brpop(["a", "shape"], timeout=1)) == (b"shape", b"x")
        assert r.brpop(["shape"], timeout=1) is None
        r.close()


def test_transactions_and_watch_conflicts(r: redis.Redis, proxy: ProxyProcess) -> None:
    r.set("w", "0")
    with r.pipeline() as p:
        p.watch("w")
        p.multi()
        p.incr("w")
        p.lpush("tx", "m")
        assert p.execute() == [1, 1]
    other = proxy.client()
    with r.pipeline() as p:
        p.watch("w")
        other.set("w", "changed")  # another client touches the watched key
        p.multi()
        p.incr("w")
        with pytest.raises(redis.WatchError):
            p.execute()
    assert r.get("w") == b"changed"
    # DISCARD
    with r.pipeline() as p:
        p.multi()
        p.set("never", "1")
        p.reset()  # redis-py sends DISCARD / UNWATCH as needed
    assert r.get("never") is None
    # A queued command with a wrong arity aborts EXEC (Redis's own EXECABORT passes through).
    with pytest.raises(redis.ResponseError, match=r"EXECABORT|wrong number"):
        r.execute_command("MULTI")
        r.execute_command("GET")
    with pytest.raises(redis.exceptions.ExecAbortError, match="discarded because of previous errors"):
        r.execute_command("EXEC")


def test_lua_evalsha_and_script_commands(r: redis.Redis) -> None:
    script = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[1])"
    assert r.eval(script, 1, "lk", "lv") == b"lv"
    sha = r.script_load(script)
    assert r.script_exists(sha) == [True]
    assert r.evalsha(sha, 1, "lk", "lv2") == b"lv2"
    with pytest.raises(redis.exceptions.NoScriptError):
        r.evalsha("0" * 40, 0)
    registered = r.register_script("return ARGV[1]")
    assert registered(args=["hi"]) == b"hi"
    r.script_flush()
    assert r.script_exists(sha) == [False]


def test_functions_fcall(r: redis.Redis) -> None:
    code = "#!lua name=bp\nredis.register_function('echo1', function(keys, args) return args[1] end)"
    r.function_load(code, replace=True)
    assert r.fcall("echo1", 0, "x") == b"x"


def test_pubsub_channels_and_patterns(r: redis.Redis, proxy: ProxyProcess) -> None:
    ps = r.pubsub()
    ps.subscribe("celery-task-meta-1")
    ps.psubscribe("/0.celeryev/*")
    assert ps.get_message(timeout=2)["type"] == "subscribe"
    assert ps.get_message(timeout=2)["type"] == "psubscribe"
    publisher = proxy.client()
    assert publisher.publish("celery-task-meta-1", "done") == 1
    assert publisher.publish("/0.celeryev/worker.heartbeat", "hb") == 1
    msgs = [ps.get_message(timeout=2) for _ in range(2)]
    assert {(m["type"], m["data"]) for m in msgs} == {("message", b"done"), ("pmessage", b"hb")}
    ps.ping("health")
    pong = ps.get_message(timeout=2)
    assert pong is not None and pong["type"] == "pong"
    ps.unsubscribe()
    ps.punsubscribe()
    assert ps.get_message(timeout=2)["type"] == "unsubscribe"
    assert ps.get_message(timeout=2)["type"] == "punsubscribe"
    # After leaving subscribed mode the same connection takes normal commands again.
    ps.close()
    assert r.ping() is True


def test_resp2_subscribed_mode_rules(proxy: ProxyProcess) -> None:
    """In RESP2, a subscribed connection refuses other commands with Redis's own error."""
    conn = redis.Connection(port=proxy.port, protocol=2)
    conn.connect()
    conn.send_command("SUBSCRIBE", "a", "b")
    assert conn.read_response() == [b"subscribe", b"a", 1]
    assert conn.read_response() == [b"subscribe", b"b", 2]
    conn.send_command("GET", "x")
    with pytest.raises(redis.ResponseError, match=r"only .*allowed in this context"):
        conn.read_response()
    conn.send_command("PING")
    assert conn.read_response() == [b"pong", b""]
    conn.send_command("UNSUBSCRIBE")
    assert {conn.read_response()[1], conn.read_response()[1]} == {b"a", b"b"}
    conn.send_command("GET", "x")
    assert conn.read_response() is None
    conn.disconnect()


def test_resp3_subscribe_and_get_in_one_pipeline(proxy: ProxyProcess) -> None:
    """RESP3 confirmations are push frames: they must not be taken for the reply of the next command."""
    conn = redis.Connection(port=proxy.port, protocol=3)
    conn.connect()
    conn.send_packed_command(conn.pack_commands([("SUBSCRIBE", "c1"), ("SET", "k", "v"), ("GET", "k")]))
    replies = []
    for _ in range(3):
        replies.append(conn.read_response(push_request=True))
    assert replies[0] == [b"subscribe", b"c1", 1]
    assert replies[1:] == [b"OK", b"v"]
    conn.disconnect()


def test_sharded_pubsub(r: redis.Redis, proxy: ProxyProcess) -> None:
    ps = r.pubsub()
    ps.ssubscribe("shard-ch")
    assert ps.get_sharded_message(timeout=2)["type"] == "ssubscribe"
    assert proxy.client().spublish("shard-ch", "hi") == 1
    msg = ps.get_sharded_message(timeout=2)
    assert msg["type"] == "smessage" and msg["data"] == b"hi"
    ps.sunsubscribe("shard-ch")
    ps.close()


def test_pipeline_of_ten_thousand_commands(r: redis.Redis) -> None:
    with r.pipeline(transaction=False) as p:
        for i in range(10_000):
            p.set(f"k{i}", i)
            p.get(f"k{i}")
        out = p.execute()
    assert out[1::2] == [str(i).encode() for i in range(10_000)]


def test_select_isolates_databases(proxy: ProxyProcess, redis_server: RedisServer) -> None:
    r3 = redis.Redis.from_url(proxy.url(3))
    r3.set("db3key", "x")
    assert redis_server.client(db=3).get("db3key") == b"x"
    assert redis_server.client(db=0).get("db3key") is None
    r = proxy.client()
    r.execute_command("SELECT", 5)
    r.set("db5", "y")
    assert redis_server.client(db=5).get("db5") == b"y"


def _outcome(client: redis.Redis, *args: object) -> object:
    try:
        return client.execute_command(*args)
    except redis.ResponseError as exc:
        return f"{type(exc).__name__}: {exc}"


def test_client_commands_redis_py_sends(r: redis.Redis, redis_server: RedisServer) -> None:
    """CLIENT SETNAME/SETINFO/MAINT_NOTIFICATIONS: the proxy answers exactly what Redis answers (Redis 7.0
    rejects SETINFO and MAINT_NOTIFICATIONS; redis-py ignores those errors)."""
    direct = redis_server.client(protocol=r.connection_pool.connection_kwargs.get("protocol", 2))
    for cmd in [
        ("CLIENT", "SETNAME", "worker-1"),
        ("CLIENT", "GETNAME"),
        ("CLIENT", "SETINFO", "LIB-NAME", "redis-py"),
        ("CLIENT", "MAINT_NOTIFICATIONS", "ON", "moving-endpoint-type", "internal-ip"),
        ("CLIENT", "NO-SUCH-SUBCOMMAND"),
        ("ECHO", "hi"),
        ("PING", "x"),
    ]:
        assert _outcome(r, *cmd) == _outcome(direct, *cmd), cmd


def test_wait_and_xread_block(r: redis.Redis) -> None:
    assert r.execute_command("WAIT", 0, 10) == 0
    entry_id = r.xadd("st", {"f": "v"})
    got = r.xread({"st": "0"}, block=100)
    entries = got[b"st"][0] if isinstance(got, dict) else got[0][1]
    assert entries[0][0] == entry_id
    assert not r.xread({"st": "$"}, block=100)
    r.xgroup_create("st", "g", id="0")
    got = r.xreadgroup("g", "c1", {"st": ">"}, block=100)
    entries = got[b"st"][0] if isinstance(got, dict) else got[0][1]
    assert entries[0][0] == entry_id
    assert not r.xreadgroup("g", "c1", {"st": ">"}, block=100)  # blocks 100 ms, then the null reply


def test_reset_and_quit_inline(proxy: ProxyProcess) -> None:
    """RESET answers +RESET and leaves the connection usable (upstream auth/db restored); inline commands work."""
    import socket

    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.sendall(b"SELECT 2\r\nRESET\r\nSET inline v\r\nPING\r\nQUIT\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data == b"+OK\r\n+RESET\r\n+OK\r\n+PONG\r\n+OK\r\n"
    s.close()
