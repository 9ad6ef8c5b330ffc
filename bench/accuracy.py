"""Benchmark section 2: what each feature codec costs in edge-network accuracy, measured with paired runs.

Features are gathered once from a small random-init timm ViT on the synthetic dataset, encoded with every codec,
and the same tune (same seeds, split and batch order) runs on each (docs/how-to/benchmarks.md, section 2). Two
feature families: the gathered features as they are ("plain") and the same with the statistics of pretrained ViTs
put on top ("outliers": outlier channels, high-norm tokens, massive activations; bench/vit_outliers.py).

    .venv/bin/python -m bench.accuracy --quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import codec_study
from bench.vit_outliers import InjectedFeatures, inject_vit_outliers
from services.common.errors import InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.codec import ALL_CODECS, DEFAULT_CODEC, CodecConfig, FeatureCodec
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.tuner.data import Dataset, load_dataset
from services.tuner.evaluation import collect_predictions
from services.tuner.feature_store import FeatureStore
from services.tuner.synthetic import CLASS_NAMES, SplitSizes, generate_dataset
from services.tuner.training import TrainConfig, train_edge_network

REFERENCE_CODEC = "f32-none"  # float32 features exactly as gathered: what every codec is compared with
TARGET_MAX_DROP = 0.005  # the default codec may lose at most 0.5 accuracy points against float32
TARGET_MIN_AGREEMENT = 0.99  # float32-trained networks agree with themselves on the default codec's features
FAMILIES = ("plain", "outliers")  # the gathered features, and the same with pretrained-ViT statistics injected


@dataclass(frozen=True)
class AccuracyConfig:
    """One run of the codec-accuracy benchmark."""

    backbone: str = "vit_tiny_patch16_224"  # timm name; always a seeded random init (nothing is downloaded)
    model_kwargs: Mapping[str, Any] = field(
        default_factory=lambda: {"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3}
    )  # 65 tokens x 192 dims: a weak but real signal, gathered in seconds on a CPU
    backbone_seed: int = 0  # seed of the backbone's random init
    k: int | None = None  # gathered blocks; None: all N
    classes: int = 8  # the first `classes` synthetic classes
    sizes: SplitSizes = SplitSizes(train=40, val=10, test=40)  # images per class in each split
    dataset_seed: int = 0  # seed of the synthetic images
    codecs: tuple[str, ...] = ALL_CODECS  # codecs compared (the reference f32-none is always added)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # training seeds; each codec runs on every one (paired)
    epochs: int = 30  # the tuner's default run length
    batch_size: int = 32  # the tuner's default
    lr: float = 1e-3  # the tuner's default
    threads: int = 1  # torch threads while training: tiny networks are fastest on one
    gather_batch_size: int = 64  # images per backbone forward while gathering
    outlier_seed: int = 0  # seed of the injected pretrained-ViT statistics (bench/vit_outliers.py)

    def __post_init__(self) -> None:
        for name, lower in (("classes", 2), ("epochs", 1), ("batch_size", 1), ("threads", 1), ("gather_batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lower:
                raise InvalidArgumentError(f"accuracy benchmark {name} must be an integer >= {lower}, got {value!r}")
        if self.classes > len(CLASS_NAMES):
            raise InvalidArgumentError(
                f"the synthetic dataset has {len(CLASS_NAMES)} classes, asked for {self.classes}"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise InvalidArgumentError(f"seeds must be distinct and at least one, got {self.seeds!r}")
        for codec in self.codecs:
            CodecConfig.parse(codec)  # a typo fails here, before minutes of gathering


FULL = AccuracyConfig()
# The same backbone (gathering is cheap), half the images, half the epochs, two seeds: a smoke run (about 30 %
# accuracy against 46 % in full, measured) whose codec differences are within noise.
QUICK = AccuracyConfig(sizes=SplitSizes(train=20, val=5, test=20), seeds=(0, 1), epochs=15)


@dataclass(frozen=True)
class GatheredFeatures:
    """Float32 gathered features of a whole labelled dataset, computed once."""

    dataset: Dataset  # labels, splits and class names; index i is features[i]
    features: np.ndarray  # float32 [images, T, D]
    k: int  # gathered blocks
    backbone: feature_pb2.BackboneId  # name and random-init fingerprint
    description: str  # the backbone as a reader should see it
    prefix_tokens: int = 1  # class (and register) tokens at the start of T


@dataclass
class _CodecRuns:
    """The runs on one set of decoded features (codecs that decode to identical bytes share them), seed by seed."""

    store: FeatureStore  # features as encoded by the first codec of the group
    accuracies: list[float] = field(default_factory=list)  # its own networks' test accuracy
    f32_net_accuracies: list[float] = field(default_factory=list)  # the f32-trained networks on its test features
    f32_net_agreement: list[float] = field(default_factory=list)  # fraction of those predictions equal to on f32


def run(quick: bool, out_dir: Path, *, config: AccuracyConfig | None = None) -> dict[str, Any]:
    """The `accuracy` section: {"rows": one per codec, ...}; the harness puts the rows in latest.json["accuracy"]
    and the rest (backbone, dataset, epochs, targets, method) in its details. `out_dir` is not written to."""
    config = config or (QUICK if quick else FULL)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="mist-accuracy-") as scratch:
            gathered = gather_features(config, Path(scratch))
        injected = inject_vit_outliers(
            gathered.features, seed=config.outlier_seed, prefix_tokens=gathered.prefix_tokens
        )
        rows = compare_codecs(gathered, config, family="plain")
        rows += compare_codecs(
            replace(gathered, features=injected.features), config, family="outliers", injected=injected
        )
        section = _section(rows, gathered, config, injected)
        # The schemes the codec choice was made from, on the same features (error and bytes; no training).
        section["candidates"] = codec_study.study(
            gathered.features, prefix_tokens=gathered.prefix_tokens, seed=config.outlier_seed
        )
    finally:
        torch.set_num_threads(threads)
    section["seconds"] = time.perf_counter() - started
    return section


def gather_features(config: AccuracyConfig, directory: Path) -> GatheredFeatures:
    """Write the synthetic dataset under `directory`, load it as the tuner does, gather every image once."""
    from services.extractor.backbone import load_backbone
    from services.extractor.gather import gather_prefix_sums
    from services.extractor.preprocess import ImagePreprocessor

    loaded = load_backbone(config.backbone, seed=config.backbone_seed, model_kwargs=config.model_kwargs)
    image_size = int(loaded.data_config["input_size"][-1])
    root = directory / "synthetic"
    generate_dataset(
        root, classes=CLASS_NAMES[: config.classes], sizes=config.sizes, image_size=max(32, image_size),
        seed=config.dataset_seed,
    )  # fmt: skip
    dataset = load_dataset(root)
    k = config.k or loaded.geometry.num_blocks
    preprocessor = ImagePreprocessor(loaded.data_config)
    chunks = []
    for start in range(0, len(dataset), config.gather_batch_size):
        items = dataset.items[start : start + config.gather_batch_size]
        images = torch.stack([preprocessor.decode(item.read_bytes()) for item in items])
        chunks.append(gather_prefix_sums(loaded.model, images, [k])[k].numpy())
    geometry = loaded.geometry
    description = (
        f"{loaded.name} {dict(config.model_kwargs)} random init (seed {config.backbone_seed}), "
        f"N={geometry.num_blocks}, T={geometry.tokens}, D={geometry.dims}, k={k}"
    )
    backbone = feature_pb2.BackboneId(name=loaded.name, weights_fingerprint=loaded.weights_fingerprint)
    features = np.concatenate(chunks).astype(np.float32, copy=False)
    return GatheredFeatures(dataset, features, k, backbone, description, geometry.num_prefix_tokens)


def encode_store(gathered: GatheredFeatures, codec_name: str) -> FeatureStore:
    """A FeatureStore holding every image's feature encoded with `codec_name`, as the tuner would receive it."""
    codec = FeatureCodec(CodecConfig.parse(codec_name))
    store = FeatureStore.for_dataset(gathered.dataset, backbone=gathered.backbone)
    for index, feature in enumerate(gathered.features):
        store.add(index, gathered.k, codec.encode(feature, backbone=gathered.backbone, k=gathered.k))
    return store


