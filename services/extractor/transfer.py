"""Measure what one image costs on the wire for every gather mode and codec, by encoding real features.

    python -m services.extractor.transfer --backbone vit_base_patch16_224 --images 4 --json out.json

Nothing here is computed by formula: each figure is the mean serialized size of the FeatureTensor messages
that the codec produced for features gathered from the backbone on real (synthetic) image files.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from services.common.wire.codec import (
    ALL_CODECS,
    DEFAULT_CODEC,
    CodecConfig,
    FeatureCodec,
    decode_feature,
    encoded_nbytes,
)
from services.common.wire.gather_modes import VIT_B16, VIT_MODES, baseline_bytes_per_image, mode_to_proto
from services.extractor.backbone import LoadedBackbone, load_backbone
from services.extractor.gather import gather
from services.extractor.preprocess import ImagePreprocessor
from services.tuner.synthetic import CLASS_NAMES, render_image

MIB = 2**20
# The paper's float32 transfer per image for ViT-B/16 (MiB), shown next to our measurements.
PAPER_MIB = {"lst": 7.503, "last": 4.040, "partial": 0.577, "cls": 0.003, "mist": 0.577}


@dataclass(frozen=True)
class TransferRow:
    method: str  # gather mode: mist, lst, last, partial, cls
    codec: str  # canonical codec name, e.g. "i8-zstd"
    bytes_per_image: float  # mean serialized FeatureTensor size over the images
    float32_bytes_per_image: int  # what the same tensor costs as plain float32
    max_relative_error: float  # max |decoded - original| / max |original| per row, over the images
    is_default: bool  # MIST with the default codec: what devices receive unless they ask otherwise


def synthetic_png_images(count: int, size: int, seed: int = 0) -> list[bytes]:
    """`count` PNG files from the project's synthetic generator, cycling through its classes."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        buffer = io.BytesIO()
        render_image(CLASS_NAMES[index % len(CLASS_NAMES)], rng, size=size).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def _max_relative_error(original: np.ndarray, decoded: np.ndarray) -> float:
    rows = original.reshape(-1, original.shape[-1])
    scale = np.maximum(np.abs(rows).max(axis=1, keepdims=True), np.float32(1e-12))
    return float((np.abs(decoded.reshape(rows.shape) - rows) / scale).max())


def measure_transfer(
    backbone: LoadedBackbone, images: Sequence[bytes], codecs: Sequence[str] = ALL_CODECS
) -> list[TransferRow]:
    """Gather every mode for `images` (MIST at k = N) and encode each tensor with every codec."""
    preprocessor = ImagePreprocessor(backbone.data_config)
    batch = torch.stack([preprocessor.decode(image) for image in images]).to(backbone.device)
    num_blocks = backbone.geometry.num_blocks
    backbone_id = None
    rows = []
    for mode in VIT_MODES:
        with backbone.autocast():
            tensors = gather(backbone.model, batch, mode, ks=(num_blocks,) if mode == "mist" else ())
        features = next(iter(tensors.values())).float().cpu().numpy()
        for name in codecs:
            codec = FeatureCodec(CodecConfig.parse(name))
            sizes, errors = [], []
            for image_features in features:
                msg = codec.encode(
                    image_features,
                    backbone=backbone_id,
                    mode=mode_to_proto(mode),
                    k=num_blocks if mode == "mist" else 0,
                )
                sizes.append(encoded_nbytes(msg))
                errors.append(_max_relative_error(image_features, decode_feature(msg)))
            rows.append(
                TransferRow(
                    method=mode,
                    codec=codec.config.name,
                    bytes_per_image=statistics.fmean(sizes),
                    float32_bytes_per_image=int(features[0].size * 4),
                    max_relative_error=max(errors),
                    is_default=mode == "mist" and codec.config == DEFAULT_CODEC,
                )
            )
    return rows


def markdown_table(rows: Sequence[TransferRow], *, baselines: dict[str, int], show_paper: bool) -> str:
    """Methods as rows, codecs as columns, MiB per image; the paper's float32 figure when comparable."""
    codecs = list(dict.fromkeys(row.codec for row in rows))
    by_cell = {(row.method, row.codec): row for row in rows}
    header = "| method | " + " | ".join(codecs) + (" | paper (f32) |" if show_paper else " |")
    lines = [header, "|---|" + "---:|" * (len(codecs) + show_paper)]
    for method in dict.fromkeys(row.method for row in rows):
        cells = []
        for codec in codecs:
            row = by_cell[(method, codec)]
            cell = f"{row.bytes_per_image / MIB:.4f}"
            cells.append(f"**{cell}**" if row.is_default else cell)
        paper = f" | {PAPER_MIB[method]:.3f}" if show_paper else ""
        lines.append(f"| {method} | " + " | ".join(cells) + paper + " |")
    return "\n".join(lines)


def mist_table(rows: Sequence[TransferRow], *, baselines: dict[str, int]) -> str:
    """MIST per codec: bytes, how many times smaller than float32 LST / LAST, and the codec's own error."""
    lines = [
        "| codec | bytes/image | x smaller than LST | x smaller than LAST | max error / row max |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.method != "mist":
            continue
        name = f"**{row.codec}** (default)" if row.is_default else row.codec
        lines.append(
            f"| {name} | {row.bytes_per_image:,.0f} | {baselines['lst'] / row.bytes_per_image:.1f} | "
            f"{baselines['last'] / row.bytes_per_image:.1f} | {row.max_relative_error:.1e} |"
        )
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.extractor.transfer",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--backbone", default="vit_base_patch16_224", help="timm model name (default: %(default)s)")
    parser.add_argument("--weights", type=Path, help="local weights file; random init (with a warning) otherwise")
    parser.add_argument("--images", type=int, default=4, help="synthetic images to average over (default: %(default)s)")
    parser.add_argument("--codecs", default=",".join(ALL_CODECS), help="comma-separated codec names (default: all)")
    parser.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for timm.create_model")
    parser.add_argument("--json", type=Path, help="also write the rows (and the float32 baselines) as JSON here")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    backbone = load_backbone(args.backbone, weights=args.weights, model_kwargs=json.loads(args.model_kwargs))
    geometry = backbone.geometry
    size = backbone.data_config["input_size"][-1]
    rows = measure_transfer(backbone, synthetic_png_images(args.images, size), args.codecs.split(","))
    baselines = baseline_bytes_per_image(geometry)
    print(
        f"Transfer per image: {backbone.name} ({geometry.num_blocks} blocks, {geometry.tokens} tokens x "
        f"{geometry.dims} dims), {'pretrained' if backbone.pretrained else 'RANDOM-INIT'} weights, "
        f"mean over {args.images} synthetic images, MIST at k = {geometry.num_blocks}\n"
    )
    print("MiB per image (serialized FeatureTensor; bold: the default codec)\n")
    print(markdown_table(rows, baselines=baselines, show_paper=geometry == VIT_B16))
    print("\nMIST per codec, against what float32 LST and LAST send for the same backbone\n")
    print(mist_table(rows, baselines=baselines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "backbone": backbone.name,
                    "pretrained": backbone.pretrained,
                    "geometry": asdict(geometry),
                    "images": args.images,
                    "float32_baselines": baselines,
                    "transfer": [asdict(row) for row in rows],
                },
                indent=2,
            )
            + "\n"
        )
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
