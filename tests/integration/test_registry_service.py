"""The registry through a real gRPC server on 127.0.0.1 port 0, on SQLite and on a real PostgreSQL: happy paths,
every refusal with its status code (nothing stored after one), auth scopes, concurrent pushes from threads and
processes, metrics, TLS, and the server process under SIGTERM (drain) and SIGKILL (no acknowledged push lost)."""

from __future__ import annotations

import hashlib
import logging
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.clients.channel import health_check
from services.common.clients.registry import RegistryClient
from services.common.config import parse_config
from services.common.errors import InvalidArgumentError, MistError
from services.common.pb import registry_pb2, registry_pb2_grpc
from services.common.wire.edge_spec import EdgeNetworkConfig, state_shapes
from services.registry.config import RegistryConfig, describe_db, read_admin_token
from services.registry.metrics import StoreCollector
from services.registry.serde import task_from_proto
from services.registry.store import max_blob_bytes, open_store
from tests.helpers.certs import make_certs
from tests.helpers.process import ROOT as REPO_ROOT
from tests.helpers.registry import (
    CONFIG,
    InProcessRegistry,
    RegistryProcess,
    all_versions,
    make_blob,
    task_proto,
)

ADMIN_TOKEN = "admin-Zq9x7Lw2PpV4aa"  # the tests grep logs for it
CHUNK = 4096  # the smallest chunk the server allows: a test blob (~7 KB) travels in two chunks
THREADS = 12
Code = grpc.StatusCode


# ---- fixtures and helpers ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/registry.db"
    return request.getfixturevalue("postgres_server").create_schema()


def config(db_url: str, **changes: Any) -> RegistryConfig:
    return RegistryConfig(db=db_url, metrics_listen="off", chunk_size_bytes=CHUNK, **changes)


@pytest.fixture
def server(db_url: str) -> Iterator[InProcessRegistry]:
    with InProcessRegistry(config(db_url)) as running:
        yield running


@pytest.fixture
def client(server: InProcessRegistry, tmp_path: Path) -> Iterator[RegistryClient]:
    with RegistryClient(server.target, chunk_size_bytes=CHUNK, timeout_s=20, cache_dir=tmp_path / "cache") as c:
        c.create_task(task_proto("cats"))
        yield c


