"""The stateless tuner worker (`mist-tuner`) through real servers: Tune streams progress and returns the pushed version;
a worker killed mid-job leaves no version behind; Predict answers every item in order, bad images included.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.common.clients.extractor import ImageItem
from services.common.pb import registry_pb2, tuner_pb2, tuner_pb2_grpc
from services.tuner.predict import load_version, predict_images
from services.tuner.tune import find_task
from tests.helpers.stack import E2E_CLASSES, TunerProcess, running_stack, write_e2e_dataset

pytestmark = pytest.mark.timeout(300)

TASK = "worker-shapes"
SPLITS = {"train": tuner_pb2.SPLIT_TRAIN, "val": tuner_pb2.SPLIT_VAL, "test": tuner_pb2.SPLIT_TEST}
TOTAL_IMAGES = 4 * (20 + 5 + 10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack"), worker=True) as running:
        yield running


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_e2e_dataset(tmp_path_factory.mktemp("data") / "shapes")


def labelled_images(data: Path) -> list[tuner_pb2.LabelledImage]:
    return [
        tuner_pb2.LabelledImage(
            item_id=str(path.relative_to(data)),
            image=path.read_bytes(),
            label=path.parent.name,
            split=SPLITS[path.parent.parent.name],
        )
        for path in sorted(data.rglob("*.png"))
    ]


def tune_requests(spec: tuner_pb2.TuneSpec, images: list[tuner_pb2.LabelledImage]) -> Iterator[tuner_pb2.TuneRequest]:
    yield tuner_pb2.TuneRequest(spec=spec)
    for image in images:
        yield tuner_pb2.TuneRequest(image=image)


def tuner_stub(target: str) -> tuple[grpc.Channel, tuner_pb2_grpc.TunerStub]:
    channel = grpc.insecure_channel(target)
    return channel, tuner_pb2_grpc.TunerStub(channel)


def metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def tune_events(stack, data) -> list[tuner_pb2.TuneEvent]:
    """Version 1 of TASK, tuned by the worker with --k auto and the production alias."""
    spec = tuner_pb2.TuneSpec(task=TASK, k=0, epochs=8, lr=3e-3, alias="production", description="by the worker")
    channel, stub = tuner_stub(stack.tuner.target)
    with channel:
        return list(stub.Tune(tune_requests(spec, labelled_images(data)), timeout=240))


def test_tune_streams_progress_and_ends_with_the_pushed_version(tune_events, stack):
    # Prepare
    kinds = [event.WhichOneof("event") for event in tune_events]
    extraction = [e.extraction for e in tune_events if e.HasField("extraction")]
    epochs = [e.epoch for e in tune_events if e.HasField("epoch")]
    selection = next(e.k_selection for e in tune_events if e.HasField("k_selection"))
    result = tune_events[-1].result

    # Assert: the event stream
    assert kinds[-1] == "result" and kinds.count("result") == 1 and "log" in kinds
    assert extraction[-1].done == extraction[-1].total == TOTAL_IMAGES
    assert extraction[-1].lst_bytes_per_image == 5 * 17 * 32 * 4 and extraction[-1].bytes_per_image > 0
    assert sorted(selection.val_accuracy_by_k) == [1, 2, 3, 4] and selection.chosen_k in (1, 2, 3, 4)
    assert [e.epoch for e in epochs if e.phase == "final"] == list(range(1, 9))
    assert {e.k for e in epochs if e.phase == "final"} == {selection.chosen_k}
    assert [e.phase for e in epochs].count("k-search") == 4 * 2  # a fifth of 8 epochs, at least 2, per candidate
    # ... the version it names is the registry's, alias moved
    assert result.task == TASK and result.number == 1
    assert result.metrics["k"] == selection.chosen_k and result.lineage.tuner.startswith("mist-tuner/")
    with stack.endpoints(cache_dir=None).registry_client() as registry:
        assert registry.get_alias(TASK, "production").version == 1
        assert registry.get_version(TASK, version=1).sha256 == result.sha256
        assert registry.get_task(TASK).description == "by the worker"
    # ... and the worker's metrics counted it
    port = stack.tuner.metrics_port
    assert metric(port, "mist_tuner_jobs_total", kind="tune", outcome="OK") == 1
    assert metric(port, "mist_tuner_feature_images_received_total", kind="tune") == TOTAL_IMAGES
    assert metric(port, "mist_tuner_baseline_bytes_per_image", method="lst") == 5 * 17 * 32 * 4
    assert metric(port, "mist_tuner_images_trained_total", phase="final") == 8 * 80
    assert metric(port, "mist_tuner_train_step_duration_seconds_count", phase="final") == 8 * 3  # 80 / 32 -> 3


def test_worker_killed_mid_tune_leaves_no_version(tune_events, stack, data):
    # Prepare: a worker of its own, tuning the existing task for long
    worker = TunerProcess(stack.extractor_target, stack.registry.target)
    try:
        worker.wait_listening()
        channel, stub = tuner_stub(worker.target)
        spec = tuner_pb2.TuneSpec(task=TASK, k=2, epochs=500, lr=3e-3, alias="production")
        events = stub.Tune(tune_requests(spec, labelled_images(data)), timeout=240)
        first_epoch = next(e for e in events if e.HasField("epoch"))
        busy_channel, busy = tuner_stub(worker.target)
        with pytest.raises(grpc.RpcError) as refused:  # one job at a time (--max-concurrent-jobs 1)
            list(busy.Tune(tune_requests(tuner_pb2.TuneSpec(task=TASK), []), timeout=30))
        busy_channel.close()

        # Execute: SIGKILL while it trains
        worker.kill()
        with pytest.raises(grpc.RpcError) as killed:
            list(events)
        channel.close()
    finally:
        worker.kill()

    # Assert: the call failed as UNAVAILABLE, the busy one as RESOURCE_EXHAUSTED, and the registry has no version 2
    assert first_epoch.epoch.epoch == 1
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert killed.value.code() == grpc.StatusCode.UNAVAILABLE
    with stack.endpoints(cache_dir=None).registry_client() as registry:
        assert registry.get_task(TASK).latest_version == 1
        assert [v.number for v in registry.list_versions(TASK)] == [1]
        assert registry.get_alias(TASK, "production").version == 1


def test_predict_answers_each_item_in_order_with_per_item_errors(tune_events, stack, data):
    # Prepare: two good images around an undecodable one and an empty one
    good = [sorted((data / "test" / name).glob("*.png"))[0] for name in ("blue_cross", "vertical_stripes")]
    items = [("a", good[0].read_bytes()), ("broken", b"not an image"), ("empty", b""), ("b", good[1].read_bytes())]
    spec = tuner_pb2.PredictSpec(task=TASK, ref=registry_pb2.VersionRef(alias="production"), top_k=2)
    requests = [tuner_pb2.PredictRequest(spec=spec)] + [
        tuner_pb2.PredictRequest(item=tuner_pb2.PredictItem(item_id=i, image=b)) for i, b in items
    ]
    with (
        stack.endpoints(cache_dir=None).extractor_client() as x,
        stack.endpoints(cache_dir=None).registry_client() as r,
    ):
        local = list(
            predict_images(
                load_version(r, TASK, alias="production"),
                x,
                [ImageItem(i, b) for i, b in items if b and i != "broken"],
                top_k=2,
            )
        )

    # Execute
    channel, stub = tuner_stub(stack.tuner.target)
    with channel:
        responses = list(stub.Predict(iter(requests), timeout=60))

    # Assert: one answer per item, in order, the bad ones with errors, the good ones as the library answers
    assert [r.item_id for r in responses] == ["a", "broken", "empty", "b"]
    assert {r.version for r in responses} == {1}
    for bad in responses[1:3]:
        assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and bad.label == ""
    assert responses[1].error.reason == "undecodable_image"
    for response, expected in zip((responses[0], responses[3]), local, strict=True):
        assert response.label == expected.label and response.label in E2E_CLASSES and len(response.top) == 2
        assert response.probability == pytest.approx(expected.probability, abs=1e-6)
    assert metric(stack.tuner.metrics_port, "mist_tuner_predictions_total", outcome="error") >= 2


@pytest.mark.parametrize(
    ("requests", "code", "expected"),
    [
        (
            [tuner_pb2.TuneRequest(image=tuner_pb2.LabelledImage(item_id="x", image=b"x", label="a"))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "first message of the call must be its TuneSpec",
        ),
        (
            [tuner_pb2.TuneRequest(spec=tuner_pb2.TuneSpec(task="one-class"))]
            + [
                tuner_pb2.TuneRequest(image=tuner_pb2.LabelledImage(item_id=f"{i}", image=b"x", label="a"))
                for i in range(4)
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            "found only one class",
        ),
        (
            [tuner_pb2.TuneRequest(spec=tuner_pb2.TuneSpec(task=TASK))]
            + [
                tuner_pb2.TuneRequest(image=tuner_pb2.LabelledImage(item_id=f"{i}", image=b"x", label=label))
                for i, label in enumerate(["red_cross", "zebra", "red_cross", "zebra"])
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            "labels ['zebra'] are not among the classes",
        ),
    ],
    ids=["no-spec", "one-class", "labels-not-in-task"],
)
def test_tune_refuses_bad_streams_with_a_clear_status(tune_events, stack, requests, code, expected):
    # Execute
    channel, stub = tuner_stub(stack.tuner.target)
    with channel, pytest.raises(grpc.RpcError) as refused:
        list(stub.Tune(iter(requests), timeout=60))

    # Assert
    assert refused.value.code() == code and expected in refused.value.details()
    with stack.endpoints(cache_dir=None).registry_client() as registry:
        assert find_task(registry, "one-class") is None and registry.get_task(TASK).latest_version == 1


def test_predict_of_an_unknown_task_is_not_found(stack):
    # Execute
    spec = tuner_pb2.PredictSpec(task="no-such-task")
    channel, stub = tuner_stub(stack.tuner.target)
    with channel, pytest.raises(grpc.RpcError) as refused:
        list(stub.Predict(iter([tuner_pb2.PredictRequest(spec=spec)]), timeout=60))

    # Assert
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-task" in refused.value.details()


def served_by_extractor(port: int) -> float:
    """Images the extractor answered so far, every mode, codec and status."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mist_extractor_images_served_total{")
    )


