"""Benchmark section 5: peak memory and speed of fine-tuning and predicting on an edge device, measured.

Each figure comes from a fresh process (bench/edge_probe.py) in a tuner-only virtualenv with the CPU build of
torch (`.venv-edge`, created on first use), fed ViT-B/16-geometry features compressed with the default codec.
The device figures (issue 13) come from a torch-free virtualenv (`.venv-device`: `pip install -e '.[device]'`,
created on first use) predicting image files one at a time through a real extractor (ViT-B/16, random init) and
registry that this section starts and stops; the edge-network-only latency is compared between the numpy and the
torch runtimes on the same weights and features.

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

from bench.common import BackboneSpec
from bench.servers import ServerProcess
from services.common.errors import InvalidArgumentError
from services.common.wire.codec import DEFAULT_CODEC, CodecConfig, FeatureCodec
from services.common.wire.edge_spec import EdgeNetworkConfig, macs_per_image, parameter_breakdown
from services.tuner.synthetic import CLASS_NAMES, render_image

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().with_name("edge_probe.py")
EDGE_VENV = ".venv-edge"
DEVICE_VENV = ".venv-device"  # base dependencies only (the `device` extra): no torch, timm or Pillow
DEVICE_TASK = "edge-bench"
# The CPU build of torch lies on local disk under exactly this version; the tuner extra must add no timm.
EDGE_TORCH_PIN = "torch==2.13.0"
MB, MIB = 1_000_000, 1 << 20
# The targets, with MB read as 10^6 bytes: the stricter reading (255 MiB would be 267 MB).
TARGET_BYTES = {
    "finetune_peak_rss_bytes": 350 * MB,  # issue 13 (was 500 MB): 800 ViT-B/16 images, batch 32
    "predict_peak_rss_bytes": 255 * MB,
    "device_predict_peak_rss_bytes": 80 * MB,  # issue 13: the torch-free runtime through the extractor
}
# Issue 13: the numpy runtime's edge-network latency at most this many times the torch runtime's (p50 / p50).
TARGET_RUNTIME_RATIO = 1.5
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
_DEVICE_IMAGE_PX = 224  # the synthetic PNGs the device sends: the backbone's input size, ~100 KB each
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
    device: bool = True  # start an extractor and a registry and predict through them from .venv-device
    device_predictions: int = 1000  # timed one-image predictions of the device probe (issue 13: 1,000)
    device_images: int = 8  # distinct synthetic PNGs the device cycles through (each sent once untimed first)

    def __post_init__(self) -> None:
        for name, lower in (
            ("seed_images", 2),
            ("train_images", 1),
            ("epochs", 1),
            ("batch_size", 1),
            ("predictions", 1),
            ("device_predictions", 1),
            ("device_images", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lower:
                raise InvalidArgumentError(f"edge benchmark {name} must be an integer >= {lower}, got {value!r}")
        CodecConfig.parse(self.codec)
        if self.environment not in ("edge-venv", "current"):
            raise InvalidArgumentError(f"environment must be 'edge-venv' or 'current', got {self.environment!r}")


FULL = EdgeConfig()
QUICK = EdgeConfig(seed_images=4, train_images=96, epochs=1, predictions=50, variants=(), device_predictions=200)


@dataclass(frozen=True)
class EdgeEnvironment:
    """The interpreter the probes run in, and why."""

    python: str  # interpreter path
    kind: Environment  # which one it is
    note: str  # how it was made, or loudly why the edge venv could not be used
    timm_free: bool  # neither timm nor torchvision can be imported there
    torch_free: bool = False  # torch cannot be imported there (the device venv)


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


def ensure_device_environment(kind: Environment) -> EdgeEnvironment:
    """The device venv, created once (`python3 -m venv`, then `pip install -e '.[device]'`); else this one, loudly.

    RuntimeError when the venv can import torch, timm or torchvision: the device figures would not be a device's.
    """
    if kind == "current":
        note = f"the CURRENT interpreter ({sys.executable}), as asked: not the torch-free {DEVICE_VENV}"
        return EdgeEnvironment(sys.executable, "current", note, _timm_free(sys.executable), _torch_free(sys.executable))
    python = REPO_ROOT / DEVICE_VENV / "bin" / "python"
    try:
        created = not _device_venv_ready(python)
        if created:
            _create_device_venv(python)
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        note = f"FALLBACK: {DEVICE_VENV} could not be made ({error}); measured in the CURRENT environment instead"
        return EdgeEnvironment(sys.executable, "current", note, _timm_free(sys.executable), _torch_free(sys.executable))
    if not (_timm_free(str(python)) and _torch_free(str(python))):
        raise RuntimeError(f"{DEVICE_VENV} can import torch, timm or torchvision: the device extra must not pull them")
    how = "created now" if created else "reused"
    note = f"{DEVICE_VENV} ({how}): '.[device]' (base dependencies only); torch, timm, torchvision not importable"
    return EdgeEnvironment(str(python), "edge-venv", note, True, True)


def _device_venv_ready(python: Path) -> bool:
    return python.exists() and _quiet([str(python), "-c", "import services.tuner.predict"]).returncode == 0


def _create_device_venv(python: Path) -> None:
    venv = python.parents[1]
    for command in (
        [shutil.which("python3") or sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "-q", "-e", f"{REPO_ROOT}[device]"],
    ):
        done = _quiet(command, timeout=_VENV_TIMEOUT_S)
        if done.returncode:
            raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()[-400:]}")
    if not _device_venv_ready(python):
        raise RuntimeError(f"{DEVICE_VENV} was built but services.tuner.predict does not import there")


def _torch_free(python: str) -> bool:
    return (
        _quiet([python, "-c", "import importlib.util as u, sys; sys.exit(bool(u.find_spec('torch')))"]).returncode == 0
    )


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
    seeds, k, fingerprint = _seed_features(config)
    num_classes = min(len(CLASS_NAMES), config.seed_images)
    codec = FeatureCodec(CodecConfig.parse(config.codec))
    rng = np.random.default_rng(0)
    train = directory / "train.bin"
    labels = _write_mixes(train, seeds, config.train_images, codec, k, rng)
    # A device holds one incoming feature at a time; a handful, cycled, keeps the probe's own buffers small.
    _write_mixes(directory / "predict.bin", seeds, _PREDICT_FEATURES, codec, k, rng)
    manifest = directory / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "labels": [label % num_classes for label in labels],
                "num_classes": num_classes,
                "k": k,
                "codec": CodecConfig.parse(config.codec).name,
                "class_names": list(CLASS_NAMES[:num_classes]),
                "backbone": config.backbone,
                "backbone_fingerprint": fingerprint,
            }
        )  # the weights' metadata
    )
    _, tokens, dims = seeds.shape
    return FeatureFiles(
        train, manifest, directory / "predict.bin", tokens, dims, k, num_classes,
        (train.stat().st_size - _LENGTH.size * config.train_images) / config.train_images,
    )  # fmt: skip


def _seed_features(config: EdgeConfig) -> tuple[np.ndarray, int, str]:
    """[seed_images, T, D] float32 gathered features of rendered synthetic images, the k used, the weights' id."""
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
    return features.numpy().astype(np.float32, copy=False), k, loaded.weights_fingerprint


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
    "weights as services.tuner.predict.load_network does for the runtime, then per image parses one message, "
    "decodes it and runs the network's logits and a float64 softmax; "
    "latency is the median over the timed images after a warm-up. Parameters and MACs are edge_spec's formulas "
    "(MACs count matrix products only), parameters checked against the real module. MB = 10^6 bytes. "
    "Runtimes (issue 13): the predict probe runs once per runtime in `.venv-edge` on the same weights and features, "
    "`--runtime torch` (the training code's network, what `mist predict --runtime torch` runs) and `--runtime numpy` "
    "(services/tuner/edge_numpy.py, no torch imported); the edge-network latency is the median time of "
    "classifier.logits on one decoded feature, each at its library's default thread count, and the ratio is "
    "numpy / torch. Device (issue 13): `.venv-device` is a virtualenv with the `device` extra only (base "
    "dependencies; torch, timm and torchvision checked not importable). The section starts a registry (SQLite in a "
    "temp dir) and an extractor (`python -m services.extractor.server`, the section's backbone, random init, "
    "default cache) on 127.0.0.1, creates a task from the extractor's Describe (backbone name and fingerprint, k, "
    "codec, classes, the edge config of the fine-tuned weights) and pushes those weights (safetensors metadata "
    "mist.k and mist.codec as `mist tune` writes them). The device probe imports services.tuner.predict only, "
    "builds one Predictor (one channel, the weights pulled once, numpy runtime) and predicts image files one at a "
    "time with predict_file: a few distinct synthetic 224 px PNGs, cycled; each is sent once untimed first, so the "
    "timed round trips are answered from the extractor's cache (no backbone forward pass: what is measured is the "
    "device, the loopback link and the service's cache path). Peak RSS is the probe's VmHWM over the whole run; "
    "round-trip latency is predict_file's wall time (read, upload, feature back, decode, edge network, softmax); "
    "the edge-network latency is classifier.logits on the decoded feature, timed inside the same calls. Every "
    "server is stopped by PID in a `finally`."
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
        predict_numpy = run_probe(python, "predict", [*_predict_args(config, files, weights), "--runtime", "numpy"])
        variants = [_variant(config, files, weights, python, variant) for variant in config.variants]
        device = measure_device(config, files, weights, Path(scratch)) if config.device else None
    probes = (baseline, finetune, predict, predict_cli, predict_numpy)
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
        **_runtimes(predict, predict_numpy),
        **(device or {"device_skipped": "not asked for (EdgeConfig.device=False)"}),
        "variants": variants,
        "target_bytes": dict(TARGET_BYTES),
        "target_runtime_ratio": TARGET_RUNTIME_RATIO,
        "paper": dict(PAPER),
        "method": METHOD_TEXT,
    }
    section["targets"] = targets(section)
    return section


