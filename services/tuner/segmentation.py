"""Semantic segmentation with MIST: `mist tune`, `mist evaluate` and `mist predict` on an ADE20K-style layout and a
hierarchical backbone (pvt_v2), as in the paper's appendix (docs/how-to/segmentation.md).

    with endpoints.extractor_client() as extractor, endpoints.registry_client() as registry:
        result = tune_segmentation("ade/", TuneOptions(task="scenes", alias="production"), extractor, registry)
        loaded = load_version(registry, "scenes", alias="production")            # services/tuner/predict.py
        report = evaluate_segmentation(loaded, extractor, "ade/")                # mIoU, pixel accuracy, per class
        for answer in segment_files(loaded, extractor, files, output_dir="out"):  # label PNGs (+ overlays)
            print(answer.to_dict())

What travels: the extractor squashes each image to its --input-size square and sends the aggregate G_S of the
backbone's last stage ([T, D], T = (input / 32)^2); the device runs the dense edge network (LAE blocks, then a
per-token LayerNorm + Linear head) and upsamples its per-token logits bilinearly (services/tuner/dense.py).

Training and scoring happen on a square label grid of `label_size` (the task's; by default input / 8, 64 px at
512): masks are squashed to it by nearest neighbour, as the images are squashed to the input. Pixels of the ignore
index (255 unless the task says otherwise) are neither trained on nor scored. Splits: images/training trains, a
hold-out of it (--val-fraction, by a hash of each name) picks the kept epoch, and images/validation is the test
split every reported score comes from. Predictions are label maps at each image's own size.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from services.common import errors
from services.common.clients.extractor import DEFAULT_MAX_IN_FLIGHT, BackboneInfo, ExtractorClient, ImageItem
from services.common.clients.registry import RegistryClient
from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.files import write_atomically
from services.common.wire.codec import CodecConfig, decode_feature
from services.common.wire.edge_spec import EdgeNetworkConfig, macs_per_image, trainable_parameters
from services.registry.records import SegmentationSpec, Task, Version
from services.tuner import dense
from services.tuner.data import Dataset, DatasetItem, assign_splits
from services.tuner.options import DEFAULT_CODEC_NAME, DEFAULT_RANK, TrainConfig, TuneOptions
from services.tuner.reports import AliasMove, ExtractionStats, TuneObserver
from services.tuner.segmentation_data import (
    IGNORE_INDEX,
    SegmentationDataset,
    SegmentationItem,
    SegmentationScores,
    confusion,
    load_segmentation_dataset,
    segmentation_scores,
)

LABEL_SIZE_DIVISOR = 8  # default label grid: input / 8 (64 at 512 px), 4x the token grid of a /32 backbone
DEFAULT_OUTPUT_DIR = "mist-segmentation"  # where `mist predict` writes label maps unless --output-dir says otherwise
# Logits of one micro-batch at the label resolution stay under this many bytes ([b, C, L, L] float32, and autograd
# keeps about three such maps): 150 ADE20K classes at 64 x 64 fit 5 images.
_LOGIT_BYTES = 16 << 20
_MAX_NAMED = 20


# ---------------------------------------------------------------------------------------------- data


def label_grid(size: int | None, input_size: int) -> int:
    """The label grid's side: `size`, else input / LABEL_SIZE_DIVISOR; within [1, input_size]."""
    side = size if size is not None else max(1, input_size // LABEL_SIZE_DIVISOR)
    if not 1 <= side <= input_size:
        raise InvalidArgumentError(f"--label-size must be in [1, {input_size}] (the input size); got {side}")
    return side


def read_mask(item: SegmentationItem, label_size: int) -> np.ndarray:
    """The item's mask squashed to label_size x label_size by nearest neighbour (uint8 class ids)."""
    with Image.open(item.mask) as opened:
        return dense.resize_mask(opened, label_size)


def load_masks(items: Sequence[SegmentationItem], label_size: int) -> np.ndarray:
    """[N, L, L] uint8: every item's mask at the label grid (a few KB each)."""
    masks = np.empty((len(items), label_size, label_size), dtype=np.uint8)
    for row, item in enumerate(items):
        masks[row] = read_mask(item, label_size)
    return masks


def feature_dataset(data: SegmentationDataset, *, val_fraction: float, seed: int) -> Dataset:
    """The layout as a Dataset the feature fetcher reads (label 0 throughout: the labels are the masks): training
    images are "train" or, for a `val_fraction` hold-out chosen as data.assign_splits chooses (by a hash of seed and
    name), "val"; validation images are "test"."""
    training = data.split("training")
    try:
        held = assign_splits([item.name for item in training], [0] * len(training), val_fraction=val_fraction,
                             test_fraction=0.0, seed=seed)  # fmt: skip
    except InvalidArgumentError:  # nothing would be left to train on
        raise InvalidArgumentError(f"{data.root}: every training image was held out for validation; lower "
                                   "--val-fraction") from None  # fmt: skip
    splits = iter(held)
    items = tuple(
        DatasetItem(f"{item.split}/{item.name}", 0, "test" if item.split == "validation" else next(splits),
                    path=item.image)
        for item in data.items
    )  # fmt: skip
    return Dataset(data.root, data.class_names, items, "folders")


def dataset_fingerprint(data: SegmentationDataset, dataset: Dataset) -> str:
    """The images' fingerprint (Dataset.fingerprint: class names, names, splits, contents) extended with the sha256 of
    every mask, streamed."""
    digest = hashlib.sha256(dataset.fingerprint().encode())
    for item in sorted(data.items, key=lambda i: (i.split, i.name)):
        with item.mask.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class DenseScores:
    """How a dense network does on a set of images at the label grid."""

    images: int
    loss: float  # mean cross-entropy per scored pixel
    scores: SegmentationScores
    confusion: np.ndarray = field(repr=False)  # [C, C] pixels (true, predicted)

    def to_dict(self, class_names: Sequence[str]) -> dict[str, object]:
        return {
            "images": self.images, "loss": self.loss, "miou": self.scores.miou,
            "pixel_accuracy": self.scores.pixel_accuracy,
            "per_class": {name: {"iou": iou, "accuracy": accuracy, "pixels": int(pixels)}
                          for name, iou, accuracy, pixels in zip(class_names, self.scores.iou, self.scores.accuracy,
                                                                 self.confusion.sum(axis=1), strict=True)},
        }  # fmt: skip


@dataclass(frozen=True)
class DenseEpoch:
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float | None
    val_miou: float | None
    lr: float
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass
class DenseTrainResult:
    model: object  # EdgeNetwork, eval mode (kept untyped so importing this module does not import torch)
    history: list[DenseEpoch]
    kept_epoch: int
    seconds: float


def micro_batch(edge: EdgeNetworkConfig, label_size: int, config: TrainConfig) -> int:
    """Images per forward/backward: TrainConfig's feature cap, and the label-resolution logits within _LOGIT_BYTES."""
    logits = max(1, _LOGIT_BYTES // (4 * edge.num_classes * label_size * label_size))
    return max(1, min(config.micro_batch_for(edge.tokens, edge.dims), logits))


def train_dense_network(
    store: object,
    k: int,
    masks: np.ndarray,
    edge: EdgeNetworkConfig,
    config: TrainConfig,
    *,
    train_indices: Sequence[int],
    val_indices: Sequence[int] = (),
    ignore_index: int = IGNORE_INDEX,
    on_epoch: Callable[[DenseEpoch], None] | None = None,
) -> DenseTrainResult:
    """Train a fresh dense EdgeNetwork(edge) on the store's k features against `masks` ([N, L, L], N = the store's
    images): pixel cross-entropy at the label grid, AdamW with warm-up and cosine (TrainConfig), the epoch with the
    best val mIoU kept (ties: lower val loss). Seeded: same inputs, same weights. The global torch RNG is untouched."""
    import torch
    import torch.nn.functional as F

    from services.tuner.edge_network import EdgeNetwork, dense_logits
    from services.tuner.training import AdamW, _BestWeights, lr_at_step

    if not edge.dense:
        raise InvalidArgumentError(f"segmentation trains a dense edge network; pooling is {edge.pooling!r}")
    if not train_indices:
        raise InvalidArgumentError("segmentation training needs at least one training image")
    size = masks.shape[-1]
    chunk = micro_batch(edge, size, config)
    steps_per_epoch = math.ceil(len(train_indices) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = config.resolved_warmup_epochs * steps_per_epoch
    history: list[DenseEpoch] = []
    best = _BestWeights()
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = EdgeNetwork(edge)
        optimizer = AdamW(model, weight_decay=config.weight_decay)
        order_generator = torch.Generator().manual_seed(config.seed)
        step = 0
        for epoch in range(1, config.epochs + 1):
            epoch_started = time.perf_counter()
            model.train()
            order = [train_indices[i] for i in torch.randperm(len(train_indices), generator=order_generator)]
            loss_sum = pixels_seen = 0.0
            lr = config.lr
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                targets = torch.from_numpy(masks[batch].astype(np.int64))
                scored = int((targets != ignore_index).sum())
                lr = lr_at_step(step, total_steps=total_steps, warmup_steps=warmup_steps, base_lr=config.lr,
                                min_lr=config.min_lr)  # fmt: skip
                step += 1
                if not scored:  # every pixel of the batch is ignored: nothing to learn from
                    continue
                optimizer.zero_grad()
                for part in range(0, len(batch), chunk):
                    features, _ = store.batch(batch[part : part + chunk], k)  # type: ignore[attr-defined]
                    logits = dense_logits(model, features, (size, size))
                    loss = F.cross_entropy(logits, targets[part : part + chunk], ignore_index=ignore_index,
                                           reduction="sum") / scored  # fmt: skip
                    loss.backward()
                    loss_sum += float(loss.detach()) * scored
                optimizer.step(lr)
                pixels_seen += scored
            val = score_dense(model, store, k, masks, val_indices, ignore_index=ignore_index) if val_indices else None
            if val is not None and config.keep == "best":
                best.offer(epoch, val.scores.miou, val.loss, model)
            history.append(DenseEpoch(epoch, config.epochs, loss_sum / max(pixels_seen, 1.0),
                                      val.loss if val else None, val.scores.miou if val else None, lr,
                                      time.perf_counter() - epoch_started))  # fmt: skip
            if on_epoch is not None:
                on_epoch(history[-1])
    kept = best.restore(model) or config.epochs
    return DenseTrainResult(model.eval(), history, kept, time.perf_counter() - started)


def score_dense(
    model: object,
    store: object,
    k: int,
    masks: np.ndarray,
    indices: Sequence[int],
    *,
    ignore_index: int = IGNORE_INDEX,
    batch_size: int = 16,
) -> DenseScores:
    """mIoU, pixel accuracy, per-class scores and mean pixel loss of a torch dense network on `indices`."""
    import torch
    import torch.nn.functional as F

    from services.tuner.edge_network import dense_logits

    num_classes = model.config.num_classes  # type: ignore[attr-defined]
    size = masks.shape[-1]
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum = pixels = 0.0
    was_training = model.training  # type: ignore[attr-defined]
    model.eval()  # type: ignore[attr-defined]
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            batch = list(indices[start : start + batch_size])
            features, _ = store.batch(batch, k)  # type: ignore[attr-defined]
            logits = dense_logits(model, features, (size, size))  # type: ignore[arg-type]
            targets = torch.from_numpy(masks[batch].astype(np.int64))
            loss_sum += float(F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum"))
            pixels += int((targets != ignore_index).sum())
            matrix += confusion(logits.argmax(1).numpy(), masks[batch], num_classes=num_classes,
                                ignore_index=ignore_index)  # fmt: skip
    model.train(was_training)  # type: ignore[attr-defined]
    return DenseScores(len(indices), loss_sum / max(pixels, 1.0), segmentation_scores(matrix), matrix)


# ---------------------------------------------------------------------------------------------- tune


@dataclass(frozen=True)
class SegmentationTuneResult:
    """What `mist tune` on a segmentation layout produced."""

    version: Version
    task_created: bool
    k: int
    kept_epoch: int
    class_names: tuple[str, ...]
    val: DenseScores | None  # the hold-out of images/training
    test: DenseScores | None  # images/validation
    label_size: int
    input_size: int
    parameters: int
    macs_per_image: int
    bytes_per_image: float  # compressed feature bytes as received
    float32_bytes_per_image: int
    baselines: dict[str, int]
    extraction: ExtractionStats
    alias: AliasMove | None
    pretrained: bool
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": "segmentation", "task": self.version.task, "version": self.version.number,
            "sha256": self.version.sha256, "task_created": self.task_created, "k": self.k,
            "kept_epoch": self.kept_epoch, "num_classes": len(self.class_names),
            "val": self.val.to_dict(self.class_names) if self.val else None,
            "test": self.test.to_dict(self.class_names) if self.test else None,
            "label_size": self.label_size, "input_size": self.input_size, "parameters": self.parameters,
            "macs_per_image": self.macs_per_image, "bytes_per_image": self.bytes_per_image,
            "float32_bytes_per_image": self.float32_bytes_per_image, "baselines": dict(self.baselines),
            "extraction": self.extraction.to_dict(),
            "alias": dataclasses.asdict(self.alias) if self.alias else None,
            "pretrained": self.pretrained, "seconds": self.seconds,
        }  # fmt: skip

    def summary(self) -> str:
        lines = [
            f"pushed {self.version.task} version {self.version.number} (segmentation, {len(self.class_names)} "
            f"classes, {self.parameters:,} parameters, {self.macs_per_image / 1e6:.1f} M MACs per image)"
        ]
        for name, scores in (("val", self.val), ("test", self.test)):
            if scores is not None:
                lines.append(f"  {name}: mIoU {scores.scores.miou:.3f}, pixel accuracy "
                             f"{scores.scores.pixel_accuracy:.3f} on {scores.images} images "
                             f"({self.label_size}x{self.label_size} labels)")  # fmt: skip
        stages = self.baselines.get("stages")
        lines.append(f"  transfer: {self.bytes_per_image / 1024:.1f} KiB per image as received "
                     f"(float32 {self.float32_bytes_per_image / 1024:.0f} KiB"
                     + (f"; every stage's output: {stages / 1024:.0f} KiB" if stages else "") + ")")  # fmt: skip
        if self.alias is not None:
            lines.append(f"  alias {self.alias.name}: {self.alias.from_version or '-'} -> {self.alias.to_version}")
        if not self.pretrained:
            lines.append("  warning: the backbone is randomly initialised; scores say nothing about real data")
        return "\n".join(lines)


def check_hierarchical(info: BackboneInfo) -> None:
    if info.architecture != "hierarchical":
        raise FailedPreconditionError(
            f"segmentation needs a hierarchical backbone (pvt_v2_*); the extractor at hand serves "
            f"{info.backbone.name} ({info.architecture or 'vit'}): start one with --backbone pvt_v2_b2 (or another "
            "pvt_v2) and tune again"
        )


def segmentation_edge_config(
    task: Task | None, info: BackboneInfo, num_classes: int, options: TuneOptions
) -> EdgeNetworkConfig:
    """The dense edge network to train: the task's, or one from the options (pooling must be dense)."""
    if options.pooling not in (None, "dense"):
        raise InvalidArgumentError(f"segmentation trains a dense head; --pooling {options.pooling} does not apply")
    given = {name: getattr(options, name) for name in ("num_blocks", "rank", "heads")}
    if task is not None:
        config = task.edge_config()
        differing = [f"{name} {value!r} (the task has {getattr(config, name)!r})" for name, value in given.items()
                     if value is not None and value != getattr(config, name)]  # fmt: skip
        if differing:
            raise FailedPreconditionError(f"task {task.name!r} trains another edge network: {', '.join(differing)}; "
                                          "leave those flags out or tune a new task")  # fmt: skip
        return config
    defaults = {"num_blocks": 4, "rank": min(DEFAULT_RANK, info.dims), "heads": 1}
    values = {name: defaults[name] if value is None else value for name, value in given.items()}
    return EdgeNetworkConfig(dims=info.dims, tokens=info.tokens, num_classes=num_classes, pooling="dense", **values)


def _check_task(task: Task, info: BackboneInfo, data: SegmentationDataset, input_size: int) -> None:
    if task.kind != "segmentation" or task.segmentation is None:
        raise FailedPreconditionError(f"task {task.name!r} is a {task.kind} task; a segmentation layout needs a "
                                      "segmentation task: choose another --task name")  # fmt: skip
    theirs, ours = task.backbone, info.backbone
    if (theirs.name, theirs.weights_fingerprint) != (ours.name, ours.weights_fingerprint):
        raise FailedPreconditionError(f"task {task.name!r} belongs to backbone {theirs} but the extractor serves "
                                      f"{ours}: use an extractor with the task's backbone, or tune a new task")  # fmt: skip
    if task.segmentation.input_size != input_size:
        raise FailedPreconditionError(f"task {task.name!r} was tuned on {task.segmentation.input_size} px inputs; the "
                                      f"extractor serves {input_size} px (--input-size)")  # fmt: skip
    if task.class_names != data.class_names:
        raise FailedPreconditionError(f"task {task.name!r} has classes {list(task.class_names)}, this data has "
                                      f"{list(data.class_names)}")  # fmt: skip


def tune_segmentation(
    path: str | Path,
    options: TuneOptions,
    extractor: ExtractorClient,
    registry: RegistryClient,
    observer: TuneObserver | None = None,
) -> SegmentationTuneResult:
    """`mist tune --data DIR` on a segmentation layout: check every file, fetch the aggregate of every image once,
    train the dense edge network, score it, create the task (first time) and push a version; nothing is pushed on
    any error. Images the extractor refuses fail the tune, all named."""
    from services.tuner.extraction import fetch_features, refusal_message
    from services.tuner.tune import _move_alias, describe, find_task, push_weights, tuner_identity

    observer = observer or TuneObserver()
    started = time.perf_counter()
    task = find_task(registry, options.task)
    spec = task.segmentation if task is not None else None
    data = load_segmentation_dataset(path, class_names=task.class_names if task is not None else None,
                                     ignore_index=spec.ignore_index if spec else IGNORE_INDEX)  # fmt: skip
    info = describe(extractor)
    observer.on_backbone(info)
    check_hierarchical(info)
    input_size = int(info.data_config.input_size[-1])
    if task is not None:
        _check_task(task, info, data, input_size)
    if options.k not in (None, info.num_blocks):
        raise InvalidArgumentError(f"segmentation sends the aggregate of all {info.num_blocks} stages: --k must be "
                                   f"auto or {info.num_blocks}")  # fmt: skip
    if spec is not None and options.label_size not in (None, spec.label_size):
        raise FailedPreconditionError(f"task {options.task!r} scores {spec.label_size}x{spec.label_size} labels; "
                                      "leave --label-size out or tune a new task")  # fmt: skip
    if not info.pretrained:
        observer.message(f"warning: {info.warning or 'the extractor runs a randomly initialised backbone'}")
    label_size = spec.label_size if spec else label_grid(options.label_size, input_size)
    edge = segmentation_edge_config(task, info, len(data.class_names), options)
    codec = CodecConfig.parse(options.codec or (task.codec if task else DEFAULT_CODEC_NAME)).name
    k = info.num_blocks
    dataset = feature_dataset(data, val_fraction=options.val_fraction, seed=options.seed)
    masks = load_masks(data.items, label_size)
    counts = {split: len(dataset.indices(split)) for split in ("train", "val", "test")}
    observer.message(f"{options.task}: segmentation, {len(data.items)} images (train {counts['train']}, val "
                     f"{counts['val']}, test {counts['test']}), {len(data.class_names)} classes, labels "
                     f"{label_size}x{label_size}; fetching the aggregate (k={k}) as {codec} from {extractor.target}")  # fmt: skip
    fetched = fetch_features(dataset, extractor, ks=(k,), codec=codec, backbone=task.backbone if task else info.backbone,
                             observer=observer, max_in_flight=options.max_in_flight,
                             attempts=options.extract_attempts)  # fmt: skip
    if fetched.refused:
        fetched.store.close()
        raise InvalidArgumentError(refusal_message(fetched.refused.values()))
    store, config = fetched.store, options.train_config()
    with store:
        observer.message(f"training: {config.epochs} epochs on {counts['train']} images, "
                         f"{trainable_parameters(edge):,} parameters")  # fmt: skip
        trained = train_dense_network(store, k, masks, edge, config, train_indices=dataset.indices("train"),
                                      val_indices=dataset.indices("val"), ignore_index=data.ignore_index,
                                      on_epoch=lambda e: observer.message(_epoch_line(e)))  # fmt: skip
        scored = {split: score_dense(trained.model, store, k, masks, dataset.indices(split),
                                     ignore_index=data.ignore_index)
                  for split in ("val", "test") if dataset.indices(split)}  # fmt: skip
    extraction = fetched.stats
    baselines = dict(info.baselines)
    observer.before_push()
    created, task = _ensure_segmentation_task(registry, task, options, info, data, edge, k, codec, input_size,
                                              label_size)  # fmt: skip
    metrics = _metrics(trained, scored, options, edge, extraction, baselines, counts)
    details = {
        "kind": "segmentation", "k": k, "codec": codec, "label_size": label_size, "input_size": input_size,
        **{split: scores.to_dict(data.class_names) for split, scores in scored.items()},
        "history": [epoch.to_dict() for epoch in trained.history], "extraction": extraction.to_dict(),
        "train_config": dataclasses.asdict(config), "edge_network": edge.to_dict(),
        "backbone": {"name": info.backbone.name, "weights_fingerprint": info.backbone.weights_fingerprint,
                     "pretrained": info.pretrained, "stages": [list(s) for s in info.stages]},
        "dataset": {"layout": "segmentation", "class_names": list(data.class_names), "counts": counts},
    }  # fmt: skip
    version = push_weights(registry, task, trained.model, k=k, codec=codec, class_names=data.class_names,  # type: ignore[arg-type]
                           parent=0 if created else task.latest_version, metrics=metrics,
                           details_json=json.dumps(details, allow_nan=False),
                           dataset_fingerprint=dataset_fingerprint(data, dataset),
                           tuner=options.tuner or tuner_identity(), force=options.force)  # fmt: skip
    observer.message(f"pushed version {version.number} of {options.task} (sha256 {version.sha256[:12]})")
    alias = _move_alias(registry, options.task, options.alias, version.number) if options.alias else None
    return SegmentationTuneResult(
        version=version, task_created=created, k=k, kept_epoch=trained.kept_epoch, class_names=data.class_names,
        val=scored.get("val"), test=scored.get("test"), label_size=label_size, input_size=input_size,
        parameters=trainable_parameters(edge), macs_per_image=macs_per_image(edge),
        bytes_per_image=extraction.bytes_per_image_by_k[k], float32_bytes_per_image=4 * edge.tokens * edge.dims,
        baselines=baselines, extraction=extraction, alias=alias, pretrained=info.pretrained,
        seconds=time.perf_counter() - started,
    )  # fmt: skip


def _epoch_line(epoch: DenseEpoch) -> str:
    val = f", val loss {epoch.val_loss:.3f}, val mIoU {epoch.val_miou:.3f}" if epoch.val_miou is not None else ""
    return f"epoch {epoch.epoch}/{epoch.epochs}: train loss {epoch.train_loss:.3f}{val} ({epoch.seconds:.1f} s)"


def _ensure_segmentation_task(
    registry: RegistryClient,
    task: Task | None,
    options: TuneOptions,
    info: BackboneInfo,
    data: SegmentationDataset,
    edge: EdgeNetworkConfig,
    k: int,
    codec: str,
    input_size: int,
    label_size: int,
) -> tuple[bool, Task]:
    if task is not None:
        return False, task
    definition = Task(
        name=options.task, backbone_name=info.backbone.name, backbone_fingerprint=info.backbone.weights_fingerprint,
        gather_mode="mist", k=k, codec=codec, class_names=data.class_names, edge=edge.to_dict(),
        description=options.description, kind="segmentation",
        segmentation=SegmentationSpec(ignore_index=data.ignore_index, input_size=input_size, label_size=label_size),
    )  # fmt: skip
    try:
        return True, registry.create_task(definition)
    except errors.AlreadyExistsError:  # created by someone else while we trained: fine if it is the same task
        existing = registry.get_task(options.task)
        if not existing.same_definition(definition):
            raise FailedPreconditionError(f"task {options.task!r} was created meanwhile with other settings; tune "
                                          "again to train for it") from None  # fmt: skip
        return False, existing


def _metrics(
    trained: DenseTrainResult,
    scored: dict[str, DenseScores],
    options: TuneOptions,
    edge: EdgeNetworkConfig,
    extraction: ExtractionStats,
    baselines: dict[str, int],
    counts: dict[str, int],
) -> dict[str, float]:
    kept = trained.history[trained.kept_epoch - 1]
    metrics: dict[str, float] = {
        "k": extraction.ks[0], "epochs": options.epochs, "kept_epoch": trained.kept_epoch,
        "train_loss": kept.train_loss, "train_images": counts["train"], "val_images": counts["val"],
        "test_images": counts["test"], "num_classes": edge.num_classes, "seed": options.seed, "lr": options.lr,
        "weight_decay": options.weight_decay, "batch_size": options.batch_size,
        "parameters": trainable_parameters(edge), "macs_per_image": macs_per_image(edge),
        "train_seconds": trained.seconds, "bytes_per_image": extraction.bytes_per_image_by_k[extraction.ks[0]],
    }  # fmt: skip
    for split, scores in scored.items():
        metrics.update({f"{split}_miou": scores.scores.miou, f"{split}_pixel_accuracy": scores.scores.pixel_accuracy,
                        f"{split}_loss": scores.loss})  # fmt: skip
    for method, size in baselines.items():
        metrics[f"{method}_bytes_per_image"] = size
    return {key: float(value) for key, value in metrics.items() if math.isfinite(float(value))}


# ---------------------------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class SegmentationEvaluation:
    """`mist evaluate` of a segmentation version on a layout."""

    task: str
    version: int
    split: str  # "training", "validation" or "all"
    label_size: int
    class_names: tuple[str, ...]
    result: DenseScores

    def to_dict(self) -> dict[str, object]:
        return {"kind": "segmentation", "task": self.task, "version": self.version, "split": self.split,
                "label_size": self.label_size, **self.result.to_dict(self.class_names)}  # fmt: skip

    def summary(self) -> str:
        scores = self.result.scores
        lines = [f"task {self.task} version {self.version} on {self.result.images} images ({self.split}, "
                 f"{self.label_size}x{self.label_size} labels): mIoU {scores.miou:.3f}, pixel accuracy "
                 f"{scores.pixel_accuracy:.3f}"]  # fmt: skip
        width = max(len(name) for name in self.class_names)
        lines.append(f"  {'class':<{width}} {'IoU':>6} {'acc':>6} {'pixels':>9}")
        for name, iou, accuracy, pixels in zip(self.class_names, scores.iou, scores.accuracy,
                                               self.result.confusion.sum(axis=1), strict=True):  # fmt: skip
            shown = [("     -" if value is None else f"{value:6.3f}") for value in (iou, accuracy)]
            lines.append(f"  {name:<{width}} {shown[0]} {shown[1]} {int(pixels):9d}")
        return "\n".join(lines)


def _segmentation_spec(loaded: object) -> tuple[Task, SegmentationSpec]:
    task = loaded.task  # type: ignore[attr-defined]
    if task.kind != "segmentation" or task.segmentation is None:
        raise FailedPreconditionError(f"task {task.name!r} is a {task.kind} task, not a segmentation task")
    return task, task.segmentation


def evaluate_segmentation(
    loaded: object,
    extractor: ExtractorClient,
    path: str | Path,
    *,
    split: str = "auto",
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> SegmentationEvaluation:
    """Score a stored segmentation version (a predict.LoadedVersion) on a layout at the task's label grid.

    split: auto (validation when there is one, else training), all, train (images/training) or val / test (both
    mean images/validation)."""
    task, spec = _segmentation_spec(loaded)
    data = load_segmentation_dataset(path, class_names=task.class_names, ignore_index=spec.ignore_index)
    chosen = {"auto": "validation" if data.split("validation") else "training", "all": "all", "train": "training",
              "val": "validation", "test": "validation"}.get(split)  # fmt: skip
    if chosen is None:
        raise InvalidArgumentError(f"split must be auto, all, train, val or test, got {split!r}")
    items = list(data.items) if chosen == "all" else data.split(chosen)
    if not items:
        raise InvalidArgumentError(f"{path} has no {chosen} images")
    num_classes, size = len(task.class_names), spec.label_size
    grid = task.edge_config().grid
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum = pixels = 0.0
    failed = []
    results = extractor.extract((ImageItem(f"{i.split}/{i.name}", i.image.read_bytes()) for i in items),
                                mode="mist", ks=(loaded.k,), codec=loaded.codec,  # type: ignore[attr-defined]
                                expect_backbone=task.backbone, max_in_flight=max_in_flight)  # fmt: skip
    for item, result in zip(items, results, strict=True):
        if result.error is not None:
            failed.append(f"{item.image} ({result.error.reason})")
            continue
        logits = dense.upsample(loaded.model.logits(decode_feature(result.features[0])), grid, (size, size))[0]  # type: ignore[attr-defined]
        target = read_mask(item, size)
        kept = target != spec.ignore_index
        shifted = logits - logits.max(axis=0, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=0, keepdims=True))
        rows, cols = np.nonzero(kept)
        loss_sum -= float(log_probs[target[kept].astype(np.int64), rows, cols].sum())
        pixels += int(kept.sum())
        matrix += confusion(logits.argmax(0), target, num_classes=num_classes, ignore_index=spec.ignore_index)
    if failed:
        more = f" and {len(failed) - _MAX_NAMED} more" if len(failed) > _MAX_NAMED else ""
        raise InvalidArgumentError(f"{len(failed)} image(s) of {path} could not be scored: "
                                   f"{', '.join(failed[:_MAX_NAMED])}{more}")  # fmt: skip
    scores = DenseScores(len(items), loss_sum / max(pixels, 1.0), segmentation_scores(matrix), matrix)
    return SegmentationEvaluation(task.name, loaded.version.number, chosen, size, task.class_names, scores)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- predict


@dataclass(frozen=True)
class Segmented:
    """The answer for one image: where its label map (and overlay) went and how much of it each class covers."""

    item_id: str
    version: int
    labels: str = ""  # the label PNG written (class ids, the image's size)
    overlay: str = ""  # the colour overlay written, "" unless asked for
    width: int = 0
    height: int = 0
    classes: dict[str, float] = field(default_factory=dict)  # class -> share of the pixels, largest first
    error_code: str = ""
    error_reason: str = ""
    error_message: str = ""
    feature_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.error_code

    def to_dict(self, id_key: str = "item") -> dict[str, object]:
        if not self.ok:
            return {id_key: self.item_id, "version": self.version, "error": {"code": self.error_code,
                    "reason": self.error_reason, "message": self.error_message}}  # fmt: skip
        answer: dict[str, object] = {id_key: self.item_id, "version": self.version, "labels": self.labels,
                                     "width": self.width, "height": self.height, "classes": self.classes}  # fmt: skip
        if self.overlay:
            answer["overlay"] = self.overlay
        return answer


class OutputNames:
    """File names for label maps under one folder: <stem>.labels.png (and <stem>.overlay.png), made unique within a
    run (<stem>-2.labels.png ...) so two inputs never overwrite each other, and never an input file itself."""

    def __init__(self, directory: str | Path, inputs: Iterable[Path] = ()) -> None:
        self.directory = Path(directory)
        self._taken: set[str] = set()
        self._inputs = {path.resolve() for path in inputs}

    def protect(self, path: Path) -> None:
        """Never name an output `path` (an input read later, e.g. from stdin)."""
        self._inputs.add(path.resolve())

    def next(self, source: str) -> tuple[Path, Path]:
        stem, number = Path(source).stem or "image", 1
        while True:
            name = stem if number == 1 else f"{stem}-{number}"
            labels, overlay = self.directory / f"{name}.labels.png", self.directory / f"{name}.overlay.png"
            if (
                name not in self._taken
                and labels.resolve() not in self._inputs
                and overlay.resolve() not in self._inputs
            ):
                self._taken.add(name)
                return labels, overlay
            number += 1


def _picture(data: bytes) -> Image.Image:
    """The image as the extractor sees it (EXIF orientation applied), RGB."""
    with Image.open(io.BytesIO(data)) as opened:
        return ImageOps.exif_transpose(opened).convert("RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def segment_items(
    loaded: object,
    extractor: ExtractorClient,
    items: Iterable[ImageItem],
    *,
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    overlay: bool = False,
    names: OutputNames | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> Iterator[Segmented]:
    """One answer per item, in order: its label map written as an 8-bit PNG (16-bit past 256 classes) of class ids
    at the image's own size under `output_dir` (made when missing), plus a colour overlay with `overlay`. An image
    the extractor refuses gets an error and the rest go on."""
    from services.tuner.predict import _failed

    task, _ = _segmentation_spec(loaded)
    grid, class_names = task.edge_config().grid, task.class_names
    names = names or OutputNames(output_dir)
    names.directory.mkdir(parents=True, exist_ok=True)
    pending: collections.deque[bytes] = collections.deque()  # answers come in request order; ids may repeat

    def remembered(source: Iterable[ImageItem]) -> Iterator[ImageItem]:
        for item in source:
            pending.append(item.image)
            yield item

    version = loaded.version.number  # type: ignore[attr-defined]
    results = extractor.extract(remembered(items), mode="mist", ks=(loaded.k,), codec=loaded.codec,  # type: ignore[attr-defined]
                                expect_backbone=task.backbone, max_in_flight=max_in_flight)  # fmt: skip
    for result in results:
        data = pending.popleft()
        if result.error is not None:
            failed = _failed(result.item_id, version, result.error)
            yield Segmented(result.item_id, version, error_code=failed.error_code, error_reason=failed.error_reason,
                            error_message=failed.error_message)  # fmt: skip
            continue
        picture = _picture(data)
        width, height = picture.size
        logits = loaded.model.logits(decode_feature(result.features[0]))[0]  # type: ignore[attr-defined]
        labels = dense.label_map(logits, grid, (height, width))
        labels_path, overlay_path = names.next(result.item_id)
        mode = "L" if labels.dtype == np.uint8 else "I;16"
        write_atomically(labels_path, _png(Image.fromarray(labels, mode)))
        if overlay:
            write_atomically(overlay_path, _png(dense.overlay(picture, labels)))
        counts = np.bincount(labels.ravel(), minlength=len(class_names))
        shares = {class_names[i]: round(float(counts[i]) / labels.size, 4) for i in np.argsort(-counts, kind="stable")
                  if counts[i]}  # fmt: skip
        yield Segmented(result.item_id, version, labels=str(labels_path), overlay=str(overlay_path) if overlay else "",
                        width=width, height=height, classes=shares,
                        feature_bytes=result.features[0].ByteSize())  # fmt: skip


def segment_files(
    loaded: object,
    extractor: ExtractorClient,
    files: Sequence[Path],
    *,
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    overlay: bool = False,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> Iterator[Segmented]:
    """segment_items over files, read one at a time, named by path; an output never replaces one of the inputs."""
    from services.tuner.predict import file_items

    names = OutputNames(output_dir, files)
    return segment_items(loaded, extractor, file_items(files), output_dir=output_dir, overlay=overlay, names=names,
                         max_in_flight=max_in_flight)  # fmt: skip
