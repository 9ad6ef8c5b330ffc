"""Section 4: the extractor service against the bare forward pass, in the same run on the same machine: service
images/s vs a direct `gather` on the same batch, early-exit speed-up per k, dynamic batching, cache hits.

    python -m bench.run --only extractor

Every repetition uses fresh images (the server's cache stays on, as deployed, but never hits by accident) and
alternates which side runs first, so slow drift on a shared machine hits both sides alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    VIT_B16,
    VIT_MICRO,
    VIT_TI16,
    BackboneSpec,
    BenchError,
    Profile,
    StreamRun,
    available_cpus,
    detect_device,
    device_description,
    run_streams,
    summarize,
)
from bench.servers import InProcessServer, ServerProcess, extractor_server, mean_batch_size
from services.common.clients.extractor import ExtractorClient
from services.common.wire.codec import DEFAULT_CODEC
from services.common.wire.gather_modes import candidate_ks
from services.extractor.backbone import LoadedBackbone, load_backbone
from services.extractor.gather import gather
from services.extractor.preprocess import ImagePreprocessor
from services.extractor.transfer import synthetic_png_images

TARGET_SERVICE_VS_DIRECT = 0.9  # issue 7: the service keeps at least 90 % of the bare forward's throughput


@dataclass(frozen=True)
class ExtractorSettings:
    """Sizes of section 4's measurements."""

    backbone: BackboneSpec  # served and run directly: the same timm model, the same seed
    batch_images: int  # images per direct batch and per service stream (service vs direct, early exit)
    reps: int  # repetitions of every measurement, alternating sides
    streams: int  # concurrent streams of the batching measurement (issue 7: 8)
    images_per_stream: int  # images each concurrent stream sends, one at a time
    cache_images: int  # distinct images of each cache miss / hit pass


SETTINGS: dict[Profile, ExtractorSettings] = {
    "full": ExtractorSettings(VIT_B16, batch_images=8, reps=5, streams=8, images_per_stream=3, cache_images=8),
    "quick": ExtractorSettings(VIT_TI16, batch_images=4, reps=2, streams=8, images_per_stream=1, cache_images=4),
    "smoke": ExtractorSettings(VIT_MICRO, batch_images=4, reps=2, streams=8, images_per_stream=2, cache_images=4),
}

METHOD_TEXT = (
    "The server runs as its own process (`python -m services.extractor.server`, cache on, default batching: up to "
    "32 images within 5 ms); the direct side is `services.extractor.gather.gather` on the same backbone (same timm "
    "model, same seed, fingerprint checked) in the benchmark process with the same number of torch threads as the "
    "server's forward pass, on the same images preprocessed beforehand, in one batch, the result copied to the host. "
    "**Service vs direct** = direct seconds / service seconds for the same B images (service: one stream, all "
    "images in flight, wall time from the first request to the last result, PNG decoding, batching, encoding with "
    "the default codec and gRPC included). **Early exit** = seconds at k = N / seconds at k, for MIST with one k "
    "(direct and via the service). **Batching gain** = images/s of 8 concurrent streams (own channel and thread "
    "each, one image in flight per stream) / images/s of 1 such stream; the server's mean batch size comes from its "
    "`mist_extractor_batch_size_images` histogram. **Cache hit speed-up** = seconds of a pass over fresh images / "
    "seconds of a second pass over the same images (cache hits). Each figure is the median over the repetitions "
    "(spread: min..max), every repetition on fresh images with the side that runs first alternating."
)


def run(profile: Profile, out_dir: Path) -> dict[str, Any]:
    settings = SETTINGS[profile]
    device = detect_device()
    threads = available_cpus()
    backbone = load_backbone(settings.backbone.name, device=device, model_kwargs=dict(settings.backbone.model_kwargs))
    flags = ["--device", device, "--torch-threads", str(threads), "--grace-s", "1"]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the direct side gets what the server's forward thread gets
    try:
        with extractor_server(settings.backbone, profile, flags=flags) as server:
            return _measure(settings, backbone, server, device)
    finally:
        torch.set_num_threads(previous_threads)


