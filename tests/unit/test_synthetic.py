"""Tests for the synthetic ImageFolder generator: layout, determinism, difficulty, bad input and the command line."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgumentError
from services.tuner.synthetic import (
    CLASS_NAMES,
    MANIFEST_NAME,
    MARKER_NAME,
    SplitSizes,
    generate_dataset,
    main,
    render_image,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _image_files(root: Path) -> dict[str, bytes]:
    """Every image under root, by path relative to root."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix in (".png", ".jpg")
    }


def _read_manifest(root: Path) -> list[dict[str, str]]:
    with (root / MANIFEST_NAME).open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------- layout


def test_generate_dataset_writes_imagefolder_tree_and_matching_manifest(tmp_path: Path) -> None:
    # Prepare
    root = tmp_path / "data"

    # Execute
    summary = generate_dataset(root, sizes=SplitSizes(3, 2, 1), image_size=32, seed=7)

    # Assert
    files = _image_files(root)
    expected = {
        f"{split}/{name}/{name}_{index:05d}.png"
        for split, count in (("train", 3), ("val", 2), ("test", 1))
        for name in CLASS_NAMES
        for index in range(count)
    }
    assert set(files) == expected
    rows = _read_manifest(root)
    assert list(rows[0]) == ["path", "label", "split"]
    assert {row["path"] for row in rows} == expected and len(rows) == len(expected)
    assert all(row["path"].split("/")[:2] == [row["split"], row["label"]] for row in rows)
    assert summary.classes == CLASS_NAMES
    assert summary.counts == {"train": 24, "val": 16, "test": 8}
    manifest_bytes = (root / MANIFEST_NAME).stat().st_size
    assert summary.total_bytes == sum(len(data) for data in files.values()) + manifest_bytes
    assert summary.files_written == len(expected) + 1
    for relative in files:
        with Image.open(root / relative) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))


def test_generate_dataset_jpeg_writes_deterministic_jpg_files(tmp_path: Path) -> None:
    # Prepare
    arguments = {"classes": ("circle", "blue_cross"), "sizes": SplitSizes(2, 1, 1), "image_size": 48}

    # Execute
    generate_dataset(tmp_path / "a", image_format="jpeg", **arguments)
    generate_dataset(tmp_path / "b", image_format="jpeg", **arguments)

    # Assert
    files = _image_files(tmp_path / "a")
    assert len(files) == 8 and all(path.endswith(".jpg") for path in files)
    assert _image_files(tmp_path / "b") == files
    with Image.open(tmp_path / "a/train/blue_cross/blue_cross_00001.jpg") as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (48, 48))


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_render_image_every_class_is_rgb_at_requested_size_and_not_flat(class_name: str) -> None:
    # Execute
    image = render_image(class_name, np.random.default_rng(3), size=40)

    # Assert
    pixels = np.asarray(image)
    assert (image.mode, image.size, pixels.dtype) == ("RGB", (40, 40), np.uint8)
    assert pixels.std() > 10  # a background, an object and noise: never a blank picture


def test_render_image_depends_only_on_the_generator_state() -> None:
    # Execute
    first = np.asarray(render_image("three_dots", np.random.default_rng(11)))
    again = np.asarray(render_image("three_dots", np.random.default_rng(11)))
    other = np.asarray(render_image("three_dots", np.random.default_rng(12)))

    # Assert
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 10


def test_colour_classes_have_their_colour() -> None:
    # Prepare: the crosses differ only in colour, so the most saturated pixels must carry it.
    def dominant_channel(class_name: str, seed: int) -> int:
        pixels = np.asarray(render_image(class_name, np.random.default_rng(seed)), dtype=np.int32)
        saturation = pixels.max(-1) - pixels.min(-1)
        vivid = pixels[saturation >= np.quantile(saturation, 0.9)]
        return int(vivid.mean(0).argmax())

    # Execute
    red = [dominant_channel("red_cross", seed) for seed in range(10)]
    blue = [dominant_channel("blue_cross", seed) for seed in range(10)]

    # Assert
    assert red == [0] * 10 and blue == [2] * 10


# ---------------------------------------------------------------- determinism and idempotence


