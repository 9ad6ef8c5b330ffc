"""A tiny test-only gRPC service on top of services.common.serving.server, for the plumbing tests (in-process and as
a subprocess for the SIGTERM drain test). Messages are raw bytes, so no .proto is needed.

    python -m tests.helpers.plumbing_server --listen 127.0.0.1:0 --grace-s 5    # from the repository root

Methods of `mist.test.v1.Plumbing` (request -> response):
    Echo    (unary)          bytes -> the same bytes
    Sleep   (unary)          b"<seconds>" -> b"slept"
    Raise   (unary)          b"<MistError subclass name>" raises it; anything else raises a RuntimeError
                             whose text holds a fake secret (it must never reach the client)
    WhoAmI  (unary)          -> repr of current_principal()
    Flaky   (unary)          b"<key>:<n>" fails UNAVAILABLE for the first n calls with that key, then b"ok <attempt>"
    Count   (server stream)  b"<n>[:<ErrorName>]" -> b"0" .. b"<n-1>", then raises ErrorName if given
    Sum     (client stream)  items -> total length; an item b"raise:<ErrorName>" raises it
    Chat    (bidi stream)    echoes each item; b"raise:<ErrorName>" raises it
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import grpc
from prometheus_client import CollectorRegistry

from services.common import errors
from services.common.config import ServerConfig
from services.common.serving.auth import current_principal
from services.common.serving.rpc import handles_errors
from services.common.serving.server import ServiceSetup, run_service

SERVICE = "mist.test.v1.Plumbing"
FAKE_SECRET = "postgres://mist:hunter2@db"  # appears only in the RuntimeError that Raise throws
log = logging.getLogger("tests.helpers.plumbing_server")


def error_named(name: str) -> Exception:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.MistError):
        return cls(f"{name} raised on purpose")
    return RuntimeError(f"could not reach {FAKE_SECRET}")


class Plumbing:
    """Handlers of the test service; `flaky_attempts` counts Flaky calls per key."""

    def __init__(self) -> None:
        self.flaky_attempts: Counter[str] = Counter()

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def sleep(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(float(request))
        return b"slept"

    @handles_errors
    async def raise_(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise error_named(request.decode())

    async def who_am_i(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return repr(current_principal()).encode()

    @handles_errors
    async def flaky(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        key, _, failures = request.decode().partition(":")
        self.flaky_attempts[key] += 1
        if self.flaky_attempts[key] <= int(failures):
            raise errors.UnavailableError("flaky on purpose")
        return f"ok {self.flaky_attempts[key]}".encode()

    @handles_errors
    async def count(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        n, _, error = request.decode().partition(":")
        for i in range(int(n)):
            yield str(i).encode()
        if error:
            raise error_named(error)

    @handles_errors
    async def sum(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        total = 0
        async for item in requests:
            if item.startswith(b"raise:"):
                raise error_named(item[6:].decode())
            total += len(item)
        return str(total).encode()

    @handles_errors
    async def chat(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for item in requests:
            if item.startswith(b"raise:"):
                raise error_named(item[6:].decode())
            yield item


def add_plumbing(server: grpc.aio.Server, plumbing: Plumbing | None = None) -> Sequence[str]:
    """Register the test service (raw bytes in and out) and return its name."""
    p = plumbing or Plumbing()
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(p.echo),
        "Sleep": grpc.unary_unary_rpc_method_handler(p.sleep),
        "Raise": grpc.unary_unary_rpc_method_handler(p.raise_),
        "WhoAmI": grpc.unary_unary_rpc_method_handler(p.who_am_i),
        "Flaky": grpc.unary_unary_rpc_method_handler(p.flaky),
        "Count": grpc.unary_stream_rpc_method_handler(p.count),
        "Sum": grpc.stream_unary_rpc_method_handler(p.sum),
        "Chat": grpc.stream_stream_rpc_method_handler(p.chat),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    return [SERVICE]


async def build(config: ServerConfig, registry: CollectorRegistry) -> ServiceSetup:
    log.info("building the plumbing service")  # held back: the "listening on" line must come first

    async def on_shutdown() -> None:
        log.info("plumbing on_shutdown hook ran")

    return ServiceSetup(add_services=add_plumbing, on_shutdown=on_shutdown)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(ServerConfig, build, service_name="mist-plumbing", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
