"""``--workers N``: a supervisor process and N event-loop worker processes sharing the listeners.

Theory of operation
-------------------
The supervisor serves no Redis client. It starts N workers, each ``python -m brokerproxy`` with the same command
line (so the same file, environment and flags) plus a hidden ``--_worker-channel INDEX:FD``. A worker is the proxy
exactly as it runs alone, with its own uvloop, except that it binds its listeners with ``SO_REUSEPORT`` (``workers``
> 1 in its config), so the kernel spreads new connections over the workers, and that it serves its metrics on a
private loopback port (``127.0.0.1:0``) instead of ``metrics_listen``.

The channel is one end of a socketpair each worker inherits. Once its listeners are up and its signal handlers
installed, the worker writes ``ready <metrics port>`` on it; then it only watches it: end of file means the
supervisor is gone (even by SIGKILL), and the worker drains and exits rather than outlive it. It also carries
``lost`` lines both ways: a worker that closed a client's connection with a transaction cut when Redis went tells the
supervisor, which tells the other workers, so that each closes that client's carried-over subscribers once Redis is
back (Server.reply_lost: a Celery worker's connections are spread over the proxy's workers). Workers run in sessions
of their own, so that a terminal's Ctrl-C reaches the supervisor alone, which forwards it once.

Lifecycle. Every worker must report ready within ``STARTUP_TIMEOUT``, or the supervisor stops the others and fails
(the worker's exit status says why: 2 configuration, else 3). Afterwards a worker that exits, for whatever reason, is
started again after a backoff that doubles with each exit in a row that came less than ``STABLE_SECONDS`` after its
start, from ``RESTART_BACKOFF_BASE`` up to ``RESTART_BACKOFF_MAX`` (systemd restarts after 100 ms by default; a
crash loop must not spin); each restart is counted. SIGHUP is forwarded to every worker (each reloads its users,
rules and certificates as a single process does; a worker still starting gets it when it reports ready). SIGTERM and
SIGINT are forwarded once to all, and the workers drain together, each within ``drain_timeout``; after that and
``DRAIN_GRACE`` more, what is left is killed. The outcome is ``clean`` when every worker exited 0. A second SIGINT is
forwarded too (the workers then exit at once) and the outcome is ``interrupted``.

Metrics. The supervisor serves ``/metrics``, ``/healthz``, ``/readyz``, ``/api/status`` and ``/`` on
``metrics_listen`` with the same ``HTTPEndpoints`` a single process uses. Before answering it scrapes the workers
(``refresh``: all at once, each bounded by ``SCRAPE_TIMEOUT``; concurrent requests share one scrape), and it also
scrapes them every ``status.SAMPLE_INTERVAL`` seconds for the status page's history and so that a worker's counters
are never older than that when it dies. How the expositions merge (sums, and the few series that are not summed;
the counters of exited workers kept) is ``aggregate.py``'s docstring. A worker that does not answer in time counts
with its previous scrape. ``/readyz`` is ready only when every worker runs and answers ready; the reason names the
first that is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest

from . import aggregate
from .aggregate import Families, MergedObserver
from .config import Config
from .endpoints import HTTPEndpoints
from .observe import Observer
from .status import SAMPLE_INTERVAL, StatusBoard

log = logging.getLogger("brokerproxy.supervisor")

#: Seconds a worker may take from its start to reporting ready (importing, loading the config, building TLS
#: contexts, binding); then it is killed and counts as failed.
STARTUP_TIMEOUT: Final = 30.0
#: The first restart waits this long; each further exit in a row doubles it, up to the maximum.
RESTART_BACKOFF_BASE: Final = 0.1
RESTART_BACKOFF_MAX: Final = 30.0
#: A worker that ran this long before it exited starts its backoff over.
STABLE_SECONDS: Final = 30.0
#: Past ``drain_timeout``, the seconds the workers get to exit (each ends its own drain at drain_timeout) before
#: what is left is killed.
DRAIN_GRACE: Final = 5.0
#: Bound on one scrape of one worker; Prometheus's default scrape timeout is 10 s, and the merge must fit in it.
SCRAPE_TIMEOUT: Final = 2.0
#: Largest answer read from a worker's endpoint (thousands of series are a few MiB).
MAX_SCRAPE_BYTES: Final = 64 * 1024 * 1024
#: Where the workers serve their own endpoints.
WORKER_METRICS_HOST: Final = "127.0.0.1"
#: The hidden flag that makes ``python -m brokerproxy`` a worker: ``--_worker-channel INDEX:FD``.
WORKER_FLAG: Final = "--_worker-channel"

Outcome = Literal["clean", "unclean", "start", "config", "interrupted"]

#: The longest line a worker sends after ``ready`` (a lost reply: host and user); longer ones are dropped.
MAX_CHANNEL_LINE: Final = 4096


def lost_line(host: str, user: str | None) -> bytes:
    """The channel line that tells of a reply lost to a client (Server.reply_lost), worker to supervisor to the
    other workers: a Celery worker's connections are spread over the proxy's workers by the kernel, so the one
    that lost the ack is rarely the one that holds the subscription to close."""
    return b"lost " + json.dumps([host, user]).encode() + b"\n"


def parse_lost_line(line: bytes) -> tuple[str, str | None] | None:
    """(host, user) of a ``lost`` line; None for anything else."""
    if not line.startswith(b"lost "):
        return None
    try:
        fields = json.loads(line[5:])
    except ValueError:
        return None
    if not isinstance(fields, list) or len(fields) != 2:
        return None
    host, user = fields
    if not isinstance(host, str) or not (user is None or isinstance(user, str)):
        return None
    return host, user


def restart_delay(failures: int) -> float:
    """Seconds before the restart that follows ``failures`` exits in a row (1 for the first)."""
    return float(min(RESTART_BACKOFF_BASE * 2 ** max(0, failures - 1), RESTART_BACKOFF_MAX))


def worker_command(argv: Sequence[str], index: int, fd: int) -> list[str]:
    """The command line of worker ``index``, whose channel is inherited as file descriptor ``fd``."""
    return [sys.executable, "-m", "brokerproxy", *argv, WORKER_FLAG, f"{index}:{fd}"]


class Worker:
    """One worker slot: the process that fills it now, and what the supervisor knows of it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: asyncio.StreamWriter | None = None
        #: starting, running, restarting (between an exit and the next start), stopped
        self.state = "starting"
        self.metrics_port = 0
        self.started_at = 0.0
        self.failures = 0  # exits in a row, each soon after its start (the backoff)
        self.families: Families | None = None  # its last /metrics
        self.ready: tuple[bool, str] = (False, "starting")
        self.clients: list[dict[str, Any]] = []  # its /api/status connections.clients
        self.hup_pending = False
        #: The exit status of the process that was running when the supervisor stopped (None: none was).
        self.final_code: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


