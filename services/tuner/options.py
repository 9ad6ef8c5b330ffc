"""The tuner's typed options, without torch: what one training run, one tune and the demo take. Every `setting`
field is a flag of `mist tune` / `mist demo` and a MIST_* variable; each default is written here once.

    options = TuneOptions(task="shapes", epochs=10, alias="production")
    options.train_config()   # the TrainConfig of its final run
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from services.common.checks import check_int, check_number
from services.common.clients.extractor import DEFAULT_MAX_IN_FLIGHT
from services.common.config import ConfigBase, setting
from services.common.errors import InvalidArgumentError
from services.common.wire.codec import DEFAULT_CODEC, CodecConfig
from services.common.wire.edge_spec import READOUT_RANK, Pooling

DEFAULT_CODEC_NAME = DEFAULT_CODEC.name  # i8o-zstd: 4x smaller than float32, outlier channels kept (docs: codecs)
DEFAULT_RANK = 16  # the paper's r for D = 768; capped at D for narrow backbones
# What a tune writes into a version's safetensors metadata, and predict reads back (before tags and metrics).
METADATA_K, METADATA_CODEC, METADATA_CLASSES = "mist.k", "mist.codec", "mist.class_names"
METADATA_BACKBONE, METADATA_BACKBONE_FINGERPRINT = "mist.backbone", "mist.backbone_fingerprint"
Runtime = Literal["numpy", "torch"]  # what runs a stored edge network to predict (services/tuner/predict.py)

Keep = Literal["best", "final"]
# Autograd keeps about a dozen [b, T, D] maps alive per forward/backward of the 4-block network; capping one
# map at 4 MiB keeps training activations near 60 MB at ViT-B geometry (measured: batch 32 in one chunk needs
# 235 MB, before allocator fragmentation).
MICRO_BATCH_MAP_BYTES = 4 << 20


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run (validated on construction)."""

    epochs: int = 30  # passes over the train split; the paper runs 100 (VTAB-1k), a third of that suits a device
    batch_size: int = 32  # the paper's Raspberry Pi run uses 32 (its recipe: 32-64)
    lr: float = 1e-3  # AdamW peak learning rate, reached after warm-up (the recipe: about 1e-3, per task)
    weight_decay: float = 1e-4  # AdamW decoupled decay on weight matrices only, not biases or LayerNorm
    warmup_epochs: int | None = None  # linear warm-up length; None: 10 % of epochs (the paper: 10 of 100)
    min_lr: float = 0.0  # where the cosine ends at the last step
    seed: int = 0  # initialisation and batch order: the same seed and inputs give bitwise the same weights
    label_smoothing: float = 0.0  # cross-entropy label smoothing; the paper uses none
    # Dropout on the token readout's flattened projections (pooling "...+tokens"), training only: measured on the
    # recipe bench, 0.5 kept the natural-image task at +0.5 points while the readout beat a pixel logistic
    # regression on fine strokes by 6 (docs/explanation/recipe.md).
    readout_dropout: float = 0.5
    grad_clip_norm: float | None = None  # clip the global gradient norm to this; None (the paper) does not clip
    keep: Keep = "best"  # weights returned: the epoch with the best val accuracy, or the last epoch
    micro_batch_size: int | None = None  # images per forward/backward; None: see micro_batch_for (memory cap)

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("seed", self.seed, minimum=0)
        if self.warmup_epochs is not None:
            check_int("warmup_epochs", self.warmup_epochs, minimum=0)
            if self.warmup_epochs >= self.epochs:
                raise InvalidArgumentError(
                    f"warmup_epochs ({self.warmup_epochs}) must be less than epochs ({self.epochs})"
                )
        check_number("lr", self.lr, above=0.0)
        check_number("weight_decay", self.weight_decay, minimum=0.0)
        check_number("min_lr", self.min_lr, minimum=0.0)
        if self.min_lr > self.lr:
            raise InvalidArgumentError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        check_number("label_smoothing", self.label_smoothing, minimum=0.0, below=1.0)
        check_number("readout_dropout", self.readout_dropout, minimum=0.0, below=1.0)
        if self.grad_clip_norm is not None:
            check_number("grad_clip_norm", self.grad_clip_norm, above=0.0)
        if self.micro_batch_size is not None:
            check_int("micro_batch_size", self.micro_batch_size, minimum=1)
        if self.keep not in ("best", "final"):
            raise InvalidArgumentError(f"keep must be 'best' or 'final', got {self.keep!r}")

    @property
    def resolved_warmup_epochs(self) -> int:
        """warmup_epochs, or 10 % of epochs rounded half up when unset (0 for fewer than 5 epochs)."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return min(self.epochs - 1, math.floor(self.epochs * 0.1 + 0.5))

    def micro_batch_for(self, tokens: int, dims: int) -> int:
        """Images per forward/backward chunk: micro_batch_size, else as many as keep one [b, T, D] float32
        map within MICRO_BATCH_MAP_BYTES (6 at ViT-B/16 geometry), at most batch_size.

        Gradients accumulate over the chunks of a batch, so the update is the batch's up to float rounding,
        while activation memory scales with the chunk: that is what keeps a device under 500 MB.
        """
        if self.micro_batch_size is not None:
            return min(self.micro_batch_size, self.batch_size)
        return max(1, min(self.batch_size, MICRO_BATCH_MAP_BYTES // (4 * tokens * dims)))


def _check_codec(name: str) -> str:
    CodecConfig.parse(name)  # raises InvalidArgumentError naming the codecs there are
    return name


@dataclass(frozen=True, kw_only=True)
class TrainingFlags(ConfigBase):
    """How features are fetched and an edge network is trained: the flags `mist tune` and `mist reproduce` share.

    Every `setting` is a flag (and a MIST_* variable); training defaults are TrainConfig's.
    """

    k: int | None = setting(
        None,
        help="gather depth, or auto: the best of N/4, N/2, 3N/4, N on the val split",
        minimum=1,
        none_words=("auto",),
        shown="auto",
        metavar="auto|N",
    )
    codec: str | None = setting(
        None,
        help="feature codec, e.g. i8o-zstd, i4-zstd, i8-zstd, f16-zstd, f32-none",
        shown=f"the task's, else {DEFAULT_CODEC_NAME}",
        parser=_check_codec,
        metavar="NAME",
    )
    epochs: int = setting(TrainConfig.epochs, help="training epochs of the final run", metavar="N")
    k_search_epochs: int | None = setting(
        None,
        help="epochs per candidate with --k auto",
        shown="a fifth of --epochs, at least 2",
        minimum=1,
        none_words=("", "auto", "default"),
        metavar="N",
    )
    batch_size: int = setting(TrainConfig.batch_size, help="images per optimizer step", metavar="N")
    lr: float = setting(
        TrainConfig.lr, help="AdamW peak learning rate (cosine schedule after a linear warm-up)", metavar="RATE"
    )
    weight_decay: float = setting(
        TrainConfig.weight_decay, help="AdamW decoupled weight decay (weight matrices only)", metavar="RATE"
    )
    warmup_epochs: int | None = setting(
        TrainConfig.warmup_epochs,
        help="linear warm-up epochs",
        shown="10% of --epochs",
        minimum=0,
        none_words=("", "auto", "default"),
        metavar="N",
    )
    seed: int = setting(
        TrainConfig.seed,
        help="seed of the initialisation, the batch order and the split: same inputs, same weights",
        minimum=0,
        metavar="N",
    )
    num_blocks: int | None = setting(
        None, help="edge network blocks M", minimum=1, shown="the task's, else 4", metavar="M"
    )
    rank: int | None = setting(
        None, help="edge network rank r", minimum=1, shown=f"the task's, else min({DEFAULT_RANK}, D)", metavar="R"
    )
    heads: int | None = setting(
        None, help="attention heads in the rank-r space", minimum=1, shown="the task's, else 1", metavar="N"
    )
    pooling: Pooling | None = setting(
        None,
        help="what the head reads: the class token (cls), the mean of the tokens (mean), and with +tokens also a "
        f"rank-{READOUT_RANK} readout of every token; dense (every token, segmentation data)",
        shown="the task's, else cls+tokens (mean+tokens without a class token); dense for segmentation",
    )
    # Not flags: the connection settings and the caller fill these.
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT  # images sent to the extractor and not yet answered
    extract_attempts: int = 3  # passes over the missing images when the extractor stays unreachable

    def check(self) -> None:
        super().check()
        for name in ("max_in_flight", "extract_attempts"):
            check_int(name, getattr(self, name), minimum=1)
        self.train_config()  # validates the training hyperparameters now, before any network traffic

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs,
            seed=self.seed,
        )


@dataclass(frozen=True, kw_only=True)
class TuneOptions(TrainingFlags):
    """One tune: which task, how to fetch features (TrainingFlags), how to train, what to do with the result.

    Every `setting` is a flag of `mist tune` (and a MIST_* variable); training defaults are TrainConfig's.
    """

    task: str = setting(help="registry task; created on success when it does not exist", metavar="NAME")
    val_fraction: float = setting(
        0.2, help="share of each class's unsplit images kept for validation", metavar="FRACTION"
    )
    test_fraction: float = setting(
        0.0, help="share of each class's unsplit images kept for the test score", metavar="FRACTION"
    )
    alias: str | None = setting(
        None, help="move this alias (e.g. production) to the new version on success", metavar="NAME"
    )
    description: str = setting("", help="description of the task when this tune creates it", metavar="TEXT")
    label_size: int | None = setting(
        None,
        help="segmentation data: side of the square label grid training and scoring use",
        minimum=1,
        shown="the task's, else the input size / 8",
        metavar="N",
    )
    force: bool = setting(False, help="push even when the task gained a newer version during this tune")
    skip_unreadable: bool = setting(
        False,
        help="tune on the other images when some are unreadable, empty or undecodable (else every one is named and "
        "nothing is pushed); the skipped ones are listed in the output and the version's details",
    )
    tuner: str = ""  # not a flag: identity recorded in the lineage; "" = tuner_identity()

    def check(self) -> None:
        super().check()
        if not self.task.strip():
            raise InvalidArgumentError("a task name is required")
        if self.alias is not None and not self.alias.strip():
            raise InvalidArgumentError("alias must not be empty")
        for name in ("val_fraction", "test_fraction"):
            check_number(name, getattr(self, name), minimum=0.0, below=1.0)
        if self.val_fraction + self.test_fraction >= 1:
            raise InvalidArgumentError("val_fraction + test_fraction must leave images to train on")


@dataclass(frozen=True, kw_only=True)
class DemoOptions(ConfigBase):
    """What `mist demo` does (every field is a flag of `mist demo`)."""

    workdir: str = setting(
        "var/demo", help="where the demo keeps its dataset, registry database and logs", metavar="DIR"
    )
    epochs: int = setting(TrainConfig.epochs, help="training epochs of the final run (at least 2)", metavar="N")
    seed: int = setting(0, help="seed of the dataset, the split and the training", metavar="N")
    worker: bool = setting(True, help="also show the tuner worker: predict through its gRPC Predict")
    task: Literal["classification", "segmentation"] = setting(
        "classification",
        help="the job shown: classification on a ViT, or segmentation on a pvt_v2 (label maps, mIoU, the bytes of "
        "every stage against the aggregate)",
    )

    def check(self) -> None:
        super().check()
        check_int("epochs", self.epochs, minimum=2)  # the k search trains a fifth of them, at least 2
        check_int("seed", self.seed, minimum=0)
