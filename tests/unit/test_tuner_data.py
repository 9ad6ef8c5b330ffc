"""Finding, labelling, splitting and fingerprinting the user's images (services.tuner.data).

Images are never decoded on the device, so most fixtures are small distinct byte strings with image names.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from services.common.errors import InvalidArgumentError
from services.tuner.data import Dataset, assign_splits, dataset_from_memory, load_dataset
from services.tuner.synthetic import SplitSizes, generate_dataset


def write_images(root: Path, counts: dict[str, int], *, ext: str = "png") -> None:
    """root/<class>/<class>_<i>.<ext>, each file's bytes unique."""
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            (root / name / f"{name}_{index:03d}.{ext}").write_bytes(f"image {name} {index}".encode())


def write_manifest(path: Path, rows: list[tuple[str, ...]], header: str = "path,label,split") -> Path:
    path.write_text(header + "\n" + "".join(",".join(row) + "\n" for row in rows))
    return path


def split_counts(dataset: Dataset) -> dict[str, Counter]:
    counts: dict[str, Counter] = {}
    for item in dataset.items:
        counts.setdefault(item.split, Counter())[dataset.class_names[item.label]] += 1
    return counts


# ------------------------------------------------------------------------------------------------ layouts


def test_image_folder_tree_is_labelled_by_folder_and_split_per_class(tmp_path):
    # Prepare
    write_images(tmp_path, {"dog": 10, "cat": 10, "bird": 5})

    # Execute
    dataset = load_dataset(tmp_path, val_fraction=0.2, seed=1)

    # Assert
    assert dataset.layout == "folders"
    assert dataset.class_names == ("bird", "cat", "dog")
    assert len(dataset) == 25
    assert split_counts(dataset) == {
        "train": Counter({"cat": 8, "dog": 8, "bird": 4}),
        "val": Counter({"cat": 2, "dog": 2, "bird": 1}),
    }
    first = dataset.items[0]
    assert (first.name, first.label) == ("bird/bird_000.png", 0)
    assert first.read_bytes() == b"image bird 0"
    assert dataset.indices("val") == [i for i, item in enumerate(dataset.items) if item.split == "val"]


def test_images_in_nested_folders_and_all_extensions_are_found(tmp_path):
    # Prepare
    write_images(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / "deeper").mkdir()
    (tmp_path / "a" / "deeper" / "x.JPEG").write_bytes(b"jpeg")
    (tmp_path / "b" / "y.webp").write_bytes(b"webp")
    (tmp_path / "b" / "z.jpg").write_bytes(b"jpg")

    # Execute
    dataset = load_dataset(tmp_path, val_fraction=0.0)

    # Assert
    assert sorted(item.name for item in dataset.items) == [
        "a/a_000.png", "a/a_001.png", "a/deeper/x.JPEG", "b/b_000.png", "b/b_001.png", "b/y.webp", "b/z.jpg",
    ]  # fmt: skip
    assert {item.split for item in dataset.items} == {"train"}


def test_hidden_files_and_non_images_are_ignored_with_a_debug_log(tmp_path, caplog):
    # Prepare
    write_images(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "a" / "notes.txt").write_bytes(b"junk")
    (tmp_path / "a" / ".thumbs").mkdir()
    (tmp_path / "a" / ".thumbs" / "t.png").write_bytes(b"thumb")
    (tmp_path / ".git").mkdir()
    (tmp_path / "README.md").write_text("hello")

    # Execute
    with caplog.at_level(logging.DEBUG, logger="services.tuner.data"):
        dataset = load_dataset(tmp_path, val_fraction=0.0)

    # Assert
    assert len(dataset) == 4
    assert dataset.class_names == ("a", "b")
    ignored = "\n".join(record.getMessage() for record in caplog.records)
    for name in (".DS_Store", "notes.txt", ".thumbs", ".git", "README.md"):
        assert name in ignored


def test_split_folders_are_respected(tmp_path):
    # Prepare
    write_images(tmp_path / "train", {"a": 4, "b": 4})
    write_images(tmp_path / "val", {"a": 1, "b": 2})
    write_images(tmp_path / "test", {"a": 3, "b": 3})

    # Execute
    dataset = load_dataset(tmp_path, val_fraction=0.5, test_fraction=0.3)

    # Assert: fractions do not apply when every split is given
    assert dataset.layout == "split_folders"
    assert split_counts(dataset) == {
        "train": Counter({"a": 4, "b": 4}),
        "val": Counter({"a": 1, "b": 2}),
        "test": Counter({"a": 3, "b": 3}),
    }
    assert dataset.items[0].name == "test/a/a_000.png"
    assert dataset.warnings == ()


