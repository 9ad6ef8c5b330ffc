"""gRPC server plumbing every mist service shares: one server factory, one error table, auth, metrics, drain.

Servicers stay thin: they call plain functions that raise MistError, and `@handles_errors` maps the error.

API summary (names are stable; the extractor, registry and tuner build on them):

    STATUS_BY_ERROR: Mapping[type[MistError], grpc.StatusCode]     the one error -> status table (DESIGN.md)
    status_for(error) -> grpc.StatusCode                             walks the error's MRO through the table
    @handles_errors        on async servicer methods / async generators (all four call shapes): MistError ->
                           abort(mapped code, its message); anything else -> INTERNAL "internal error (incident
                           <id>)", traceback logged with the same id, no exception text sent to the client
    current_principal() -> object | None    who is calling, inside a handler: None with auth off; a Principal
                           (name) with the tokens-file validator; whatever a custom token_validator returned
    Principal(name)        what the default validator returns
    TokenValidator = Callable[[str | None, str], object | Awaitable[object]]
                           (bearer token or None, full method "/pkg.Service/Method") -> principal; raise
                           UnauthenticatedError / PermissionDeniedError to refuse (health, reflection are exempt)
    StaticTokenValidator(tokens: Mapping[name, token]); load_tokens_file(path) -> dict[name, token]
    GrpcMetrics(registry, prefix)          <prefix>_grpc_requests_total{method,code},
                           <prefix>_grpc_request_duration_seconds{method}, <prefix>_grpc_requests_in_flight{method}
    new_metrics_registry() -> CollectorRegistry   own registry per server + process/platform/gc collectors
    start_metrics_server(listen, registry) -> (stop_fn, port | None)   "" / "off" -> (no-op, None)
    server_options(config) -> list[(name, value)]  every grpc channel arg of a server, each commented
    await create_server(config, add_services, *, token_validator=None, extra_interceptors=(), metrics=None)
        -> (grpc.aio.Server, bound port, HealthHandle)     started; add_services(server) returns service names
    HealthHandle           .set_serving(service, serving), .begin_drain(), .wait_idle(timeout_s), .in_flight
    await shutdown(server, health, grace_s)   NOT_SERVING, refuse new calls (UNAVAILABLE), let in-flight finish
    ServiceSetup(add_services, token_validator=None, extra_interceptors=(), on_shutdown=None)
    await serve(config, build, *, service_name, stop_event=None) -> exit code
        build(config, registry) -> Awaitable[ServiceSetup]; logs "<service_name> listening on HOST:PORT
        (metrics on HOST:PORT)" as the first line; SIGTERM/SIGINT drain within config.grace_s, then run
        on_shutdown (after the gRPC server stopped), exit 0; a second signal cancels in-flight calls at once
    run_service(config_cls, build, *, service_name, argv=None, allowed_env=()) -> int   the body of a main()
    BindError              an address that cannot be bound (names the flag)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import inspect
import logging
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import grpc
import prometheus_client
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common import errors
from services.common.config import ConfigError, ServerConfig, load_config, redacted, split_host_port
from services.common.errors import MistError
from services.common.logging_setup import configure_logging, hold_logs

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- errors

# The one table from DESIGN.md ("Errors"). Subclasses a service defines map through their base class.
STATUS_BY_ERROR: Mapping[type[MistError], grpc.StatusCode] = MappingProxyType({
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AbortedError: grpc.StatusCode.ABORTED,
    errors.DataLossError: grpc.StatusCode.DATA_LOSS,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    MistError: grpc.StatusCode.INTERNAL,
})
_MAX_DETAILS_CHARS = 1024  # status details travel in HTTP/2 trailers; keep them well under header limits
HEALTH_SERVICE = grpc_health.SERVICE_NAME
_AUTH_EXEMPT = (f"/{HEALTH_SERVICE}/", f"/{reflection.SERVICE_NAME}/", "/grpc.reflection.v1.ServerReflection/")

F = TypeVar("F", bound=Callable[..., Any])


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code of a domain error (INTERNAL for anything not in STATUS_BY_ERROR)."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def _clip(message: str) -> str:
    return message if len(message) <= _MAX_DETAILS_CHARS else message[: _MAX_DETAILS_CHARS - 3] + "..."


async def _abort_for(error: Exception, context: grpc.aio.ServicerContext, where: str) -> None:
    if isinstance(error, MistError):  # abort() raises, so a domain error stops here
        await context.abort(status_for(error), _clip(str(error) or type(error).__name__))
    incident = secrets.token_hex(4)
    log.error("unexpected error in %s (incident %s)", where, incident, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); the server log has details")


def handles_errors(fn: F) -> F:
    """Turn MistError into its status code and anything else into a leak-free INTERNAL, for aio handlers."""
    where = fn.__qualname__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            try:
                async for item in fn(*args, **kwargs):
                    yield item
            except grpc.aio.AbortError:
                raise  # the handler aborted with its own status
            except Exception as e:
                await _abort_for(e, args[-1], where)

        return stream_wrapper  # type: ignore[return-value]
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def call_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await _abort_for(e, args[-1], where)

        return call_wrapper  # type: ignore[return-value]
    raise TypeError(f"handles_errors wraps async functions or async generators, not {fn!r}")


# ---------------------------------------------------------------------------------------------- handler wrapping

Around = Callable[[grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager[None]]


def _handler_kind(handler: grpc.RpcMethodHandler) -> str:
    return {(False, False): "unary_unary", (False, True): "unary_stream",
            (True, False): "stream_unary", (True, True): "stream_stream"}[
        (handler.request_streaming, handler.response_streaming)]


def _wrap_handler(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour run inside `around(context)`, keeping its call shape."""
    kind = _handler_kind(handler)
    behavior = getattr(handler, kind)
    if inspect.isasyncgenfunction(behavior):

        async def wrapped_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with around(context):
                async for item in behavior(request, context):
                    yield item

        return handler._replace(**{kind: wrapped_stream})  # type: ignore[attr-defined]

    async def wrapped_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with around(context):
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

    return handler._replace(**{kind: wrapped_call})  # type: ignore[attr-defined]


