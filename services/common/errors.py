"""Domain errors shared by every service.

Plain functions raise these; servicers turn them into gRPC status codes in one table
(`services.common.serving.rpc.STATUS_BY_ERROR`). Core modules never import grpc.
"""

from __future__ import annotations


class MistError(Exception):
    """Base class. `code` is the name of the grpc.StatusCode this error maps to."""

    code = "INTERNAL"


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
    """Too many streams or items in flight, a message or image over its size limit."""

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
