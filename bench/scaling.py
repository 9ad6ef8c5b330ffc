"""Section 6: how cost grows with work. Extractor throughput and p50 / p99 latency at 1, 4, 16 and 64 concurrent
streams; the tuner's time per epoch for 200, 800 and 3200 images of ViT-B/16-shaped features.

    python -m bench.run --only scaling
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    VIT_MICRO,
    VIT_S16,
    VIT_TI16,
    BackboneSpec,
    Profile,
    available_cpus,
    detect_device,
    device_description,
    percentile,
    run_streams,
    summarize,
)
from bench.servers import extractor_server, mean_batch_size
from services.common.clients.extractor import ExtractorClient
from services.common.wire.codec import DEFAULT_CODEC, FeatureCodec
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.extractor.transfer import synthetic_png_images
from services.tuner.feature_store import FeatureStore
from services.tuner.training import TrainConfig, train_edge_network

_CLASSES = 10  # labels of the synthetic tuning set (random features: what is learnt does not matter here)
_FEATURE_POOL = 64  # distinct encoded features, reused across indices: memory stays flat at 3200 images


@dataclass(frozen=True)
class ScalingSettings:
    """Sizes of section 6."""

    backbone: BackboneSpec  # the extractor's backbone for the stream levels
    stream_levels: tuple[int, ...]  # concurrent streams of each level
    min_requests: int  # requests per level at least (spread over its streams) so p99 has samples
    requests_per_stream: int  # at least this many requests per stream
    passes: int  # passes over the levels, alternating ascending / descending order
    tuner_sizes: tuple[int, ...]  # training-set sizes of the tuner measurement
    tuner_reps: int  # epochs timed per size, alternating ascending / descending order
    feature_shape: tuple[int, int]  # [T, D] of the tuner's features


SETTINGS: dict[Profile, ScalingSettings] = {
    "full": ScalingSettings(
        VIT_S16,
        (1, 4, 16, 64),
        min_requests=32,
        requests_per_stream=3,
        passes=2,
        tuner_sizes=(200, 800, 3200),
        tuner_reps=2,
        feature_shape=(197, 768),
    ),
    "quick": ScalingSettings(
        VIT_TI16,
        (1, 4, 16, 64),
        min_requests=8,
        requests_per_stream=1,
        passes=1,
        tuner_sizes=(32, 64, 128),
        tuner_reps=1,
        feature_shape=(197, 768),
    ),
    "smoke": ScalingSettings(
        VIT_MICRO,
        (1, 4, 16),
        min_requests=8,
        requests_per_stream=1,
        passes=1,
        tuner_sizes=(16, 32, 64),
        tuner_reps=1,
        feature_shape=(17, 32),
    ),
}

METHOD_TEXT = (
    "**Extractor**: a server process (cache off, so every request runs the forward; default batching) and, per "
    "level, that many concurrent streams, each on its own channel and thread, each with one image in flight "
    "(closed loop: a device waits for its answer before sending the next image); every stream connects first, "
    "then all start together. Throughput = images / wall time of the level; latency = per image, from handing the "
    "request to gRPC to receiving its result; p99 by linear interpolation over every request of the level (all "
    "passes pooled). Levels run in ascending then descending order on later passes. **Tuner**: "
    "`services.tuner.training.train_edge_network`, one epoch (batch 32, AdamW, the default LAE: 4 blocks, r = 16), "
    "on a FeatureStore of random N(0, 1) features of the stated shape encoded with the default codec (a pool of "
    f"{_FEATURE_POOL} distinct messages reused across indices; each batch is decoded as in real training); "
    "seconds = the epoch's wall time as the tuner reports it, decoding included."
)


def run(profile: Profile, out_dir: Path) -> dict[str, Any]:
    settings = SETTINGS[profile]
    return {"extractor": _extractor_levels(settings, profile), "tuner": _tuner_sizes(settings), "method": METHOD_TEXT}


def _level_order(levels: tuple[int, ...], passes: int) -> list[int]:
    return [level for p in range(passes) for level in (levels if p % 2 == 0 else tuple(reversed(levels)))]


def _extractor_levels(settings: ScalingSettings, profile: Profile) -> dict[str, Any]:
    device = detect_device()
    flags = [
        "--device",
        device,
        "--cache-max-bytes",
        "0",
        "--max-streams",
        str(max(settings.stream_levels)),
        "--grace-s",
        "1",
    ]
    rates: dict[int, list[float]] = {level: [] for level in settings.stream_levels}
    latencies: dict[int, list[float]] = {level: [] for level in settings.stream_levels}
    batches: dict[int, list[float]] = {level: [] for level in settings.stream_levels}
    with extractor_server(settings.backbone, profile, flags=flags) as server:
        with ExtractorClient(server.target) as client:
            info = client.describe()
        depth = int(info.num_blocks)
        image = synthetic_png_images(1, int(info.data_config.input_size[-1]))[0]  # cache off: a forward each time
        run_streams(server.target, [[image] * 4], codec=DEFAULT_CODEC.name, ks=(depth,), window=1)  # warm-up
        for level in _level_order(settings.stream_levels, settings.passes):
            per_stream = max(settings.requests_per_stream, math.ceil(settings.min_requests / level))
            before = server.metrics()
            run = run_streams(
                server.target,
                [[image] * per_stream for _ in range(level)],
                ks=(depth,),
                codec=DEFAULT_CODEC.name,
                window=1,
            )
            batches[level].append(mean_batch_size(before, server.metrics()) or 0.0)
            rates[level].append(run.images_per_s)
            latencies[level].extend(run.latencies_s)
    rows = [
        {
            "streams": level,
            "images_per_s": summarize(rates[level])["median"],
            "images_per_s_spread": summarize(rates[level]),
            "requests": len(latencies[level]),
            "p50_latency_s": percentile(latencies[level], 50),
            "p99_latency_s": percentile(latencies[level], 99),
            "mean_batch_size": summarize(batches[level])["median"],
        }
        for level in settings.stream_levels
    ]
    return {
        "rows": rows,
        "backbone": settings.backbone.display,
        "device": device_description(device),
        "k": depth,
        "codec": DEFAULT_CODEC.name,
        "passes": settings.passes,
    }


def _tuner_sizes(settings: ScalingSettings) -> dict[str, Any]:
    tokens, dims = settings.feature_shape
    rng = np.random.default_rng(0)
    codec = FeatureCodec(DEFAULT_CODEC)
    k = 1  # any k: the store only checks that the messages agree
    pool = [codec.encode(rng.standard_normal((tokens, dims), dtype=np.float32), k=k) for _ in range(_FEATURE_POOL)]
    edge = EdgeNetworkConfig(dims=dims, tokens=tokens, num_classes=_CLASSES)
    seconds: dict[int, list[float]] = {size: [] for size in settings.tuner_sizes}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(available_cpus())
    try:
        _epoch_seconds(pool, k, edge, settings.tuner_sizes[0])  # warm-up: first-call allocations, thread pools
        for size in _level_order(settings.tuner_sizes, settings.tuner_reps):
            seconds[size].append(_epoch_seconds(pool, k, edge, size))
    finally:
        torch.set_num_threads(previous_threads)
    smallest = settings.tuner_sizes[0]
    base = summarize(seconds[smallest])["median"] / smallest
    rows = []
    for size in settings.tuner_sizes:
        median = summarize(seconds[size])["median"]
        rows.append(
            {
                "images": size,
                "epoch_seconds": median,
                "epoch_seconds_spread": summarize(seconds[size]),
                "seconds_per_image": median / size,
                "per_image_vs_smallest": median / size / base,
            }
        )
    return {
        "rows": rows,
        "feature_shape": [tokens, dims],
        "codec": DEFAULT_CODEC.name,
        "encoded_bytes_per_feature": sum(m.ByteSize() for m in pool) / len(pool),
        "edge_network": {"num_blocks": edge.num_blocks, "rank": edge.rank, "classes": _CLASSES},
        "batch_size": TrainConfig().batch_size,
        "torch_threads": available_cpus(),
    }


def _epoch_seconds(pool: list, k: int, edge: EdgeNetworkConfig, size: int) -> float:
    """Wall time of one training epoch over `size` images, as the tuner reports it."""
    store = FeatureStore([i % _CLASSES for i in range(size)], num_classes=_CLASSES, verify=False)
    for index in range(size):
        store.add(index, k, pool[index % _FEATURE_POOL])
    result = train_edge_network(store, k, edge, TrainConfig(epochs=1), train_indices=range(size))
    return result.history[0].seconds


def markdown(section: Mapping[str, Any]) -> str:
    extractor, tuner = section["extractor"], section["tuner"]
    lines = [
        f"**Extractor** ({extractor['backbone']}, {extractor['device']}, MIST k = {extractor['k']}, "
        f"{extractor['codec']}, cache off, one image in flight per stream)\n",
        "| streams | images/s (min..max) | p50 latency s | p99 latency s | mean batch | requests |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in extractor["rows"]:
        spread = row["images_per_s_spread"]
        lines.append(
            f"| {row['streams']} | {row['images_per_s']:.2f} ({spread['min']:.2f}..{spread['max']:.2f}) | "
            f"{row['p50_latency_s']:.3f} | {row['p99_latency_s']:.3f} | {row['mean_batch_size']:.1f} | "
            f"{row['requests']} |"
        )
    shape = tuner["feature_shape"]
    lines += [
        "",
        f"**Tuner**, one epoch, features [{shape[0]}, {shape[1]}] as {tuner['codec']} "
        f"({tuner['encoded_bytes_per_feature'] / 1024:.0f} KiB each), batch {tuner['batch_size']}\n",
        "| images | epoch s (min..max) | ms per image | per image vs smallest |",
        "|---:|---:|---:|---:|",
    ]
    for row in tuner["rows"]:
        spread = row["epoch_seconds_spread"]
        lines.append(
            f"| {row['images']} | {row['epoch_seconds']:.2f} ({spread['min']:.2f}..{spread['max']:.2f}) | "
            f"{row['seconds_per_image'] * 1000:.2f} | {row['per_image_vs_smallest']:.2f}x |"
        )
    return "\n".join(lines) + f"\n\n*Method.* {section['method']}"


def plots(section: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """scaling.png: throughput and p99 latency per stream count; tuner epoch seconds per training-set size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = section["extractor"]["rows"]
    tuner = section["tuner"]["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    streams = [row["streams"] for row in rows]
    left.plot(streams, [row["images_per_s"] for row in rows], "o-", color="tab:blue", label="images/s")
    left.set_xscale("log", base=2)
    left.set_xticks(streams, [str(s) for s in streams])
    left.minorticks_off()
    left.set_xlabel("concurrent streams")
    left.set_ylabel("images/s", color="tab:blue")
    twin = left.twinx()
    twin.plot(streams, [row["p99_latency_s"] for row in rows], "s--", color="tab:red", label="p99 latency")
    twin.set_ylabel("p99 latency (s)", color="tab:red")
    left.set_title(f"Extractor: {section['extractor']['backbone']}")
    sizes = [row["images"] for row in tuner]
    right.plot(sizes, [row["epoch_seconds"] for row in tuner], "o-")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xticks(sizes, [str(s) for s in sizes])
    right.minorticks_off()  # log-axis minor labels would crowd the sizes
    right.set_xlabel("training images")
    right.set_ylabel("seconds per epoch")
    right.set_title("Tuner: one epoch")
    fig.tight_layout()
    path = out_dir / "scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