@pytest.fixture
def stub(server: InProcessRegistry) -> Iterator[registry_pb2_grpc.RegistryStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield registry_pb2_grpc.RegistryStub(channel)


def code_of(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Code:
    try:
        result = call(*args, **kwargs)
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as error:  # a raw stub
        return error.code()
    except MistError as error:  # RegistryClient raises the domain error of the status
        return Code[error.code]
    return Code.OK


def header(task: str = "cats", blob: bytes = b"", **fields: Any) -> registry_pb2.PushVersionRequest:
    values = {"sha256": hashlib.sha256(blob).hexdigest(), "size_bytes": len(blob), **fields}
    return registry_pb2.PushVersionRequest(header=registry_pb2.PushHeader(task=task, **values))


def chunks(blob: bytes, size: int = CHUNK) -> list[registry_pb2.PushVersionRequest]:
    return [registry_pb2.PushVersionRequest(chunk=blob[i : i + size]) for i in range(0, len(blob), size)]


def refusal(call: Callable[[], Any]) -> tuple[Code | None, str]:
    """(status code, details) of a refused RPC, (None, message) of a client-side MistError, (OK, "")."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details()
    except MistError as error:  # RegistryClient: the server's status as a domain error (cause: the RpcError)
        if isinstance(error.__cause__, grpc.RpcError):
            return Code[error.code], str(error)
        return None, str(error)
    return Code.OK, ""


def numbers(client: RegistryClient, task: str = "cats") -> list[int]:
    return [v.number for v in client.list_versions(task)]


# ---- happy paths -------------------------------------------------------------------------------------------


def test_a_pushed_version_pulls_back_by_number_alias_and_latest(client, server):
    blob = make_blob(1)

    pushed = client.push(
        "cats",
        blob,
        parent_version=0,
        metrics={"val_accuracy": 0.75, "epochs": 3.0},
        details_json='{"k_scores": {"2": 0.75}}',
        dataset_fingerprint="d" * 64,
        tuner="mist-tuner/test",
        tags={"run": "a"},
    )
    client.set_alias("cats", "production", pushed.number, expected_version=0)
    by_number = client.pull("cats", version=1, use_cache=False)
    by_alias = client.pull("cats", alias="production", use_cache=False)
    latest = client.pull("cats", use_cache=False)
    described = client.get_version("cats", alias="production")

    assert (pushed.number, pushed.size_bytes, pushed.sha256) == (1, len(blob), hashlib.sha256(blob).hexdigest())
    assert by_number.blob == by_alias.blob == latest.blob == blob
    assert by_alias.version == pushed == described
    assert dict(pushed.metrics) == {"val_accuracy": 0.75, "epochs": 3.0} and dict(pushed.tags) == {"run": "a"}
    assert (pushed.parent_version, pushed.pushed_by, pushed.tuner) == (0, "anonymous", "mist-tuner/test")
    assert pushed.details_json == '{"k_scores": {"2": 0.75}}'
    assert latest.task.latest_version == 1 and latest.task.class_names == ("cat", "dog", "fox")
    assert server.metric("mist_registry_pushes_total", code="OK") == 1
    assert server.metric("mist_registry_pulled_bytes_total") == 3 * len(blob)
    assert server.metric("mist_registry_stored_bytes") == len(blob)
    assert server.metric("mist_registry_versions", task="cats") == 1


def test_a_created_task_reads_back_as_defined_and_exist_ok_is_idempotent(client):
    again = client.create_task(task_proto("cats"), exist_ok=True)
    listed = list(client.list_tasks())

    definition = task_from_proto(task_proto("cats"))
    assert again.same_definition(definition)  # edge config, codec name, mode, classes all round-trip
    assert definition.codec == "i8-zstd" and definition.edge["rank"] == CONFIG.rank
    assert [t.name for t in listed] == ["cats"] and listed[0].created_at is not None
    assert code_of(client.create_task, task_proto("cats")) == Code.ALREADY_EXISTS


def test_weights_saved_by_the_real_edge_network_are_accepted_and_load_back(client):
    torch = pytest.importorskip("torch")
    from services.tuner.edge_network import EdgeNetwork, from_safetensors_bytes, to_safetensors_bytes

    torch.manual_seed(0)
    model = EdgeNetwork(CONFIG)
    blob = to_safetensors_bytes(model)

    client.push("cats", blob, parent_version=0)
    loaded, _ = from_safetensors_bytes(client.pull("cats", use_cache=False).blob, CONFIG)

    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_weights_already_held_are_not_downloaded_again(client, server, stub, tmp_path):
    first = client.push("cats", make_blob(1), parent_version=0)
    device = RegistryClient(server.target, chunk_size_bytes=CHUNK, cache_dir=tmp_path / "device")

    cold = device.pull("cats", alias=None)
    warm = device.pull("cats")
    raw = list(stub.PullVersion(registry_pb2.PullVersionRequest(task="cats", have_sha256=first.sha256.upper())))
    second = client.push("cats", make_blob(2), parent_version=1)
    after_push = device.pull("cats")
    device.close()

    assert (cold.from_cache, warm.from_cache, after_push.from_cache) == (False, True, False)
    assert warm.blob == make_blob(1) and after_push.blob == make_blob(2) and after_push.version == second
    assert len(raw) == 1 and raw[0].header.not_modified and raw[0].header.version.number == 1
    assert server.metric("mist_registry_pulls_not_modified_total") == 2
    assert server.metric("mist_registry_pulled_bytes_total") == len(make_blob(1)) + len(make_blob(2))


def test_the_pull_cache_survives_a_restart_and_drops_damaged_entries(client, server, tmp_path):
    pushed = client.push("cats", make_blob(1), parent_version=0)
    cache = tmp_path / "device"
    with RegistryClient(server.target, cache_dir=cache) as before_reboot:
        before_reboot.pull("cats", alias=None)

    with RegistryClient(server.target, cache_dir=cache) as after_reboot:
        remembered = after_reboot.pull("cats")
        (cache / f"{pushed.sha256}.safetensors").write_bytes(b"flipped bits")
        repaired = after_reboot.pull("cats")
    closed = refusal(lambda: after_reboot.pull("cats"))

    assert remembered.from_cache and remembered.blob == make_blob(1)
    assert not repaired.from_cache and repaired.blob == make_blob(1)
    assert (cache / f"{pushed.sha256}.safetensors").read_bytes() == make_blob(1)
    assert closed == (None, "this RegistryClient is closed")


def test_the_pull_cache_keeps_only_the_most_recently_used_blobs(client, server, tmp_path):
    shas = {n: client.push("cats", make_blob(n), parent_version=n - 1).sha256 for n in (1, 2, 3)}
    with RegistryClient(server.target, cache_dir=tmp_path / "small", max_cached_blobs=2) as device:
        for number in (1, 2, 3):
            device.pull("cats", version=number)
        again = device.pull("cats", version=3)
        evicted = device.pull("cats", version=1)

    kept = sorted(path.name for path in (tmp_path / "small").glob("*.safetensors"))
    assert again.from_cache and not evicted.from_cache and evicted.blob == make_blob(1)
    assert kept == sorted(f"{shas[n]}.safetensors" for n in (1, 3))  # 2 was the least recently used


def test_a_pull_arrives_in_chunks_of_the_requested_size(client, stub):
    blob = make_blob(1)
    client.push("cats", blob, parent_version=0)

    parts = list(stub.PullVersion(registry_pb2.PullVersionRequest(task="cats", chunk_size=5000)))
    tiny = list(stub.PullVersion(registry_pb2.PullVersionRequest(task="cats", chunk_size=1)))

    assert parts[0].WhichOneof("part") == "header"
    assert [len(p.chunk) for p in parts[1:]] == [CHUNK, len(blob) - CHUNK]  # clipped to the server's 4096
    assert len(tiny) == 3  # 1 byte is raised to the 4096-byte minimum, not a message per byte


def test_tasks_and_versions_are_listed_in_pages(client, stub):
    for name in ("e", "b", "d", "a"):
        client.create_task(task_proto(name))
    for seed in range(5):
        client.push("cats", make_blob(seed), parent_version=seed)

    first = stub.ListTasks(registry_pb2.ListTasksRequest(page_size=2))
    second = stub.ListTasks(registry_pb2.ListTasksRequest(page_size=2, page_token=first.next_page_token))
    third = stub.ListTasks(registry_pb2.ListTasksRequest(page_size=2, page_token=second.next_page_token))
    pages = []
    token = ""
    while True:
        page = stub.ListVersions(registry_pb2.ListVersionsRequest(task="cats", page_size=2, page_token=token))
        pages.append([v.number for v in page.versions])
        token = page.next_page_token
        if not token:
            break

    assert [[t.name for t in p.tasks] for p in (first, second, third)] == [["a", "b"], ["cats", "d"], ["e"]]
    assert third.next_page_token == ""
    assert pages == [[5, 4], [3, 2], [1]]
    assert [t.name for t in client.list_tasks(page_size=2)] == ["a", "b", "cats", "d", "e"]
    assert code_of(stub.ListTasks, registry_pb2.ListTasksRequest(page_token="garbage!")) == Code.INVALID_ARGUMENT


def test_aliases_move_by_compare_and_set_keep_history_and_roll_back(client, server):
    for seed in range(3):
        client.push("cats", make_blob(seed), parent_version=seed)

    client.set_alias("cats", "production", 1, expected_version=0)
    client.set_alias("cats", "production", 2, expected_version=1)
    lost = code_of(client.set_alias, "cats", "production", 3, expected_version=1)
    client.set_alias("cats", "production", 2)  # already there: no move
    rolled = client.rollback_alias("cats", "production")
    client.delete_alias("cats", "production", expected_version=1)
    restored = client.rollback_alias("cats", "production")
    history = [(m.from_version, m.to_version) for m in client.alias_history("cats", "production")]

    assert lost == Code.ABORTED
    assert rolled.version == 1 and restored.version == 1
    assert history == [(0, 1), (1, 0), (2, 1), (1, 2), (0, 1)]
    assert [(a.name, a.version) for a in client.list_aliases("cats")] == [("production", 1)]
    assert server.metric("mist_registry_alias_moves_total") == 5


def test_deleting_versions_refuses_aliased_ones_and_never_reuses_numbers(client):
    for seed in range(3):
        client.push("cats", make_blob(seed), parent_version=seed)
    client.set_alias("cats", "staging", 2)

    aliased = code_of(client.delete_version, "cats", 2)
    client.delete_version("cats", 3)
    client.delete_version("cats", 1)
    after = client.push("cats", make_blob(9), parent_version=2)

    assert aliased == Code.FAILED_PRECONDITION
    assert after.number == 4 and numbers(client) == [4, 2]
    assert code_of(client.get_version, "cats", version=3) == Code.NOT_FOUND
    assert code_of(client.delete_version, "cats", 3) == Code.NOT_FOUND


# ---- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_task("nope"),
        lambda c: c.pull("nope"),
        lambda c: c.pull("cats"),  # no versions yet
        lambda c: c.pull("cats", version=7),
        lambda c: c.pull("cats", alias="production"),
        lambda c: c.get_version("cats", alias="staging"),
        lambda c: list(c.list_versions("nope")),
        lambda c: c.set_alias("cats", "production", 1),
        lambda c: c.alias_history("nope"),
        lambda c: c.push("nope", make_blob(0), parent_version=0),
    ],
    ids=["task", "pull-task", "pull-empty", "version", "alias", "get-alias", "list", "set-alias", "history", "push"],
)
def test_unknown_tasks_versions_and_aliases_are_not_found(client, call):
    assert code_of(call, client) == Code.NOT_FOUND


def _wrong_shapes() -> bytes:
    return make_blob(0, shapes=state_shapes(EdgeNetworkConfig(dims=32, tokens=17, num_classes=4, num_blocks=2, rank=4)))


PUSH_REFUSALS = {
    "random-bytes": (lambda: random.Random(0).randbytes(5000), {}, Code.INVALID_ARGUMENT),
    "pickle": (lambda: pickle.dumps({"head.weight": [0.5] * 100}), {}, Code.INVALID_ARGUMENT),
    "nan": (lambda: make_blob(0, nan=True), {}, Code.INVALID_ARGUMENT),
    "wrong-shapes": (_wrong_shapes, {}, Code.FAILED_PRECONDITION),
    "stale-parent": (lambda: make_blob(5), {"parent_version": 0}, Code.ABORTED),
    "future-parent": (lambda: make_blob(5), {"parent_version": 9}, Code.NOT_FOUND),
    "sha-mismatch": (lambda: make_blob(5), {"sha256": "0" * 64}, Code.DATA_LOSS),
    "size-mismatch": (lambda: make_blob(5), {"size_bytes": 100}, Code.DATA_LOSS),
    "bad-metric": (lambda: make_blob(5), {"metrics": {"": 1.0}}, Code.INVALID_ARGUMENT),
    "over-task-limit": (
        lambda: b"\0" * (max_blob_bytes(task_from_proto(task_proto())) + 1),
        {"size_bytes": 0},
        Code.RESOURCE_EXHAUSTED,
    ),
}


@pytest.mark.parametrize("case", PUSH_REFUSALS, ids=list(PUSH_REFUSALS))
def test_refused_pushes_get_their_code_and_store_nothing(client, server, stub, case):
    make, fields, expected = PUSH_REFUSALS[case]
    client.push("cats", make_blob(1), parent_version=0)
    blob = make()

    code = code_of(stub.PushVersion, iter([header("cats", blob, **{"parent_version": 1, **fields}), *chunks(blob)]))

    assert code == expected
    assert numbers(client) == [1] and client.get_task("cats").latest_version == 1
    assert server.metric("mist_registry_pushes_total", code=expected.name) == 1
    assert server.metric("mist_registry_stored_bytes") == len(make_blob(1))


@pytest.mark.parametrize(
    "messages",
    [
        [],
        chunks(make_blob(0)),
        [header(blob=make_blob(0)), header(blob=make_blob(0)), *chunks(make_blob(0))],
        [header(blob=make_blob(0), sha256=""), *chunks(make_blob(0))],
        [header(blob=make_blob(0), sha256="xyz"), *chunks(make_blob(0))],
    ],
    ids=["empty", "no-header", "two-headers", "no-sha256", "bad-sha256"],
)
def test_a_push_needs_exactly_one_header_first_with_a_sha256(client, stub, messages):
    assert code_of(stub.PushVersion, iter(messages)) == Code.INVALID_ARGUMENT
    assert numbers(client) == []


def test_oversized_pushes_are_refused_before_they_are_buffered(db_url, tmp_path):
    blob = make_blob(0)  # two chunks: 4096 bytes and the rest
    with InProcessRegistry(config(db_url, max_blob_bytes=CHUNK)) as small:
        with RegistryClient(small.target) as c, grpc.insecure_channel(small.target) as channel:
            c.create_task(task_proto())
            stub = registry_pb2_grpc.RegistryStub(channel)

            undeclared = code_of(stub.PushVersion, iter([header(blob=blob, size_bytes=0), *chunks(blob)]))
            declared = code_of(stub.PushVersion, iter([header(blob=blob)]))
            received = small.metric("mist_registry_pushed_bytes_total")
            left = numbers(c)

    assert (undeclared, declared) == (Code.RESOURCE_EXHAUSTED, Code.RESOURCE_EXHAUSTED)
    assert left == [] and received == len(blob)  # the second chunk tipped it over; the header alone nothing


def test_a_push_abandoned_midway_stores_nothing(client, server, stub):
    blob = make_blob(0)
    release = threading.Event()

    def stalled() -> Iterator[registry_pb2.PushVersionRequest]:
        yield header(blob=blob, parent_version=0)
        yield chunks(blob)[0]
        release.wait(10)  # the rest never comes: the client gives up first

    future = stub.PushVersion.future(stalled())
    _wait_for(lambda: server.metric("mist_registry_pushed_bytes_total") == CHUNK)
    future.cancel()
    release.set()
    _wait_for(lambda: server.metric("mist_registry_pushes_total", code="CANCELLED") == 1)

    assert numbers(client) == [] and client.get_task("cats").latest_version == 0


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.mark.parametrize(
    "ref", [registry_pb2.VersionRef(number=0), registry_pb2.VersionRef(latest=False)], ids=["number-0", "latest-false"]
)
def test_malformed_version_refs_are_invalid_argument(client, stub, ref):
    client.push("cats", make_blob(0), parent_version=0)

    assert code_of(stub.GetVersion, registry_pb2.GetVersionRequest(task="cats", ref=ref)) == Code.INVALID_ARGUMENT


# ---- concurrency -------------------------------------------------------------------------------------------


def test_threads_pushing_on_one_parent_exactly_one_wins(client, server):
    client.push("cats", make_blob(0), parent_version=0)

    def attempt(seed: int) -> Code:
        return code_of(client.push, "cats", make_blob(seed), parent_version=1)

    with ThreadPoolExecutor(THREADS) as pool:
        codes = list(pool.map(attempt, range(1, THREADS + 1)))

    assert sorted(codes, key=lambda c: c.name) == [Code.ABORTED] * (THREADS - 1) + [Code.OK]
    assert numbers(client) == [2, 1]
    assert server.metric("mist_registry_pushes_total", code="ABORTED") == THREADS - 1


_FORCE_PUSHER = """
import sys
from services.common.clients.registry import RegistryClient
from tests.helpers.registry import make_blob
target, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with RegistryClient(target, chunk_size_bytes=4096) as client:
    for i in range(count):
        print(client.push("cats", make_blob(seed * 100 + i), parent_version=0, force=True).number, flush=True)
"""


def test_processes_pushing_with_force_get_numbers_without_gaps_or_duplicates(client, server):
    children, per_child = 3, 4

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FORCE_PUSHER, server.target, str(seed), str(per_child)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(children)
    ]
    outputs = [proc.communicate(timeout=60)[0] for proc in procs]

    acked = sorted(int(n) for out in outputs for n in out.split())
    assert [proc.returncode for proc in procs] == [0] * children
    assert acked == list(range(1, children * per_child + 1))
    assert sorted(numbers(client)) == acked


# ---- auth --------------------------------------------------------------------------------------------------


@pytest.fixture
def secured(db_url: str, tmp_path: Path) -> Iterator[InProcessRegistry]:
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    with InProcessRegistry(config(db_url, auth="on", admin_token_file=str(token_file))) as running:
        with RegistryClient(running.target, token=ADMIN_TOKEN) as admin:
            for name in ("cats", "dogs"):
                admin.create_task(task_proto(name))
            admin.push("cats", make_blob(0), parent_version=0)
        yield running


def connect(server: InProcessRegistry, token: str | None) -> RegistryClient:
    return RegistryClient(server.target, token=token, chunk_size_bytes=CHUNK, timeout_s=10)


def test_missing_or_unknown_tokens_are_unauthenticated_whether_or_not_the_task_exists(secured):
    anonymous, stranger = connect(secured, None), connect(secured, "mist_not-a-real-token-at-all")

    results = {
        (who, task): refusal(lambda c=c, t=task: c.get_task(t))
        for who, c in (("none", anonymous), ("unknown", stranger))
        for task in ("cats", "nope")
    }

    assert {code for code, _ in results.values()} == {Code.UNAUTHENTICATED}
    assert results["none", "cats"] == results["none", "nope"]
    assert results["unknown", "cats"] == results["unknown", "nope"]
    assert health_check(secured.target) == "SERVING"  # probes need no token


def test_per_task_tokens_reach_only_their_task_and_their_scope(secured):
    with (
        connect(secured, ADMIN_TOKEN) as admin,
        connect(secured, admin.create_token("device-1", task="cats", scope="read")) as reader,
        connect(secured, admin.create_token("tuner-1", task="cats", scope="read_write")) as writer,
    ):
        pulled = reader.pull("cats").blob
        pushed = writer.push("cats", make_blob(1), parent_version=1)
        moved = writer.set_alias("cats", "production", 2)
        other_task = {refusal(lambda t=t: writer.get_task(t)) for t in ("dogs", "nope")}
        read_writes = [
            refusal(lambda: reader.push("cats", make_blob(2), parent_version=2))[0],
            refusal(lambda: reader.set_alias("cats", "production", 1))[0],
            refusal(lambda: reader.delete_alias("cats", "production"))[0],
            refusal(lambda: reader.delete_version("cats", 1))[0],
        ]
        admin_only = [
            refusal(lambda: writer.create_task(task_proto("birds")))[0],
            refusal(lambda: writer.create_token("x", task="cats", scope="read"))[0],
        ]
        listed = [t.name for t in reader.list_tasks()]
        read_ok = refusal(lambda: reader.get_version("cats"))[0]

    assert pulled == make_blob(0)
    assert pushed.number == 2 and pushed.pushed_by == "tuner-1" and moved.updated_by == "tuner-1"
    assert len(other_task) == 1 and next(iter(other_task))[0] == Code.PERMISSION_DENIED  # same answer either way
    assert read_writes == [Code.PERMISSION_DENIED] * 4 and admin_only == [Code.PERMISSION_DENIED] * 2
    assert listed == ["cats"]
    assert read_ok == Code.OK


def test_a_revoked_token_stops_working_and_tokens_never_reach_the_log(secured, caplog):
    caplog.set_level(logging.INFO)
    with connect(secured, ADMIN_TOKEN) as admin:
        secret = admin.create_token("device-2", task="cats", scope="read")
        with connect(secured, secret) as device:
            before = refusal(lambda: device.get_task("cats"))[0]
            admin.revoke_token("device-2")
            after = refusal(lambda: device.get_task("cats"))[0]
        with grpc.insecure_channel(secured.target) as channel:
            unspecified = registry_pb2.CreateTokenRequest(name="y", task="cats")  # no scope
            unknown_scope = refusal(
                lambda: registry_pb2_grpc.RegistryStub(channel).CreateToken(
                    unspecified, metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")]
                )
            )

    assert (before, after) == (Code.OK, Code.UNAUTHENTICATED)
    assert unknown_scope[0] == Code.INVALID_ARGUMENT
    assert secret.startswith("mist_") and secret not in caplog.text and ADMIN_TOKEN not in caplog.text
    assert "token 'device-2' revoked by 'admin'" in caplog.text


# ---- configuration, TLS, metrics ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--db", "mysql://x"], "unsupported database URL"),
        (["--db", "sqlite:///x.db", "--auth", "on"], "--admin-token-file (env MIST_ADMIN_TOKEN_FILE): required"),
        (["--db", "sqlite:///x.db", "--auth-tokens-file", __file__], "keeps its tokens in its database"),
        (["--db", "sqlite:///x.db", "--chunk-size-bytes", "100"], "must be >= 4096"),
    ],
)
def test_bad_configurations_fail_with_a_message_naming_the_flag(argv, problem):
    with pytest.raises(InvalidArgumentError) as raised:
        parse_config(RegistryConfig, argv, {})

    assert problem in str(raised.value)


def test_admin_token_files_are_checked_and_db_passwords_masked(tmp_path):
    (tmp_path / "short").write_text("abc\n")
    (tmp_path / "good").write_text(f"  {ADMIN_TOKEN}\n")

    assert read_admin_token(str(tmp_path / "good")) == ADMIN_TOKEN
    with pytest.raises(InvalidArgumentError, match="at least 16 characters") as raised:
        read_admin_token(str(tmp_path / "short"))
    assert "abc" not in str(raised.value)
    assert describe_db("postgresql://mist:hunter2@db:5432/r") == "postgresql://mist:***@db:5432/r"
    assert describe_db("sqlite:////srv/mist/registry.db") == "sqlite:///.../registry.db"
    assert describe_db("sqlite:///data/registry.db") == "sqlite:///data/registry.db"
    off_with_file = {"MIST_DB": "sqlite:///x.db", "MIST_ADMIN_TOKEN_FILE": str(tmp_path / "good")}
    with pytest.raises(InvalidArgumentError, match="pass --auth on"):
        parse_config(RegistryConfig, [], off_with_file)


def test_the_store_gauges_report_a_store_that_cannot_be_read_as_down(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/r.db")
    healthy = {m.name: m.samples[0].value for m in StoreCollector(store).collect() if m.samples}
    store.close()

    down = [(m.name, [s.value for s in m.samples]) for m in StoreCollector(store).collect()]

    assert healthy == {
        "mist_registry_store_up": 1,
        "mist_registry_stored_bytes": 0,
        "mist_registry_tasks": 0,
        "mist_registry_aliases": 0,
    }
    assert down == [("mist_registry_store_up", [0])]


def test_mutual_tls_serves_clients_with_a_certificate_only(tmp_path):
    certs = make_certs(tmp_path)
    tls = {"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key), "tls_client_ca": str(certs.ca)}
    with InProcessRegistry(config(f"sqlite:///{tmp_path}/r.db", **tls)) as running:
        with RegistryClient(
            running.target, tls_ca=certs.ca, client_cert=certs.client_cert, client_key=certs.client_key
        ) as trusted:
            created = trusted.create_task(task_proto()).name
        with RegistryClient(running.target, tls_ca=certs.ca, timeout_s=5) as no_cert:
            refused = code_of(no_cert.get_task, "cats")

    assert created == "cats" and refused == Code.UNAVAILABLE


# ---- the server process: SIGTERM and SIGKILL ---------------------------------------------------------------


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_sigterm_finishes_an_in_flight_pull_then_exits_0(tmp_path):
    big = EdgeNetworkConfig(dims=512, tokens=17, num_classes=3, num_blocks=4, rank=32)  # a ~1 MiB blob
    blob = make_blob(0, big)
    server = RegistryProcess.start(f"sqlite:///{tmp_path}/r.db", "--chunk-size-bytes", str(CHUNK), "--grace-s", "10")
    try:
        with RegistryClient(server.target) as c:
            c.create_task(task_proto("big", big))
            c.push("big", blob, parent_version=0)
        # No BDP probing: the stream window stays at 64 KiB, so the server blocks until this client reads.
        with grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            stream = stub.PullVersion(registry_pb2.PullVersionRequest(task="big"), timeout=30)
            first = next(stream)
            _wait_for(
                lambda: 'requests_in_flight{method="/mist.v1.Registry/PullVersion"} 1.0' in _scrape(server.metrics_port)
            )
            scraped = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(_scrape(server.metrics_port))
                for s in family.samples
            }

            server.proc.send_signal(signal.SIGTERM)
            _wait_for(lambda: health_check(server.target) == "NOT_SERVING")
            refused = code_of(stub.GetTask, registry_pb2.GetTaskRequest(name="big"), timeout=5)
            received = b"".join(r.chunk for r in stream)
        exit_code = server.wait(20)
    finally:
        server.kill()

    assert first.header.version.sha256 == hashlib.sha256(blob).hexdigest() and received == blob
    assert refused == Code.UNAVAILABLE
    assert exit_code == 0
    assert scraped["mist_registry_pushes_total", (("code", "OK"),)] == 1
    assert scraped["mist_registry_pushed_bytes_total", ()] == len(blob)
    assert scraped["mist_registry_stored_bytes", ()] == len(blob)
    assert scraped["mist_registry_versions", (("task", "big"),)] == 1
    assert "received SIGTERM" in server.log() and "mist-registry stopped" in server.log()


def test_sigkill_during_pushes_loses_no_acknowledged_version(tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
    acked: dict[int, str] = {}
    rng = random.Random(7)
    for round_ in range(4):
        server = RegistryProcess.start(url, "--log-level", "warning")
        stop = threading.Event()

        def push_loop(target: str = server.target, round_: int = round_, stop: threading.Event = stop) -> None:
            with RegistryClient(target, chunk_size_bytes=CHUNK, timeout_s=10) as c:
                c.create_task(task_proto(), exist_ok=True)
                seed = 0
                while not stop.is_set():
                    blob = make_blob(round_ * 1000 + seed)
                    seed += 1
                    try:
                        version = c.push("cats", blob, parent_version=0, force=True)
                    except MistError:
                        return  # the server died under this push: not acknowledged
                    acked[version.number] = hashlib.sha256(blob).hexdigest()

        pusher = threading.Thread(target=push_loop)
        before = len(acked)
        pusher.start()
        _wait_for(lambda b=before: len(acked) > b)
        time.sleep(rng.uniform(0.0, 0.3))
        server.kill()
        stop.set()
        pusher.join(10)

        with open_store(url) as store:
            problems = store.integrity_check()
            stored = {v.number: v.sha256 for v in all_versions(store, "cats")}
        assert problems == []
        assert all(stored.get(n) == sha for n, sha in acked.items())
        assert sorted(stored) == list(range(1, len(stored) + 1))
        # At most the one push in flight at the kill committed without its acknowledgement.
        assert len(stored) - len(acked) <= round_ + 1