def decoded_features(store: FeatureStore, k: int) -> np.ndarray:
    """[images, T, D] float32: what training sees from `store`, decoded through the store itself."""
    return store.batch(range(len(store)), k)[0].numpy()


def compare_codecs(
    gathered: GatheredFeatures,
    config: AccuracyConfig,
    *,
    family: str = "plain",
    injected: InjectedFeatures | None = None,
) -> list[dict[str, Any]]:
    """Train on every codec's features with every seed; score each, and the f32 networks on each codec's test set.

    One row per codec (the reference first, the default codec always included), tagged with `family`; `injected`,
    when the features carry injected outliers, adds their error on the ordinary entries."""
    names = [REFERENCE_CODEC, *(CodecConfig.parse(name).name for name in config.codecs), DEFAULT_CODEC.name]
    codecs = list(dict.fromkeys(names))
    groups, group_of, details = _group_codecs(gathered, codecs, injected)
    reference = groups[group_of[REFERENCE_CODEC]]
    _, tokens, dims = gathered.features.shape
    edge = EdgeNetworkConfig(dims=dims, tokens=tokens, num_classes=len(gathered.dataset.class_names))
    train, val, test = (gathered.dataset.indices(split) for split in ("train", "val", "test"))  # type: ignore[arg-type]
    for seed in config.seeds:
        train_config = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=seed)
        for runs in groups.values():  # the reference group first: it was added first
            result = train_edge_network(
                runs.store, gathered.k, edge, train_config, train_indices=train, val_indices=val
            )
            scored = collect_predictions(result.model, runs.store, gathered.k, test)
            runs.accuracies.append(scored.accuracy)
            if runs is reference:
                f32_net, f32_predicted = result.model, scored.predicted
        # The f32-trained network of this seed on each codec's test features: the codec's own error, no training noise.
        for runs in groups.values():
            scored = collect_predictions(f32_net, runs.store, gathered.k, test)
            runs.f32_net_accuracies.append(scored.accuracy)
            runs.f32_net_agreement.append(float((scored.predicted == f32_predicted).mean()))
    return [{"family": family, **_row(name, details[name], groups[group_of[name]], reference)} for name in codecs]


