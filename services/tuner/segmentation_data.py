"""Labelled images for semantic segmentation: the ADE20K-style layout users already have, checked before anything is
sent, a synthetic generator of the same layout, and the scores (mIoU, pixel accuracy, per class).

    DIR/images/training/x.jpg       DIR/annotations/training/x.png      uint8 class ids per pixel, 255 ignored
    DIR/images/validation/y.jpg     DIR/annotations/validation/y.png
    DIR/classes.txt                 optional: one class name per line, in id order

    dataset = load_segmentation_dataset("ade/")            # SegmentationError naming every bad file, or the dataset
    write_synthetic_segmentation("var/seg", per_split={"training": 40, "validation": 10})
    scores = segmentation_scores(confusion(predicted, labels, num_classes=4))   # mIoU, pixel accuracy, per class

Groundwork of the segmentation issue: `mist tune` does not read this layout yet.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from services.common.errors import InvalidArgumentError
from services.tuner.data import IMAGE_EXTENSIONS

IGNORE_INDEX = 255  # a mask pixel of this value is not scored and not trained on
SPLITS = ("training", "validation")
CLASSES_FILE = "classes.txt"
MAX_LISTED_PROBLEMS = 20
SYNTHETIC_CLASSES = ("background", "disc", "square", "bar")


class SegmentationError(InvalidArgumentError):
    """Problems of a segmentation dataset, each naming its file; nothing was sent to any server."""

    def __init__(self, problems: Sequence[str], root: Path) -> None:
        shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        super().__init__(f"{len(problems)} problem(s) in the segmentation data under {root}: {shown}{more}")
        self.problems = tuple(problems)


@dataclass(frozen=True)
class SegmentationItem:
    name: str  # the image's path relative to DIR/images
    image: Path
    mask: Path
    split: str  # "training" or "validation"
    size: tuple[int, int]  # (width, height) of both


@dataclass(frozen=True)
class SegmentationDataset:
    root: Path
    class_names: tuple[str, ...]  # id -> name
    items: tuple[SegmentationItem, ...]
    ignore_index: int = IGNORE_INDEX

    def split(self, name: str) -> list[SegmentationItem]:
        return [item for item in self.items if item.split == name]


def is_segmentation_layout(root: str | Path) -> bool:
    """Whether `root` looks like the layout above (images/ and annotations/, each with a training/ folder)."""
    base = Path(root)
    return (base / "images" / "training").is_dir() and (base / "annotations" / "training").is_dir()


def load_segmentation_dataset(
    root: str | Path, *, class_names: Sequence[str] | None = None, ignore_index: int = IGNORE_INDEX
) -> SegmentationDataset:
    """Every image with its mask, checked: a mask per image (same stem, .png), of the image's size, 8-bit single
    channel, with ids among the classes (or the ignore index). Every problem is collected and raised together."""
    base = Path(root).expanduser()
    if not is_segmentation_layout(base):
        raise InvalidArgumentError(f"{base} is not a segmentation dataset: expected images/training/ and "
                                   "annotations/training/ (validation/ optional)")  # fmt: skip
    problems: list[str] = []
    names = tuple(class_names) if class_names is not None else _read_classes(base, problems)
    items = []
    for split in SPLITS:
        images_dir, masks_dir = base / "images" / split, base / "annotations" / split
        if not images_dir.is_dir():
            continue
        images = sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        masks = {p.relative_to(masks_dir).with_suffix("").as_posix(): p for p in masks_dir.rglob("*.png")}
        for image in images:
            stem = image.relative_to(images_dir).with_suffix("").as_posix()
            mask = masks.pop(stem, None)
            if mask is None:
                problems.append(f"{image}: no mask {masks_dir / (stem + '.png')}")
                continue
            item = _checked_pair(image, mask, split, stem, names, ignore_index, problems)
            if item is not None:
                items.append(item)
        problems.extend(f"{mask}: a mask without an image in {images_dir}" for mask in masks.values())
    if not problems and not any(item.split == "training" for item in items):
        problems.append(f"{base / 'images' / 'training'}: no images")
    if problems:
        raise SegmentationError(problems, base)
    if class_names is None and not (base / CLASSES_FILE).is_file():
        highest = max(int(_mask_ids(item.mask).max(initial=0)) for item in items)  # ids seen, ignore index aside
        names = tuple(str(i) for i in range(max(highest + 1, 2)))
    return SegmentationDataset(base, names, tuple(items), ignore_index)


def _read_classes(base: Path, problems: list[str]) -> tuple[str, ...]:
    path = base / CLASSES_FILE
    if not path.is_file():
        return ()
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(names) < 2 or len(set(names)) != len(names):
        problems.append(f"{path}: needs at least two distinct class names, one per line")
    return names


def _checked_pair(
    image: Path, mask: Path, split: str, stem: str, names: tuple[str, ...], ignore: int, problems: list[str]
) -> SegmentationItem | None:
    try:
        with Image.open(image) as opened:
            image_size = opened.size
        with Image.open(mask) as opened:
            mask_size, mode = opened.size, opened.mode
    except OSError as error:
        problems.append(f"{image} or {mask}: cannot be read as an image ({error})")
        return None
    if mode not in ("L", "P"):
        problems.append(f"{mask}: not an 8-bit single-channel mask (mode {mode})")
        return None
    if mask_size != image_size:
        problems.append(f"{mask}: {mask_size[0]}x{mask_size[1]}, but its image is {image_size[0]}x{image_size[1]}")
        return None
    if names:
        ids = np.unique(_mask_ids(mask))
        outside = [int(i) for i in ids if i >= len(names)]
        if outside:
            problems.append(f"{mask}: class ids {outside[:10]} outside the {len(names)} classes (ignore: {ignore})")
            return None
    return SegmentationItem(stem, image, mask, split, image_size)


def _mask_ids(mask: Path, ignore: int = IGNORE_INDEX) -> np.ndarray:
    """The mask's class ids, the ignore index left out."""
    with Image.open(mask) as opened:
        values = np.asarray(opened)
    return values[values != ignore]


