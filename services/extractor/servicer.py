"""The Extractor gRPC servicer: thin. Each RPC is one call into ExtractionEngine; domain errors become status codes
through the shared table (`handles_errors`), so this file holds no logic of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc

from services.common.pb import extractor_pb2, extractor_pb2_grpc
from services.common.rpc import handles_errors
from services.extractor.engine import ExtractionEngine

SERVICE_NAME = extractor_pb2.DESCRIPTOR.services_by_name["Extractor"].full_name  # "mist.v1.Extractor"


class ExtractorServicer(extractor_pb2_grpc.ExtractorServicer):
    """Extract: one answer per image, in order (engine.run_stream); a stall on either side ends it after
    --stream-idle-timeout-s. Describe: the backbone and its costs."""

    def __init__(self, engine: ExtractionEngine) -> None:
        self._engine = engine

    @handles_errors
    async def Extract(self, request_iterator: AsyncIterator[extractor_pb2.ExtractRequest],
                      context: grpc.aio.ServicerContext) -> None:
        # Explicit writes (not a generator) so that an answer the client never reads times out like an idle read.
        # aclosing: when the call ends early, the engine releases the stream's slot and work now, not at GC.
        timeout = self._engine.idle_timeout_s
        async with contextlib.aclosing(self._engine.run_stream(request_iterator)) as responses:
            async for response in responses:
                try:
                    await asyncio.wait_for(context.write(response), timeout)
                except TimeoutError:
                    raise self._engine.idle_error("response") from None

    @handles_errors
    async def Describe(self, request: extractor_pb2.DescribeRequest,
                       context: grpc.aio.ServicerContext) -> extractor_pb2.BackboneInfo:
        return self._engine.describe()


def add_extractor(server: grpc.aio.Server, engine: ExtractionEngine) -> Sequence[str]:
    """Register the servicer on `server`; returns the service name (for health and reflection)."""
    extractor_pb2_grpc.add_ExtractorServicer_to_server(ExtractorServicer(engine), server)
    return [SERVICE_NAME]
