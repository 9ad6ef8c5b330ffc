"""The dataset layouts `mist reproduce` reads, all checked before any image is sent to the extractor.

VTAB-1k, as the public PEFT code bases distribute it (NOAH's `vtab-1k` folder, also read by VPT-style loaders):

    ROOT/<task>/train800.txt  val200.txt  train800val200.txt  test.txt  images/...

Each list has one `relative/path label` per line; the path is relative to the task's folder and the label is the
class index. Task folders carry NOAH's names (`cifar`, `oxford_iiit_pet`, `smallnorb_ele`, ...); the names other
code bases use (`cifar_100`, `pets`, `flowers102`, ...) are accepted too.

Few-shot and domain generalisation datasets are one folder each, in one of two layouts:

    DIR/train.txt  DIR/test.txt  [DIR/val.txt]  [DIR/classes.txt]     lists as above; classes.txt: a name per line
    DIR/train/<class>/...  DIR/test/<class>/...  [DIR/val/<class>/...]   ImageFolder split folders

Every problem of a layout (a missing list, a malformed line, a path that does not exist, a label outside the class
set) is collected and raised together as one LayoutError naming the file and line of each.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from services.common.errors import InvalidArgumentError
from services.tuner.data import Dataset, DatasetItem, Split, load_dataset

Group = Literal["natural", "specialized", "structured"]
GROUPS: tuple[Group, ...] = ("natural", "specialized", "structured")
VTAB_LISTS = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
LIST_SPLITS: dict[str, Split] = {"train.txt": "train", "val.txt": "val", "test.txt": "test"}
CLASSES_FILE = "classes.txt"
MAX_LISTED_PROBLEMS = 20  # problems named one by one in a LayoutError; the rest are counted


@dataclass(frozen=True)
class VtabTask:
    """One of the 19 VTAB-1k tasks: its folder name, the column title of Table 1, its group and class count."""

    name: str  # NOAH's folder name
    title: str  # as the paper's table heads it
    group: Group
    num_classes: int
    aliases: tuple[str, ...] = ()  # folder and task names other code bases use


VTAB_TASKS: tuple[VtabTask, ...] = (
    VtabTask("cifar", "CIFAR-100", "natural", 100, ("cifar100", "cifar_100")),
    VtabTask("caltech101", "Caltech101", "natural", 102, ("caltech_101", "caltech_102")),
    VtabTask("dtd", "DTD", "natural", 47, ("dtd_47",)),
    VtabTask("oxford_flowers102", "Flowers102", "natural", 102, ("flowers102", "flowers", "oxford_flowers_102")),
    VtabTask("oxford_iiit_pet", "Pets", "natural", 37, ("pets", "oxford_iiit_pets", "oxford_iiit_pets_37")),
    VtabTask("svhn", "SVHN", "natural", 10, ("svhn_cropped",)),
    VtabTask("sun397", "Sun397", "natural", 397, ()),
    VtabTask("patch_camelyon", "Camelyon", "specialized", 2, ("camelyon", "pcam")),
    VtabTask("eurosat", "EuroSAT", "specialized", 10, ()),
    VtabTask("resisc45", "Resisc45", "specialized", 45, ("resisc",)),
    VtabTask(
        "diabetic_retinopathy", "Retinopathy", "specialized", 5, ("retinopathy", "diabetic_retinopathy_detection")
    ),
    VtabTask("clevr_count", "Clevr-Count", "structured", 8, ("clevr_count_all",)),
    VtabTask("clevr_dist", "Clevr-Dist", "structured", 6, ("clevr_distance", "clevr_closest_object_distance")),
    VtabTask("dmlab", "DMLab", "structured", 6, ()),
    VtabTask("kitti", "KITTI-Dist", "structured", 4, ("kitti_dist", "kitti_closest_vehicle_distance")),
    VtabTask("dsprites_loc", "dSpr-Loc", "structured", 16, ("dsprites_location", "dsprites_label_x_position")),
    VtabTask("dsprites_ori", "dSpr-Ori", "structured", 16, ("dsprites_orientation", "dsprites_label_orientation")),
    VtabTask("smallnorb_azi", "sNORB-Azim", "structured", 18, ("smallnorb_azimuth", "smallnorb_label_azimuth")),
    VtabTask("smallnorb_ele", "sNORB-Elev", "structured", 9, ("smallnorb_elevation", "smallnorb_label_elevation")),
)


class LayoutError(InvalidArgumentError):
    """Problems of a dataset layout, each naming its file (and line); nothing was sent to any server."""

    def __init__(self, problems: Sequence[str], where: str) -> None:
        shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        super().__init__(f"{len(problems)} problem(s) in {where}: {shown}{more}; nothing was sent to the extractor")
        self.problems = tuple(problems)


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def vtab_task(name: str) -> VtabTask:
    """The task called `name` (its folder name or an alias, any case, '-' for '_'); InvalidArgumentError else."""
    wanted = _key(name)
    for task in VTAB_TASKS:
        if wanted == task.name or wanted in task.aliases:
            return task
    raise InvalidArgumentError(
        f"{name!r} is not a VTAB-1k task; the tasks are {', '.join(task.name for task in VTAB_TASKS)}"
    )


def resolve_vtab(root: str | Path, names: Sequence[str] = ()) -> list[tuple[VtabTask, Path]]:
    """The tasks to run (all 19 in the paper's order when `names` is empty) and their folders under `root`.

    A task's folder is its NOAH name, else one of its aliases. Every task asked for must have one."""
    base = _existing_dir(root, "VTAB-1k root")
    tasks = list(dict.fromkeys(vtab_task(name) for name in names)) if names else list(VTAB_TASKS)
    found, missing = [], []
    for task in tasks:
        folder = next((base / name for name in (task.name, *task.aliases) if (base / name).is_dir()), None)
        if folder is None:
            missing.append(task.name)
        else:
            found.append((task, folder))
    if missing:
        advice = "" if names else "; run a subset with --tasks"
        raise InvalidArgumentError(f"{base} has no folder for task(s) {', '.join(missing)}{advice}")
    return found


@dataclass(frozen=True)
class ListEntry:
    path: str  # as written, relative to the list's folder
    label: int
    line: int  # 1-based


def read_list(path: Path, num_classes: int | None, problems: list[str]) -> list[ListEntry]:
    """The entries of one `relative/path label` list; its problems are appended to `problems` (file:line: ...).

    Blank lines are skipped; a path may hold spaces (the label is the last field). With `num_classes`, a label
    outside [0, num_classes) is a problem; every path must name an existing file under the list's folder."""
    if not path.is_file():
        problems.append(f"{path}: the list is missing")
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"{path}: cannot read it ({getattr(error, 'strerror', None) or error})")
        return []
    entries: list[ListEntry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path}:{number}"
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2:
            problems.append(f"{where}: expected 'relative/path label', got {line[:80]!r}")
            continue
        name, label_text = fields
        try:
            label = int(label_text)
        except ValueError:
            problems.append(f"{where}: the label {label_text!r} is not an integer")
            continue
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
            problems.append(f"{where}: label {label} is outside the class set ({bound})")
            continue
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{where}: {name!r} must be a path relative to {path.parent}")
            continue
        if not (path.parent / name).is_file():
            problems.append(f"{where}: {name} does not exist under {path.parent}")
            continue
        entries.append(ListEntry(name, label, number))
    if not entries and not any(p.startswith(f"{path}:") for p in problems):
        problems.append(f"{path}: the list names no image")
    return entries


