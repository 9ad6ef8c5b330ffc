"""Several serving processes on one address: `mist-extractor --workers N` runs this supervisor, which starts N workers
(each the normal server of server.py, sharing --listen through SO_REUSEPORT), restarts those that die and serves
one /metrics adding all of them up.

    config = load_config(ExtractorConfig, argv, prog="mist-extractor")
    if config.workers > 1:
        return supervise(config, build, service_name="mist-extractor")   # the process's exit code

Why SO_REUSEPORT and not a front end forwarding to back ends: no extra hop and no process that every byte crosses
(one Python process cannot feed an accelerator, which is why there are several). The kernel balances connections,
not calls: a long-lived channel stays on the worker it reached, so a client that must spread its load opens
several channels (grpc option `grpc.use_local_subchannel_pool`), or many clients do it by their numbers.

The supervisor prints the "<service> listening on" line once every worker is ready; each worker holds its own logs
until then. A worker that dies (whatever its exit) is restarted after a capped backoff; too many restarts in a
window (a crash loop) make the supervisor exit 1, so that Kubernetes restarts the pod. SIGTERM/SIGINT are forwarded
to the workers as SIGTERM (each drains as a single server does); the supervisor exits 0 once they have exited.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import multiprocess as prometheus_multiprocess

from services.common.config import ServerConfig, redacted, split_host_port
from services.common.logging_setup import configure_logging, hold_logs
from services.common.serving.metrics import BindError, metric_prefix, start_metrics_server
from services.common.serving.server import BuildFn, listening_line, serve

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- restart policy

RESTART_WINDOW_S = 60.0  # restarts counted over this window; a worker up this long starts a fresh backoff
MIN_RESTARTS_ALLOWED = 5  # more restarts than max(this, workers) within the window: a crash loop, exit 1
FIRST_BACKOFF_S = 0.5  # delay before a worker's first restart; doubles with each quick death of that worker...
MAX_BACKOFF_S = 10.0  # ...up to this
# After SIGTERM a worker drains for --grace-s; beyond grace_s + this it is killed (model teardown, log flush).
STOP_MARGIN_S = 15.0
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


class RestartPolicy:
    """When to restart a dead worker, and when restarts have become a crash loop."""

    def __init__(
        self,
        workers: int,
        *,
        window_s: float = RESTART_WINDOW_S,
        first_backoff_s: float = FIRST_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        self.window_s = window_s
        self.max_restarts = max(MIN_RESTARTS_ALLOWED, workers)
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s
        self._recent: collections.deque[float] = collections.deque()

    def backoff_s(self, quick_deaths: int) -> float:
        """Delay before restarting a worker that died `quick_deaths` times in a row within the window of its start."""
        return min(self._first_backoff_s * 2 ** max(quick_deaths - 1, 0), self._max_backoff_s)

    def record_restart(self, now: float) -> bool:
        """Count a restart at `now`; False when that makes more than max_restarts within window_s."""
        self._recent.append(now)
        while self._recent and self._recent[0] <= now - self.window_s:
            self._recent.popleft()
        return len(self._recent) <= self.max_restarts


# ---------------------------------------------------------------------------------------------- the worker side


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs (pickled to it): the server's config with the concrete port, and how to build."""

    config: ServerConfig
    build: BuildFn  # a module-level function: pickled by name, found again in the worker
    service_name: str
    index: int
    supervisor_pid: int


def _die_with_supervisor(supervisor_pid: int) -> None:
    """SIGTERM this process (a drain, then exit) when the supervisor dies, even by SIGKILL: no orphans."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    """A worker process's main: the normal server on the shared port; tells the supervisor when it is ready."""
    _die_with_supervisor(spec.supervisor_pid)
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only, which forwards it once

    def announce(port: int) -> str:
        conn.send(("ready", os.getpid()))
        with contextlib.suppress(EOFError, OSError):  # the supervisor is gone or stopping: go on anyway
            conn.recv()  # "go": the supervisor printed its "listening on" line
        host = split_host_port(spec.config.listen)[0]
        return f"{spec.service_name} worker {spec.index} (pid {os.getpid()}) serving on {host}:{port}"

    code = asyncio.run(
        serve(spec.config, spec.build, service_name=spec.service_name, reuse_port=True, announce=announce)
    )
    sys.exit(code)


# ---------------------------------------------------------------------------------------------- the supervisor side


def reserve_port(listen: str) -> socket.socket:
    """A socket bound to `listen` with SO_REUSEPORT and never listening: it holds the port (a concrete one for
    port 0) for the workers, while the kernel only hands connections to listening sockets. Raises BindError."""
    host, port = split_host_port(listen)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise BindError(f"cannot listen on {listen} (--listen / MIST_LISTEN): {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise BindError(
            f"cannot listen on {listen} (--listen / MIST_LISTEN): {e.strerror or e}; the workers share the port "
            f"through SO_REUSEPORT, which another program holding it does not allow"
        ) from None
    return sock