def test_a_missing_val_split_is_carved_out_of_train(tmp_path):
    # Prepare
    write_images(tmp_path / "train", {"a": 10, "b": 10})
    write_images(tmp_path / "test", {"a": 2, "b": 2})

    # Execute
    dataset = load_dataset(tmp_path, val_fraction=0.2)

    # Assert
    assert split_counts(dataset) == {
        "train": Counter({"a": 8, "b": 8}),
        "val": Counter({"a": 2, "b": 2}),
        "test": Counter({"a": 2, "b": 2}),
    }
    assert all(item.name.startswith("train/") for item in dataset.items if item.split == "val")


def test_manifest_paths_are_relative_to_it_and_splits_optional(tmp_path):
    # Prepare
    write_images(tmp_path / "images", {"x": 5, "y": 5})
    rows = [(f"images/{c}/{c}_{i:03d}.png", c, "test" if i == 0 else "") for c in "xy" for i in range(5)]
    manifest = write_manifest(tmp_path / "labels.csv", rows)

    # Execute
    dataset = load_dataset(manifest, val_fraction=0.25, seed=3)

    # Assert: row order kept; given splits kept; the rest split 3 train / 1 val per class
    assert dataset.layout == "manifest"
    assert dataset.root == tmp_path
    assert [item.name for item in dataset.items] == [row[0] for row in rows]
    assert split_counts(dataset) == {
        "test": Counter({"x": 1, "y": 1}),
        "train": Counter({"x": 3, "y": 3}),
        "val": Counter({"x": 1, "y": 1}),
    }
    assert dataset.items[1].read_bytes() == b"image x 1"


def test_manifest_without_split_column_and_given_class_order(tmp_path):
    # Prepare
    write_images(tmp_path, {"x": 3, "y": 3})
    rows = [(f"{c}/{c}_{i:03d}.png", c) for c in "xy" for i in range(3)]
    manifest = write_manifest(tmp_path / "m.csv", rows, header="path,label")

    # Execute
    dataset = load_dataset(manifest, val_fraction=0.0, class_names=["y", "x"])

    # Assert
    assert dataset.class_names == ("y", "x")
    assert [item.label for item in dataset.items] == [1, 1, 1, 0, 0, 0]


def test_synthetic_dataset_loads_the_same_as_tree_and_as_manifest(tmp_path):
    # Prepare
    summary = generate_dataset(tmp_path, classes=("circle", "triangle"), sizes=SplitSizes(3, 1, 1), image_size=32)

    # Execute
    tree = load_dataset(tmp_path)
    manifest = load_dataset(tmp_path / "manifest.csv")

    # Assert
    assert tree.layout == "split_folders" and manifest.layout == "manifest"
    assert tree.class_names == manifest.class_names == summary.classes
    assert sorted((i.name, i.label, i.split) for i in tree.items) == sorted(
        (i.name, i.label, i.split) for i in manifest.items
    )
    assert tree.fingerprint() == manifest.fingerprint()
    assert len(tree.indices("train")) == 6


# ------------------------------------------------------------------------------------------------- splits


def test_split_is_deterministic_stratified_and_seeded(tmp_path):
    # Prepare
    write_images(tmp_path, {"a": 20, "b": 13, "c": 7})

    # Execute
    first = load_dataset(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=7)
    again = load_dataset(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=7)
    other = load_dataset(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=8)

    # Assert
    assert [i.split for i in first.items] == [i.split for i in again.items]
    assert [i.split for i in first.items] != [i.split for i in other.items]
    assert first.counts() == {"train": [12, 7, 5], "val": [4, 3, 1], "test": [4, 3, 1]}
    assert other.counts() == first.counts()


def test_adding_one_image_moves_at_most_one_other(tmp_path):
    # Prepare
    names = [f"img_{i}" for i in range(30)]
    before = assign_splits(names, [0] * 30, val_fraction=0.2, test_fraction=0.0, seed=0)

    # Execute
    after = assign_splits([*names, "img_new"], [0] * 31, val_fraction=0.2, test_fraction=0.0, seed=0)

    # Assert: 30 * 0.2 = 6 val images, 31 * 0.2 rounds to 6 too
    changed = sum(a != b for a, b in zip(before, after, strict=False))
    assert before.count("val") == after.count("val") == 6
    assert changed <= 2  # one image left val at most, the new one may have taken its place


