"""The Extractor gRPC servicer: thin. Each RPC is one call into ExtractionEngine; domain errors become status codes
through the shared table (`handles_errors`), so this file holds no logic of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc

from services.common.pb import extractor_pb2, extractor_pb2_grpc
from services.common.serving.rpc import handles_errors
from services.extractor.engine import ExtractionEngine

SERVICE_NAME = extractor_pb2.DESCRIPTOR.services_by_name["Extractor"].full_name  # "mist.v1.Extractor"


class ExtractorServicer(extractor_pb2_grpc.ExtractorServicer):
    """Extract: one answer per image, in order (engine.run_stream); a stall on either side ends it after
    --stream-idle-timeout-s. Describe: the backbone and its costs."""

    def __init__(self, engine: ExtractionEngine) -> None:
        self._engine = engine

    @handles_errors
    async def Extract(
        self, request_iterator: AsyncIterator[extractor_pb2.ExtractRequest], context: grpc.aio.ServicerContext
    ) -> None:
        # Explicit writes (not a generator) so that an answer the client never reads times out like an idle read.
        # aclosing: when the call ends early, the engine releases the stream's slot and work now, not at GC.
        timeout = self._engine.idle_timeout_s
        watchdog = _WriteWatchdog(timeout) if timeout else None
        try:
            async with contextlib.aclosing(self._engine.run_stream(request_iterator)) as responses:
                async for response in responses:
                    if watchdog is not None:
                        watchdog.writing()
                    await context.write(response)
                    if watchdog is not None:
                        watchdog.written()
        except asyncio.CancelledError:
            if watchdog is None or not watchdog.fired:
                raise  # the call itself was cancelled
            raise self._engine.idle_error("response") from None
        finally:
            if watchdog is not None:
                watchdog.close()

    @handles_errors
    async def Describe(
        self, request: extractor_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> extractor_pb2.BackboneInfo:
        return self._engine.describe()


def add_extractor(server: grpc.aio.Server, engine: ExtractionEngine) -> Sequence[str]:
    """Register the servicer on `server`; returns the service name (for health and reflection)."""
    extractor_pb2_grpc.add_ExtractorServicer_to_server(ExtractorServicer(engine), server)
    return [SERVICE_NAME]


class _WriteWatchdog:
    """Cancels the calling task when one write has waited `timeout_s` for the client to read.

    One timer per stream, re-armed only when it fires (a write costs two assignments, not a task per message as
    asyncio.wait_for would: measured 18 % fewer cache-hit answers per second with wait_for).
    """

    def __init__(self, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._timeout_s = timeout_s
        self._since: float | None = None  # when the pending write began; None between writes
        self.fired = False
        self._timer = self._loop.call_later(timeout_s, self._check)

    def writing(self) -> None:
        self._since = self._loop.time()

    def written(self) -> None:
        self._since = None

    def _check(self) -> None:
        waited = 0.0 if self._since is None else self._loop.time() - self._since
        if waited >= self._timeout_s and self._task is not None:
            self.fired = True
            self._task.cancel()
            return
        self._timer = self._loop.call_later(self._timeout_s - waited, self._check)

    def close(self) -> None:
        self._timer.cancel()
        if self.fired and self._task is not None:
            self._task.uncancel()  # the cancellation was ours and is handled: the call ends with its own status
