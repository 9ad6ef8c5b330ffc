"""The measurements behind the codec choice: candidate quantization schemes on plain and outlier-injected features.

Each candidate maps one image's features [T, D] to (what a decoder would reconstruct, bytes on the wire). The
wire codecs (`i8`, `i8o`, `i4`) are measured through `FeatureCodec` itself; the schemes that lost are
reimplemented here, sizes counted the same way (zstd level 3 over the stored values, scales at their stored
width, no message header). Part of benchmark section 2; alone, on ViT-B/16 geometry:

    .venv/bin/python -m bench.codec_study        # random-init ViT-B/16, 8 images, prints a Markdown table
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import zstandard

from bench.vit_outliers import inject_vit_outliers
from services.common.wire.codec import CodecConfig, FeatureCodec, decode_feature, encoded_nbytes

Scheme = Callable[[np.ndarray], tuple[np.ndarray, int]]
_ZSTD = zstandard.ZstdCompressor(level=3)


def _zstd_bytes(values: np.ndarray) -> int:
    return len(_ZSTD.compress(np.ascontiguousarray(values).tobytes()))


def _wire(name: str) -> Scheme:
    codec = FeatureCodec(CodecConfig.parse(name))

    def scheme(features: np.ndarray) -> tuple[np.ndarray, int]:
        message = codec.encode(features)
        return decode_feature(message), encoded_nbytes(message)

    return scheme


def _symmetric(rows: np.ndarray, levels: int, scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(integer levels as float, float32 scales as stored) per row of `rows`, scale = max|x| / levels."""
    top = np.abs(rows).max(axis=1)
    scales = (top / levels).astype(scale_dtype).astype(np.float32)
    inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales > 0)
    return np.clip(np.rint(rows * inverse[:, None]), -levels, levels), scales


def _grouped(group: int, levels: int, *, equalise: bool = False) -> Scheme:
    """Per-group scales (float16) along the last dim; optionally every channel divided by its RMS first (float16)."""

    def scheme(features: np.ndarray) -> tuple[np.ndarray, int]:
        tokens, dims = features.shape
        size = min(group, dims)
        channel = np.ones(dims, dtype=np.float32)
        extra = 0
        if equalise:
            channel = np.sqrt(np.mean(np.square(features), axis=0)).astype(np.float16).astype(np.float32)
            channel[channel == 0] = 1.0
            extra = 2 * dims
        width = -(-dims // size) * size
        padded = np.zeros((tokens, width), dtype=np.float32)
        padded[:, :dims] = features / channel
        levels_, scales = _symmetric(padded.reshape(-1, size), levels, np.dtype(np.float16))
        decoded = (levels_ * scales[:, None]).reshape(tokens, width)[:, :dims] * channel
        stored = levels_.astype(np.int8).reshape(tokens, width)[:, :dims].reshape(-1)
        if levels <= 7:  # two 4-bit values per byte
            stored = np.append(stored, np.int8(0)) if len(stored) % 2 else stored
            nibbles = (stored + 8).astype(np.uint8)
            stored = nibbles[0::2] | (nibbles[1::2] << np.uint8(4))
        return decoded, _zstd_bytes(stored) + 2 * scales.size + extra

    return scheme


# name -> (scheme, what it is); the wire codecs by their codec names.
CANDIDATES: dict[str, tuple[Scheme, str]] = {
    "i8-zstd": (_wire("i8-zstd"), "int8, one float32 scale per token (the previous default)"),
    "i8 g128": (_grouped(128, 127), "int8, a float16 scale per 128 values of a token"),
    "i8 g32": (_grouped(32, 127), "int8, a float16 scale per 32 values of a token"),
    "i8 eq": (_grouped(1 << 20, 127, equalise=True), "int8 per token after dividing each channel by its RMS"),
    "i8o-zstd": (_wire("i8o-zstd"), "int8 per token, outlier columns as int16 (the default)"),
    "i4 g32": (_grouped(32, 7), "4-bit, a float16 scale per 32 values"),
    "i4 g32 eq": (_grouped(32, 7, equalise=True), "4-bit per 32 values after dividing each channel by its RMS"),
    "i4-zstd": (_wire("i4-zstd"), "4-bit per 32 values (bfloat16 scales), outlier columns as int16"),
}


def study(features: np.ndarray, *, prefix_tokens: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """Every candidate on `features` [images, T, D] as gathered ("plain") and with outliers injected ("outliers")."""
    injected = inject_vit_outliers(features, seed=seed, prefix_tokens=prefix_tokens)
    rows = []
    for family, values in (("plain", features), ("outliers", injected.features)):
        for name, (scheme, description) in CANDIDATES.items():
            decoded, sizes = [], []
            for image in values:
                out, size = scheme(image)
                decoded.append(out)
                sizes.append(size)
            decoded_all = np.stack(decoded)
            error = float(np.linalg.norm(decoded_all - values) / np.linalg.norm(values))
            rows.append({
                "family": family,
                "scheme": name,
                "description": description,
                "bytes_per_image": float(np.mean(sizes)),
                "relative_error": error,
                "ordinary_relative_error": injected.ordinary_error(decoded_all) if family == "outliers" else error,
            })  # fmt: skip
    return rows


def markdown(rows: Sequence[Mapping[str, Any]], float32_bytes: int) -> str:
    lines = [
        "| scheme | what | plain: KiB/img | plain: error | outliers: KiB/img | outliers: error | outliers: ordinary error |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    by = {(row["family"], row["scheme"]): row for row in rows}
    for name, (_, description) in CANDIDATES.items():
        plain, outliers = by[("plain", name)], by[("outliers", name)]
        lines.append(
            f"| {name} | {description} | {plain['bytes_per_image'] / 1024:.1f} | {plain['relative_error'] * 100:.2f} % | "
            f"{outliers['bytes_per_image'] / 1024:.1f} | {outliers['relative_error'] * 100:.2f} % | "
            f"{outliers['ordinary_relative_error'] * 100:.2f} % |"
        )
    lines.append(f"\nfloat32: {float32_bytes / 1024:.1f} KiB per image.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from services.extractor.backbone import load_backbone
    from services.extractor.gather import gather_prefix_sums

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224", help="timm name (random init)")
    parser.add_argument("--images", type=int, default=8, help="synthetic images (smoothed noise)")
    args = parser.parse_args(argv)
    loaded = load_backbone(args.backbone, seed=0)
    size = int(loaded.data_config["input_size"][-1])
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.avg_pool2d(
        torch.rand(args.images, 3, size, size, generator=generator) * 2 - 1, 5, 1, 2
    )
    k = loaded.geometry.num_blocks
    features = gather_prefix_sums(loaded.model, images, [k])[k].numpy().astype(np.float32)
    rows = study(features, prefix_tokens=loaded.geometry.num_prefix_tokens)
    print(f"{args.backbone} random init, {args.images} images, MIST at k = {k}, shape {list(features.shape[1:])}\n")
    print(markdown(rows, 4 * features[0].size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
