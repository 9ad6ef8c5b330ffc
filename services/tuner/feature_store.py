"""Gathered features of a labelled image set, kept compressed in memory and decoded one batch at a time.

This is what lets a device with a few hundred MB train on 800 images of [197, 768] features: float32 they
would take 484 MB, i8-zstd messages about a quarter of that, and only the current batch is ever float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from services.common.checks import check_int
from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.codec import decode_feature
from services.common.wire.gather_modes import BackboneId
from services.tuner.data import SPLITS, Dataset, Split

# Message modes that carry a MIST gathered feature; servers treat UNSPECIFIED as MIST (feature.proto).
_MIST_MODES = frozenset({feature_pb2.GATHER_MODE_MIST, feature_pb2.GATHER_MODE_UNSPECIFIED})


class FeatureStore:
    """Per image index and k, the encoded FeatureTensor; plus each image's label and split.

    Messages are kept as given, not re-serialized: measured on 800 x 4 parsed ExtractResponse features of
    60.9 KB each, holding the messages cost 61.8 KB of RSS per feature and holding `SerializeToString()`
    bytes 68.2 KB (the transient copies fragment the heap), and messages need no parsing per batch.
    A message that is part of a larger one (ExtractResponse.features[i]) keeps its parent alive, which
    costs nothing extra for extractor responses: they hold only features. Every feature must come from the
    same backbone and have the same [T, D] shape. Not thread-safe: add from one thread at a time.
    """

    def __init__(
        self,
        labels: Sequence[int],
        *,
        num_classes: int,
        splits: Sequence[Split] | None = None,
        backbone: BackboneId | feature_pb2.BackboneId | None = None,
        verify: bool = True,
    ) -> None:
        """`backbone`: the one the task was trained on (None: the first feature added fixes it).
        `verify`: decode every feature on add, so a corrupt one fails during extraction, where it can be
        fetched again, rather than in the middle of training.
        """
        check_int("num_classes", num_classes, minimum=2)
        bad = [
            label
            for label in labels
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes
        ]
        if bad:
            raise InvalidArgumentError(f"labels must be integers in [0, {num_classes}), got {bad[:5]}")
        if splits is not None and len(splits) != len(labels):
            raise InvalidArgumentError(f"got {len(splits)} splits for {len(labels)} labels")
        if splits is not None and any(split not in SPLITS for split in splits):
            raise InvalidArgumentError(f"splits must be among {SPLITS}")
        self._labels = [int(label) for label in labels]
        self._splits: tuple[Split, ...] = tuple(splits) if splits is not None else ("train",) * len(labels)
        self.num_classes = num_classes
        self._verify = verify
        self._backbone = None if backbone is None else BackboneId.from_proto(backbone)
        self._shape: tuple[int, int] | None = None
        self._features: dict[tuple[int, int], feature_pb2.FeatureTensor] = {}
        self._sizes: dict[tuple[int, int], int] = {}

    @classmethod
    def for_dataset(
        cls, dataset: Dataset, *, backbone: BackboneId | feature_pb2.BackboneId | None = None, verify: bool = True
    ) -> FeatureStore:
        """An empty store whose index i is dataset.items[i]."""
        return cls(
            dataset.labels(),
            num_classes=len(dataset.class_names),
            splits=[item.split for item in dataset.items],
            backbone=backbone,
            verify=verify,
        )

    # ------------------------------------------------------------------------------------------ describing

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> list[int]:
        return list(self._labels)

    @property
    def feature_shape(self) -> tuple[int, int] | None:
        """(T, D) of every feature, None before the first add."""
        return self._shape

    @property
    def backbone(self) -> BackboneId | None:
        return self._backbone

    @property
    def ks(self) -> list[int]:
        """Every k with at least one feature, ascending."""
        return sorted({k for _, k in self._features})

    def indices(self, split: Split) -> list[int]:
        return [i for i, s in enumerate(self._splits) if s == split]

    def has(self, index: int, k: int) -> bool:
        return (index, k) in self._features

    def missing(self, indices: Iterable[int], ks: Iterable[int]) -> list[int]:
        """The indices (in the order given, once each) lacking a feature for at least one of `ks`.

        The extractor computes every requested k in one pass, so resuming re-sends these images with all ks.
        """
        wanted = list(ks)
        result = []
        for index in dict.fromkeys(int(i) if isinstance(i, np.integer) else i for i in indices):
            self._check_index(index)
            if any((index, k) not in self._features for k in wanted):
                result.append(index)
        return result

    def compressed_bytes(self, k: int | None = None) -> int:
        """Wire bytes of the features held (serialized message sizes), for one k or all."""
        return sum(size for (_, key), size in self._sizes.items() if k is None or key == k)

    def bytes_per_image(self, k: int | None = None) -> float:
        """Mean wire bytes per image: of its k feature, or (k None) of all its features together."""
        images = {index for index, key in self._sizes if k is None or key == k}
        return self.compressed_bytes(k) / len(images) if images else 0.0

    def float32_bytes_per_image(self) -> int:
        """What one feature costs as plain float32 (the paper's unit): 605,184 bytes for [197, 768]."""
        return 0 if self._shape is None else 4 * self._shape[0] * self._shape[1]

    # ----------------------------------------------------------------------------------------- adding

    def add(self, index: int, k: int, msg: feature_pb2.FeatureTensor) -> None:
        """Keep `msg` (by reference) as image `index`'s feature for `k`; replaces an earlier one.

        A feature from another backbone, of another shape, or not a MIST gather -> FailedPreconditionError;
        msg.k other than `k` -> InvalidArgumentError; a corrupt payload (verify on) -> FeatureDecodeError.
        """
        self._check_index(index)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")
        if msg.mode not in _MIST_MODES:
            mode = feature_pb2.GatherMode.Name(msg.mode) if msg.mode in feature_pb2.GatherMode.values() else msg.mode
            raise FailedPreconditionError(f"image {index}: edge networks train on MIST gathers, got a {mode} feature")
        if msg.k != k:
            raise InvalidArgumentError(f"image {index}: the feature says k={msg.k} but it was added as k={k}")
        self._check_backbone(index, msg.backbone)
        self._check_shape(index, tuple(msg.shape))
        index = int(index)  # numpy integers hash alike but print and serialise differently
        if self._verify:
            decode_feature(msg)
        if self._backbone is None:
            self._backbone = BackboneId.from_proto(msg.backbone)
        if self._shape is None:
            self._shape = (int(msg.shape[0]), int(msg.shape[1]))
        self._features[(index, k)] = msg
        self._sizes[(index, k)] = msg.ByteSize()

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self._labels):
            raise InvalidArgumentError(f"image index must be an integer in [0, {len(self._labels)}), got {index!r}")

    def _check_backbone(self, index: int, backbone: feature_pb2.BackboneId) -> None:
        expected = self._backbone
        if expected is None or (backbone.name, backbone.weights_fingerprint) == (
            expected.name,
            expected.weights_fingerprint,
        ):
            return
        raise FailedPreconditionError(
            f"image {index}: feature from backbone {BackboneId.from_proto(backbone)}, but this store holds features of "
            f"{expected}: features of different weights must never be mixed"
        )

    def _check_shape(self, index: int, shape: tuple[int, ...]) -> None:
        if len(shape) != 2 or min(shape) < 1:
            raise FailedPreconditionError(f"image {index}: expected a [tokens, dims] feature, got shape {list(shape)}")
        if self._shape is not None and shape != self._shape:
            raise FailedPreconditionError(
                f"image {index}: feature shape {list(shape)} differs from the store's {list(self._shape)}"
            )

    # ---------------------------------------------------------------------------------------- reading

    def batch(self, indices: Sequence[int] | torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 features [B, T, D], int64 labels [B]) for `indices`, decoded now and only these."""
        positions = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        if not positions:
            raise InvalidArgumentError("a batch needs at least one index")
        for index in positions:
            self._check_index(index)
        absent = [index for index in positions if (index, k) not in self._features]
        if absent:
            raise FailedPreconditionError(
                f"no k={k} feature for {len(absent)} image(s) of the batch (first: {absent[:5]}): extraction is incomplete"
            )
        tokens, dims = self._shape  # type: ignore[misc]  # set by the first add, which `absent` proved happened
        features = torch.empty((len(positions), tokens, dims), dtype=torch.float32)
        for row, index in enumerate(positions):
            features[row] = torch.from_numpy(decode_feature(self._features[(index, k)]))
        labels = torch.tensor([self._labels[index] for index in positions], dtype=torch.int64)
        return features, labels
