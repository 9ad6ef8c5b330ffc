"""Scores an edge network: accuracy, per-class accuracy, confusion matrix, loss.

    report = evaluate(model, store, k, store_indices, class_names)      # torch model on a FeatureStore (tuning)
    report = report_from_predictions(Predictions(labels, predicted, loss_sum), class_names)   # any runtime

The report's to_dict() is what the registry keeps in a version's details_json, so it is plain JSON types. Importing
this module loads no torch: a device that only predicts builds its reports with numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from services.common.checks import check_int
from services.common.errors import InvalidArgumentError

if TYPE_CHECKING:  # torch only where a torch model is scored
    from torch import nn

    from services.tuner.feature_store import FeatureStore

DEFAULT_BATCH_SIZE = 32  # forward-only batches: peak memory grows with it, speed barely does past 32


@dataclass(frozen=True)
class Predictions:
    """Raw outcome of running a model over some stored images."""

    labels: np.ndarray  # int64 [n]: the true label of each image, in the order scored
    predicted: np.ndarray  # int64 [n]: argmax of the logits
    loss_sum: float  # summed (not mean) cross-entropy over the n images

    @property
    def count(self) -> int:
        return len(self.labels)

    @property
    def accuracy(self) -> float:
        return float((self.labels == self.predicted).mean()) if self.count else 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else 0.0


@dataclass(frozen=True)
class EvaluationReport:
    """How well a model classifies one split."""

    class_names: tuple[str, ...]  # label index -> name; rows and columns of the confusion matrix
    count: int  # images scored
    accuracy: float  # fraction correct over all images
    balanced_accuracy: float  # mean of the per-class accuracies of the classes present
    loss: float  # mean cross-entropy (natural log)
    per_class_accuracy: tuple[float | None, ...]  # per label; None for a class with no images here
    confusion_matrix: tuple[tuple[int, ...], ...]  # [true][predicted] counts; rows sum to the class counts

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly: per-class accuracy keyed by class name, the matrix as a list of lists."""
        return {
            "count": self.count,
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "loss": self.loss,
            "class_names": list(self.class_names),
            "per_class_accuracy": dict(zip(self.class_names, self.per_class_accuracy, strict=True)),
            "confusion_matrix": [list(row) for row in self.confusion_matrix],
        }


def collect_predictions(
    model: nn.Module, store: FeatureStore, k: int, indices: Sequence[int], *, batch_size: int = DEFAULT_BATCH_SIZE
) -> Predictions:
    """Run `model` over the stored k features of `indices`, decoding one batch at a time."""
    import torch
    import torch.nn.functional as F

    check_int("batch_size", batch_size, minimum=1)
    positions = list(indices)
    labels, predicted = [], []
    loss_sum = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(positions), batch_size):
                features, batch_labels = store.batch(positions[start : start + batch_size], k)
                logits = model(features)
                loss_sum += float(F.cross_entropy(logits, batch_labels, reduction="sum"))
                labels.append(batch_labels.numpy())
                predicted.append(logits.argmax(dim=1).numpy())
    finally:
        model.train(was_training)
    empty = np.zeros(0, dtype=np.int64)
    return Predictions(
        labels=np.concatenate(labels) if labels else empty,
        predicted=np.concatenate(predicted) if predicted else empty,
        loss_sum=loss_sum,
    )


def report_from_predictions(predictions: Predictions, class_names: Sequence[str]) -> EvaluationReport:
    """Accuracy, per-class accuracy and the confusion matrix of `predictions` (pure numpy)."""
    names = tuple(class_names)
    size = len(names)
    for what, values in (("labels", predictions.labels), ("predictions", predictions.predicted)):
        if len(values) and not (0 <= values.min() and values.max() < size):
            raise InvalidArgumentError(f"{what} fall outside the {size} classes {list(names)}")
    matrix = np.zeros((size, size), dtype=np.int64)
    np.add.at(matrix, (predictions.labels, predictions.predicted), 1)
    totals = matrix.sum(axis=1)
    per_class = tuple(float(matrix[c, c] / totals[c]) if totals[c] else None for c in range(size))
    present = [value for value in per_class if value is not None]
    return EvaluationReport(
        class_names=names,
        count=predictions.count,
        accuracy=predictions.accuracy,
        balanced_accuracy=float(np.mean(present)) if present else 0.0,
        loss=predictions.loss,
        per_class_accuracy=per_class,
        confusion_matrix=tuple(tuple(int(n) for n in row) for row in matrix),
    )


def evaluate(
    model: nn.Module,
    store: FeatureStore,
    k: int,
    indices: Sequence[int],
    class_names: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> EvaluationReport:
    """Score `model` on the stored k features of `indices` (e.g. the test split)."""
    if len(class_names) != store.num_classes:
        raise InvalidArgumentError(f"got {len(class_names)} class names for a store of {store.num_classes} classes")
    if not len(indices):
        raise InvalidArgumentError("evaluation needs at least one image")
    return report_from_predictions(collect_predictions(model, store, k, indices, batch_size=batch_size), class_names)
