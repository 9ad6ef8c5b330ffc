"""Benchmark section 8: the tuner's default training recipe against a logistic regression on the raw pixels, and
against candidate recipes, on a low-level task (handwriting-like glyphs) and the natural-image-like shapes task.

A user found `mist tune` defaults clearly below a pixel logistic regression on a handwriting-like task; this section
keeps that comparison in every run (docs/explanation/recipe.md has the diagnosis). Features are gathered once per
task from a small random-init ViT in this process and encoded with the default codec, as `mist tune` receives them;
k is the one tune's `--k auto` chooses (select_k with the default recipe); every recipe trains on every seed with
the same split, so differences are paired. The logistic regression reads the pixels of the same image files.

    .venv/bin/python -m bench.recipe --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.accuracy import sample_std
from services.common.errors import InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.codec import DEFAULT_CODEC, FeatureCodec
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.common.wire.gather_modes import candidate_ks
from services.tuner.data import Dataset, load_dataset
from services.tuner.evaluation import collect_predictions
from services.tuner.feature_store import FeatureStore
from services.tuner.options import TrainConfig, TuneOptions
from services.tuner.synthetic import KINDS, Kind, SplitSizes, generate_dataset
from services.tuner.training import select_k, train_edge_network

TARGET_GLYPHS_VS_PIXELS = 0.0  # glyphs: the default recipe at least matches the pixel logistic regression
TARGET_SHAPES_MAX_DROP = 0.005  # shapes: the default at most 0.5 points below the previous default
LR_PENALTIES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # L2 strengths tried on val (sum of W^2 / 2)
_LBFGS_ITERATIONS = 200  # full-batch L-BFGS steps per penalty: converged to 1e-4 in loss on these sizes


@dataclass(frozen=True)
class Recipe:
    """A training recipe: TrainConfig fields and edge-network fields over the tuner's defaults."""

    name: str  # how the report names it
    description: str  # what it changes, for the reader
    train: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig fields; the rest are TrainConfig's defaults
    edge: Mapping[str, Any] = field(default_factory=dict)  # EdgeNetworkConfig fields over `mist tune`'s choice

    def train_config(self, seed: int, epochs: int | None) -> TrainConfig:
        values = {**self.train, "seed": seed}
        if epochs is not None:  # the quick profile shortens every recipe alike
            values["epochs"] = epochs
        return TrainConfig(**values)


# The recipe `mist tune` used before this section existed, spelled out, so a later change of the defaults is always
# measured against it (the shapes target).
PREVIOUS_DEFAULT = Recipe(
    "previous default",
    "epochs 30, batch 32, lr 1e-3, weight decay 1e-4, 10 % warm-up, no label smoothing, keep best; "
    "4 blocks, rank 16, 1 head, CLS pooling",
    train={
        "epochs": 30,
        "batch_size": 32,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_epochs": None,
        "label_smoothing": 0.0,
        "keep": "best",
    },  # fmt: skip
    edge={"num_blocks": 4, "rank": 16, "heads": 1, "pooling": "cls"},
)
DEFAULT = Recipe("default", "TrainConfig() and the edge network `mist tune` builds for a new task")
# The candidates that docs/explanation/recipe.md reports on (more were tried there, on two seeds).
CANDIDATES: tuple[Recipe, ...] = (
    Recipe("lr 3e-3", "peak learning rate 3e-3 (3x)", train={"lr": 3e-3}),
    Recipe(
        "regularised",
        "weight decay 0.05 and label smoothing 0.1",
        train={"weight_decay": 0.05, "label_smoothing": 0.1},
    ),
    Recipe("heads 4", "4 attention heads of r/4 dims (`--heads 4`: same parameters and MACs)", edge={"heads": 4}),
)


