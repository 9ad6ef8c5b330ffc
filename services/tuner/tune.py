"""The tune pipeline behind `mist tune` and the worker's Tune RPC, as plain functions: find the task, ask the
extractor what it serves, fetch every image's gathered features once, pick k, train, evaluate, push, move an alias.
The fetching is extraction.py; the progress hooks and the result are reports.py.

    with endpoints.extractor_client() as extractor, endpoints.registry_client() as registry:
        result = tune_path("data/", TuneOptions(task="shapes", alias="production"), extractor, registry)

Decisions (README "mist tune"):
- k belongs to a version, not to the task: `--k auto` may choose another k than the last version did. The chosen k
  goes into the version's metrics (`k`), tags and safetensors metadata (`mist.k`), and predict uses it. A task
  created by a tune gets the k chosen for its first version; its `k` is only a default after that.
- The codec is a property of the transfer, not of the weights: a tune uses --codec, else the task's codec, else
  i8o-zstd, and records it the same way (`mist.codec`); predict fetches features with the version's codec.
- An existing task must match what this tune would create: class names in order, backbone name and weights
  fingerprint, the MIST gather, the features' [T, D] and every edge-network setting given explicitly (the ones not
  given are taken from the task). Anything else is a FailedPreconditionError naming the difference.
- A new task is created only after training succeeded, right before the push, so bad data leaves nothing behind.
  The push names the task's latest version at the start as parent: if another run pushed meanwhile, the registry
  refuses (ABORTED) unless `force` is set.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from services.common import errors
from services.common.clients.extractor import BackboneInfo, ExtractorClient
from services.common.clients.registry import RegistryClient
from services.common.errors import FailedPreconditionError, InvalidArgumentError, MistError
from services.common.wire.codec import CodecConfig
from services.common.wire.edge_spec import EdgeNetworkConfig, macs_per_image, trainable_parameters
from services.common.wire.gather_modes import candidate_ks, validate_ks
from services.registry.records import Task, Version
from services.tuner.data import Dataset, SkippedImage, TooFewUsableImagesError, load_dataset, unusable_images_message
from services.tuner.edge_network import EdgeNetwork, to_safetensors_bytes
from services.tuner.evaluation import EvaluationReport, evaluate
from services.tuner.extraction import FetchedFeatures, fetch_features
from services.tuner.feature_store import FeatureStore
from services.tuner.options import (
    DEFAULT_CODEC_NAME,
    DEFAULT_RANK,
    METADATA_BACKBONE,
    METADATA_BACKBONE_FINGERPRINT,
    METADATA_CLASSES,
    METADATA_CODEC,
    METADATA_K,
    TuneOptions,
)
from services.tuner.reports import (
    AliasMove,
    ExtractionStats,
    TransferSummary,
    TuneObserver,
    TuneResult,
    transfer_line,
)
from services.tuner.segmentation import SegmentationTuneResult, tune_segmentation
from services.tuner.segmentation_data import is_segmentation_layout
from services.tuner.training import EpochStats, KSelection, select_k, train_edge_network

log = logging.getLogger(__name__)

ToolKind = Literal["cli", "worker", "library"]


def package_version() -> str:
    try:
        return importlib.metadata.version("mist-suite")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0+source"  # running from a checkout that was not pip-installed


def tuner_identity(kind: ToolKind = "library") -> str:
    """Who tuned, for a version's lineage: 'mist/0.1.0 (cli) host-a'."""
    name = "mist-tuner" if kind == "worker" else "mist"
    return f"{name}/{package_version()} ({kind}) {platform.node() or 'unknown-host'}"


# ---------------------------------------------------------------------------------------------- lookups


def describe(extractor: ExtractorClient) -> BackboneInfo:
    """The extractor's Describe, with its address in any error (the first call a tune makes to it)."""
    try:
        return extractor.describe()
    except MistError as error:
        raise type(error)(f"extractor {extractor.target}: {error}") from error


def find_task(registry: RegistryClient, name: str) -> Task | None:
    """The task, or None when the registry does not know it."""
    try:
        return registry.get_task(name)
    except errors.NotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- the pipeline


