"""Unusable images all at once (issue 13): every unreadable, empty, missing or undecodable image is named in one
error, or with skip_unreadable left out and listed; what is left must still be trainable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from services.common.clients.extractor import ExtractResult
from services.common.config import parse_args
from services.common.errors import InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.codec import CodecConfig, FeatureCodec
from services.tuner import cli
from services.tuner.data import SkippedImage, TooFewUsableImagesError, load_dataset
from services.tuner.extraction import extract_features, fetch_features
from services.tuner.options import TuneOptions
from services.tuner.reports import skipped_lines

FAKE_PNG = b"\x89PNG\r\n\x1a\n fake"  # the fake extractor below never decodes
GARBAGE = b"garbage, not an image"


def write_images(root: Path, per_class: dict[str, int]) -> None:
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"{name}_{i:03d}.png").write_bytes(FAKE_PNG + bytes([i]))


class FakeExtractor:
    """ExtractorClient.extract's contract: one result per item, in order; GARBAGE is refused per item."""

    target = "fake:0"

    def __init__(self) -> None:
        self.sent: list[str] = []

    def extract(self, items, *, mode, ks, codec, expect_backbone, max_in_flight):
        encoder = FeatureCodec(CodecConfig.parse(codec))
        for item in items:
            self.sent.append(item.item_id)
            if item.image.startswith(GARBAGE):
                error = feature_pb2.ItemError(reason="undecodable_image", message="not a JPEG, PNG or WebP image")
                yield ExtractResult(item.item_id, (), error, False)
                continue
            value = float(len(item.image))
            features = tuple(encoder.encode(np.full((3, 4), value, np.float32), k=k) for k in ks)
            yield ExtractResult(item.item_id, features, None, False)


# ---------------------------------------------------------------------------------------------- loading


def test_every_unreadable_file_is_named_in_one_error(tmp_path):
    # Prepare: two empty files and a broken link among 12 images
    write_images(tmp_path, {"a": 4, "b": 4})
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    (tmp_path / "b" / "link.png").symlink_to(tmp_path / "gone.png")

    # Execute
    with pytest.raises(InvalidArgumentError) as raised:
        load_dataset(tmp_path)

    # Assert: one message, the exact count, every file relative to the root with its reason
    message = str(raised.value)
    assert message.startswith(f"cannot read 3 image(s) under {tmp_path}: ")
    assert "a/empty.png: the file is empty (empty_file)" in message
    assert "b/empty.jpg: the file is empty (empty_file)" in message
    assert "b/link.png: No such file or directory (missing_file)" in message
    assert "--skip-unreadable" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_file_without_read_permission_is_named(tmp_path):
    write_images(tmp_path, {"a": 2, "b": 2})
    locked = tmp_path / "a" / "a_000.png"
    locked.chmod(0)
    try:
        with pytest.raises(InvalidArgumentError, match=r"a/a_000.png: permission denied \(unreadable_file\)"):
            load_dataset(tmp_path)
    finally:
        locked.chmod(0o644)


def test_many_unreadable_files_list_twenty_and_count_the_rest_exactly(tmp_path):
    write_images(tmp_path, {"a": 3, "b": 3})
    for i in range(23):
        (tmp_path / "a" / f"z_{i:02d}.png").write_bytes(b"")

    with pytest.raises(InvalidArgumentError) as raised:
        load_dataset(tmp_path)

    message = str(raised.value)
    assert message.startswith("cannot read 23 image(s)")
    assert message.count("(empty_file)") == 20 and "; and 3 more;" in message
    assert "a/z_19.png" in message and "a/z_20.png" not in message  # sorted by name


def test_manifest_problems_are_collected_too(tmp_path):
    write_images(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "b" / "empty.png").write_bytes(b"")
    rows = ["path,label", "a/a_000.png,a", "a/gone.png,a", "b/empty.png,b", "a/a_001.png,a", "b/b_000.png,b"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")

    with pytest.raises(InvalidArgumentError) as raised:
        load_dataset(tmp_path / "m.csv", val_fraction=0.0)

    message = str(raised.value)
    assert "cannot read 2 image(s)" in message
    assert "a/gone.png: manifest line 3: image a/gone.png does not exist" in message
    assert "b/empty.png: the file is empty (empty_file)" in message


def test_skip_unreadable_leaves_them_out_before_splitting_and_lists_them(tmp_path):
    # Prepare
    write_images(tmp_path, {"a": 5, "b": 5})
    (tmp_path / "b" / "empty.png").write_bytes(b"")
    (tmp_path / "a" / "link.png").symlink_to(tmp_path / "gone.png")

    # Execute
    dataset = load_dataset(tmp_path, skip_unreadable=True)
    clean = tmp_path.parent / "clean"
    write_images(clean, {"a": 5, "b": 5})

    # Assert: the same items, splits and fingerprint as without the bad files; both listed, sorted
    assert [item.name for item in dataset.items] == [item.name for item in load_dataset(clean).items]
    assert [item.split for item in dataset.items] == [item.split for item in load_dataset(clean).items]
    assert dataset.fingerprint() == load_dataset(clean).fingerprint()
    assert dataset.skipped == (
        SkippedImage("a/link.png", "missing_file", "No such file or directory"),
        SkippedImage("b/empty.png", "empty_file", "the file is empty"),
    )


def test_skipping_every_image_of_a_class_is_a_clear_error(tmp_path):
    write_images(tmp_path, {"a": 3})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "one.png").write_bytes(b"")
    (tmp_path / "b" / "two.png").write_bytes(b"")

    with pytest.raises(TooFewUsableImagesError) as raised:
        load_dataset(tmp_path, skip_unreadable=True)

    message = str(raised.value)
    assert message.startswith("classes ['b'] have no training images once the 2 unusable image(s) are skipped: ")
    assert "b/one.png: the file is empty" in message and "b/two.png: the file is empty" in message
    assert [image.name for image in raised.value.skipped] == ["b/one.png", "b/two.png"]