def _group_codecs(
    gathered: GatheredFeatures, codecs: Sequence[str], injected: InjectedFeatures | None
) -> tuple[dict[str, _CodecRuns], dict[str, str], dict[str, dict[str, Any]]]:
    """Encode with every codec; group codecs by the sha256 of what they decode to.

    Returns (digest -> runs, codec -> digest, codec -> its size, feature error and the codec it shares runs with).
    """
    groups: dict[str, _CodecRuns] = {}
    group_of: dict[str, str] = {}
    details: dict[str, dict[str, Any]] = {}
    reference = gathered.features
    for name in codecs:
        store = encode_store(gathered, name)
        decoded = decoded_features(store, gathered.k)
        digest = hashlib.sha256(decoded.tobytes()).hexdigest()
        error = float(np.linalg.norm(decoded - reference) / np.linalg.norm(reference))
        details[name] = {
            "bytes_per_image": store.bytes_per_image(gathered.k),
            "feature_relative_error": error,
            "ordinary_relative_error": injected.ordinary_error(decoded) if injected is not None else error,
            "same_features_as": next((other for other, seen in group_of.items() if seen == digest), None),
        }
        group_of[name] = digest
        groups.setdefault(digest, _CodecRuns(store))
    return groups, group_of, details


def _row(name: str, detail: dict[str, Any], runs: _CodecRuns, reference: _CodecRuns) -> dict[str, Any]:
    accuracies = np.array(runs.accuracies)
    f32_accuracies = np.array(reference.accuracies)
    deltas = accuracies - f32_accuracies
    f32_net = np.array(runs.f32_net_accuracies)
    return {
        "codec": name,
        "is_default": name == DEFAULT_CODEC.name,
        "mean": float(accuracies.mean()),
        "std": sample_std(accuracies),
        "seeds": len(accuracies),
        "accuracies": accuracies.tolist(),
        "paired_delta_mean": float(deltas.mean()),
        "paired_delta_std": sample_std(deltas),
        "paired_delta_min": float(deltas.min()),
        "paired_delta_max": float(deltas.max()),
        "f32_model_on_codec_features": float(f32_net.mean()),
        "f32_model_delta_mean": float((f32_net - f32_accuracies).mean()),
        "f32_model_agreement": float(np.mean(runs.f32_net_agreement)),
        **detail,
    }


