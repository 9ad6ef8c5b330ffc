"""The dense (segmentation) edge network: per-token logits, the same in torch and numpy, upsampled the same way, and
the numpy helpers a device uses to turn them into label maps, masks and overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from services.common.errors import InvalidArgumentError
from services.common.wire.edge_spec import (
    EdgeNetworkConfig,
    macs_per_image,
    state_shapes,
    trainable_parameters,
)
from services.tuner import dense
from services.tuner.edge_network import EdgeNetwork, dense_logits, to_safetensors_bytes
from services.tuner.edge_numpy import NumpyEdgeNetwork

CONFIG = EdgeNetworkConfig(dims=24, tokens=16, num_classes=5, num_blocks=2, rank=8, heads=2, pooling="dense")


def _trained_like(config: EdgeNetworkConfig) -> EdgeNetwork:
    torch.manual_seed(3)
    model = EdgeNetwork(config, zero_init_proj=False)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def test_dense_config_geometry_and_costs() -> None:
    assert CONFIG.dense and CONFIG.grid == (4, 4) and not CONFIG.token_readout
    pooled = EdgeNetworkConfig(dims=24, tokens=16, num_classes=5, num_blocks=2, rank=8, heads=2, pooling="mean")
    # The same weights as a pooled head; the head runs on every token instead of one vector.
    assert state_shapes(CONFIG) == state_shapes(pooled)
    assert trainable_parameters(CONFIG) == trainable_parameters(pooled)
    assert macs_per_image(CONFIG) - macs_per_image(pooled) == (16 - 1) * 24 * 5
    with pytest.raises(InvalidArgumentError, match="square grid"):
        EdgeNetworkConfig(dims=24, tokens=15, num_classes=5, pooling="dense")


def test_torch_and_numpy_give_the_same_token_logits_and_label_maps() -> None:
    model = _trained_like(CONFIG)
    features = torch.randn(3, 16, 24) * 4
    with torch.no_grad():
        expected = model(features)
    assert expected.shape == (3, 16, 5)
    network, _ = NumpyEdgeNetwork.from_safetensors_bytes(to_safetensors_bytes(model), expected=CONFIG)
    got = network.logits(features.numpy())
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        maps = dense_logits(model, features, (13, 7))
    np.testing.assert_allclose(dense.upsample(got, CONFIG.grid, (13, 7)), maps.numpy(), rtol=1e-4, atol=1e-4)
    labels = dense.label_map(got[1], CONFIG.grid, (13, 7))
    assert labels.dtype == np.uint8 and labels.shape == (13, 7)
    np.testing.assert_array_equal(labels, maps[1].argmax(0).numpy())


@pytest.mark.parametrize(("out_size", "in_size"), [(64, 4), (5, 3), (3, 5), (4, 4), (1, 7), (7, 1)])
def test_bilinear_matrix_is_torchs_interpolate(out_size: int, in_size: int) -> None:
    grid = torch.randn(1, 2, in_size, 3)
    expected = F.interpolate(grid, size=(out_size, 3), mode="bilinear", align_corners=False)
    matrix = torch.from_numpy(dense.bilinear_matrix(out_size, in_size))
    torch.testing.assert_close(torch.einsum("oh,bchw->bcow", matrix, grid), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(matrix.sum(1).numpy(), 1.0, rtol=1e-6)


def test_label_map_in_bands_equals_the_whole_map(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = np.random.default_rng(0).normal(size=(16, 300)).astype(np.float32)  # 300 classes: uint16 labels
    whole = dense.upsample(logits, (4, 4), (37, 23))[0].argmax(0)
    monkeypatch.setattr(dense, "LABEL_MAP_BUDGET", 4 * 300 * 23 * 3)  # three rows per band
    banded = dense.label_map(logits, (4, 4), (37, 23))
    assert banded.dtype == np.uint16
    np.testing.assert_array_equal(banded, whole)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(InvalidArgumentError, match=r"\[B, 16, C\] for a 4x4 grid"):
        dense.upsample(np.zeros((2, 15, 3), np.float32), (4, 4), (8, 8))
    with pytest.raises(InvalidArgumentError, match="one image"):
        dense.label_map(np.zeros((2, 16, 3), np.float32), (4, 4), (8, 8))
    model = EdgeNetwork(EdgeNetworkConfig(dims=24, tokens=16, num_classes=5, pooling="mean"))
    with pytest.raises(InvalidArgumentError, match="pooling 'dense'"):
        dense_logits(model, torch.zeros(1, 16, 24), (8, 8))


def test_resize_mask_keeps_ids_and_the_ignore_index() -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 3
    mask[0, :] = 255
    small = dense.resize_mask(mask, 4)
    assert small.shape == (4, 4) and set(np.unique(small)) <= {0, 3, 255}
    assert dense.resize_mask(Image.fromarray(mask, "L"), (16, 8)).shape == (16, 8)


def test_palette_and_overlay() -> None:
    colours = dense.palette(21)
    assert len({tuple(c) for c in colours}) == 21 and tuple(colours[1]) == (128, 0, 0)
    picture = Image.new("RGB", (4, 2), (100, 100, 100))
    labels = np.array([[0, 1, 1, 0], [2, 2, 0, 0]], np.uint8)
    blended = np.asarray(dense.overlay(picture, labels, alpha=0.5))
    assert tuple(blended[0, 1]) == (114, 50, 50) and tuple(blended[0, 0]) == (50, 50, 50)
    with pytest.raises(InvalidArgumentError, match="do not fit"):
        dense.overlay(picture, labels.T)