def test_every_class_gets_one_val_image_even_when_small(tmp_path):
    # Prepare
    write_images(tmp_path, {"big": 50, "tiny": 2})

    # Execute
    dataset = load_dataset(tmp_path, val_fraction=0.1)

    # Assert
    assert dataset.counts() == {"train": [45, 1], "val": [5, 1], "test": [0, 0]}


# ------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_tracks_bytes_labels_and_splits(tmp_path):
    # Prepare
    write_images(tmp_path, {"a": 4, "b": 4})
    rows = [(f"{c}/{c}_{i:03d}.png", c, "train") for c in "ab" for i in range(4)]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    base = load_dataset(manifest).fingerprint()

    # Execute
    unchanged = load_dataset(manifest).fingerprint()
    (tmp_path / "a" / "a_002.png").write_bytes(b"image a 3")  # one byte differs
    content_changed = load_dataset(manifest).fingerprint()
    (tmp_path / "a" / "a_002.png").write_bytes(b"image a 2")
    restored = load_dataset(manifest).fingerprint()
    write_manifest(manifest, [*rows[:3], ("a/a_003.png", "b", "train"), *rows[4:]])
    label_changed = load_dataset(manifest).fingerprint()
    write_manifest(manifest, [*rows[:3], ("a/a_003.png", "a", "val"), *rows[4:]])
    split_changed = load_dataset(manifest).fingerprint()

    # Assert
    assert len(base) == 64 and int(base, 16) >= 0
    assert unchanged == base == restored
    assert len({base, content_changed, label_changed, split_changed}) == 4


def test_fingerprint_depends_on_class_order(tmp_path):
    # Prepare
    write_images(tmp_path, {"a": 2, "b": 2})

    # Execute
    default = load_dataset(tmp_path, val_fraction=0.0).fingerprint()
    reordered = load_dataset(tmp_path, val_fraction=0.0, class_names=["b", "a"]).fingerprint()

    # Assert
    assert default != reordered


# ------------------------------------------------------------------------------------------- bad inputs


def test_missing_directory(tmp_path):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_directory_without_class_folders(tmp_path):
    (tmp_path / "loose.png").write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="has no class folders"):
        load_dataset(tmp_path)