def tune_path(
    path: str | os.PathLike[str],
    options: TuneOptions,
    extractor: ExtractorClient,
    registry: RegistryClient,
    observer: TuneObserver | None = None,
) -> TuneResult | SegmentationTuneResult:
    """`mist tune --data PATH`: an ImageFolder tree, split folders or a manifest (see data.load_dataset).

    When the task exists its class names fix the label order, and a folder of another class is refused.
    Unreadable and empty files are set aside here and named together with the images the extractor cannot decode
    (see tune_dataset), unless what is left cannot be trained on: then they are named at once.

    A segmentation layout (images/training and annotations/training) is tuned by segmentation.tune_segmentation.
    """
    if is_segmentation_layout(path):
        return tune_segmentation(path, options, extractor, registry, observer)
    task = find_task(registry, options.task)
    if task is not None:
        _check_classification(task)
    try:
        dataset = load_dataset(
            path,
            val_fraction=options.val_fraction,
            test_fraction=options.test_fraction,
            seed=options.seed,
            class_names=task.class_names if task else None,
            skip_unreadable=True,  # every unusable image is named after extraction, or skipped with the option
        )
    except TooFewUsableImagesError as error:
        if options.skip_unreadable:
            raise
        raise InvalidArgumentError(_unusable_message(error.skipped, str(path))) from error
    return tune_dataset(dataset, options, extractor, registry, observer, task=task)


def tune_dataset(
    dataset: Dataset,
    options: TuneOptions,
    extractor: ExtractorClient,
    registry: RegistryClient,
    observer: TuneObserver | None = None,
    *,
    task: Task | None = None,
) -> TuneResult:
    """The whole pipeline on a loaded dataset. `task`: the registry's task as read before the dataset was loaded
    (its latest version is the parent of the push); None = not found (created on success).

    Unusable images (dataset.skipped: unreadable or empty files; and the ones the extractor refuses) fail the tune
    after extraction with one InvalidArgumentError naming every one, or with options.skip_unreadable are left out,
    warned about and listed in the result and the version's details."""
    observer = observer or TuneObserver()
    started = time.perf_counter()
    info = describe(extractor)
    observer.on_backbone(info)
    if not info.pretrained:
        observer.message(f"warning: {info.warning or 'the extractor runs a randomly initialised backbone'}")
    for warning in dataset.warnings:
        observer.warning(warning)
    edge = resolve_edge_config(task, info, dataset.class_names, options)
    codec = CodecConfig.parse(options.codec or (task.codec if task else DEFAULT_CODEC_NAME)).name
    ks = _ks_to_fetch(options.k, info)
    observer.message(
        f"{options.task}: {len(dataset)} images ({_split_counts(dataset)}), {len(dataset.class_names)} "
        f"classes; fetching k={', '.join(map(str, ks))} as {codec} from {extractor.target}"
    )
    backbone = task.backbone if task else info.backbone
    fetched = fetch_features(
        dataset,
        extractor,
        ks=ks,
        codec=codec,
        backbone=backbone,
        observer=observer,
        max_in_flight=options.max_in_flight,
        attempts=options.extract_attempts,
    )
    dataset, store = _usable(dataset, fetched, options, observer)
    extraction = fetched.stats
    with store:  # its temporary file goes when training and scoring end, error or not
        trained = _train(store, dataset, ks, edge, options, observer)
        reports = _evaluate(trained, store, dataset)
    transfer = TransferSummary(
        trained.k,
        codec,
        extraction.bytes_per_image_by_k[trained.k],
        extraction.feature_bytes / extraction.images,  # every k fetched: the store keeps only the chosen one
        dict(info.baselines),
    )
    observer.message(transfer_line(transfer))
    observer.before_push()
    created, task = ensure_task(
        registry, task, options.task, info, dataset.class_names, edge, trained.k, codec, description=options.description
    )
    draft = _Draft(dataset, options, info, edge, codec, trained, reports, transfer, extraction)
    version = _push(registry, task, draft, parent=0 if created else task.latest_version)
    observer.message(f"pushed version {version.number} of {options.task} (sha256 {version.sha256[:12]})")
    alias = _move_alias(registry, options.task, options.alias, version.number) if options.alias else None
    return TuneResult(
        version=version, task_created=created, k=trained.k, k_selection=trained.selection,
        kept_epoch=trained.kept_epoch, val=reports.get("val"), test=reports.get("test"),
        num_classes=len(dataset.class_names), transfer=transfer, extraction=extraction, alias=alias,
        pretrained=info.pretrained, warnings=dataset.warnings, seconds=time.perf_counter() - started,
        skipped=dataset.skipped,
    )  # fmt: skip


