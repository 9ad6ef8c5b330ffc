"""Small stand-in datasets in the exact layouts `mist reproduce` reads, drawn by the synthetic generator: for the
tests, and for trying the commands before the real data is at hand (nothing here downloads anything).

    python -m services.tuner.reproduce.standins vtab var/standins/vtab-1k       # 3 tasks in NOAH's layout
    python -m services.tuner.reproduce.standins fewshot var/standins/fewshot    # two datasets, both layouts
    python -m services.tuner.reproduce.standins dg var/standins/dg              # a source and two targets

Each labelled class is drawn as one of the synthetic shape classes (a VTAB task keeps its real class count, so its
edge network has e.g. 10 outputs for svhn, but only the first few labels have images). The images are tiny (32 px
by default, the test backbone's input) and deterministic per seed.
"""

from __future__ import annotations

import argparse
import io
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.tuner.reproduce.layouts import CLASSES_FILE, vtab_task
from services.tuner.synthetic import render_image

# The synthetic classes the tiny test ViT tells apart best (colour and orientation cues), then the others.
DRAWN_CLASSES = ("red_cross", "blue_cross", "horizontal_stripes", "vertical_stripes", "circle", "triangle")
DEFAULT_VTAB_TASKS = ("svhn", "patch_camelyon", "kitti")  # one per group: natural, specialized, structured


def _png(drawn: str, rng: np.random.Generator, size: int) -> bytes:
    buffer = io.BytesIO()
    render_image(drawn, rng, size).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _rng(seed: int, *parts: str | int) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(str(part).encode()) for part in parts)])


def _draw(folder: Path, relative: str, drawn: str, rng: np.random.Generator, size: int) -> str:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(drawn, rng, size))
    return relative


def write_vtab(
    root: str | Path,
    tasks: Sequence[str] = DEFAULT_VTAB_TASKS,
    *,
    labels: int = 3,
    train: int = 6,
    val: int = 2,
    test: int = 4,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """ROOT/<task>/{images/..., train800.txt, val200.txt, train800val200.txt, test.txt} with `labels` labelled
    classes per task (at most its class count) and train/val/test images per class; returns ROOT."""
    base = Path(root)
    for name in tasks:
        task = vtab_task(name)
        folder = base / task.name
        lists: dict[str, list[str]] = {"train800.txt": [], "val200.txt": [], "test.txt": []}
        for list_name, split, count in (("train800.txt", "train", train), ("val200.txt", "val", val),
                                        ("test.txt", "test", test)):  # fmt: skip
            for label in range(min(labels, task.num_classes)):
                drawn = DRAWN_CLASSES[label % len(DRAWN_CLASSES)]
                for i in range(count):
                    rng = _rng(seed, task.name, split, label, i)
                    relative = _draw(folder, f"images/{split}/{label:03d}_{i:04d}.png", drawn, rng, image_size)
                    lists[list_name].append(f"{relative} {label}")
        lists["train800val200.txt"] = lists["train800.txt"] + lists["val200.txt"]
        for list_name, lines in lists.items():
            (folder / list_name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return base


def write_split_dataset(
    folder: str | Path,
    classes: Sequence[str],
    *,
    layout: str = "lists",
    train: int = 6,
    val: int = 0,
    test: int = 4,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """One dataset folder: lists (train.txt, test.txt[, val.txt], classes.txt, images/) or ImageFolder split folders
    (train/<class>/, test/<class>/[, val/<class>/]); class i is drawn as DRAWN_CLASSES[i]."""
    base = Path(folder)
    lines: dict[str, list[str]] = {}
    for split, count in (("train", train), ("val", val), ("test", test)):
        for label, name in enumerate(classes):
            drawn = DRAWN_CLASSES[label % len(DRAWN_CLASSES)]
            for i in range(count):
                rng = _rng(seed, base.name, split, name, i)
                if layout == "lists":
                    relative = _draw(base, f"images/{split}/{label:03d}_{i:04d}.png", drawn, rng, image_size)
                    lines.setdefault(f"{split}.txt", []).append(f"{relative} {label}")
                else:
                    _draw(base, f"{split}/{name}/{i:04d}.png", drawn, rng, image_size)
    if layout == "lists":
        for name, listed in lines.items():
            (base / name).write_text("\n".join(listed) + "\n", encoding="utf-8")
        (base / CLASSES_FILE).write_text("\n".join(classes) + "\n", encoding="utf-8")
    return base


def write_fewshot(root: str | Path, *, per_class: int = 4, test: int = 4, seed: int = 0) -> Path:
    """ROOT/flowers (lists) and ROOT/pets (ImageFolder split folders), three classes each."""
    base = Path(root)
    write_split_dataset(base / "flowers", ("rose", "tulip", "daisy"), layout="lists", train=per_class, test=test,
                        seed=seed)  # fmt: skip
    write_split_dataset(base / "pets", ("cat", "dog", "hamster"), layout="folders", train=per_class, test=test,
                        seed=seed)  # fmt: skip
    return base


def write_dg(root: str | Path, *, train: int = 6, val: int = 2, test: int = 4, seed: int = 0) -> Path:
    """ROOT/source (ImageFolder train/val/test, four classes), ROOT/sketch (class folders without splits, all four
    classes, drawn with another seed) and ROOT/subset (lists holding two of the classes, named in classes.txt)."""
    base = Path(root)
    classes = ("n01", "n02", "n03", "n04")
    write_split_dataset(base / "source", classes, layout="folders", train=train, val=val, test=test, seed=seed)
    for label, name in enumerate(classes):  # ImageNet-Sketch's own layout: class folders, no splits
        for i in range(test):
            _draw(base / "sketch", f"{name}/{i:04d}.png", DRAWN_CLASSES[label], _rng(seed + 1, "sketch", name, i), 32)
    subset = base / "subset"
    lines = []
    for own_label, (source_label, name) in enumerate(((0, "n01"), (2, "n03"))):  # labels index classes.txt
        for i in range(test):
            rng = _rng(seed + 2, "subset", name, i)
            relative = _draw(subset, f"images/{name}_{i:04d}.png", DRAWN_CLASSES[source_label], rng, 32)
            lines.append(f"{relative} {own_label}")
    (subset / "test.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (subset / CLASSES_FILE).write_text("n01\nn03\n", encoding="utf-8")
    return base


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.tuner.reproduce.standins",
        description="Write small stand-in datasets in the layouts of mist reproduce vtab|fewshot|dg.",
    )
    parser.add_argument("protocol", choices=("vtab", "fewshot", "dg"))
    parser.add_argument("out", type=Path, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    writer = {"vtab": write_vtab, "fewshot": write_fewshot, "dg": write_dg}[args.protocol]
    written = writer(args.out, seed=args.seed)
    print(f"wrote {args.protocol} stand-ins under {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