@dataclass(frozen=True)
class RecipeBenchConfig:
    """One run of the recipe benchmark."""

    backbone: str = "vit_tiny_patch16_224"  # timm name; always a seeded random init (nothing is downloaded)
    model_kwargs: Mapping[str, Any] = field(
        default_factory=lambda: {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3}
    )  # ViT-Ti's 12 blocks and 192 dims on 32 px images in 4 px patches: 65 tokens, fine strokes span 1-2 patches
    backbone_seed: int = 0
    image_size: int = 32  # the glyphs are drawn for this size; shapes at their minimum
    tasks: tuple[Kind, ...] = KINDS  # synthetic kinds compared: shapes and glyphs
    sizes: SplitSizes = SplitSizes(train=40, val=10, test=40)  # images per class in each split
    dataset_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # training seeds; every recipe runs on every one (paired)
    epochs: int | None = None  # None: each recipe's own (the default's 30); the quick profile shortens all alike
    recipes: tuple[Recipe, ...] = (PREVIOUS_DEFAULT, DEFAULT, *CANDIDATES)
    threads: int = 1  # torch threads while training: tiny networks are fastest on one
    gather_batch_size: int = 128

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise InvalidArgumentError(f"seeds must be distinct and at least one, got {self.seeds!r}")
        names = [recipe.name for recipe in self.recipes]
        if DEFAULT.name not in names or PREVIOUS_DEFAULT.name not in names or len(set(names)) != len(names):
            raise InvalidArgumentError(f"recipes need distinct names including the two defaults, got {names}")
        for task in self.tasks:
            if task not in KINDS:
                raise InvalidArgumentError(f"unknown task {task!r}; choose from {', '.join(KINDS)}")


FULL = RecipeBenchConfig()
# Fewer images, seeds and epochs: a run in well under a minute whose differences are within noise.
QUICK = RecipeBenchConfig(sizes=SplitSizes(train=12, val=4, test=12), seeds=(0, 1), epochs=8)
# The test suite's micro ViT (4 blocks, 17 tokens x 32 dims) on a handful of images: proves the plumbing only.
SMOKE = RecipeBenchConfig(
    model_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2},
    sizes=SplitSizes(train=3, val=2, test=2),
    seeds=(0, 1),
    epochs=2,
)
PROFILE_CONFIGS = {"full": FULL, "quick": QUICK, "smoke": SMOKE}


@dataclass
class TaskData:
    """One task's images, their pixels and their gathered features (every candidate k), computed once."""

    kind: Kind
    dataset: Dataset
    store: FeatureStore  # default-codec messages, as `mist tune` holds them
    pixels: np.ndarray  # float32 [images, pixels]: the image files' values / 255 (grayscale or RGB)
    ks: list[int]
    edge: EdgeNetworkConfig  # what `mist tune` builds for a new task on these features


def run(profile: str, out_dir: Path, *, config: RecipeBenchConfig | None = None) -> dict[str, Any]:
    """The `recipe` section: {"rows": one per task and recipe (the pixel baseline included), ...}. `out_dir` is
    not written to."""
    config = config or PROFILE_CONFIGS[profile]
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    rows: list[dict[str, Any]] = []
    tasks: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="mist-recipe-") as scratch:
            loaded = _load_backbone(config)
            for kind in config.tasks:
                task_started = time.perf_counter()
                data = prepare_task(kind, config, loaded, Path(scratch))
                with data.store:
                    task_rows, summary = compare_recipes(data, config)
                rows += task_rows
                tasks[kind] = {**summary, "seconds": time.perf_counter() - task_started}
    finally:
        torch.set_num_threads(threads)
    return _section(rows, tasks, config, loaded.description, time.perf_counter() - started)


@dataclass(frozen=True)
class _Backbone:
    model: torch.nn.Module
    data_config: Mapping[str, Any]
    backbone: feature_pb2.BackboneId
    num_blocks: int
    tokens: int
    dims: int
    prefix_tokens: int
    description: str


def _load_backbone(config: RecipeBenchConfig) -> _Backbone:
    from services.extractor.backbone import load_backbone

    loaded = load_backbone(config.backbone, seed=config.backbone_seed, model_kwargs=config.model_kwargs)
    geometry = loaded.geometry
    description = (
        f"{loaded.name} {dict(config.model_kwargs)} random init (seed {config.backbone_seed}), "
        f"N={geometry.num_blocks}, T={geometry.tokens}, D={geometry.dims}"
    )
    backbone = feature_pb2.BackboneId(name=loaded.name, weights_fingerprint=loaded.weights_fingerprint)
    return _Backbone(
        loaded.model, loaded.data_config, backbone, geometry.num_blocks, geometry.tokens, geometry.dims,
        geometry.num_prefix_tokens, description,
    )  # fmt: skip