def resolve_edge_config(
    task: Task | None, info: BackboneInfo, class_names: Sequence[str], options: TuneOptions
) -> EdgeNetworkConfig:
    """The edge network to train: the task's (checked against this tune), or a new one from options."""
    given = {name: getattr(options, name) for name in ("num_blocks", "rank", "heads", "pooling")}
    if options.pooling == "dense":
        raise InvalidArgumentError(
            "--pooling dense is for segmentation data (DIR/images/training and DIR/annotations/training); "
            "a classifier pools its tokens"
        )
    if task is None:
        # The token readout: fine pixel patterns need more than one pooled token (docs/explanation/recipe.md).
        defaults = {"num_blocks": 4, "rank": min(DEFAULT_RANK, info.dims), "heads": 1,
                    "pooling": "cls+tokens" if info.num_prefix_tokens else "mean+tokens"}  # fmt: skip
        values = {name: defaults[name] if value is None else value for name, value in given.items()}
        return EdgeNetworkConfig(dims=info.dims, tokens=info.tokens, num_classes=len(class_names), **values)
    check_task_fits(task, info, class_names)
    config = task.edge_config()
    differing = [
        f"{name} {value!r} (the task has {getattr(config, name)!r})"
        for name, value in given.items()
        if value is not None and value != getattr(config, name)
    ]
    if differing:
        raise FailedPreconditionError(
            f"task {task.name!r} trains another edge network: {', '.join(differing)}; "
            "leave those flags out or tune a new task"
        )
    return config


def check_task_fits(task: Task, info: BackboneInfo, class_names: Sequence[str]) -> None:
    """FailedPreconditionError unless the task was made for this backbone, these classes and the MIST gather."""
    _check_classification(task)
    theirs, ours = task.backbone, info.backbone
    if (theirs.name, theirs.weights_fingerprint) != (ours.name, ours.weights_fingerprint):
        raise FailedPreconditionError(
            f"task {task.name!r} belongs to backbone {theirs.name} (weights {theirs.weights_fingerprint}) but the "
            f"extractor serves {ours.name} (weights {ours.weights_fingerprint}): use an extractor with the task's "
            "backbone, or tune a new task"
        )
    if task.gather_mode != "mist":
        raise FailedPreconditionError(f"task {task.name!r} is not a MIST task (gather mode {task.gather_mode})")
    if task.class_names != tuple(class_names):
        raise FailedPreconditionError(
            f"task {task.name!r} has classes {list(task.class_names)}, this data has "
            f"{list(class_names)}: the class names and their order must match"
        )
    edge = task.edge_config()
    if (edge.tokens, edge.dims) != (info.tokens, info.dims):
        raise FailedPreconditionError(
            f"task {task.name!r} expects [{edge.tokens}, {edge.dims}] features but the extractor "
            f"sends [{info.tokens}, {info.dims}]"
        )


def _check_classification(task: Task) -> None:
    if task.kind != "classification":
        raise FailedPreconditionError(
            f"task {task.name!r} is a {task.kind} task; this data is labelled by class folders or a manifest: "
            "choose another --task name"
        )


def _usable(
    dataset: Dataset, fetched: FetchedFeatures, options: TuneOptions, observer: TuneObserver
) -> tuple[Dataset, FeatureStore]:
    """The dataset and store to train on: every unusable image named in one error, or (skip_unreadable) left out."""
    unusable = (*dataset.skipped, *fetched.refused.values())
    if unusable and not options.skip_unreadable:
        fetched.store.close()
        raise InvalidArgumentError(_unusable_message(unusable, str(dataset.root)))
    warned = set(dataset.warnings)
    dataset, store = fetched.usable(dataset)
    if dataset.skipped:
        observer.warning(unusable_images_message(dataset.skipped, "skipping {n} unusable image(s)"))
    for warning in dataset.warnings:
        if warning not in warned:
            observer.warning(warning)
    return dataset, store


def _unusable_message(unusable: Sequence[SkippedImage], root: str) -> str:
    return unusable_images_message(
        unusable,
        f"could not use {{n}} image(s) of {root}",
        "fix or remove them, or tune on the rest with --skip-unreadable (TuneSpec.skip_unreadable for the worker); "
        "nothing was pushed",
    )


def _ks_to_fetch(k: int | None, info: BackboneInfo) -> tuple[int, ...]:
    if info.architecture == "hierarchical":  # each stage's aggregate has its own shape: the edge network takes the last
        if k not in (None, info.num_blocks):
            raise InvalidArgumentError(
                f"{info.backbone.name} is hierarchical: the edge network reads the aggregate of all "
                f"{info.num_blocks} stages, so --k must be auto or {info.num_blocks}"
            )
        return (info.num_blocks,)
    return tuple(candidate_ks(info.num_blocks)) if k is None else validate_ks([k], info.num_blocks)


