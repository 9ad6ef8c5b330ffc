"""A registry whose database is full answers RESOURCE_EXHAUSTED (not UNAVAILABLE: another replica of the same
database would fail the same way), stores nothing of the refused push and keeps serving reads.

SQLite is filled for real: `PRAGMA max_page_count` on every connection of the store caps the file at its current
size, so the next page a push needs fails with SQLITE_FULL exactly as a full disk does. PostgreSQL cannot be
filled that cheaply; a trigger raises SQLSTATE 53100 (disk_full) from the server on the blob's INSERT, so the real
server error travels through the real driver, store and servicer.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common.pb import registry_pb2, registry_pb2_grpc
from services.registry.config import RegistryConfig
from services.registry.store import open_store
from tests.helpers.registry import InProcessRegistry, make_blob, task_proto

CHUNK = 4096
Code = grpc.StatusCode


class SqlitePageLimit:
    """Records every SQLite connection the process opens; `cap()` caps each at its current size, `lift()` undoes it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.connections: list[sqlite3.Connection] = []
        self.pages: int | None = None
        real_connect = sqlite3.connect

        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            conn = real_connect(*args, **kwargs)
            self.connections.append(conn)
            if self.pages is not None:
                conn.execute(f"PRAGMA max_page_count = {self.pages}")
            return conn

        monkeypatch.setattr(sqlite3, "connect", connect)

    def _apply(self, pages: int) -> None:
        self.pages = pages
        for conn in self.connections:
            try:
                conn.execute(f"PRAGMA max_page_count = {pages}")
            except sqlite3.ProgrammingError:  # closed
                pass

    def cap(self) -> None:
        self._apply(1)  # SQLite never sets the limit below the current size: this is "no more pages"

    def lift(self) -> None:
        self._apply(1 << 30)


@pytest.fixture(params=["sqlite", "postgresql"])
def full_database(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, Callable[[], None], Callable[[], None]]:
    """(database URL, fill it, make room again); fill and make room are called while the registry runs."""
    if request.param == "sqlite":
        limit = SqlitePageLimit(monkeypatch)
        return f"sqlite:///{tmp_path}/registry.db", limit.cap, limit.lift

    import psycopg

    url = request.getfixturevalue("postgres_server").create_schema()

    def run(sql: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql)

    def fill() -> None:
        run(
            "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; END $$"
        )
        run("CREATE TRIGGER disk_full BEFORE INSERT ON blobs FOR EACH ROW EXECUTE FUNCTION disk_full()")

    return url, fill, lambda: run("DROP TRIGGER disk_full ON blobs")


@pytest.fixture
def server(full_database: tuple[str, Any, Any]) -> Iterator[InProcessRegistry]:
    with InProcessRegistry(
        RegistryConfig(db=full_database[0], metrics_listen="off", chunk_size_bytes=CHUNK)
    ) as running:
        yield running


def push(stub: registry_pb2_grpc.RegistryStub, blob: bytes, parent: int) -> registry_pb2.Version:
    header = registry_pb2.PushHeader(
        task="cats", parent_version=parent, sha256=hashlib.sha256(blob).hexdigest(), size_bytes=len(blob)
    )
    messages = [registry_pb2.PushVersionRequest(header=header)] + [
        registry_pb2.PushVersionRequest(chunk=blob[i : i + CHUNK]) for i in range(0, len(blob), CHUNK)
    ]
    return stub.PushVersion(iter(messages), timeout=30)


def test_a_full_database_refuses_a_push_with_resource_exhausted_and_keeps_serving_reads(full_database, server):
    # Prepare: a task with one version, then the database is full.
    url, fill, make_room = full_database
    with grpc.insecure_channel(server.target) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        stub.CreateTask(registry_pb2.CreateTaskRequest(task=task_proto("cats")), timeout=30)
        first = push(stub, make_blob(1), parent=0)
        fill()

        # Execute
        with pytest.raises(grpc.RpcError) as refused:
            push(stub, make_blob(2), parent=1)
        task = stub.GetTask(registry_pb2.GetTaskRequest(name="cats"), timeout=30)
        listed = stub.ListVersions(registry_pb2.ListVersionsRequest(task="cats"), timeout=30)
        pulled = list(stub.PullVersion(registry_pb2.PullVersionRequest(task="cats"), timeout=30))
        make_room()
        second = push(stub, make_blob(2), parent=1)  # the refused push used up no version number
    server.stop()
    with open_store(url) as store:
        problems = store.integrity_check()
        numbers = [v.number for v in store.list_versions("cats").items]

    # Assert
    assert refused.value.code() == Code.RESOURCE_EXHAUSTED, refused.value.details()
    assert "nothing was stored" in refused.value.details()
    assert server.metric("mist_registry_pushes_total", code="RESOURCE_EXHAUSTED") == 1
    assert task.latest_version == first.number == 1
    assert [v.number for v in listed.versions] == [1]
    assert b"".join(p.chunk for p in pulled[1:]) == make_blob(1)
    assert second.number == 2
    assert problems == [] and numbers == [2, 1]