class _Bench:
    """The two sides of one comparison: a direct gather in this process and the service through one channel."""

    def __init__(
        self, settings: ExtractorSettings, backbone: LoadedBackbone, server: ServerProcess | InProcessServer
    ) -> None:
        self.settings, self.backbone, self.server = settings, backbone, server
        self.size = int(backbone.data_config["input_size"][-1])
        self.preprocessor = ImagePreprocessor(backbone.data_config)
        self.seed = 1000  # every call of fresh() draws images no earlier call drew

    def fresh(self, count: int) -> list[bytes]:
        self.seed += 1
        return synthetic_png_images(count, self.size, seed=self.seed)

    def direct_seconds(self, images: list[bytes], k: int) -> float:
        batch = torch.stack([self.preprocessor.decode(image) for image in images]).to(self.backbone.device)
        if batch.is_cuda:
            torch.cuda.synchronize()  # the copy above is asynchronous: it must not land in the timed interval
        started = time.perf_counter()
        with self.backbone.autocast():
            features = gather(self.backbone.model, batch, "mist", ks=(k,))
        features[k].cpu()  # the service copies to the host too (and on a GPU this waits for the kernels)
        return time.perf_counter() - started

    def service(self, image_sets: list[list[bytes]], k: int, window: int) -> tuple[StreamRun, float | None]:
        before = self.server.metrics()
        run = run_streams(self.server.target, image_sets, ks=(k,), codec=DEFAULT_CODEC.name, window=window)
        return run, mean_batch_size(before, self.server.metrics())


@dataclass
class _Samples:
    """Raw timings of every repetition, paired by position (repetition r of one list was measured next to r of
    the other)."""

    direct: dict[int, list[float]]  # k -> seconds of one direct batch
    service: dict[int, list[float]]  # k -> seconds of one stream of the same images
    service_batch: list[float] = field(default_factory=list)  # mean server batch size of the k = N streams
    single: list[float] = field(default_factory=list)  # images/s, one stream, one image in flight
    concurrent: list[float] = field(default_factory=list)  # images/s, `streams` such streams at once
    single_batch: list[float] = field(default_factory=list)  # mean server batch size during `single`
    concurrent_batch: list[float] = field(default_factory=list)  # ... during `concurrent`
    miss: list[float] = field(default_factory=list)  # seconds of a pass over fresh images
    hit: list[float] = field(default_factory=list)  # seconds of the second pass over the same images


def _measure(
    settings: ExtractorSettings, backbone: LoadedBackbone, server: ServerProcess | InProcessServer, device: str
) -> dict[str, Any]:
    with ExtractorClient(server.target) as client:
        info = client.describe()
    if info.backbone.weights_fingerprint != backbone.weights_fingerprint:
        raise BenchError(
            f"the server runs other weights ({info.backbone.weights_fingerprint}) than the direct side "
            f"({backbone.weights_fingerprint}): the comparison would be meaningless"
        )
    bench = _Bench(settings, backbone, server)
    depth = backbone.geometry.num_blocks
    ks = [depth, *(k for k in candidate_ks(depth) if k != depth)]
    bench.direct_seconds(bench.fresh(settings.batch_images), depth)  # warm-up: first-call allocations, both sides
    bench.service([bench.fresh(settings.batch_images)], depth, window=settings.batch_images)
    samples = _Samples(direct={k: [] for k in ks}, service={k: [] for k in ks})
    for rep in range(settings.reps):
        service_first = rep % 2 == 1
        _early_exit_rep(bench, samples, ks, service_first)
        _batching_rep(bench, samples, depth, service_first)
        _cache_rep(bench, samples, depth)
    return _summary(settings, backbone, device, ks, samples)