@dataclass
class _Worker:
    """One worker slot: its current process (None while waiting to restart) and its restart history."""

    index: int
    process: Any = None  # multiprocessing.Process (spawn context)
    conn: multiprocessing.connection.Connection | None = None
    started_at: float = 0.0
    ready: bool = False
    quick_deaths: int = 0  # deaths in a row, each within RESTART_WINDOW_S of the start
    restart_at: float | None = None


@dataclass
class _SupervisorMetrics:
    registry: CollectorRegistry
    alive: Gauge
    restarts: Counter


def _supervisor_metrics(service_name: str, multiproc_dir: str | None) -> _SupervisorMetrics:
    registry = CollectorRegistry()
    if multiproc_dir is not None:
        prometheus_multiprocess.MultiProcessCollector(registry, path=multiproc_dir)
    prefix = metric_prefix(service_name)
    alive = Gauge(f"{prefix}_workers_alive", "Worker processes running and serving (--workers)", registry=registry)
    restarts = Counter(
        f"{prefix}_worker_restarts", "Worker processes restarted after they died (any exit)", registry=registry
    )
    return _SupervisorMetrics(registry, alive, restarts)


@dataclass
class Supervisor:
    """Starts, watches, restarts and stops the workers of one server; `run()` returns the exit code."""

    config: ServerConfig
    build: BuildFn
    service_name: str
    workers: int
    _slots: list[_Worker] = field(default_factory=list)
    _signals: int = 0
    _multiproc_dir: str | None = None

    def __post_init__(self) -> None:
        # spawn, not fork: torch and gRPC threads do not survive a fork. spawn starts a fresh interpreter that
        # re-imports the parent's __main__ module (as __mp_main__) before calling run_worker, so what a launcher
        # module patches at import time (a benchmark does) applies in the workers too: keep spawn and a top-level
        # target for that reason.
        self._context = multiprocessing.get_context("spawn")
        self._policy = RestartPolicy(self.workers)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    # ---- signals

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1  # set_wakeup_fd has written a byte to _wake_w: the wait in the loop returns

    def _install_signals(self) -> Callable[[], None]:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous_fd = signal.set_wakeup_fd(self._wake_w)

        def restore() -> None:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _drain_wakeups(self) -> None:
        os.set_blocking(self._wake_r, False)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    # ---- workers

    def _spec(self, index: int, port: int) -> WorkerSpec:
        host = split_host_port(self.config.listen)[0]
        config = dataclasses.replace(self.config, listen=f"{host}:{port}", metrics_listen="off")
        return WorkerSpec(config, self.build, self.service_name, index, os.getpid())

    def _start_worker(self, slot: _Worker, port: int) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=run_worker,
            args=(self._spec(slot.index, port), theirs),
            name=f"{self.service_name}-worker-{slot.index}",
        )
        process.start()
        theirs.close()
        slot.process, slot.conn, slot.started_at, slot.ready, slot.restart_at = (
            process, ours, time.monotonic(), False, None,
        )  # fmt: skip

    def _reap(self, slot: _Worker) -> int | None:
        """Join a dead worker, drop its live gauges; returns its exit code."""
        process, slot.process = slot.process, None
        process.join()
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None
        if self._multiproc_dir is not None:
            prometheus_multiprocess.mark_process_dead(process.pid, self._multiproc_dir)
        slot.ready = False
        return process.exitcode

    def _running(self) -> list[_Worker]:
        return [slot for slot in self._slots if slot.process is not None]

    def _wait(self, timeout_s: float | None, *, readiness: bool = True) -> list[Any]:
        """What happened: a signal, workers exiting, and (`readiness`) workers saying "ready"."""
        objects: list[Any] = [self._wake_r]
        for slot in self._running():
            objects.append(slot.process.sentinel)
            if readiness and slot.conn is not None and not slot.ready:
                objects.append(slot.conn)
        return multiprocessing.connection.wait(objects, timeout_s)

    def _take_ready(self, ready: list[Any], *, go: bool) -> None:
        """Mark the workers whose "ready" arrived; `go` answers them at once (after the start: restarts)."""
        for slot in self._running():
            if slot.conn is None or slot.ready or slot.conn not in ready:
                continue
            try:
                slot.conn.recv()
            except (EOFError, OSError):  # it is exiting: its sentinel follows
                slot.conn.close()
                slot.conn = None
                continue
            slot.ready = True
            if go:
                with contextlib.suppress(OSError):
                    slot.conn.send("go")

    def _count_alive(self, metrics: _SupervisorMetrics) -> None:
        metrics.alive.set(sum(slot.ready for slot in self._running()))

    # ---- run

    def run(self) -> int:
        configure_logging(self.config.log_level, self.config.log_format)
        held = hold_logs()  # the "listening on" line comes first, once every worker is ready
        reservation = None
        restore_signals = self._install_signals()
        stop_metrics: Callable[[], None] = lambda: None  # noqa: E731
        try:
            try:
                reservation = reserve_port(self.config.listen)
                port = reservation.getsockname()[1]
                if self.config.metrics_listen not in ("", "off"):
                    self._multiproc_dir = tempfile.mkdtemp(prefix=f"{self.service_name}-metrics-")
                    # Read by prometheus-client when the workers (spawned after this) import it.
                    os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._multiproc_dir
                metrics = _supervisor_metrics(self.service_name, self._multiproc_dir)
                stop_metrics, metrics_port = start_metrics_server(self.config.metrics_listen, metrics.registry)
            except OSError as e:
                held.release()
                log.error("%s failed to start: %s", self.service_name, e)
                return 1
            log.info("starting %d workers on port %d", self.workers, port)
            self._slots = [_Worker(index) for index in range(self.workers)]
            for slot in self._slots:
                self._start_worker(slot, port)
            failed = self._wait_all_ready(held)
            if failed is not None:
                self._stop_all()
                return failed
            held.release(listening_line(self.service_name, self.config, port, metrics_port))
            log.info("effective config: %s", redacted(self.config))
            for slot in self._slots:
                with contextlib.suppress(OSError):
                    slot.conn.send("go")
            self._count_alive(metrics)
            code = self._watch(port, metrics)
            self._stop_all()
            log.info("%s stopped", self.service_name)
            return code
        finally:
            held.release()
            restore_signals()
            stop_metrics()
            if reservation is not None:
                reservation.close()
            if self._multiproc_dir is not None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
                shutil.rmtree(self._multiproc_dir, ignore_errors=True)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _wait_all_ready(self, held: Any) -> int | None:
        """Until every worker said "ready" (None); the exit code when a signal (0) or a worker's exit (1) came first."""
        while not all(slot.ready for slot in self._slots):
            ready = self._wait(None)
            self._drain_wakeups()
            if self._signals:
                held.release()
                log.info("stopped by a signal while the workers were starting")
                return 0
            self._take_ready(ready, go=False)
            for slot in self._running():
                if slot.process.sentinel in ready and not slot.ready:
                    pid, code = slot.process.pid, self._reap(slot)
                    held.release()
                    log.error(
                        "%s failed to start: worker %d (pid %d) exited with code %s before it was ready",
                        self.service_name, slot.index, pid, code,
                    )  # fmt: skip
                    return 1
        return None

    def _watch(self, port: int, metrics: _SupervisorMetrics) -> int:
        """Restart dead workers until a signal (exit code 0) or a crash loop (1)."""
        while True:
            now = time.monotonic()
            pending = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
            ready = self._wait(max(0.0, min(pending) - now) if pending else None)
            self._drain_wakeups()
            if self._signals:
                log.info("received a stop signal: draining %d workers", len(self._running()))
                return 0
            self._take_ready(ready, go=True)
            now = time.monotonic()
            for slot in self._running():
                if slot.process.sentinel not in ready:
                    continue
                pid, uptime_s, code = slot.process.pid, now - slot.started_at, self._reap(slot)
                slot.quick_deaths = slot.quick_deaths + 1 if uptime_s < self._policy.window_s else 1
                delay_s = self._policy.backoff_s(slot.quick_deaths)
                log.warning(
                    "worker %d (pid %d) exited (%s) after %.1fs; restarting it in %gs",
                    slot.index, pid, _exit_text(code), uptime_s, delay_s,
                )  # fmt: skip
                slot.restart_at = now + delay_s
            for slot in self._slots:
                if slot.restart_at is not None and slot.restart_at <= now:
                    if not self._policy.record_restart(now):
                        log.error(
                            "workers crash in a loop: more than %d restarts within %gs; exiting so that the pod "
                            "restarts", self._policy.max_restarts, self._policy.window_s,
                        )  # fmt: skip
                        return 1
                    metrics.restarts.inc()
                    self._start_worker(slot, port)
            self._count_alive(metrics)

    def _stop_all(self) -> None:
        """SIGTERM every worker (each drains), again on a second signal; SIGKILL those left after the grace."""
        handled = self._signals
        for slot in self._running():
            _signal(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_s + STOP_MARGIN_S
        while self._running():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for slot in self._running():
                    log.warning("worker %d (pid %d) still runs after the grace period: killing it", slot.index,
                                slot.process.pid)  # fmt: skip
                    _signal(slot.process.pid, signal.SIGKILL)
                    self._reap(slot)
                break
            ready = self._wait(remaining, readiness=False)
            self._drain_wakeups()
            if self._signals > handled:  # a second stop signal: the workers cancel in-flight calls now
                handled = self._signals
                for slot in self._running():
                    _signal(slot.process.pid, signal.SIGTERM)
            for slot in self._running():
                if slot.process.sentinel in ready:
                    self._reap(slot)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def supervise(config: ServerConfig, build: BuildFn, *, service_name: str, workers: int) -> int:
    """Run `workers` processes of the server `build` makes on config.listen; returns the process exit code."""
    if not hasattr(socket, "SO_REUSEPORT"):
        configure_logging(config.log_level, config.log_format)
        log.error("%s failed to start: --workers above 1 needs SO_REUSEPORT (Linux)", service_name)
        return 1
    return Supervisor(config, build, service_name, workers).run()
