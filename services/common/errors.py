"""Domain errors shared by every service, and the one table of their gRPC status codes (docs/reference/errors.md).

    raise NotFoundError(f"task {name!r} not found")   # a server answers NOT_FOUND; a client raises it back

Servers map an error to its status through `code` (serving/rpc.py); clients map a status back through
`error_for_code` (clients/channel.py). Nothing here imports grpc.
"""

from __future__ import annotations


class MistError(Exception):
    """Base class. `code` is the name of the grpc.StatusCode this error maps to."""

    code = "INTERNAL"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:  # a status no subclass names (CANCELLED, UNKNOWN...), as a client received it
            self.code = code


class NotFoundError(MistError):
    """Unknown backbone, task, version, alias or token."""

    code = "NOT_FOUND"


class AlreadyExistsError(MistError):
    """A task (or token name) that exists already and differs from the request."""

    code = "ALREADY_EXISTS"


class InvalidArgumentError(MistError, ValueError):
    """k out of range, bad codec, labels out of range, NaN/Inf weights, not safetensors, bad config."""

    code = "INVALID_ARGUMENT"


class FailedPreconditionError(MistError):
    """Weights that do not fit the task's edge network; features from another backbone."""

    code = "FAILED_PRECONDITION"


class AbortedError(MistError):
    """Lost a race: push on a stale parent version, alias compare-and-set lost."""

    code = "ABORTED"


class DataLossError(MistError):
    """Checksum mismatch or a payload that cannot be what its header claims."""

    code = "DATA_LOSS"


class ResourceExhaustedError(MistError):
    """Too many streams or items in flight, a message or image over its size limit, a registry whose database or
    disk is full (retrying elsewhere does not help a shared database: the operator must make room)."""

    code = "RESOURCE_EXHAUSTED"


class UnauthenticatedError(MistError):
    """Missing or unknown token."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(MistError):
    """A valid token without the scope or task this call needs."""

    code = "PERMISSION_DENIED"


class UnavailableError(MistError):
    """Server draining or a dependency down; clients retry elsewhere."""

    code = "UNAVAILABLE"


class DeadlineExceededError(MistError):
    """A call that waited too long: e.g. an Extract stream on which nothing moved for --stream-idle-timeout-s."""

    code = "DEADLINE_EXCEEDED"


# The one table: every status code a mist server answers with on purpose, and the error that carries it.
# A code missing here reaches a client as a plain MistError whose `code` names it.
ERRORS: tuple[type[MistError], ...] = (
    NotFoundError,
    AlreadyExistsError,
    InvalidArgumentError,
    FailedPreconditionError,
    AbortedError,
    DataLossError,
    ResourceExhaustedError,
    UnauthenticatedError,
    PermissionDeniedError,
    UnavailableError,
    DeadlineExceededError,
)
_BY_CODE: dict[str, type[MistError]] = {cls.code: cls for cls in ERRORS}


def error_for_code(code: str, message: str) -> MistError:
    """The domain error of a status code's name ("NOT_FOUND" -> NotFoundError(message))."""
    cls = _BY_CODE.get(code)
    return cls(message) if cls is not None else MistError(message, code=code)
