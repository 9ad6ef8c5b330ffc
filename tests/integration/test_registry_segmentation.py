"""Segmentation tasks in the registry through a real gRPC server on 127.0.0.1 port 0, on SQLite and on a real
PostgreSQL: created and read back identical, exist_ok, every bad definition refused with INVALID_ARGUMENT, dense
weights pushed and pulled, weights of another pooling refused, the CLI's view, and databases migrated from schema
versions 1 and 2 to 3."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import safetensors.numpy

from services.common.clients.registry import RegistryClient
from services.common.clients.registry_cli import main
from services.common.errors import InvalidArgumentError, MistError
from services.common.wire.edge_spec import CONFIG_METADATA_KEY, EdgeNetworkConfig, state_shapes, trainable_parameters
from services.registry import sql
from services.registry.config import RegistryConfig
from services.registry.records import SegmentationSpec, Task
from services.registry.serde import task_to_proto
from services.registry.store import open_store
from tests.helpers.registry import InProcessRegistry

Code = grpc.StatusCode
CLASSES = ("road", "car", "sky")
# 32 dims on a 4 x 4 token grid (a 64 px image at patch 16), one prediction per token: 1,403 parameters.
DENSE = EdgeNetworkConfig(dims=32, tokens=16, num_classes=3, num_blocks=2, rank=4, pooling="dense")
SPEC = SegmentationSpec(ignore_index=255, input_size=64, label_size=16)


# ---- fixtures and builders ---------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/registry.db"
    return request.getfixturevalue("postgres_server").create_schema()


@pytest.fixture
def server(db_url: str) -> Iterator[InProcessRegistry]:
    with InProcessRegistry(RegistryConfig(db=db_url, metrics_listen="off")) as running:
        yield running


@pytest.fixture
def client(server: InProcessRegistry, tmp_path: Path) -> Iterator[RegistryClient]:
    with RegistryClient(server.target, timeout_s=20, cache_dir=tmp_path / "cache") as opened:
        yield opened


def seg_task(name: str = "roads", **changes: Any) -> Task:
    task = Task(
        name=name,
        backbone_name="vit_tiny_patch16_224",
        backbone_fingerprint="random-0",
        gather_mode="mist",
        k=2,
        codec="i8-zstd",
        class_names=CLASSES,
        edge=DENSE.to_dict(),
        description="test segmentation task",
        kind="segmentation",
        segmentation=SPEC,
    )
    return replace(task, **changes)


def edge_blob(seed: int = 0, config: EdgeNetworkConfig = DENSE) -> bytes:
    """Float32 weights of the config's exact shapes carrying it in their metadata, as the tuner writes them."""
    rng = np.random.default_rng(seed)
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in state_shapes(config).items()}
    return safetensors.numpy.save(arrays, metadata={CONFIG_METADATA_KEY: config.to_json()})


def refusal(call: Callable[[], Any]) -> tuple[Code, str]:
    """(status code, message) of a refused client call; (OK, "") when it went through."""
    try:
        call()
    except MistError as error:
        return Code[error.code], str(error)
    return Code.OK, ""


# ---- definitions -------------------------------------------------------------------------------------------


def test_a_segmentation_task_is_created_and_read_back_identical(client):
    # Execute
    created = client.create_task(seg_task())
    fetched = client.get_task("roads")
    listed = list(client.list_tasks())

    # Assert
    assert created.kind == fetched.kind == "segmentation"
    assert fetched.segmentation == SegmentationSpec(ignore_index=255, input_size=64, label_size=16)
    assert fetched.edge_config() == DENSE and fetched.edge_config().grid == (4, 4)
    assert fetched.same_definition(seg_task()) and fetched == created
    assert listed == [fetched]


def test_an_unset_kind_is_classification_and_an_unset_ignore_index_is_255(client):
    # Prepare: proto3 cannot tell an unset field from zero; 0 is always a class id, so it means the default
    classification = task_to_proto(seg_task("cats", kind="classification", segmentation=None))
    classification.edge.pooling = "cls"
    classification.edge.tokens = 17
    classification.ClearField("kind")
    segmentation = task_to_proto(seg_task())
    segmentation.segmentation.ignore_index = 0

    # Execute
    cats = client.create_task(classification)
    roads = client.create_task(segmentation)

    # Assert
    assert (cats.kind, cats.segmentation) == ("classification", None)
    assert roads.segmentation == SPEC and client.get_task("roads").segmentation.ignore_index == 255


