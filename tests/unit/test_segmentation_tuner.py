"""The segmentation pipeline's own pieces: the label grid, the training hold-out, output names that never replace an
input, micro-batches within the logits budget, and the dense training loop (learns, is seeded, keeps the best epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common.errors import InvalidArgumentError
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.tuner.options import TrainConfig
from services.tuner.segmentation import (
    OutputNames,
    feature_dataset,
    label_grid,
    micro_batch,
    score_dense,
    train_dense_network,
)
from services.tuner.segmentation_data import load_segmentation_dataset, write_synthetic_segmentation


def test_label_grid_defaults_to_an_eighth_of_the_input_and_stays_within_it() -> None:
    assert label_grid(None, 512) == 64 and label_grid(None, 32) == 4 and label_grid(100, 512) == 100
    for bad in (0, 513):
        with pytest.raises(InvalidArgumentError, match=r"--label-size must be in \[1, 512\]"):
            label_grid(bad, 512)


def test_the_hold_out_is_stable_and_validation_images_are_the_test_split(tmp_path) -> None:
    root = write_synthetic_segmentation(tmp_path / "d", per_split={"training": 40, "validation": 5}, size=32)
    data = load_segmentation_dataset(root)
    first = feature_dataset(data, val_fraction=0.25, seed=0)
    again = feature_dataset(data, val_fraction=0.25, seed=0)
    assert [i.split for i in first.items] == [i.split for i in again.items]
    assert len(first.indices("test")) == 5 and 3 <= len(first.indices("val")) <= 18
    assert all(first.items[i].name.startswith("validation/") for i in first.indices("test"))
    assert [i.split for i in feature_dataset(data, val_fraction=0.25, seed=1).items] != [i.split for i in first.items]
    with pytest.raises(InvalidArgumentError, match="every training image was held out"):
        feature_dataset(data, val_fraction=1.0, seed=0)


def test_output_names_are_unique_and_never_an_input(tmp_path) -> None:
    inputs = [tmp_path / "a.labels.png", tmp_path / "b.png"]
    names = OutputNames(tmp_path, inputs)
    assert names.next(str(tmp_path / "x" / "a.png")) == (tmp_path / "a-2.labels.png", tmp_path / "a-2.overlay.png")
    assert names.next("other/a.png")[0] == tmp_path / "a-3.labels.png"  # same stem in another folder
    assert names.next("b.png")[0] == tmp_path / "b.labels.png"
    names.protect(tmp_path / "c.overlay.png")
    assert names.next("c.jpg")[0] == tmp_path / "c-2.labels.png"


def test_micro_batches_keep_the_label_grid_logits_within_budget() -> None:
    edge = EdgeNetworkConfig(dims=256, tokens=256, num_classes=150, pooling="dense", rank=16)
    assert micro_batch(edge, 64, TrainConfig(batch_size=32)) == 6  # 16 MB / (4 B * 150 * 64 * 64)
    assert micro_batch(edge, 512, TrainConfig(batch_size=32)) == 1
    small = EdgeNetworkConfig(dims=16, tokens=4, num_classes=2, pooling="dense", rank=4)
    assert micro_batch(small, 8, TrainConfig(batch_size=5)) == 5


class _Store:
    """Features in memory, as FeatureStore.batch returns them (the loop reads nothing else)."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features

    def batch(self, indices, k):
        return self.features[list(indices)], torch.zeros(len(indices), dtype=torch.int64)


def _separable(images: int = 24, grid: int = 4, size: int = 8) -> tuple[_Store, np.ndarray, EdgeNetworkConfig]:
    """Tokens whose first dims say their class (0 or 1); masks at twice the grid, 255 on one row."""
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 2, size=(images, grid, grid))
    features = rng.normal(size=(images, grid * grid, 16)).astype(np.float32) * 0.3
    features[..., 0] += 3.0 * classes.reshape(images, -1)
    masks = classes.repeat(size // grid, axis=1).repeat(size // grid, axis=2).astype(np.uint8)
    masks[:, 0, :] = 255
    edge = EdgeNetworkConfig(dims=16, tokens=grid * grid, num_classes=2, pooling="dense", rank=4, num_blocks=1)
    return _Store(torch.from_numpy(features)), masks, edge


def test_dense_training_learns_is_seeded_and_keeps_the_best_epoch() -> None:
    store, masks, edge = _separable()
    config = TrainConfig(epochs=12, lr=1e-2, batch_size=8, seed=3)
    first = train_dense_network(store, 4, masks, edge, config, train_indices=range(16), val_indices=range(16, 24))
    again = train_dense_network(store, 4, masks, edge, config, train_indices=range(16), val_indices=range(16, 24))
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    scores = score_dense(first.model, store, 4, masks, range(16, 24))
    # bilinear upsampling blurs the edges between tokens: 0.89 measured, a constant answer scores under 0.3
    assert scores.scores.miou > 0.8 and scores.confusion.sum() == 8 * 7 * 8  # the 255 row is not scored
    best = max(first.history, key=lambda e: (e.val_miou, -e.val_loss))
    assert first.kept_epoch == best.epoch and len(first.history) == 12
    assert first.history[-1].train_loss < first.history[0].train_loss


def test_dense_training_refuses_a_pooled_network_and_no_images() -> None:
    store, masks, edge = _separable()
    pooled = EdgeNetworkConfig(dims=16, tokens=16, num_classes=2, pooling="mean")
    with pytest.raises(InvalidArgumentError, match="dense edge network"):
        train_dense_network(store, 4, masks, pooled, TrainConfig(epochs=1), train_indices=range(4))
    with pytest.raises(InvalidArgumentError, match="at least one training image"):
        train_dense_network(store, 4, masks, edge, TrainConfig(epochs=1), train_indices=[])
