"""The gRPC server every mist service runs: one factory (TLS, auth, metrics, health, reflection, limits), graceful
drain on SIGTERM, and the body of each server's main().

    async def build(config: TunerConfig, registry: CollectorRegistry) -> ServiceSetup:
        servicer = TunerServicer(config, TunerMetrics(registry))

        def add_services(server: grpc.aio.Server) -> list[str]:
            tuner_pb2_grpc.add_TunerServicer_to_server(servicer, server)
            return [SERVICE_NAME]  # marked SERVING in grpc.health.v1

        return ServiceSetup(add_services=add_services)

    def main(argv=None) -> int:
        return run_service(TunerConfig, build, service_name="mist-tuner", argv=argv)  # flags/env, serve, exit code

The "<service> listening on HOST:PORT" line is always the first one logged. On SIGTERM/SIGINT every service turns
NOT_SERVING, new calls get UNAVAILABLE and those in flight get config.grace_s; then on_shutdown runs (after the
gRPC server stopped) and the exit code is 0. A second signal cancels in-flight calls at once. What runs around each
call lives in rpc.py (errors.py's domain errors -> status codes), auth.py (bearer tokens) and metrics.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from services.common.config import ConfigError, ServerConfig, load_config, redacted, split_host_port
from services.common.errors import MistError
from services.common.logging_setup import configure_logging, hold_logs
from services.common.serving.auth import AuthInterceptor, StaticTokenValidator, TokenValidator, load_tokens_file
from services.common.serving.metrics import (
    BindError,
    GrpcMetrics,
    metric_prefix,
    new_metrics_registry,
    start_metrics_server,
)
from services.common.serving.rpc import wrap_handler

log = logging.getLogger(__name__)
HEALTH_SERVICE = grpc_health.SERVICE_NAME

# ---------------------------------------------------------------------------------------------- drain + health


class _DrainGate(grpc.aio.ServerInterceptor):
    """Counts in-flight calls, refuses new ones while draining (UNAVAILABLE) or over the limit."""

    def __init__(self, max_concurrent_rpcs: int) -> None:
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._limit = max_concurrent_rpcs

    @contextlib.asynccontextmanager
    async def _admit(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica")
        if self._limit and self.in_flight >= self._limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self.in_flight} calls in flight (--max-concurrent-rpcs); retry later",
            )
        self.in_flight += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        # Health stays answerable while draining (it says NOT_SERVING) and is never refused as "busy".
        if handler is None or details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        return wrap_handler(handler, self._admit)


class HealthHandle:
    """The server's grpc.health.v1 state and its drain gate."""

    def __init__(self, servicer: grpc_health.aio.HealthServicer, gate: _DrainGate, services: Sequence[str]) -> None:
        self.servicer = servicer
        self.services = tuple(services)
        self._gate = gate

    async def set_serving(self, service: str, serving: bool) -> None:
        """Flip one service ("" = the whole server), e.g. while a dependency is down."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.servicer.set(service, status)

    async def begin_drain(self) -> None:
        """Every service NOT_SERVING for good; new calls (except health) fail with UNAVAILABLE."""
        self._gate.draining = True
        await self.servicer.enter_graceful_shutdown()

    @property
    def draining(self) -> bool:
        return self._gate.draining

    @property
    def in_flight(self) -> int:
        return self._gate.in_flight

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call (except health) is in flight; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._gate.idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


# Calls whose handler returned may still be sending their status; give them this long in server.stop().
_STATUS_FLUSH_S = 1.0


async def shutdown(
    server: grpc.aio.Server,
    health: HealthHandle,
    grace_s: float,
    force: asyncio.Event | None = None,
    on_drain: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Drain: NOT_SERVING, refuse new calls, `on_drain` (ends calls that never end by themselves), wait up to
    grace_s (or until `force` is set) for in-flight ones."""
    await health.begin_drain()
    if on_drain is not None:
        await on_drain()
    waiters = [asyncio.ensure_future(health.wait_idle(grace_s))]
    if force is not None:
        waiters.append(asyncio.ensure_future(force.wait()))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    if health.in_flight:
        log.warning("cancelling %d call(s) still in flight after the grace period", health.in_flight)
    # Health Watch streams never end by themselves, so stop() gets a short grace, not the whole grace_s.
    await server.stop(_STATUS_FLUSH_S if not health.in_flight else 0)


# ---------------------------------------------------------------------------------------------- the factory


