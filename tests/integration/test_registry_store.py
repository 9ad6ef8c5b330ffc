"""The registry store on SQLite and on a real PostgreSQL server: the same tests, every refusal with its error,
paging, aliases, tokens, concurrent pushes from threads and processes, and SIGKILL during pushes."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from services.common.errors import (
    AbortedError,
    AlreadyExistsError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    MistError,
    NotFoundError,
    UnavailableError,
)
from services.common.wire.edge_spec import CONFIG_METADATA_KEY, EdgeNetworkConfig, state_shapes, trainable_parameters
from services.registry.records import Principal, Task
from services.registry.store import RegistryStore, hash_token, max_blob_bytes, open_store
from tests.helpers.postgres import PostgresServer
from tests.helpers.registry import all_versions

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = EdgeNetworkConfig(dims=16, tokens=5, num_classes=3, num_blocks=2, rank=4)
THREADS = 16


# ---- fixtures and builders -------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/registry.db"  # tmp_path is absolute: sqlite:////tmp/...
    return request.getfixturevalue("postgres_server").create_schema()


@pytest.fixture
def store(store_url: str) -> Iterator[RegistryStore]:
    opened = open_store(store_url)  # 8 connections: the 16-thread races also exercise waiting for one
    yield opened
    opened.close()


def make_task(name: str = "cats", **changes: Any) -> Task:
    task = Task(
        name=name,
        backbone_name="vit_tiny_patch16_224",
        backbone_fingerprint="random-0",
        gather_mode="mist",
        k=2,
        codec="i8+zstd",
        class_names=("cat", "dog", "fox"),
        edge=CONFIG.to_dict(),
        description="test task",
    )
    return replace(task, **changes)


def make_blob(seed: int = 0, config: EdgeNetworkConfig = CONFIG, metadata: dict[str, str] | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in state_shapes(config).items()}
    return safetensors.numpy.save(arrays, metadata=metadata)


def push(store: RegistryStore, seed: int, parent: int, **kwargs: Any) -> int:
    return store.push_version("cats", make_blob(seed), parent_version=parent, **kwargs).number


def raw_query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Runs SQL on the database behind `url` directly, as an operator (or corruption) would."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return conn.execute(sql, params).fetchall()
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql.replace("?", "%s"), params)
        return cur.fetchall() if cur.description else []


def run_children(script: str, args_per_child: list[list[str]]) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        for args in args_per_child
    ]


# ---- tasks -----------------------------------------------------------------------------------------


def test_tasks_are_created_read_back_and_listed_in_pages(store):
    # Prepare
    for name in ("c-task", "a.task", "b_task"):
        store.create_task(make_task(name))

    # Execute
    first = store.list_tasks(page_size=2)
    second = store.list_tasks(page_size=2, page_token=first.next_page_token)
    cats = store.get_task("a.task")

    # Assert
    assert [t.name for t in first.items] == ["a.task", "b_task"]
    assert [t.name for t in second.items] == ["c-task"] and second.next_page_token == ""
    assert cats.same_definition(make_task("a.task")) and cats.latest_version == 0
    assert cats.edge == {**CONFIG.to_dict(), "heads": 1, "pooling": "cls"}
    assert cats.created_at.tzinfo == timezone.utc
    assert abs((datetime.now(timezone.utc) - cats.created_at).total_seconds()) < 60


def test_create_task_is_idempotent_only_for_identical_definitions(store):
    # Prepare
    created = store.create_task(make_task())

    # Execute
    again = store.create_task(make_task(), exist_ok=True)

    # Assert
    assert again == created
    with pytest.raises(AlreadyExistsError, match="pass exist_ok"):
        store.create_task(make_task())
    with pytest.raises(AlreadyExistsError, match="different k, description"):
        store.create_task(make_task(k=3, description="other"), exist_ok=True)


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "Cats"},
        {"name": "-cats"},
        {"name": "c" * 64},
        {"class_names": ("cat", "cat", "dog")},
        {"class_names": ("cat", "dog")},  # the edge network has 3 outputs
        {"gather_mode": "sideways"},
        {"k": 0},
        {"edge": {**CONFIG.to_dict(), "rank": 0}},
        {"edge": {"dims": 16}},
    ],
    ids=["uppercase", "leading-dash", "too-long", "duplicate-classes", "class-count", "mode", "k", "rank", "edge"],
)
def test_bad_task_definitions_are_invalid_argument(store, changes):
    with pytest.raises(InvalidArgumentError):
        store.create_task(make_task(**changes))
    assert store.list_tasks().items == []


# ---- versions --------------------------------------------------------------------------------------


def test_pushed_versions_read_back_with_metrics_lineage_and_bytes(store):
    # Prepare
    store.create_task(make_task())
    blob = make_blob(2)

    # Execute
    first = store.push_version("cats", make_blob(1), parent_version=0)
    second = store.push_version(
        "cats", blob, parent_version=1, declared_sha256=hashlib.sha256(blob).hexdigest(), declared_size=len(blob),
        metrics={"val_accuracy": 0.75, "epochs": 10}, details_json='{"k_scores": {"2": 0.75}}',
        dataset_fingerprint="d" * 64, tuner="mist-tuner/0.1.0 host-a", tags={"run": "7"}, pushed_by="device-7",
    )  # fmt: skip

    # Assert
    assert (first.number, second.number) == (1, 2)
    assert store.get_version("cats") == second
    assert store.get_version("cats", number=1) == first
    assert second.metrics == {"val_accuracy": 0.75, "epochs": 10.0}
    assert (second.parent_version, second.pushed_by, second.tags) == (1, "device-7", {"run": "7"})
    assert second.details_json == '{"k_scores": {"2": 0.75}}'
    assert second.sha256 == hashlib.sha256(blob).hexdigest() and second.size_bytes == len(blob)
    assert second.parameter_count == trainable_parameters(CONFIG)
    assert store.read_blob("cats", 2) == blob
    assert store.get_task("cats").latest_version == 2
    assert len(blob) <= max_blob_bytes(store.get_task("cats"))


def _nan_blob() -> bytes:
    arrays = safetensors.numpy.load(make_blob())
    arrays["head.bias"][1] = np.nan
    return safetensors.numpy.save(arrays)


REFUSED_PUSHES: dict[str, tuple[Callable[[], tuple[bytes, dict]], type[MistError], str]] = {
    "bad sha256": (lambda: (make_blob(), {"declared_sha256": "0" * 64}), DataLossError, "sha256"),
    "bad size": (lambda: (make_blob(), {"declared_size": 10}), DataLossError, "declared 10"),
    "not safetensors": (lambda: (os.urandom(4096), {}), InvalidArgumentError, "not a valid safetensors"),
    "pickle": (lambda: (pickle.dumps(safetensors.numpy.load(make_blob())), {}), InvalidArgumentError, "pickle"),
    "wrong shapes": (lambda: (make_blob(config=replace(CONFIG, rank=8)), {}), FailedPreconditionError, "wrong shape"),
    "other pooling": (
        lambda: (make_blob(metadata={CONFIG_METADATA_KEY: replace(CONFIG, pooling="mean").to_json()}), {}),
        FailedPreconditionError,
        "trained for edge network",
    ),
    "NaN weights": (lambda: (_nan_blob(), {}), InvalidArgumentError, "NaN or Inf"),
    "NaN metric": (lambda: (make_blob(), {"metrics": {"loss": float("nan")}}), InvalidArgumentError, "metrics"),
    "bad details": (lambda: (make_blob(), {"details_json": "{oops"}), InvalidArgumentError, "details_json"),
}


@pytest.mark.parametrize("case", list(REFUSED_PUSHES.values()), ids=list(REFUSED_PUSHES))
def test_refused_pushes_raise_their_error_and_store_nothing(store, case):
    # Prepare
    build, error, message = case
    store.create_task(make_task())
    blob, kwargs = build()

    # Execute
    with pytest.raises(error, match=message):
        store.push_version("cats", blob, parent_version=0, **kwargs)

    # Assert
    assert store.get_task("cats").latest_version == 0
    assert store.list_versions("cats").items == []
    assert store.stats().bytes_stored == 0


def test_a_push_on_a_stale_parent_is_aborted_unless_forced(store):
    # Prepare
    store.create_task(make_task())
    push(store, 1, parent=0)
    push(store, 2, parent=1)

    # Execute
    with pytest.raises(AbortedError, match="is at version 2 but the push is based on 1"):
        push(store, 3, parent=1)
    forced = store.push_version("cats", make_blob(3), parent_version=1, force=True)

    # Assert
    assert (forced.number, forced.parent_version) == (3, 1)
    with pytest.raises(NotFoundError, match="parent version 9"):
        push(store, 4, parent=9, force=True)


def test_unknown_names_and_numbers_are_not_found(store):
    # Prepare
    store.create_task(make_task())
    with pytest.raises(NotFoundError, match="has no versions yet"):
        store.get_version("cats")
    push(store, 1, parent=0)

    # Execute / Assert
    calls: list[Callable[[], Any]] = [
        lambda: store.get_task("dogs"),
        lambda: store.push_version("dogs", make_blob(), parent_version=0),
        lambda: store.get_version("cats", number=5),
        lambda: store.get_version("cats", alias="production"),
        lambda: store.read_blob("cats", 9),
        lambda: store.list_versions("dogs"),
        lambda: store.delete_version("cats", 4),
        lambda: store.get_alias("cats", "production"),
        lambda: store.delete_alias("cats", "production"),
        lambda: store.set_alias("cats", "production", 2),
        lambda: store.list_aliases("dogs"),
        lambda: store.alias_history("dogs"),
        lambda: store.revoke_token("nobody"),
        lambda: store.create_token("reader", "dogs", "read"),
    ]
    for call in calls:
        with pytest.raises(NotFoundError):
            call()


def test_versions_are_listed_newest_first_in_pages(store):
    # Prepare
    store.create_task(make_task())
    store.create_task(make_task("dogs"))
    for number in range(1, 6):
        push(store, number, parent=number - 1)

    # Execute
    pages = [store.list_versions("cats", page_size=2)]
    while pages[-1].next_page_token:
        pages.append(store.list_versions("cats", page_size=2, page_token=pages[-1].next_page_token))

    # Assert
    assert [[v.number for v in page.items] for page in pages] == [[5, 4], [3, 2], [1]]
    for bad_token in ("garbage!", "bm90IGpzb24", store.list_tasks(page_size=1).next_page_token):
        with pytest.raises(InvalidArgumentError, match="page token"):
            store.list_versions("cats", page_token=bad_token)
    with pytest.raises(InvalidArgumentError, match="another listing"):
        store.list_versions("dogs", page_token=pages[0].next_page_token)
    with pytest.raises(InvalidArgumentError, match="page_size"):
        store.list_versions("cats", page_size=-1)


def test_deleting_versions_keeps_numbers_and_refuses_aliased_ones(store):
    # Prepare
    store.create_task(make_task())
    for number in range(1, 4):
        push(store, number, parent=number - 1)
    store.set_alias("cats", "production", 3)

    # Execute
    with pytest.raises(FailedPreconditionError, match=r"target of aliases \['production'\]"):
        store.delete_version("cats", 3)
    store.set_alias("cats", "production", 1)
    store.delete_version("cats", 3)
    store.delete_version("cats", 2)
    after_delete = store.get_task("cats").latest_version
    new = push(store, 9, parent=1)

    # Assert
    assert after_delete == 1
    assert new == 4  # numbers 2 and 3 are never given again
    assert [v.number for v in store.list_versions("cats").items] == [4, 1]
    with pytest.raises(NotFoundError):
        store.get_version("cats", number=3)
    assert store.integrity_check() == []


# ---- aliases ---------------------------------------------------------------------------------------


def test_aliases_move_by_compare_and_set_and_roll_back_from_history(store):
    # Prepare
    store.create_task(make_task())
    for number in range(1, 4):
        push(store, number, parent=number - 1)

    # Execute
    store.set_alias("cats", "production", 1, expected_version=0, moved_by="alice")
    with pytest.raises(AbortedError, match="points to version 1, not the expected 0"):
        store.set_alias("cats", "production", 2, expected_version=0)
    store.set_alias("cats", "production", 2, expected_version=1, moved_by="bob")
    with pytest.raises(AbortedError):
        store.set_alias("cats", "production", 3, expected_version=1)
    last_move = store.alias_history("cats", "production")[0]
    rolled_back = store.set_alias("cats", "production", last_move.from_version, expected_version=2, moved_by="carol")
    store.set_alias("cats", "staging", 3)
    unchanged = store.set_alias("cats", "staging", 3, moved_by="dave")  # already there: no move

    # Assert
    assert (rolled_back.alias.version, rolled_back.alias.updated_by, rolled_back.moved) == (1, "carol", True)
    assert (unchanged.alias.updated_by, unchanged.moved) == ("anonymous", False)
    assert store.get_version("cats", alias="production").number == 1
    history = store.alias_history("cats", "production")
    assert [(m.from_version, m.to_version, m.moved_by) for m in history] == [
        (2, 1, "carol"),
        (1, 2, "bob"),
        (0, 1, "alice"),
    ]
    assert [m.name for m in store.alias_history("cats")] == ["staging", "production", "production", "production"]
    assert len(store.alias_history("cats", limit=2)) == 2
    assert [(a.name, a.version) for a in store.list_aliases("cats")] == [("production", 1), ("staging", 3)]


def test_alias_delete_is_compare_and_set_and_recorded(store):
    # Prepare
    store.create_task(make_task())
    push(store, 1, parent=0)
    store.set_alias("cats", "canary", 1)

    # Execute
    with pytest.raises(AbortedError, match="not the expected 2"):
        store.delete_alias("cats", "canary", expected_version=2)
    store.delete_alias("cats", "canary", expected_version=1, moved_by="ops")

    # Assert
    with pytest.raises(NotFoundError):
        store.get_alias("cats", "canary")
    move = store.alias_history("cats", "canary")[0]
    assert (move.from_version, move.to_version, move.moved_by) == (1, 0, "ops")
    with pytest.raises(InvalidArgumentError, match="reserved"):
        store.set_alias("cats", "latest", 1)


# ---- tokens ----------------------------------------------------------------------------------------


def test_tokens_are_stored_hashed_resolve_and_stop_resolving_once_revoked(store, store_url):
    # Prepare
    store.create_task(make_task())

    # Execute
    token = store.create_token("device-7", "cats", "read_write")
    principal = store.resolve_token(token)
    stored = raw_query(store_url, "SELECT name, token_sha256 FROM tokens")
    store.revoke_token("device-7")

    # Assert
    assert principal == Principal(name="device-7", task="cats", scope="read_write")
    assert principal.allows("cats", write=True) and not principal.allows("dogs", write=False)
    assert stored == [("device-7", hashlib.sha256(token.encode()).hexdigest())]
    assert token.startswith("mist_") and len(token) >= 40
    assert store.resolve_token(token) is None
    assert store.resolve_token("mist_" + "x" * 43) is None


def test_token_refusals_and_the_configured_admin(store_url):
    # Prepare
    admin_token = "mist_admin-secret"
    store = open_store(store_url, admin_token_sha256=hash_token(admin_token))
    store.create_task(make_task())
    store.create_token("reader", "cats", "read")

    # Execute / Assert
    try:
        admin = store.resolve_token(admin_token)
        assert admin == Principal("admin", None, "admin") and admin.allows("any-task", write=True)
        assert store.resolve_token(admin_token + "x") is None
        assert store.resolve_token(store.create_token("ops", None, "admin")) == Principal("ops", None, "admin")
        assert not store.resolve_token(store.create_token("r2", "cats", "read")).allows("cats", write=True)
        with pytest.raises(AlreadyExistsError):
            store.create_token("reader", "cats", "read")
        with pytest.raises(InvalidArgumentError):
            store.create_token("boss", "cats", "admin")
        with pytest.raises(InvalidArgumentError):
            store.create_token("writer", "cats", "write")  # type: ignore[arg-type]
    finally:
        store.close()


# ---- concurrency -----------------------------------------------------------------------------------


def _race(store: RegistryStore, count: int, push_one: Callable[[int], int]) -> tuple[list[int], int]:
    """Runs push_one(i) for i < count on `count` threads released together; -> (numbers won, aborted)."""
    barrier = threading.Barrier(count)

    def attempt(i: int) -> int | None:
        barrier.wait()
        try:
            return push_one(i)
        except AbortedError:
            return None

    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(attempt, range(count)))
    return sorted(r for r in results if r is not None), results.count(None)


def test_threads_pushing_on_one_parent_exactly_one_wins(store):
    # Prepare
    store.create_task(make_task())
    push(store, 0, parent=0)

    # Execute
    won, aborted = _race(store, THREADS, lambda i: push(store, 100 + i, parent=1))

    # Assert
    assert (won, aborted) == ([2], THREADS - 1)
    assert store.get_task("cats").latest_version == 2


def test_threads_pushing_with_force_get_numbers_without_gaps_or_duplicates(store):
    # Prepare
    store.create_task(make_task())

    # Execute
    won, aborted = _race(store, THREADS, lambda i: push(store, i, parent=0, force=True))

    # Assert
    assert (won, aborted) == (list(range(1, THREADS + 1)), 0)
    assert sorted(v.number for v in store.list_versions("cats").items) == won
    assert store.integrity_check() == []


PUSHER = """
import sys
from services.registry.store import open_store
url, blob_path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = open_store(url)
blob = open(blob_path, "rb").read()
for _ in range(count):
    print(store.push_version("cats", blob, parent_version=0, force=True).number, flush=True)
