"""The registry store's database: SQLite or PostgreSQL behind one pooled, migrated `Database` and `?` placeholders.

    db = Database("sqlite:///var/registry.db")           # or postgresql://USER@HOST:PORT/DB
    with db.write() as cur:                               # one transaction: committed, or rolled back on error
        cur.execute("UPDATE tasks SET description = ? WHERE name = ?", ("cats v2", "cats"))
    with db.read() as cur:                                # one consistent read-only snapshot
        rows = cur.execute("SELECT name FROM tasks").all()
    db.close()

SQLite and PostgreSQL share every SQL statement; the few differences (column types, row locks, how a write
transaction starts) live in `Dialect`. Each transaction borrows one connection from a pool of at most
`max_connections`: psycopg_pool's for PostgreSQL (each connection is checked before it is handed out and replaced
after 30 minutes; a call waits at most `pool_timeout_s` for one), a plain one for SQLite, whose connections no
server can drop. Writers are serialised by SQLite's `BEGIN IMMEDIATE` or by the
PostgreSQL row locks the store takes (`Dialect.for_update`).

Errors: a lost connection, a lock or pool timeout is UnavailableError (clients retry); a full disk (SQLite's
SQLITE_FULL, PostgreSQL's SQLSTATE class 53 but too_many_connections) is ResourceExhaustedError, since retrying on
another replica of the same database cannot help. Either way the transaction was rolled back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from services.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    MistError,
    ResourceExhaustedError,
    UnavailableError,
)

log = logging.getLogger(__name__)

DialectName = Literal["sqlite", "postgresql"]
SCHEMA_VERSION = 3
# Arbitrary constant: the PostgreSQL advisory lock that serialises schema migrations across replicas.
_MIGRATION_LOCK_ID = 0x6D697374
# A pooled PostgreSQL connection is replaced after this long (psycopg_pool adds jitter): server-side memory a long
# session accumulates is returned, and after a failover or DNS change every connection soon reaches the new server.
_PG_MAX_LIFETIME_S = 30 * 60.0
# A connection slot whose reconnection keeps failing is given up after this long, and reopened at the next call's
# request: psycopg_pool's back-off (1, 2, 4... s) would otherwise keep the registry down for long after an outage.
_PG_RECONNECT_S = 5.0
# How long a call waits for a pooled connection before it checks that PostgreSQL can be reached at all.
_PG_FIRST_WAIT_S = 1.0
# SQLSTATE 53300: every connection slot is taken, a transient state that waiting (or another replica) can cure.
_PG_TOO_MANY_CONNECTIONS = "53300"
_POOL_LOGGER = logging.getLogger("psycopg.pool")
_SQLITE_FULL = 13  # SQLite's result code for "database or disk is full" (sqlite3.SQLITE_FULL from Python 3.11)


@dataclass(frozen=True)
class Dialect:
    """What differs between the two backends."""

    name: DialectName
    begin_write: str  # starts a write transaction
    begin_read: str  # starts a read-only snapshot
    for_update: str  # suffix of a SELECT that row-locks what it reads until commit ("" where BEGIN locked all)
    blob_type: str  # column type for the weights bytes
    name_type: str  # column type for names: byte-order collation on both, so listings page the same way
    identity_column: str  # an auto-numbered primary key column


SQLITE = Dialect(
    name="sqlite",
    # IMMEDIATE takes the write lock up front, so two writers never both read and then collide on upgrade.
    begin_write="BEGIN IMMEDIATE",
    begin_read="BEGIN",
    for_update="",
    blob_type="BLOB",
    name_type="TEXT",
    identity_column="INTEGER PRIMARY KEY AUTOINCREMENT",
)
POSTGRESQL = Dialect(
    name="postgresql",
    begin_write="BEGIN",
    begin_read="BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    for_update=" FOR UPDATE",
    blob_type="BYTEA",
    name_type='TEXT COLLATE "C"',
    identity_column="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
)


@dataclass(frozen=True)
class DialectOnly:
    """A migration statement for one backend only."""

    dialect: DialectName
    sql: str


# Version 1. Times are microseconds since the Unix epoch (UTC) in BIGINT columns: the same on both
# backends and free of time-zone conversions. JSON columns hold canonical JSON text.
_SCHEMA_V1 = (
    """CREATE TABLE tasks (
        name {name_type} PRIMARY KEY,
        backbone_name TEXT NOT NULL,
        backbone_fingerprint TEXT NOT NULL,
        gather_mode TEXT NOT NULL,
        k INTEGER NOT NULL,
        codec TEXT NOT NULL,
        class_names TEXT NOT NULL,
        edge TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        latest_version INTEGER NOT NULL DEFAULT 0,
        last_number INTEGER NOT NULL DEFAULT 0)""",
    # A deleted version keeps its row (deleted_at set, blob gone) so its number is never given again.
    """CREATE TABLE versions (
        task {name_type} NOT NULL REFERENCES tasks(name),
        number INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        size_bytes BIGINT NOT NULL,
        parameter_count BIGINT NOT NULL,
        metrics TEXT NOT NULL,
        details_json TEXT NOT NULL,
        parent_version INTEGER NOT NULL,
        dataset_fingerprint TEXT NOT NULL,
        pushed_by TEXT NOT NULL,
        tuner TEXT NOT NULL,
        tags TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        deleted_at BIGINT,
        deleted_by TEXT,
        PRIMARY KEY (task, number))""",
    """CREATE TABLE blobs (
        task {name_type} NOT NULL,
        number INTEGER NOT NULL,
        data {blob_type} NOT NULL,
        PRIMARY KEY (task, number),
        FOREIGN KEY (task, number) REFERENCES versions(task, number))""",
    # Weights are float noise to a compressor: storing them EXTERNAL skips PostgreSQL's futile attempt
    # to compress every blob, which halves the time of a 1 MiB push.
    DialectOnly("postgresql", "ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL"),
    """CREATE TABLE aliases (
        task {name_type} NOT NULL,
        name {name_type} NOT NULL,
        version INTEGER NOT NULL,
        updated_at BIGINT NOT NULL,
        updated_by TEXT NOT NULL,
        PRIMARY KEY (task, name),
        FOREIGN KEY (task, version) REFERENCES versions(task, number))""",
    """CREATE TABLE alias_moves (
        id {identity_column},
        task {name_type} NOT NULL REFERENCES tasks(name),
        name {name_type} NOT NULL,
        from_version INTEGER NOT NULL,
        to_version INTEGER NOT NULL,
        moved_at BIGINT NOT NULL,
        moved_by TEXT NOT NULL)""",
    "CREATE INDEX alias_moves_by_name ON alias_moves (task, name, id)",
    """CREATE TABLE tokens (
        name {name_type} PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        task {name_type} REFERENCES tasks(name),
        scope TEXT NOT NULL,
        created_at BIGINT NOT NULL)""",
)
# Version 2: staged rollouts (the alias's candidate and its share, recorded with every move) and the devices'
# reports (the fleet view).
_SCHEMA_V2 = (
    "ALTER TABLE aliases ADD COLUMN rollout_version INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE aliases ADD COLUMN rollout_percent INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE aliases ADD COLUMN rollout_started_at BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE alias_moves ADD COLUMN rollout_version INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE alias_moves ADD COLUMN rollout_percent INTEGER NOT NULL DEFAULT 0",
    """CREATE TABLE devices (
        task {name_type} NOT NULL REFERENCES tasks(name),
        device {name_type} NOT NULL,
        alias TEXT NOT NULL,
        version INTEGER NOT NULL,
        rejected_version INTEGER NOT NULL,
        rejected_reason TEXT NOT NULL,
        agent TEXT NOT NULL,
        reported_at BIGINT NOT NULL,
        PRIMARY KEY (task, device))""",
)
# Version 3: task kinds. Tasks from before are classification tasks; `segmentation` is the SegmentationSpec as JSON
# ("" for a classification task).
_SCHEMA_V3 = (
    "ALTER TABLE tasks ADD COLUMN kind TEXT NOT NULL DEFAULT 'classification'",
    "ALTER TABLE tasks ADD COLUMN segmentation TEXT NOT NULL DEFAULT ''",
)
# MIGRATIONS[i] takes the schema from version i to i + 1. Append, never edit a released entry.
MIGRATIONS: tuple[tuple[str | DialectOnly, ...], ...] = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3)


def _column_types(dialect: Dialect) -> dict[str, str]:
    return {"blob_type": dialect.blob_type, "identity_column": dialect.identity_column, "name_type": dialect.name_type}


class Cursor:
    """A DB-API cursor that takes `?` placeholders on both backends."""

    def __init__(self, raw: Any, dialect: Dialect) -> None:
        self._raw = raw
        self._translate = dialect.name == "postgresql"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        # Our SQL has no literal '?' or '%', so the swap to psycopg's %s style is exact.
        self._raw.execute(sql.replace("?", "%s") if self._translate else sql, tuple(params))
        return self

    def one(self) -> tuple[Any, ...] | None:
        return self._raw.fetchone()

    def all(self) -> list[tuple[Any, ...]]:
        return self._raw.fetchall()

    @property
    def rowcount(self) -> int:
        return self._raw.rowcount


def parse_url(url: str) -> tuple[DialectName, str]:
    """`sqlite:///PATH` (PATH as written: relative, or absolute with a fourth slash) or `postgresql://...`."""
    if not isinstance(url, str):
        raise InvalidArgumentError(f"database URL must be a string, got {type(url).__name__}")
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path or path == ":memory:" or path.endswith("/"):
            raise InvalidArgumentError(
                f"database URL {url!r} needs a file path: sqlite:///relative.db or sqlite:////abs.db"
            )
        return "sqlite", path
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    raise InvalidArgumentError(
        f"unsupported database URL {url.split('://')[0]!r}...: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
    )


class _SqlitePool:
    """At most `max_size` SQLite connections, opened on demand; a broken one is closed instead of returned."""

    def __init__(self, connect: Callable[[], Any], max_size: int, wait_s: float) -> None:
        self._connect = connect
        self._max_size = max_size
        self._wait_s = wait_s
        self._idle: list[Any] = []
        self._open = 0
        self._closed = False
        self._cond = threading.Condition()

    def acquire(self) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or self._idle or self._open < self._max_size, self._wait_s):
                raise UnavailableError(f"all {self._max_size} database connections stayed busy for {self._wait_s:g} s")
            if self._closed:
                raise UnavailableError("the registry store is closed")
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return self._connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def release(self, conn: Any, broken: bool) -> None:
        with self._cond:
            if broken or self._closed:
                self._open -= 1
                _close_quietly(conn)
            else:
                self._idle.append(conn)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for conn in self._idle:
                _close_quietly(conn)
            self._open -= len(self._idle)
            self._idle.clear()
            self._cond.notify_all()


class _PostgresPool:
    """psycopg_pool.ConnectionPool, its exceptions turned into domain errors that say what happened."""

    def __init__(self, params: dict[str, Any], where: str, max_size: int, wait_s: float) -> None:
        from psycopg_pool import ConnectionPool

        # psycopg_pool logs every checkout and return at INFO: three lines per registry call.
        if _POOL_LOGGER.level == logging.NOTSET:
            _POOL_LOGGER.setLevel(logging.WARNING)
        self._params, self._where, self._max_size, self._wait_s = params, where, max_size, wait_s
        self._pool = ConnectionPool(
            kwargs={**params, "autocommit": True},  # transactions are ours: BEGIN ... COMMIT on the cursor
            min_size=1,
            max_size=max_size,
            open=False,
            check=self._check,
            timeout=wait_s,
            max_lifetime=_PG_MAX_LIFETIME_S,
            reconnect_timeout=_PG_RECONNECT_S,
            name="registry-db",
        )
        self.connect_once()  # a clear error now, rather than a pool that keeps retrying in the background
        self._pool.open(wait=False)

    def connect_once(self) -> None:
        """Opens and closes one connection outside the pool; UnavailableError saying why it cannot."""
        import psycopg

        try:
            psycopg.connect(**self._params, autocommit=True).close()
        except psycopg.OperationalError as error:
            # The message may carry the host but never the password; psycopg does not echo it.
            raise UnavailableError(
                f"cannot connect to PostgreSQL at {self._where}: {str(error).strip()[:300]}"
            ) from error

    def _check(self, conn: Any) -> None:
        from psycopg_pool import ConnectionPool

        try:
            ConnectionPool.check_connection(conn)  # one empty round trip
        except Exception:
            # One dead connection usually means the server restarted or failed over and every idle one died with
            # it: test them all now, or this call would back off once per dead connection (1, 2, 4... s).
            self._pool.check()
            raise

    def acquire(self) -> Any:
        from psycopg_pool import PoolTimeout

        deadline = time.monotonic() + self._wait_s
        try:
            return self._getconn(min(self._wait_s, _PG_FIRST_WAIT_S))
        except PoolTimeout:
            # Unreachable PostgreSQL is the usual reason to wait: say so now, not after the whole wait (a metrics
            # scrape reads the store too, and must report it down before the scrape itself times out).
            self.connect_once()
        try:
            return self._getconn(deadline - time.monotonic())
        except PoolTimeout:
            raise UnavailableError(
                f"no connection to PostgreSQL at {self._where} became free within {self._wait_s:g} s "
                f"(all {self._max_size} busy or being replaced); retry"
            ) from None

    def _getconn(self, timeout_s: float) -> Any:
        from psycopg_pool import PoolClosed

        try:
            return self._pool.getconn(timeout=max(timeout_s, 0.001))
        except PoolClosed:
            raise UnavailableError("the registry store is closed") from None

    def release(self, conn: Any, broken: bool) -> None:
        if broken:
            _close_quietly(conn)  # the pool replaces a closed connection
        self._pool.putconn(conn)

    def close(self) -> None:
        self._pool.close()


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # already dead; nothing to release
        pass


def _in_transaction(conn: Any) -> bool:
    """False only for a SQLite connection known to be outside a transaction (psycopg's: always True)."""
    try:
        return bool(getattr(conn, "in_transaction", True))
    except Exception:  # closed
        return True


def _postgres_params(url: str) -> tuple[dict[str, Any], str]:
    """psycopg connection parameters of a postgresql:// URL, and HOST:PORT/DB for messages (never the password)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as error:
        raise InvalidArgumentError(f"malformed PostgreSQL URL: {error}") from error
    if not all(part.isdigit() for part in str(params.get("port", "5432")).split(",")):
        raise InvalidArgumentError(f"PostgreSQL port must be a number, got {params['port']!r}")
    where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}/{params.get('dbname', '')}"
    params.setdefault("connect_timeout", 10)
    return params, where


def _database_error(error: Exception) -> MistError:
    """The domain error of a driver's OperationalError: ResourceExhaustedError when the database is full."""
    detail = str(error).strip()[:300]
    if isinstance(error, sqlite3.OperationalError) and (
        getattr(error, "sqlite_errorcode", None) == _SQLITE_FULL or "database or disk is full" in str(error)
    ):  # sqlite_errorcode is Python 3.11+; SQLite's message for SQLITE_FULL is fixed
        return ResourceExhaustedError(
            f"the registry database is full (SQLite: {detail}); nothing was stored: free disk space and retry"
        )
    sqlstate = getattr(error, "sqlstate", None) or ""
    if sqlstate.startswith("53") and sqlstate != _PG_TOO_MANY_CONNECTIONS:
        return ResourceExhaustedError(
            f"the registry database is out of resources (PostgreSQL {sqlstate}: {detail}); nothing was stored: "
            "free disk space or memory on the database server and retry"
        )
    return UnavailableError(f"database unavailable: {detail}")


class Database:
    """A pooled, migrated SQLite or PostgreSQL database; see the module docstring."""

    def __init__(
        self, url: str, *, max_connections: int = 8, busy_timeout_s: float = 30.0, pool_timeout_s: float = 10.0
    ) -> None:
        """busy_timeout_s: how long SQLite waits for its write lock (and a call for a free SQLite connection);
        pool_timeout_s: how long a call waits for a PostgreSQL connection (busy, or the server unreachable)."""
        dialect_name, target = parse_url(url)
        if not isinstance(max_connections, int) or max_connections < 1:
            raise InvalidArgumentError(f"max_connections must be a positive integer, got {max_connections!r}")
        self.dialect = SQLITE if dialect_name == "sqlite" else POSTGRESQL
        self._busy_timeout_s = busy_timeout_s
        self._pool: _SqlitePool | _PostgresPool
        if dialect_name == "sqlite":
            self.integrity_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)
            self._operational_errors: tuple[type[Exception], ...] = (sqlite3.OperationalError,)
            self._pool = _SqlitePool(self._sqlite_connector(target), max_connections, busy_timeout_s)
        else:
            import psycopg  # only PostgreSQL deployments need the driver

            self.integrity_errors = (psycopg.IntegrityError,)
            self._operational_errors = (psycopg.OperationalError,)
            self._pool = _PostgresPool(*_postgres_params(target), max_connections, pool_timeout_s)
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def _sqlite_connector(self, path: str) -> Callable[[], sqlite3.Connection]:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise InvalidArgumentError(f"cannot open SQLite database {path!r}: directory {directory!r} does not exist")
        timeout_s = self._busy_timeout_s

        def connect() -> sqlite3.Connection:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves; the pool hands a connection to one
            # thread at a time, so the same-thread check would only get in the way.
            conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
            try:
                # FULL: the WAL is fsynced at every commit, so an acknowledged push survives power loss too.
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.DatabaseError as error:
                conn.close()
                if isinstance(error, sqlite3.OperationalError):
                    raise UnavailableError(f"SQLite database {path!r} unavailable: {error}") from error
                raise InvalidArgumentError(f"cannot use the SQLite database {path!r}: {error}") from error
            return conn

        return connect

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Cursor]:
        conn = self._pool.acquire()
        raw = None
        committed = broken = False
        try:
            raw = conn.cursor()
            raw.execute(begin)
            yield Cursor(raw, self.dialect)
            raw.execute("COMMIT")
            committed = True
        except self._operational_errors as error:
            raise _database_error(error) from error
        finally:
            if not committed and raw is not None:
                try:
                    raw.execute("ROLLBACK")
                except Exception:
                    # SQLite rolls a transaction back by itself on some errors (a full disk): the connection is
                    # fine then. Otherwise it is gone: do not hand it out again.
                    broken = _in_transaction(conn)
            self._pool.release(conn, broken or raw is None)

    def read(self) -> Any:
        """A read-only transaction over one consistent snapshot."""
        return self._transaction(self.dialect.begin_read)

    def write(self) -> Any:
        """A write transaction: committed when the block ends normally, rolled back otherwise."""
        return self._transaction(self.dialect.begin_write)

    def _migrate(self) -> None:
        if self.dialect.name == "sqlite":
            self._enable_wal()
        try:
            with self.write() as cur:
                if self.dialect.name == "postgresql":
                    cur.execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_ID})")
                cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = cur.execute("SELECT version FROM schema_version").one()
                current = row[0] if row else 0
                if current > SCHEMA_VERSION:
                    raise FailedPreconditionError(
                        f"the database has schema version {current}, newer than this registry's {SCHEMA_VERSION}: "
                        "upgrade mist-suite"
                    )
                for statements in MIGRATIONS[current:]:
                    for statement in statements:
                        if isinstance(statement, DialectOnly):
                            if statement.dialect != self.dialect.name:
                                continue
                            statement = statement.sql
                        cur.execute(statement.format(**_column_types(self.dialect)))
                if row is None:
                    cur.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                elif current != SCHEMA_VERSION:
                    cur.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError):
                raise
            raise InvalidArgumentError(f"cannot use the SQLite database: {error}") from error
        if current < SCHEMA_VERSION:
            log.info("registry schema migrated from version %d to %d", current, SCHEMA_VERSION)

    def _enable_wal(self) -> None:
        conn = self._pool.acquire()
        try:
            # WAL lets readers run beside the one writer; the mode is stored in the file, set once.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as error:
            self._pool.release(conn, broken=True)
            raise InvalidArgumentError(f"cannot use the SQLite database: {error}") from error
        self._pool.release(conn, broken=False)
        if mode.lower() != "wal":
            log.warning("SQLite refused WAL mode (got %r); readers will wait for writers", mode)

    def close(self) -> None:
        """Closes idle connections now and busy ones when they come back; later calls raise UnavailableError."""
        self._pool.close()


