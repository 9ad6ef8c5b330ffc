"""Python client of the registry for the edge tuner, the CLI and scripts: tasks, chunked pushes, pulls that skip
weights the device already has (a local cache keyed by sha256), aliases with compare-and-set, rollback.

Returns the registry's records (services/registry/records.py: Task, Version, Alias, AliasMove), converted at this
boundary by services/registry/serde.py; no torch.

    with RegistryClient("127.0.0.1:50052", token=token, cache_dir="~/.cache/mist/registry") as registry:
        version = registry.push("cats", blob, parent_version=3, metrics={"val_accuracy": 0.91})
        pulled = registry.pull("cats", alias="production")   # .blob, .version, .task, .from_cache
        registry.set_alias("cats", "production", version.number, expected_version=3)
        registry.rollback_alias("cats", "production")

Errors: a refused call raises the domain error of its status code (errors.py: NotFoundError for NOT_FOUND, ...),
as do the checks made here (a pulled blob whose sha256 differs: DataLossError).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from services.common.clients.channel import create_channel, domain_errors
from services.common.config import DEFAULT_MAX_MESSAGE_BYTES
from services.common.errors import DataLossError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.files import write_atomically
from services.common.pb import registry_pb2, registry_pb2_grpc
from services.registry.records import Alias, AliasEvent, AliasMove, FleetView, Task, Version
from services.registry.serde import (
    alias_event_from_proto,
    alias_from_proto,
    alias_move_from_proto,
    fleet_from_proto,
    task_from_proto,
    task_to_proto,
    version_from_proto,
)

log = logging.getLogger(__name__)

TokenScopeName = Literal["read", "read_write"]
# 256 KiB per message: a 1 MiB edge network goes in 4 messages, far below every message-size limit.
DEFAULT_CHUNK_SIZE_BYTES = 256 * 1024
# Weights are ~1 MiB: the version in use and a few rollback candidates, cheap even in a device's memory.
DEFAULT_MAX_CACHED_BLOBS = 4
_SCOPES: Mapping[str, int] = {"read": registry_pb2.TOKEN_SCOPE_READ, "read_write": registry_pb2.TOKEN_SCOPE_READ_WRITE}
_REFS_FILE = "refs.json"


@dataclass(frozen=True)
class PulledVersion:
    """A pulled version: its metadata, its task and the verified safetensors bytes."""

    version: Version  # number, sha256, size, metrics, lineage, tags
    task: Task  # the task it belongs to (edge-network config, classes, latest_version)
    blob: bytes  # the safetensors weights; their sha256 equals version.sha256
    from_cache: bool  # True when the server answered not_modified and the bytes came from the local cache


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


class BlobCache:
    """Blobs by sha256 (in a directory, or in memory when directory is None), and the sha256 last pulled per
    reference ("cats@production"), which is what a pull offers as have_sha256.

    Reads re-hash the file, so a corrupted cache entry is dropped and downloaded again, never used. At most
    max_blobs blobs are kept; the least recently used go first.
    """

    def __init__(self, directory: str | Path | None = None, max_blobs: int = DEFAULT_MAX_CACHED_BLOBS) -> None:
        if max_blobs < 1:
            raise InvalidArgumentError(f"max_blobs must be at least 1, got {max_blobs}")
        self._dir = Path(directory).expanduser() if directory is not None else None
        self._max_blobs = max_blobs
        self._memory: dict[str, bytes] = {}  # used when there is no directory; insertion order = LRU order
        self._refs: dict[str, str] = {}
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._refs = self._load_refs()

    def _load_refs(self) -> dict[str, str]:
        try:
            refs = json.loads((self._dir / _REFS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # absent or damaged: only costs one full download per reference
        return (
            {k: v for k, v in refs.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(refs, dict)
            else {}
        )

    def _write_atomically(self, path: Path, data: bytes) -> None:
        write_atomically(path, data)  # a device may lose power mid-write: whole or absent

    def _path(self, sha256: str) -> Path:
        return self._dir / f"{sha256}.safetensors"

    def get(self, sha256: str) -> bytes | None:
        """The blob with this sha256, or None (absent or damaged)."""
        if self._dir is None:
            blob = self._memory.pop(sha256, None)
            if blob is not None:
                self._memory[sha256] = blob  # most recently used last
            return blob
        path = self._path(sha256)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        if _sha256(blob) != sha256:
            log.warning("cached blob %s is damaged; dropping it", path.name)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):  # a read-only cache still serves; eviction order is a nicety
            os.utime(path)  # the mtime orders eviction
        return blob

    def put(self, sha256: str, blob: bytes) -> None:
        if self._dir is None:
            self._memory.pop(sha256, None)
            self._memory[sha256] = bytes(blob)
            while len(self._memory) > self._max_blobs:
                self._memory.pop(next(iter(self._memory)))
            return
        self._write_atomically(self._path(sha256), bytes(blob))
        cached = sorted(self._dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        for stale in cached[: max(0, len(cached) - self._max_blobs)]:
            stale.unlink(missing_ok=True)

    def known(self, ref: str) -> str | None:
        """The sha256 last pulled for a reference, if any."""
        return self._refs.get(ref)

    def remember(self, ref: str, sha256: str) -> None:
        if self._refs.get(ref) == sha256:
            return
        self._refs[ref] = sha256
        if self._dir is not None:
            self._write_atomically(self._dir / _REFS_FILE, json.dumps(self._refs, sort_keys=True).encode())


def _version_ref(version: int | None, alias: str | None) -> tuple[registry_pb2.VersionRef, str]:
    """The VersionRef and the cache key suffix for "version N", "alias A" or (neither) "latest"."""
    if version is not None and alias is not None:
        raise InvalidArgumentError("give a version number or an alias, not both")
    if version is not None:
        return registry_pb2.VersionRef(number=version), f"#{version}"
    if alias is not None:
        return registry_pb2.VersionRef(alias=alias), f"@{alias}"
    return registry_pb2.VersionRef(latest=True), "@latest"


class AliasWatch:
    """An open WatchAlias stream (RegistryClient.watch_alias): an iterator of AliasEvents with cancel()."""

    def __init__(self, task: str, name: str, call: Any, error_prefix: str) -> None:
        self.task, self.name = task, name
        self._call = call
        self._error_prefix = error_prefix

    def __iter__(self) -> Iterator[AliasEvent]:
        with domain_errors(self._error_prefix):
            for message in self._call:
                yield alias_event_from_proto(self.task, self.name, message)

    def cancel(self) -> None:
        self._call.cancel()


class RegistryClient:
    """A blocking client of one registry (see the module docstring); close() it, or use it in a `with`."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        server_name: str | None = None,
        cache_dir: str | Path | None = None,
        max_cached_blobs: int = DEFAULT_MAX_CACHED_BLOBS,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
        timeout_s: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        error_prefix: str = "",
    ) -> None:
        if not 1 <= chunk_size_bytes <= max_message_bytes - 1024:
            raise InvalidArgumentError(
                f"chunk_size_bytes must be in [1, {max_message_bytes - 1024}], got {chunk_size_bytes}"
            )
        self._channel = create_channel(
            target,
            tls=tls,
            tls_ca=tls_ca,
            client_cert=client_cert,
            client_key=client_key,
            token=token,
            server_name=server_name,
            max_message_bytes=max_message_bytes,
        )
        self._registry = registry_pb2_grpc.RegistryStub(self._channel)
        self._closed = False
        self._cache = BlobCache(cache_dir, max_cached_blobs)
        self._chunk_size = chunk_size_bytes
        self._timeout_s = timeout_s
        self._error_prefix = error_prefix  # before the server's message in raised errors, e.g. "registry: "

    @property
    def _stub(self) -> registry_pb2_grpc.RegistryStub:
        # grpc 1.85 crashes the process (SIGSEGV, not an exception) when a closed intercepted channel, which
        # create_channel returns for a token over plaintext, is called again.
        if self._closed:
            raise FailedPreconditionError("this RegistryClient is closed")
        return self._registry

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- tasks

    def create_task(self, task: Task | registry_pb2.Task, *, exist_ok: bool = False) -> Task:
        """Creates a task (admin token when auth is on); exist_ok accepts an identical existing one."""
        message = task if isinstance(task, registry_pb2.Task) else task_to_proto(task)
        with domain_errors(self._error_prefix):
            created = self._stub.CreateTask(
                registry_pb2.CreateTaskRequest(task=message, exist_ok=exist_ok), timeout=self._timeout_s
            )
        return task_from_proto(created)

    def get_task(self, name: str) -> Task:
        with domain_errors(self._error_prefix):
            return task_from_proto(self._stub.GetTask(registry_pb2.GetTaskRequest(name=name), timeout=self._timeout_s))

    def list_tasks(self, *, page_size: int = 0) -> Iterator[Task]:
        """Every task by name, fetched a page at a time as the iterator is consumed."""
        token = ""
        while True:
            with domain_errors(self._error_prefix):
                page = self._stub.ListTasks(
                    registry_pb2.ListTasksRequest(page_size=page_size, page_token=token), timeout=self._timeout_s
                )
            yield from map(task_from_proto, page.tasks)
            token = page.next_page_token
            if not token:
                return

    # ---- versions

    def push(
        self,
        task: str,
        blob: bytes,
        *,
        parent_version: int,
        force: bool = False,
        metrics: Mapping[str, float] | None = None,
        details_json: str = "",
        dataset_fingerprint: str = "",
        tuner: str = "",
        tags: Mapping[str, str] | None = None,
    ) -> Version:
        """Uploads safetensors weights as the next version of `task`, in chunks, with their sha256.

        parent_version: the version these weights were tuned from (0: from scratch). The registry refuses
        with ABORTED when it is not the task's latest version, unless force is set.
        """
        data = bytes(blob)
        sha256 = _sha256(data)
        header = registry_pb2.PushHeader(
            task=task,
            parent_version=parent_version,
            force=force,
            sha256=sha256,
            size_bytes=len(data),
            metrics=dict(metrics or {}),
            details_json=details_json,
            dataset_fingerprint=dataset_fingerprint,
            tuner=tuner,
            tags=dict(tags or {}),
        )

        def messages() -> Iterator[registry_pb2.PushVersionRequest]:
            yield registry_pb2.PushVersionRequest(header=header)
            for start in range(0, len(data), self._chunk_size):
                yield registry_pb2.PushVersionRequest(chunk=data[start : start + self._chunk_size])

        with domain_errors(self._error_prefix):
            version = version_from_proto(self._stub.PushVersion(messages(), timeout=self._timeout_s))
        # The pusher holds these bytes already: pulling them back later costs only a header.
        self._cache.put(sha256, data)
        self._cache.remember(f"{task}#{version.number}", sha256)
        self._cache.remember(f"{task}@latest", sha256)  # only an offer: the server answers for what is latest
        return version

    def pull(
        self, task: str, *, version: int | None = None, alias: str | None = None, use_cache: bool = True
    ) -> PulledVersion:
        """Downloads a version by number, by alias or (neither) the latest, and verifies its sha256.

        With use_cache, the sha256 last pulled for the same reference is offered to the server; when the
        reference still points at it, only the header travels and the bytes come from the cache.
        """
        ref, suffix = _version_ref(version, alias)
        key = f"{task}{suffix}"
        have = self._cache.known(key) if use_cache else None
        cached = self._cache.get(have) if have else None
        request = registry_pb2.PullVersionRequest(
            task=task, ref=ref, have_sha256=have if cached else "", chunk_size=self._chunk_size
        )
        with domain_errors(self._error_prefix):
            header, blob = self._receive(self._stub.PullVersion(request, timeout=self._timeout_s))
        sha256 = header.version.sha256
        if header.not_modified:
            if cached is None or sha256 != have:
                raise DataLossError(
                    f"the registry answered not_modified for {key} but this client holds "
                    f"{have or 'nothing'}, not {sha256}"
                )
            blob = cached
        else:
            self._cache.put(sha256, blob)
        self._cache.remember(key, sha256)
        return PulledVersion(
            version=version_from_proto(header.version),
            task=task_from_proto(header.task),
            blob=blob,
            from_cache=header.not_modified,
        )

    @staticmethod
    def _receive(responses: Iterator[registry_pb2.PullVersionResponse]) -> tuple[registry_pb2.PullHeader, bytes]:
        """The header and the joined chunks, checked against the header's size and sha256."""
        header: registry_pb2.PullHeader | None = None
        chunks: list[bytes] = []
        received = 0
        for response in responses:
            part = response.WhichOneof("part")
            if header is None:
                if part != "header":
                    raise DataLossError("the registry's pull stream did not start with its header")
                header = response.header
                continue
            if part != "chunk":
                raise DataLossError("the registry sent a second header in one pull")
            received += len(response.chunk)
            if received > header.version.size_bytes:  # never buffer more than the header announced
                responses.cancel()  # type: ignore[attr-defined]
                raise DataLossError(f"the registry sent more than the {header.version.size_bytes} bytes announced")
            chunks.append(response.chunk)
        if header is None:
            raise DataLossError("the registry's pull stream ended without a header")
        blob = b"".join(chunks)
        if not header.not_modified:
            if len(blob) != header.version.size_bytes or _sha256(blob) != header.version.sha256:
                raise DataLossError(
                    f"pulled {len(blob)} bytes hashing to {_sha256(blob)}; the registry announced "
                    f"{header.version.size_bytes} bytes with sha256 {header.version.sha256}"
                )
        return header, blob

    def get_version(self, task: str, *, version: int | None = None, alias: str | None = None) -> Version:
        """A version's metadata (no blob) by number, by alias or (neither) the latest."""
        ref, _ = _version_ref(version, alias)
        with domain_errors(self._error_prefix):
            answer = self._stub.GetVersion(registry_pb2.GetVersionRequest(task=task, ref=ref), timeout=self._timeout_s)
        return version_from_proto(answer)

    def list_versions(self, task: str, *, page_size: int = 0) -> Iterator[Version]:
        """Live versions, newest first, fetched a page at a time as the iterator is consumed."""
        token = ""
        while True:
            with domain_errors(self._error_prefix):
                page = self._stub.ListVersions(
                    registry_pb2.ListVersionsRequest(task=task, page_size=page_size, page_token=token),
                    timeout=self._timeout_s,
                )
            yield from map(version_from_proto, page.versions)
            token = page.next_page_token
            if not token:
                return

    def delete_version(self, task: str, number: int) -> None:
        """Deletes a version (refused with FAILED_PRECONDITION while an alias points at it)."""
        with domain_errors(self._error_prefix):
            self._stub.DeleteVersion(
                registry_pb2.DeleteVersionRequest(task=task, number=number), timeout=self._timeout_s
            )

    # ---- aliases

    def set_alias(
        self, task: str, name: str, version: int, *, expected_version: int | None = None, percent: int = 0
    ) -> Alias:
        """Points an alias at a version; with expected_version (0: must not exist) it is a compare-and-set
        that fails with ABORTED when someone else moved the alias first. `percent` 1..99 stages a rollout of
        `version` to that share of the task's devices instead (or widens / narrows the one in progress); a full move
        to the rollout's version finishes it, to the alias's own version rolls it back."""
        request = registry_pb2.SetAliasRequest(
            task=task,
            name=name,
            version=version,
            has_expected_version=expected_version is not None,
            expected_version=expected_version or 0,
            percent=percent,
        )
        with domain_errors(self._error_prefix):
            return alias_from_proto(self._stub.SetAlias(request, timeout=self._timeout_s))

    def get_alias(self, task: str, name: str) -> Alias:
        with domain_errors(self._error_prefix):
            answer = self._stub.GetAlias(registry_pb2.GetAliasRequest(task=task, name=name), timeout=self._timeout_s)
        return alias_from_proto(answer)

    def delete_alias(self, task: str, name: str, *, expected_version: int | None = None) -> None:
        request = registry_pb2.DeleteAliasRequest(
            task=task,
            name=name,
            has_expected_version=expected_version is not None,
            expected_version=expected_version or 0,
        )
        with domain_errors(self._error_prefix):
            self._stub.DeleteAlias(request, timeout=self._timeout_s)

    def list_aliases(self, task: str) -> list[Alias]:
        with domain_errors(self._error_prefix):
            response = self._stub.ListAliases(registry_pb2.ListAliasesRequest(task=task), timeout=self._timeout_s)
        return [alias_from_proto(alias) for alias in response.aliases]

    def alias_history(self, task: str, name: str | None = None, *, limit: int = 0) -> list[AliasMove]:
        """Moves of one alias (or every alias of the task), newest first; limit 0 = the server's 100."""
        request = registry_pb2.AliasHistoryRequest(task=task, name=name or "", limit=limit)
        with domain_errors(self._error_prefix):
            moves = self._stub.AliasHistory(request, timeout=self._timeout_s).moves
        return [alias_move_from_proto(move) for move in moves]

    def rollback_alias(self, task: str, name: str) -> Alias:
        """Moves an alias back to where it pointed before its last move (a deleted alias is restored).

        A compare-and-set on the last move's target: ABORTED if the alias moved again meanwhile. Rolling
        back twice returns to where it started, since the rollback is itself the last move then.
        """
        try:
            alias = self.get_alias(task, name)
        except NotFoundError:
            alias = None  # deleted: its last move restores it
        if alias is not None and alias.rollout is not None:  # a staged rollout: every device back on the alias's
            return self.set_alias(task, name, alias.version, expected_version=alias.version)
        # Stages of rollouts leave the alias's own version as it was: the last move that changed it is undone.
        moves = [move for move in self.alias_history(task, name) if move.from_version != move.to_version][:1]
        if not moves:
            raise NotFoundError(f"alias {name!r} of task {task!r} has no history to roll back")
        last = moves[0]
        if last.from_version == 0:
            raise FailedPreconditionError(
                f"alias {name!r} of task {task!r} was created by its last move "
                f"(to version {last.to_version}): there is no earlier version"
            )
        return self.set_alias(task, name, last.from_version, expected_version=last.to_version)

    # ---- watching and the fleet

    def watch_alias(
        self, task: str, name: str, *, since_revision: int = 0, device: str = "", timeout_s: float | None = None
    ) -> AliasWatch:
        """An open WatchAlias stream: iterate it for AliasEvents (the state now, or the moves after
        since_revision, then every later move); cancel() ends it. Errors surface while iterating, as domain
        errors (UNAVAILABLE when the registry goes away: reconnect with the last revision)."""
        request = registry_pb2.WatchAliasRequest(task=task, name=name, since_revision=since_revision, device=device)
        return AliasWatch(task, name, self._stub.WatchAlias(request, timeout=timeout_s), self._error_prefix)

    def report_device(
        self,
        task: str,
        *,
        device: str = "",
        alias: str = "",
        version: int = 0,
        rejected_version: int = 0,
        rejected_reason: str = "",
        agent: str = "",
    ) -> int:
        """A device's heartbeat; returns the seconds until the registry wants the next one."""
        request = registry_pb2.DeviceReport(task=task, alias=alias, device=device, version=version,
                                            rejected_version=rejected_version, rejected_reason=rejected_reason,
                                            agent=agent)  # fmt: skip
        with domain_errors(self._error_prefix):
            return self._stub.ReportDevice(request, timeout=self._timeout_s).heartbeat_s

    def fleet(self, task: str, *, stale_after_s: int = 0) -> FleetView:
        """Who runs which version of the task, who is stale, who refused what (0: the server's 90 s)."""
        request = registry_pb2.GetFleetRequest(task=task, stale_after_s=stale_after_s)
        with domain_errors(self._error_prefix):
            return fleet_from_proto(self._stub.GetFleet(request, timeout=self._timeout_s))

    # ---- tokens

    def create_token(self, name: str, *, task: str, scope: TokenScopeName) -> str:
        """Creates a per-task token (admin only) and returns its secret, which the registry never shows again."""
        if scope not in _SCOPES:
            raise InvalidArgumentError(f"scope must be one of {sorted(_SCOPES)}, got {scope!r}")
        request = registry_pb2.CreateTokenRequest(name=name, task=task, scope=_SCOPES[scope])
        with domain_errors(self._error_prefix):
            return self._stub.CreateToken(request, timeout=self._timeout_s).token

    def revoke_token(self, name: str) -> None:
        with domain_errors(self._error_prefix):
            self._stub.RevokeToken(registry_pb2.RevokeTokenRequest(name=name), timeout=self._timeout_s)