def class_names_for(count: int) -> tuple[str, ...]:
    """Names of numbered classes: '0'..'N-1', zero-padded so that they sort like the numbers."""
    width = len(str(count - 1))
    return tuple(str(i).zfill(width) for i in range(count))


def load_vtab(task: VtabTask, folder: Path) -> Dataset:
    """The task's images: train800 as train, val200 as val, test as test (train800val200 must be their union)."""
    problems: list[str] = []
    lists = {name: read_list(folder / name, task.num_classes, problems) for name in VTAB_LISTS}
    if not problems:
        union = {(e.path, e.label) for e in (*lists["train800.txt"], *lists["val200.txt"])}
        merged = lists["train800val200.txt"]
        for entry in merged:
            if (entry.path, entry.label) not in union:
                problems.append(f"{folder / 'train800val200.txt'}:{entry.line}: {entry.path} {entry.label} is in "
                                "neither train800.txt nor val200.txt")  # fmt: skip
        if not problems and len({(e.path, e.label) for e in merged}) != len(union):
            problems.append(f"{folder / 'train800val200.txt'}: lists {len(merged)} images, train800.txt and "
                            f"val200.txt together {len(union)}")  # fmt: skip
    if problems:
        raise LayoutError(problems, f"VTAB-1k task {task.name} ({folder})")
    splits: tuple[tuple[str, Split], ...] = (("train800.txt", "train"), ("val200.txt", "val"), ("test.txt", "test"))
    items = tuple(
        DatasetItem(entry.path, entry.label, split, folder / entry.path)
        for name, split in splits
        for entry in lists[name]
    )
    return Dataset(folder, class_names_for(task.num_classes), items, "lists")


