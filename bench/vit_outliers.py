"""Pretrained-ViT activation statistics, put on top of real gathered features, for codec tests and benchmarks.

Randomly initialised backbones (all this project can run: nothing is downloaded) give Gaussian-like features.
Pretrained transformers do not, and quantizers with one scale per token are known to suffer from three effects,
which `inject_vit_outliers` reproduces on a copy of gathered features [images, T, D]:

- **Outlier channels**: a few residual-stream dimensions are 20x to 100x larger than the rest in every token,
  with a fixed sign (Bondarenko et al., "Understanding and Overcoming the Challenges of Efficient Transformer
  Quantization", EMNLP 2021, for BERT; the post-LayerNorm inter-channel variation of ViTs in Lin et al.,
  "FQ-ViT", IJCAI 2022, and Li et al., "RepQ-ViT", ICCV 2023). Here: `D // 128` channels (at least 2) whose
  value in every token is offset by a magnitude drawn log-uniformly in 20..100 times the features' RMS, +-10 %.
- **High-norm tokens**: about 2 % of the patch tokens of large ViTs carry about 10x the norm of the others
  (Darcet et al., "Vision Transformers Need Registers", ICLR 2024). Here: 2 % of each image's patch tokens (at
  least one; prefix tokens such as CLS are left alone) are scaled by 10.
- **Massive activations**: a handful of single scalars, in fixed dimensions, hundreds of times the median
  magnitude (Sun et al., "Massive Activations in Large Language Models", COLM 2024, who find them in CLIP and
  DINOv2 ViTs too). Here: 2 fixed channels (distinct from the outlier channels) take a value of 100..500 times
  the RMS, random sign, at one random patch token per image.

The injection is deterministic per seed. It adds no class information (the offsets are the same for every image
and the positions random), so a codec that keeps the ordinary channels intact keeps the accuracy float32 gets
on the same injected features; one that spends its levels on the outliers loses it.

    injected = inject_vit_outliers(features, seed=0, prefix_tokens=1)
    injected.features          # float32 [images, T, D], a new array
    injected.ordinary_error(decoded)   # relative error on what the outliers leave alone
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgumentError


@dataclass(frozen=True)
class OutlierSpec:
    """How strong the injected statistics are (defaults: the figures the sources above report)."""

    channel_ratio: tuple[float, float] = (20.0, 100.0)  # outlier-channel magnitude, times the features' RMS
    channels_per_128_dims: int = 1  # D // 128 outlier channels (at least 2)
    high_norm_fraction: float = 0.02  # share of patch tokens with a high norm (at least one per image)
    high_norm_factor: float = 10.0  # their norm, times their original norm
    massive_channels: int = 2  # fixed channels holding the massive activations
    massive_ratio: tuple[float, float] = (100.0, 500.0)  # a massive activation's magnitude, times the RMS


@dataclass(frozen=True)
class InjectedFeatures:
    """Features with the statistics of a pretrained ViT, and where they were put."""

    features: np.ndarray  # float32 [images, T, D]
    outlier_channels: np.ndarray  # int64 [channels]
    massive_channels: np.ndarray  # int64 [channels]
    high_norm_tokens: np.ndarray  # bool [images, T]
    rms: float  # RMS of the features before injection

    def ordinary_error(self, decoded: np.ndarray) -> float:
        """||decoded - features|| / ||features|| over the ordinary entries: the channels that hold neither outliers
        nor massive activations, in the tokens that are not high-norm (what a per-token scale starves)."""
        if decoded.shape != self.features.shape:
            raise InvalidArgumentError(f"decoded shape {decoded.shape} differs from {self.features.shape}")
        keep = np.ones(self.features.shape[-1], dtype=bool)
        keep[self.outlier_channels] = False
        keep[self.massive_channels] = False
        rows = ~self.high_norm_tokens
        original = self.features[rows][:, keep].astype(np.float64)
        difference = decoded[rows][:, keep].astype(np.float64) - original
        return float(np.linalg.norm(difference) / np.linalg.norm(original))


def inject_vit_outliers(
    features: np.ndarray, *, seed: int = 0, prefix_tokens: int = 1, spec: OutlierSpec = OutlierSpec()
) -> InjectedFeatures:
    """A copy of `features` [images, T, D] with outlier channels, high-norm tokens and massive activations."""
    if not isinstance(features, np.ndarray) or features.ndim != 3 or features.dtype.kind != "f":
        raise InvalidArgumentError(
            f"features must be a float array [images, T, D], got {getattr(features, 'shape', features)}"
        )
    images, tokens, dims = features.shape
    if not 0 <= prefix_tokens < tokens:
        raise InvalidArgumentError(f"prefix_tokens must be in 0..{tokens - 1}, got {prefix_tokens}")
    channels = max(2, dims // 128 * spec.channels_per_128_dims)
    if channels + spec.massive_channels > dims:
        raise InvalidArgumentError(
            f"{dims} dims cannot hold {channels} outlier and {spec.massive_channels} massive channels"
        )
    rng = np.random.default_rng(seed)
    values = features.astype(np.float32, copy=True)
    rms = float(np.sqrt(np.mean(np.square(values, dtype=np.float64))))
    chosen = rng.choice(dims, channels + spec.massive_channels, replace=False)
    outlier_channels, massive_channels = np.sort(chosen[:channels]), np.sort(chosen[channels:])
    patches = tokens - prefix_tokens
    high_norm = np.zeros((images, tokens), dtype=bool)
    count = max(1, round(spec.high_norm_fraction * patches))
    for image in range(images):
        high_norm[image, prefix_tokens + rng.choice(patches, count, replace=False)] = True
    values[high_norm] *= np.float32(spec.high_norm_factor)
    low, high = spec.channel_ratio
    magnitudes = np.exp(rng.uniform(np.log(low), np.log(high), channels)) * rng.choice([-1.0, 1.0], channels) * rms
    jitter = 1.0 + 0.1 * rng.standard_normal((images, tokens, channels))
    values[:, :, outlier_channels] += (magnitudes * jitter).astype(np.float32)
    for image in range(images):
        token = prefix_tokens + int(rng.integers(patches))
        size = rng.uniform(*spec.massive_ratio, len(massive_channels)) * rng.choice([-1.0, 1.0], len(massive_channels))
        values[image, token, massive_channels] = (size * rms).astype(np.float32)
    return InjectedFeatures(values, outlier_channels, massive_channels, high_norm, rms)
