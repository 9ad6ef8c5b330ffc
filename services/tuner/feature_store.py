"""Gathered features of a labelled image set, kept compressed on disk and decoded one micro-batch at a time.

This is what lets a device with a few hundred MB train on 800 images of [197, 768] features: float32 they
would take 484 MB, i8-zstd messages about a quarter of that, and only the current batch is ever float32. The
compressed messages live in an unlinked temporary file, not in the Python heap, so they cost page cache (which
the kernel may drop and re-read) rather than resident memory; the heap holds only an index of a few bytes per
feature.

    with FeatureStore(labels, num_classes=10) as store:   # the file is gone when the block ends, error or not
        store.add(0, 12, message)
        features, labels = store.batch([0], 12)
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

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
_ABSENT = -1  # offset of a feature the store does not hold
_COPY_CHUNK_BYTES = 1 << 20  # keep_only copies the kept records through a buffer of at most this size


class FeatureStore:
    """Per image index and k, the serialized FeatureTensor; plus each image's label and split.

    Each added message is serialized once and appended to an unlinked temporary file (`directory`, default
    the system's temp dir: $TMPDIR, else /tmp); per k, two int64 arrays hold every image's (offset, length).
    `batch` reads only the batch's records back, parses and decodes them (figures: docs/explanation/architecture.md).
    Where the temp dir is a tmpfs (RAM), point `directory` or $TMPDIR at real storage, or the bytes only move from
    the process to the tmpfs.

    Close the store (`close()` or `with`) to release the file; one never closed is released when it is
    garbage-collected. Being unlinked from the start, the file leaves nothing on disk even if the process is
    killed. Every feature must come from the same backbone and have the same [T, D] shape. Not thread-safe:
    add from one thread at a time.
    """

    def __init__(
        self,
        labels: Sequence[int],
        *,
        num_classes: int,
        splits: Sequence[Split] | None = None,
        backbone: BackboneId | feature_pb2.BackboneId | None = None,
        verify: bool = True,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        """`backbone`: the one the task was trained on (None: the first feature added fixes it).
        `verify`: decode every feature on add, so a corrupt one fails during extraction, where it can be
        fetched again, rather than in the middle of training.
        `directory`: where the temporary file goes (None: tempfile's default); made on the first add.
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
        if directory is not None and not Path(directory).is_dir():
            raise InvalidArgumentError(f"feature store directory {os.fspath(directory)!r} is not a directory")
        self._labels = [int(label) for label in labels]
        self._splits: tuple[Split, ...] = tuple(splits) if splits is not None else ("train",) * len(labels)
        self.num_classes = num_classes
        self._verify = verify
        self._backbone = None if backbone is None else BackboneId.from_proto(backbone)
        self._shape: tuple[int, int] | None = None
        self._directory = None if directory is None else os.fspath(directory)
        # Per k: offset in the file (_ABSENT: not held) and length of each image's serialized message.
        self._offsets: dict[int, np.ndarray] = {}
        self._lengths: dict[int, np.ndarray] = {}
        self._dropped: dict[int, int] = {}  # k dropped by keep_only -> the k kept then
        self._file: BinaryIO | None = None
        self._file_end = 0  # bytes written to the file (held features plus replaced ones)
        self._release: weakref.finalize | None = None  # closes the file, at close() or garbage collection
        self._closed = False

    @classmethod
    def for_dataset(
        cls,
        dataset: Dataset,
        *,
        backbone: BackboneId | feature_pb2.BackboneId | None = None,
        verify: bool = True,
        directory: str | os.PathLike[str] | None = None,
    ) -> FeatureStore:
        """An empty store whose index i is dataset.items[i]."""
        return cls(
            dataset.labels(),
            num_classes=len(dataset.class_names),
            splits=[item.split for item in dataset.items],
            backbone=backbone,
            verify=verify,
            directory=directory,
        )

    # ------------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Release the temporary file (and its disk space); idempotent. Reading or adding afterwards fails."""
        self._closed = True
        if self._release is not None:
            self._release()
        self._file = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def file_bytes(self) -> int:
        """Bytes in the temporary file now: the held features plus any replaced by a later add."""
        return self._file_end

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
        return sorted(k for k, offsets in self._offsets.items() if (offsets != _ABSENT).any())

    def indices(self, split: Split) -> list[int]:
        return [i for i, s in enumerate(self._splits) if s == split]

    def has(self, index: int, k: int) -> bool:
        offsets = self._offsets.get(k)
        return offsets is not None and 0 <= index < len(offsets) and bool(offsets[index] != _ABSENT)

    def missing(self, indices: Iterable[int], ks: Iterable[int]) -> list[int]:
        """The indices (in the order given, once each) lacking a feature for at least one of `ks`.

        The extractor computes every requested k in one pass, so resuming re-sends these images with all ks.
        """
        wanted = list(ks)
        result = []
        for index in dict.fromkeys(int(i) if isinstance(i, np.integer) else i for i in indices):
            self._check_index(index)
            if not all(self.has(index, k) for k in wanted):
                result.append(index)
        return result

    def compressed_bytes(self, k: int | None = None) -> int:
        """Wire bytes of the features held (serialized message sizes), for one k or all."""
        return sum(int(lengths.sum()) for key, lengths in self._lengths.items() if k is None or key == k)

    def bytes_per_image(self, k: int | None = None) -> float:
        """Mean wire bytes per image: of its k feature, or (k None) of all its features together."""
        held = [offsets != _ABSENT for key, offsets in self._offsets.items() if k is None or key == k]
        images = int(np.logical_or.reduce(held).sum()) if held else 0
        return self.compressed_bytes(k) / images if images else 0.0

    def float32_bytes_per_image(self) -> int:
        """What one feature costs as plain float32 (the paper's unit): 605,184 bytes for [197, 768]."""
        return 0 if self._shape is None else 4 * self._shape[0] * self._shape[1]

    # ----------------------------------------------------------------------------------------- adding

    def add(self, index: int, k: int, msg: feature_pb2.FeatureTensor) -> None:
        """Keep `msg`, serialized into the store's file, as image `index`'s feature for `k`; replaces an earlier one.

        A feature from another backbone, of another shape, or not a MIST gather -> FailedPreconditionError;
        msg.k other than `k` -> InvalidArgumentError; a corrupt payload (verify on) -> FeatureDecodeError.
        """
        self._check_open()
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
        self._put(index, k, msg.SerializeToString())

    def keep_only(self, k: int) -> None:
        """Drop every feature whose k is not `k`, giving their bytes back (the kept ones move to a new file).

        What `--k auto` calls once it has chosen k: the candidates' features are no longer needed. A later
        batch() of a dropped k fails with FailedPreconditionError. No feature of `k` -> FailedPreconditionError.
        """
        self._check_open()
        if k not in self.ks:
            raise FailedPreconditionError(
                f"keep_only({k!r}): the store holds no k={k!r} feature (it holds k={self.ks})"
            )
        for other in [key for key in self._offsets if key != k]:
            del self._offsets[other], self._lengths[other]
            self._dropped[other] = k
        offsets, lengths = self._offsets[k], self._lengths[k]
        if int(lengths.sum()) == self._file_end:
            return  # nothing else was ever written: no copy needed
        old, old_release = self._file, self._release
        self._file, self._release, self._file_end = None, None, 0
        try:
            new_offsets = np.full_like(offsets, _ABSENT)
            for index in np.argsort(offsets, kind="stable"):  # file order: sequential reads
                if offsets[index] != _ABSENT:
                    new_offsets[index] = self._append(_read_at(old, int(offsets[index]), int(lengths[index])))
        except BaseException:
            self.close()  # a half-copied store is of no use: fail loudly on the next read
            raise
        finally:
            if old_release is not None:
                old_release()
            del old
        self._offsets[k] = new_offsets

    def subset(self, indices: Sequence[int], *, directory: str | os.PathLike[str] | None = None) -> FeatureStore:
        """A new store whose index i is this one's indices[i]: labels, splits and every held feature (copied as
        bytes, not parsed). For leaving images out after extraction without holding their messages; close both."""
        positions = [int(i) for i in indices]
        for index in positions:
            self._check_index(index)
        self._check_open()
        other = FeatureStore(
            [self._labels[i] for i in positions],
            num_classes=self.num_classes,
            splits=[self._splits[i] for i in positions],
            backbone=self._backbone,
            verify=self._verify,
            directory=self._directory if directory is None else directory,
        )
        other._shape = self._shape
        try:
            for k, offsets in self._offsets.items():
                lengths = self._lengths[k]
                for new, old in enumerate(positions):
                    if offsets[old] != _ABSENT:
                        other._put(new, k, _read_at(self._file, int(offsets[old]), int(lengths[old])))  # type: ignore[arg-type]
        except BaseException:
            other.close()
            raise
        return other

    def _put(self, index: int, k: int, data: bytes) -> None:
        """Record `data` as the (index, k) feature: over the old record when it fits there, else appended."""
        offsets = self._offsets.get(k)
        if offsets is None:
            offsets = self._offsets[k] = np.full(len(self._labels), _ABSENT, dtype=np.int64)
            self._lengths[k] = np.zeros(len(self._labels), dtype=np.int64)
            self._dropped.pop(k, None)
        lengths = self._lengths[k]
        if offsets[index] != _ABSENT and len(data) <= lengths[index]:
            self._check_open()
            _write_at(self._file, data, int(offsets[index]))  # type: ignore[arg-type]  # has() implies a file
        else:
            offsets[index] = self._append(data)
        lengths[index] = len(data)

    def _append(self, data: bytes) -> int:
        """Write `data` at the end of the file (made now if need be); returns its offset."""
        self._check_open()
        if self._file is None:
            file = tempfile.TemporaryFile(prefix="mist-features-", dir=self._directory, buffering=0)
            self._file, self._release = file, weakref.finalize(self, file.close)
        offset = self._file_end
        _write_at(self._file, data, offset)
        self._file_end += len(data)
        return offset

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPreconditionError("the feature store is closed: its features were released")

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
        self._check_open()
        if k in self._dropped:
            raise FailedPreconditionError(
                f"the k={k} features were dropped when the store kept only k={self._dropped[k]}: batch that k instead"
            )
        absent = [index for index in positions if not self.has(index, k)]
        if absent:
            raise FailedPreconditionError(
                f"no k={k} feature for {len(absent)} image(s) of the batch (first: {absent[:5]}): extraction is incomplete"
            )
        tokens, dims = self._shape  # type: ignore[misc]  # set by the first add, which `absent` proved happened
        features = torch.empty((len(positions), tokens, dims), dtype=torch.float32)
        offsets, lengths = self._offsets[k], self._lengths[k]
        for row, index in enumerate(positions):
            data = _read_at(self._file, int(offsets[index]), int(lengths[index]))  # type: ignore[arg-type]
            features[row] = torch.from_numpy(decode_feature(feature_pb2.FeatureTensor.FromString(data)))
        labels = torch.tensor([self._labels[index] for index in positions], dtype=torch.int64)
        return features, labels

    def message_bytes(self, index: int, k: int) -> bytes:
        """The serialized FeatureTensor held for (index, k), byte for byte as received (what a saved copy keeps)."""
        self._check_index(index)
        self._check_open()
        if not self.has(index, k):
            raise FailedPreconditionError(f"no k={k} feature for image {index}")
        return _read_at(self._file, int(self._offsets[k][index]), int(self._lengths[k][index]))  # type: ignore[arg-type]


def _write_at(file: BinaryIO, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset` (POSIX pwrite: the file position is left alone)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(file.fileno(), view, offset)
        view, offset = view[written:], offset + written


def _read_at(file: BinaryIO, offset: int, length: int) -> bytes:
    """`length` bytes from `offset`; a regular file reads short only at its end, which means it was truncated."""
    data = os.pread(file.fileno(), length, offset)
    if len(data) != length:
        raise FailedPreconditionError(f"the feature store's file ends before byte {offset + length}")
    return data