# ---------------------------------------------------------------------------------------------- synthetic data


def _rng(seed: int, *parts: str | int) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(str(part).encode()) for part in parts)])


# Each class has its own colour family, as classes of real scenes have (sky, grass, road): a disc is reddish, a square
# greenish, a bar bluish, each jittered, on a noisy grey background. A random-init backbone can tell colours apart;
# shape alone, at the 1/32 grid of a hierarchical backbone, it could not learn from a few hundred pictures.
_CLASS_COLOURS = {1: (0.85, 0.25, 0.2), 2: (0.25, 0.75, 0.3), 3: (0.25, 0.35, 0.9)}
_COLOUR_JITTER = 0.12


def render_segmentation(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, Image.Image]:
    """One RGB picture of 1-3 shapes (disc, square, bar; each class its colour family) on a noisy grey background and
    its mask of class ids (0 is the background); a ring of 255 (ignored) pixels around each shape, as annotators leave
    uncertain borders."""
    background = rng.uniform(0.3, 0.7) + rng.uniform(-0.05, 0.05, size=3)
    pixels = np.clip(background + rng.normal(0, 0.05, size=(size, size, 3)), 0, 1)
    picture = Image.fromarray((pixels * 255).astype(np.uint8), "RGB")
    mask = Image.new("L", (size, size), 0)
    draw_picture, draw_mask = ImageDraw.Draw(picture), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        label = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        tint = np.clip(np.array(_CLASS_COLOURS[label]) + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=3), 0, 1)
        colour = tuple(int(c * 255) for c in tint)
        cx, cy = (float(v) for v in rng.uniform(0.2 * size, 0.8 * size, size=2))
        radius = float(rng.uniform(0.08, 0.2) * size)
        if label == 1:
            box = [cx - radius, cy - radius, cx + radius, cy + radius]
            draw_mask.ellipse([b - 1 for b in box[:2]] + [b + 1 for b in box[2:]], fill=IGNORE_INDEX)
            draw_picture.ellipse(box, fill=colour)
            draw_mask.ellipse(box, fill=label)
        else:
            half_w, half_h = (radius, radius) if label == 2 else (radius * 1.6, radius * 0.35)
            box = [cx - half_w, cy - half_h, cx + half_w, cy + half_h]
            draw_mask.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], fill=IGNORE_INDEX)
            draw_picture.rectangle(box, fill=colour)
            draw_mask.rectangle(box, fill=label)
    return picture, mask


def write_synthetic_segmentation(
    root: str | Path, *, per_split: Mapping[str, int] | None = None, size: int = 64, seed: int = 0
) -> Path:
    """The layout above under `root`: PNG pictures and masks, classes.txt with SYNTHETIC_CLASSES; deterministic."""
    base = Path(root)
    counts = dict(per_split or {"training": 40, "validation": 10})
    for split, count in counts.items():
        if split not in SPLITS:
            raise InvalidArgumentError(f"split must be one of {SPLITS}, got {split!r}")
        for folder in ("images", "annotations"):
            (base / folder / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            picture, mask = render_segmentation(_rng(seed, split, index), size)
            for image, folder in ((picture, "images"), (mask, "annotations")):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG", compress_level=6)
                (base / folder / split / f"{index:05d}.png").write_bytes(buffer.getvalue())
    (base / CLASSES_FILE).write_text("\n".join(SYNTHETIC_CLASSES) + "\n", encoding="utf-8")
    return base


# ---------------------------------------------------------------------------------------------- scores


def confusion(predicted: np.ndarray, labels: np.ndarray, *, num_classes: int, ignore_index: int = IGNORE_INDEX
              ) -> np.ndarray:  # fmt: skip
    """[C, C] pixel counts (true class, predicted class) over the pixels whose label is not ignored."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape:
        raise InvalidArgumentError(f"predictions {predicted.shape} and labels {labels.shape} differ in shape")
    kept = labels != ignore_index
    truth, guess = labels[kept].astype(np.int64), predicted[kept].astype(np.int64)
    if truth.size and (truth.max() >= num_classes or guess.min() < 0 or guess.max() >= num_classes):
        raise InvalidArgumentError(f"class ids outside 0..{num_classes - 1}")
    return np.bincount(truth * num_classes + guess, minlength=num_classes * num_classes).reshape(num_classes, -1)


@dataclass(frozen=True)
class SegmentationScores:
    miou: float  # mean IoU over the classes present in the labels or the predictions
    pixel_accuracy: float
    iou: tuple[float | None, ...]  # per class; None for a class neither labelled nor predicted
    accuracy: tuple[float | None, ...]  # per class recall; None for a class never labelled


def segmentation_scores(matrix: np.ndarray) -> SegmentationScores:
    """mIoU, pixel accuracy and per-class IoU and accuracy from a confusion matrix (the usual definitions: a class
    absent from both labels and predictions does not count in the mean)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    hits = np.diag(matrix)
    labelled, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    union = labelled + predicted - hits
    iou = tuple(float(h / u) if u else None for h, u in zip(hits, union, strict=True))
    accuracy = tuple(float(h / n) if n else None for h, n in zip(hits, labelled, strict=True))
    present = [value for value in iou if value is not None]
    total = matrix.sum()
    return SegmentationScores(
        miou=float(np.mean(present)) if present else 0.0,
        pixel_accuracy=float(hits.sum() / total) if total else 0.0,
        iou=iou,
        accuracy=accuracy,
    )