def prepare_task(kind: Kind, config: RecipeBenchConfig, loaded: _Backbone, directory: Path) -> TaskData:
    """Write the task's images, load them as the tuner does, gather every candidate k once, read the pixels."""
    from PIL import Image

    from services.extractor.gather import gather_prefix_sums
    from services.extractor.preprocess import ImagePreprocessor
    from services.tuner.tune import resolve_edge_config

    root = directory / kind
    generate_dataset(root, kind=kind, sizes=config.sizes, image_size=config.image_size, seed=config.dataset_seed)
    dataset = load_dataset(root)
    ks = candidate_ks(loaded.num_blocks)
    preprocessor = ImagePreprocessor(loaded.data_config)
    codec = FeatureCodec(DEFAULT_CODEC)
    store = FeatureStore.for_dataset(dataset, backbone=loaded.backbone)
    pixels = []
    for start in range(0, len(dataset), config.gather_batch_size):
        items = dataset.items[start : start + config.gather_batch_size]
        images = torch.stack([preprocessor.decode(item.read_bytes()) for item in items])
        with torch.inference_mode():
            gathered = gather_prefix_sums(loaded.model, images, ks)
        for k, features in gathered.items():
            for offset, feature in enumerate(features.numpy()):
                store.add(start + offset, k, codec.encode(feature, backbone=loaded.backbone, k=k))
        for item in items:
            with Image.open(item.path) as image:  # the file's own mode: L for glyphs, RGB for shapes
                pixels.append(np.asarray(image, dtype=np.float32).ravel() / 255)
    # resolve_edge_config reads only dims, tokens and the prefix-token count of a new task's backbone.
    info = types.SimpleNamespace(dims=loaded.dims, tokens=loaded.tokens, num_prefix_tokens=loaded.prefix_tokens)
    edge = resolve_edge_config(None, info, dataset.class_names, TuneOptions(task=f"bench-{kind}"))  # type: ignore[arg-type]
    return TaskData(kind, dataset, store, np.stack(pixels), ks, edge)


def pixel_logistic_regression(data: TaskData) -> dict[str, Any]:
    """Multinomial logistic regression on standardised raw pixels, L2 penalty chosen on val (full-batch L-BFGS).

    Convex and started at zero, so it has no seed: the same model pairs with every seed of the edge network.
    """
    train, val, test = (data.dataset.indices(split) for split in ("train", "val", "test"))  # type: ignore[arg-type]
    labels = torch.tensor(data.store.labels)
    mean, std = data.pixels[train].mean(0), data.pixels[train].std(0) + 1e-3
    inputs = torch.from_numpy((data.pixels - mean) / std)
    classes = len(data.dataset.class_names)
    by_penalty: dict[str, dict[str, float]] = {}
    best: tuple[float, float] | None = None
    for penalty in LR_PENALTIES:
        weights, bias = _fit_softmax(inputs[train], labels[train], classes, penalty)
        with torch.no_grad():
            predicted = (inputs @ weights + bias).argmax(1)
        scores = {split: float((predicted[idx] == labels[idx]).float().mean()) for split, idx in
                  (("train", train), ("val", val), ("test", test))}  # fmt: skip
        by_penalty[f"{penalty:g}"] = scores
        if best is None or scores["val"] > best[0]:  # ties keep the weaker penalty tried first
            best = (scores["val"], penalty)
    chosen = by_penalty[f"{best[1]:g}"]  # type: ignore[index]
    return {"penalty": best[1], "by_penalty": by_penalty, **chosen}  # type: ignore[index]


