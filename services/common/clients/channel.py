"""gRPC channels from every mist client to mist servers: TLS / mutual TLS, bearer tokens, size limits, keepalive and
automatic retries of idempotent calls on UNAVAILABLE (a draining or restarting replica).

    channel = create_channel("registry:50052", tls_ca="ca.pem", token=token)   # create_aio_channel: same arguments
    wait_for_ready(channel, timeout_s=10)                                       # TimeoutError if not connected
    stub = registry_pb2_grpc.RegistryStub(channel)
    with domain_errors("registry: "):                                           # NOT_FOUND -> NotFoundError, ...
        task = stub.GetTask(registry_pb2.GetTaskRequest(name="cats"))
    health_check("127.0.0.1:50051", timeout_s=2)   # "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"

TLS is on when tls=True or tls_ca / client_cert is given (tls_ca None: the system roots). The token goes as
`authorization: Bearer <token>`: call credentials over TLS, an interceptor in plaintext (gRPC refuses call
credentials there), with a warning beyond loopback. Only RETRIED_METHODS are retried, streams only until their
first response, so nothing is applied twice; retried_methods=() turns retries off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import DEFAULT_MAX_MESSAGE_BYTES
from services.common.errors import InvalidArgumentError, MistError, error_for_code

log = logging.getLogger(__name__)

# Idempotent calls, safe to send again when the first attempt met a draining or restarting server.
# Streams are retried only until the first response arrives (gRPC commits the call then), so a retried
# Extract/Predict/PullVersion never duplicates results. Never retried: CreateTask, PushVersion,
# DeleteVersion, SetAlias, DeleteAlias, CreateToken, RevokeToken, Tune (a replay could apply twice or
# turn a success into ABORTED).
RETRIED_METHODS: tuple[tuple[str, str], ...] = (
    ("grpc.health.v1.Health", "Check"),
    ("mist.v1.Extractor", "Describe"),
    ("mist.v1.Extractor", "Extract"),
    ("mist.v1.Registry", "GetTask"),
    ("mist.v1.Registry", "ListTasks"),
    ("mist.v1.Registry", "GetVersion"),
    ("mist.v1.Registry", "ListVersions"),
    ("mist.v1.Registry", "PullVersion"),
    ("mist.v1.Registry", "GetAlias"),
    ("mist.v1.Registry", "ListAliases"),
    ("mist.v1.Registry", "AliasHistory"),
    ("mist.v1.Tuner", "Predict"),
)


def domain_error(error: grpc.RpcError, prefix: str = "") -> MistError:
    """The domain error a refused call stands for (NOT_FOUND -> NotFoundError...), with the server's message
    after `prefix` (e.g. "registry: " where a line must say which server refused)."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = error.details() if callable(getattr(error, "details", None)) else None
    mapped = error_for_code(name, prefix + (details or name))
    mapped.__cause__ = error
    return mapped


@contextlib.contextmanager
def domain_errors(prefix: str = "") -> Iterator[None]:
    """Raise a refused call's domain error instead of grpc.RpcError: every mist client speaks errors.py's table."""
    try:
        yield
    except grpc.RpcError as error:
        raise domain_error(error, prefix) from error


def service_config_json(retried: Sequence[tuple[str, str]] = RETRIED_METHODS) -> str:
    """A gRPC service config: round-robin over resolved addresses, `retried` methods retried on UNAVAILABLE."""
    policy = {
        "maxAttempts": 4,  # the first try + 3 retries: 0.2 + 0.4 + 0.8 s (with jitter) spans a pod restart
        "initialBackoff": "0.2s",
        "maxBackoff": "5s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": service, "method": method} for service, method in retried]
    # round_robin: a DNS name of a headless Service resolves to every replica; spread calls over all of them
    # (the default pick_first would pin a client to one pod).
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if names:
        config["methodConfig"] = [{"name": names, "retryPolicy": policy}]
    return json.dumps(config)


MAX_RECONNECT_BACKOFF_MS = 10_000


def _channel_options(
    max_message_bytes: int,
    keepalive_time_s: float,
    keepalive_timeout_s: float,
    retried: Sequence[tuple[str, str]],
    server_name: str | None,
) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        # Same limits as the servers' default, both ways (gRPC's own default receive limit is 4 MiB).
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Ping so a dead link (NAT timeout, Wi-Fi roaming) fails calls quickly instead of hanging them;
        # servers accept pings every 10 s or slower.
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging idle channels (the default stops after 2)
        # gRPC's reconnect backoff grows to 120 s: a device whose registry was away a few minutes would then learn
        # of its return up to two minutes late, whatever its own retry loop does. 10 s bounds that.
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.enable_retries", int(bool(retried))),
        ("grpc.service_config", service_config_json(retried)),
    ]
    if server_name:  # the name on the server's certificate when it differs from the target host
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidArgumentError(f"{what}: cannot read {str(path)!r}: {e.strerror}") from None


