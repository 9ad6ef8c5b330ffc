"""Benchmark section 10: segmentation on a hierarchical backbone (pvt_v2), as in the paper's appendix.

Three measurements, all through a real extractor process on 127.0.0.1:
- bytes per image on the wire for the MIST aggregate, every stage's output (what a side network needs) and the last
  stage alone (a frozen encoder), with the default codec and float32, at the profile's input size (512 px in full);
- mIoU of the same dense edge network (LAE blocks + per-token head, bilinear upsampling) trained on the aggregate
  and on the last stage alone, same recipe and budget, on the synthetic segmentation layout, paired over seeds;
- peak RSS of an edge fine-tune on 800 images at 512 px, in a fresh process of the tuner-only CPU environment.

    .venv/bin/python -m bench.segmentation --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BackboneSpec, Profile
from bench.edge import Environment, ensure_environment, run_probe
from bench.servers import extractor_server
from services.common.clients.extractor import ExtractorClient, ImageItem
from services.common.pb import feature_pb2
from services.common.wire.codec import DEFAULT_CODEC
from services.tuner.options import TrainConfig
from services.tuner.segmentation import load_masks
from services.tuner.segmentation_data import load_segmentation_dataset, write_synthetic_segmentation

PVT_B0 = BackboneSpec("pvt_v2_b0", label="pvt_v2_b0 (random init)")
TINY_PVT = BackboneSpec(
    "pvt_v2_b0",
    {"depths": [1, 1, 1, 1], "embed_dims": [16, 24, 32, 48], "num_heads": [1, 1, 1, 2], "mlp_ratios": [2, 2, 2, 2]},
    label="pvt_v2_b0 shrunk (1 block and 16-48 dims per stage, random init)",
)
_LENGTH_BYTES = 8  # bench/edge_probe.py's record framing: u64 length, then a serialized FeatureTensor


@dataclass(frozen=True)
class SegmentationBenchConfig:
    backbone: BackboneSpec = PVT_B0
    input_size: int = 512  # the extractor's --input-size: the paper's ADE20K crop
    wire_images: int = 16  # images sent in each mode and codec for the byte counts
    picture_size: int = 128  # px of the synthetic pictures (squashed to input_size by the extractor)
    training: int = 240
    validation: int = 80
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 16
    rss_images: int = 800  # the figure: an edge fine-tune on 800 images at 512 px
    rss_epochs: int = 2
    environment: Environment = "edge-venv"
    threads: int = 2
    weights: str = ""  # a weights file for the backbone (python -m bench.segmentation --weights); "" = random init


FULL = SegmentationBenchConfig()
QUICK = SegmentationBenchConfig(input_size=256, wire_images=8, training=96, validation=32, seeds=(0, 1, 2), epochs=15,
                                rss_images=200, rss_epochs=1)  # fmt: skip
SMOKE = SegmentationBenchConfig(backbone=TINY_PVT, input_size=128, wire_images=3, picture_size=64, training=12,
                                validation=4, seeds=(0, 1), epochs=2, rss_images=8, rss_epochs=1,
                                environment="current", threads=1)  # fmt: skip
PROFILE_CONFIGS: dict[str, SegmentationBenchConfig] = {"full": FULL, "quick": QUICK, "smoke": SMOKE}
MODES = ("mist", "stages", "last_stage")


def run(profile: Profile, out_dir: Path, *, config: SegmentationBenchConfig | None = None) -> dict[str, Any]:
    """The `segmentation` section (an object): wire bytes, paired mIoU, edge peak RSS, targets. `out_dir` is not
    written to."""
    import torch

    config = config or PROFILE_CONFIGS[profile]
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="mist-seg-bench-") as scratch:
            root = write_synthetic_segmentation(Path(scratch) / "data", size=config.picture_size,
                                                per_split={"training": config.training,
                                                           "validation": config.validation})  # fmt: skip
            flags = ["--input-size", str(config.input_size), "--max-queue-delay-ms", "2", "--torch-threads",
                     str(config.threads), *(["--weights", config.weights] if config.weights else [])]  # fmt: skip
            with extractor_server(config.backbone, profile, metrics=False, flags=flags) as server:
                with ExtractorClient(server.target) as client:
                    info = client.describe()
                    wire = measure_wire(client, root, config, info.num_blocks)
                    fetched = fetch_both(client, root, info.num_blocks)
            data = load_segmentation_dataset(root)
            masks = load_masks(data.split("training") + data.split("validation"), max(1, config.input_size // 8))
            miou = compare_miou(fetched, masks, len(data.class_names), info, config)
            rss = measure_rss(fetched["mist"], masks, len(data.class_names), info, config, Path(scratch))
    finally:
        torch.set_num_threads(threads)
    backbone = config.backbone.to_dict()
    if info.pretrained:
        backbone["label"] = f"{config.backbone.name} (weights {Path(config.weights).name})"
    section = {
        "backbone": backbone, "pretrained": info.pretrained, "input_size": config.input_size,
        "stages": [list(stage) for stage in info.stages], "describe_float32_bytes": dict(info.baselines),
        "wire": wire, "miou": miou, "edge_rss": rss, "config": _config_dict(config),
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    section["targets"] = targets(section)
    section["method"] = METHOD_TEXT
    return section


def _config_dict(config: SegmentationBenchConfig) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    values["backbone"] = config.backbone.to_dict()
    return values


def _pictures(root: Path, split: str) -> list[Path]:
    return sorted((root / "images" / split).glob("*.png"))


def measure_wire(client: ExtractorClient, root: Path, config: SegmentationBenchConfig, stages: int) -> list[dict]:
    """Mean serialized FeatureTensor bytes per image (every tensor of the image: S of them for `stages`)."""
    pictures = _pictures(root, "training")[: config.wire_images]
    rows = []
    for codec in (DEFAULT_CODEC.name, "f32-none"):
        for mode in MODES:
            ks = (stages,) if mode == "mist" else ()
            items = (ImageItem(p.name, p.read_bytes()) for p in pictures)
            sizes = []
            for result in client.extract(items, mode=mode, ks=ks, codec=codec):
                if result.error is not None:
                    raise RuntimeError(f"{mode}/{codec}: {result.error.reason}: {result.error.message}")
                sizes.append(sum(feature.ByteSize() for feature in result.features))
            rows.append(
                {"mode": mode, "codec": codec, "images": len(sizes), "bytes_per_image": statistics.fmean(sizes)}
            )
    return rows


def fetch_both(client: ExtractorClient, root: Path, stages: int) -> dict[str, list[feature_pb2.FeatureTensor]]:
    """Every picture's (training then validation) aggregate and last-stage output, default codec, as received."""
    pictures = _pictures(root, "training") + _pictures(root, "validation")
    fetched: dict[str, list[feature_pb2.FeatureTensor]] = {}
    for mode, ks in (("mist", (stages,)), ("last_stage", ())):
        items = (ImageItem(p.name, p.read_bytes()) for p in pictures)
        messages = []
        for result in client.extract(items, mode=mode, ks=ks, codec=DEFAULT_CODEC.name):
            if result.error is not None:
                raise RuntimeError(f"{mode}: {result.error.reason}: {result.error.message}")
            message = feature_pb2.FeatureTensor()
            message.CopyFrom(result.features[0])
            if mode != "mist":  # the store holds MIST slots; the payload stays the last stage's, as received
                message.mode, message.k = feature_pb2.GATHER_MODE_MIST, stages
            messages.append(message)
        fetched[mode] = messages
    return fetched