def test_same_arguments_give_byte_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    # Prepare
    arguments = {"classes": ("triangle", "two_dots"), "sizes": SplitSizes(3, 1, 1), "image_size": 32}

    # Execute
    generate_dataset(tmp_path / "a", seed=5, **arguments)
    generate_dataset(tmp_path / "b", seed=5, **arguments)
    generate_dataset(tmp_path / "c", seed=6, **arguments)

    # Assert
    first, second, other = (_image_files(tmp_path / name) for name in "abc")
    assert first == second
    assert (tmp_path / "a" / MANIFEST_NAME).read_bytes() == (tmp_path / "b" / MANIFEST_NAME).read_bytes()
    assert first.keys() == other.keys()
    assert all(first[path] != other[path] for path in first)


def test_adding_a_class_or_resizing_a_split_leaves_existing_images_unchanged(tmp_path: Path) -> None:
    # Execute
    generate_dataset(
        tmp_path / "small", classes=("circle", "vertical_stripes"), sizes=SplitSizes(2, 2, 2), image_size=32
    )
    generate_dataset(
        tmp_path / "large",
        classes=("red_cross", "circle", "vertical_stripes"),
        sizes=SplitSizes(4, 2, 2),
        image_size=32,
    )

    # Assert
    small, large = _image_files(tmp_path / "small"), _image_files(tmp_path / "large")
    assert len(small) == 12 and len(large) == 24
    assert all(large[path] == data for path, data in small.items())


def test_second_call_with_same_arguments_rewrites_nothing_and_repairs_a_missing_file(tmp_path: Path) -> None:
    # Prepare
    arguments = {"classes": ("circle", "triangle"), "sizes": SplitSizes(2, 1, 1), "image_size": 32, "seed": 3}
    first = generate_dataset(tmp_path, **arguments)
    before = {path: (tmp_path / path).stat().st_mtime_ns for path in _image_files(tmp_path)}

    # Execute
    again = generate_dataset(tmp_path, **arguments)
    after = {path: (tmp_path / path).stat().st_mtime_ns for path in before}
    (tmp_path / "val/triangle/triangle_00000.png").unlink()
    repaired = generate_dataset(tmp_path, **arguments)

    # Assert
    assert again.files_written == 0 and again.total_bytes == first.total_bytes
    assert after == before
    assert repaired.files_written == 1 and repaired.total_bytes == first.total_bytes
    assert (tmp_path / "val/triangle/triangle_00000.png").is_file()


# ---------------------------------------------------------------- difficulty


def _load_split(root: Path, split: str, classes: tuple[str, ...], side: int) -> tuple[np.ndarray, np.ndarray]:
    rows = [row for row in _read_manifest(root) if row["split"] == split]
    features = []
    for row in rows:
        with Image.open(root / row["path"]) as image:
            small = image.resize((side, side), Image.Resampling.BOX)
        features.append(np.asarray(small, dtype=np.float32).ravel() / 255)
    labels = np.array([classes.index(row["label"]) for row in rows])
    return np.stack(features), labels


def _softmax_regression(features: np.ndarray, labels: np.ndarray, classes: int, steps: int = 300) -> np.ndarray:
    """Multinomial logistic regression by full-batch gradient descent; returns [features + 1, classes] weights."""
    inputs = np.hstack([features, np.ones((len(features), 1), dtype=np.float32)])
    targets = np.eye(classes, dtype=np.float32)[labels]
    weights = np.zeros((inputs.shape[1], classes), dtype=np.float32)
    for _ in range(steps):
        logits = inputs @ weights
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        probabilities /= probabilities.sum(1, keepdims=True)
        weights -= 0.1 * (inputs.T @ (probabilities - targets) / len(inputs) + 1e-3 * weights)
    return weights