# ---------------------------------------------------------------------------------------------- extraction


def test_extractor_refusals_are_all_named_by_extract_features(tmp_path):
    write_images(tmp_path, {"a": 4, "b": 4})
    (tmp_path / "a" / "a_001.png").write_bytes(GARBAGE)
    (tmp_path / "b" / "b_003.png").write_bytes(GARBAGE + b"!")
    dataset = load_dataset(tmp_path)

    with pytest.raises(InvalidArgumentError) as raised:
        extract_features(dataset, FakeExtractor(), ks=(1,), codec="f32-none", backbone=None)

    message = str(raised.value)
    assert message.startswith("the extractor could not use 2 image(s): a/a_001.png: not a JPEG, PNG or WebP image")
    assert "b/b_003.png: not a JPEG, PNG or WebP image (undecodable_image)" in message


def test_fetch_features_lists_refusals_and_usable_reindexes_the_store(tmp_path):
    # Prepare
    write_images(tmp_path, {"a": 5, "b": 5})
    (tmp_path / "a" / "a_002.png").write_bytes(GARBAGE)
    dataset = load_dataset(tmp_path, val_fraction=0.2)

    # Execute
    fetched = fetch_features(dataset, FakeExtractor(), ks=(1, 2), codec="f32-none", backbone=None)
    reduced, store = fetched.usable(dataset)

    # Assert: the refused image is gone, every other keeps its split and its own features
    assert [image.to_dict() for image in fetched.refused.values()] == [
        {"name": "a/a_002.png", "reason": "undecodable_image", "message": "not a JPEG, PNG or WebP image"}
    ]
    assert fetched.stats.images == 9 and len(reduced) == len(store) == 9
    assert [image.name for image in reduced.skipped] == ["a/a_002.png"]
    kept = [item for item in dataset.items if item.name != "a/a_002.png"]
    assert reduced.items == tuple(kept)
    for index, item in enumerate(reduced.items):
        assert store.has(index, 1) and store.has(index, 2)
        features, labels = store.batch([index], 2)
        assert float(features[0, 0, 0]) == len(item.read_bytes()) and int(labels[0]) == item.label


def test_refusals_that_empty_a_class_of_train_images_are_a_clear_error(tmp_path):
    write_images(tmp_path, {"a": 3, "b": 2})
    for name in ("b_000.png", "b_001.png"):
        (tmp_path / "b" / name).write_bytes(GARBAGE)
    dataset = load_dataset(tmp_path, val_fraction=0.0)

    fetched = fetch_features(dataset, FakeExtractor(), ks=(1,), codec="f32-none", backbone=None)
    with pytest.raises(TooFewUsableImagesError, match=r"classes \['b'\] have no training images once the 2 unusable"):
        fetched.usable(dataset)


# ---------------------------------------------------------------------------------------------- options and output


def test_skip_unreadable_is_a_mist_tune_flag_and_a_variable():
    def options(argv, env):
        return cli._invocation(parse_args(cli.build_parser(), argv), env).get(TuneOptions)

    base = ["tune", "--task", "t", "--data", "d"]
    assert options(base, {}).skip_unreadable is False
    assert options([*base, "--skip-unreadable"], {}).skip_unreadable is True
    assert options(base, {"MIST_SKIP_UNREADABLE": "true"}).skip_unreadable is True


def test_skipped_lines_list_each_image_and_count_beyond_twenty():
    skipped = tuple(SkippedImage(f"a/{i:02d}.png", "empty_file", "the file is empty") for i in range(22))
    lines = skipped_lines(skipped)
    assert lines[0] == "  skipped 22 unusable image(s):"
    assert lines[1] == "    a/00.png: the file is empty (empty_file)"
    assert len(lines) == 22 and lines[-1].startswith("    and 2 more")
    assert skipped_lines(()) == []
