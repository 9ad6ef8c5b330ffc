"""What the three protocols of `mist reproduce` share: the run folder that makes a killed run resumable, features
fetched once and kept there, progress with an ETA, and train / score / push steps built on the tune pipeline.

    run = RunFolder("reproduce-vtab")                          # results/<unit>.json, features/<key>.feat
    store, stats = fetch_once(session, run, "cifar", dataset, ks=(3, 6, 9, 12), codec="i8o-zstd")

A unit (a VTAB task, one few-shot run, the DG source or one target) is finished when its result file exists with
the run's signature (backbone and weights, codec, recipe, edge network): a resumed run skips it; a result made with
other settings is done again. Results and feature files are written to a temporary name and renamed, so a kill
leaves either the whole file or none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.clients.extractor import BackboneInfo, ExtractorClient
from services.common.clients.registry import RegistryClient
from services.common.errors import InvalidArgumentError
from services.common.files import atomic_file, write_atomically
from services.common.pb import feature_pb2
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.registry.records import Version
from services.tuner.data import Dataset
from services.tuner.edge_network import EdgeNetwork
from services.tuner.extraction import extract_features
from services.tuner.feature_store import FeatureStore
from services.tuner.options import TrainConfig, TrainingFlags
from services.tuner.progress import format_epoch
from services.tuner.reports import ExtractionStats, ReporterObserver, TuneObserver
from services.tuner.training import EpochStats, KSelection, select_k, train_edge_network
from services.tuner.tune import check_task_fits, ensure_task, find_task, push_weights, resolve_edge_config

SCHEMA = 1  # of result and feature files; another value is done again
_FEATURES_MAGIC = b"MISTFEAT1\n"
_RECORD = struct.Struct("<IHI")  # image index, k, message length
_MiB = float(1 << 20)


@dataclass(frozen=True)
class Session:
    """The servers of one `mist reproduce` run and what the extractor serves."""

    extractor: ExtractorClient
    registry: RegistryClient
    info: BackboneInfo
    tuner: str  # identity recorded in each version's lineage


class RunFolder:
    """results/<unit>.json per finished unit, features/<key>.feat per fetched dataset, and the tables."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        for sub in ("results", "features"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def _result_path(self, unit: str) -> Path:
        return self.path / "results" / f"{_safe(unit)}.json"

    def result(self, unit: str, signature: Mapping[str, Any]) -> dict[str, Any] | None:
        """The unit's saved result when it was made with `signature`, else None (not done, or done otherwise)."""
        try:
            saved = json.loads(self._result_path(unit).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if saved.get("schema") != SCHEMA or saved.get("signature") != json.loads(json.dumps(signature)):
            return None
        return saved.get("result")

    def save_result(self, unit: str, signature: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        write_atomically(
            self._result_path(unit),
            json.dumps({"schema": SCHEMA, "unit": unit, "signature": signature, "result": result}, indent=2) + "\n",
        )

    def feature_path(self, key: str) -> Path:
        return self.path / "features" / f"{_safe(key)}.feat"

    def write_tables(self, markdown: str, data: Mapping[str, Any]) -> tuple[Path, Path]:
        md, js = self.path / "table.md", self.path / "table.json"
        write_atomically(md, markdown if markdown.endswith("\n") else markdown + "\n")
        write_atomically(js, json.dumps(data, indent=2, allow_nan=False) + "\n")
        return md, js


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


# ---------------------------------------------------------------------------------------------- signature


def signature(session: Session, options: TrainingFlags, edge: EdgeNetworkConfig, codec: str, **extra: Any) -> dict:
    """What a unit's result depends on: a saved result with another signature is done again."""
    backbone = session.info.backbone
    return {
        "backbone": backbone.name,
        "weights_fingerprint": backbone.weights_fingerprint,
        "codec": codec,
        "k": options.k,
        "k_search_epochs": options.k_search_epochs,
        "train_config": dataclasses.asdict(options.train_config()),
        "edge_network": edge.to_dict(),
        **extra,
    }


# ---------------------------------------------------------------------------------------------- features


def _images_digest(dataset: Dataset) -> str:
    """sha256 over every image's name, label, split, size and mtime: cheap, and changes when a file does."""
    digest = hashlib.sha256()
    for item in dataset.items:
        stat = item.path.stat() if item.path is not None else None
        size, mtime = (stat.st_size, stat.st_mtime_ns) if stat else (len(item.data or b""), 0)
        digest.update(f"{item.name}\0{item.label}\0{item.split}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def fetch_once(
    session: Session,
    run: RunFolder,
    key: str,
    dataset: Dataset,
    *,
    ks: Sequence[int],
    codec: str,
    options: TrainingFlags,
    observer: TuneObserver,
) -> tuple[FeatureStore, dict[int, float]]:
    """Every image's features for each k in `ks`: from the run folder when fetched before with the same backbone,
    codec, ks and images, else from the extractor (which caches them too) and saved. Returns the store and the
    bytes per image received for each k."""
    backbone = session.info.backbone
    header = {
        "schema": SCHEMA, "backbone": backbone.name, "weights_fingerprint": backbone.weights_fingerprint,
        "codec": codec, "ks": list(ks), "images": len(dataset), "digest": _images_digest(dataset),
    }  # fmt: skip
    path = run.feature_path(key)
    store = _load_features(path, header, dataset)
    if store is not None:
        observer.message(f"{key}: features of {len(dataset)} images read from {path}")
        return store, {k: store.bytes_per_image(k) for k in ks}
    store, stats = extract_features(dataset, session.extractor, ks=ks, codec=codec, backbone=backbone.to_proto(),
                                    observer=observer, max_in_flight=options.max_in_flight,
                                    attempts=options.extract_attempts)  # fmt: skip
    _save_features(path, header, store, ks)
    _report_extraction(observer, key, stats)
    return store, dict(stats.bytes_per_image_by_k)


def _report_extraction(observer: TuneObserver, key: str, stats: ExtractionStats) -> None:
    observer.message(
        f"{key}: {stats.images} images fetched in {stats.seconds:.1f} s ({stats.cache_hits} from the extractor's "
        f"cache), {stats.feature_bytes / stats.images / 1024:.1f} KiB per image for {len(stats.ks)} k"
    )


def _save_features(path: Path, header: Mapping[str, Any], store: FeatureStore, ks: Sequence[int]) -> None:
    encoded = json.dumps(header).encode()
    with atomic_file(path) as file:
        file.write(_FEATURES_MAGIC + struct.pack("<I", len(encoded)) + encoded)
        for k in ks:
            for index in range(len(store)):
                data = store.message_bytes(index, k)
                file.write(_RECORD.pack(index, k, len(data)) + data)


def _load_features(path: Path, header: Mapping[str, Any], dataset: Dataset) -> FeatureStore | None:
    """The saved store when its header matches and every record is whole and decodes; None otherwise."""
    try:
        with open(path, "rb") as file:
            if file.read(len(_FEATURES_MAGIC)) != _FEATURES_MAGIC:
                return None
            (length,) = struct.unpack("<I", file.read(4))
            if json.loads(file.read(length)) != json.loads(json.dumps(header)):
                return None
            store = FeatureStore.for_dataset(dataset, backbone=None)
            try:
                expected = len(dataset) * len(header["ks"])
                for _ in range(expected):
                    index, k, size = _RECORD.unpack(file.read(_RECORD.size))
                    message = feature_pb2.FeatureTensor.FromString(file.read(size))
                    store.add(index, k, message)
                if store.missing(range(len(dataset)), header["ks"]) or file.read(1):
                    store.close()
                    return None
            except BaseException:
                store.close()
                raise
            return store
    except Exception:  # unreadable, truncated, another header, a corrupt message: fetch again
        return None


# ---------------------------------------------------------------------------------------------- progress


class ReproduceObserver(ReporterObserver):
    """The tune's reporter, except for epochs: one line per finished run instead of one per epoch (a 19-task run
    trains thousands of epochs); every epoch goes to the log in log mode."""

    def on_epoch(self, stats: EpochStats) -> None:
        if self.reporter.mode == "log" or stats.epoch == stats.epochs:
            self.reporter.message(format_epoch(stats))


class Eta:
    """Progress over the units of a run: done / total and the time left, from the work units done so far
    (weights: images x epochs trained, so a 100-class task and a 2-class one are not counted alike)."""

    def __init__(self, weights: Mapping[str, float], clock: Any = time.monotonic) -> None:
        self._weights = dict(weights)
        self._clock = clock
        self._started = clock()
        self._done_weight = 0.0
        self._done: list[str] = []

    def finished(self, unit: str) -> str:
        """Record `unit` as done now; the progress line to show."""
        self._done.append(unit)
        self._done_weight += self._weights.get(unit, 0.0)
        elapsed = self._clock() - self._started
        total = sum(self._weights.values())
        left = total - self._done_weight
        line = f"{len(self._done)}/{len(self._weights)} done, {_duration(elapsed)} elapsed"
        if left > 0 and self._done_weight > 0:
            line += f", about {_duration(elapsed / self._done_weight * left)} left"
        return line


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


# ---------------------------------------------------------------------------------------------- training


def choose_k(
    store: FeatureStore,
    ks: Sequence[int],
    edge: EdgeNetworkConfig,
    config: TrainConfig,
    options: TrainingFlags,
    *,
    train: Sequence[int],
    val: Sequence[int],
    observer: TuneObserver,
) -> tuple[int, KSelection | None]:
    """k: the only candidate, or the best on `val` after short runs on `train` (the paper's choice on val200)."""
    if len(ks) == 1:
        return ks[0], None
    selection = select_k(store, ks, edge, config, train_indices=train, val_indices=val,
                         short_epochs=options.k_search_epochs, on_epoch=observer.on_epoch,
                         on_step=observer.on_step)  # fmt: skip
    observer.on_k_selection(selection)
    return selection.chosen_k, selection


def train_final(
    store: FeatureStore,
    k: int,
    edge: EdgeNetworkConfig,
    config: TrainConfig,
    *,
    train: Sequence[int],
    observer: TuneObserver,
) -> EdgeNetwork:
    """The final run: the whole recipe on `train`, the last epoch's weights kept (no held-out split to pick on)."""
    result = train_edge_network(store, k, edge, dataclasses.replace(config, keep="final"), train_indices=train,
                                on_epoch=observer.on_epoch, on_step=observer.on_step)  # fmt: skip
    return result.model


def edge_for(session: Session, task_name: str, class_names: Sequence[str], options: TrainingFlags) -> EdgeNetworkConfig:
    """The edge network a unit trains: the registry task's when it exists (checked against this backbone and these
    classes), else one from the flags; asked before any image is sent."""
    return resolve_edge_config(find_task(session.registry, task_name), session.info, class_names, options)  # type: ignore[arg-type]


def push(
    session: Session,
    task_name: str,
    dataset: Dataset,
    edge: EdgeNetworkConfig,
    model: EdgeNetwork,
    *,
    k: int,
    codec: str,
    metrics: Mapping[str, float],
    details: Mapping[str, Any],
    tags: Mapping[str, str],
    description: str,
) -> Version:
    """A new version of `task_name` (the task is created with the first one), its parent the latest version."""
    task = find_task(session.registry, task_name)
    if task is not None:
        check_task_fits(task, session.info, dataset.class_names)
    created, task = ensure_task(session.registry, task, task_name, session.info, dataset.class_names, edge, k, codec,
                                description=description)  # fmt: skip
    finite = {key: float(value) for key, value in metrics.items() if math.isfinite(float(value))}
    return push_weights(session.registry, task, model, k=k, codec=codec, class_names=dataset.class_names,
                        parent=0 if created else task.latest_version, metrics=finite,
                        details_json=json.dumps(details, allow_nan=False), dataset_fingerprint=dataset.fingerprint(),
                        tuner=session.tuner, tags=dict(tags))  # fmt: skip


def subset(dataset: Dataset, indices: Sequence[int]) -> Dataset:
    """The dataset restricted to `indices` (in that order), e.g. the images one few-shot dataset needs."""
    if not indices:
        raise InvalidArgumentError(f"{dataset.root}: no images selected")
    return dataclasses.replace(dataset, items=tuple(dataset.items[i] for i in indices), warnings=(), skipped=())


def mib(bytes_per_image: float) -> float:
    return bytes_per_image / _MiB


def accuracy_of(logits: np.ndarray, labels: np.ndarray, allowed: Sequence[int] | None = None) -> float:
    """Top-1 accuracy; with `allowed`, the argmax is taken over those classes' logits only (ImageNet-A/-R style)."""
    if allowed is not None:
        columns = np.asarray(sorted(set(allowed)), dtype=np.int64)
        predicted = columns[np.argmax(logits[:, columns], axis=1)]
    else:
        predicted = np.argmax(logits, axis=1)
    return float(np.mean(predicted == labels)) if len(labels) else math.nan