def _early_exit_rep(bench: _Bench, samples: _Samples, ks: list[int], service_first: bool) -> None:
    """For each k (N first): the same fresh images through the direct gather and the service."""
    batch = bench.settings.batch_images
    for k in ks:
        images = bench.fresh(batch)
        for side in ("service", "direct") if service_first else ("direct", "service"):
            if side == "direct":
                samples.direct[k].append(bench.direct_seconds(images, k))
                continue
            run, mean_batch = bench.service([images], k, window=batch)
            samples.service[k].append(run.seconds)
            if k == ks[0] and mean_batch is not None:
                samples.service_batch.append(mean_batch)


def _batching_rep(bench: _Bench, samples: _Samples, depth: int, concurrent_first: bool) -> None:
    """One stream vs `streams` concurrent streams, each with one image in flight (an interactive device)."""
    settings = bench.settings
    for side in ("concurrent", "single") if concurrent_first else ("single", "concurrent"):
        if side == "single":
            run, mean_batch = bench.service([bench.fresh(settings.images_per_stream * 2)], depth, window=1)
            samples.single.append(run.images_per_s)
            samples.single_batch.append(mean_batch or 0.0)
        else:
            sets = [bench.fresh(settings.images_per_stream) for _ in range(settings.streams)]
            run, mean_batch = bench.service(sets, depth, window=1)
            samples.concurrent.append(run.images_per_s)
            samples.concurrent_batch.append(mean_batch or 0.0)


def _cache_rep(bench: _Bench, samples: _Samples, depth: int) -> None:
    """A pass over fresh images, then the same images again: all misses, then all hits."""
    count = bench.settings.cache_images
    images = bench.fresh(count)
    first, _ = bench.service([images], depth, window=count)
    second, _ = bench.service([images], depth, window=count)
    if second.cache_hits != second.images or first.cache_hits:
        raise BenchError(
            f"expected {second.images} cache hits on the second pass and none on the first; got "
            f"{second.cache_hits} and {first.cache_hits}"
        )
    samples.miss.append(first.seconds)
    samples.hit.append(second.seconds)