# ---------------------------------------------------------------------------------------------- few-shot and DG


def is_dataset_dir(folder: Path) -> bool:
    """A folder in one of the two layouts: a train list, or a train/ folder."""
    return (folder / "train.txt").is_file() or (folder / "train").is_dir()


def resolve_datasets(root: str | Path, names: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """(name, folder) of each dataset: `root` itself when it is one, else its dataset subfolders (or `names`)."""
    base = _existing_dir(root, "dataset root")
    if is_dataset_dir(base) and not names:
        return [(base.name, base)]
    if names:
        missing = [name for name in names if not is_dataset_dir(base / name)]
        if missing:
            raise InvalidArgumentError(f"{base} has no dataset folder (train.txt or train/) for {', '.join(missing)}")
        return [(name, base / name) for name in dict.fromkeys(names)]
    found = sorted(
        (p.name, p) for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and is_dataset_dir(p)
    )
    if not found:
        raise InvalidArgumentError(
            f"{base} is not a dataset (train.txt + test.txt, or train/ + test/ class folders) and holds none"
        )
    return found


def load_split_dataset(folder: Path, *, need: Sequence[Split] = ("train", "test")) -> Dataset:
    """A dataset folder in either layout with its given splits (nothing carved out); each of `need` must exist."""
    if (folder / "train.txt").is_file():
        dataset = _load_lists(folder, where=f"dataset {folder.name} ({folder})")
    else:
        dataset = load_dataset(folder, val_fraction=0.0, test_fraction=0.0)
        if dataset.layout != "split_folders":
            raise LayoutError([f"{folder}: expected train/ and test/ split folders of class folders"], str(folder))
    absent = [split for split in need if not dataset.indices(split)]
    if absent:
        files = ", ".join(f"{split}.txt or {split}/" for split in absent)
        raise LayoutError([f"{folder}: no {files}"], f"dataset {folder.name}")
    return dataset


def _load_lists(
    folder: Path,
    *,
    where: str,
    required: Sequence[str] = ("train.txt", "test.txt"),
    default_classes: Sequence[str] | None = None,
) -> Dataset:
    """A folder of split lists: `required` ones must exist, the others are read when present. Labels index
    classes.txt, else `default_classes`, else 0..the highest label seen."""
    problems: list[str] = []
    names = tuple(default_classes) if default_classes is not None else None
    if (folder / CLASSES_FILE).is_file():
        names = _read_class_names(folder / CLASSES_FILE, problems)
    lists = {
        split: read_list(folder / name, len(names) if names else None, problems)
        for name, split in LIST_SPLITS.items()
        if name in required or (folder / name).exists()
    }
    if problems:
        raise LayoutError(problems, where)
    if names is None:
        names = class_names_for(1 + max(entry.label for entries in lists.values() for entry in entries))
    items = tuple(
        DatasetItem(entry.path, entry.label, split, folder / entry.path)
        for split, entries in lists.items()
        for entry in entries
    )
    return Dataset(folder, names, items, "lists")


def _read_class_names(path: Path, problems: list[str]) -> tuple[str, ...]:
    names: list[str] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        name = raw.strip()
        if not name:
            continue
        if name in names:
            problems.append(f"{path}:{number}: class {name!r} repeats line {names.index(name) + 1}")
        names.append(name)
    if len(names) < 2:
        problems.append(f"{path}: needs at least two class names, one per line")
    return tuple(names)


def sample_shots(dataset: Dataset, shots: int, seed: int) -> list[int]:
    """`shots` train images per class, class-balanced and deterministic per seed; nested: the images of fewer
    shots are among those of more (each class's train images are permuted once per seed, the first `shots` kept).

    A class with fewer train images than `shots` is an InvalidArgumentError naming it."""
    by_class: dict[int, list[int]] = {}
    for index in dataset.indices("train"):
        by_class.setdefault(dataset.items[index].label, []).append(index)
    short = [
        f"{dataset.class_names[label]} ({len(by_class.get(label, []))})"
        for label in range(len(dataset.class_names))
        if len(by_class.get(label, [])) < shots
    ]
    if short:
        raise InvalidArgumentError(
            f"{dataset.root}: {shots}-shot sampling needs {shots} train images per class; too few in {', '.join(short)}"
        )
    chosen: list[int] = []
    for label in range(len(dataset.class_names)):
        pool = sorted(by_class[label], key=lambda i: dataset.items[i].name)  # independent of list order
        rng = np.random.default_rng([seed, zlib.crc32(dataset.class_names[label].encode())])
        chosen.extend(pool[i] for i in rng.permutation(len(pool))[:shots])
    return sorted(chosen)


def restricted_to(dataset: Dataset, source_classes: Sequence[str], where: str) -> Dataset:
    """A DG target with labels in the source's class order; a class the source lacks is a LayoutError."""
    index = {name: i for i, name in enumerate(source_classes)}
    unknown = [name for name in dataset.class_names if name not in index]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:10]) + (
            f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        )
        raise LayoutError([f"{where}: classes {shown} are not among the source's {len(source_classes)} classes"], where)
    items = tuple(dataclasses.replace(item, label=index[dataset.class_names[item.label]]) for item in dataset.items)
    return Dataset(dataset.root, tuple(source_classes), items, dataset.layout)


