"""What a dense (segmentation) edge network's per-token logits become on a device, in numpy alone: label grids at any
resolution, resized masks, colour overlays. No torch, so a device that only predicts never loads it.

    maps = upsample(token_logits, grid=(16, 16), size=(64, 64))    # [B, T, C] -> [B, C, 64, 64], bilinear
    labels = label_map(token_logits[0], grid=(16, 16), size=(480, 640))  # uint8 [480, 640], memory bounded
    mask = resize_mask(mask, 64)                                    # nearest: ids never blend

The head: the network classifies each token of the aggregate (a LayerNorm and a Linear D -> C per token), and the
logits are upsampled bilinearly to the label resolution. Bilinear upsampling has no parameters, so the device trains
only D x C + C head weights next to the LAE blocks; the grid of pvt_v2's last stage is 1/32 of the input, and a
learnt decoder (deconvolutions or SegFormer's all-MLP head over every stage) would need every stage's features on
the device, which is what MIST avoids sending (docs/explanation/segmentation.md).

The upsampling is torch's `F.interpolate(mode="bilinear", align_corners=False)` written as two small matrices (one
per axis), so the numpy and torch runtimes give the same label maps (tests/unit/test_dense_head.py).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from services.common.errors import InvalidArgumentError

# Rows of the output computed at once by label_map: [C, rows, W] float32 at a time, e.g. 150 x 64 x 4000 = 150 MB
# would be too much for a phone, so the chunk shrinks with C x W (LABEL_MAP_BUDGET bytes at most).
LABEL_MAP_BUDGET = 16 << 20


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out_size, in_size] float32 weights of 1-D bilinear resampling with align_corners=False (torch's convention:
    source = (destination + 0.5) * in / out - 0.5, clamped at 0; the last source index repeats at the far edge)."""
    if out_size < 1 or in_size < 1:
        raise InvalidArgumentError(f"sizes must be positive; got out {out_size}, in {in_size}")
    source = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    source = np.maximum(source, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    weight_high = source - low
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, low), 1.0 - weight_high)
    np.add.at(matrix, (rows, high), weight_high)
    return matrix.astype(np.float32)


def _grid_logits(token_logits: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[B, C, h, w] from [B, T, C] (or [T, C]) token logits, tokens row-major over `grid`."""
    logits = np.asarray(token_logits, dtype=np.float32)
    if logits.ndim == 2:
        logits = logits[None]
    height, width = grid
    if logits.ndim != 3 or logits.shape[1] != height * width:
        raise InvalidArgumentError(f"token logits must be [B, {height * width}, C] for a {height}x{width} grid; "
                                   f"got {tuple(logits.shape)}")  # fmt: skip
    return logits.reshape(logits.shape[0], height, width, -1).transpose(0, 3, 1, 2)


def upsample(token_logits: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """[B, C, H, W] float32: the logits of every token, on the grid, resized bilinearly to `size` (H, W)."""
    maps = _grid_logits(token_logits, grid)
    rows, cols = bilinear_matrix(size[0], grid[0]), bilinear_matrix(size[1], grid[1])
    return np.einsum("Hh,bchw,Ww->bcHW", rows, maps, cols, optimize=True).astype(np.float32, copy=False)


def label_map(token_logits: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The most likely class of every pixel of an H x W picture (`size` = (H, W)) from one image's [T, C] logits:
    uint8 when C <= 256, else uint16. Computed a band of rows at a time, so a 4000 px photo with 150 classes needs
    LABEL_MAP_BUDGET bytes of scratch, not C x H x W floats."""
    maps = _grid_logits(token_logits, grid)
    if maps.shape[0] != 1:
        raise InvalidArgumentError(f"label_map takes one image's logits; got {maps.shape[0]}")
    classes, height, width = maps.shape[1], size[0], size[1]
    rows, cols = bilinear_matrix(height, grid[0]), bilinear_matrix(width, grid[1])
    by_columns = np.einsum("chw,Ww->chW", maps[0], cols)  # [C, h, W]: the column pass once
    labels = np.empty((height, width), dtype=np.uint8 if classes <= 256 else np.uint16)
    band = max(1, LABEL_MAP_BUDGET // (4 * classes * width))
    for start in range(0, height, band):
        stop = min(height, start + band)
        scores = np.einsum("Hh,chW->cHW", rows[start:stop], by_columns)  # [C, rows, W]
        labels[start:stop] = scores.argmax(axis=0)
    return labels


def resize_mask(mask: np.ndarray | Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    """A class-id mask resized to `size` (side, or (H, W)) by nearest neighbour (Pillow's), so ids never blend and
    the ignore index stays what it is."""
    height, width = (size, size) if isinstance(size, int) else size
    image = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask, dtype=np.uint8), "L")
    return np.asarray(image.resize((width, height), Image.Resampling.NEAREST), dtype=np.uint8)


def palette(num_classes: int) -> np.ndarray:
    """[C, 3] uint8 colours, one per class id, distinct and the same on every run (the PASCAL VOC bit scheme)."""
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = (red, green, blue)
    return colours


def overlay(picture: Image.Image, labels: np.ndarray, *, alpha: float = 0.5) -> Image.Image:
    """The picture (RGB, the labels' size) with each pixel blended towards its class colour."""
    if picture.size != (labels.shape[1], labels.shape[0]):
        raise InvalidArgumentError(f"labels {labels.shape[1]}x{labels.shape[0]} do not fit the picture "
                                   f"{picture.size[0]}x{picture.size[1]}")  # fmt: skip
    colours = palette(int(labels.max(initial=0)) + 1)[labels]
    blended = (1.0 - alpha) * np.asarray(picture.convert("RGB"), dtype=np.float32) + alpha * colours
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), "RGB")