@dataclass(frozen=True, slots=True)
class _Client:
    user: str | None
    listener: str


class GroupBoard(StatusBoard):
    """The status page of the group: history samples are taken by the supervisor right after each periodic scrape
    (``record``), not on the endpoint's own timer, so that every sample holds numbers of its own moment."""

    def sample(self) -> None:
        pass

    def record(self) -> None:
        super().sample()


async def http_get(host: str, port: int, path: str, timeout: float = SCRAPE_TIMEOUT) -> tuple[int, bytes]:
    """GET ``path`` (HTTP/1.1, Connection: close): (status, body). Raises OSError, TimeoutError or ValueError."""

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1"))
            data = b""
            while chunk := await reader.read(65536):
                data += chunk
                if len(data) > MAX_SCRAPE_BYTES:
                    raise ValueError(f"answer larger than {MAX_SCRAPE_BYTES} bytes")
            return data
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    data = await asyncio.wait_for(get(), timeout)
    head, sep, body = data.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError("not an HTTP response")
    return int(parts[1]), body


class Supervisor:
    """``await Supervisor(config, argv).run()``: start the workers, keep them running, drain them; the outcome."""

    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.workers = [Worker(i) for i in range(config.workers)]
        self.restarts = 0
        self.retired = aggregate.Retired()
        self.draining = False
        #: The merged exposition of the last scrape, and the same as an Observer (the status page's numbers).
        self.merged: Families = {}
        self.observer: Observer = MergedObserver()
        self.board: GroupBoard | None = None
        self._stop = asyncio.Event()
        self._stop_signal = signal.SIGTERM
        self._interrupted = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisors: list[asyncio.Task[None]] = []
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._endpoints: HTTPEndpoints | None = None
        self._own = CollectorRegistry()  # the supervisor's own process_* series
        ProcessCollector(registry=self._own)

    # ------------------------------------------------------------------------ lifecycle

    async def run(self) -> Outcome:
        self._install_signals()
        log.info("supervisor starting", extra={"workers": len(self.workers)})
        maddr = self.config.metrics_listen
        if maddr is not None:
            registry = CollectorRegistry()
            registry.register(aggregate.FamiliesCollector(lambda: self.merged))
            self.board = GroupBoard(self)
            self._endpoints = HTTPEndpoints(
                registry, self.ready, status=self.board, refresh=self.refresh, auth_token=self.config.metrics.auth_token
            )
            try:
                await self._endpoints.start(maddr.host, maddr.port)
            except OSError as exc:
                log.error("cannot listen", extra={"address": str(maddr), "error": str(exc)})
                return "start"
        started = await asyncio.gather(*(self._start(w) for w in self.workers))
        failed = next((w for w, ok in zip(self.workers, started, strict=True) if not ok), None)
        failed_code = failed.proc.returncode if failed is not None and failed.proc is not None else None
        if failed is not None and not self._stop.is_set():
            log.error("a worker did not start; stopping the others", extra={"worker": failed.index,
                                                                           "code": failed_code})  # fmt: skip
            self._request_stop(signal.SIGTERM, quiet=True)
        loop = asyncio.get_running_loop()
        for w in self.workers:
            self._supervisors.append(loop.create_task(self._supervise(w), name=f"supervise worker {w.index}"))
        if not self._stop.is_set():
            if self.board is not None:
                self._spawn(self._sample(), "scrape workers")
            log.info("workers started", extra={"workers": len(self.workers), "pids": [w.pid for w in self.workers]})
        await self._stop.wait()
        clean = await self._drain()
        if failed is not None:
            return "config" if failed_code == 2 else "start"
        if self._interrupted:
            return "interrupted"
        return "clean" if clean else "unclean"

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed", extra={"task": task.get_name(), "error": repr(task.exception())})

    async def _start(self, w: Worker) -> bool:
        """Start a process in slot ``w`` and wait for it to report ready. False if it exited, could not be started,
        or took longer than STARTUP_TIMEOUT (then it is killed)."""
        loop = asyncio.get_running_loop()
        w.state, w.ready, w.families, w.clients = "starting", (False, "starting"), None, []
        w.started_at = loop.time()
        parent, child = socket.socketpair()
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *worker_command(self.argv, w.index, child.fileno()),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(child.fileno(),), start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            log.error("cannot start a worker", extra={"worker": w.index, "error": str(exc)})
            parent.close()
            w.proc, w.state = None, "restarting"
            return False
        finally:
            child.close()
        reader, w.channel = await asyncio.open_connection(sock=parent)
        proc = w.proc
        line = asyncio.ensure_future(reader.readline())
        exited = asyncio.ensure_future(proc.wait())
        done, _ = await asyncio.wait({line, exited}, timeout=STARTUP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        for f in (line, exited):
            f.cancel()
        words = line.result().split() if line in done and not line.cancelled() else []
        if len(words) == 2 and words[0] == b"ready" and words[1].isdigit() and proc.returncode is None:
            w.metrics_port = int(words[1])
            w.state = "running"
            log.info("worker started", extra={"worker": w.index, "pid": proc.pid, "metrics_port": w.metrics_port})
            if self._stop.is_set():
                self._signal(w, self._stop_signal)
            elif w.hup_pending:
                self._signal(w, signal.SIGHUP)
            w.hup_pending = False
            self._spawn(self._relay(w, reader), f"relay {w.index}")
            return True
        if proc.returncode is None:
            log.error("worker did not report ready in time; killing it", extra={"worker": w.index, "pid": proc.pid})
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        w.state = "restarting"
        return False

    async def _relay(self, w: Worker, reader: asyncio.StreamReader) -> None:
        """Pass each lost reply worker ``w`` tells of to every other running worker, until its channel ends."""
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                with contextlib.suppress(asyncio.IncompleteReadError, OSError):
                    await reader.readexactly(exc.consumed)  # not a line of ours: skip it
                continue
            except (asyncio.IncompleteReadError, OSError):
                return
            lost = parse_lost_line(line[:-1]) if len(line) <= MAX_CHANNEL_LINE else None
            if lost is None:
                continue
            for other in self.workers:
                channel = other.channel
                if other is w or not other.running or channel is None or channel.is_closing():
                    continue
                # A worker that just died (its socket at EOF before its exit is seen) must not end this relay.
                with contextlib.suppress(RuntimeError, OSError):
                    channel.write(lost_line(*lost))

    async def _supervise(self, w: Worker) -> None:
        """Keep slot ``w`` filled until the supervisor stops."""
        loop = asyncio.get_running_loop()
        while True:
            proc = w.proc
            if proc is not None:
                code = await proc.wait()
                self._exited(w, code)
            if self._stop.is_set():
                return
            ran = loop.time() - w.started_at
            w.failures = w.failures + 1 if ran < STABLE_SECONDS else 1
            delay = restart_delay(w.failures)
            w.state = "restarting"
            log.error(
                "worker exited; restarting it",
                extra={"worker": w.index, "pid": proc.pid if proc else None, **_exit_fields(proc), "ran": round(ran, 3),
                       "restart_in": delay},
            )  # fmt: skip
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                return
            except TimeoutError:
                pass
            self.restarts += 1
            await self._start(w)

    def _exited(self, w: Worker, code: int) -> None:
        """A worker's process ended: keep its counters (aggregate.Retired), drop its gauges, close its channel."""
        w.state = "stopped" if self._stop.is_set() else "restarting"
        if self._stop.is_set():
            w.final_code = code
        if w.families is not None:
            self.retired.add(w.families)
            w.families = None
        w.ready, w.clients = (False, "not running"), []
        if w.channel is not None:
            w.channel.close()
            w.channel = None

    async def _drain(self) -> bool:
        """The workers were signalled: wait until every slot's supervising task has seen its process exit (a worker
        still starting is signalled once it reports ready), within drain_timeout + DRAIN_GRACE; then kill what is
        left. True when every process running at the stop exited 0 in time."""
        self.draining = True
        _, late = await asyncio.wait(self._supervisors, timeout=self.config.drain_timeout + DRAIN_GRACE)
        if late:
            alive = [w for w in self.workers if w.alive]
            log.warning("workers did not finish draining in time; killing them", extra={"workers": len(alive)})
            for w in alive:
                self._signal(w, signal.SIGKILL)
            await asyncio.wait(late)
        codes = {w.index: w.final_code for w in self.workers}
        clean = not late and all(code in (None, 0) for code in codes.values())
        for w in self.workers:
            if w.channel is not None:
                w.channel.close()
                w.channel = None
            w.state = "stopped"
        for task in list(self._tasks) + list(self._inflight.values()):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._endpoints is not None:
            await self._endpoints.close()
        log.info("stopped", extra={"clean": clean, "exit_codes": codes, "worker_restarts": self.restarts})
        return clean

    # ------------------------------------------------------------------------ signals

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._request_stop, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._request_stop, signal.SIGINT)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)

    def _request_stop(self, sig: signal.Signals, quiet: bool = False) -> None:
        if self._stop.is_set():
            if sig == signal.SIGINT:
                log.warning("second SIGINT: the workers exit at once")
                self._interrupted = True
                self._forward(signal.SIGINT)
            return
        if not quiet:
            log.info("shutdown requested; forwarding it to the workers", extra={"signal": sig.name})
        self.draining = True
        self._stop_signal = sig
        self._stop.set()
        self._forward(sig)

    def _sighup(self) -> None:
        log.info("reload requested; forwarding SIGHUP to the workers")
        self._forward(signal.SIGHUP)

    def _forward(self, sig: signal.Signals) -> None:
        """Signal every running worker; one still starting gets SIGHUP (or the stop) once it reports ready (before
        that, it has no handler and the signal would kill it)."""
        for w in self.workers:
            if w.running:
                self._signal(w, sig)
            elif sig == signal.SIGHUP and w.alive:
                w.hup_pending = True

    @staticmethod
    def _signal(w: Worker, sig: signal.Signals) -> None:
        if w.proc is not None and w.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(sig)

    # ------------------------------------------------------------------------ the endpoints' view

    def ready(self) -> tuple[bool, str]:
        """/readyz: every worker running and ready (as its last answer said)."""
        if self.draining:
            return False, "draining"
        for w in self.workers:
            if not w.running:
                return False, f"worker {w.index} is {w.state}"
            ok, reason = w.ready
            if not ok:
                return False, f"worker {w.index}: {reason}"
        return True, "ready"

    @property
    def open_connections(self) -> Iterable[_Client]:
        """The workers' client connections, as their last /api/status listed them (for the status page)."""
        out: list[_Client] = []
        for w in self.workers:
            for c in w.clients:
                user = c.get("user")
                client = _Client(user if isinstance(user, str) else None, str(c.get("listener", "main")))
                out.extend([client] * int(c.get("count", 0)))
        return out

    async def refresh(self, path: str) -> None:
        """Before the endpoint answers ``path``: scrape what it needs from the workers."""
        if path == "/metrics":
            await self._once("metrics", self._scrape_metrics)
        elif path == "/readyz":
            await self._once("ready", self._scrape_ready)
        elif path == "/api/status":
            await asyncio.gather(self._once("metrics", self._scrape_metrics), self._once("status", self._scrape_status))
            self.observer = aggregate.observer(self.merged)

    async def _once(self, key: str, scrape: Callable[[], Awaitable[None]]) -> None:
        """One scrape of a kind at a time: a request that comes while one runs waits for that one."""
        future = self._inflight.get(key)
        if future is None:
            future = self._inflight[key] = asyncio.ensure_future(scrape())
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        await asyncio.shield(future)

    async def _get_all(self, path: str) -> list[tuple[Worker, tuple[int, bytes] | BaseException]]:
        """GET ``path`` from every running worker at once. A worker that exited meanwhile is left out (its last
        scrape has been retired: a late answer must not count twice)."""
        live = [(w, w.proc) for w in self.workers if w.running and w.metrics_port]
        answers = await asyncio.gather(
            *(http_get(WORKER_METRICS_HOST, w.metrics_port, path) for w, _ in live), return_exceptions=True
        )
        return [(w, a) for (w, proc), a in zip(live, answers, strict=True) if w.proc is proc and w.running]

    async def _scrape_metrics(self) -> None:
        for w, answer in await self._get_all("/metrics"):
            if isinstance(answer, BaseException) or answer[0] != 200:
                why = repr(answer) if isinstance(answer, BaseException) else f"HTTP {answer[0]}"
                log.warning("worker metrics scrape failed; using its previous one", extra={"worker": w.index,
                                                                                          "error": why})  # fmt: skip
                continue
            try:
                w.families = aggregate.parse(answer[1].decode("utf-8"))
            except ValueError as exc:
                log.warning("worker metrics unreadable", extra={"worker": w.index, "error": str(exc)})
        self._merge()

    def _merge(self) -> None:
        own = aggregate.parse(generate_latest(self._own).decode("utf-8"))
        running = sum(1 for w in self.workers if w.running)
        supervisor = aggregate.merge([own, aggregate.supervisor_families(running, self.restarts)])
        sources = [w.families for w in self.workers if w.running and w.families is not None]
        self.merged = aggregate.exposition_families(sources, self.retired, supervisor)

    async def _scrape_ready(self) -> None:
        for w, answer in await self._get_all("/readyz"):
            if isinstance(answer, BaseException):
                w.ready = (False, f"does not answer ({type(answer).__name__})")
            else:
                w.ready = (answer[0] == 200, answer[1].decode("utf-8", "replace").strip())

    async def _scrape_status(self) -> None:
        for w, answer in await self._get_all("/api/status?history=0"):
            try:
                if isinstance(answer, BaseException):
                    raise answer
                if answer[0] != 200:
                    raise ValueError(f"HTTP {answer[0]}")
                data = json.loads(answer[1])
                upstream = data["upstream"]
                w.ready = (bool(upstream["ready"]), str(upstream["reason"]))
                w.clients = list(data["connections"]["clients"])
            except (OSError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                w.ready = (False, f"does not answer ({type(exc).__name__})")

    async def _sample(self) -> None:
        """Every SAMPLE_INTERVAL: scrape the workers (so that their counters are at most that old when one dies),
        and record a history sample for the status page."""
        while not self._stop.is_set():
            await self._once("metrics", self._scrape_metrics)
            self.observer = aggregate.observer(self.merged)
            if self.board is not None:
                self.board.record()
            try:
                await asyncio.wait_for(self._stop.wait(), SAMPLE_INTERVAL)
            except TimeoutError:
                pass


def _exit_fields(proc: asyncio.subprocess.Process | None) -> dict[str, Any]:
    code = proc.returncode if proc is not None else None
    if code is not None and code < 0:
        try:
            return {"signal": signal.Signals(-code).name}
        except ValueError:
            return {"signal": -code}
    return {"code": code}


__all__ = [
    "DRAIN_GRACE",
    "RESTART_BACKOFF_BASE",
    "RESTART_BACKOFF_MAX",
    "STARTUP_TIMEOUT",
    "WORKER_FLAG",
    "GroupBoard",
    "Outcome",
    "Supervisor",
    "Worker",
    "http_get",
    "restart_delay",
    "worker_command",
]