def scored_split(dataset: Dataset) -> list[int]:
    """What a DG target is scored on: its test split when it has one, else every image."""
    return dataset.indices("test") or list(range(len(dataset)))


def load_target(folder: Path, source_classes: Sequence[str]) -> tuple[Dataset, list[int]]:
    """A DG target folder: lists (labels in the source's class set; classes.txt names them) or an ImageFolder tree
    (class folders named like the source's classes; split folders optional, a lone test/ too). Returns it and the
    indices scored."""
    where = f"target {folder}"
    if not folder.is_dir():
        raise InvalidArgumentError(f"{where} is not a folder")
    if (folder / "test.txt").is_file() or (folder / "train.txt").is_file():
        dataset = _load_lists(folder, where=where, required=(), default_classes=source_classes)
    else:
        only_test = not (folder / "train").is_dir() and (folder / "test").is_dir()
        try:
            dataset = load_dataset(folder / "test" if only_test else folder, val_fraction=0.0, test_fraction=0.0)
        except InvalidArgumentError as error:
            raise InvalidArgumentError(f"{where}: {error}") from error
    dataset = restricted_to(dataset, source_classes, where)
    return dataset, scored_split(dataset)


def _existing_dir(root: str | Path, what: str) -> Path:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise InvalidArgumentError(f"{what} {base} is not a folder")
    return base


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN mean for none."""
    if not values:
        return math.nan, math.nan
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0
