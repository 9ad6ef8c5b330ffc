"""Tests for the glyphs kind of the synthetic generator (handwriting-like digits) and the recipe benchmark section
that uses it: layout, determinism, class balance, the shapes kind left as it was, the command line."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgumentError
from services.tuner.synthetic import (
    GLYPH_CLASS_NAMES,
    MANIFEST_NAME,
    MARKER_NAME,
    SplitSizes,
    class_names_of,
    generate_dataset,
    main,
    render_glyph,
)


def _image_files(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix in (".png", ".jpg")
    }


def _manifest(root: Path) -> list[dict[str, str]]:
    with (root / MANIFEST_NAME).open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_glyphs_write_a_balanced_grayscale_imagefolder_tree(tmp_path: Path) -> None:
    # Execute
    summary = generate_dataset(tmp_path, kind="glyphs", sizes=SplitSizes(3, 2, 1), image_size=32, seed=1)

    # Assert
    files = _image_files(tmp_path)
    expected = {
        f"{split}/{name}/{name}_{index:05d}.png"
        for split, count in (("train", 3), ("val", 2), ("test", 1))
        for name in GLYPH_CLASS_NAMES
        for index in range(count)
    }
    assert set(files) == expected
    assert summary.classes == GLYPH_CLASS_NAMES == class_names_of("glyphs")
    assert summary.counts == {"train": 30, "val": 20, "test": 10}
    rows = _manifest(tmp_path)
    per_split_class = Counter((row["split"], row["label"]) for row in rows)
    assert set(per_split_class.values()) == {3, 2, 1} and len(per_split_class) == 30  # every class in every split
    assert all(per_split_class[("train", name)] == 3 for name in GLYPH_CLASS_NAMES)
    for relative in files:
        with Image.open(tmp_path / relative) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (32, 32))
    marker = json.loads((tmp_path / MARKER_NAME).read_text())
    assert marker["kind"] == "glyphs" and marker["classes"] == list(GLYPH_CLASS_NAMES)


def test_glyphs_are_byte_identical_per_seed_and_differ_across_seeds(tmp_path: Path) -> None:
    # Prepare
    arguments = {"kind": "glyphs", "classes": ("digit_3", "digit_8"), "sizes": SplitSizes(3, 1, 1), "image_size": 32}

    # Execute
    generate_dataset(tmp_path / "a", seed=5, **arguments)
    generate_dataset(tmp_path / "b", seed=5, **arguments)
    generate_dataset(tmp_path / "c", seed=6, **arguments)

    # Assert
    first, second, other = (_image_files(tmp_path / name) for name in "abc")
    assert first == second and len(first) == 10
    assert (tmp_path / "a" / MANIFEST_NAME).read_bytes() == (tmp_path / "b" / MANIFEST_NAME).read_bytes()
    assert first.keys() == other.keys() and all(first[path] != other[path] for path in first)


def test_render_glyph_depends_only_on_the_generator_state_and_draws_strokes() -> None:
    # Execute
    first = np.asarray(render_glyph("digit_7", np.random.default_rng(4)))
    again = np.asarray(render_glyph("digit_7", np.random.default_rng(4)))
    other = np.asarray(render_glyph("digit_7", np.random.default_rng(5)))

    # Assert: light strokes on a darker background cover a small part of the frame (thin pen lines, not blobs)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert first.shape == (32, 32) and first.dtype == np.uint8
    bright = first > (int(first.min()) + int(first.max())) / 2
    assert 0.05 < bright.mean() < 0.45


def test_glyph_classes_differ_in_their_strokes_not_in_brightness() -> None:
    # Prepare: the mean image of each class over 30 draws
    means = {
        name: np.mean([np.asarray(render_glyph(name, np.random.default_rng(seed)), float) for seed in range(30)], 0)
        for name in GLYPH_CLASS_NAMES
    }

    # Assert: per-class mean brightness is close (no class readable off the overall level), the average shapes differ
    levels = [float(mean.mean()) for mean in means.values()]
    assert max(levels) - min(levels) < 25
    assert np.abs(means["digit_1"] - means["digit_0"]).max() > 40


def test_shapes_marker_and_images_are_unaffected_by_the_glyphs_kind(tmp_path: Path) -> None:
    # Execute: the default kind, the explicit one
    generate_dataset(tmp_path / "a", sizes=SplitSizes(1, 1, 1), image_size=32)
    generate_dataset(tmp_path / "b", kind="shapes", sizes=SplitSizes(1, 1, 1), image_size=32)

    # Assert: a shapes marker has no kind key (version-1 trees stay accepted), same bytes either way
    marker = json.loads((tmp_path / "a" / MARKER_NAME).read_text())
    assert "kind" not in marker and marker["version"] == 1
    assert _image_files(tmp_path / "a") == _image_files(tmp_path / "b")


def test_kinds_do_not_mix_in_one_directory_and_classes_belong_to_the_kind(tmp_path: Path) -> None:
    # Prepare
    generate_dataset(tmp_path / "g", kind="glyphs", sizes=SplitSizes(1, 1, 1), image_size=32)

    # Execute / Assert
    with pytest.raises(InvalidArgumentError, match="differs in: classes, kind"):
        generate_dataset(tmp_path / "g", sizes=SplitSizes(1, 1, 1), image_size=32)
    with pytest.raises(InvalidArgumentError, match="unknown glyphs class 'circle'"):
        generate_dataset(tmp_path / "x", kind="glyphs", classes=("circle", "digit_1"))
    with pytest.raises(InvalidArgumentError, match="kind must be one of shapes, glyphs"):
        generate_dataset(tmp_path / "y", kind="letters")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="unknown glyph class"):
        render_glyph("circle", np.random.default_rng(0))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_main_writes_glyphs_with_kind_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    status = main([str(tmp_path / "cli"), "--kind", "glyphs", "--train", "2", "--val", "1", "--test", "1",
                   "--size", "32", "--classes", "digit_0,digit_9"])  # fmt: skip

    # Assert
    output = capsys.readouterr().out
    assert status == 0
    assert "classes (2): digit_0, digit_9" in output and "train 4, val 2, test 2" in output
    assert len(_image_files(tmp_path / "cli")) == 8


@pytest.mark.slow
def test_recipe_section_smoke_profile_reports_every_recipe_and_both_targets(tmp_path: Path) -> None:
    # Prepare
    from bench import recipe

    # Execute: the micro ViT, a few images per class, 2 seeds of 2 epochs (plumbing only: the figures mean nothing)
    section = recipe.run("smoke", tmp_path)
    text = recipe.markdown(section)

    # Assert
    tasks = {row["task"] for row in section["rows"]}
    assert tasks == {"shapes", "glyphs"}
    names = [row["recipe"] for row in section["rows"] if row["task"] == "glyphs"]
    assert names == ["pixel logistic regression", *(r.name for r in recipe.SMOKE.recipes)]
    default = next(row for row in section["rows"] if row["task"] == "shapes" and row["is_default"])
    assert default["seeds"] == 2 and len(default["accuracies"]) == 2
    assert {"vs_pixels_mean", "vs_pixels_std", "vs_previous_mean", "vs_previous_std"} <= default.keys()
    assert len(default["curve"]) == 2  # epochs
    assert [target["name"].split(":")[0] for target in section["targets"]] == ["shapes", "glyphs"]
    assert all(isinstance(target["passed"], bool) for target in section["targets"])
    assert "**glyphs**" in text and "pixel logistic regression" in text
    assert not any(tmp_path.iterdir())  # out_dir is not written to
