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


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _centred_and_inverse_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x minus its per-token mean, and 1 / sqrt(variance + eps) per token: LayerNorm without its affine part,
    which the next matmul absorbs (three passes over [B, T, D] instead of LayerNorm's eight)."""
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = np.einsum("...d,...d->...", centred, centred) / np.float32(x.shape[-1])
    return centred, (1.0 / np.sqrt(variance + np.float32(LAYER_NORM_EPS)))[..., None]


class NumpyEdgeNetwork:
    """M low-rank attention blocks, final LayerNorm, CLS or mean pooling and a linear head, on numpy arrays."""

    def __init__(self, config: EdgeNetworkConfig, tensors: dict[str, np.ndarray]) -> None:
        self.config = config
        w = {name: np.asarray(value, dtype=np.float64) for name, value in tensors.items()}
        self._head_dims = config.rank // config.heads
        scale = 1.0 / math.sqrt(self._head_dims)  # as scaled_dot_product_attention
        self._blocks = []
        for index in range(config.num_blocks):
            prefix = f"blocks.{index}."
            # qkv(LayerNorm(x)) = (normalised x) @ (W * gamma)^T + (W @ beta + b): the affine part folded into the
            # matmul once, in float64, so the forward never materialises the normalised [B, T, D] array. The
            # attention scale is folded into the q rows the same way.
            weight = w[prefix + "qkv.weight"] * w[prefix + "norm.weight"][None, :]
            bias = w[prefix + "qkv.weight"] @ w[prefix + "norm.bias"] + w[prefix + "qkv.bias"]
            weight[: config.rank] *= scale
            bias[: config.rank] *= scale
            # proj with its bias as one more input row: attended [.., r] + a column of ones -> one matmul.
            proj = np.vstack([w[prefix + "proj.weight"].T, w[prefix + "proj.bias"][None, :]])
            self._blocks.append((_f32(weight.T), _f32(bias), _f32(proj)))
        # head(LayerNorm(pooled)) folded the same way.
        self._head_weight = _f32((w["head.weight"] * w["norm.weight"][None, :]).T)
        self._head_bias = _f32(w["head.weight"] @ w["norm.bias"] + w["head.bias"])

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
        for block in self._blocks:
            x = self._block(x, *block)
        if self.config.pooling == "cls":  # LayerNorm is per token: only the class token's is needed
            centred, inverse_std = _centred_and_inverse_std(x[:, 0])
            pooled = centred * inverse_std
        else:  # mean over tokens of (x - mean) / std, without the normalised [B, T, D] array
            centred, inverse_std = _centred_and_inverse_std(x)
            pooled = np.einsum("bt,btd->bd", inverse_std[..., 0], centred) / np.float32(x.shape[1])
        return pooled @ self._head_weight + self._head_bias

    def _block(self, x: np.ndarray, qkv_weight: np.ndarray, qkv_bias: np.ndarray, proj: np.ndarray) -> np.ndarray:
        batch, tokens, _ = x.shape
        centred, inverse_std = _centred_and_inverse_std(x)
        qkv = (centred @ qkv_weight) * inverse_std + qkv_bias  # rows of the weight: q (scaled) | k | v
        qkv = qkv.reshape(batch, tokens, 3, self.config.heads, self._head_dims).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [B, heads, T, r / heads]
        attended = (_softmax(q @ k.transpose(0, 1, 3, 2)) @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, -1)
        with_ones = np.concatenate([attended, np.ones((batch, tokens, 1), dtype=np.float32)], axis=-1)
        update = with_ones @ proj  # proj(attended) + its bias
        update += x  # the residual, in place: one pass
        return update

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


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)