def test_tune_calls_over_max_tune_images_or_bytes_are_refused_before_any_work(stack, data):
    # Prepare: a worker taking at most 24 images and 1 MiB of image bytes per Tune call (both flags' own minimums
    # are 2 images and 1 MiB); 24 small training images of two classes, and two junk images of 600 KiB each
    limit_images, limit_bytes = 24, 1 << 20
    task = "worker-limits"
    images = [
        image
        for image in labelled_images(data)
        if image.split == tuner_pb2.SPLIT_TRAIN and image.label in ("red_cross", "blue_cross")
    ][:limit_images]
    spare = next(i for i in labelled_images(data) if i.split == tuner_pb2.SPLIT_TEST and i.label == "red_cross")
    heavy = [
        tuner_pb2.LabelledImage(item_id=f"heavy{i}", image=bytes(600 << 10), label=label)
        for i, label in enumerate(("red_cross", "blue_cross"))
    ]
    spec = tuner_pb2.TuneSpec(task=task, k=2, epochs=2)
    worker = TunerProcess(
        stack.extractor_target,
        stack.registry.target,
        "--max-tune-images", str(limit_images), "--max-tune-bytes", str(limit_bytes),
    )  # fmt: skip
    try:
        worker.wait_listening()
        served_before = served_by_extractor(stack.extractor.metrics_port)
        refused: dict[str, tuple[grpc.StatusCode, str, list[str]]] = {}
        channel, stub = tuner_stub(worker.target)
        with channel:
            # Execute: one image over the count, then two images over the bytes, then exactly the count
            for name, call_images in (("images", [*images, spare]), ("bytes", heavy)):
                seen: list[str] = []
                with pytest.raises(grpc.RpcError) as caught:
                    for event in stub.Tune(tune_requests(spec, call_images), timeout=60):
                        seen.append(event.WhichOneof("event"))
                refused[name] = (caught.value.code(), caught.value.details(), seen)
            served_after_refusals = served_by_extractor(stack.extractor.metrics_port)
            with stack.endpoints(cache_dir=None).registry_client() as registry:
                task_after_refusals = find_task(registry, task)
            accepted = list(stub.Tune(tune_requests(spec, images), timeout=120))
        port = worker.metrics_port
        outcomes = {
            outcome: metric(port, "mist_tuner_jobs_total", kind="tune", outcome=outcome)
            for outcome in ("RESOURCE_EXHAUSTED", "OK")
        }
        received = metric(port, "mist_tuner_feature_images_received_total", kind="tune")
    finally:
        worker.kill()

    # Assert: both over-limit calls RESOURCE_EXHAUSTED, naming the flags, before a single event, feature or push
    for name in ("images", "bytes"):
        code, details, seen = refused[name]
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (name, details)
        assert f"at most {limit_images} images and {limit_bytes} bytes" in details and "--max-tune-images" in details
        assert seen == [], name
    assert served_after_refusals == served_before  # the extractor saw none of their images
    assert task_after_refusals is None
    # ... while a call of exactly 24 images is within the limit: it extracts, trains and pushes version 1
    assert accepted[-1].WhichOneof("event") == "result" and accepted[-1].result.number == 1
    assert served_by_extractor(stack.extractor.metrics_port) - served_after_refusals == limit_images
    assert outcomes == {"RESOURCE_EXHAUSTED": 2, "OK": 1} and received == limit_images