def find_problems(db: Database) -> list[str]:
    """Every broken invariant, as sentences; [] when the database is healthy.

    SQLite's own integrity and foreign-key checks first, then ours: per task the version numbers are
    exactly 1..last_number (deleted ones stay as tombstones), latest_version is the highest live one,
    every live version has a blob of its recorded size and sha256 and no deleted one has a blob, and
    every alias points at a live version. Blobs are read one at a time, so memory stays bounded.
    """
    problems: list[str] = []
    with db.read() as cur:
        if db.dialect.name == "sqlite":
            verdict = [row[0] for row in cur.execute("PRAGMA integrity_check").all()]
            if verdict != ["ok"]:
                problems.extend(f"sqlite integrity_check: {line}" for line in verdict[:20])
            problems.extend(f"sqlite foreign_key_check: {row}" for row in cur.execute("PRAGMA foreign_key_check").all())
        for task, latest, last_number in cur.execute("SELECT name, latest_version, last_number FROM tasks").all():
            rows = cur.execute("SELECT number, deleted_at FROM versions WHERE task = ? ORDER BY number", (task,)).all()
            numbers = [number for number, _ in rows]
            if numbers != list(range(1, last_number + 1)):
                problems.append(f"task {task!r}: version numbers {numbers[:10]}... are not 1..{last_number}")
            live = [number for number, deleted_at in rows if deleted_at is None]
            if max(live, default=0) != latest:
                problems.append(
                    f"task {task!r}: latest_version is {latest} but the highest live version is {max(live, default=0)}"
                )
        problems.extend(_blob_problems(cur))
        stray_aliases = cur.execute(
            "SELECT a.task, a.name, a.version FROM aliases a LEFT JOIN versions v "
            "ON v.task = a.task AND v.number = a.version WHERE v.number IS NULL OR v.deleted_at IS NOT NULL"
        ).all()
        problems.extend(
            f"alias {name!r} of task {task!r} points at missing version {v}" for task, name, v in stray_aliases
        )
        stray_rollouts = cur.execute(
            "SELECT a.task, a.name, a.rollout_version FROM aliases a LEFT JOIN versions v "
            "ON v.task = a.task AND v.number = a.rollout_version "
            "WHERE a.rollout_version > 0 AND (v.number IS NULL OR v.deleted_at IS NOT NULL)"
        ).all()
        problems.extend(
            f"alias {name!r} of task {task!r} rolls out missing version {v}" for task, name, v in stray_rollouts
        )
    return problems


def _blob_problems(cur: Cursor) -> list[str]:
    problems = []
    versions = cur.execute("SELECT task, number, sha256, size_bytes, deleted_at FROM versions").all()
    for task, number, sha256, size_bytes, deleted_at in versions:
        row = cur.execute("SELECT data FROM blobs WHERE task = ? AND number = ?", (task, number)).one()
        where = f"version {number} of task {task!r}"
        if deleted_at is not None:
            if row is not None:
                problems.append(f"{where} is deleted but its blob is still stored")
        elif row is None:
            problems.append(f"{where} has no blob")
        elif len(row[0]) != size_bytes or hashlib.sha256(row[0]).hexdigest() != sha256:
            problems.append(f"{where}: stored blob does not match its recorded size and sha256")
    orphans = cur.execute(
        "SELECT b.task, b.number FROM blobs b LEFT JOIN versions v ON v.task = b.task AND v.number = b.number "
        "WHERE v.number IS NULL"
    ).all()
    problems.extend(f"blob of task {task!r} version {number} has no version row" for task, number in orphans)
    return problems