def test_exist_ok_accepts_the_identical_task_and_refuses_another_spec(client):
    # Prepare
    first = client.create_task(seg_task())

    # Execute
    again = client.create_task(seg_task(), exist_ok=True)
    code, message = refusal(
        lambda: client.create_task(seg_task(segmentation=replace(SPEC, label_size=32)), exist_ok=True)
    )

    # Assert
    assert again == first
    assert code == Code.ALREADY_EXISTS and "different segmentation" in message
    assert client.get_task("roads").segmentation.label_size == 16


CLS_GRID = replace(DENSE, pooling="cls").to_dict()  # same 16 tokens, the class token read
CLS_17 = replace(DENSE, tokens=17, pooling="cls").to_dict()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"segmentation": replace(SPEC, ignore_index=2)}, "ignore_index must be in [3, 255]"),
        ({"segmentation": replace(SPEC, ignore_index=256)}, "ignore_index must be in [3, 255]"),
        ({"segmentation": replace(SPEC, label_size=128)}, "label_size must be in [1, input_size = 64], got 128"),
        ({"segmentation": replace(SPEC, input_size=16, label_size=16)}, "input_size must be in [32, 8192]"),
        ({"segmentation": None}, "a segmentation task needs a segmentation spec"),
        ({"kind": "classification", "edge": CLS_17}, "a classification task takes no segmentation spec"),
        ({"kind": "classification", "segmentation": None}, "pooling 'dense' classifies every token"),
        ({"edge": CLS_GRID}, "needs pooling 'dense' (one prediction per token), got 'cls'"),
        ({"gather_mode": "lst", "k": 0}, "needs the mist gather (every token kept), got 'lst'"),
        ({"kind": "detection"}, "task kind must be one of ('classification', 'segmentation')"),
    ],
    ids=["ignore-is-a-class", "ignore-over-uint8", "label-over-input", "input-too-small", "no-spec",
         "spec-on-classification", "classification-dense", "segmentation-cls", "segmentation-lst", "unknown-kind"],
)  # fmt: skip
def test_bad_segmentation_definitions_are_invalid_and_store_nothing(client, changes, message):
    # Execute
    code, details = refusal(lambda: client.create_task(seg_task(**changes)))

    # Assert
    assert code == Code.INVALID_ARGUMENT and message in details
    assert refusal(lambda: client.get_task("roads"))[0] == Code.NOT_FOUND


def test_more_classes_than_uint8_masks_hold_are_refused(client):
    classes = tuple(f"c{i}" for i in range(256))

    code, details = refusal(
        lambda: client.create_task(seg_task(class_names=classes, edge=replace(DENSE, num_classes=256).to_dict()))
    )

    assert code == Code.INVALID_ARGUMENT and "at most 255 classes" in details


def test_segmentation_spec_dicts_round_trip_and_are_strict():
    assert SegmentationSpec.from_dict(SPEC.to_dict()) == SPEC
    assert SegmentationSpec.from_dict({"input_size": 64, "label_size": 16}).ignore_index == 255
    for bad in ({"input_size": 64}, {**SPEC.to_dict(), "stride": 4}, [64, 16]):
        with pytest.raises(InvalidArgumentError, match="segmentation spec"):
            SegmentationSpec.from_dict(bad)  # type: ignore[arg-type]


# ---- weights -----------------------------------------------------------------------------------------------


def test_dense_weights_are_pushed_and_pulled_back_exactly(client):
    # Prepare
    client.create_task(seg_task())
    blob = edge_blob(1)

    # Execute
    pushed = client.push("roads", blob, parent_version=0, metrics={"val_miou": 0.5})
    pulled = client.pull("roads", use_cache=False)

    # Assert
    assert pushed.number == 1 and pulled.blob == blob and pulled.task.kind == "segmentation"
    assert client.get_version("roads", version=1).size_bytes == len(blob)


def test_weights_of_another_pooling_or_shape_are_refused_alike(client):
    # Prepare: a "cls" network on the same grid has every tensor of the same shape; only its metadata tells it apart
    client.create_task(seg_task())
    cls_weights = edge_blob(1, config=replace(DENSE, pooling="cls"))
    wider = replace(DENSE, num_classes=4)
    rng = np.random.default_rng(2)
    wrong_shapes = safetensors.numpy.save(
        {name: rng.standard_normal(shape).astype(np.float32) for name, shape in state_shapes(wider).items()}
    )

    # Execute
    pooling_code, pooling_message = refusal(lambda: client.push("roads", cls_weights, parent_version=0))
    shape_code, _ = refusal(lambda: client.push("roads", wrong_shapes, parent_version=0))

    # Assert
    assert pooling_code == shape_code == Code.FAILED_PRECONDITION
    assert '"pooling":"cls"' in pooling_message and '"pooling":"dense"' in pooling_message
    assert list(client.list_versions("roads")) == []


