"""Prometheus metrics every mist server exports: per-method gRPC calls, latency and calls in flight, on a registry
of the server's own (process, platform and GC metrics included), served over HTTP on its own port.

    registry = new_metrics_registry()
    metrics = GrpcMetrics(registry, metric_prefix("mist-registry"))   # mist_registry_grpc_requests_total{method,code}
    server, port, health = await create_server(config, add_services, metrics=metrics)
    stop, metrics_port = start_metrics_server("0.0.0.0:9102", registry)   # "" or "off": serves nothing, port None

A registry per server lets several servers share one process (tests do). An address that cannot be bound raises
BindError, which names the flag. Metrics are plain Counters, Histograms and Gauges with a `multiprocess_mode`, so
that the supervisor of several worker processes (supervisor.py) adds them up from prometheus-client's
multiprocess files: no custom Collector or `Gauge.set_function` here, their values would stay in each worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.config import split_host_port
from services.common.serving.rpc import wrap_handler


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
        self.requests = Counter(
            f"{prefix}_grpc_requests_total",
            "gRPC calls finished, by method and status code",
            ["method", "code"],
            registry=registry,
        )
        # Calls range from a health check (sub-ms) to a dataset extraction stream (minutes).
        self.duration = Histogram(
            f"{prefix}_grpc_request_duration_seconds",
            "gRPC call duration, whole stream",
            ["method"],
            registry=registry,
            buckets=(0.001, 0.005, 0.025, 0.1, 0.25, 1, 2.5, 10, 30, 120, 600),
        )
        # With several worker processes (supervisor.py) the exported value is the sum over the live ones.
        self.in_flight = Gauge(
            f"{prefix}_grpc_requests_in_flight",
            "gRPC calls being handled",
            ["method"],
            registry=registry,
            multiprocess_mode="livesum",
        )
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

        return wrap_handler(handler, measured)


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
        raise BindError(
            f"cannot serve metrics on {listen} (--metrics-listen / MIST_METRICS_LISTEN): {e.strerror or e}"
        ) from None

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return stop, httpd.server_port
