"""The Registry gRPC servicer: thin handlers that check the caller's scope, call the store and convert with serde.

Each handler runs the store in a worker thread; @handles_errors maps the store's domain errors to status codes (the
table in services/common/errors.py).

Auth (when the server runs with --auth on): StoreTokenValidator resolves every bearer token against the
store before a handler runs (unknown or missing: UNAUTHENTICATED, the same message whatever the call
names); handlers then check the principal's scope before touching the store (PERMISSION_DENIED), so a
refusal never says whether the task exists. The admin creates tasks and tokens; a per-task "read" token
gets, lists and pulls; "read_write" also pushes, moves aliases and deletes versions. Auth off: anyone
may do anything and lineage records "anonymous".
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import grpc

from services.common.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from services.common.pb import registry_pb2, registry_pb2_grpc
from services.common.serving.auth import current_principal
from services.common.serving.rpc import handles_errors
from services.registry import serde
from services.registry.config import MIN_CHUNK_SIZE_BYTES, RegistryConfig
from services.registry.metrics import RegistryMetrics
from services.registry.records import DeviceRecord, Principal, Task, Version, check_name
from services.registry.store import DEFAULT_STALE_AFTER_S, RegistryStore, max_blob_bytes
from services.registry.watch import AliasFeed

log = logging.getLogger(__name__)

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name
ANONYMOUS = "anonymous"


# ---- auth ----------------------------------------------------------------------------------------------


class StoreTokenValidator:
    """A TokenValidator for create_server: bearer token -> the store's Principal (admin or per-task)."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    async def __call__(self, token: str | None, method: str) -> Principal:
        if token is None:
            raise UnauthenticatedError("missing bearer token: send metadata 'authorization: Bearer <token>'")
        principal = await asyncio.to_thread(self._store.resolve_token, token)
        if principal is None:
            raise UnauthenticatedError("unknown or revoked bearer token")
        return principal


def _principal() -> Principal | None:
    principal = current_principal()
    # Only StoreTokenValidator is ever installed on this server, so a principal is always ours.
    return principal if isinstance(principal, Principal) else None


def authorize(task: str, *, write: bool) -> str:
    """The caller's name for lineage, or PermissionDeniedError when its token does not reach `task` so."""
    principal = _principal()
    if principal is None:
        return ANONYMOUS
    if principal.allows(task, write=write):
        return principal.name
    if principal.task != task:
        raise PermissionDeniedError(f"token {principal.name!r} is limited to task {principal.task!r}")
    raise PermissionDeniedError(
        f"token {principal.name!r} has read scope: pushes, alias moves and deletes need a read_write token"
    )


def device_name(requested: str) -> str:
    """The calling device's name: its token's name with auth on (a different name in the request is refused),
    the name it gives with auth off ("" when none: then it is in no partial rollout)."""
    principal = _principal()
    if principal is None or principal.scope == "admin":
        return check_name("device", requested) if requested else ""
    if requested and requested != principal.name:
        raise PermissionDeniedError(f"token {principal.name!r} belongs to device {principal.name!r}, not {requested!r}")
    return principal.name


def require_admin(action: str) -> str:
    principal = _principal()
    if principal is None:
        return ANONYMOUS
    if principal.scope != "admin":
        raise PermissionDeniedError(f"only the admin token may {action}")
    return principal.name


