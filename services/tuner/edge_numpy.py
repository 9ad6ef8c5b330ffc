"""The LAE edge network's forward pass in numpy: what a device that only predicts runs, with no torch installed.

    network, metadata = NumpyEdgeNetwork.from_safetensors_bytes(blob, expected=task.edge_config())
    logits = network.logits(features)   # [B, T, D] or [T, D] float features -> [B, C]

It reads the same safetensors weights the registry stores (so every version, old ones too, predicts the same way
and stays tied to its sha256), checks them as strictly as the torch loader, and computes in float32 what
services/tuner/edge_network.py computes: the two agree to 1e-4 in probability (tests/unit/test_edge_numpy.py).
"""

from __future__ import annotations

import math

import numpy as np

from services.common.errors import InvalidArgumentError
from services.common.wire.edge_spec import LAYER_NORM_EPS, EdgeNetworkConfig
from services.common.wire.weights import check_edge_weights, parse_safetensors


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    variance = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(variance + np.float32(LAYER_NORM_EPS)) * weight + bias


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class NumpyEdgeNetwork:
    """M low-rank attention blocks, final LayerNorm, CLS or mean pooling and a linear head, on numpy arrays."""

    def __init__(self, config: EdgeNetworkConfig, tensors: dict[str, np.ndarray]) -> None:
        self.config = config
        self._tensors = {name: np.asarray(value, dtype=np.float32) for name, value in tensors.items()}
        self._head_dims = config.rank // config.heads
        self._scale = np.float32(1.0 / math.sqrt(self._head_dims))  # as scaled_dot_product_attention

    @classmethod
    def from_safetensors_bytes(
        cls, blob: bytes, expected: EdgeNetworkConfig | None = None
    ) -> tuple[NumpyEdgeNetwork, dict[str, str]]:
        """The network of a weights blob and its metadata; the checks and errors of the torch loader.

        Not safetensors, no config, NaN/Inf -> InvalidArgumentError; a config other than `expected`, missing, extra
        or mis-shaped tensors, non-float32 dtypes -> FailedPreconditionError. Never unpickles.
        """
        config, metadata = check_edge_weights(blob, expected)  # header, config, names, shapes and dtypes
        data = memoryview(blob)
        tensors = {
            name: np.frombuffer(data[info.start : info.end], dtype="<f4").reshape(info.shape)
            for name, info in parse_safetensors(data).tensors.items()
        }
        bad = sorted(name for name, value in tensors.items() if not np.isfinite(value).all())
        if bad:
            raise InvalidArgumentError(f"edge network weights contain NaN or Inf in {bad[:5]}")
        return cls(config, tensors), metadata

    def logits(self, features: np.ndarray) -> np.ndarray:
        """[B, C] float32 logits of [B, T, D] (or one image's [T, D]) features."""
        x = self._checked(features)
        for index in range(self.config.num_blocks):
            x = self._block(x, f"blocks.{index}.")
        x = _layer_norm(x, self._tensors["norm.weight"], self._tensors["norm.bias"])
        pooled = x[:, 0] if self.config.pooling == "cls" else x.mean(axis=1)
        return pooled @ self._tensors["head.weight"].T + self._tensors["head.bias"]

    def _block(self, x: np.ndarray, prefix: str) -> np.ndarray:
        t = self._tensors
        batch, tokens, _ = x.shape
        normed = _layer_norm(x, t[prefix + "norm.weight"], t[prefix + "norm.bias"])
        qkv = normed @ t[prefix + "qkv.weight"].T + t[prefix + "qkv.bias"]  # rows of the weight: q | k | v
        qkv = qkv.reshape(batch, tokens, 3, self.config.heads, self._head_dims).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [B, heads, T, r / heads]
        attention = _softmax((q @ k.transpose(0, 1, 3, 2)) * self._scale)
        attended = (attention @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, self.config.rank)
        return x + attended @ t[prefix + "proj.weight"].T + t[prefix + "proj.bias"]

    def _checked(self, features: np.ndarray) -> np.ndarray:
        # Fail with the geometry the caller got wrong, not with a matmul shape error.
        x = np.asarray(features)
        if x.ndim == 2:
            x = x[None]
        expected = (self.config.tokens, self.config.dims)
        if x.ndim != 3 or tuple(x.shape[1:]) != expected or x.shape[0] == 0:
            raise InvalidArgumentError(
                f"edge network expects features [B >= 1, {expected[0]}, {expected[1]}], got {tuple(x.shape)}"
            )
        if not np.issubdtype(x.dtype, np.floating):
            raise InvalidArgumentError(f"edge network expects floating point features, got {x.dtype}")
        return x.astype(np.float32, copy=False)
