"""A real Sentinel deployment for tests: one master, two replicas, three Sentinels, all on free loopback ports.

Every process is ``redis-server`` (Sentinels with ``--sentinel`` and a config file of their own, which Sentinel
rewrites), each in its own temp directory. ``SentinelCluster.start()`` returns once every Sentinel sees both replicas
(with their replication link up) and the two other Sentinels, so a failover can be asked for at once; ``stop()``
kills every process. Never port 6379.

Timings chosen for tests: ``down-after-milliseconds`` 1000 (a killed master is subjectively down after 1 s),
``failover-timeout`` 3000 (a failed election is retried after 2 x 3 s; Sentinel refuses a second failover of the
same master within that window, so each test gets a cluster of its own).
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.conftest import REDIS_SERVER, RedisServer, free_port, wait_for_port

MASTER_NAME = "mymaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
#: Seconds start() waits for the Sentinels to see the replicas and each other (hello messages go every 2 s).
READY_TIMEOUT = 20.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a Sentinel's TLS port: its certificate chain, its key, and the CA it trusts."""

    cert: Path
    key: Path
    ca: Path


class SentinelProcess:
    """``redis-server sentinel.conf --sentinel``; ``stop()``/``start()`` restart it on the same port and config.

    With ``tls``, it also listens for TLS on ``tls_port`` (clients need no certificate); the Sentinels still talk to
    each other and to the data nodes in plain text (``tls-replication no``), and ``port`` stays plain."""

    def __init__(
        self,
        directory: Path,
        master_port: int,
        password: str | None,
        sentinel_password: str | None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.port = free_port()
        self.tls_port = free_port() if tls is not None else None
        self.dir = directory
        self.password = sentinel_password
        self.conf = directory / "sentinel.conf"
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {directory}",
            f"logfile {directory / 'sentinel.log'}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 2",
        ]
        if password is not None:
            lines.append(f"sentinel auth-pass {MASTER_NAME} {password}")
        if sentinel_password is not None:
            # The Sentinel's own password, and the one it uses to talk to the other Sentinels.
            lines += [f"requirepass {sentinel_password}", f"sentinel sentinel-pass {sentinel_password}"]
        if tls is not None:
            lines += [
                f"tls-port {self.tls_port}",
                f"tls-cert-file {tls.cert}",
                f"tls-key-file {tls.key}",
                f"tls-ca-cert-file {tls.ca}",
                "tls-auth-clients no",
            ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, str(self.conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, decode_responses=True, socket_timeout=5, **kw)


class SentinelCluster:
    def __init__(
        self,
        directory: Path,
        password: str | None = None,
        sentinel_password: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.dir = directory
        self.password = password
        self.sentinel_password = sentinel_password
        self.tls = tls
        self.nodes: list[RedisServer] = []
        self.sentinels: list[SentinelProcess] = []

    def start(self) -> SentinelCluster:
        try:
            # A full sync starts at once instead of waiting 5 s for more replicas (Redis 7's diskless default).
            opts: tuple[str, ...] = ("--repl-diskless-sync-delay", "0")
            if self.password is not None:
                opts += ("--requirepass", self.password, "--masterauth", self.password)
            master = RedisServer(self._mkdir("node0"), *opts)
            self.nodes.append(master)
            for i in (1, 2):
                replica_of = ("--replicaof", "127.0.0.1", str(master.port))
                self.nodes.append(RedisServer(self._mkdir(f"node{i}"), *replica_of, *opts))
            self._wait_replicas_synced()  # before the Sentinels' first INFO, or they see the link down for 10 s
            for i in range(3):
                d = self._mkdir(f"sentinel{i}")
                self.sentinels.append(SentinelProcess(d, master.port, self.password, self.sentinel_password, self.tls))
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_replicas_synced(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes[1:]:
            with self.node_client(node) as c:
                while c.info("replication").get("master_link_status") != "up":
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"replica {node.port} did not sync with the master in {timeout}s")
                    time.sleep(0.02)

    def _mkdir(self, name: str) -> Path:
        d = self.dir / name
        d.mkdir()
        return d

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every live Sentinel sees two healthy replicas and the other live Sentinels."""
        deadline = time.monotonic() + timeout
        live = [s for s in self.sentinels if s.proc is not None]
        last = ""
        while time.monotonic() < deadline:
            try:
                ok = True
                for s in live:
                    with s.client() as c:
                        replicas = c.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
                        peers = c.execute_command("SENTINEL", "SENTINELS", MASTER_NAME)
                    healthy = [r for r in replicas if r["flags"] == "slave" and r["master-link-status"] == "ok"]
                    if len(healthy) < 2 or len(peers) < len(live) - 1:
                        ok = False
                        last = f"sentinel {s.port}: {len(healthy)} healthy replicas, {len(peers)} peers"
                        break
                if ok:
                    return
            except redis.RedisError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise TimeoutError(f"Sentinels not ready after {timeout}s: {last}")

    def stop(self) -> None:
        for p in [*self.sentinels, *self.nodes]:
            p.stop()

    # ------------------------------------------------------------------------ looking and acting

    def node_client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(port=node.port, password=self.password, decode_responses=True, socket_timeout=5)

    def role(self, node: RedisServer) -> str:
        with self.node_client(node) as c:
            return str(c.execute_command("ROLE")[0])

    def master(self) -> RedisServer:
        """The node whose ROLE says master right now."""
        masters = [n for n in self.nodes if n.proc is not None and self.role(n) == "master"]
        assert len(masters) == 1, f"expected one master, found {[n.port for n in masters]}"
        return masters[0]

    def failover(self, sentinel: int = 0) -> None:
        """``SENTINEL FAILOVER``: the Sentinel promotes a replica without asking the others."""
        with self.sentinels[sentinel].client() as c:
            assert c.execute_command("SENTINEL", "FAILOVER", MASTER_NAME) in ("OK", True)

    def url(self, *, extra_sentinels: tuple[tuple[str, int], ...] = (), db: int = 0, tls: bool = False) -> str:
        """The sentinel:// URL of this cluster (the Sentinels' TLS ports with ``tls``)."""
        ports = [s.tls_port if tls else s.port for s in self.sentinels]
        hosts = ",".join(f"{h}:{p}" for h, p in (*extra_sentinels, *(("127.0.0.1", p) for p in ports)))
        who = f":{self.password}@" if self.password is not None else ""
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password is not None else ""
        return f"sentinel://{who}{hosts}/{MASTER_NAME}/{db}{query}"