def test_classes_are_learnable_from_pixels_but_not_trivially(tmp_path: Path) -> None:
    # Prepare: 40 train / 25 test images per class; pixels box-downsampled to 8x8 (192 inputs; bigger inputs only
    # overfit 320 images), standardised on train.
    generate_dataset(tmp_path, sizes=SplitSizes(40, 1, 25), image_size=32, seed=0)
    train_x, train_y = _load_split(tmp_path, "train", CLASS_NAMES, 8)
    test_x, test_y = _load_split(tmp_path, "test", CLASS_NAMES, 8)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

    # Execute
    centroids = np.stack([train_x[train_y == label].mean(0) for label in range(len(CLASS_NAMES))])
    centroid_pred = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    weights = _softmax_regression(train_x, train_y, len(CLASS_NAMES))
    logistic_pred = (np.hstack([test_x, np.ones((len(test_x), 1), dtype=np.float32)]) @ weights).argmax(1)

    # Assert: measured 0.265 (centroid) and 0.290 (logistic) on 200 test images when written, 0.195-0.295 and
    # 0.290-0.360 over seeds 0-4. Chance is 0.125 (standard deviation 0.023 here), so 0.17 and 0.22 are 2 and
    # 4 deviations above it. The upper bound is the point: shapes, counts and orientations at random places
    # must not be readable off raw pixels (a version with plain backgrounds reached 0.62, fixed positions 0.80).
    centroid_accuracy = float((centroid_pred == test_y).mean())
    logistic_accuracy = float((logistic_pred == test_y).mean())
    assert 0.17 <= centroid_accuracy <= 0.5
    assert 0.22 <= logistic_accuracy <= 0.5


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"classes": ("circle", "hexagon")}, "unknown class 'hexagon'"),
        ({"classes": ("circle", "circle")}, "duplicate classes: circle"),
        ({"classes": ("circle",)}, "at least 2 classes"),
        ({"classes": "circle"}, "not the string"),
        ({"image_size": 16}, "image size must be an integer from 32 to 1024"),
        ({"image_size": 4096}, "image size must be an integer from 32 to 1024"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"image_format": "gif"}, "image format must be one of png, jpeg"),
        ({"sizes": (4, 1, 1)}, "sizes must be a SplitSizes"),
    ],
)
def test_generate_dataset_rejects_bad_arguments_before_writing(tmp_path: Path, arguments: dict, message: str) -> None:
    # Execute
    with pytest.raises(InvalidArgumentError, match=message):
        generate_dataset(tmp_path / "out", **arguments)

    # Assert
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("train", "val", "test", "message"),
    [(0, 1, 1, "train=0"), (2, -1, 1, "val=-1"), (2, 1, 100_001, "test=100001"), (2, 1, True, "must be an integer")],
)
def test_split_sizes_reject_counts_out_of_range(train: int, val: int, test: int, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        SplitSizes(train, val, test)


def test_render_image_rejects_unknown_class_and_bad_size() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown class 'square'"):
        render_image("square", np.random.default_rng(0))
    with pytest.raises(InvalidArgumentError, match="image size"):
        render_image("circle", np.random.default_rng(0), size=8)


def test_refuses_unrelated_non_empty_directory_and_leaves_it_alone(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "notes.txt").write_text("mine")

    # Execute
    with pytest.raises(InvalidArgumentError, match="not empty and was not made by this generator"):
        generate_dataset(tmp_path, sizes=SplitSizes(1, 1, 1), image_size=32)

    # Assert
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_refuses_previous_dataset_made_with_other_arguments(tmp_path: Path) -> None:
    # Prepare
    generate_dataset(tmp_path, classes=("circle", "triangle"), sizes=SplitSizes(1, 1, 1), image_size=32, seed=1)
    files_before = _image_files(tmp_path)

    # Execute
    with pytest.raises(InvalidArgumentError, match=r"other arguments \(differs in: image_size, seed\)"):
        generate_dataset(tmp_path, classes=("circle", "triangle"), sizes=SplitSizes(1, 1, 1), image_size=40, seed=2)

    # Assert
    assert _image_files(tmp_path) == files_before
    assert '"seed": 1' in (tmp_path / MARKER_NAME).read_text()


def test_refuses_a_root_that_is_a_file(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "data"
    target.write_text("x")

    # Execute / Assert
    with pytest.raises(InvalidArgumentError, match="is not a directory"):
        generate_dataset(target)


# ---------------------------------------------------------------- command line


def test_main_generates_and_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    flags = "--seed 2 --train 2 --val 1 --test 1 --size 32 --format jpeg".split()
    status = main([str(tmp_path / "cli"), *flags, "--classes", "two_dots, three_dots"])

    # Assert
    output = capsys.readouterr().out
    assert status == 0
    assert "classes (2): two_dots, three_dots" in output and "train 4, val 2, test 2" in output
    assert len(_image_files(tmp_path / "cli")) == 8


def test_main_reports_bad_arguments_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    status = main([str(tmp_path / "cli"), "--classes", "circle,octagon"])

    # Assert
    assert status == 2
    assert "error: unknown class 'octagon'" in capsys.readouterr().err


def test_module_help_documents_every_flag() -> None:
    # Execute
    result = subprocess.run(
        [sys.executable, "-m", "services.tuner.synthetic", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Assert
    assert result.returncode == 0
    for flag in ("OUT_DIR", "--seed", "--train", "--val", "--test", "--size", "--format", "--classes"):
        assert flag in result.stdout