def _refusing_handler(like: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same call shape that only aborts (requests stay undecoded bytes)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    factory = getattr(grpc, f"{_handler_kind(like)}_rpc_method_handler")
    return factory(refuse)


# ---------------------------------------------------------------------------------------------- auth

_principal: ContextVar[object | None] = ContextVar("mist_principal", default=None)
TokenValidator = Callable[[str | None, str], Any]
_BEARER = re.compile(r"^bearer\s+(\S+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's name from the tokens file (logs and lineage use it)."""

    name: str


def current_principal() -> object | None:
    """The caller of the RPC this handler serves (each RPC runs in its own task, so this never leaks)."""
    return _principal.get()


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry; None when absent."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            match = _BEARER.match(text.strip())
            if match is None:
                raise errors.UnauthenticatedError("malformed authorization metadata: expected 'Bearer <token>'")
            return match.group(1)
    return None


def load_tokens_file(path: str | Path) -> dict[str, str]:
    """`name:token` per line ('#' comments and blank lines skipped) -> {name: token}. Never echoes a token."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = (part.strip() for part in line.partition(":"))
        if not sep or not name or not token or any(c.isspace() for c in token):
            raise ConfigError("auth_tokens_file", f"line {number}: expected 'name:token' with a non-empty token")
        if name in tokens:
            raise ConfigError("auth_tokens_file", f"line {number}: duplicate name {name!r}")
        if token in tokens.values():
            raise ConfigError("auth_tokens_file", f"line {number}: token of {name!r} is used by another name")
        tokens[name] = token
    if not tokens:
        raise ConfigError("auth_tokens_file", f"{path}: no tokens (leave the flag empty to turn auth off)")
    return tokens


class StaticTokenValidator:
    """Checks a bearer token against a fixed {name: token} set in constant time."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = [(name, token.encode()) for name, token in tokens.items()]

    def __call__(self, token: str | None, method: str) -> Principal:
        if token is None:
            raise errors.UnauthenticatedError("missing bearer token: send metadata 'authorization: Bearer <token>'")
        given = token.encode()
        found = None
        for name, known in self._tokens:  # compare with every token so timing says nothing about which matched
            if hmac.compare_digest(given, known):
                found = name
        if found is None:
            raise errors.UnauthenticatedError("unknown or revoked bearer token")
        return Principal(found)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Validates bearer tokens; health and reflection stay open for probes and grpcurl."""

    def __init__(self, validator: TokenValidator) -> None:
        self._validator = validator

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_AUTH_EXEMPT):
            return handler
        try:
            principal = self._validator(bearer_token(details.invocation_metadata), details.method)
            if inspect.isawaitable(principal):
                principal = await principal
        except MistError as e:
            return _refusing_handler(handler, status_for(e), _clip(str(e)))
        except Exception as e:  # neither the message nor the traceback: they might quote the token
            log.error("token validator raised %s on %s", type(e).__name__, details.method)
            return _refusing_handler(handler, grpc.StatusCode.INTERNAL, "authentication failed: internal error")

        @contextlib.asynccontextmanager
        async def as_principal(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            _principal.set(principal)  # set in this RPC's own task; no reset needed
            yield

        return _wrap_handler(handler, as_principal)


# ---------------------------------------------------------------------------------------------- metrics


def _outcome(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return "OK" if error is None else "UNKNOWN"


class GrpcMetrics:
    """Per-method request counts by status code, latency histogram and in-flight gauge for one server."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.requests = Counter(f"{prefix}_grpc_requests_total", "gRPC calls finished, by method and status code",
                                ["method", "code"], registry=registry)
        # Calls range from a health check (sub-ms) to a dataset extraction stream (minutes).
        self.duration = Histogram(f"{prefix}_grpc_request_duration_seconds", "gRPC call duration, whole stream",
                                  ["method"], registry=registry,
                                  buckets=(0.001, 0.005, 0.025, 0.1, 0.25, 1, 2.5, 10, 30, 120, 600))
        self.in_flight = Gauge(f"{prefix}_grpc_requests_in_flight", "gRPC calls being handled",
                               ["method"], registry=registry)
        self.interceptor = _MetricsInterceptor(self)


class _MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: GrpcMetrics) -> None:
        self._m = metrics

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method, m = details.method, self._m

        @contextlib.asynccontextmanager
        async def measured(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            start, error = time.perf_counter(), None
            m.in_flight.labels(method).inc()
            try:
                yield
            except BaseException as e:
                error = e
                raise
            finally:
                m.in_flight.labels(method).dec()
                m.duration.labels(method).observe(time.perf_counter() - start)
                m.requests.labels(method, _outcome(context, error)).inc()

        return _wrap_handler(handler, measured)


def metric_prefix(service_name: str) -> str:
    """'mist-registry' -> 'mist_registry' (Prometheus names allow [a-zA-Z0-9_:])."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", service_name)


def new_metrics_registry() -> CollectorRegistry:
    """A registry of its own (so several servers fit in one process) with process, platform and GC metrics."""
    registry = CollectorRegistry()
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.PlatformCollector(registry=registry)
    prometheus_client.GCCollector(registry=registry)
    return registry


class BindError(OSError):
    """An address a server cannot listen on."""


def start_metrics_server(listen: str, registry: CollectorRegistry) -> tuple[Callable[[], None], int | None]:
    """Serve `registry` on http://listen/metrics; returns (stop, bound port). '' or 'off' serve nothing."""
    if listen in ("", "off"):
        return (lambda: None), None
    host, port = split_host_port(listen)
    try:
        httpd, thread = prometheus_client.start_http_server(port, addr=host.strip("[]"), registry=registry)
    except OSError as e:
        raise BindError(f"cannot serve metrics on {listen} (--metrics-listen / MIST_METRICS_LISTEN): "
                        f"{e.strerror or e}") from None

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return stop, httpd.server_port


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
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server busy: {self.in_flight} calls in flight (--max-concurrent-rpcs); retry later")
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
        return _wrap_handler(handler, self._admit)


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


async def shutdown(server: grpc.aio.Server, health: HealthHandle, grace_s: float,
                   force: asyncio.Event | None = None) -> None:
    """Drain: NOT_SERVING, refuse new calls, wait up to grace_s (or until `force` is set) for in-flight ones."""
    await health.begin_drain()
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


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Every channel argument of a mist server, in one place."""
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
        # we want the clear bind error instead.
        ("grpc.so_reuseport", 0),
    ]
    if config.max_connection_age_s > 0:
        # Recycle connections so clients of a headless Service re-resolve and reach new replicas.
        options += [("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000))]
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
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


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
        raise BindError(f"cannot listen on {config.listen} (--listen / MIST_LISTEN): address in use or not "
                        f"available on this host{tls_hint}")
    return port


async def create_server(
    config: ServerConfig,
    add_services: Callable[[grpc.aio.Server], Sequence[str]],
    *,
    token_validator: TokenValidator | None = None,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    metrics: GrpcMetrics | None = None,
) -> tuple[grpc.aio.Server, int, HealthHandle]:
    """Build, bind and start a server: services + health + reflection, TLS/mTLS, auth, metrics, drain gate.

    Auth uses `token_validator`, else the tokens in `config.auth_tokens_file`, else is off. Interceptors run
    metrics (outermost, so refused calls are counted), drain gate, auth, then `extra_interceptors`.
    """
    if token_validator is None and config.auth_tokens_file:
        token_validator = StaticTokenValidator(load_tokens_file(config.auth_tokens_file))
    gate = _DrainGate(config.max_concurrent_rpcs)
    interceptors: list[grpc.aio.ServerInterceptor] = [metrics.interceptor] if metrics else []
    interceptors.append(gate)
    if token_validator is not None:
        interceptors.append(AuthInterceptor(token_validator))
    interceptors += extra_interceptors
    server = grpc.aio.server(interceptors=interceptors, options=server_options(config))
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


async def _start(config: ServerConfig, build: BuildFn, service_name: str) -> _Running:
    registry = new_metrics_registry()
    setup = await build(config, registry)
    server = None
    try:
        server, port, health = await create_server(
            config, setup.add_services, token_validator=setup.token_validator,
            extra_interceptors=setup.extra_interceptors, metrics=GrpcMetrics(registry, metric_prefix(service_name)))
        stop_metrics, metrics_port = start_metrics_server(config.metrics_listen, registry)
    except BaseException:  # release what build() acquired (a model, a DB pool) before failing
        if server is not None:
            await server.stop(0)
        if setup.on_shutdown is not None:
            await setup.on_shutdown()
        raise
    return _Running(setup, server, port, health, stop_metrics, metrics_port)


def _listening_line(service_name: str, config: ServerConfig, running: _Running) -> str:
    where = f"{split_host_port(config.listen)[0]}:{running.port}"
    if running.metrics_port is None:
        return f"{service_name} listening on {where} (metrics off)"
    return f"{service_name} listening on {where} (metrics on {split_host_port(config.metrics_listen)[0]}:" \
           f"{running.metrics_port})"


async def serve(config: ServerConfig, build: BuildFn, *, service_name: str,
                stop_event: asyncio.Event | None = None) -> int:
    """Run a service until SIGTERM/SIGINT (or `stop_event`), then drain; returns the process exit code."""
    configure_logging(config.log_level, config.log_format)
    held = hold_logs()  # build() may log; the "listening on" line must still come first
    try:
        running = await _start(config, build, service_name)
    except (MistError, OSError) as e:
        held.release()
        log.error("%s failed to start: %s", service_name, e)
        return 1
    except BaseException:
        held.release()
        raise
    held.release(_listening_line(service_name, config, running), logger=__name__)
    log.info("effective config: %s", redacted(config))
    stop, force = stop_event or asyncio.Event(), asyncio.Event()
    installed = _install_signal_handlers(stop, force, config.grace_s)
    try:
        await stop.wait()
    finally:
        await shutdown(running.server, running.health, config.grace_s, force)
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


def run_service(config_cls: type[ServerConfig], build: BuildFn, *, service_name: str,
                argv: Sequence[str] | None = None, allowed_env: Collection[str] = ()) -> int:
    """The body of a service's main(): config from flags/env (exit 2 on errors), serve, exit code.

    `allowed_env`: MIST_* variables the service reads itself (not reported as unknown).
    """
    config = load_config(config_cls, argv, prog=service_name, allowed_env=allowed_env)
    return asyncio.run(serve(config, build, service_name=service_name))
