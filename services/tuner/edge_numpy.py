"""The LAE edge network's forward pass in numpy: what a device that only predicts runs, with no torch installed.

    network, metadata = NumpyEdgeNetwork.from_safetensors_bytes(blob, expected=task.edge_config())
    logits = network.logits(features)   # [B, T, D] or [T, D] float features -> [B, C]

It reads the same safetensors weights the registry stores (so every version, old ones too, predicts the same way
and stays tied to its sha256), checks them as strictly as the torch loader, and computes in float32 what
services/tuner/edge_network.py computes: the two agree to 1e-4 in probability (tests/unit/test_edge_numpy.py).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgumentError
from services.common.wire.edge_spec import LAYER_NORM_EPS, EdgeNetworkConfig
from services.common.wire.weights import check_edge_weights, parse_safetensors


def _softmax_in_place(x: np.ndarray) -> np.ndarray:
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def _inverse_std(centred: np.ndarray) -> np.ndarray:
    """1 / sqrt(variance + eps) per token of already centred [..., D] values, shaped [..., 1]."""
    variance = np.einsum("...d,...d->...", centred, centred) / np.float32(centred.shape[-1])
    return (1.0 / np.sqrt(variance + np.float32(LAYER_NORM_EPS)))[..., None]


@dataclass
class _Workspace:
    """The forward pass's large arrays, allocated once per thread and shape: under the tuner's 128 KiB mmap
    threshold (services/tuner/memory.py) every fresh [T, D] temporary is a new mapping with its page faults."""

    centred: np.ndarray  # [B, T, D]: x minus its per-token mean
    states: tuple[np.ndarray, np.ndarray]  # [B, T, D] each: the residual stream, ping-pong between blocks
    scores: np.ndarray  # [B, heads, T, T]: attention weights


class NumpyEdgeNetwork:
    """M low-rank attention blocks, final LayerNorm, CLS or mean pooling (or none: "dense") and a linear head, on numpy
    arrays."""

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
        self._local = threading.local()  # one workspace per thread: a network may be shared by threads
        self._head_weight = _f32((w["head.weight"] * w["norm.weight"][None, :]).T)
        self._head_bias = _f32(w["head.weight"] @ w["norm.bias"] + w["head.bias"])
        self._readout = None
        if config.token_readout:  # readout.proj(LayerNorm(x)) folded alike; then the Linear over every token's R dims
            proj = w["readout.proj.weight"]
            self._readout = (
                _f32((proj * w["norm.weight"][None, :]).T),
                _f32(proj @ w["norm.bias"] + w["readout.proj.bias"]),
                _f32(w["readout.head.weight"].T),
                _f32(w["readout.head.bias"]),
            )

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
        """[B, C] float32 logits of [B, T, D] (or one image's [T, D]) features; [B, T, C] for a dense network (every
        token's logits, to upsample with services/tuner/dense.py)."""
        x = self._checked(features)  # the caller's array is never written to
        work = self._workspace(x.shape)
        for index, block in enumerate(self._blocks):
            out = work.states[index % 2]
            self._block(x, out, work, *block)
            x = out
        if self.config.dense:  # head(LayerNorm(token)) for every token, the affine part folded in
            centred = np.subtract(x, x.mean(axis=-1, keepdims=True), out=work.centred)
            return (centred @ self._head_weight) * _inverse_std(centred) + self._head_bias
        if self.config.pool == "cls":  # LayerNorm is per token: only the class token's is needed
            first = x[:, 0] - x[:, 0].mean(axis=-1, keepdims=True)
            pooled = first * _inverse_std(first)
        else:  # mean over tokens of (x - mean) / std, without the normalised [B, T, D] array
            centred = np.subtract(x, x.mean(axis=-1, keepdims=True), out=work.centred)
            pooled = np.einsum("bt,btd->bd", _inverse_std(centred)[..., 0], centred) / np.float32(x.shape[1])
        logits = pooled @ self._head_weight + self._head_bias
        if self._readout is not None:
            proj_weight, proj_bias, head_weight, head_bias = self._readout
            centred = np.subtract(x, x.mean(axis=-1, keepdims=True), out=work.centred)
            projected = (centred @ proj_weight) * _inverse_std(centred) + proj_bias  # [B, T, R]
            logits += projected.reshape(x.shape[0], -1) @ head_weight + head_bias
        return logits

    def _block(
        self,
        x: np.ndarray,
        out: np.ndarray,
        work: _Workspace,
        qkv_weight: np.ndarray,
        qkv_bias: np.ndarray,
        proj: np.ndarray,
    ) -> None:
        """out = x + proj(attention(qkv(LayerNorm(x)))), the affine parts folded in at load."""
        batch, tokens, _ = x.shape
        centred = np.subtract(x, x.mean(axis=-1, keepdims=True), out=work.centred)
        qkv = (centred @ qkv_weight) * _inverse_std(centred) + qkv_bias  # rows of the weight: q (scaled) | k | v
        qkv = qkv.reshape(batch, tokens, 3, self.config.heads, self._head_dims).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [B, heads, T, r / heads]
        scores = _softmax_in_place(np.matmul(q, k.transpose(0, 1, 3, 2), out=work.scores))
        attended = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, -1)
        with_ones = np.concatenate([attended, np.ones((batch, tokens, 1), dtype=np.float32)], axis=-1)
        np.matmul(with_ones, proj, out=out)  # proj(attended) + its bias
        out += x  # the residual

    def _workspace(self, shape: tuple[int, ...]) -> _Workspace:
        work = getattr(self._local, "work", None)
        if work is None or work.centred.shape != shape:
            batch, tokens, _ = shape
            states = (np.empty(shape, np.float32), np.empty(shape, np.float32))
            scores = np.empty((batch, self.config.heads, tokens, tokens), np.float32)
            work = self._local.work = _Workspace(np.empty(shape, np.float32), states, scores)
        return work

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