# ---- the CLI -----------------------------------------------------------------------------------------------


def test_the_cli_shows_the_kind_and_the_segmentation_spec(client, server, capsys):
    # Prepare
    client.create_task(seg_task())

    # Execute
    task_code = main(["--registry", server.target, "task", "roads"], env={})
    task_out = capsys.readouterr().out
    tasks_code = main(["--registry", server.target, "--json", "tasks"], env={})
    tasks_json = json.loads(capsys.readouterr().out)

    # Assert
    assert task_code == tasks_code == 0
    assert "kind:           segmentation (labels 16x16 of 64x64 px input, ignore index 255)\n" in task_out
    assert "pooling=dense D=32 T=16 C=3" in task_out
    assert tasks_json[0]["kind"] == "segmentation"
    assert tasks_json[0]["segmentation"] == {"ignore_index": 255, "input_size": 64, "label_size": 16}


# ---- schema migration --------------------------------------------------------------------------------------


def _execute(url: str, statements: list[tuple[str, tuple]]) -> list[tuple]:
    """Runs statements straight on the database behind `url`, as an older registry would have; the last's rows."""
    rows: list[tuple] = []
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            for statement, params in statements:
                rows = conn.execute(statement, params).fetchall()
        return rows
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for statement, params in statements:
            cur = conn.execute(statement.replace("?", "%s"), params)
            rows = cur.fetchall() if cur.description else []
    return rows


OLD_CONFIG = replace(DENSE, num_classes=2, pooling="cls")  # the classification task an older registry holds


def build_old_database(url: str, version: int, blob: bytes) -> None:
    """A database as a registry of schema `version` left it: its tables, one classification task with version 1."""
    dialect = sql.SQLITE if url.startswith("sqlite") else sql.POSTGRESQL
    types = {"blob_type": dialect.blob_type, "identity_column": dialect.identity_column, "name_type": dialect.name_type}
    statements: list[tuple[str, tuple]] = [("CREATE TABLE schema_version (version INTEGER NOT NULL)", ())]
    for migration in sql.MIGRATIONS[:version]:
        for statement in migration:
            if isinstance(statement, sql.DialectOnly):
                if statement.dialect != dialect.name:
                    continue
                statement = statement.sql
            statements.append((statement.format(**types), ()))
    created_us = 1_700_000_000_000_000
    task_row = ("cats", "vit_tiny_patch16_224", "random-0", "mist", 2, "i8-zstd", '["cat","dog"]',
                OLD_CONFIG.to_json(), "", created_us)  # fmt: skip
    version_row = ("cats", 1, hashlib.sha256(blob).hexdigest(), len(blob), trainable_parameters(OLD_CONFIG), "{}", "", 0, "", "admin", "test",
                   "{}", created_us)  # fmt: skip
    statements += [
        ("INSERT INTO schema_version (version) VALUES (?)", (version,)),
        (
            "INSERT INTO tasks (name, backbone_name, backbone_fingerprint, gather_mode, k, codec, class_names, edge, "
            "description, created_at, latest_version, last_number) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 1)",
            task_row,
        ),
        (
            "INSERT INTO versions (task, number, sha256, size_bytes, parameter_count, metrics, details_json, "
            "parent_version, dataset_fingerprint, pushed_by, tuner, tags, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            version_row,
        ),
        ("INSERT INTO blobs (task, number, data) VALUES (?, ?, ?)", ("cats", 1, blob)),
    ]
    _execute(url, statements)


@pytest.mark.parametrize("old_version", [1, 2])
def test_an_older_database_migrates_to_schema_3_with_its_tasks_as_classification(db_url, old_version):
    # Prepare
    blob = edge_blob(3, config=OLD_CONFIG)
    build_old_database(db_url, old_version, blob)

    # Execute
    with open_store(db_url) as store:
        cats = store.get_task("cats")
        kept = store.read_blob("cats", 1)
        roads = store.create_task(seg_task())
        problems = store.integrity_check()
    schema = _execute(db_url, [("SELECT version FROM schema_version", ())])
    columns = _execute(db_url, [("SELECT name, kind, segmentation FROM tasks ORDER BY name", ())])

    # Assert
    assert sql.SCHEMA_VERSION == 3 and schema == [(3,)]
    assert (cats.kind, cats.segmentation, cats.class_names) == ("classification", None, ("cat", "dog"))
    assert cats.latest_version == 1 and kept == blob
    assert roads.segmentation == SPEC and problems == []
    spec_json = '{"ignore_index":255,"input_size":64,"label_size":16}'
    assert columns == [("cats", "classification", ""), ("roads", "segmentation", spec_json)]
