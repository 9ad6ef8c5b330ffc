"""Benchmark section 5: peak memory and speed of fine-tuning and predicting on an edge device, measured.

Each figure comes from a fresh process (bench/edge_probe.py) in a tuner-only virtualenv with the CPU build of
torch (`.venv-edge`, created on first use), fed ViT-B/16-geometry features compressed with the default codec.

    .venv/bin/python -m bench.edge --quick --out bench/results
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from services.common.errors import InvalidArgumentError
from services.common.wire.codec import DEFAULT_CODEC, CodecConfig, FeatureCodec
from services.common.wire.edge_spec import EdgeNetworkConfig, macs_per_image, parameter_breakdown
from services.tuner.synthetic import CLASS_NAMES, render_image

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().with_name("edge_probe.py")
EDGE_VENV = ".venv-edge"
# The CPU build of torch lies on local disk under exactly this version; the tuner extra must add no timm.
EDGE_TORCH_PIN = "torch==2.13.0"
MB, MIB = 1_000_000, 1 << 20
# The targets, with MB read as 10^6 bytes: the stricter reading (255 MiB would be 267 MB).
TARGET_BYTES = {"finetune_peak_rss_bytes": 500 * MB, "predict_peak_rss_bytes": 255 * MB}
# The paper's Raspberry Pi 4B figures for ViT-B/16 (MIST.md), memory in MB as printed there.
PAPER = {
    "finetune_peak_rss_bytes": 663 * MB,
    "predict_peak_rss_bytes": 255 * MB,
    "trainable_params": 380_000,
    "macs_per_image": 90_000_000,
}
_LENGTH = struct.Struct("<Q")  # feature-file framing shared with edge_probe.read_records
_VENV_TIMEOUT_S = 900
_PROBE_TIMEOUT_S = 900
_PREDICT_FEATURES = 8
Environment = Literal["edge-venv", "current"]


@dataclass(frozen=True)
class Variant:
    """Settings that may change peak memory or speed without touching the library."""

    name: str  # what the report calls it
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment of the probe (glibc malloc tunables)
    threads: int = 0  # torch intra-op threads; 0: torch's default (one per core)


# Each runs the fine-tune probe once more (one epoch) on the same features.
VARIANTS: tuple[Variant, ...] = (
    Variant("one torch thread", threads=1),
    Variant("MALLOC_ARENA_MAX=2", {"MALLOC_ARENA_MAX": "2"}),
    # A fixed threshold turns off glibc's dynamic one, which after the first big free() serves every later
    # tensor of up to 32 MiB from the heap, where freed memory is rarely given back.
    Variant("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"}),
)


@dataclass(frozen=True)
class EdgeConfig:
    """What one run of the edge section measures (validated on construction)."""

    backbone: str = "vit_base_patch16_224"  # timm ViT whose random-init features are fed (197 x 768)
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # timm.create_model overrides (tests: a tiny ViT)
    k: int | None = None  # gathered blocks; None: all N (natural-image tasks' choice)
    seed_images: int = 16  # real gathered features; every training feature is a random mix of two of them
    train_images: int = 800  # the paper's VTAB-1k train split
    epochs: int = 2  # timed epochs (the first pays one-off costs)
    batch_size: int = 32  # the paper's Raspberry Pi batch
    predictions: int = 50  # timed one-image predictions
    codec: str = DEFAULT_CODEC.name  # features travel and stay compressed with this codec
    environment: Environment = "edge-venv"  # "current": measure in this interpreter (no CPU-only venv)
    variants: tuple[Variant, ...] = VARIANTS  # fine-tune again under each of these settings

    def __post_init__(self) -> None:
        for name, lower in (
            ("seed_images", 2),
            ("train_images", 1),
            ("epochs", 1),
            ("batch_size", 1),
            ("predictions", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lower:
                raise InvalidArgumentError(f"edge benchmark {name} must be an integer >= {lower}, got {value!r}")
        CodecConfig.parse(self.codec)
        if self.environment not in ("edge-venv", "current"):
            raise InvalidArgumentError(f"environment must be 'edge-venv' or 'current', got {self.environment!r}")


FULL = EdgeConfig()
QUICK = EdgeConfig(seed_images=4, train_images=96, epochs=1, predictions=10, variants=())


@dataclass(frozen=True)
class EdgeEnvironment:
    """The interpreter the probes run in, and why."""

    python: str  # interpreter path
    kind: Environment  # which one it is
    note: str  # how it was made, or loudly why the edge venv could not be used
    timm_free: bool  # neither timm nor torchvision can be imported there


def run(quick: bool, out_dir: Path, *, config: EdgeConfig | None = None) -> dict[str, Any]:
    """The `edge` section of latest.json (see bench/README.md). Scratch files (about 110 MB of encoded features
    in full mode) live in a temporary folder, not in `out_dir`, which this section does not write to."""
    config = config or (QUICK if quick else FULL)
    environment = ensure_environment(config.environment)
    with tempfile.TemporaryDirectory(prefix="mist-edge-") as scratch:
        files = write_feature_files(config, Path(scratch))
        section = measure(config, environment, files)
    return section


def ensure_environment(kind: Environment) -> EdgeEnvironment:
    """The edge venv, created once (`python3 -m venv`, the pinned CPU torch, the tuner extra); else this one."""
    if kind == "current":
        note = f"the CURRENT interpreter ({sys.executable}), as asked: not the tuner-only CPU-build {EDGE_VENV}"
        return EdgeEnvironment(sys.executable, "current", note, _timm_free(sys.executable))
    python = REPO_ROOT / EDGE_VENV / "bin" / "python"
    try:
        created = not _edge_venv_ready(python)
        if created:
            _create_edge_venv(python)
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        note = f"FALLBACK: {EDGE_VENV} could not be made ({error}); measured in the CURRENT environment instead"
        return EdgeEnvironment(sys.executable, "current", note, _timm_free(sys.executable))
    if not _timm_free(str(python)):
        raise RuntimeError(f"{EDGE_VENV} can import timm or torchvision: the tuner extra must not pull them")
    how = "created now" if created else "reused"
    return EdgeEnvironment(str(python), "edge-venv", f"{EDGE_VENV} ({how}): {EDGE_TORCH_PIN} + '.[tuner]'", True)


def _edge_venv_ready(python: Path) -> bool:
    if not python.exists():
        return False
    check = "import torch, services.tuner.training; assert torch.version.cuda is None"
    return _quiet([str(python), "-c", check]).returncode == 0


def _create_edge_venv(python: Path) -> None:
    venv = python.parents[1]
    pip = str(venv / "bin" / "pip")
    for command in (
        [shutil.which("python3") or sys.executable, "-m", "venv", str(venv)],
        [pip, "install", "-q", EDGE_TORCH_PIN],
        [pip, "install", "-q", "-e", f"{REPO_ROOT}[tuner]"],
    ):
        done = _quiet(command, timeout=_VENV_TIMEOUT_S)
        if done.returncode:
            raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()[-400:]}")
    if not _edge_venv_ready(python):
        raise RuntimeError(f"{EDGE_VENV} was built but its torch is not the CPU build or the tuner does not import")


def _timm_free(python: str) -> bool:
    check = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('timm', 'torchvision')))"
    return _quiet([python, "-c", check]).returncode == 0


def _quiet(command: Sequence[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=_probe_env({}))


@dataclass(frozen=True)
class FeatureFiles:
    """Encoded features on disk for the probes, and what they hold."""

    train: Path  # framed FeatureTensor messages, one per training image
    manifest: Path  # JSON: labels, num_classes, k
    predict: Path  # framed messages to classify one at a time
    tokens: int  # T of every feature
    dims: int  # D of every feature
    k: int  # gathered blocks
    num_classes: int  # classes of the labels
    bytes_per_image: float  # mean serialized message size of the training features


def write_feature_files(config: EdgeConfig, directory: Path) -> FeatureFiles:
    """Gather real features of a few synthetic images, then write `train_images` random mixes of them, encoded.

    A random-init backbone's features have the statistics (scale growing with k, per-channel structure) that
    decide compressed size; convex mixes of two keep them (measured at ViT-B/16: 136 KB per i8-zstd message,
    mixed or not) while giving every image a distinct feature, for a hundredth of the backbone compute.
    """
    seeds, k = _seed_features(config)
    num_classes = min(len(CLASS_NAMES), config.seed_images)
    codec = FeatureCodec(CodecConfig.parse(config.codec))
    rng = np.random.default_rng(0)
    train = directory / "train.bin"
    labels = _write_mixes(train, seeds, config.train_images, codec, k, rng)
    # A device holds one incoming feature at a time; a handful, cycled, keeps the probe's own buffers small.
    _write_mixes(directory / "predict.bin", seeds, _PREDICT_FEATURES, codec, k, rng)
    manifest = directory / "manifest.json"
    manifest.write_text(
        json.dumps({"labels": [label % num_classes for label in labels], "num_classes": num_classes, "k": k})
    )
    _, tokens, dims = seeds.shape
    return FeatureFiles(
        train, manifest, directory / "predict.bin", tokens, dims, k, num_classes,
        (train.stat().st_size - _LENGTH.size * config.train_images) / config.train_images,
    )  # fmt: skip


def _seed_features(config: EdgeConfig) -> tuple[np.ndarray, int]:
    """[seed_images, T, D] float32 gathered features of rendered synthetic images, and the k used."""
    import torch

    from services.extractor.backbone import load_backbone
    from services.extractor.gather import gather_prefix_sums
    from services.extractor.preprocess import ImagePreprocessor

    loaded = load_backbone(config.backbone, model_kwargs=config.model_kwargs)
    k = config.k or loaded.geometry.num_blocks
    preprocessor = ImagePreprocessor(loaded.data_config)
    images = []
    for index in range(config.seed_images):
        picture = render_image(CLASS_NAMES[index % len(CLASS_NAMES)], np.random.default_rng(index), 64)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        images.append(preprocessor.decode(buffer.getvalue()))
    features = gather_prefix_sums(loaded.model, torch.stack(images), [k])[k]
    return features.numpy().astype(np.float32, copy=False), k


def _write_mixes(
    path: Path, seeds: np.ndarray, count: int, codec: FeatureCodec, k: int, rng: np.random.Generator
) -> list[int]:
    """Write `count` encoded mixes w*a + (1-w)*b of two distinct seeds; each takes the class of its larger part."""
    labels = []
    with path.open("wb") as handle:
        for _ in range(count):
            first, second = rng.choice(len(seeds), size=2, replace=False)
            weight = float(rng.uniform(0.0, 1.0))
            mixed = (weight * seeds[first] + (1.0 - weight) * seeds[second]).astype(np.float32)
            body = codec.encode(mixed, k=k).SerializeToString()
            handle.write(_LENGTH.pack(len(body)) + body)
            labels.append(int(first if weight >= 0.5 else second))
    return labels


def run_probe(python: str, mode: str, arguments: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
              threads: int = 0) -> dict[str, Any]:  # fmt: skip
    """Start edge_probe.py in a fresh process and return its JSON line; a failed probe raises RuntimeError."""
    command = [python, str(PROBE), mode, *arguments]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, cwd=REPO_ROOT, env=_probe_env(env or {})
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise RuntimeError(f"probe {mode} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    return json.loads(lines[-1])


def _probe_env(overrides: Mapping[str, str]) -> dict[str, str]:
    # Inherited allocator settings would silently change what is measured: only the variants set them.
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("VIRTUAL_ENV", None)
    env.update(overrides)
    return env


METHOD_TEXT = (
    "Every figure comes from a fresh process running bench/edge_probe.py, so nothing of the benchmark's own memory "
    "counts: peak RSS is that process's VmHWM (/proc/self/status; not ru_maxrss, which Linux carries over from the "
    "parent across exec). The probes run in `.venv-edge`, a virtualenv holding only the CPU build of torch and "
    "the tuner extra (timm and torchvision absent), unless the environment line says otherwise. Training "
    "features are real gathered features of a random-init ViT-B/16 on a few synthetic images, mixed pairwise "
    "(w*a + (1-w)*b) into one distinct feature per training image, encoded with the default codec by the parent "
    "and written to a file; the probe parses each message into a FeatureStore as the tuner does (checking each "
    "by decoding it; the store keeps the serialized messages in an unlinked temporary file in the system temp "
    "dir, so they count as page cache, not RSS), then runs train_edge_network (micro-batched, the library's own AdamW), no validation split. "
    "Time per epoch and images/s are the library's EpochStats (decoding included). Prediction loads the trained "
    "weights with from_safetensors_bytes, then per image parses one message, decodes it and runs predict(); "
    "latency is the median over the timed images after a warm-up. Parameters and MACs are edge_spec's formulas "
    "(MACs count matrix products only), parameters checked against the real module. MB = 10^6 bytes."
)


def measure(config: EdgeConfig, environment: EdgeEnvironment, files: FeatureFiles) -> dict[str, Any]:
    """Run every probe (one process each) and assemble the section."""
    python = environment.python
    load_before = os.getloadavg()[0]
    baseline = run_probe(python, "import-torch")
    with tempfile.TemporaryDirectory(prefix="mist-edge-weights-") as scratch:
        weights = Path(scratch) / "edge.safetensors"
        finetune = run_probe(python, "finetune", _finetune_args(config, files, config.epochs, weights))
        predict = run_probe(python, "predict", _predict_args(config, files, weights))
        predict_cli = run_probe(python, "predict", [*_predict_args(config, files, weights), "--client-imports"])
        variants = [_variant(config, files, weights, python, variant) for variant in config.variants]
    probes = (baseline, finetune, predict, predict_cli)
    section = {
        "environment": environment.note,
        "environment_kind": environment.kind,
        "torch_version": baseline["torch_version"],
        "torch_cuda": baseline["torch_cuda"],
        "threads": finetune["threads"],
        "timm_imported": any(probe["timm_imported"] for probe in probes),
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        **_workload(config, files, finetune),
        "import_torch_rss_bytes": baseline["peak_rss_bytes"],
        "finetune_peak_rss_bytes": finetune["peak_rss_bytes"],
        "finetune_rss_after_imports_bytes": finetune["rss_after_imports_bytes"],
        "finetune_rss_after_store_bytes": finetune["rss_after_store_bytes"],
        "predict_peak_rss_bytes": predict["peak_rss_bytes"],
        "predict_cli_imports_peak_rss_bytes": predict_cli["peak_rss_bytes"],
        **_edge_network_costs(files, finetune),
        "epoch_seconds": float(np.mean(finetune["epoch_seconds"])),
        "epoch_seconds_each": finetune["epoch_seconds"],
        "images_per_second": float(np.mean(finetune["images_per_second"])),
        "predict_ms_per_image": predict["ms_per_image_median"],
        "predict_ms_per_image_mean": predict["ms_per_image_mean"],
        "predictions": predict["predictions"],
        "variants": variants,
        "target_bytes": dict(TARGET_BYTES),
        "paper": dict(PAPER),
        "method": METHOD_TEXT,
    }
    section["targets"] = [
        {"name": name, "target": f"<= {TARGET_BYTES[key] / MB:.0f} MB", "measured": f"{section[key] / MB:.1f} MB",
         "passed": section[key] <= TARGET_BYTES[key]}
        for name, key in (("edge fine-tuning peak RSS", "finetune_peak_rss_bytes"),
                          ("edge prediction peak RSS", "predict_peak_rss_bytes"))
    ]  # fmt: skip
    return section


def _workload(config: EdgeConfig, files: FeatureFiles, finetune: Mapping[str, Any]) -> dict[str, Any]:
    """What was trained on, as the reader needs it to interpret the figures."""
    return {
        "backbone": f"{config.backbone} (random init), k={files.k}; features: mixes of {config.seed_images} real gathers",
        "tokens": files.tokens,
        "dims": files.dims,
        "num_classes": files.num_classes,
        "codec": config.codec,
        "bytes_per_image": files.bytes_per_image,
        "float32_bytes_per_image": 4 * files.tokens * files.dims,
        "train_images": config.train_images,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "micro_batch_size": finetune["micro_batch_size"],
    }


def _edge_network_costs(files: FeatureFiles, finetune: Mapping[str, Any]) -> dict[str, int]:
    edge = EdgeNetworkConfig(dims=files.dims, tokens=files.tokens, num_classes=files.num_classes)
    breakdown = parameter_breakdown(edge)
    return {
        "trainable_params": breakdown.total,
        "trainable_params_blocks": breakdown.blocks,
        "trainable_params_head": breakdown.head,
        "module_params": finetune["trainable_parameters"],  # counted on the trained torch module
        "macs_per_image": macs_per_image(edge),
    }


def _finetune_args(config: EdgeConfig, files: FeatureFiles, epochs: int, weights: Path | None) -> list[str]:
    arguments = ["--features", str(files.train), "--manifest", str(files.manifest), "--epochs", str(epochs),
                 "--batch-size", str(config.batch_size)]  # fmt: skip
    return [*arguments, "--weights-out", str(weights)] if weights is not None else arguments


def _predict_args(config: EdgeConfig, files: FeatureFiles, weights: Path) -> list[str]:
    return ["--features", str(files.predict), "--weights", str(weights), "--predictions", str(config.predictions)]


def _variant(config: EdgeConfig, files: FeatureFiles, weights: Path, python: str, variant: Variant) -> dict[str, Any]:
    """Fine-tune (one epoch) and predict again under other settings: what they change in memory and speed."""
    finetune = run_probe(
        python, "finetune", _finetune_args(config, files, 1, None), env=variant.env, threads=variant.threads
    )
    predict = run_probe(
        python, "predict", _predict_args(config, files, weights), env=variant.env, threads=variant.threads
    )
    return {
        "name": variant.name,
        "env": dict(variant.env),
        "threads": finetune["threads"],
        "finetune_peak_rss_bytes": finetune["peak_rss_bytes"],
        "epoch_seconds": finetune["epoch_seconds"][0],
        "predict_peak_rss_bytes": predict["peak_rss_bytes"],
        "predict_ms_per_image": predict["ms_per_image_median"],
    }


def _mb(value: float) -> str:
    return f"{value / MB:.1f} MB ({value / MIB:.1f} MiB)"


def _verdict(section: Mapping[str, Any], key: str) -> str:
    limit = section["target_bytes"][key]
    return f"<= {limit / MB:.0f} MB: {'met' if section[key] <= limit else 'MISSED'}"


def markdown(section: Mapping[str, Any]) -> str:
    """The section as Markdown: a table next to the paper and the targets, the settings tried, the method."""
    s, paper = section, section["paper"]
    cores = os.cpu_count() or 1
    busy = ""
    if s["load_average"]["before"] > cores and s["threads"] > 1:
        busy = (f" The machine was oversubscribed (load {s['load_average']['before']:.1f} on {cores} cores): with "
                "more than one torch thread, times are dominated by threads waiting for each other.")  # fmt: skip
        if any(variant["threads"] == 1 for variant in s["variants"]):
            busy += " See the one-thread row below."
    lines = [
        f"Environment: {s['environment']}; torch {s['torch_version']} (CUDA: {s['torch_cuda']}), "
        f"{s['threads']} torch thread(s), timm imported: {s['timm_imported']}. "
        f"Load average {s['load_average']['before']:.1f} before, {s['load_average']['after']:.1f} after "
        f"(times on a shared machine vary with it; memory does not).{busy}",
        "",
        f"Fine-tuning: {s['train_images']} training images at [{s['tokens']}, {s['dims']}] ({s['backbone']}), "
        f"kept compressed with {s['codec']} ({s['bytes_per_image'] / 1024:.1f} KiB per image against "
        f"{s['float32_bytes_per_image'] / 1024:.1f} KiB as float32), batch {s['batch_size']} in micro-batches of "
        f"{s['micro_batch_size']}, {s['epochs']} epoch(s), {s['num_classes']} classes.",
        "",
        "| measure | measured | target | paper |",
        "|---|---|---|---|",
        f"| RSS of `import torch` alone | {_mb(s['import_torch_rss_bytes'])} | | |",
        f"| fine-tune peak RSS | {_mb(s['finetune_peak_rss_bytes'])} | {_verdict(s, 'finetune_peak_rss_bytes')} "
        f"| {paper['finetune_peak_rss_bytes'] / MB:.0f} MB |",
        f"| predict peak RSS (one image at a time) | {_mb(s['predict_peak_rss_bytes'])} | "
        f"{_verdict(s, 'predict_peak_rss_bytes')} | {paper['predict_peak_rss_bytes'] / MB:.0f} MB |",
        f"| predict peak RSS with `mist predict`'s imports (grpc, clients) | "
        f"{_mb(s['predict_cli_imports_peak_rss_bytes'])} | | |",
        f"| trainable parameters | {s['trainable_params'] / 1e6:.3f} M (blocks {s['trainable_params_blocks']:,}, "
        f"head {s['trainable_params_head']:,}; module: {s['module_params']:,}) | | {paper['trainable_params'] / 1e6:.2f} M |",
        f"| MACs per image | {s['macs_per_image'] / 1e9:.3f} G | | {paper['macs_per_image'] / 1e9:.2f} G |",
        f"| time per epoch | {s['epoch_seconds']:.1f} s (each: {', '.join(f'{x:.1f}' for x in s['epoch_seconds_each'])}) | | |",
        f"| training images per second | {s['images_per_second']:.1f} | | |",
        f"| predict latency per image (median of {s['predictions']}) | {s['predict_ms_per_image']:.1f} ms "
        f"(mean {s['predict_ms_per_image_mean']:.1f}) | | |",
    ]
    if s["variants"]:
        lines += ["", "The same jobs under other settings (fine-tuning: one epoch), same features:", "",
                  "| setting | threads | fine-tune peak RSS | epoch | predict peak RSS | predict latency |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for v in s["variants"]:
            lines.append(f"| {v['name']} | {v['threads']} | {_mb(v['finetune_peak_rss_bytes'])} | {v['epoch_seconds']:.1f} s "
                         f"| {_mb(v['predict_peak_rss_bytes'])} | {v['predict_ms_per_image']:.1f} ms |")  # fmt: skip
    if s.get("method"):
        lines += ["", f"*Method.* {s['method']}"]
    return "\n".join(lines) + "\n"


def plots(section: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """One bar chart: measured peak RSS of each job against its target and the paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = [("import torch", "import_torch_rss_bytes", None), ("fine-tune", "finetune_peak_rss_bytes", "finetune_peak_rss_bytes"),
            ("predict", "predict_peak_rss_bytes", "predict_peak_rss_bytes")]  # fmt: skip
    figure, axes = plt.subplots(figsize=(6, 3.5))
    positions = np.arange(len(jobs))
    axes.bar(positions, [section[key] / MB for _, key, _ in jobs], width=0.5, label="measured", color="#4c72b0")
    for position, (_, _, reference) in zip(positions, jobs, strict=True):
        if reference is None:
            continue
        axes.hlines(section["target_bytes"][reference] / MB, position - 0.3, position + 0.3, colors="#c44e52",
                    label="target")  # fmt: skip
        axes.plot(position, section["paper"][reference] / MB, "D", color="#55a868", label="paper")
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes.legend(unique.values(), unique.keys(), loc="upper left")
    axes.set_xticks(positions, [name for name, _, _ in jobs])
    axes.set_ylabel("peak RSS (MB)")
    axes.set_title(f"Edge memory, torch {section['torch_version']}")
    figure.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "edge_memory.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="96 images, one epoch, no variants")
    parser.add_argument("--current-env", action="store_true", help="measure in this interpreter, not .venv-edge")
    parser.add_argument("--out", type=Path, help="also write edge.json and edge_memory.png into this folder")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.current_env:
        config = replace(config, environment="current")
    section = run(args.quick, args.out or Path(tempfile.gettempdir()), config=config)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "edge.json").write_text(json.dumps(section, indent=2) + "\n")
        plots(section, args.out)
    print(markdown(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
