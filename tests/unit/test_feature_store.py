"""Compressed feature storage with per-batch decoding (services.tuner.feature_store)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.codec import CodecConfig, FeatureCodec, FeatureDecodeError, decode_feature
from services.common.wire.gather_modes import BackboneId
from services.tuner.data import dataset_from_memory
from services.tuner.feature_store import FeatureStore

TOKENS, DIMS = 17, 32
BACKBONE = feature_pb2.BackboneId(name="vit_tiny_test", weights_fingerprint="random-0")
OTHER_BACKBONE = feature_pb2.BackboneId(name="vit_tiny_test", weights_fingerprint="random-1")


def encoded(seed: int, k: int, *, codec: str = "i8-zstd", backbone=BACKBONE, shape=(TOKENS, DIMS)):
    values = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return FeatureCodec(CodecConfig.parse(codec)).encode(values, backbone=backbone, k=k), values


def test_batch_round_trips_the_decoded_features_with_labels():
    # Prepare
    store = FeatureStore([0, 1, 1, 0, 2], num_classes=3)
    messages = {}
    for index in range(5):
        messages[index], _ = encoded(index, k=2)
        store.add(index, 2, messages[index])

    # Execute
    features, labels = store.batch([4, 1, 2], k=2)

    # Assert
    assert features.dtype == torch.float32 and features.shape == (3, TOKENS, DIMS)
    assert labels.dtype == torch.int64 and labels.tolist() == [2, 1, 1]
    for row, index in enumerate([4, 1, 2]):
        assert np.array_equal(features[row].numpy(), decode_feature(messages[index]))
    assert store.feature_shape == (TOKENS, DIMS)
    assert store.backbone == BackboneId.from_proto(BACKBONE)


def test_lossless_codec_batch_equals_the_original_floats():
    # Prepare
    store = FeatureStore([0, 1], num_classes=2)
    originals = []
    for index in range(2):
        msg, values = encoded(index, k=1, codec="f32-zstd")
        store.add(index, 1, msg)
        originals.append(values)

    # Execute
    features, _ = store.batch(torch.tensor([0, 1]), k=1)

    # Assert
    assert np.array_equal(features.numpy(), np.stack(originals))


def test_i8_zstd_bytes_are_far_below_float32_and_accounted_per_k():
    # Prepare
    store = FeatureStore([0, 1] * 10, num_classes=2)
    sizes = {1: 0, 3: 0}
    for index in range(20):
        for k in (1, 3):
            msg, _ = encoded(100 * k + index, k=k)
            store.add(index, k, msg)
            sizes[k] += msg.ByteSize()

    # Execute
    total, per_k1, per_image, per_image_k3 = (
        store.compressed_bytes(), store.compressed_bytes(1), store.bytes_per_image(), store.bytes_per_image(3)
    )  # fmt: skip

    # Assert
    assert store.float32_bytes_per_image() == 4 * TOKENS * DIMS == 2176
    assert total == sizes[1] + sizes[3] and per_k1 == sizes[1]
    assert per_image == total / 20 and per_image_k3 == sizes[3] / 20
    assert per_image_k3 < 0.45 * store.float32_bytes_per_image()  # int8 + 17 scales + header, random normal values
    assert store.ks == [1, 3]


def test_missing_lists_images_lacking_any_requested_k():
    # Prepare
    store = FeatureStore([0, 1, 0, 1], num_classes=2)
    store.add(0, 3, encoded(0, k=3)[0])
    store.add(0, 6, encoded(1, k=6)[0])
    store.add(1, 3, encoded(2, k=3)[0])
    store.add(3, 6, encoded(3, k=6)[0])

    # Execute
    both = store.missing(range(4), [3, 6])
    only_three = store.missing([3, 2, 1, 0, 3], [3])

    # Assert
    assert both == [1, 2, 3]
    assert only_three == [3, 2]
    assert store.missing([0], [3, 6]) == []


def test_adding_again_replaces_and_keeps_byte_count_right():
    # Prepare
    store = FeatureStore([0, 1], num_classes=2)
    first, _ = encoded(0, k=1, codec="f32-none")
    second, _ = encoded(0, k=1, codec="i8-zstd")
    store.add(0, 1, first)

    # Execute
    store.add(0, 1, second)

    # Assert
    assert store.compressed_bytes() == second.ByteSize()
    assert np.array_equal(store.batch([0], 1)[0][0].numpy(), decode_feature(second))


def test_feature_from_another_backbone_is_refused():
    # Prepare
    store = FeatureStore([0, 1], num_classes=2)
    store.add(0, 1, encoded(0, k=1)[0])
    fixed = FeatureStore([0, 1], num_classes=2, backbone=OTHER_BACKBONE)

    # Execute / Assert
    with pytest.raises(FailedPreconditionError, match=r"backbone vit_tiny_test \(weights random-1\).*random-0"):
        store.add(1, 1, encoded(1, k=1, backbone=OTHER_BACKBONE)[0])
    with pytest.raises(FailedPreconditionError, match="must never be mixed"):
        fixed.add(0, 1, encoded(0, k=1)[0])
    assert store.missing([1], [1]) == [1]


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            lambda m: m.ClearField("shape") or m.shape.extend([TOKENS + 1, DIMS]),
            FailedPreconditionError,
            "differs from the store's",
        ),
        (lambda m: setattr(m, "mode", feature_pb2.GATHER_MODE_PARTIAL), FailedPreconditionError, "GATHER_MODE_PARTIAL"),
        (lambda m: setattr(m, "k", 5), InvalidArgumentError, "says k=5 but it was added as k=1"),
        (lambda m: setattr(m, "crc32", m.crc32 ^ 1), FeatureDecodeError, "crc32"),
    ],
)
def test_inconsistent_or_corrupt_features_are_refused(change, error, message):
    # Prepare
    store = FeatureStore([0, 1], num_classes=2)
    store.add(0, 1, encoded(0, k=1)[0])
    bad, _ = encoded(1, k=1)
    change(bad)

    # Execute / Assert
    with pytest.raises(error, match=message):
        store.add(1, 1, bad)
    assert not store.has(1, 1)


def test_three_dimensional_features_are_refused():
    store = FeatureStore([0, 1], num_classes=2)
    msg, _ = encoded(0, k=1, shape=(2, TOKENS, DIMS))
    with pytest.raises(FailedPreconditionError, match=r"expected a \[tokens, dims\] feature, got shape \[2, 17, 32\]"):
        store.add(0, 1, msg)


def test_batch_with_missing_features_or_bad_indices_fails_clearly():
    store = FeatureStore([0, 1, 0], num_classes=2)
    store.add(0, 1, encoded(0, k=1)[0])
    with pytest.raises(
        FailedPreconditionError, match=r"no k=1 feature for 2 image.s. of the batch \(first: \[1, 2\]\)"
    ):
        store.batch([0, 1, 2], 1)
    with pytest.raises(InvalidArgumentError, match=r"image index must be an integer in \[0, 3\), got 3"):
        store.batch([3], 1)
    with pytest.raises(InvalidArgumentError, match="at least one index"):
        store.batch([], 1)
    with pytest.raises(InvalidArgumentError, match="image index"):
        store.add(-1, 1, encoded(0, k=1)[0])


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        ([0, 2], {"num_classes": 2}, r"labels must be integers in \[0, 2\), got \[2\]"),
        ([0, 1], {"num_classes": 1}, "num_classes must be an integer >= 2"),
        ([0, 1], {"num_classes": 2, "splits": ["train"]}, "got 1 splits for 2 labels"),
        ([0, 1], {"num_classes": 2, "splits": ["train", "dev"]}, "splits must be among"),
    ],
)
def test_bad_construction(labels, kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        FeatureStore(labels, **kwargs)


def test_store_for_dataset_takes_labels_and_splits():
    # Prepare
    records = [(f"{c}{i}", b"img", c, "val" if i == 0 else "train") for c in "ab" for i in range(3)]
    dataset = dataset_from_memory(records)

    # Execute
    store = FeatureStore.for_dataset(dataset, backbone=BACKBONE)

    # Assert
    assert len(store) == 6 and store.num_classes == 2
    assert store.labels == [0, 0, 0, 1, 1, 1]
    assert store.indices("val") == [0, 3]
    assert store.indices("train") == [1, 2, 4, 5]
    assert store.missing(range(6), [1]) == list(range(6))