def compare_miou(
    fetched: Mapping[str, list], masks: np.ndarray, num_classes: int, info: Any, config: SegmentationBenchConfig
) -> dict:
    """The same dense network and recipe on the aggregate and on the last stage (`masks`: training pictures, then
    validation ones, as fetched); validation mIoU per seed."""
    from services.common.wire.edge_spec import EdgeNetworkConfig, macs_per_image, trainable_parameters
    from services.tuner.feature_store import FeatureStore
    from services.tuner.segmentation import score_dense, train_dense_network

    label_size = masks.shape[-1]
    train, test = list(range(config.training)), list(range(config.training, len(masks)))
    edge = EdgeNetworkConfig(dims=info.dims, tokens=info.tokens, num_classes=num_classes, pooling="dense",
                             rank=min(16, info.dims))  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {}
    for mode, messages in fetched.items():
        runs[mode] = []
        with FeatureStore([0] * len(masks), num_classes=edge.num_classes) as store:
            for index, message in enumerate(messages):
                store.add(index, info.num_blocks, message)
            for seed in config.seeds:
                train_config = TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=seed,
                                           keep="final")  # fmt: skip
                result = train_dense_network(store, info.num_blocks, masks, edge, train_config, train_indices=train)
                scores = score_dense(result.model, store, info.num_blocks, masks, test)
                runs[mode].append({"seed": seed, "miou": scores.scores.miou,
                                   "pixel_accuracy": scores.scores.pixel_accuracy, "seconds": result.seconds})  # fmt: skip
    deltas = [m["miou"] - b["miou"] for m, b in zip(runs["mist"], runs["last_stage"], strict=True)]

    def summary(values: Sequence[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values)}  # fmt: skip

    return {
        "label_size": label_size, "train_images": len(train), "test_images": len(test), "edge": edge.to_dict(),
        "parameters": trainable_parameters(edge), "macs_per_image": macs_per_image(edge), "runs": runs,
        "mist": summary([r["miou"] for r in runs["mist"]]), "last_stage": summary([r["miou"] for r in runs["last_stage"]]),
        "delta": summary(deltas),
    }  # fmt: skip