def _fit_softmax(
    inputs: torch.Tensor, labels: torch.Tensor, classes: int, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [inputs, classes] and bias minimising mean cross-entropy + penalty * sum(W^2) / 2 (bias free)."""
    weights = torch.zeros(inputs.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights, bias], lr=1.0, max_iter=_LBFGS_ITERATIONS, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(inputs @ weights + bias, labels) + penalty * weights.square().sum() / 2
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach(), bias.detach()


def compare_recipes(data: TaskData, config: RecipeBenchConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every recipe on every seed at the k `mist tune --k auto` chooses; the pixel baseline; paired differences."""
    train, val, test = (data.dataset.indices(split) for split in ("train", "val", "test"))  # type: ignore[arg-type]
    k_started = time.perf_counter()
    default_config = DEFAULT.train_config(config.seeds[0], config.epochs)
    selection = select_k(data.store, data.ks, data.edge, default_config, train_indices=train, val_indices=val)
    k_seconds = time.perf_counter() - k_started
    pixels = pixel_logistic_regression(data)
    runs: dict[str, list[dict[str, Any]]] = {}
    same_as: dict[str, str] = {}
    seen: dict[tuple[str, str], str] = {}
    for recipe in config.recipes:
        train_config = recipe.train_config(0, config.epochs)
        edge = dataclasses.replace(data.edge, **recipe.edge)
        key = (json.dumps(dataclasses.asdict(train_config), sort_keys=True), edge.to_json())
        if key in seen:  # the same recipe under another name (the defaults, until one changes): run it once
            same_as[recipe.name] = seen[key]
            continue
        seen[key] = recipe.name
        runs[recipe.name] = [
            _train_and_score(data, selection.chosen_k, edge, recipe.train_config(seed, config.epochs), train, val, test)
            for seed in config.seeds
        ]
    for name, original in same_as.items():
        runs[name] = runs[original]
    reference = np.array([run["test"] for run in runs[PREVIOUS_DEFAULT.name]])
    rows = [_pixel_row(data.kind, pixels, len(config.seeds), runs[DEFAULT.name])]
    for recipe in config.recipes:
        accuracies = np.array([run["test"] for run in runs[recipe.name]])
        rows.append(
            {
                "task": data.kind,
                "recipe": recipe.name,
                "description": recipe.description,
                "is_default": recipe.name == DEFAULT.name,
                "same_as": same_as.get(recipe.name),
                "k": selection.chosen_k,
                "seeds": len(accuracies),
                "accuracies": accuracies.tolist(),
                "mean": float(accuracies.mean()),
                "std": sample_std(accuracies),
                "train_accuracy": float(np.mean([run["train"] for run in runs[recipe.name]])),
                "best_val_accuracy": float(np.mean([run["best_val"] for run in runs[recipe.name]])),
                "kept_epoch_mean": float(np.mean([run["kept_epoch"] for run in runs[recipe.name]])),
                "curve": _mean_curve(runs[recipe.name]),
                **_paired("vs_pixels", accuracies - pixels["test"]),
                **_paired("vs_previous", accuracies - reference),
                "seconds_per_run": float(np.mean([run["seconds"] for run in runs[recipe.name]])),
            }
        )
    summary = {
        "classes": len(data.dataset.class_names),
        "counts": {split: len(data.dataset.indices(split)) for split in ("train", "val", "test")},  # type: ignore[arg-type]
        "k_selection": selection.to_dict(),
        "k_search_seconds": k_seconds,
        "pixels": {key: value for key, value in pixels.items() if key != "by_penalty"},
        "pixels_by_penalty": pixels["by_penalty"],
        "edge_network": data.edge.to_dict(),
        "pixel_inputs": int(data.pixels.shape[1]),
    }
    return rows, summary


def _train_and_score(
    data: TaskData,
    k: int,
    edge: EdgeNetworkConfig,
    train_config: TrainConfig,
    train: Sequence[int],
    val: Sequence[int],
    test: Sequence[int],
) -> dict[str, Any]:
    result = train_edge_network(data.store, k, edge, train_config, train_indices=train, val_indices=val)
    return {
        "test": collect_predictions(result.model, data.store, k, test).accuracy,
        "train": collect_predictions(result.model, data.store, k, train).accuracy,  # the kept weights, in eval mode
        "best_val": result.best_val_accuracy,
        "kept_epoch": result.kept_epoch,
        "curve": [(stats.train_accuracy, stats.val_accuracy) for stats in result.history],
        "seconds": result.seconds,
    }


def _mean_curve(runs: Sequence[dict[str, Any]]) -> list[list[float]]:
    """Per epoch, [train accuracy during the epoch, val accuracy after it], averaged over seeds."""
    curves = np.array([run["curve"] for run in runs], dtype=np.float64)
    return [[round(float(a), 4), round(float(b), 4)] for a, b in curves.mean(0)]


def _pixel_row(kind: str, pixels: Mapping[str, Any], seeds: int, default_runs: Sequence[dict[str, Any]]) -> dict:
    accuracies = np.full(seeds, pixels["test"])
    default = np.array([run["test"] for run in default_runs])
    return {
        "task": kind,
        "recipe": "pixel logistic regression",
        "description": f"multinomial, L2 {pixels['penalty']:g} (chosen on val), standardised raw pixels",
        "is_default": False,
        "same_as": None,
        "k": None,
        "seeds": seeds,
        "accuracies": accuracies.tolist(),
        "mean": float(pixels["test"]),
        "std": 0.0,
        "train_accuracy": float(pixels["train"]),
        "best_val_accuracy": float(pixels["val"]),
        **_paired("vs_pixels", accuracies - pixels["test"]),
        "default_minus_pixels": float((default - pixels["test"]).mean()),
    }


def _paired(prefix: str, deltas: np.ndarray) -> dict[str, float]:
    return {
        f"{prefix}_mean": float(deltas.mean()),
        f"{prefix}_std": sample_std(deltas),
        f"{prefix}_min": float(deltas.min()),
        f"{prefix}_max": float(deltas.max()),
    }


METHOD_TEXT = (
    "Each task's images are written by services.tuner.synthetic (glyphs: grayscale handwriting-like digits, the "
    "class in a few thin strokes; shapes: the demo's RGB objects on cluttered backgrounds) and loaded with the "
    "tuner's load_dataset. A seeded random-init timm ViT in this process gathers every image once at every "
    "candidate k (ImagePreprocessor, gather_prefix_sums), encoded with the default codec into a FeatureStore that "
    "decodes per batch as `mist tune` does. k is the one `mist tune --k auto` chooses: select_k with the default "
    "recipe (seed of the first run). The edge network is the one tune builds for a new task (resolve_edge_config); "
    "a recipe changes TrainConfig fields or edge-network fields over it. Every recipe trains with train_edge_network "
    "on every seed (initialisation and batch order; same split) and is scored on the test split with the kept "
    "(best val) weights: paired differences are per seed. The pixel baseline is a multinomial logistic regression "
    "on the same image files' pixels (value / 255, standardised on train), L2 penalty chosen on val from "
    f"{', '.join(f'{p:g}' for p in LR_PENALTIES)}, fitted by full-batch L-BFGS; it has no seed, so each seed's "
    "difference is that seed's edge network minus the one baseline. Recipes that resolve to the same configuration "
    "run once."
)


def _section(
    rows: list[dict[str, Any]], tasks: dict[str, Any], config: RecipeBenchConfig, backbone: str, seconds: float
) -> dict[str, Any]:
    targets = []
    for row in rows:
        if not row["is_default"]:
            continue
        if row["task"] == "glyphs":
            targets.append(
                {
                    "name": f"glyphs: default recipe vs pixel logistic regression (paired mean over {row['seeds']} "
                    "seeds)",
                    "target": f">= {TARGET_GLYPHS_VS_PIXELS * 100:+.1f} points",
                    "measured": f"{row['vs_pixels_mean'] * 100:+.2f} points (std {row['vs_pixels_std'] * 100:.2f}; "
                    f"{row['mean'] * 100:.1f} % vs {tasks['glyphs']['pixels']['test'] * 100:.1f} %)",
                    "passed": row["vs_pixels_mean"] >= TARGET_GLYPHS_VS_PIXELS,
                }
            )
        elif row["task"] == "shapes":
            targets.append(
                {
                    "name": f"shapes: default recipe vs the previous default (paired mean over {row['seeds']} seeds)",
                    "target": f">= -{TARGET_SHAPES_MAX_DROP * 100:.1f} points",
                    "measured": f"{row['vs_previous_mean'] * 100:+.2f} points (std {row['vs_previous_std'] * 100:.2f})"
                    + (" (the same recipe)" if row["same_as"] else ""),
                    "passed": row["vs_previous_mean"] >= -TARGET_SHAPES_MAX_DROP,
                }
            )
    return {
        "rows": rows,
        "tasks": tasks,
        "backbone": backbone,
        "image_size": config.image_size,
        "sizes": dataclasses.asdict(config.sizes),
        "seed_values": list(config.seeds),
        "epochs": config.epochs,
        "recipes": [dataclasses.asdict(recipe) for recipe in config.recipes],
        "default_train_config": dataclasses.asdict(TrainConfig()),
        "codec": DEFAULT_CODEC.name,
        "seconds": seconds,
        "targets": targets,
        "method": METHOD_TEXT,
    }


def markdown(section: Mapping[str, Any]) -> str:
    """Per task: each recipe's test accuracy, its paired differences against the pixel baseline and the previous
    default, train accuracy (the kept weights) and the k-search outcome; then the targets and the method."""
    sizes = section["sizes"]
    epochs = section["epochs"]
    lines = [
        f"Backbone: {section['backbone']} (not pretrained). Images: {section['image_size']} px, "
        f"{sizes['train']} train / {sizes['val']} val / {sizes['test']} test per class. Seeds {section['seed_values']}"
        + (f", every recipe shortened to {epochs} epochs (quick profile)" if epochs else "")
        + f"; features encoded with {section['codec']}. Paired deltas are in accuracy points (mean +- sample std "
        "over seeds, min..max). *Train*: accuracy of the kept weights on the train split.",
        "",
    ]
    for target in section["targets"]:
        verdict = "met" if target["passed"] else "MISSED"
        lines.append(f"- Target: {target['name']} {target['target']}: {target['measured']}, {verdict}.")
    for task, summary in section["tasks"].items():
        selection = summary["k_selection"]
        scores = ", ".join(f"k={k}: {v * 100:.0f} %" for k, v in selection["val_accuracy_by_k"].items())
        lines += [
            "",
            f"**{task}** ({summary['classes']} classes; k = {selection['chosen_k']} chosen on val after "
            f"{selection['epochs']} epochs each: {scores}; pixel baseline: {summary['pixel_inputs']} inputs, L2 "
            f"{summary['pixels']['penalty']:g})",
            "",
            "| recipe | test accuracy % (mean +- std) | vs pixel LR, points | min..max | vs previous default, points "
            "| train % | best val % | what it changes |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in (row for row in section["rows"] if row["task"] == task):
            name = f"**{row['recipe']}**" if row["is_default"] else row["recipe"]
            shared = f" (= {row['same_as']})" if row.get("same_as") else ""
            previous = (
                f"{row['vs_previous_mean'] * 100:+.2f} +- {row['vs_previous_std'] * 100:.2f}"
                if "vs_previous_mean" in row
                else ""
            )
            lines.append(
                f"| {name}{shared} | {row['mean'] * 100:.2f} +- {row['std'] * 100:.2f} | "
                f"{row['vs_pixels_mean'] * 100:+.2f} +- {row['vs_pixels_std'] * 100:.2f} | "
                f"{row['vs_pixels_min'] * 100:+.2f}..{row['vs_pixels_max'] * 100:+.2f} | {previous} | "
                f"{row['train_accuracy'] * 100:.1f} | {row['best_val_accuracy'] * 100:.1f} | {row['description']} |"
            )
    lines += ["", "(= x): resolves to exactly recipe x's configuration, so its runs are x's."]
    if section.get("method"):
        lines += ["", f"*Method.* {section['method']}"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12/4/12 images per class, 2 seeds, 8 epochs")
    parser.add_argument("--out", type=Path, help="also write recipe.json into this folder")
    args = parser.parse_args(argv)
    section = run("quick" if args.quick else "full", args.out or Path(tempfile.gettempdir()))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "recipe.json").write_text(json.dumps(section, indent=2) + "\n")
    print(markdown(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