def sample_std(values: np.ndarray) -> float:
    """Sample standard deviation (n - 1): the spread a reader should expect from another seed."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


METHOD_TEXT = (
    "The synthetic dataset is written to disk by services.tuner.synthetic and loaded with the tuner's "
    "load_dataset; every image is decoded by the extractor's ImagePreprocessor and gathered once (Gather*, k = N) "
    "by a seeded random-init timm ViT in this process. Each codec encodes every feature with FeatureCodec into a "
    "FeatureStore, which decodes per batch during training exactly as the tuner does; f32-none passes the gathered "
    "floats through unchanged and is the reference. For each seed, every codec trains a fresh edge network with "
    "train_edge_network (the tuner's recipe and defaults: AdamW, cosine with warm-up, keep the best val epoch) on "
    "the same split with the same initialisation and batch order, and is scored on the test split: the paired "
    "difference is codec minus f32-none of the same seed. The f32-trained network of each seed is also scored on "
    "each codec's decoded test features. Codecs that decode to bit-identical features (checked by sha256 of the "
    "decoded arrays) share one set of runs, since training is bitwise deterministic. Feature error is "
    "||decoded - f32|| / ||f32|| over all features. The whole comparison runs twice: on the gathered features "
    "(plain) and on the same features with pretrained-ViT statistics injected by bench/vit_outliers.py "
    "(outliers), float32 of that family being its reference. Accuracies and deltas are fractions in the JSON, "
    "points here."
)


def _section(
    rows: list[dict[str, Any]], gathered: GatheredFeatures, config: AccuracyConfig, injected: InjectedFeatures
) -> dict[str, Any]:
    counts = {split: len(gathered.dataset.indices(split)) for split in ("train", "val", "test")}  # type: ignore[arg-type]
    _, tokens, dims = gathered.features.shape
    edge = EdgeNetworkConfig(dims=dims, tokens=tokens, num_classes=len(gathered.dataset.class_names))
    targets = []
    for default in (row for row in rows if row["is_default"]):
        family, seeds = default["family"], default["seeds"]
        targets.append({
            "name": f"{DEFAULT_CODEC.name} accuracy vs float32, {family} features (paired mean over {seeds} seeds)",
            "target": f">= -{TARGET_MAX_DROP * 100:.1f} points",
            "measured": f"{default['paired_delta_mean'] * 100:+.2f} points (std {default['paired_delta_std'] * 100:.2f})",
            "passed": default["paired_delta_mean"] >= -TARGET_MAX_DROP,
        })  # fmt: skip
        targets.append({
            "name": f"float32-trained networks on {DEFAULT_CODEC.name} features, {family}: agreement with float32",
            "target": f">= {TARGET_MIN_AGREEMENT * 100:.0f} %",
            "measured": f"{default['f32_model_agreement'] * 100:.1f} %",
            "passed": default["f32_model_agreement"] >= TARGET_MIN_AGREEMENT,
        })  # fmt: skip
    return {
        "rows": rows,
        "families": list(dict.fromkeys(row["family"] for row in rows)),
        "reference_codec": REFERENCE_CODEC,
        "default_codec": DEFAULT_CODEC.name,
        "backbone": gathered.description,
        "backbone_pretrained": False,
        "dataset": {"classes": len(gathered.dataset.class_names), **counts, "seed": config.dataset_seed},
        "feature_shape": [tokens, dims],
        "outliers": {
            "seed": config.outlier_seed,
            "outlier_channels": injected.outlier_channels.tolist(),
            "massive_channels": injected.massive_channels.tolist(),
            "high_norm_tokens_per_image": int(injected.high_norm_tokens[0].sum()),
            "rms": injected.rms,
        },
        "edge_network": edge.to_dict(),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed_values": list(config.seeds),
        "target_max_drop": TARGET_MAX_DROP,
        "target_min_agreement": TARGET_MIN_AGREEMENT,
        "targets": targets,
        "method": METHOD_TEXT,
    }


def markdown(section: Mapping[str, Any]) -> str:
    """The section as Markdown: per feature family one row per codec, accuracies and deltas in points, the method."""
    dataset, rows = section["dataset"], section["rows"]
    outliers = section.get("outliers") or {}
    lines = [
        f"Backbone: {section['backbone']} (not pretrained: its features carry a weak but real signal). Synthetic "
        f"dataset: {dataset['classes']} classes, {dataset['train']} train / {dataset['val']} val / {dataset['test']} "
        f"test images. Every codec trains the same edge network ({section['epochs']} epochs, batch "
        f"{section['batch_size']}, lr {section['lr']}) with seeds {section['seed_values']}, paired with float32 "
        "(same seed, split and batch order). Std: sample std over seeds. *f32 net*: the networks trained on "
        "float32 features, scored on this codec's decoded test features (the codec's own error, without training "
        "noise); *agree*: how often their predictions equal those on float32 features. *Ordinary error*: the "
        "feature error on the entries the injected outliers leave alone.",
        "",
    ]
    if outliers:
        lines += [
            f"*outliers* family: the same features with outlier channels {outliers['outlier_channels']} (20-100x the "
            f"RMS in every token), {outliers['high_norm_tokens_per_image']} high-norm token(s) per image (10x) and "
            f"massive activations in channels {outliers['massive_channels']} (100-500x, one token per image); "
            "bench/vit_outliers.py.",
            "",
        ]
    for target in section["targets"]:
        verdict = "met" if target["passed"] else "MISSED"
        lines.append(f"- Target: {target['name']} {target['target']}: {target['measured']}, {verdict}.")
    for family in section.get("families", ["plain"]):
        lines += [
            "",
            f"**{family} features**",
            "",
            "| codec | KiB/img | feature error | ordinary error | accuracy % (mean +- std) | paired delta vs f32, "
            "points (mean +- std) | delta min..max | f32 net on codec (delta) | agree |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in (row for row in rows if row.get("family", "plain") == family):
            name = f"**{row['codec']}**" if row["is_default"] else row["codec"]
            shared = f" (= {row['same_features_as']})" if row["same_features_as"] else ""
            ordinary = row.get("ordinary_relative_error", row["feature_relative_error"])
            lines.append(
                f"| {name}{shared} | {row['bytes_per_image'] / 1024:.1f} | {row['feature_relative_error'] * 100:.3f} % | "
                f"{ordinary * 100:.3f} % | {row['mean'] * 100:.2f} +- {row['std'] * 100:.2f} | "
                f"{row['paired_delta_mean'] * 100:+.2f} +- {row['paired_delta_std'] * 100:.2f} | "
                f"{row['paired_delta_min'] * 100:+.2f}..{row['paired_delta_max'] * 100:+.2f} | "
                f"{row['f32_model_on_codec_features'] * 100:.2f} ({row['f32_model_delta_mean'] * 100:+.2f}) | "
                f"{row['f32_model_agreement'] * 100:.1f} % |"
            )
    lines += ["", "(= x): decodes to exactly the features of codec x, so its runs are x's."]
    if section.get("candidates"):
        float32_bytes = 4 * math.prod(section["feature_shape"])
        lines += [
            "",
            "**Candidate schemes** on the same features (the measurements the default was chosen by; "
            "bench/codec_study.py):",
            "",
            codec_study.markdown(section["candidates"], float32_bytes).rstrip(),
        ]
    if section.get("method"):
        lines += ["", f"*Method.* {section['method']}"]
    return "\n".join(lines) + "\n"


def plots(section: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Paired accuracy difference vs float32 per codec (mean, std bar, min..max), with the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = section["rows"]
    positions = np.arange(len(rows))
    means = np.array([row["paired_delta_mean"] for row in rows]) * 100
    figure, axes = plt.subplots(figsize=(11, 4))
    axes.vlines(positions, [row["paired_delta_min"] * 100 for row in rows], [row["paired_delta_max"] * 100 for row in rows],
                colors="#999999", label="min..max over seeds")  # fmt: skip
    axes.errorbar(positions, means, yerr=[row["paired_delta_std"] * 100 for row in rows], fmt="o", color="#4c72b0",
                  capsize=4, label="mean +- std (paired)")  # fmt: skip
    axes.plot(positions, [row["f32_model_delta_mean"] * 100 for row in rows], "x",
              color="#55a868", label="f32 net on codec features")  # fmt: skip
    axes.axhline(-section["target_max_drop"] * 100, color="#c44e52", linestyle="--", label="target (default codec)")
    axes.axhline(0, color="black", linewidth=0.5)
    axes.set_xticks(positions, [f"{row['codec']} ({row.get('family', 'plain')})" for row in rows], rotation=35,
                    ha="right", fontsize=7)  # fmt: skip
    axes.set_ylabel("accuracy - float32 (points)")
    axes.set_title(f"Codec cost in accuracy ({rows[0]['seeds']} seeds)")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "accuracy_codecs.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20/5/20 images per class, 2 seeds, 15 epochs")
    parser.add_argument("--out", type=Path, help="also write accuracy.json and accuracy_codecs.png into this folder")
    args = parser.parse_args(argv)
    section = run(args.quick, args.out or Path(tempfile.gettempdir()))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "accuracy.json").write_text(json.dumps(section, indent=2) + "\n")
        plots(section, args.out)
    print(markdown(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