def measure_rss(
    messages: Sequence[feature_pb2.FeatureTensor],
    masks: np.ndarray,
    num_classes: int,
    info: Any,
    config: SegmentationBenchConfig,
    scratch: Path,
) -> dict:
    """An edge fine-tune on `rss_images` aggregates (received ones, cycled: RSS does not depend on the values) with
    their masks, in a fresh process; its peak RSS against the same environment's `import torch`."""
    environment = ensure_environment(config.environment)
    features = scratch / "rss-features.bin"
    with features.open("wb") as handle:
        for index in range(config.rss_images):
            body = messages[index % len(messages)].SerializeToString()
            handle.write(len(body).to_bytes(_LENGTH_BYTES, "little") + body)
    mask_file = scratch / "rss-masks.npy"
    np.save(mask_file, masks[np.arange(config.rss_images) % len(masks)])
    manifest = scratch / "rss-manifest.json"
    manifest.write_text(json.dumps({"k": info.num_blocks, "num_classes": num_classes,
                                    "images": config.rss_images}))  # fmt: skip
    baseline = run_probe(environment.python, "import-torch")
    arguments = ["--features", str(features), "--masks", str(mask_file), "--manifest", str(manifest), "--epochs",
                 str(config.rss_epochs)]  # fmt: skip
    probe = run_probe(environment.python, "finetune-dense", arguments, threads=config.threads)
    return {"environment": environment.note, "baseline_peak_rss_bytes": baseline["peak_rss_bytes"], **probe}


