"""Database plumbing under the registry store: URL parsing, a connection pool, transactions, schema migrations.

SQLite and PostgreSQL share every SQL statement (written with `?` placeholders); the few differences
(column types, row locks, how a write transaction starts) live in `Dialect`.

API:
    Database(url, *, max_connections=8, busy_timeout_s=30.0)   opens, migrates the schema to SCHEMA_VERSION
    Database.read() -> context manager yielding Cursor          a consistent read-only snapshot
    Database.write() -> context manager yielding Cursor         commits on success, rolls back on any error
    Database.dialect: Dialect; Database.integrity_errors; Database.close()
    Cursor.execute(sql, params=()) -> Cursor; Cursor.one() -> tuple | None; Cursor.all() -> list[tuple]

Concurrency: a pool of at most `max_connections` connections, each used by one thread at a time and
handed back after its transaction; a caller waits (up to busy_timeout_s) when all are busy. Writers are
serialised by SQLite's `BEGIN IMMEDIATE` or by PostgreSQL row locks the store takes (`Dialect.for_update`).
Lost connections and lock timeouts become UnavailableError, which clients retry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from services.common.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError

log = logging.getLogger(__name__)

DialectName = Literal["sqlite", "postgresql"]
SCHEMA_VERSION = 1
# Arbitrary constant: the PostgreSQL advisory lock that serialises schema migrations across replicas.
_MIGRATION_LOCK_ID = 0x6D697374


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
# MIGRATIONS[i] takes the schema from version i to i + 1. Append, never edit a released entry.
MIGRATIONS: tuple[tuple[str | DialectOnly, ...], ...] = (_SCHEMA_V1,)


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


class _Pool:
    """At most `max_size` connections, opened on demand; a broken one is closed instead of returned."""

    def __init__(self, connect: Callable[[], Any], max_size: int, wait_s: float) -> None:
        self._connect = connect
        self.max_size = max_size
        self._wait_s = wait_s
        self._idle: list[Any] = []
        self._open = 0
        self._closed = False
        self._cond = threading.Condition()

    def acquire(self) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or self._idle or self._open < self.max_size, self._wait_s):
                raise UnavailableError(f"all {self.max_size} database connections stayed busy for {self._wait_s} s")
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


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # already dead; nothing to release
        pass


class Database:
    """A pooled, migrated SQLite or PostgreSQL database; see the module docstring."""

    def __init__(self, url: str, *, max_connections: int = 8, busy_timeout_s: float = 30.0) -> None:
        dialect_name, target = parse_url(url)
        if not isinstance(max_connections, int) or max_connections < 1:
            raise InvalidArgumentError(f"max_connections must be a positive integer, got {max_connections!r}")
        self.dialect = SQLITE if dialect_name == "sqlite" else POSTGRESQL
        self._busy_timeout_s = busy_timeout_s
        if dialect_name == "sqlite":
            connect = self._sqlite_connector(target)
            self.integrity_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)
            self._unavailable_errors: tuple[type[Exception], ...] = (sqlite3.OperationalError,)
        else:
            import psycopg  # only PostgreSQL deployments need the driver

            connect = self._postgres_connector(target)
            self.integrity_errors = (psycopg.IntegrityError,)
            self._unavailable_errors = (psycopg.OperationalError,)
        self._pool = _Pool(connect, max_connections, busy_timeout_s)
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

    def _postgres_connector(self, url: str) -> Callable[[], Any]:
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

        def connect() -> Any:
            try:
                return psycopg.connect(**params, autocommit=True)
            except psycopg.OperationalError as error:
                # The message may carry the host but never the password; psycopg does not echo it.
                raise UnavailableError(
                    f"cannot connect to PostgreSQL at {where}: {str(error).strip()[:300]}"
                ) from error

        return connect

    def _is_dead(self, conn: Any) -> bool:
        return bool(getattr(conn, "broken", False) or getattr(conn, "closed", False))

    def _begin(self, begin: str) -> tuple[Any, Any]:
        """A pooled connection with a transaction open on it.

        A pooled PostgreSQL connection the server has dropped (restart, failover, idle timeout) fails at
        BEGIN, before anything ran, so it is discarded and the next one tried instead of failing the call.
        """
        for attempt in range(self._pool.max_size + 1):
            conn = self._pool.acquire()
            try:
                raw = conn.cursor()
                raw.execute(begin)
                return conn, raw
            except self._unavailable_errors as error:
                dead = self._is_dead(conn)
                self._pool.release(conn, broken=dead)
                if not dead or attempt == self._pool.max_size:
                    raise UnavailableError(f"database unavailable: {str(error).strip()[:300]}") from error
        raise AssertionError("unreachable")

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Cursor]:
        conn, raw = self._begin(begin)
        committed = broken = False
        try:
            yield Cursor(raw, self.dialect)
            raw.execute("COMMIT")
            committed = True
        except self._unavailable_errors as error:
            broken = self._is_dead(conn)
            raise UnavailableError(f"database unavailable: {str(error).strip()[:300]}") from error
        finally:
            if not committed:
                try:
                    raw.execute("ROLLBACK")
                except Exception:  # the connection is gone: do not hand it out again
                    broken = True
            self._pool.release(conn, broken)

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