"""


def test_processes_pushing_with_force_get_numbers_without_gaps_or_duplicates(store, store_url, tmp_path):
    # Prepare
    store.create_task(make_task())
    blob_path = tmp_path / "weights.safetensors"
    blob_path.write_bytes(make_blob())

    # Execute
    children = run_children(PUSHER, [[store_url, str(blob_path), "5"] for _ in range(4)])
    outputs = [child.communicate(timeout=60)[0] for child in children]

    # Assert
    assert [child.returncode for child in children] == [0] * 4
    numbers = sorted(int(line) for output in outputs for line in output.split())
    assert numbers == list(range(1, 21))
    assert store.integrity_check() == []


CRASH_PUSHER = """
import os, sys
from services.registry.store import open_store
url, blob_path, ack_path = sys.argv[1:4]
store = open_store(url)
blob = open(blob_path, "rb").read()
ack = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
while True:
    latest = store.get_task("cats").latest_version
    number = store.push_version("cats", blob, parent_version=latest).number
    os.write(ack, f"{number}\\n".encode())  # one write: a kill never leaves half a line
"""


def test_sigkill_during_pushes_loses_no_acknowledged_version(store_url, tmp_path):
    # Prepare
    with open_store(store_url) as setup:
        setup.create_task(make_task())
    blob_path, ack_path = tmp_path / "weights.safetensors", tmp_path / "acks"
    blob_path.write_bytes(make_blob())
    rng = random.Random(7)
    kills = 5

    for _ in range(kills):
        # Execute: wait for the child's first acknowledged push, then kill it at a random moment.
        acked_before = len(ack_path.read_bytes().split()) if ack_path.exists() else 0
        child = run_children(CRASH_PUSHER, [[store_url, str(blob_path), str(ack_path)]])[0]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            not ack_path.exists() or len(ack_path.read_bytes().split()) == acked_before
        ):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()

        # Assert: every acknowledged push is there, intact, and the database is consistent.
        with open_store(store_url) as reopened:
            acked = [int(line) for line in ack_path.read_text().split()]
            stored = {v.number for v in all_versions(reopened, "cats")}
            assert reopened.integrity_check() == []
            assert set(acked) <= stored
            assert reopened.read_blob("cats", max(acked)) == blob_path.read_bytes()
    # A kill can cost at most the one push it interrupted after commit, before its acknowledgement.
    assert len(acked) >= kills and len(stored) - len(acked) <= kills
    assert sorted(stored) == list(range(1, len(stored) + 1))


# ---- integrity, schema, URLs, stats ----------------------------------------------------------------


def test_integrity_check_finds_a_damaged_blob_and_reads_refuse_it(store, store_url):
    # Prepare
    store.create_task(make_task())
    push(store, 1, parent=0)
    push(store, 2, parent=1)
    raw_query(store_url, "UPDATE blobs SET data = ? WHERE task = 'cats' AND number = 2", (make_blob(99),))

    # Execute
    problems = store.integrity_check()

    # Assert
    assert problems == ["version 2 of task 'cats': stored blob does not match its recorded size and sha256"]
    with pytest.raises(DataLossError):
        store.read_blob("cats", 2)
    assert len(store.read_blob("cats", 1)) == len(make_blob(1))


def test_integrity_check_finds_a_gap_in_version_numbers(store, store_url):
    # Prepare
    store.create_task(make_task())
    for number in range(1, 4):
        push(store, number, parent=number - 1)
    raw_query(store_url, "DELETE FROM blobs WHERE number = 2")
    raw_query(store_url, "DELETE FROM versions WHERE number = 2")

    # Execute / Assert
    assert store.integrity_check() == ["task 'cats': version numbers [1, 3]... are not 1..3"]


def test_reopening_keeps_everything_and_a_newer_schema_is_refused(store, store_url):
    # Prepare
    store.create_task(make_task())
    version = store.push_version("cats", make_blob(), parent_version=0)
    store.close()

    # Execute
    reopened = open_store(store_url)
    same = reopened.get_version("cats")
    reopened.close()
    raw_query(store_url, "UPDATE schema_version SET version = 99")

    # Assert
    assert same == version
    with pytest.raises(FailedPreconditionError, match="schema version 99"):
        open_store(store_url)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "mysql://root@localhost/db",
        "sqlite://relative.db",
        "sqlite:///",
        "sqlite:///:memory:",
        "sqlite:////no/such/directory/registry.db",
        "postgresql://host:notaport/db",
        "postgresql://[bad",
    ],
)
def test_bad_database_urls_are_invalid_argument(url):
    with pytest.raises(InvalidArgumentError):
        open_store(url)


def test_a_file_that_is_not_sqlite_is_invalid_argument(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(make_blob())
    with pytest.raises(InvalidArgumentError, match="cannot use the SQLite database"):
        open_store(f"sqlite:///{path}")


def test_an_unreachable_postgresql_is_unavailable():
    with pytest.raises(UnavailableError, match="cannot connect to PostgreSQL at 127.0.0.1:1/db"):
        open_store("postgresql://postgres@127.0.0.1:1/db")


def test_stats_count_live_versions_and_bytes(store):
    # Prepare
    store.create_task(make_task())
    store.create_task(make_task("dogs"))
    sizes = [store.push_version("cats", make_blob(i), parent_version=i).size_bytes for i in range(3)]
    store.delete_version("cats", 1)
    store.set_alias("cats", "production", 3)

    # Execute
    stats = store.stats()

    # Assert
    assert stats.versions_by_task == {"cats": 2, "dogs": 0}
    assert (stats.tasks, stats.aliases, stats.bytes_stored) == (2, 1, sum(sizes[1:]))


def test_a_closed_store_is_unavailable(store_url):
    closed = open_store(store_url)
    closed.close()
    with pytest.raises(UnavailableError, match="closed"):
        closed.list_tasks()


def test_pooled_connections_the_server_dropped_are_replaced(postgres_server):
    # Prepare: a store holding pooled connections, then the server drops every client connection.
    url = postgres_server.create_schema()
    store = open_store(url)
    store.create_task(make_task())
    _race(store, 4, lambda i: store.get_task("cats").latest_version)
    others = "pid <> pg_backend_pid() AND backend_type = 'client backend'"
    raw_query(url, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {others}")
    deadline = time.monotonic() + 10
    while raw_query(url, f"SELECT count(*) FROM pg_stat_activity WHERE {others}")[0][0] and time.monotonic() < deadline:
        time.sleep(0.05)

    # Execute
    try:
        task = store.get_task("cats")
        version = store.push_version("cats", make_blob(), parent_version=0)
    finally:
        store.close()

    # Assert
    assert (task.name, version.number) == ("cats", 1)


def _backends(server: PostgresServer, application_name: str) -> list[int]:
    """The server processes serving connections named `application_name`, asked over a connection named otherwise
    (a connection of that name that was just closed may still be listed while its process exits)."""
    sql = "SELECT pid FROM pg_stat_activity WHERE application_name = ?"
    return [row[0] for row in raw_query(server.url(), sql, (application_name,))]


def test_a_connection_killed_server_side_is_not_handed_to_the_next_call(postgres_server):
    # Prepare: a pool of one connection, named so that the test can find its server process and kill it.
    url = postgres_server.create_schema() + "&application_name=mist-kill-test"
    store = open_store(url, max_connections=1)
    try:
        store.create_task(make_task())
        deadline = time.monotonic() + 10
        while len(backends := _backends(postgres_server, "mist-kill-test")) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the connection open_store tried the server with may still be on its way out
        [killed] = backends
        raw_query(postgres_server.url(), "SELECT pg_terminate_backend(?)", (killed,))
        while killed in _backends(postgres_server, "mist-kill-test") and time.monotonic() < deadline:
            time.sleep(0.05)

        # Execute: the next calls would fail on the dead connection (nothing retries them); they get a new one.
        version = store.push_version("cats", make_blob(), parent_version=0)
        task = store.get_task("cats")
        after = _backends(postgres_server, "mist-kill-test")
    finally:
        store.close()

    # Assert
    assert (version.number, task.latest_version) == (1, 1)
    assert len(after) == 1 and after != [killed]


def test_a_call_that_finds_every_connection_busy_is_unavailable_after_the_timeout(store_url):
    # Prepare: one connection, held by an open transaction.
    from services.registry.sql import Database

    db = Database(store_url, max_connections=1, busy_timeout_s=0.3, pool_timeout_s=0.3)
    store = RegistryStore(db)
    try:
        with db.read():
            started = time.monotonic()

            # Execute
            with pytest.raises(UnavailableError) as caught:
                store.list_tasks()
            waited = time.monotonic() - started
        listed = store.list_tasks()  # the connection is free again
    finally:
        store.close()

    # Assert
    assert "within 0.3 s" in str(caught.value) or "busy for 0.3 s" in str(caught.value)
    assert 0.25 < waited < 5 and listed.items == []


def test_closing_the_store_closes_its_postgresql_connections(postgres_server):
    # Prepare: a store that has opened several connections.
    url = postgres_server.create_schema() + "&application_name=mist-close-test"
    store = open_store(url)
    store.create_task(make_task())
    _race(store, 4, lambda i: store.get_task("cats").latest_version)
    opened = len(_backends(postgres_server, "mist-close-test"))

    # Execute
    store.close()
    deadline = time.monotonic() + 10
    while _backends(postgres_server, "mist-close-test") and time.monotonic() < deadline:
        time.sleep(0.05)

    # Assert
    assert opened >= 1
    assert _backends(postgres_server, "mist-close-test") == []
    with pytest.raises(UnavailableError, match="closed"):
        store.get_task("cats")


def test_a_database_that_refuses_connections_is_unavailable_at_once_and_recovers(postgres_server):
    # Prepare: a store on its own database, then that database refuses connections and loses the ones it had.
    url = postgres_server.create_database()
    name = url.rsplit("/", 1)[1]
    store = open_store(url)
    try:
        store.create_task(make_task())
        raw_query(postgres_server.url(), f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
        raw_query(
            postgres_server.url(), "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ?", (name,)
        )

        # Execute
        started = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            store.get_task("cats")
        waited = time.monotonic() - started
        raw_query(postgres_server.url(), f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
        task = store.get_task("cats")
    finally:
        store.close()

    # Assert: told why within about a second (not after the 10 s pool timeout), and served again once it can be.
    assert "cannot connect to PostgreSQL" in str(caught.value) and "not currently accepting connections" in str(
        caught.value
    )
    assert waited < 5
    assert task.name == "cats"