def server_options(config: ServerConfig, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """Every channel argument of a mist server, in one place; `reuse_port` for the workers of a supervisor."""
    options = [
        # Explicit limits both ways instead of gRPC's 4 MiB receive / unlimited send (see ServerConfig).
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Ping idle connections: edge devices behind NAT disappear without a FIN; a dead peer is found
        # within keepalive_time + keepalive_timeout and its streams are released.
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        # ...also when no call is open: devices keep a channel between jobs.
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept client pings every 10 s even without data (our clients ping every 30 s); the 5 min
        # default would answer them with GOAWAY "too_many_pings" and drop the connection.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # HTTP/2 streams per connection: one device cannot take every handler slot.
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        # Linux grpc sets SO_REUSEPORT by default, so a second server on a busy port "binds" silently;
        # we want the clear bind error instead. A supervisor's workers share their port on purpose (the
        # supervisor checked it is free), and the kernel spreads connections over them (supervisor.py).
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    if config.max_connection_age_s > 0:
        # Recycle connections so clients of a headless Service re-resolve and reach new replicas.
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000)),
        ]
    return options


def _read_pem(field: str, path: str, marker: bytes) -> bytes:
    """File bytes, checked for a PEM block up front: grpc would only fail later with a vague bind error."""
    data = Path(path).read_bytes()
    if b"-----BEGIN " not in data or marker not in data:
        raise ConfigError(field, f"{path!r} holds no PEM {marker.decode().strip('-')} block")
    return data


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    cert = _read_pem("tls_cert", config.tls_cert, b"CERTIFICATE-----")
    key = _read_pem("tls_key", config.tls_key, b"PRIVATE KEY-----")
    client_ca = _read_pem("tls_client_ca", config.tls_client_ca, b"CERTIFICATE-----") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    try:
        if config.tls_cert:
            port = server.add_secure_port(config.listen, _server_credentials(config))
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError:
        port = 0
    if port == 0:
        tls_hint = ", or --tls-cert and --tls-key are not a matching pair" if config.tls_cert else ""
        raise BindError(
            f"cannot listen on {config.listen} (--listen / MIST_LISTEN): address in use or not "
            f"available on this host{tls_hint}"
        )
    return port


async def create_server(
    config: ServerConfig,
    add_services: Callable[[grpc.aio.Server], Sequence[str]],
    *,
    token_validator: TokenValidator | None = None,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    metrics: GrpcMetrics | None = None,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int, HealthHandle]:
    """Build, bind and start a server: services + health + reflection, TLS/mTLS, auth, metrics, drain gate.

    Auth uses `token_validator`, else the tokens in `config.auth_tokens_file`, else is off. Interceptors run
    metrics (outermost, so refused calls are counted), drain gate, auth, then `extra_interceptors`. `reuse_port`:
    share the address with other processes (SO_REUSEPORT), as a supervisor's workers do.
    """
    if token_validator is None and config.auth_tokens_file:
        token_validator = StaticTokenValidator(load_tokens_file(config.auth_tokens_file))
    gate = _DrainGate(config.max_concurrent_rpcs)
    interceptors: list[grpc.aio.ServerInterceptor] = [metrics.interceptor] if metrics else []
    interceptors.append(gate)
    if token_validator is not None:
        interceptors.append(AuthInterceptor(token_validator))
    interceptors += extra_interceptors
    server = grpc.aio.server(interceptors=interceptors, options=server_options(config, reuse_port=reuse_port))
    names = list(add_services(server))
    servicer = grpc_health.aio.HealthServicer()  # "" (the whole server) starts SERVING
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in names:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    port = _bind(server, config)
    await server.start()
    return server, port, HealthHandle(servicer, gate, names)


# ---------------------------------------------------------------------------------------------- serve / main


@dataclass
class ServiceSetup:
    """What a service's build() hands to serve()."""

    add_services: Callable[[grpc.aio.Server], Sequence[str]]  # registers servicers, returns their full names
    token_validator: TokenValidator | None = None  # None: the tokens file (or no auth)
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    on_shutdown: Callable[[], Awaitable[None]] | None = None  # after the gRPC server stopped (batcher, DB)
    on_drain: Callable[[], Awaitable[None]] | None = None  # when draining starts: end endless streams (watchers)


BuildFn = Callable[[Any, CollectorRegistry], Awaitable[ServiceSetup]]