def targets(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The harness's target rows: memory targets in MB, the runtime ratio; the device row only when measured."""
    memory = [("edge fine-tuning peak RSS", "finetune_peak_rss_bytes"),
              ("edge prediction peak RSS", "predict_peak_rss_bytes")]  # fmt: skip
    if section.get("device_predict_peak_rss_bytes") is not None:
        memory.append((f"device predict peak RSS (numpy runtime, {section['device_predictions']:,} images through "
                       "the extractor)", "device_predict_peak_rss_bytes"))  # fmt: skip
    limits = section["target_bytes"]
    rows = [
        {"name": name, "target": f"<= {limits[key] / MB:.0f} MB", "measured": f"{section[key] / MB:.1f} MB",
         "passed": section[key] <= limits[key]}
        for name, key in memory
    ]  # fmt: skip
    ratio, limit = section["runtime_ratio"], section["target_runtime_ratio"]
    rows.append({"name": "edge-network latency, numpy runtime / torch runtime (p50)", "target": f"<= {limit:g}x",
                 "measured": f"{ratio:.2f}x", "passed": ratio <= limit})  # fmt: skip
    return rows


def _runtimes(torch_probe: Mapping[str, Any], numpy_probe: Mapping[str, Any]) -> dict[str, Any]:
    """Edge-network-only latency of both runtimes on the same weights and features, and their ratio."""
    return {
        "edge_ms_p50": {"torch": torch_probe["logits_ms_p50"], "numpy": numpy_probe["logits_ms_p50"]},
        "edge_ms_p99": {"torch": torch_probe["logits_ms_p99"], "numpy": numpy_probe["logits_ms_p99"]},
        "runtime_ratio": numpy_probe["logits_ms_p50"] / torch_probe["logits_ms_p50"],
        "predict_numpy_peak_rss_bytes": numpy_probe["peak_rss_bytes"],
        "predict_numpy_ms_per_image": numpy_probe["ms_per_image_median"],
        "predict_numpy_torch_imported": numpy_probe["torch_imported"],
    }


# ---------------------------------------------------------------------------------------------- device


def measure_device(config: EdgeConfig, files: FeatureFiles, weights: Path, scratch: Path) -> dict[str, Any]:
    """Start a registry and an extractor, push the fine-tuned weights as a version, run the device probe in the
    torch-free venv against them; every server started here is stopped (by PID) before returning or raising."""
    environment = ensure_device_environment(config.environment)
    images = write_device_images(config, scratch / "images")
    backbone = BackboneSpec(config.backbone, config.model_kwargs)
    registry = _registry_server(f"sqlite:///{scratch / 'registry.db'}")
    extractor = ServerProcess(backbone, metrics=False)
    try:
        registry.start()
        extractor.start()
        pushed = push_version(registry.target, extractor.target, weights.read_bytes(), files)
        arguments = ["--extractor", extractor.target, "--registry", registry.target, "--task", DEVICE_TASK,
                     "--images", str(images), "--predictions", str(config.device_predictions)]  # fmt: skip
        probe = run_probe(environment.python, "predict-device", arguments)
    finally:
        extractor.stop()
        registry.stop()
    return {
        "device_environment": environment.note,
        "device_environment_kind": environment.kind,
        "device_torch_importable": not environment.torch_free,
        "device_timm_importable": not environment.timm_free,
        "device_torch_imported": probe["torch_imported"],  # torch in the probe's sys.modules at the end
        "device_timm_imported": probe["timm_imported"],
        "device_predict_peak_rss_bytes": probe["peak_rss_bytes"],
        "device_rss_after_imports_bytes": probe["rss_after_imports_bytes"],
        "device_rss_after_load_bytes": probe["rss_after_load_bytes"],
        "device_predictions": probe["predictions"],
        "device_distinct_images": probe["distinct_images"],
        "device_warmup_ms": probe["warmup_ms"],
        "device_roundtrip_ms_p50": probe["roundtrip_ms_p50"],
        "device_roundtrip_ms_p99": probe["roundtrip_ms_p99"],
        "device_roundtrip_ms_mean": probe["roundtrip_ms_mean"],
        "device_edge_ms_p50": probe["edge_ms_p50"],
        "device_edge_ms_p99": probe["edge_ms_p99"],
        "device_runtime": probe["runtime"],
        "device_load_seconds": probe["load_seconds"],
        "device_labels": probe["labels"],
        "device_image_bytes": int(np.mean([path.stat().st_size for path in images.iterdir()])),
        "device_extractor": f"{backbone.name} (random init), fingerprint {pushed['backbone_fingerprint']}",
        "device_same_backbone_as_training": pushed["same_backbone_as_training"],
        "device_version": pushed["version"],
        "device_weights_metadata": pushed["metadata"],
    }


def write_device_images(config: EdgeConfig, directory: Path) -> Path:
    """`device_images` distinct synthetic PNGs (one class each, in turn) for the device probe to cycle through."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(config.device_images):
        picture = render_image(CLASS_NAMES[index % len(CLASS_NAMES)], np.random.default_rng(1000 + index),
                               _DEVICE_IMAGE_PX)  # fmt: skip
        picture.save(directory / f"image-{index:03d}.png", format="PNG")
    return directory


def _registry_server(db_url: str) -> ServerProcess:
    """`python -m services.registry.server` on 127.0.0.1 port 0, metrics off, auth off (loopback only); it logs the
    same "listening on" line as the extractor, so ServerProcess starts, waits for and stops it."""
    server = ServerProcess(BackboneSpec("registry"), metrics=False)
    server.command = [sys.executable, "-m", "services.registry.server", "--listen", "127.0.0.1:0",
                      "--metrics-listen", "off", "--db", db_url]  # fmt: skip
    return server


def push_version(registry_target: str, extractor_target: str, blob: bytes, files: FeatureFiles) -> dict[str, Any]:
    """Create the task from the extractor's Describe (as `mist tune` does) and push `blob` as its first version."""
    from services.common.clients.extractor import ExtractorClient
    from services.common.clients.registry import RegistryClient
    from services.common.wire.weights import check_edge_weights
    from services.registry.records import Task
    from services.tuner.options import METADATA_BACKBONE_FINGERPRINT, METADATA_CODEC, METADATA_K

    edge, metadata = check_edge_weights(blob)
    if not (metadata.get(METADATA_K) and metadata.get(METADATA_CODEC)):
        raise RuntimeError(f"the fine-tuned weights lack {METADATA_K} / {METADATA_CODEC} metadata: {metadata}")
    with ExtractorClient(extractor_target) as extractor:
        info = extractor.describe(timeout_s=60)
    if (info.tokens, info.dims) != (edge.tokens, edge.dims) or files.k > info.num_blocks:
        raise RuntimeError(f"the extractor serves [{info.tokens}, {info.dims}] x {info.num_blocks} blocks, the "
                           f"weights expect [{edge.tokens}, {edge.dims}] at k={files.k}")  # fmt: skip
    task = Task(
        name=DEVICE_TASK, backbone_name=info.backbone.name, backbone_fingerprint=info.backbone.weights_fingerprint,
        gather_mode="mist", k=files.k, codec=metadata[METADATA_CODEC], class_names=tuple(CLASS_NAMES[: edge.num_classes]),
        edge=edge.to_dict(), description="bench/edge.py device run",
    )  # fmt: skip
    with RegistryClient(registry_target) as registry:
        registry.create_task(task)
        version = registry.push(DEVICE_TASK, blob, parent_version=0, tuner="bench/edge.py",
                                tags={"k": str(files.k), "codec": metadata[METADATA_CODEC]})  # fmt: skip
    return {
        "version": version.number,
        "metadata": {key: value for key, value in metadata.items() if key.startswith("mist.")},
        "backbone_fingerprint": info.backbone.weights_fingerprint,
        "same_backbone_as_training": metadata.get(METADATA_BACKBONE_FINGERPRINT) == info.backbone.weights_fingerprint,
    }


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


def _ratio_verdict(section: Mapping[str, Any]) -> str:
    limit = section["target_runtime_ratio"]
    return f"<= {limit:g}x: {'met' if section['runtime_ratio'] <= limit else 'MISSED'}"


def _device_lines(s: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(a paragraph on the device run, its table rows); a skipped device run says why and adds no rows."""
    if s.get("device_predict_peak_rss_bytes") is None:
        return [f"Device run (torch-free venv through a real extractor): skipped ({s.get('device_skipped', '?')}).",
                ""], []  # fmt: skip
    loaded = [name for name, key in (("torch", "device_torch_imported"), ("timm", "device_timm_imported")) if s[key]]
    imported = f"LOADED: {', '.join(loaded)}" if loaded else "neither loaded"
    paragraph = [
        f"Device: {s['device_environment']} (torch importable: {s['device_torch_importable']}, timm importable: "
        f"{s['device_timm_importable']}; torch/timm in sys.modules after the run: {imported}). "
        f"{s['device_predictions']:,} images predicted one at a time with the {s['device_runtime']} runtime through "
        f"an extractor serving {s['device_extractor']} (same weights as the training features: "
        f"{s['device_same_backbone_as_training']}) and a registry (version {s['device_version']}), cycling "
        f"{s['device_distinct_images']} distinct synthetic PNGs ({s['device_image_bytes'] / 1000:.0f} KB each on "
        "average), each sent once untimed first: the timed round trips are extractor cache hits.",
        "",
    ]
    peak = (f"| device predict peak RSS (`.venv-device`, {s['device_runtime']} runtime, "
            f"{s['device_predictions']:,} images through the extractor) | {_mb(s['device_predict_peak_rss_bytes'])} | "
            f"{_verdict(s, 'device_predict_peak_rss_bytes')} | {s['paper']['predict_peak_rss_bytes'] / MB:.0f} MB "
            "(torch) |")  # fmt: skip
    rows = [
        peak,
        f"| device RSS after imports / after loading the version | {_mb(s['device_rss_after_imports_bytes'])} / "
        f"{_mb(s['device_rss_after_load_bytes'])} | | |",
        f"| device round trip per image (p50 / p99 of {s['device_predictions']:,}) | "
        f"{s['device_roundtrip_ms_p50']:.1f} / {s['device_roundtrip_ms_p99']:.1f} ms | | |",
        f"| device edge network per image (p50 / p99) | {s['device_edge_ms_p50']:.2f} / "
        f"{s['device_edge_ms_p99']:.2f} ms | | |",
    ]
    return paragraph, rows


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
    device_paragraph, device_rows = _device_lines(s)
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
        *device_paragraph,
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
        f"| predict peak RSS, numpy runtime (features from a file, torch imported: "
        f"{s['predict_numpy_torch_imported']}) | {_mb(s['predict_numpy_peak_rss_bytes'])} | | |",
        f"| edge network per image, torch runtime (p50) | {s['edge_ms_p50']['torch']:.2f} ms | | |",
        f"| edge network per image, numpy runtime (p50) | {s['edge_ms_p50']['numpy']:.2f} ms "
        f"({s['runtime_ratio']:.2f}x torch) | {_ratio_verdict(s)} | |",
        *device_rows,
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
    if section.get("device_predict_peak_rss_bytes") is not None:
        jobs.append(("device predict\n(numpy)", "device_predict_peak_rss_bytes", "device_predict_peak_rss_bytes"))
    figure, axes = plt.subplots(figsize=(6, 3.5))
    positions = np.arange(len(jobs))
    axes.bar(positions, [section[key] / MB for _, key, _ in jobs], width=0.5, label="measured", color="#4c72b0")
    for position, (_, _, reference) in zip(positions, jobs, strict=True):
        if reference is None:
            continue
        axes.hlines(section["target_bytes"][reference] / MB, position - 0.3, position + 0.3, colors="#c44e52",
                    label="target")  # fmt: skip
        if reference in section["paper"]:
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
    parser.add_argument("--quick", action="store_true",
                        help="96 images, one epoch, no variants, 200 device predictions")  # fmt: skip
    parser.add_argument("--no-device", action="store_true", help="skip the device run (no servers, no .venv-device)")
    parser.add_argument("--current-env", action="store_true", help="measure in this interpreter, not .venv-edge")
    parser.add_argument("--out", type=Path, help="also write edge.json and edge_memory.png into this folder")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.current_env:
        config = replace(config, environment="current")
    if args.no_device:
        config = replace(config, device=False)
    section = run(args.quick, args.out or Path(tempfile.gettempdir()), config=config)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "edge.json").write_text(json.dumps(section, indent=2) + "\n")
        plots(section, args.out)
    print(markdown(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
