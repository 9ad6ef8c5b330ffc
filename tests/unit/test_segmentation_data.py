"""Segmentation data (services/tuner/segmentation_data.py): the ADE20K-style layout and its refusals, the synthetic
generator, and the scores, on real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgumentError
from services.tuner.segmentation_data import (
    IGNORE_INDEX,
    SYNTHETIC_CLASSES,
    SegmentationError,
    confusion,
    is_segmentation_layout,
    load_segmentation_dataset,
    segmentation_scores,
    write_synthetic_segmentation,
)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_synthetic_segmentation(tmp_path / "seg", per_split={"training": 6, "validation": 2}, size=48)


def test_the_generator_writes_the_layout_deterministically_with_every_class(data, tmp_path):
    again = write_synthetic_segmentation(tmp_path / "again", per_split={"training": 6, "validation": 2}, size=48)
    files = sorted(p.relative_to(data) for p in data.rglob("*.png"))
    assert len(files) == 16 and files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert all((data / f).read_bytes() == (again / f).read_bytes() for f in files)
    ids = set()
    for mask in (data / "annotations").rglob("*.png"):
        with Image.open(mask) as opened:
            assert opened.mode == "L" and opened.size == (48, 48)
            ids |= set(np.unique(np.asarray(opened)).tolist())
    assert ids == {0, 1, 2, 3, IGNORE_INDEX}


def test_the_layout_loads_with_its_classes_and_splits(data):
    assert is_segmentation_layout(data) and not is_segmentation_layout(data / "images")
    dataset = load_segmentation_dataset(data)
    assert dataset.class_names == SYNTHETIC_CLASSES and dataset.ignore_index == 255
    assert [len(dataset.split(s)) for s in ("training", "validation")] == [6, 2]
    assert dataset.items[0].name == "00000" and dataset.items[0].size == (48, 48)


def test_every_bad_mask_is_named_and_nothing_loads(data):
    # Prepare: one problem of each kind
    masks = data / "annotations" / "training"
    Image.new("L", (40, 48)).save(masks / "00000.png")  # another size
    Image.new("RGB", (48, 48)).save(masks / "00001.png")  # not 8-bit single channel
    Image.fromarray(np.full((48, 48), 7, np.uint8), "L").save(masks / "00002.png")  # id 7 of 4 classes
    (masks / "00003.png").unlink()  # missing
    Image.new("L", (48, 48)).save(masks / "stray.png")  # no image

    # Execute
    with pytest.raises(SegmentationError) as refused:
        load_segmentation_dataset(data)

    # Assert: all five, each naming its file
    problems = refused.value.problems
    assert len(problems) == 5
    assert f"{masks / '00000.png'}: 40x48, but its image is 48x48" in problems
    assert f"{masks / '00001.png'}: not an 8-bit single-channel mask (mode RGB)" in problems
    assert any(p.startswith(f"{masks / '00002.png'}: class ids [7] outside the 4 classes") for p in problems)
    assert any(p.startswith(f"{data / 'images' / 'training' / '00003.png'}: no mask") for p in problems)
    assert f"{masks / 'stray.png'}: a mask without an image in {data / 'images' / 'training'}" in problems


def test_without_a_class_list_the_classes_are_the_ids_seen(data):
    (data / "classes.txt").unlink()
    assert load_segmentation_dataset(data).class_names == ("0", "1", "2", "3")
    with pytest.raises(InvalidArgumentError, match="not a segmentation dataset"):
        load_segmentation_dataset(data / "images")


def test_scores_on_a_hand_checked_example():
    labels = np.array([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 1]])
    predicted = np.array([[0, 1, 1, 1], [2, 0, 0, 1]])
    matrix = confusion(predicted, labels, num_classes=4)
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(matrix)
    # IoU: class 0 1/(2+2-1) = 1/3, class 1 3/(3+4-3) = 3/4, class 2 1/(2+1-1) = 1/2, class 3 absent
    assert scores.iou[:3] == pytest.approx((1 / 3, 3 / 4, 1 / 2)) and scores.iou[3] is None
    assert scores.miou == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert scores.pixel_accuracy == pytest.approx(5 / 7) and scores.accuracy[3] is None
    with pytest.raises(InvalidArgumentError, match="outside 0..3"):
        confusion(np.array([4]), np.array([0]), num_classes=4)