def test_empty_class_folder(tmp_path):
    write_images(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("not an image")
    with pytest.raises(InvalidArgumentError, match=r"class folder .*/c holds no images"):
        load_dataset(tmp_path)


def test_only_one_class(tmp_path):
    write_images(tmp_path, {"only": 5})
    with pytest.raises(InvalidArgumentError, match="only one class .'only'.*at least two"):
        load_dataset(tmp_path)


def test_folder_not_among_given_classes(tmp_path):
    write_images(tmp_path, {"a": 3, "b": 3, "c": 3})
    with pytest.raises(InvalidArgumentError, match=r"folders \['c'\] that are not among the task's classes"):
        load_dataset(tmp_path, class_names=["a", "b"])


def test_given_class_without_images(tmp_path):
    write_images(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(InvalidArgumentError, match=r"classes \['c'\] have no training images"):
        load_dataset(tmp_path, class_names=["a", "b", "c"])


def test_manifest_label_not_among_given_classes(tmp_path):
    write_images(tmp_path, {"a": 2, "b": 2})
    manifest = write_manifest(tmp_path / "m.csv", [("a/a_000.png", "a"), ("b/b_000.png", "zebra")], header="path,label")
    with pytest.raises(
        InvalidArgumentError, match=r"b/b_000.png has label 'zebra', not one of the classes \['a', 'b'\]"
    ):
        load_dataset(manifest, class_names=["a", "b"])


def test_manifest_path_that_does_not_exist(tmp_path):
    write_images(tmp_path, {"a": 2, "b": 2})
    manifest = write_manifest(tmp_path / "m.csv", [("a/a_000.png", "a"), ("b/gone.png", "b")], header="path,label")
    with pytest.raises(InvalidArgumentError, match=r"line 3: image b/gone.png does not exist"):
        load_dataset(manifest)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("file,class\na/a_000.png,a\n", "header is"),
        ("path,label\na/a_000.png\n", "line 2: expected 2 columns"),
        ("path,label,split\na/a_000.png,a,training\n", "line 2: split must be one of train, val, test"),
        (
            "path,label\na/a_000.png,a\nb/b_000.png,b\na/a_000.png,a\n",
            "line 4: a/a_000.png is listed already on line 2",
        ),
        ("path,label\n\n", "lists no images"),
        ("path,label\n,a\n", "path and label must not be empty"),
    ],
)
def test_malformed_manifests(tmp_path, text, message):
    write_images(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(InvalidArgumentError, match=message):
        load_dataset(tmp_path / "m.csv", val_fraction=0.0)


def test_broken_link_and_empty_file_are_unreadable(tmp_path):
    write_images(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / "broken.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(InvalidArgumentError, match=r"cannot read .*broken.png: No such file"):
        load_dataset(tmp_path)
    (tmp_path / "a" / "broken.png").unlink()
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    with pytest.raises(InvalidArgumentError, match=r"cannot read .*empty.jpg: the file is empty"):
        load_dataset(tmp_path)


def test_image_vanishing_after_loading_fails_on_read_with_its_path(tmp_path):
    write_images(tmp_path, {"a": 2, "b": 2})
    dataset = load_dataset(tmp_path, val_fraction=0.0)
    (tmp_path / "a" / "a_000.png").unlink()
    with pytest.raises(InvalidArgumentError, match=r"cannot read image .*a_000.png"):
        dataset.items[0].read_bytes()
    with pytest.raises(InvalidArgumentError, match=r"cannot read image .*a_000.png"):
        dataset.fingerprint()


def test_class_missing_from_given_val_split_is_a_warning(tmp_path, caplog):
    # Prepare
    write_images(tmp_path / "train", {"a": 3, "b": 3})
    write_images(tmp_path / "val", {"a": 2})

    # Execute
    with caplog.at_level(logging.WARNING, logger="services.tuner.data"):
        dataset = load_dataset(tmp_path)

    # Assert
    expected = "the val split has no images of classes ['b']: its accuracy will not cover them"
    assert dataset.warnings == (expected,)
    assert expected in caplog.text
    assert dataset.counts()["val"] == [2, 0]


def test_class_missing_from_given_train_split_is_an_error(tmp_path):
    write_images(tmp_path / "train", {"a": 3})
    write_images(tmp_path / "val", {"a": 2, "b": 2})
    with pytest.raises(InvalidArgumentError, match=r"classes \['b'\] have no training images"):
        load_dataset(tmp_path)


def test_split_folders_mixed_with_class_folders(tmp_path):
    write_images(tmp_path / "train", {"a": 3, "b": 3})
    write_images(tmp_path, {"c": 3})
    with pytest.raises(InvalidArgumentError, match=r"mixes split folders \(train\) with other folders \(c\)"):
        load_dataset(tmp_path)


def test_class_too_small_for_the_requested_splits(tmp_path):
    write_images(tmp_path, {"a": 5, "b": 2})
    with pytest.raises(InvalidArgumentError, match="class 'b' has 2 image.s.: too few to keep 1 for val, 1 for test"):
        load_dataset(tmp_path, val_fraction=0.2, test_fraction=0.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 1.0}, "val_fraction must be a number in"),
        ({"val_fraction": -0.1}, "val_fraction must be a number in"),
        ({"test_fraction": "0.1"}, "test_fraction must be a number in"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must leave images to train on"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"class_names": "ab"}, "sequence of names"),
        ({"class_names": ["a", "a"]}, r"class names repeat: \['a'\]"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    write_images(tmp_path, {"a": 5, "b": 5})
    with pytest.raises(InvalidArgumentError, match=message):
        load_dataset(tmp_path, **kwargs)


# ------------------------------------------------------------------------------------------- in memory


def test_dataset_from_memory_splits_like_files_and_fingerprints_bytes():
    # Prepare
    records = [(f"{c}{i}", f"{c}-{i}".encode(), c, "test" if i == 9 else None) for c in "pq" for i in range(10)]

    # Execute
    dataset = dataset_from_memory(records, val_fraction=0.2, seed=0)
    changed = dataset_from_memory([(*records[0][:1], b"other", *records[0][2:]), *records[1:]], val_fraction=0.2)

    # Assert
    assert dataset.layout == "memory"
    assert dataset.class_names == ("p", "q")
    assert dataset.counts() == {"train": [7, 7], "val": [2, 2], "test": [1, 1]}
    assert dataset.items[0].read_bytes() == b"p-0"
    assert dataset.fingerprint() != changed.fingerprint()


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([("x", b"1", "a", None), ("x", b"2", "b", None)], "item 1 .'x'. repeats the id of item 0"),
        ([("x", b"", "a", None)], "has no image bytes"),
        ([("x", b"1", "a", "holdout")], "split must be one of"),
        ([], "no images received"),
    ],
)
def test_dataset_from_memory_bad_records(records, message):
    with pytest.raises(InvalidArgumentError, match=message):
        dataset_from_memory(records, val_fraction=0.0)