def _install_signal_handlers(stop: asyncio.Event, force: asyncio.Event, grace_s: float) -> list[signal.Signals]:
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("second %s: cancelling in-flight calls now", sig.name)
            force.set()
        else:
            log.info("received %s: draining, in-flight calls get up to %gs", sig.name, grace_s)
            stop.set()

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread / not POSIX
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    return installed


@dataclass
class _Running:
    setup: ServiceSetup
    server: grpc.aio.Server
    port: int
    health: HealthHandle
    stop_metrics: Callable[[], None]
    metrics_port: int | None


async def _start(config: ServerConfig, build: BuildFn, service_name: str, reuse_port: bool) -> _Running:
    registry = new_metrics_registry()
    setup = await build(config, registry)
    server = None
    try:
        server, port, health = await create_server(
            config,
            setup.add_services,
            token_validator=setup.token_validator,
            extra_interceptors=setup.extra_interceptors,
            metrics=GrpcMetrics(registry, metric_prefix(service_name)),
            reuse_port=reuse_port,
        )
        stop_metrics, metrics_port = start_metrics_server(config.metrics_listen, registry)
    except BaseException:  # release what build() acquired (a model, a DB pool) before failing
        if server is not None:
            await server.stop(0)
        if setup.on_shutdown is not None:
            await setup.on_shutdown()
        raise
    return _Running(setup, server, port, health, stop_metrics, metrics_port)


def listening_line(service_name: str, config: ServerConfig, port: int, metrics_port: int | None) -> str:
    """The first log line of a server: "<service> listening on HOST:PORT (metrics on HOST:PORT)" or "(metrics off)"."""
    where = f"{split_host_port(config.listen)[0]}:{port}"
    if metrics_port is None:
        return f"{service_name} listening on {where} (metrics off)"
    return (
        f"{service_name} listening on {where} (metrics on {split_host_port(config.metrics_listen)[0]}:{metrics_port})"
    )


async def serve(
    config: ServerConfig,
    build: BuildFn,
    *,
    service_name: str,
    stop_event: asyncio.Event | None = None,
    reuse_port: bool = False,
    announce: Callable[[int], str] | None = None,
) -> int:
    """Run a service until SIGTERM/SIGINT (or `stop_event`), then drain; returns the process exit code.

    A supervisor's worker passes `reuse_port` and `announce`: called (on a thread) with the bound port once the
    server runs, it returns the worker's first log line, after the supervisor printed its own "listening on" line.
    """
    configure_logging(config.log_level, config.log_format)
    held = hold_logs()  # build() may log; the "listening on" line must still come first
    try:
        running = await _start(config, build, service_name, reuse_port)
    except (MistError, OSError) as e:
        held.release()
        log.error("%s failed to start: %s", service_name, e)
        return 1
    except BaseException:
        held.release()
        raise
    if announce is not None:
        first_line = await asyncio.to_thread(announce, running.port)
    else:
        first_line = listening_line(service_name, config, running.port, running.metrics_port)
    held.release(first_line, logger=__name__)
    log.info("effective config: %s", redacted(config))
    stop, force = stop_event or asyncio.Event(), asyncio.Event()
    installed = _install_signal_handlers(stop, force, config.grace_s)
    try:
        await stop.wait()
    finally:
        await shutdown(running.server, running.health, config.grace_s, force, running.setup.on_drain)
        try:
            if running.setup.on_shutdown is not None:
                await running.setup.on_shutdown()
        finally:
            running.stop_metrics()
            for sig in installed:
                asyncio.get_running_loop().remove_signal_handler(sig)
    # Let the RPC tasks server.stop() cancelled unwind now: asyncio.run would cancel them once more on exit
    # and grpc would print a bare CancelledError traceback to stderr (breaking JSON logs).
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=_STATUS_FLUSH_S)
    log.info("%s stopped", service_name)
    return 0


def run_service(
    config_cls: type[ServerConfig],
    build: BuildFn,
    *,
    service_name: str,
    argv: Sequence[str] | None = None,
    allowed_env: Collection[str] = (),
) -> int:
    """The body of a service's main(): config from flags/env (exit 2 on errors), serve, exit code.

    `allowed_env`: MIST_* variables the service reads itself (not reported as unknown).
    """
    config = load_config(config_cls, argv, prog=service_name, allowed_env=allowed_env)
    return asyncio.run(serve(config, build, service_name=service_name))