def targets(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    wire = {(row["mode"], row["codec"]): row["bytes_per_image"] for row in section["wire"]}
    codec = DEFAULT_CODEC.name
    mist, stages, last = (wire[(mode, codec)] for mode in MODES)
    delta = section["miou"]["delta"]
    return [
        {"name": f"bytes per image at {section['input_size']} px, {codec}: MIST aggregate below every stage's output",
         "target": "< stages", "measured": f"{mist:,.0f} B vs {stages:,.0f} B ({stages / mist:.1f}x); last stage "
         f"{last:,.0f} B", "passed": mist < stages},
        {"name": f"mIoU: MIST aggregate vs last stage only, same head and budget (paired over "
         f"{len(section['miou']['runs']['mist'])} seeds)", "target": "> 0",
         "measured": f"{delta['mean'] * 100:+.2f} points (std {delta['std'] * 100:.2f}, min {delta['min'] * 100:+.2f}); "
         f"{section['miou']['mist']['mean'] * 100:.1f} vs {section['miou']['last_stage']['mean'] * 100:.1f}",
         "passed": delta["mean"] > 0},
        {"name": f"edge fine-tune peak RSS, {section['edge_rss']['images']} images at {section['input_size']} px",
         "target": "reported", "measured": f"{section['edge_rss']['peak_rss_bytes'] / 1e6:.0f} MB (import torch alone "
         f"{section['edge_rss']['baseline_peak_rss_bytes'] / 1e6:.0f} MB)", "passed": True},
    ]  # fmt: skip


METHOD_TEXT = (
    "One extractor process (`python -m services.extractor.server --backbone pvt_v2_b0 --input-size N`, random init, "
    "127.0.0.1) serves every figure. Wire bytes: the serialized FeatureTensor messages of each image as the client "
    "received them (every stage's tensors summed for the stages mode), mean over the images. mIoU: the synthetic "
    "segmentation layout (discs, squares and bars with 255-ignored borders; services/tuner/segmentation_data.py), "
    "each picture's aggregate (k = S) and last-stage output fetched once with the default codec; per seed, the same "
    "dense edge network (mist tune's defaults for a new segmentation task: 4 LAE blocks of rank 16, per-token "
    "LayerNorm + Linear head, bilinear upsampling to the label grid of input / 8) trains with the same recipe "
    "(AdamW, warm-up and cosine, the profile's epochs, lr and batch, last epoch kept) on the training images and is "
    "scored on the validation images (mIoU over classes present, ignore index 255). Deltas are paired by seed. "
    "Peak RSS: bench/edge_probe.py finetune-dense in a fresh process of the tuner-only CPU environment (.venv-edge, "
    "as the edge section): the received aggregates, cycled to the image count, parsed into a FeatureStore, masks "
    "at the label grid in memory, train_dense_network for the profile's epochs; VmHWM, next to the same "
    "environment's `import torch`."
)


def markdown(section: Mapping[str, Any]) -> str:
    stages = " -> ".join(f"{h}x{w}x{d}" for _, d, h, w in section["stages"])
    lines = [f"Backbone: {section['backbone']['label']} at {section['input_size']} px (stage grids {stages}).", ""]
    for target in section["targets"]:
        lines.append(f"- Target: {target['name']} {target['target']}: {target['measured']}, "
                     f"{'met' if target['passed'] else 'MISSED'}.")  # fmt: skip
    lines += ["", "| what is sent | codec | bytes per image | float32 per Describe |", "|---|---|---:|---:|"]
    describe = section["describe_float32_bytes"]
    for row in section["wire"]:
        key = {"mist": "mist_f32"}.get(row["mode"], row["mode"])
        lines.append(f"| {row['mode']} | {row['codec']} | {row['bytes_per_image']:,.0f} | {describe.get(key, 0):,} |")
    miou = section["miou"]
    lines += ["", f"mIoU on {miou['test_images']} validation images ({miou['label_size']}x{miou['label_size']} labels; "
              f"{miou['parameters']:,} parameters, {miou['macs_per_image'] / 1e6:.1f} M MACs per image):", "",
              "| seed | MIST aggregate | last stage only |", "|---:|---:|---:|"]  # fmt: skip
    for mist, last in zip(miou["runs"]["mist"], miou["runs"]["last_stage"], strict=True):
        lines.append(f"| {mist['seed']} | {mist['miou'] * 100:.2f} | {last['miou'] * 100:.2f} |")
    rss = section["edge_rss"]
    lines += ["", f"Edge fine-tune: {rss['images']} images, {rss['epochs']} epoch(s), peak RSS "
              f"{rss['peak_rss_bytes'] / 1e6:.0f} MB ({rss['environment']}; torch {rss.get('torch_version')}).",
              "", f"*Method.* {section['method']}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 px, fewer images, 3 seeds, 15 epochs")
    parser.add_argument("--smoke", action="store_true", help="a shrunk pvt_v2 on a handful of images")
    parser.add_argument("--weights", default="", help="pvt_v2_b0 weights (.safetensors or a timm checkpoint) instead "
                        "of a random init: the mIoU comparison means something only with pretrained stages")  # fmt: skip
    args = parser.parse_args(argv)
    profile: Profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    config = dataclasses.replace(PROFILE_CONFIGS[profile], weights=args.weights)
    print(markdown(run(profile, Path(tempfile.gettempdir()), config=config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
