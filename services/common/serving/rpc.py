"""What runs around every gRPC call of a mist server: the one error -> status table, the error mapping of servicer
methods, and wrapping a method handler (auth and metrics interceptors use it).

    STATUS_BY_ERROR: Mapping[type[MistError], grpc.StatusCode]     the one error -> status table (DESIGN.md)
    status_for(error) -> grpc.StatusCode                             walks the error's MRO through the table
    @handles_errors        on async servicer methods / async generators (all four call shapes): MistError ->
                           abort(mapped code, its message); anything else -> INTERNAL "internal error (incident
                           <id>)", traceback logged with the same id, no exception text sent to the client
    clip_details(message) -> str                  a status message that fits in HTTP/2 trailers
    wrap_handler(handler, around) -> handler      the same call shape, its behaviour run inside around(context)
    refusing_handler(like, code, message)         a handler of the same call shape that only aborts
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import grpc

from services.common import errors
from services.common.errors import MistError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- errors

# The one table from DESIGN.md ("Errors"). Subclasses a service defines map through their base class.
STATUS_BY_ERROR: Mapping[type[MistError], grpc.StatusCode] = MappingProxyType(
    {
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
    }
)
_MAX_DETAILS_CHARS = 1024  # status details travel in HTTP/2 trailers; keep them well under header limits

F = TypeVar("F", bound=Callable[..., Any])


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code of a domain error (INTERNAL for anything not in STATUS_BY_ERROR)."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
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