def _split_counts(dataset: Dataset) -> str:
    counts = {split: sum(per_class) for split, per_class in dataset.counts().items()}
    return ", ".join(f"{split} {n}" for split, n in counts.items() if n)


# ---------------------------------------------------------------------------------------------- training


@dataclass
class _Trained:
    k: int
    selection: KSelection | None
    model: EdgeNetwork
    kept_epoch: int
    history: list[EpochStats]
    seconds: float


def _train(
    store: FeatureStore,
    dataset: Dataset,
    ks: Sequence[int],
    edge: EdgeNetworkConfig,
    options: TuneOptions,
    observer: TuneObserver,
) -> _Trained:
    config = options.train_config()
    train, val = dataset.indices("train"), dataset.indices("val")
    selection = None
    if len(ks) > 1:
        if not val:
            raise InvalidArgumentError(
                "--k auto chooses k on a validation split, and this data has none: give val "
                "images (a val/ folder or a split column), --val-fraction above 0, or --k N"
            )
        observer.message(f"choosing k among {', '.join(map(str, ks))} on {len(val)} validation images")
        selection = select_k(store, ks, edge, config, train_indices=train, val_indices=val,
                             short_epochs=options.k_search_epochs, on_epoch=observer.on_epoch,
                             on_step=observer.on_step)  # fmt: skip
        observer.on_k_selection(selection)
    k = selection.chosen_k if selection else ks[0]
    store.keep_only(k)  # the other candidates' features are no longer needed: free them before the long run
    observer.message(
        f"training k={k}: {config.epochs} epochs on {len(train)} images, {trainable_parameters(edge):,} parameters"
    )
    result = train_edge_network(
        store,
        k,
        edge,
        config,
        train_indices=train,
        val_indices=val,
        on_epoch=observer.on_epoch,
        on_step=observer.on_step,
    )
    return _Trained(k, selection, result.model, result.kept_epoch, result.history, result.seconds)


def _evaluate(trained: _Trained, store: FeatureStore, dataset: Dataset) -> dict[str, EvaluationReport]:
    reports = {}
    for split in ("val", "test"):
        indices = dataset.indices(split)
        if indices:
            reports[split] = evaluate(trained.model, store, trained.k, indices, dataset.class_names)
    return reports


# ---------------------------------------------------------------------------------------------- pushing


@dataclass(frozen=True)
class _Draft:
    """Everything a push records."""

    dataset: Dataset
    options: TuneOptions
    info: BackboneInfo
    edge: EdgeNetworkConfig
    codec: str
    trained: _Trained
    reports: dict[str, EvaluationReport]
    transfer: TransferSummary
    extraction: ExtractionStats


def ensure_task(
    registry: RegistryClient,
    task: Task | None,
    name: str,
    info: BackboneInfo,
    class_names: Sequence[str],
    edge: EdgeNetworkConfig,
    k: int,
    codec: str,
    *,
    description: str = "",
) -> tuple[bool, Task]:
    """(created, task): `task` as read at the start, or a new one named `name` with these settings."""
    if task is not None:
        return False, task
    definition = Task(
        name=name, backbone_name=info.backbone.name, backbone_fingerprint=info.backbone.weights_fingerprint,
        gather_mode="mist", k=k, codec=codec, class_names=tuple(class_names), edge=edge.to_dict(),
        description=description,
    )  # fmt: skip
    try:
        return True, registry.create_task(definition)
    except errors.AlreadyExistsError:
        # Created by someone else while we trained: fine if it fits; the push then races on the parent.
        existing = registry.get_task(name)
        check_task_fits(existing, info, class_names)
        if existing.edge_config() != edge:
            raise FailedPreconditionError(
                f"task {name!r} was created meanwhile with another edge network ({existing.edge_config().to_json()})"
            ) from None
        return False, existing


