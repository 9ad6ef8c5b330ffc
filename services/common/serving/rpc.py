"""What runs around every gRPC call of a mist server: domain errors turned into status codes, and wrapping a
method handler (the auth and metrics interceptors use it).

    @handles_errors
    async def GetTask(self, request, context): ...   # NotFoundError -> NOT_FOUND; a bug -> INTERNAL with an incident id
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from services.common.errors import MistError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- errors

_MAX_DETAILS_CHARS = 1024  # status details travel in HTTP/2 trailers; keep them well under header limits

F = TypeVar("F", bound=Callable[..., Any])


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code of a domain error (its `code`, from the table in errors.py); INTERNAL for anything else."""
    if isinstance(error, MistError):
        return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)
    return grpc.StatusCode.INTERNAL


def clip_details(message: str) -> str:
    """A status message cut to what fits in HTTP/2 trailers."""
    return message if len(message) <= _MAX_DETAILS_CHARS else message[: _MAX_DETAILS_CHARS - 3] + "..."


async def _abort_for(error: Exception, context: grpc.aio.ServicerContext, where: str) -> None:
    if isinstance(error, MistError):  # abort() raises, so a domain error stops here
        await context.abort(status_for(error), clip_details(str(error) or type(error).__name__))
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


def handler_kind(handler: grpc.RpcMethodHandler) -> str:
    return {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[(handler.request_streaming, handler.response_streaming)]


def wrap_handler(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour run inside `around(context)`, keeping its call shape."""
    kind = handler_kind(handler)
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


def refusing_handler(like: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same call shape that only aborts (requests stay undecoded bytes)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    factory = getattr(grpc, f"{handler_kind(like)}_rpc_method_handler")
    return factory(refuse)