def _ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Per-repetition ratios: each pair was measured side by side."""
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def _summary(
    settings: ExtractorSettings, backbone: LoadedBackbone, device: str, ks: list[int], samples: _Samples
) -> dict[str, Any]:
    depth, early = ks[0], ks[1:]
    batch = settings.batch_images
    service_vs_direct = summarize(_ratios(samples.direct[depth], samples.service[depth]))
    early_direct = {str(k): summarize(_ratios(samples.direct[depth], samples.direct[k])) for k in early}
    early_service = {str(k): summarize(_ratios(samples.service[depth], samples.service[k])) for k in early}
    batching = summarize(_ratios(samples.concurrent, samples.single))
    cache = summarize(_ratios(samples.miss, samples.hit))
    passed = service_vs_direct["median"] >= TARGET_SERVICE_VS_DIRECT
    return {
        "service_vs_direct": service_vs_direct["median"],
        "batching_gain_8_streams": batching["median"],
        "cache_hit_speedup": cache["median"],
        "early_exit_speedup": {k: value["median"] for k, value in early_direct.items()},
        "early_exit_speedup_service": {k: value["median"] for k, value in early_service.items()},
        "early_exit_ideal": {str(k): depth / k for k in early},
        "spread": {
            "service_vs_direct": service_vs_direct,
            "batching_gain_8_streams": batching,
            "cache_hit_speedup": cache,
            "early_exit_speedup": early_direct,
            "early_exit_speedup_service": early_service,
        },
        "direct_images_per_s": summarize([batch / s for s in samples.direct[depth]]),
        "service_images_per_s": summarize([batch / s for s in samples.service[depth]]),
        "service_mean_batch_size": summarize(samples.service_batch) if samples.service_batch else None,
        "single_stream_images_per_s": summarize(samples.single),
        "concurrent_images_per_s": summarize(samples.concurrent),
        "single_stream_mean_batch_size": summarize(samples.single_batch),
        "concurrent_mean_batch_size": summarize(samples.concurrent_batch),
        "cache_miss_images_per_s": summarize([settings.cache_images / s for s in samples.miss]),
        "cache_hit_images_per_s": summarize([settings.cache_images / s for s in samples.hit]),
        "device": device_description(device),
        "backbone": settings.backbone.display,
        "num_blocks": depth,
        "torch_threads": torch.get_num_threads(),
        "batch_images": batch,
        "reps": settings.reps,
        "streams": settings.streams,
        "codec": DEFAULT_CODEC.name,
        "targets": [
            {
                "name": "extractor service vs direct forward (images/s)",
                "target": f">= {TARGET_SERVICE_VS_DIRECT}",
                "measured": f"{service_vs_direct['median']:.3f}",
                "passed": passed,
            }
        ],
        "method": METHOD_TEXT,
    }


def _spread(value: dict[str, float]) -> str:
    return f"{value['median']:.3g} ({value['min']:.3g}..{value['max']:.3g}, n={value['n']})"


def _median(section: Mapping[str, Any], key: str, digits: int = 2) -> str:
    return f"{section[key]['median']:.{digits}f}"


def markdown(section: Mapping[str, Any]) -> str:
    spread: Mapping[str, Any] = section["spread"]
    mean_batch = section.get("service_mean_batch_size")
    batch_note = f", mean batch {mean_batch['median']:.1f}" if mean_batch else ""
    lines = [
        f"Device: {section['device']}. Backbone: {section['backbone']} (N = {section['num_blocks']}), "
        f"B = {section['batch_images']} images, {section['reps']} repetitions, codec {section['codec']}.\n",
        "| figure | median (min..max, n) | context |",
        "|---|---:|---|",
        f"| service vs direct (target >= {TARGET_SERVICE_VS_DIRECT}) | {_spread(spread['service_vs_direct'])} | "
        f"direct {_median(section, 'direct_images_per_s')} img/s, service "
        f"{_median(section, 'service_images_per_s')} img/s{batch_note} |",
        f"| batching gain, {section['streams']} streams vs 1 | {_spread(spread['batching_gain_8_streams'])} | "
        f"{_median(section, 'concurrent_images_per_s')} vs {_median(section, 'single_stream_images_per_s')} img/s, "
        f"mean batch {_median(section, 'concurrent_mean_batch_size', 1)} vs "
        f"{_median(section, 'single_stream_mean_batch_size', 1)} |",
        f"| cache-hit speed-up | {_spread(spread['cache_hit_speedup'])} | "
        f"{_median(section, 'cache_miss_images_per_s')} vs {_median(section, 'cache_hit_images_per_s', 1)} img/s |",
    ]
    for k, value in spread["early_exit_speedup"].items():
        via = spread["early_exit_speedup_service"][k]
        lines.append(
            f"| early exit k = {k} vs N (direct) | {_spread(value)} | ideal N/k = "
            f"{section['early_exit_ideal'][k]:.2f}; via the service {_spread(via)} |"
        )
    return "\n".join(lines) + f"\n\n*Method.* {section['method']}"


def plots(section: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """extractor.png: early-exit speed-up per k (direct, service, ideal N/k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in section["early_exit_speedup"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [section["early_exit_ideal"][str(k)] for k in ks], "k--", label="ideal N/k")
    for key, label, style in (
        ("early_exit_speedup", "direct gather", "o-"),
        ("early_exit_speedup_service", "via the service", "s-"),
    ):
        spread = [section["spread"][key][str(k)] for k in ks]
        medians = [value["median"] for value in spread]
        bars = [
            [value["median"] - value["min"] for value in spread],
            [value["max"] - value["median"] for value in spread],
        ]
        ax.errorbar(ks, medians, yerr=bars, fmt=style, capsize=4, label=f"{label} (median, min..max)")
    ax.set_xlabel("k (blocks run)")
    ax.set_ylabel("speed-up vs k = N")
    ax.set_xticks(ks)
    ax.set_title(f"Early exit: {section['backbone']}, {section['device'].split(' (')[0]}")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "extractor.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
