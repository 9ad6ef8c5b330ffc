"""The registry's storage: tasks, immutable numbered weight versions, aliases with compare-and-set, tokens.

    with open_store("sqlite:///var/registry.db") as store:          # or postgresql://USER@HOST:PORT/DB
        store.create_task(task)                                      # a records.Task
        version = store.push_version("cats", blob, parent_version=0)
        store.set_alias("cats", "production", version.number, expected_version=0)
        weights = store.read_blob("cats", store.get_version("cats", alias="production").number)

One code path over SQLite (embedded default) and PostgreSQL (several replicas). Methods raise the domain errors of
services/common/errors.py, which the servicer maps to status codes, and may be called from any thread: each call is
one transaction on one pooled connection (sql.py). A push validates its blob before taking the write lock, then
writes the version row and the blob in one transaction, so a crash leaves all or nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from services.common.errors import (
    AbortedError,
    AlreadyExistsError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from services.common.wire.edge_spec import CONFIG_METADATA_KEY, EdgeNetworkConfig, state_shapes
from services.common.wire.weights import MAX_HEADER_BYTES, WeightsSummary, sha256_hex, validate_weights
from services.registry.records import (
    MAX_PAGE_SIZE,
    RESERVED_ALIASES,
    SCOPES,
    Alias,
    AliasMove,
    AliasUpdate,
    DeviceRecord,
    Page,
    Principal,
    RegistryStats,
    Rollout,
    ScopeName,
    SegmentationSpec,
    Task,
    Version,
    check_count,
    check_name,
    check_push_fields,
    decode_page_token,
    encode_page_token,
    normalize_task,
    page_size_or_default,
)
from services.registry.sql import Cursor, Database, find_problems

DEFAULT_HISTORY_LIMIT = 100
DEFAULT_STALE_AFTER_S = 90  # a device not heard from for longer is stale (three missed 30 s heartbeats)
MAX_MISSED_MOVES = 1000  # a watcher further behind gets the alias's state instead of every move
_ALIAS_COLUMNS = "version, updated_at, updated_by, rollout_version, rollout_percent, rollout_started_at"
_MOVE_COLUMNS = "task, name, from_version, to_version, moved_at, moved_by, rollout_version, rollout_percent, id"
_DEVICE_COLUMNS = "task, device, alias, version, rejected_version, rejected_reason, agent, reported_at"
ADMIN_PRINCIPAL = Principal(name="admin", task=None, scope="admin")
# A recognisable prefix lets secret scanners find leaked registry tokens.
TOKEN_PREFIX = "mist_"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_TASK_COLUMNS = (
    "name, backbone_name, backbone_fingerprint, gather_mode, k, codec, class_names, edge, description, "
    "created_at, latest_version, kind, segmentation"
)
_VERSION_COLUMNS = (
    "task, number, sha256, size_bytes, metrics, details_json, parent_version, dataset_fingerprint, pushed_by, "
    "tuner, created_at, tags, parameter_count"
)
_LIVE = "deleted_at IS NULL"


def open_store(url: str, *, admin_token_sha256: str | None = None, max_connections: int = 8) -> RegistryStore:
    """Opens (creating and migrating as needed) `sqlite:///PATH` or `postgresql://USER@HOST:PORT/DB`.

    admin_token_sha256: hash_token() of the configured admin token; that token then resolves to the admin
    principal. It is never written to the database, so rotating it is a configuration change.
    """
    return RegistryStore(Database(url, max_connections=max_connections), admin_token_sha256=admin_token_sha256)


def hash_token(token: str) -> str:
    """The form a token is stored and compared in: sha256 hex of its UTF-8 bytes."""
    return hashlib.sha256(token.encode()).hexdigest()


def max_blob_bytes(task: Task) -> int:
    """The largest blob that could fit the task (float32 tensors plus the largest header accepted).

    Lets the servicer refuse an oversized upload before it has buffered it.
    """
    elements = 0
    for shape in state_shapes(task.edge_config()).values():
        count = 1
        for dim in shape:
            count *= dim
        elements += count
    return 8 + MAX_HEADER_BYTES + 4 * elements


def _to_datetime(microseconds: int) -> datetime:
    return _EPOCH + timedelta(microseconds=microseconds)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _task_from_row(row: tuple[Any, ...]) -> Task:
    name, backbone, fingerprint, mode, k, codec, classes, edge, description, created_us, latest, kind, spec = row
    return Task(
        name=name,
        backbone_name=backbone,
        backbone_fingerprint=fingerprint,
        gather_mode=mode,
        k=k,
        codec=codec,
        class_names=tuple(json.loads(classes)),
        edge=json.loads(edge),
        description=description,
        created_at=_to_datetime(created_us),
        latest_version=latest,
        kind=kind,
        segmentation=SegmentationSpec.from_dict(json.loads(spec)) if spec else None,
    )


def _version_from_row(row: tuple[Any, ...]) -> Version:
    task, number, sha, size, metrics, details, parent, dataset, pushed_by, tuner, created_us, tags, params = row
    return Version(
        task=task,
        number=number,
        sha256=sha,
        size_bytes=size,
        metrics=json.loads(metrics),
        details_json=details,
        parent_version=parent,
        dataset_fingerprint=dataset,
        pushed_by=pushed_by,
        tuner=tuner,
        created_at=_to_datetime(created_us),
        tags=json.loads(tags),
        parameter_count=params,
    )


def _alias_from_row(task: str, name: str, row: tuple[Any, ...], revision: int) -> Alias:
    version, at, by, rollout_version, percent, started = row
    rollout = Rollout(rollout_version, percent, _to_datetime(started)) if rollout_version else None
    return Alias(task, name, version, _to_datetime(at), by, rollout, int(revision or 0))


def _move_from_row(row: tuple[Any, ...]) -> AliasMove:
    task, name, from_v, to_v, at, by, rollout_version, percent, move_id = row
    return AliasMove(task, name, from_v, to_v, _to_datetime(at), by, rollout_version, percent, int(move_id))


def _device_from_row(row: tuple[Any, ...]) -> DeviceRecord:
    task, device, alias, version, rejected, reason, agent, at = row
    return DeviceRecord(task, device, alias, version, rejected, reason, agent, _to_datetime(at))


def _differences(existing: Task, wanted: Task) -> list[str]:
    ignored = {"created_at", "latest_version"}
    return [
        f.name for f in fields(Task) if f.name not in ignored and getattr(existing, f.name) != getattr(wanted, f.name)
    ]


class RegistryStore:
    """Registry storage over a Database; see the module docstring for the API and its guarantees."""

    def __init__(
        self,
        db: Database,
        *,
        admin_token_sha256: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if admin_token_sha256 is not None and len(admin_token_sha256) != 64:
            raise InvalidArgumentError("admin_token_sha256 must be the 64-hex-digit hash_token() of the admin token")
        self._db = db
        self._admin_hash = admin_token_sha256.lower() if admin_token_sha256 else None
        self._clock = clock

    @property
    def dialect(self) -> str:
        """The backend: "sqlite" or "postgresql"."""
        return self._db.dialect.name

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    # ---- tasks ------------------------------------------------------------------------------------

    def _lock_task(self, cur: Cursor, name: str) -> tuple[int, int]:
        """Row-locks the task (PostgreSQL; SQLite's BEGIN IMMEDIATE locked everything); -> (latest, last number)."""
        row = cur.execute(
            f"SELECT latest_version, last_number FROM tasks WHERE name = ?{self._db.dialect.for_update}", (name,)
        ).one()
        if row is None:
            raise NotFoundError(f"task {name!r} not found")
        return row[0], row[1]

    def _require_task(self, cur: Cursor, name: str) -> None:
        check_name("task", name)
        if cur.execute("SELECT 1 FROM tasks WHERE name = ?", (name,)).one() is None:
            raise NotFoundError(f"task {name!r} not found")

    def create_task(self, task: Task, exist_ok: bool = False) -> Task:
        """Creates a task; an identical existing one is returned when exist_ok, any other is AlreadyExistsError."""
        wanted = normalize_task(task)
        try:
            with self._db.write() as cur:
                row = cur.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE name = ?", (wanted.name,)).one()
                if row is None:
                    created_us = self._now_us()
                    cur.execute(
                        "INSERT INTO tasks (name, backbone_name, backbone_fingerprint, gather_mode, k, codec, "
                        "class_names, edge, description, created_at, kind, segmentation) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (wanted.name, wanted.backbone_name, wanted.backbone_fingerprint, wanted.gather_mode,
                         wanted.k, wanted.codec, _dumps(list(wanted.class_names)), _dumps(wanted.edge),
                         wanted.description, created_us, wanted.kind,
                         _dumps(wanted.segmentation.to_dict()) if wanted.segmentation else ""),
                    )  # fmt: skip
                    return replace(wanted, created_at=_to_datetime(created_us), latest_version=0)
        except self._db.integrity_errors:
            row = None  # another replica created it between our SELECT and INSERT: compare with theirs
        existing = _task_from_row(row) if row is not None else self.get_task(wanted.name)
        differing = _differences(existing, wanted)
        if differing:
            raise AlreadyExistsError(f"task {wanted.name!r} already exists with a different {', '.join(differing)}")
        if not exist_ok:
            raise AlreadyExistsError(f"task {wanted.name!r} already exists (pass exist_ok to accept an identical one)")
        return existing

    def get_task(self, name: str) -> Task:
        check_name("task", name)
        with self._db.read() as cur:
            row = cur.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE name = ?", (name,)).one()
        if row is None:
            raise NotFoundError(f"task {name!r} not found")
        return _task_from_row(row)

    def list_tasks(self, page_size: int = 0, page_token: str = "") -> Page[Task]:
        """Tasks ordered by name, page_size at a time (0 = 50, at most 1000)."""
        size = page_size_or_default(page_size)
        after = decode_page_token(page_token, "tasks", "", str)
        with self._db.read() as cur:
            rows = cur.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE name > ? ORDER BY name LIMIT ?", (after or "", size + 1)
            ).all()
        tasks = [_task_from_row(row) for row in rows[:size]]
        more = len(rows) > size
        return Page(tasks, encode_page_token("tasks", "", tasks[-1].name) if more else "")

    # ---- versions ---------------------------------------------------------------------------------

    def _check_blob(
        self, task: Task, blob: bytes, declared_sha256: str | None, declared_size: int | None
    ) -> WeightsSummary:
        config = task.edge_config()
        summary = validate_weights(
            blob, state_shapes(config), declared_sha256=declared_sha256, declared_size=declared_size
        )
        embedded = summary.metadata.get(CONFIG_METADATA_KEY)
        # Heads and pooling do not change any shape, so a config the weights carry is compared too.
        if embedded is not None and EdgeNetworkConfig.from_json(embedded) != config:
            raise FailedPreconditionError(
                f"the weights were trained for edge network {embedded} but task {task.name!r} uses {config.to_json()}"
            )
        return summary

    def push_version(
        self,
        task_name: str,
        blob: bytes,
        *,
        parent_version: int,
        force: bool = False,
        declared_sha256: str | None = None,
        declared_size: int | None = None,
        metrics: Mapping[str, float] | None = None,
        details_json: str = "",
        dataset_fingerprint: str = "",
        tuner: str = "",
        tags: Mapping[str, str] | None = None,
        pushed_by: str = "anonymous",
    ) -> Version:
        """Validates the blob against the task, then stores it as the next version, atomically.

        parent_version must be the task's latest version (0 before the first push) unless force is set;
        otherwise AbortedError, so of several pushes from one parent exactly one wins.
        """
        metrics, tags = dict(metrics or {}), dict(tags or {})
        check_push_fields(metrics, details_json, tags, dataset_fingerprint, tuner, pushed_by)
        check_count("parent_version", parent_version, minimum=0)
        task = self.get_task(task_name)
        # Validation (hashing, parsing, the NaN scan) runs before the write lock so it never holds it.
        summary = self._check_blob(task, blob, declared_sha256, declared_size)
        with self._db.write() as cur:
            latest, last_number = self._lock_task(cur, task_name)
            if parent_version > last_number:
                raise NotFoundError(f"parent version {parent_version} of task {task_name!r} does not exist")
            if parent_version != latest and not force:
                raise AbortedError(
                    f"task {task_name!r} is at version {latest} but the push is based on {parent_version}: "
                    "pull the latest version and tune from it, or push with force"
                )
            number, created_us = last_number + 1, self._now_us()
            metric_values = {key: float(value) for key, value in metrics.items()}
            cur.execute(
                f"INSERT INTO versions ({_VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (task_name, number, summary.sha256, summary.size_bytes, _dumps(metric_values), details_json,
                 parent_version, dataset_fingerprint, pushed_by, tuner, created_us, _dumps(tags),
                 summary.parameter_count),
            )  # fmt: skip
            cur.execute("INSERT INTO blobs (task, number, data) VALUES (?, ?, ?)", (task_name, number, bytes(blob)))
            cur.execute(
                "UPDATE tasks SET latest_version = ?, last_number = ? WHERE name = ?", (number, number, task_name)
            )
        return Version(
            task=task_name, number=number, sha256=summary.sha256, size_bytes=summary.size_bytes,
            metrics=metric_values, details_json=details_json, parent_version=parent_version,
            dataset_fingerprint=dataset_fingerprint, pushed_by=pushed_by, tuner=tuner,
            created_at=_to_datetime(created_us), tags=tags, parameter_count=summary.parameter_count,
        )  # fmt: skip

    def _live_version(self, cur: Cursor, task: str, number: int) -> Version:
        row = cur.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE task = ? AND number = ? AND {_LIVE}", (task, number)
        ).one()
        if row is None:
            raise NotFoundError(f"version {number} of task {task!r} not found")
        return _version_from_row(row)

    def get_version(self, task: str, number: int | None = None, alias: str | None = None) -> Version:
        """A version by number, by alias, or (neither given) the latest."""
        if number is not None and alias is not None:
            raise InvalidArgumentError("give a version number or an alias, not both")
        with self._db.read() as cur:
            self._require_task(cur, task)
            if alias is not None:
                number = self._alias_target(cur, task, alias)
            elif number is None:
                number = cur.execute("SELECT latest_version FROM tasks WHERE name = ?", (task,)).one()[0]
                if number == 0:
                    raise NotFoundError(f"task {task!r} has no versions yet")
            return self._live_version(cur, task, check_count("version", number))

    def read_blob(self, task: str, number: int) -> bytes:
        """The safetensors bytes of a live version; DataLossError if they no longer hash to the recorded sha256."""
        check_count("version", number)
        with self._db.read() as cur:
            self._require_task(cur, task)
            row = cur.execute(
                f"SELECT v.sha256, b.data FROM versions v JOIN blobs b ON b.task = v.task AND b.number = v.number "
                f"WHERE v.task = ? AND v.number = ? AND v.{_LIVE}",
                (task, number),
            ).one()
        if row is None:
            raise NotFoundError(f"version {number} of task {task!r} not found")
        data = bytes(row[1])
        if sha256_hex(data) != row[0]:
            raise DataLossError(f"stored blob of version {number} of task {task!r} does not match its sha256")
        return data

    def list_versions(self, task: str, page_size: int = 0, page_token: str = "") -> Page[Version]:
        """Live versions, newest first, page_size at a time (0 = 50, at most 1000)."""
        size = page_size_or_default(page_size)
        before = decode_page_token(page_token, "versions", task, int)
        with self._db.read() as cur:
            self._require_task(cur, task)
            rows = cur.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions WHERE task = ? AND number < ? AND {_LIVE} "
                "ORDER BY number DESC LIMIT ?",
                (task, before if before is not None else 2**31, size + 1),
            ).all()
        versions = [_version_from_row(row) for row in rows[:size]]
        more = len(rows) > size
        return Page(versions, encode_page_token("versions", task, versions[-1].number) if more else "")

    def delete_version(self, task: str, number: int, *, deleted_by: str = "anonymous") -> None:
        """Deletes a version's blob; refused while an alias points at it. Its number is never given again."""
        check_count("version", number)
        check_name("task", task)
        with self._db.write() as cur:
            self._lock_task(cur, task)
            self._live_version(cur, task, number)
            rows = cur.execute(
                "SELECT name, version FROM aliases WHERE task = ? AND (version = ? OR rollout_version = ?) ORDER BY name",
                (task, number, number),
            ).all()
            if rows:
                targets = [name for name, version in rows if version == number]
                staged = [name for name, version in rows if version != number]
                what = " and ".join(
                    part
                    for part in (
                        f"the target of aliases {targets}" if targets else "",
                        f"in a staged rollout of aliases {staged}" if staged else "",
                    )
                    if part
                )
                raise FailedPreconditionError(f"version {number} of task {task!r} is {what}: move or delete them first")
            cur.execute("DELETE FROM blobs WHERE task = ? AND number = ?", (task, number))
            cur.execute(
                "UPDATE versions SET deleted_at = ?, deleted_by = ? WHERE task = ? AND number = ?",
                (self._now_us(), deleted_by, task, number),
            )
            latest = cur.execute(f"SELECT MAX(number) FROM versions WHERE task = ? AND {_LIVE}", (task,)).one()[0]
            cur.execute("UPDATE tasks SET latest_version = ? WHERE name = ?", (latest or 0, task))

    # ---- aliases ----------------------------------------------------------------------------------

    def _alias_target(self, cur: Cursor, task: str, name: str) -> int:
        check_name("alias", name)
        row = cur.execute("SELECT version FROM aliases WHERE task = ? AND name = ?", (task, name)).one()
        if row is None:
            raise NotFoundError(f"alias {name!r} of task {task!r} not found")
        return row[0]

    def _check_expected(self, task: str, name: str, current: int, expected: int | None) -> None:
        if expected is not None and check_count("expected_version", expected, minimum=0) != current:
            now = f"points to version {current}" if current else "does not exist"
            raise AbortedError(f"alias {name!r} of task {task!r} {now}, not the expected {expected}: re-read and retry")

    def _record_move(
        self, cur: Cursor, task: str, name: str, from_v: int, to_v: int, by: str, at_us: int, rollout: tuple[int, int]
    ) -> int:
        """Appends the move (the alias's stable version before and after, and its rollout after); its revision."""
        cur.execute(
            "INSERT INTO alias_moves (task, name, from_version, to_version, moved_at, moved_by, rollout_version, "
            "rollout_percent) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (task, name, from_v, to_v, at_us, by, *rollout),
        )
        return self._revision(cur, task, name)

    @staticmethod
    def _revision(cur: Cursor, task: str, name: str) -> int:
        row = cur.execute("SELECT MAX(id) FROM alias_moves WHERE task = ? AND name = ?", (task, name)).one()
        return int(row[0] or 0) if row else 0

    def set_alias(
        self,
        task: str,
        name: str,
        version: int,
        expected_version: int | None = None,
        moved_by: str = "anonymous",
        *,
        percent: int = 0,
    ) -> AliasUpdate:
        """Points an alias at a live version; with expected_version (0 = must not exist) as compare-and-set on the
        alias's own version. `percent` 1..99 stages a rollout of `version` instead (or widens / narrows the one in
        progress); 0 or 100 moves the alias, which finishes a rollout of `version` or, to the alias's own version,
        rolls the rollout back. A rollout of another version while one runs is a FailedPreconditionError.

        Pointing it where it already points changes nothing and records no move (AliasUpdate.moved False).
        """
        check_name("task", task)
        check_name("alias", name)
        if name in RESERVED_ALIASES:
            raise InvalidArgumentError(f"{name!r} is reserved and cannot be an alias name")
        check_count("version", version)
        percent = check_count("percent", percent, minimum=0)
        if percent > 100:
            raise InvalidArgumentError(f"percent must be 0..100, got {percent}")
        staged = 0 < percent < 100
        with self._db.write() as cur:
            self._lock_task(cur, task)
            self._live_version(cur, task, version)
            row = cur.execute(f"SELECT {_ALIAS_COLUMNS} FROM aliases WHERE task = ? AND name = ?", (task, name)).one()
            current = row[0] if row else 0
            self._check_expected(task, name, current, expected_version)
            rollout, current_percent, started_us = (row[3], row[4], row[5]) if row else (0, 0, 0)
            if rollout and version not in (rollout, current):
                raise FailedPreconditionError(
                    f"alias {name!r} of task {task!r} has a staged rollout of version {rollout} at {current_percent}% "
                    f"in progress: finish it (promote {rollout}) or roll it back (promote {current}) first"
                )
            if staged:
                if not current:
                    raise FailedPreconditionError(
                        f"alias {name!r} of task {task!r} does not exist: a staged rollout needs a version the other "
                        "devices stay on (promote one first)"
                    )
                if version == current:
                    raise InvalidArgumentError(f"alias {name!r} of task {task!r} already points at version {version}")
                after, new_rollout = current, (version, percent)
            else:
                after, new_rollout = version, (0, 0)
            if (after, new_rollout) == (current, (rollout, current_percent if rollout else 0)):
                return AliasUpdate(
                    _alias_from_row(task, name, row, self._revision(cur, task, name)),  # type: ignore[arg-type]
                    moved=False,
                )
            now_us = self._now_us()
            started = (started_us if rollout == new_rollout[0] else now_us) if new_rollout[0] else 0
            if row is None:
                cur.execute(
                    "INSERT INTO aliases (task, name, version, updated_at, updated_by) VALUES (?, ?, ?, ?, ?)",
                    (task, name, after, now_us, moved_by),
                )
            else:
                cur.execute(
                    "UPDATE aliases SET version = ?, updated_at = ?, updated_by = ?, rollout_version = ?, "
                    "rollout_percent = ?, rollout_started_at = ? WHERE task = ? AND name = ?",
                    (after, now_us, moved_by, *new_rollout, started, task, name),
                )
            revision = self._record_move(cur, task, name, current, after, moved_by, now_us, new_rollout)
        state = Rollout(new_rollout[0], new_rollout[1], _to_datetime(started)) if new_rollout[0] else None
        return AliasUpdate(Alias(task, name, after, _to_datetime(now_us), moved_by, state, revision), moved=True)

    def get_alias(self, task: str, name: str) -> Alias:
        with self._db.read() as cur:
            self._require_task(cur, task)
            return self._read_alias(cur, task, name)

    def _read_alias(self, cur: Cursor, task: str, name: str) -> Alias:
        check_name("alias", name)
        row = cur.execute(f"SELECT {_ALIAS_COLUMNS} FROM aliases WHERE task = ? AND name = ?", (task, name)).one()
        if row is None:
            raise NotFoundError(f"alias {name!r} of task {task!r} not found")
        return _alias_from_row(task, name, row, self._revision(cur, task, name))

    def delete_alias(
        self, task: str, name: str, expected_version: int | None = None, moved_by: str = "anonymous"
    ) -> None:
        check_name("task", task)
        with self._db.write() as cur:
            self._lock_task(cur, task)
            current = self._alias_target(cur, task, name)
            self._check_expected(task, name, current, expected_version)
            cur.execute("DELETE FROM aliases WHERE task = ? AND name = ?", (task, name))
            self._record_move(cur, task, name, current, 0, moved_by, self._now_us(), (0, 0))

    def list_aliases(self, task: str) -> list[Alias]:
        with self._db.read() as cur:
            self._require_task(cur, task)
            rows = cur.execute(
                f"SELECT name, {_ALIAS_COLUMNS} FROM aliases WHERE task = ? ORDER BY name", (task,)
            ).all()
            revisions = dict(
                cur.execute("SELECT name, MAX(id) FROM alias_moves WHERE task = ? GROUP BY name", (task,)).all()
            )
        return [_alias_from_row(task, row[0], row[1:], revisions.get(row[0], 0)) for row in rows]

    def alias_history(self, task: str, name: str | None = None, limit: int = DEFAULT_HISTORY_LIMIT) -> list[AliasMove]:
        """Moves of one alias (or of all the task's aliases), newest first; limit 0 = 100, at most 1000."""
        limit = min(check_count("limit", limit, minimum=0) or DEFAULT_HISTORY_LIMIT, MAX_PAGE_SIZE)
        with self._db.read() as cur:
            self._require_task(cur, task)
            if name:
                check_name("alias", name)
                rows = cur.execute(
                    f"SELECT {_MOVE_COLUMNS} FROM alias_moves WHERE task = ? AND name = ? ORDER BY id DESC LIMIT ?",
                    (task, name, limit),
                ).all()
            else:
                rows = cur.execute(
                    f"SELECT {_MOVE_COLUMNS} FROM alias_moves WHERE task = ? ORDER BY id DESC LIMIT ?", (task, limit)
                ).all()
        return [_move_from_row(row) for row in rows]

    # ---- watching ---------------------------------------------------------------------------------

    def watch_start(self, task: str, name: str, since_revision: int = 0) -> tuple[Alias, list[AliasMove]]:
        """What a new watcher is sent first: the alias now (NotFoundError for an unknown task or alias) and, when
        it reconnects with since_revision, the moves after that one, oldest first (none when it is more than
        MAX_MISSED_MOVES behind: the state then stands for them)."""
        since = check_count("since_revision", since_revision, minimum=0)
        with self._db.read() as cur:
            self._require_task(cur, task)
            alias = self._read_alias(cur, task, name)
            if not since or since >= alias.revision:
                return alias, []
            rows = cur.execute(
                f"SELECT {_MOVE_COLUMNS} FROM alias_moves WHERE task = ? AND name = ? AND id > ? ORDER BY id LIMIT ?",
                (task, name, since, MAX_MISSED_MOVES + 1),
            ).all()
        return alias, [] if len(rows) > MAX_MISSED_MOVES else [_move_from_row(row) for row in rows]

    def latest_revision(self, task: str, name: str) -> int:
        """The revision of the alias's last move; 0 when it never moved."""
        with self._db.read() as cur:
            return self._revision(cur, task, name)

    def moves_after(self, revisions: Mapping[tuple[str, str], int]) -> dict[tuple[str, str], list[AliasMove]]:
        """For each (task, alias), its moves after the given revision, oldest first (only keys with moves).

        Per task the revisions grow in commit order (every move holds the task's lock), so reading `id > last` per
        alias never skips a move that commits late, as one global `id > last` could across tasks."""
        found: dict[tuple[str, str], list[AliasMove]] = {}
        with self._db.read() as cur:
            for (task, name), after in revisions.items():
                rows = cur.execute(
                    f"SELECT {_MOVE_COLUMNS} FROM alias_moves WHERE task = ? AND name = ? AND id > ? ORDER BY id "
                    "LIMIT ?",
                    (task, name, after, MAX_MISSED_MOVES),
                ).all()
                if rows:
                    found[(task, name)] = [_move_from_row(row) for row in rows]
        return found

    # ---- devices ----------------------------------------------------------------------------------

    def report_device(self, report: DeviceRecord) -> None:
        """Records a device's heartbeat (its version in use, or the one it refused); the task must exist."""
        check_name("task", report.task)
        check_name("device", report.device)
        if report.alias:
            check_name("alias", report.alias)
        for field_name in ("version", "rejected_version"):
            check_count(field_name, getattr(report, field_name), minimum=0)
        reason, agent = report.rejected_reason[:1000], report.agent[:200]
        with self._db.write() as cur:
            self._require_task(cur, report.task)
            updated = cur.execute(
                "UPDATE devices SET alias = ?, version = ?, rejected_version = ?, rejected_reason = ?, agent = ?, "
                "reported_at = ? WHERE task = ? AND device = ?",
                (report.alias, report.version, report.rejected_version, reason, agent, self._now_us(), report.task,
                 report.device),
            ).rowcount  # fmt: skip
            if not updated:
                cur.execute(
                    f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (report.task, report.device, report.alias, report.version, report.rejected_version, reason,
                     agent, self._now_us()),
                )  # fmt: skip

    def devices(self, task: str) -> list[DeviceRecord]:
        """Every device that reported for the task, by name."""
        with self._db.read() as cur:
            self._require_task(cur, task)
            rows = cur.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE task = ? ORDER BY device", (task,)).all()
        return [_device_from_row(row) for row in rows]

    # ---- tokens -----------------------------------------------------------------------------------

    def create_token(self, name: str, task: str | None, scope: ScopeName) -> str:
        """Creates a token and returns its secret (shown once; only its sha256 is stored).

        scope "read" or "read_write" needs a task; "admin" needs task None.
        """
        check_name("token", name)
        if scope not in SCOPES or (scope == "admin") != (task is None):
            raise InvalidArgumentError(
                f"scope must be 'admin' without a task or 'read'/'read_write' with one, got {scope!r} for task {task!r}"
            )
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            with self._db.write() as cur:
                if task is not None:
                    self._require_task(cur, task)
                if cur.execute("SELECT 1 FROM tokens WHERE name = ?", (name,)).one() is not None:
                    raise AlreadyExistsError(f"a token named {name!r} exists; revoke it first or pick another name")
                cur.execute(
                    "INSERT INTO tokens (name, token_sha256, task, scope, created_at) VALUES (?, ?, ?, ?, ?)",
                    (name, hash_token(secret), task, scope, self._now_us()),
                )
        except self._db.integrity_errors as error:  # a concurrent create of the same name won
            raise AlreadyExistsError(f"a token named {name!r} exists") from error
        return secret

    def resolve_token(self, token: str) -> Principal | None:
        """The principal a bearer token stands for, or None for an unknown or revoked one."""
        if not isinstance(token, str) or not token:
            return None
        digest = hash_token(token)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return ADMIN_PRINCIPAL
        # The index lookup is keyed by a hash of a secret the caller chose, so its timing reveals nothing
        # about stored tokens; the final comparison is constant-time all the same.
        with self._db.read() as cur:
            row = cur.execute(
                "SELECT name, token_sha256, task, scope FROM tokens WHERE token_sha256 = ?", (digest,)
            ).one()
        if row is None or not hmac.compare_digest(row[1], digest):
            return None
        return Principal(name=row[0], task=row[2], scope=row[3])

    def revoke_token(self, name: str) -> None:
        check_name("token", name)
        with self._db.write() as cur:
            if cur.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount == 0:
                raise NotFoundError(f"token {name!r} not found")

    # ---- operations -------------------------------------------------------------------------------

    def integrity_check(self) -> list[str]:
        """Problems found (empty when healthy): the engine's own check on SQLite, then our invariants."""
        return find_problems(self._db)

    def stats(self) -> RegistryStats:
        with self._db.read() as cur:
            counts = cur.execute(
                f"SELECT t.name, COUNT(v.number), COALESCE(SUM(v.size_bytes), 0) FROM tasks t "
                f"LEFT JOIN versions v ON v.task = t.name AND v.{_LIVE} GROUP BY t.name ORDER BY t.name"
            ).all()
            aliases = cur.execute("SELECT COUNT(*) FROM aliases").one()[0]
            stale_before = self._now_us() - DEFAULT_STALE_AFTER_S * 1_000_000
            devices = cur.execute(
                "SELECT task, version, SUM(CASE WHEN reported_at < ? THEN 1 ELSE 0 END), COUNT(*) FROM devices "
                "GROUP BY task, version",
                (stale_before,),
            ).all()
            rollouts = cur.execute(
                "SELECT task, name, rollout_version, rollout_percent FROM aliases WHERE rollout_version > 0"
            ).all()
        by_state: dict[tuple[str, int, str], int] = {}
        for task, version, stale, count in devices:
            by_state[(task, int(version), "fresh")] = int(count) - int(stale)
            by_state[(task, int(version), "stale")] = int(stale)
        return RegistryStats(
            tasks=len(counts),
            versions_by_task={name: int(count) for name, count, _ in counts},
            bytes_stored=sum(int(size) for _, _, size in counts),
            aliases=int(aliases),
            devices=by_state,
            rollouts={(task, name): (int(v), int(p)) for task, name, v, p in rollouts},
        )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RegistryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
