"""Compressed feature storage with per-batch decoding (services.tuner.feature_store)."""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

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


# ---------------------------------------------------------------------------------- features kept on disk


def _open_files_under(directory) -> list[str]:
    """Targets of this process's open file descriptors inside `directory` (unlinked files included)."""
    fds = Path("/proc/self/fd")
    targets = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while listing (the listing's own descriptor)
        if target.startswith(str(directory)):
            targets.append(target)
    return targets


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")


def test_held_features_stay_out_of_the_python_heap(tmp_path):
    # Prepare: 48 float32 features of 64 KiB each, 3 MiB in all, made before measuring
    messages = [encoded(i, k=1, codec="f32-none", shape=(64, 256))[0] for i in range(48)]
    store = FeatureStore([i % 2 for i in range(48)], num_classes=2, directory=tmp_path)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()

        # Execute
        for index, msg in enumerate(messages):
            store.add(index, 1, msg)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()

    # Assert: what the store's module allocated and still holds is a small index, not the 3 MiB of features
    held = sum(
        stat.size_diff
        for stat in after.compare_to(before, "filename")
        if stat.traceback[0].filename.endswith("feature_store.py")
    )
    assert store.compressed_bytes() > 3 * 2**20
    assert store.file_bytes == store.compressed_bytes()
    assert held < 64 * 1024, f"the store kept {held} bytes of Python objects"
    features, _ = store.batch([47, 0], 1)
    assert np.array_equal(features[0].numpy(), decode_feature(messages[47]))
    store.close()


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@needs_proc
def test_held_features_do_not_stay_resident(tmp_path):
    # Prepare: each 1 MiB message arrives, is added and forgotten by the caller, as extraction does
    codec = FeatureCodec(CodecConfig.parse("f32-none"))
    rng = np.random.default_rng(0)
    store = FeatureStore([i % 2 for i in range(41)], num_classes=2, directory=tmp_path)
    store.add(40, 1, codec.encode(rng.normal(size=(512, 512)).astype(np.float32), backbone=BACKBONE, k=1))
    before = _rss_bytes()

    # Execute
    for index in range(40):
        data = codec.encode(rng.normal(size=(512, 512)).astype(np.float32), backbone=BACKBONE, k=1).SerializeToString()
        store.add(index, 1, feature_pb2.FeatureTensor.FromString(data))
        del data

    # Assert: 40 MiB held, a few MiB of resident growth at most (held as messages it was over 40 MiB)
    grown = _rss_bytes() - before
    assert store.compressed_bytes() > 40 * 2**20
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB while holding 40 MiB of features"
    store.close()


@needs_proc
def test_the_file_is_unlinked_and_released_on_close_and_on_error(tmp_path):
    # Prepare
    with FeatureStore([0, 1], num_classes=2, directory=tmp_path) as store:
        assert _open_files_under(tmp_path) == []  # made on the first add, not before
        store.add(0, 1, encoded(0, k=1)[0])
        # Assert: open, yet no name in the directory (nothing is left behind even if the process is killed)
        assert len(_open_files_under(tmp_path)) == 1 and list(tmp_path.iterdir()) == []
    assert _open_files_under(tmp_path) == [] and store.closed

    # Execute: an error inside the block
    with pytest.raises(RuntimeError, match="boom"), FeatureStore([0, 1], num_classes=2, directory=tmp_path) as store:
        store.add(1, 1, encoded(1, k=1)[0])
        raise RuntimeError("boom")

    # Assert
    assert _open_files_under(tmp_path) == []


@needs_proc
def test_a_store_never_closed_is_released_when_collected(tmp_path):
    store = FeatureStore([0, 1], num_classes=2, directory=tmp_path)
    store.add(0, 1, encoded(0, k=1)[0])
    del store
    gc.collect()
    assert _open_files_under(tmp_path) == []


def test_a_closed_store_refuses_reads_and_adds_and_closes_again_quietly(tmp_path):
    store = FeatureStore([0, 1], num_classes=2, directory=tmp_path)
    store.add(0, 1, encoded(0, k=1)[0])
    store.close()
    store.close()
    with pytest.raises(FailedPreconditionError, match="closed"):
        store.batch([0], 1)
    with pytest.raises(FailedPreconditionError, match="closed"):
        store.add(1, 1, encoded(1, k=1)[0])
    assert store.compressed_bytes() > 0  # the description survives: what was fetched


def test_keep_only_frees_the_other_ks_and_their_batches_fail_clearly(tmp_path):
    # Prepare
    store = FeatureStore([0, 1, 0], num_classes=2, directory=tmp_path)
    kept = {}
    for index in range(3):
        for k in (3, 6, 12):
            msg, _ = encoded(10 * k + index, k=k)
            store.add(index, k, msg)
            if k == 6:
                kept[index] = msg
    six_bytes = store.compressed_bytes(6)

    # Execute
    store.keep_only(6)

    # Assert
    assert store.ks == [6]
    assert store.file_bytes == store.compressed_bytes() == six_bytes
    assert store.compressed_bytes(3) == 0 and store.bytes_per_image() == six_bytes / 3
    features, labels = store.batch([2, 0], 6)
    assert labels.tolist() == [0, 0]
    assert np.array_equal(features[0].numpy(), decode_feature(kept[2]))
    assert np.array_equal(features[1].numpy(), decode_feature(kept[0]))
    with pytest.raises(FailedPreconditionError, match="k=12 features were dropped when the store kept only k=6"):
        store.batch([0], 12)
    assert store.missing(range(3), [3]) == [0, 1, 2]
    store.keep_only(6)  # again: nothing to drop, nothing copied
    assert store.file_bytes == six_bytes
    with pytest.raises(FailedPreconditionError, match=r"holds no k=3 feature \(it holds k=\[6\]\)"):
        store.keep_only(3)
    store.close()


def test_a_replacement_reuses_its_record_when_it_fits_and_is_compacted_by_keep_only(tmp_path):
    # Prepare
    store = FeatureStore([0, 1], num_classes=2, directory=tmp_path)
    small, _ = encoded(0, k=1, codec="i8-zstd")
    large, _ = encoded(1, k=1, codec="f32-none")
    store.add(0, 1, large)
    written = store.file_bytes

    # Execute / Assert: smaller fits in place, larger goes to the end
    store.add(0, 1, small)
    assert store.file_bytes == written and store.compressed_bytes() == small.ByteSize()
    store.add(0, 1, large)
    assert store.file_bytes == written + large.ByteSize()
    store.keep_only(1)  # the only k, but the file holds a stale record: compacted
    assert store.file_bytes == large.ByteSize()
    assert np.array_equal(store.batch([0], 1)[0][0].numpy(), decode_feature(large))
    store.close()


def test_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="is not a directory"):
        FeatureStore([0, 1], num_classes=2, directory=tmp_path / "absent")


def test_subset_copies_the_chosen_images_features_labels_and_splits(tmp_path):
    # Prepare
    store = FeatureStore([0, 1, 0, 1], num_classes=2, splits=["train", "val", "train", "test"], directory=tmp_path)
    messages = {}
    for index in (0, 1, 3):
        for k in (2, 4):
            messages[(index, k)], _ = encoded(10 * k + index, k=k)
            store.add(index, k, messages[(index, k)])

    # Execute
    with store, store.subset([3, 0, 2]) as part:
        # Assert
        assert part.labels == [1, 0, 0] and part.indices("train") == [1, 2] and part.indices("test") == [0]
        assert part.ks == [2, 4] and part.missing(range(3), [2, 4]) == [2]
        assert part.backbone == store.backbone and part.feature_shape == (TOKENS, DIMS)
        assert part.compressed_bytes() == sum(messages[(i, k)].ByteSize() for i in (0, 3) for k in (2, 4))
        features, labels = part.batch([0, 1], 4)
        assert labels.tolist() == [1, 0]
        assert np.array_equal(features[0].numpy(), decode_feature(messages[(3, 4)]))
        assert np.array_equal(features[1].numpy(), decode_feature(messages[(0, 4)]))