def _metrics(draft: _Draft) -> dict[str, float]:
    trained, kept = draft.trained, draft.trained.history[draft.trained.kept_epoch - 1]
    metrics: dict[str, float] = {
        "k": trained.k, "epochs": draft.options.epochs, "kept_epoch": trained.kept_epoch,
        "train_loss": kept.train_loss, "train_accuracy": kept.train_accuracy,
        "train_images": len(draft.dataset.indices("train")), "val_images": len(draft.dataset.indices("val")),
        "test_images": len(draft.dataset.indices("test")), "num_classes": len(draft.dataset.class_names),
        "seed": draft.options.seed, "lr": draft.options.lr, "weight_decay": draft.options.weight_decay,
        "batch_size": draft.options.batch_size, "parameters": trainable_parameters(draft.edge),
        "macs_per_image": macs_per_image(draft.edge), "train_seconds": trained.seconds,
        "bytes_per_image": draft.transfer.bytes_per_image,
        "fetched_bytes_per_image": draft.transfer.fetched_bytes_per_image,
    }  # fmt: skip
    for split, report in draft.reports.items():
        metrics.update(
            {
                f"{split}_accuracy": report.accuracy,
                f"{split}_loss": report.loss,
                f"{split}_balanced_accuracy": report.balanced_accuracy,
            }
        )
    for method, size in draft.transfer.baselines.items():
        metrics[f"{method}_bytes_per_image"] = size
    if trained.selection is not None:
        for k, accuracy in trained.selection.val_accuracy_by_k.items():
            metrics[f"k_search_val_accuracy_k{k}"] = accuracy
    return {key: float(value) for key, value in metrics.items() if math.isfinite(float(value))}


def _details(draft: _Draft) -> str:
    details = {
        "k": draft.trained.k, "codec": draft.codec,
        "k_selection": draft.trained.selection.to_dict() if draft.trained.selection else None,
        **{split: report.to_dict() for split, report in draft.reports.items()},
        "transfer": draft.transfer.to_dict(), "extraction": draft.extraction.to_dict(),
        "train_config": dataclasses.asdict(draft.options.train_config()),
        "history": [stats.to_dict() for stats in draft.trained.history],
        "edge_network": draft.edge.to_dict(),
        "backbone": {"name": draft.info.backbone.name, "weights_fingerprint": draft.info.backbone.weights_fingerprint,
                     "pretrained": draft.info.pretrained, "num_blocks": draft.info.num_blocks},
        "dataset": {"layout": draft.dataset.layout, "class_names": list(draft.dataset.class_names),
                    "counts": draft.dataset.counts()},
        "warnings": list(draft.dataset.warnings),
        "skipped": [image.to_dict() for image in draft.dataset.skipped],
    }  # fmt: skip
    return json.dumps(details, allow_nan=False)  # the registry stores JSON; NaN is not JSON


def _push(registry: RegistryClient, task: Task, draft: _Draft, *, parent: int) -> Version:
    return push_weights(
        registry, task, draft.trained.model, k=draft.trained.k, codec=draft.codec,
        class_names=draft.dataset.class_names, parent=parent, force=draft.options.force, metrics=_metrics(draft),
        details_json=_details(draft), dataset_fingerprint=draft.dataset.fingerprint(),
        tuner=draft.options.tuner or tuner_identity(),
    )  # fmt: skip


def push_weights(
    registry: RegistryClient,
    task: Task,
    model: EdgeNetwork,
    *,
    k: int,
    codec: str,
    class_names: Sequence[str],
    parent: int,
    metrics: dict[str, float],
    details_json: str,
    dataset_fingerprint: str,
    tuner: str,
    force: bool = False,
    tags: dict[str, str] | None = None,
) -> Version:
    """Push a trained network as a new version of `task`: safetensors with the metadata predict reads (k, codec,
    classes, backbone) and the tags k and codec (plus `tags`); `parent` is the latest version the caller saw."""
    metadata = {
        METADATA_K: str(k), METADATA_CODEC: codec, METADATA_CLASSES: json.dumps(list(class_names)),
        METADATA_BACKBONE: task.backbone.name, METADATA_BACKBONE_FINGERPRINT: task.backbone.weights_fingerprint,
    }  # fmt: skip
    return registry.push(
        task.name, to_safetensors_bytes(model, metadata), parent_version=parent, force=force, metrics=metrics,
        details_json=details_json, dataset_fingerprint=dataset_fingerprint, tuner=tuner,
        tags={**(tags or {}), "k": str(k), "codec": codec},
    )  # fmt: skip


def _move_alias(registry: RegistryClient, task: str, alias: str, version: int) -> AliasMove:
    """Compare-and-set from what the alias points at now, so the move we report is the move that happened."""
    try:
        current = registry.get_alias(task, alias).version
    except errors.NotFoundError:
        current = 0
    registry.set_alias(task, alias, version, expected_version=current)
    return AliasMove(alias, current, version)