def _tls_credentials(
    tls_ca: str | Path | None, client_cert: str | Path | None, client_key: str | Path | None
) -> grpc.ChannelCredentials:
    if (client_cert is None) != (client_key is None):
        raise InvalidArgumentError("client_cert and client_key go together (mutual TLS needs both)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca, "tls_ca"),
        private_key=_read(client_key, "client_key"),
        certificate_chain=_read(client_cert, "client_cert"),
    )


def _is_loopback(target: str) -> bool:
    host = target.split("://", 1)[-1].rpartition(":")[0].strip("[]") or target
    if host == "localhost" or target.startswith("unix:"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- token metadata


def _bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call of a plaintext sync channel."""

    def __init__(self, token: str) -> None:
        self._entry = _bearer(token)

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(d.metadata or ()), self._entry]
        return _CallDetails(
            d.method,
            d.timeout,
            metadata,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Callable, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Callable, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


class _AioTokenMixin:
    def __init__(self, token: str) -> None:
        self._entry = _bearer(token)

    async def _call(self, continuation: Callable, details: Any, request: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._entry)
        return await continuation(details._replace(metadata=metadata), request)


# grpc.aio sorts interceptors by their first matching base class, so each call shape needs its own class.
class _AioTokenUnaryUnary(_AioTokenMixin, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable, client_call_details: Any, request: Any) -> Any:
        return await self._call(continuation, client_call_details, request)


class _AioTokenUnaryStream(_AioTokenMixin, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable, client_call_details: Any, request: Any) -> Any:
        return await self._call(continuation, client_call_details, request)


class _AioTokenStreamUnary(_AioTokenMixin, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._call(continuation, client_call_details, request_iterator)


class _AioTokenStreamStream(_AioTokenMixin, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._call(continuation, client_call_details, request_iterator)


# ---------------------------------------------------------------------------------------------- channels


def _plan(
    target: str,
    tls: bool,
    tls_ca: str | Path | None,
    client_cert: str | Path | None,
    client_key: str | Path | None,
    token: str | None,
) -> grpc.ChannelCredentials | None:
    """Channel credentials (None: plaintext). A token rides on TLS credentials when there are any."""
    if token is not None and not token.strip():
        raise InvalidArgumentError("token is empty")
    if not (tls or tls_ca is not None or client_cert is not None or client_key is not None):
        if token is not None and not _is_loopback(target):
            log.warning("sending a bearer token without TLS to %s; anyone on the path can read it", target)
        return None
    credentials = _tls_credentials(tls_ca, client_cert, client_key)
    if token is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return credentials


def create_channel(
    target: str,
    *,
    tls: bool = False,
    tls_ca: str | Path | None = None,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
    token: str | None = None,
    server_name: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_s: float = 30.0,
    keepalive_timeout_s: float = 10.0,
    retried_methods: Sequence[tuple[str, str]] = RETRIED_METHODS,
) -> grpc.Channel:
    """A blocking-API channel to a mist server (see the module docstring for the arguments)."""
    credentials = _plan(target, tls, tls_ca, client_cert, client_key, token)
    options = _channel_options(max_message_bytes, keepalive_time_s, keepalive_timeout_s, retried_methods, server_name)
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=options)
    channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _TokenInterceptor(token)) if token is not None else channel


def create_aio_channel(
    target: str,
    *,
    tls: bool = False,
    tls_ca: str | Path | None = None,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
    token: str | None = None,
    server_name: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_s: float = 30.0,
    keepalive_timeout_s: float = 10.0,
    retried_methods: Sequence[tuple[str, str]] = RETRIED_METHODS,
) -> grpc.aio.Channel:
    """The asyncio twin of create_channel (create it inside the event loop that uses it)."""
    credentials = _plan(target, tls, tls_ca, client_cert, client_key, token)
    options = _channel_options(max_message_bytes, keepalive_time_s, keepalive_timeout_s, retried_methods, server_name)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    interceptors = None
    if token is not None:
        interceptors = [
            cls(token)
            for cls in (_AioTokenUnaryUnary, _AioTokenUnaryStream, _AioTokenStreamUnary, _AioTokenStreamStream)
        ]
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def wait_for_ready(channel: grpc.Channel, timeout_s: float) -> None:
    """Block until the channel is connected; TimeoutError after `timeout_s`."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise TimeoutError(f"channel not ready after {timeout_s:g}s") from None


async def wait_for_ready_async(channel: grpc.aio.Channel, timeout_s: float) -> None:
    """Wait until the aio channel is connected; TimeoutError after `timeout_s`."""
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout_s)
    except asyncio.TimeoutError:
        raise TimeoutError(f"channel not ready after {timeout_s:g}s") from None


def _status_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def health_check(target: str, service: str = "", *, timeout_s: float = 5.0, **channel_kwargs: Any) -> str:
    """grpc.health.v1 Check of `service` ("" = whole server) -> status name; NOT_FOUND -> "SERVICE_UNKNOWN"."""
    with create_channel(target, **channel_kwargs) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return _status_name(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise


async def health_check_async(target: str, service: str = "", *, timeout_s: float = 5.0, **channel_kwargs: Any) -> str:
    """The asyncio twin of health_check."""
    async with create_aio_channel(target, **channel_kwargs) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return _status_name(response)