# ---- the servicer --------------------------------------------------------------------------------------


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    """Thin handlers over a RegistryStore; see the module docstring for the auth rules."""

    def __init__(
        self, store: RegistryStore, config: RegistryConfig, metrics: RegistryMetrics, feed: AliasFeed | None = None
    ) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics
        self._feed = feed if feed is not None else AliasFeed(store)

    # ---- tasks

    @handles_errors
    async def CreateTask(
        self, request: registry_pb2.CreateTaskRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.Task:
        created_by = require_admin("create tasks")
        definition = serde.task_from_proto(request.task)
        task = await asyncio.to_thread(self._store.create_task, definition, request.exist_ok)
        log.info(
            "task %r %s by %r", task.name, "created or found identical" if request.exist_ok else "created", created_by
        )
        return serde.task_to_proto(task)

    @handles_errors
    async def GetTask(
        self, request: registry_pb2.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.Task:
        authorize(request.name, write=False)
        return serde.task_to_proto(await asyncio.to_thread(self._store.get_task, request.name))

    @handles_errors
    async def ListTasks(
        self, request: registry_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListTasksResponse:
        principal = _principal()
        if principal is not None and principal.task is not None:  # a per-task token sees its own task only
            tasks = [] if request.page_token else [await asyncio.to_thread(self._store.get_task, principal.task)]
            return registry_pb2.ListTasksResponse(tasks=[serde.task_to_proto(t) for t in tasks])
        page = await asyncio.to_thread(self._store.list_tasks, request.page_size, request.page_token)
        return registry_pb2.ListTasksResponse(
            tasks=[serde.task_to_proto(t) for t in page.items], next_page_token=page.next_page_token
        )

    # ---- versions

    @handles_errors
    async def PushVersion(
        self, request_iterator: AsyncIterator[registry_pb2.PushVersionRequest], context: grpc.aio.ServicerContext
    ) -> registry_pb2.Version:
        with self._metrics.outcome(self._metrics.pushes):
            header, blob, pushed_by = await self._receive_push(request_iterator)
            # Nothing reached the store until here: a refused or abandoned upload stores nothing.
            version = await asyncio.to_thread(
                self._store.push_version, header.task, blob, pushed_by=pushed_by, **serde.push_arguments(header)
            )
        log.info(
            "task %r: version %d pushed by %r (%d bytes, parent %d)",
            version.task,
            version.number,
            pushed_by,
            version.size_bytes,
            version.parent_version,
        )
        return serde.version_to_proto(version)

    async def _receive_push(
        self, requests: AsyncIterator[registry_pb2.PushVersionRequest]
    ) -> tuple[registry_pb2.PushHeader, bytes, str]:
        """Reads the header, checks scope and size limits, then buffers the chunks (at most the limit)."""
        messages = requests.__aiter__()
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            raise InvalidArgumentError("empty push: the first message must be the PushHeader") from None
        if first.WhichOneof("part") != "header":
            raise InvalidArgumentError(
                "the first message of a push must be its PushHeader (task, parent_version, "
                "sha256), then the blob in chunks"
            )
        header = first.header
        pushed_by = authorize(header.task, write=True)
        if not header.sha256:
            raise InvalidArgumentError("the push header must declare the blob's sha256 (checked after the last chunk)")
        task = await asyncio.to_thread(self._store.get_task, header.task)
        limit = self._blob_limit(task)
        if header.size_bytes > limit:
            raise ResourceExhaustedError(
                f"a push of {header.size_bytes} bytes exceeds the limit of {limit} bytes for task {task.name!r}"
            )
        blob = bytearray()
        async for message in messages:
            if message.WhichOneof("part") != "chunk":
                raise InvalidArgumentError("a push carries one PushHeader, first; every later message is a chunk")
            self._metrics.pushed_bytes.inc(len(message.chunk))
            if len(blob) + len(message.chunk) > limit:
                raise ResourceExhaustedError(
                    f"the pushed blob exceeds the limit of {limit} bytes for task {task.name!r}; nothing was stored"
                )
            blob += message.chunk
        return header, bytes(blob), pushed_by

    def _blob_limit(self, task: Task) -> int:
        """The server's limit, or the most a blob of the task's shapes could be if that is smaller."""
        return min(self._config.max_blob_bytes, max_blob_bytes(task))

    @handles_errors
    async def PullVersion(
        self, request: registry_pb2.PullVersionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.PullVersionResponse]:
        with self._metrics.outcome(self._metrics.pulls):
            authorize(request.task, write=False)
            chunk_size = self._chunk_size(request.chunk_size)
            number, alias = serde.version_ref_from_proto(request.ref)
            version, task, blob = await asyncio.to_thread(
                self._load_pull, request.task, number, alias, request.have_sha256
            )
            header = registry_pb2.PullHeader(
                version=serde.version_to_proto(version), task=serde.task_to_proto(task), not_modified=blob is None
            )
            yield registry_pb2.PullVersionResponse(header=header)
            if blob is None:
                self._metrics.pulls_not_modified.inc()
                return
            view = memoryview(blob)
            for start in range(0, len(view), chunk_size):
                chunk = bytes(view[start : start + chunk_size])
                yield registry_pb2.PullVersionResponse(chunk=chunk)
                self._metrics.pulled_bytes.inc(len(chunk))

    def _chunk_size(self, requested: int) -> int:
        """0: the server's chunk size; other requests are clipped to [MIN_CHUNK_SIZE_BYTES, server's]."""
        if requested == 0:
            return self._config.chunk_size_bytes
        return max(MIN_CHUNK_SIZE_BYTES, min(requested, self._config.chunk_size_bytes))

    def _load_pull(
        self, task_name: str, number: int | None, alias: str | None, have_sha256: str
    ) -> tuple[Version, Task, bytes | None]:
        """In a worker thread: the version, its task, and its blob (None when the caller already has it)."""
        version = self._store.get_version(task_name, number=number, alias=alias)
        task = self._store.get_task(task_name)
        if have_sha256 and have_sha256.strip().lower() == version.sha256:
            return version, task, None
        return version, task, self._store.read_blob(task_name, version.number)

    @handles_errors
    async def GetVersion(
        self, request: registry_pb2.GetVersionRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.Version:
        authorize(request.task, write=False)
        number, alias = serde.version_ref_from_proto(request.ref)
        version = await asyncio.to_thread(self._store.get_version, request.task, number=number, alias=alias)
        return serde.version_to_proto(version)

    @handles_errors
    async def ListVersions(
        self, request: registry_pb2.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListVersionsResponse:
        authorize(request.task, write=False)
        page = await asyncio.to_thread(self._store.list_versions, request.task, request.page_size, request.page_token)
        return registry_pb2.ListVersionsResponse(
            versions=[serde.version_to_proto(v) for v in page.items], next_page_token=page.next_page_token
        )

    @handles_errors
    async def DeleteVersion(
        self, request: registry_pb2.DeleteVersionRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeleteVersionResponse:
        deleted_by = authorize(request.task, write=True)
        await asyncio.to_thread(self._store.delete_version, request.task, request.number, deleted_by=deleted_by)
        log.info("task %r: version %d deleted by %r", request.task, request.number, deleted_by)
        return registry_pb2.DeleteVersionResponse()

    # ---- aliases

    @handles_errors
    async def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.Alias:
        moved_by = authorize(request.task, write=True)
        expected = serde.expected_version(request.has_expected_version, request.expected_version)
        update = await asyncio.to_thread(
            functools.partial(self._store.set_alias, percent=request.percent),
            request.task, request.name, request.version, expected, moved_by,
        )  # fmt: skip
        alias = update.alias
        if update.moved:
            self._feed.poke()
            self._metrics.alias_moves.inc()
            staged = (
                f" (rollout of version {alias.rollout.version} at {alias.rollout.percent}%)" if alias.rollout else ""
            )
            log.info("task %r: alias %r -> version %d%s by %r", alias.task, alias.name, alias.version, staged, moved_by)
        return serde.alias_to_proto(alias)

    @handles_errors
    async def GetAlias(
        self, request: registry_pb2.GetAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.Alias:
        authorize(request.task, write=False)
        return serde.alias_to_proto(await asyncio.to_thread(self._store.get_alias, request.task, request.name))

    @handles_errors
    async def DeleteAlias(
        self, request: registry_pb2.DeleteAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeleteAliasResponse:
        moved_by = authorize(request.task, write=True)
        expected = serde.expected_version(request.has_expected_version, request.expected_version)
        await asyncio.to_thread(self._store.delete_alias, request.task, request.name, expected, moved_by)
        self._feed.poke()
        self._metrics.alias_moves.inc()
        log.info("task %r: alias %r deleted by %r", request.task, request.name, moved_by)
        return registry_pb2.DeleteAliasResponse()

    @handles_errors
    async def ListAliases(
        self, request: registry_pb2.ListAliasesRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListAliasesResponse:
        authorize(request.task, write=False)
        aliases = await asyncio.to_thread(self._store.list_aliases, request.task)
        return registry_pb2.ListAliasesResponse(aliases=[serde.alias_to_proto(a) for a in aliases])

    @handles_errors
    async def AliasHistory(
        self, request: registry_pb2.AliasHistoryRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.AliasHistoryResponse:
        authorize(request.task, write=False)
        moves = await asyncio.to_thread(self._store.alias_history, request.task, request.name or None, request.limit)
        return registry_pb2.AliasHistoryResponse(moves=[serde.alias_move_to_proto(m) for m in moves])

    # ---- watching and the fleet

    @handles_errors
    async def WatchAlias(
        self, request: registry_pb2.WatchAliasRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.AliasEvent]:
        authorize(request.task, write=False)
        device = device_name(request.device)
        check_name("task", request.task)
        check_name("alias", request.name)
        self._metrics.watches.inc()
        async for alias, current, pending in self._feed.watch(request.task, request.name, request.since_revision):
            self._metrics.watch_events.inc()
            yield serde.alias_event(alias, device, current=current, pending=pending)

    @handles_errors
    async def ReportDevice(
        self, request: registry_pb2.DeviceReport, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeviceReportResponse:
        authorize(request.task, write=False)
        device = device_name(request.device)
        if not device:
            raise InvalidArgumentError("a device report needs the device's name (auth off: the device field)")
        report = DeviceRecord(request.task, device, request.alias, request.version, request.rejected_version,
                              request.rejected_reason, request.agent, datetime.now(timezone.utc))  # fmt: skip
        await asyncio.to_thread(self._store.report_device, report)
        return registry_pb2.DeviceReportResponse(heartbeat_s=self._config.device_heartbeat_s)

    @handles_errors
    async def GetFleet(
        self, request: registry_pb2.GetFleetRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.Fleet:
        authorize(request.task, write=False)
        stale_after = timedelta(seconds=request.stale_after_s or DEFAULT_STALE_AFTER_S)
        devices, aliases = await asyncio.gather(
            asyncio.to_thread(self._store.devices, request.task),
            asyncio.to_thread(self._store.list_aliases, request.task),
        )
        now = datetime.now(timezone.utc)
        counts: dict[int, list[int]] = {}
        shown = []
        for device in devices:
            stale = now - device.reported_at > stale_after
            counts.setdefault(device.version, [0, 0])[stale] += 1
            shown.append(serde.device_to_proto(device, stale=stale))
        return registry_pb2.Fleet(
            task=request.task,
            versions=[
                registry_pb2.FleetVersion(version=v, devices=n[0], stale=n[1]) for v, n in sorted(counts.items())
            ],
            devices=shown,
            aliases=[serde.alias_to_proto(alias) for alias in aliases],
            watchers=self._feed.watchers_of(request.task),
        )

    # ---- tokens

    @handles_errors
    async def CreateToken(
        self, request: registry_pb2.CreateTokenRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.CreateTokenResponse:
        created_by = require_admin("create tokens")
        scope = serde.scope_from_proto(request.scope)
        secret = await asyncio.to_thread(self._store.create_token, request.name, request.task or None, scope)
        log.info("token %r (%s on task %r) created by %r", request.name, scope, request.task, created_by)
        return registry_pb2.CreateTokenResponse(name=request.name, token=secret)

    @handles_errors
    async def RevokeToken(
        self, request: registry_pb2.RevokeTokenRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RevokeTokenResponse:
        revoked_by = require_admin("revoke tokens")
        await asyncio.to_thread(self._store.revoke_token, request.name)
        log.info("token %r revoked by %r", request.name, revoked_by)
        return registry_pb2.RevokeTokenResponse()
