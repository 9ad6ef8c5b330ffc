"""The labelled images a user points `mist tune --data DIR` at: an ImageFolder tree, split folders or a manifest.

Images stay undecoded bytes on the device (the extractor decodes them); this module only finds them, assigns
labels and a deterministic train/val/test split, and fingerprints the whole set for the registry's lineage.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from services.common.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)
Layout = Literal["folders", "split_folders", "manifest", "memory", "lists"]  # lists: mist reproduce's split files
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp"})
_HASH_CHUNK_BYTES = 1 << 20  # fingerprinting streams files in 1 MiB reads: memory stays flat for any image size
_FINGERPRINT_VERSION = b"mist-dataset-fingerprint-v1"  # bump when the hashed fields change
MAX_LISTED_UNUSABLE = 20  # unusable images named one by one in a message; the rest are counted


@dataclass(frozen=True)
class SkippedImage:
    """An image that cannot be used: unreadable or empty here, or refused by the extractor."""

    name: str  # as DatasetItem.name: the path relative to the dataset root (or the manifest's folder)
    reason: str  # machine-readable: empty_file, unreadable_file, missing_file, or the extractor's reason
    message: str  # for people: "the file is empty", "not a JPEG, PNG or WebP image (...)"

    def __str__(self) -> str:
        return f"{self.name}: {self.message} ({self.reason})"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason, "message": self.message}


def unusable_images_message(images: Sequence[SkippedImage], lead: str, advice: str = "") -> str:
    """One line naming every unusable image, sorted by name (the first MAX_LISTED_UNUSABLE, then how many more):
    '{lead}: a/x.png: the file is empty (empty_file); ...; and 3 more; {advice}', where "{n}" in `lead` is the
    exact count."""
    ordered = sorted(images, key=lambda image: image.name)
    shown = "; ".join(str(image) for image in ordered[:MAX_LISTED_UNUSABLE])
    more = f"; and {len(ordered) - MAX_LISTED_UNUSABLE} more" if len(ordered) > MAX_LISTED_UNUSABLE else ""
    return f"{lead.replace('{n}', str(len(ordered)))}: {shown}{more}{f'; {advice}' if advice else ''}"


class TooFewUsableImagesError(InvalidArgumentError):
    """What is left once the unusable images are skipped cannot be trained on (a class without train images,
    no images at all, a class too small to split); `skipped` names the images left out."""

    def __init__(self, message: str, skipped: Sequence[SkippedImage]) -> None:
        super().__init__(message)
        self.skipped = tuple(skipped)


@dataclass(frozen=True)
class DatasetItem:
    """One labelled image: where its bytes are, its label index and its split."""

    name: str  # POSIX path relative to the dataset root (or the client's item id): stable across machines
    label: int  # index into Dataset.class_names
    split: Split  # which split the image belongs to
    path: Path | None = None  # the file; None when the bytes were handed over in memory
    data: bytes | None = field(default=None, repr=False)  # the image bytes when there is no file

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise InvalidArgumentError(f"dataset item {self.name!r} needs exactly one of a path or in-memory bytes")

    def read_bytes(self) -> bytes:
        """The undecoded image bytes; an unreadable file is an InvalidArgumentError naming it."""
        if self.data is not None:
            return self.data
        try:
            return Path(self.path).read_bytes()  # type: ignore[arg-type]  # __post_init__: path is set
        except OSError as error:
            raise InvalidArgumentError(f"cannot read image {self.path}: {error.strerror or error}") from error


@dataclass(frozen=True)
class Dataset:
    """Labelled images with their splits. Item order is stable: sorted by name (folders) or manifest order."""

    root: Path  # the directory names are relative to (the manifest's directory for a manifest)
    class_names: tuple[str, ...]  # label index -> class name
    items: tuple[DatasetItem, ...]  # every image, all splits
    layout: Layout  # how the images were found
    warnings: tuple[str, ...] = ()  # problems that do not stop training (e.g. a class absent from val)
    skipped: tuple[SkippedImage, ...] = ()  # unusable images left out (load_dataset(skip_unreadable=True), without)

    def __len__(self) -> int:
        return len(self.items)

    def indices(self, split: Split) -> list[int]:
        """Positions in `items` of the images in `split`, ascending."""
        _check_split(split, "split")
        return [i for i, item in enumerate(self.items) if item.split == split]

    def labels(self) -> list[int]:
        return [item.label for item in self.items]

    def counts(self) -> dict[Split, list[int]]:
        """Images per class (in label order) for each split."""
        counts: dict[Split, list[int]] = {split: [0] * len(self.class_names) for split in SPLITS}
        for item in self.items:
            counts[item.split][item.label] += 1
        return counts

    def fingerprint(self) -> str:
        """sha256 hex over the class names in label order and every item's name, class, split and content.

        Items are hashed sorted by name, so the same images, labels and splits give the same fingerprint
        whether found as folders or listed in a manifest in any order; the label order is part of it since
        weights depend on it. Files are streamed in 1 MiB chunks: memory stays flat for any dataset.
        """
        digest = hashlib.sha256(_FINGERPRINT_VERSION)
        digest.update(len(self.class_names).to_bytes(8, "little"))  # where the class list ends
        for name in self.class_names:
            digest.update(_framed(name))
        for item in sorted(self.items, key=lambda item: item.name):
            digest.update(_framed(item.name))
            digest.update(_framed(self.class_names[item.label]))
            digest.update(_framed(item.split))
            digest.update(_content_sha256(item))
        return digest.hexdigest()

    def without(self, unusable: Mapping[int, SkippedImage]) -> Dataset:
        """This dataset less the images at the given positions (the extractor refused them), each keeping its
        split; they join `skipped`. A class left without train images is a TooFewUsableImagesError."""
        if not unusable:
            return self
        items = tuple(item for i, item in enumerate(self.items) if i not in unusable)
        skipped = tuple(sorted((*self.skipped, *unusable.values()), key=lambda image: image.name))
        reduced = dataclasses.replace(self, items=items, skipped=skipped, warnings=())
        try:
            if not items:
                raise InvalidArgumentError("no usable images are left")
            warnings = _check_coverage(reduced)
        except InvalidArgumentError as error:
            raise TooFewUsableImagesError(_after_skipping(str(error), skipped), skipped) from error
        return dataclasses.replace(reduced, warnings=tuple(warnings))


def load_dataset(
    path: str | os.PathLike[str],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    skip_unreadable: bool = False,
) -> Dataset:
    """Find the labelled images under `path` and split them.

    `path` is one of: an ImageFolder tree `DIR/<class>/**/*.{png,jpg,jpeg,webp}`; a tree with split folders
    `DIR/{train,val,test}/<class>/...` (val and test optional); a CSV manifest `path,label[,split]` whose
    paths are relative to the manifest's directory. Images without a split get one deterministically
    (stratified per class, seeded; see assign_splits); a given split without any val (or test) images gets
    them carved out of train with val_fraction (test_fraction). Class names default to the sorted folder
    names or manifest labels; when given, they fix the label order and every image must use one of them.

    Unreadable, empty and missing image files are all found first: by default they fail the load with one
    InvalidArgumentError naming every one; with `skip_unreadable` they are left out before splitting and listed
    in Dataset.skipped (a TooFewUsableImagesError when what is left cannot be trained on).
    """
    _check_split_settings(val_fraction, test_fraction, seed)
    if class_names is not None:
        class_names = _checked_class_names(class_names)
    root = Path(path).expanduser()
    if not root.exists():
        raise InvalidArgumentError(f"dataset path {root} does not exist")
    if root.is_file():
        records, names = _read_manifest(root, class_names)
        base, layout = root.parent, "manifest"
    elif root.is_dir():
        records, names, layout = _scan_tree(root, class_names)
        base = root
    else:
        raise InvalidArgumentError(f"dataset path {root} is neither a directory nor a manifest file")
    skipped = [SkippedImage(r.name, *r.problem) for r in records if r.problem is not None]
    if not skipped:
        return _build(base, records, names, layout, val_fraction, test_fraction, seed)  # type: ignore[arg-type]
    if not skip_unreadable:
        raise InvalidArgumentError(
            unusable_images_message(
                skipped,
                f"cannot read {{n}} image(s) under {root}",
                "fix or remove them, or skip them (mist tune --skip-unreadable)",
            )
        )
    usable = [r for r in records if r.problem is None]
    try:
        dataset = _build(base, usable, names, layout, val_fraction, test_fraction, seed)  # type: ignore[arg-type]
    except InvalidArgumentError as error:
        raise TooFewUsableImagesError(_after_skipping(str(error), skipped), skipped) from error
    return dataclasses.replace(dataset, skipped=tuple(sorted(skipped, key=lambda image: image.name)))


def dataset_from_memory(
    records: Iterable[tuple[str, bytes, str, Split | None]],
    *,
    class_names: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """A Dataset of images handed over as bytes (the tuner worker's LabelledImage stream).

    Each record is (item id, image bytes, class name, split or None); the same checks and split rules as
    load_dataset apply, with item ids in place of file names.
    """
    _check_split_settings(val_fraction, test_fraction, seed)
    rows: list[_Record] = []
    seen: dict[str, int] = {}
    for position, (item_id, data, label, split) in enumerate(records):
        where = f"item {position} ({item_id!r})"
        if item_id in seen:
            raise InvalidArgumentError(f"{where} repeats the id of item {seen[item_id]}")
        seen[item_id] = position
        if not data:
            raise InvalidArgumentError(f"{where} has no image bytes")
        if split is not None:
            _check_split(split, where)
        rows.append(_Record(item_id, label, split, data=data))
    names = _checked_class_names(class_names) if class_names is not None else _names_from_labels(rows)
    return _build(Path("."), rows, names, "memory", val_fraction, test_fraction, seed)


def assign_splits(
    names: Sequence[str],
    labels: Sequence[int],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> list[Split]:
    """Deterministic stratified split: per class, val gets round(n * val_fraction) images (at least one when
    the fraction is positive), test likewise, train the rest (at least one).

    Within a class the images are ordered by sha256(seed, name), not by a random generator: the split is the
    same on every machine and numpy version, and adding an image to a class moves at most one other image.
    `class_names` only names the classes in error messages.
    """
    if len(names) != len(labels):
        raise InvalidArgumentError(f"got {len(names)} names but {len(labels)} labels")
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    splits: list[Split] = ["train"] * len(names)
    for label, members in sorted(by_class.items()):
        n_val = _share(len(members), val_fraction)
        n_test = _share(len(members), test_fraction)
        if len(members) - n_val - n_test < 1:
            name = repr(class_names[label]) if class_names is not None else label
            raise InvalidArgumentError(
                f"class {name} has {len(members)} image(s): too few to keep {n_val} for val, {n_test} for test "
                "and at least one for train; add images or lower the fractions"
            )
        ordered = sorted(members, key=lambda i: hashlib.sha256(f"{seed}\0{names[i]}".encode()).digest())
        for rank, position in enumerate(ordered):
            splits[position] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return splits


# ------------------------------------------------------------------------------------------ finding images


@dataclass
class _Record:
    """An image found on disk or received, before labels are indexed and splits assigned."""

    name: str
    label: str
    split: Split | None
    path: Path | None = None
    data: bytes | None = None
    problem: tuple[str, str] | None = None  # (reason, message) when the file cannot be used


def _scan_tree(root: Path, class_names: tuple[str, ...] | None) -> tuple[list[_Record], tuple[str, ...], Layout]:
    folders = _visible_subdirectories(root)
    if not folders:
        raise InvalidArgumentError(
            f"{root} has no class folders: expected {root}/<class>/<image> or {root}/train/<class>/<image>"
        )
    split_folders = [f for f in folders if f.name in SPLITS]
    if not split_folders:
        records = _scan_classes(root, root, None)
        names = class_names or tuple(sorted({r.label for r in records}))
        _check_folders_are_classes(root, {r.label for r in records}, names)
        return records, names, "folders"
    if len(split_folders) != len(folders) or "train" not in {f.name for f in split_folders}:
        others = sorted(f.name for f in folders if f.name not in SPLITS)
        raise InvalidArgumentError(
            f"{root} mixes split folders ({', '.join(f.name for f in split_folders)}) with other folders "
            f"({', '.join(others) or 'no train'}): use either {root}/<class>/... or {root}/train/<class>/... "
            "(val and test optional)"
        )
    records = []
    for folder in split_folders:
        records.extend(_scan_classes(root, folder, folder.name))  # type: ignore[arg-type]
    names = class_names or tuple(sorted({r.label for r in records}))
    _check_folders_are_classes(root, {r.label for r in records}, names)
    return records, names, "split_folders"


def _scan_classes(root: Path, parent: Path, split: Split | None) -> list[_Record]:
    records: list[_Record] = []
    for folder in _visible_subdirectories(parent):
        images = _images_under(folder)
        if not images:
            raise InvalidArgumentError(
                f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): add some or remove it"
            )
        for image in images:
            records.append(
                _Record(image.relative_to(root).as_posix(), folder.name, split, path=image, problem=_problem(image))
            )
    return records


def _visible_subdirectories(directory: Path) -> list[Path]:
    try:
        entries = sorted(directory.iterdir())
    except OSError as error:
        raise InvalidArgumentError(f"cannot list {directory}: {error.strerror or error}") from error
    folders = []
    for entry in entries:
        if entry.name.startswith("."):
            logger.debug("ignoring hidden entry %s", entry)
        elif entry.is_dir():
            folders.append(entry)
        else:
            logger.debug("ignoring %s: not a folder", entry)
    return folders


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere below `folder` (sub-folders too), sorted; hidden entries and other files skipped."""
    images = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        hidden = [d for d in subdirectories if d.startswith(".")]
        for name in hidden:
            logger.debug("ignoring hidden folder %s", Path(directory, name))
            subdirectories.remove(name)
        for name in files:
            candidate = Path(directory, name)
            if name.startswith(".") or candidate.suffix.lower() not in IMAGE_EXTENSIONS:
                logger.debug("ignoring %s: hidden or not an image", candidate)
                continue
            images.append(candidate)
    return sorted(images)


def _check_folders_are_classes(root: Path, found: set[str], names: tuple[str, ...]) -> None:
    unknown = sorted(found - set(names))
    if unknown:
        raise InvalidArgumentError(f"{root} has folders {unknown} that are not among the task's classes {list(names)}")


def _read_manifest(manifest: Path, class_names: tuple[str, ...] | None) -> tuple[list[_Record], tuple[str, ...]]:
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets write a BOM
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InvalidArgumentError(f"cannot read manifest {manifest}: {error}") from error
    if not rows:
        raise InvalidArgumentError(f"manifest {manifest} is empty: expected a header 'path,label[,split]'")
    header = [cell.strip().lower() for cell in rows[0]]
    if header[:2] != ["path", "label"] or header[2:] not in ([], ["split"]):
        raise InvalidArgumentError(
            f"manifest {manifest} header is {rows[0]}: expected 'path,label' or 'path,label,split'"
        )
    records: list[_Record] = []
    first_row: dict[Path, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines, often at the end
        records.append(_manifest_record(manifest, number, row, len(header), first_row))
    if not records:
        raise InvalidArgumentError(f"manifest {manifest} lists no images")
    names = class_names or _names_from_labels(records)
    for record in records:
        if record.label not in names:
            raise InvalidArgumentError(
                f"manifest {manifest}: image {record.name} has label {record.label!r}, not one of the classes {list(names)}"
            )
    return records, names


def _manifest_record(manifest: Path, number: int, row: list[str], columns: int, first_row: dict[Path, int]) -> _Record:
    where = f"manifest {manifest} line {number}"
    if len(row) != columns:
        raise InvalidArgumentError(f"{where}: expected {columns} columns, got {len(row)}: {row}")
    name, label = row[0].strip(), row[1].strip()
    split = row[2].strip().lower() if columns == 3 and row[2].strip() else None
    if not name or not label:
        raise InvalidArgumentError(f"{where}: path and label must not be empty")
    if split is not None:
        _check_split(split, where)
    image = (manifest.parent / name).resolve()
    if image in first_row:
        raise InvalidArgumentError(f"{where}: {name} is listed already on line {first_row[image]}")
    first_row[image] = number
    problem = _problem(image)
    if problem is not None and problem[0] == "missing_file":
        problem = ("missing_file", f"manifest line {number}: image {name} does not exist (resolved to {image})")
    return _Record(name, label, split, path=image, problem=problem)  # type: ignore[arg-type]


def _problem(path: Path) -> tuple[str, str] | None:
    """Cheap checks now (a regular, non-empty, readable file) so a bad image is named before any upload:
    None, or (reason, message)."""
    try:
        stat = path.stat()
    except FileNotFoundError:  # broken symlinks land here too
        return "missing_file", "No such file or directory"
    except OSError as error:
        return "unreadable_file", str(error.strerror or error)
    if not path.is_file():
        return "unreadable_file", "not a regular file"
    if stat.st_size == 0:
        return "empty_file", "the file is empty"
    if not os.access(path, os.R_OK):
        return "unreadable_file", "permission denied"
    return None


def _after_skipping(error: str, skipped: Sequence[SkippedImage]) -> str:
    return unusable_images_message(skipped, f"{error.rstrip('.')} once the {{n}} unusable image(s) are skipped")


# ---------------------------------------------------------------------------------- labels, splits, checks


def _build(
    root: Path,
    records: list[_Record],
    class_names: tuple[str, ...],
    layout: Layout,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> Dataset:
    if not records:
        raise InvalidArgumentError("no images received" if layout == "memory" else f"no images found under {root}")
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({r.label for r in records} - set(index))
    if unknown:
        raise InvalidArgumentError(f"labels {unknown} are not among the classes {list(class_names)}")
    labels = [index[r.label] for r in records]
    splits = _complete_splits(records, labels, class_names, val_fraction, test_fraction, seed)
    items = tuple(
        DatasetItem(name=r.name, label=label, split=split, path=r.path, data=r.data)
        for r, label, split in zip(records, labels, splits, strict=True)
    )
    if layout != "manifest" and layout != "memory":
        items = tuple(sorted(items, key=lambda item: item.name))
    dataset = Dataset(root=root, class_names=class_names, items=items, layout=layout)
    warnings = _check_coverage(dataset)
    for warning in warnings:
        logger.warning("%s", warning)
    return dataclasses.replace(dataset, warnings=tuple(warnings))


def _complete_splits(
    records: list[_Record],
    labels: list[int],
    class_names: tuple[str, ...],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[Split]:
    """Given splits are kept; unsplit images are split; a missing val (test) split is carved out of train."""
    splits: list[Split | None] = [r.split for r in records]
    unsplit = [i for i, split in enumerate(splits) if split is None]
    if unsplit:
        assigned = assign_splits(
            [records[i].name for i in unsplit],
            [labels[i] for i in unsplit],
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            class_names=class_names,
        )
        for position, split in zip(unsplit, assigned, strict=True):
            splits[position] = split
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and split not in splits:
            train = [i for i, s in enumerate(splits) if s == "train"]
            carved = assign_splits(
                [records[i].name for i in train],
                [labels[i] for i in train],
                val_fraction=fraction,
                test_fraction=0.0,
                seed=seed,
                class_names=class_names,
            )
            for position, choice in zip(train, carved, strict=True):
                splits[position] = split if choice == "val" else "train"  # type: ignore[assignment]
    return splits  # type: ignore[return-value]


def _check_coverage(dataset: Dataset) -> list[str]:
    """Errors for classes the network could never learn; warnings for classes a score will not cover."""
    counts = dataset.counts()
    names = dataset.class_names
    if len(names) < 2:
        raise InvalidArgumentError(f"found only one class ({names[0]!r}): classification needs at least two")
    untrained = [names[c] for c, n in enumerate(counts["train"]) if n == 0]
    if untrained:
        raise InvalidArgumentError(f"classes {untrained} have no training images")
    warnings = []
    for split in ("val", "test"):
        if not any(counts[split]):
            continue
        absent = [names[c] for c, n in enumerate(counts[split]) if n == 0]
        if absent:
            warnings.append(f"the {split} split has no images of classes {absent}: its accuracy will not cover them")
    return warnings


def _names_from_labels(records: Sequence[_Record]) -> tuple[str, ...]:
    return tuple(sorted(Counter(r.label for r in records)))


def _checked_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(class_names, str):
        raise InvalidArgumentError(f"class_names must be a sequence of names, got the string {class_names!r}")
    names = tuple(class_names)
    if any(not isinstance(name, str) or not name.strip() for name in names):
        raise InvalidArgumentError(f"class names must be non-empty strings, got {list(names)}")
    repeated = sorted(name for name, n in Counter(names).items() if n > 1)
    if repeated:
        raise InvalidArgumentError(f"class names repeat: {repeated}")
    return names


def _check_split(split: object, where: str) -> None:
    if split not in SPLITS:
        raise InvalidArgumentError(f"{where}: split must be one of {', '.join(SPLITS)}, got {split!r}")


def _check_split_settings(val_fraction: float, test_fraction: float, seed: int) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise InvalidArgumentError(f"{name} must be a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise InvalidArgumentError(
            f"val_fraction + test_fraction must leave images to train on, got {val_fraction} + {test_fraction}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative integer, got {seed!r}")


def _share(count: int, fraction: float) -> int:
    """round(count * fraction) half up, at least one image when the fraction is positive."""
    if fraction <= 0:
        return 0
    return max(1, math.floor(count * fraction + 0.5))


def _framed(text: str) -> bytes:
    """Length-prefixed UTF-8, so that ("ab", "c") and ("a", "bc") hash differently."""
    data = text.encode("utf-8")
    return len(data).to_bytes(8, "little") + data


def _content_sha256(item: DatasetItem) -> bytes:
    if item.data is not None:
        return hashlib.sha256(item.data).digest()
    digest = hashlib.sha256()
    try:
        with Path(item.path).open("rb") as handle:  # type: ignore[arg-type]
            while chunk := handle.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as error:
        raise InvalidArgumentError(f"cannot read image {item.path}: {error.strerror or error}") from error
    return digest.digest()