@pytest.mark.parametrize("skip", [False, True], ids=["refused", "skip-unreadable"])
def test_a_worker_tune_with_an_undecodable_image_names_it_or_skips_it(stack, data, skip):
    # Prepare: the dataset plus one image of garbage bytes, sent as a train image of a known class
    task = f"worker-unreadable-{'skip' if skip else 'refused'}"
    garbage = tuner_pb2.LabelledImage(item_id="train/red_cross/garbage.png", image=b"no image at all",
                                      label="red_cross", split=tuner_pb2.SPLIT_TRAIN)  # fmt: skip
    spec = tuner_pb2.TuneSpec(task=task, k=2, epochs=2, skip_unreadable=skip)
    channel, stub = tuner_stub(stack.tuner.target)

    # Execute
    with channel:
        try:
            events, refused = list(stub.Tune(tune_requests(spec, [*labelled_images(data), garbage]), timeout=240)), None
        except grpc.RpcError as error:
            events, refused = [], error

    # Assert: refused naming the image and pushing nothing, or tuned on the rest with the image in the details
    with stack.endpoints(cache_dir=None).registry_client() as registry:
        if not skip:
            assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "train/red_cross/garbage.png" in refused.details() and "skip_unreadable" in refused.details()
            assert find_task(registry, task) is None
            return
        result = events[-1].result
        skipped = json.loads(result.details_json)["skipped"]
        assert result.number == 1 and registry.get_task(task).latest_version == 1
        assert [entry["name"] for entry in skipped] == ["train/red_cross/garbage.png"]
        assert skipped[0]["reason"] == "undecodable_image"
