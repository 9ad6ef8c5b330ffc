"""Runs INSIDE the tuner-only edge environment: one memory/speed measurement per process, one JSON line out.

bench/edge.py starts it once per measurement, so nothing of the parent's memory counts and each peak RSS is
the whole process's own (VmHWM). It imports torch and the tuner library only, and reports whether timm got loaded.
`predict --runtime numpy` and `predict-device` import no torch at all; `predict-device` runs in the torch-free
device environment (`.venv-device`) and imports only what `mist predict` imports (services.tuner.predict).

    .venv-edge/bin/python bench/edge_probe.py import-torch
    .venv-edge/bin/python bench/edge_probe.py finetune --features DIR/train.bin --manifest DIR/manifest.json \
        --epochs 2 --weights-out DIR/edge.safetensors
    .venv-edge/bin/python bench/edge_probe.py finetune-dense --features DIR/f.bin --masks DIR/m.npy \
        --manifest DIR/m.json --epochs 1
    .venv-edge/bin/python bench/edge_probe.py predict --features DIR/predict.bin --weights DIR/edge.safetensors \
        --runtime numpy
    .venv-device/bin/python bench/edge_probe.py predict-device --extractor HOST:PORT --registry HOST:PORT \
        --task edge-bench --images DIR/images --predictions 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Framing of the feature files bench/edge.py writes: an 8-byte little-endian length, then one serialized
# FeatureTensor, repeated. Read one record at a time so the file never sits in memory whole.
_LENGTH = struct.Struct("<Q")
_MAX_RECORD_BYTES = 64 << 20  # a corrupt length must not make the probe allocate gigabytes


def peak_rss_bytes() -> int:
    """The process's peak resident set so far: VmHWM, which a new program starts afresh.

    Not ru_maxrss where /proc exists: Linux carries it across execve, so a probe started by a parent holding
    1 GB (a ViT-B) would report the parent's peak, not its own.
    """
    return _proc_status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss_bytes() -> int:
    """Resident set now (VmRSS), or the peak where /proc is not available."""
    return _proc_status_bytes("VmRSS") or peak_rss_bytes()


def _proc_status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status in bytes; 0 where there is no such file or field."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def read_records(path: Path) -> Iterator[bytes]:
    """The serialized messages of a feature file, one at a time."""
    with path.open("rb") as handle:
        while header := handle.read(_LENGTH.size):
            if len(header) != _LENGTH.size:
                raise ValueError(f"{path}: truncated record header")
            (size,) = _LENGTH.unpack(header)
            if size > _MAX_RECORD_BYTES:
                raise ValueError(f"{path}: record of {size} bytes exceeds {_MAX_RECORD_BYTES}")
            body = handle.read(size)
            if len(body) != size:
                raise ValueError(f"{path}: truncated record body")
            yield body


def _environment(torch_module: Any) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "torch_version": torch_module.__version__,
        "torch_cuda": torch_module.version.cuda,  # None for the CPU build
        "threads": torch_module.get_num_threads(),
    }


def _finish(result: dict[str, Any]) -> None:
    result["timm_imported"] = "timm" in sys.modules or "torchvision" in sys.modules
    result["torch_imported"] = "torch" in sys.modules
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result, sort_keys=True))


def probe_import_torch(_: argparse.Namespace) -> None:
    """What the process costs before any of our code: the interpreter plus `import torch`."""
    import torch

    _finish({"mode": "import-torch", **_environment(torch)})


def probe_finetune(args: argparse.Namespace) -> None:
    """Load the compressed features into a FeatureStore as the tuner does, then train; peak RSS and speed."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from services.common.pb import feature_pb2
    from services.common.wire.edge_spec import EdgeNetworkConfig
    from services.tuner.edge_network import to_safetensors_bytes
    from services.tuner.feature_store import FeatureStore
    from services.tuner.training import TrainConfig, train_edge_network

    rss_after_imports = current_rss_bytes()
    manifest = json.loads(Path(args.manifest).read_text())
    labels, k = manifest["labels"], int(manifest["k"])
    # verify=True: decodes each on add; the messages go to an unlinked temporary file, as in the tuner
    with FeatureStore(labels, num_classes=int(manifest["num_classes"])) as store:
        loaded = time.perf_counter()
        for index, record in enumerate(read_records(Path(args.features))):
            store.add(index, k, feature_pb2.FeatureTensor.FromString(record))
        load_seconds = time.perf_counter() - loaded
        if store.missing(range(len(labels)), [k]):
            raise SystemExit(f"{args.features} holds fewer features than the {len(labels)} labels of {args.manifest}")
        rss_after_store = current_rss_bytes()
        tokens, dims = store.feature_shape  # type: ignore[misc]
        edge = EdgeNetworkConfig(dims=dims, tokens=tokens, num_classes=store.num_classes)
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=0, keep="final")
        result = train_edge_network(store, k, edge, config, train_indices=range(len(labels)))
    if args.weights_out:
        Path(args.weights_out).write_bytes(to_safetensors_bytes(result.model, _weights_metadata(manifest)))
    _finish({
        "mode": "finetune",
        **_environment(torch),
        "images": len(labels),
        "tokens": tokens,
        "dims": dims,
        "k": k,
        "num_classes": store.num_classes,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "micro_batch_size": config.micro_batch_for(tokens, dims),
        "compressed_bytes": store.compressed_bytes(),
        "store_load_seconds": load_seconds,
        "rss_after_imports_bytes": rss_after_imports,
        "rss_after_store_bytes": rss_after_store,
        "epoch_seconds": [stats.seconds for stats in result.history],
        "images_per_second": [stats.images_per_second for stats in result.history],
        "final_train_loss": result.history[-1].train_loss,
        "module_parameters": sum(p.numel() for p in result.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in result.model.parameters() if p.requires_grad),
    })  # fmt: skip


def probe_finetune_dense(args: argparse.Namespace) -> None:
    """A segmentation fine-tune: the aggregates into a FeatureStore, masks [N, L, L] in memory, train_dense_network
    (pixel cross-entropy at the label grid); peak RSS and speed."""
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from services.common.pb import feature_pb2
    from services.common.wire.edge_spec import EdgeNetworkConfig
    from services.tuner.feature_store import FeatureStore
    from services.tuner.segmentation import micro_batch, train_dense_network
    from services.tuner.training import TrainConfig

    rss_after_imports = current_rss_bytes()
    manifest = json.loads(Path(args.manifest).read_text())
    masks = np.load(args.masks)
    k, images = int(manifest["k"]), int(manifest["images"])
    with FeatureStore([0] * images, num_classes=int(manifest["num_classes"])) as store:
        for index, record in enumerate(read_records(Path(args.features))):
            store.add(index, k, feature_pb2.FeatureTensor.FromString(record))
        rss_after_store = current_rss_bytes()
        tokens, dims = store.feature_shape  # type: ignore[misc]
        edge = EdgeNetworkConfig(dims=dims, tokens=tokens, num_classes=store.num_classes, rank=min(16, dims),
                                 pooling="dense")  # fmt: skip
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=0, keep="final")
        result = train_dense_network(store, k, masks, edge, config, train_indices=range(images))
    _finish({
        "mode": "finetune-dense", **_environment(torch), "images": images, "tokens": tokens, "dims": dims,
        "label_size": int(masks.shape[-1]), "num_classes": store.num_classes, "epochs": args.epochs,
        "batch_size": args.batch_size, "micro_batch_size": micro_batch(edge, int(masks.shape[-1]), config),
        "compressed_bytes": store.compressed_bytes(), "rss_after_imports_bytes": rss_after_imports,
        "rss_after_store_bytes": rss_after_store, "epoch_seconds": [epoch.seconds for epoch in result.history],
        "final_train_loss": result.history[-1].train_loss,
    })  # fmt: skip


def _weights_metadata(manifest: dict[str, Any]) -> dict[str, str]:
    """What `mist tune` writes into a version's safetensors metadata (options.METADATA_*), from the manifest."""
    from services.tuner.options import (
        METADATA_BACKBONE,
        METADATA_BACKBONE_FINGERPRINT,
        METADATA_CLASSES,
        METADATA_CODEC,
        METADATA_K,
    )

    metadata = {METADATA_K: str(int(manifest["k"]))}
    for key, name in ((METADATA_CODEC, "codec"), (METADATA_BACKBONE, "backbone"),
                      (METADATA_BACKBONE_FINGERPRINT, "backbone_fingerprint")):  # fmt: skip
        if manifest.get(name):
            metadata[key] = str(manifest[name])
    if manifest.get("class_names"):
        metadata[METADATA_CLASSES] = json.dumps(list(manifest["class_names"]))
    return metadata


class _TimedClassifier:
    """Wraps a classifier and records how long each logits() call takes: the edge network alone."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.ms: list[float] = []

    def logits(self, features: Any) -> Any:
        started = time.perf_counter()
        out = self.inner.logits(features)
        self.ms.append((time.perf_counter() - started) * 1e3)
        return out


def _load_classifier(blob: bytes, runtime: str) -> Any:
    """The network of a weights blob run by `runtime`, as services.tuner.predict.load_network builds it, without
    importing that module (it loads grpc and the clients, which the plain predict figures leave out)."""
    from services.common.wire.weights import check_edge_weights

    config, _ = check_edge_weights(blob)
    if runtime == "numpy":
        from services.tuner.edge_numpy import NumpyEdgeNetwork

        return NumpyEdgeNetwork.from_safetensors_bytes(blob, config)[0]
    import numpy as np
    import torch

    from services.tuner.edge_network import from_safetensors_bytes

    model = from_safetensors_bytes(blob, config)[0].eval()

    class TorchClassifier:  # what predict._TorchClassifier does
        def logits(self, features: Any) -> Any:
            tensor = torch.from_numpy(np.ascontiguousarray(features))
            with torch.inference_mode():
                return model(tensor[None] if tensor.ndim == 2 else tensor).numpy()

    return TorchClassifier()


def _softmax64(logits: Any) -> Any:
    """services.tuner.predict.probabilities: softmax over the last axis in float64."""
    import numpy as np

    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def probe_predict(args: argparse.Namespace) -> None:
    """One image at a time: parse its message, decode the feature, classify it with weights loaded from a blob.

    `--runtime torch` (the training code's network, torch imported) or `numpy` (edge_numpy, no torch). Latency
    is per image (parse, decode, logits, softmax); `logits_ms_*` times the edge network alone.
    """
    if args.runtime == "torch":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
    if args.client_imports:
        import services.tuner.predict  # noqa: F401  (what `mist predict` loads: grpc, the clients)
    from services.common.pb import feature_pb2
    from services.common.wire.codec import decode_feature

    rss_after_imports = current_rss_bytes()
    classifier = _TimedClassifier(_load_classifier(Path(args.weights).read_bytes(), args.runtime))
    records = list(read_records(Path(args.features)))  # a few hundred KB: the "network" of this probe
    if not records:
        raise SystemExit(f"{args.features} holds no features")
    latencies_ms: list[float] = []
    for position in range(args.warmup + args.predictions):
        record = records[position % len(records)]
        started = time.perf_counter()
        feature = decode_feature(feature_pb2.FeatureTensor.FromString(record))
        int(_softmax64(classifier.logits(feature)).argmax())
        if position >= args.warmup:
            latencies_ms.append((time.perf_counter() - started) * 1e3)
    logits_ms = classifier.ms[args.warmup :]
    environment = _environment(sys.modules["torch"]) if "torch" in sys.modules else {"python": sys.version.split()[0]}
    _finish({
        "mode": "predict",
        **environment,
        "runtime": args.runtime,
        "client_imports": args.client_imports,
        "predictions": len(latencies_ms),
        "rss_after_imports_bytes": rss_after_imports,
        "ms_per_image_mean": statistics.fmean(latencies_ms),
        "ms_per_image_median": statistics.median(latencies_ms),
        "ms_per_image_max": max(latencies_ms),
        "logits_ms_p50": statistics.median(logits_ms),
        "logits_ms_p99": _percentile(logits_ms, 99),
    })  # fmt: skip


def probe_predict_device(args: argparse.Namespace) -> None:
    """A device that only predicts: `mist predict`'s imports, one Predictor (one channel, the weights loaded once)
    against a real extractor and registry, then images one at a time from files, as a camera loop would.

    Untimed warm-up: one round trip per distinct image, so the timed ones measure the device and the link, with
    the extractor answering from its cache (ViT-B/16 forward passes on a CPU would hide the device's share).
    """
    from services.tuner.config import Endpoints
    from services.tuner.predict import Predictor

    rss_after_imports = current_rss_bytes()
    images = sorted(Path(args.images).iterdir())
    if not images:
        raise SystemExit(f"{args.images} holds no images")
    endpoints = Endpoints(extractor=args.extractor, registry=args.registry)
    started = time.perf_counter()
    with Predictor(endpoints, args.task, runtime=args.runtime) as predictor:
        load_seconds = time.perf_counter() - started
        timed = _TimedClassifier(predictor.loaded.model)
        predictor.loaded = dataclasses.replace(predictor.loaded, model=timed)
        rss_after_load = current_rss_bytes()
        warmup_ms, roundtrip_ms, failed, labels = [], [], [], {}
        for position in range(len(images) + args.predictions):
            path = images[position % len(images)]
            began = time.perf_counter()
            prediction = predictor.predict_file(path)
            elapsed = (time.perf_counter() - began) * 1e3
            (warmup_ms if position < len(images) else roundtrip_ms).append(elapsed)
            if not prediction.ok:
                failed.append(f"{path.name}: {prediction.error_code} {prediction.error_message}")
            else:
                labels[prediction.label] = labels.get(prediction.label, 0) + 1
        loaded = predictor.loaded
    if failed:
        raise SystemExit(f"{len(failed)} prediction(s) failed, first: {failed[0]}")
    edge_ms = timed.ms[len(images) :]
    _finish({
        "mode": "predict-device",
        "python": sys.version.split()[0],
        "runtime": loaded.runtime,
        "version": loaded.version.number,
        "k": loaded.k,
        "codec": loaded.codec,
        "distinct_images": len(images),
        "warmup_round_trips": len(warmup_ms),
        "warmup_ms": warmup_ms,
        "predictions": len(roundtrip_ms),
        "labels": labels,
        "load_seconds": load_seconds,
        "rss_after_imports_bytes": rss_after_imports,
        "rss_after_load_bytes": rss_after_load,
        "roundtrip_ms_p50": statistics.median(roundtrip_ms),
        "roundtrip_ms_p99": _percentile(roundtrip_ms, 99),
        "roundtrip_ms_mean": statistics.fmean(roundtrip_ms),
        "edge_ms_p50": statistics.median(edge_ms),
        "edge_ms_p99": _percentile(edge_ms, 99),
        "threads_env": {key: value for key, value in os.environ.items() if key.endswith("_NUM_THREADS")},
    })  # fmt: skip


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    modes.add_parser("import-torch", help="RSS of the interpreter plus `import torch`").set_defaults(
        run=probe_import_torch
    )
    finetune = modes.add_parser("finetune", help="train on a feature file; peak RSS and speed")
    finetune.add_argument("--features", required=True, help="framed FeatureTensor messages, one per image")
    finetune.add_argument("--manifest", required=True, help="JSON: labels, num_classes, k")
    finetune.add_argument("--epochs", type=int, default=1)
    finetune.add_argument("--batch-size", type=int, default=32)
    finetune.add_argument("--weights-out", default="", help="write the trained weights (safetensors) here")
    finetune.set_defaults(run=probe_finetune)
    dense = modes.add_parser("finetune-dense", help="segmentation: train a dense network against masks; peak RSS")
    dense.add_argument("--features", required=True, help="framed FeatureTensor messages (aggregates), one per image")
    dense.add_argument("--masks", required=True, help=".npy uint8 [N, L, L] class-id masks at the label grid")
    dense.add_argument("--manifest", required=True, help="JSON: k, num_classes, images")
    dense.add_argument("--epochs", type=int, default=1)
    dense.add_argument("--batch-size", type=int, default=32)
    dense.set_defaults(run=probe_finetune_dense)
    predict = modes.add_parser("predict", help="classify one image at a time; peak RSS and latency")
    predict.add_argument("--features", required=True, help="framed FeatureTensor messages to classify")
    predict.add_argument("--weights", required=True, help="safetensors blob written by `finetune`")
    predict.add_argument("--predictions", type=int, default=50, help="timed predictions")
    predict.add_argument("--warmup", type=int, default=5, help="untimed predictions first")
    predict.add_argument("--client-imports", action="store_true", help="also import what `mist predict` imports")
    predict.add_argument("--runtime", choices=("torch", "numpy"), default="torch", help="what runs the network")
    predict.set_defaults(run=probe_predict)
    device = modes.add_parser("predict-device", help="Predictor against real servers, one image file at a time")
    device.add_argument("--extractor", required=True, help="HOST:PORT of the extractor")
    device.add_argument("--registry", required=True, help="HOST:PORT of the registry")
    device.add_argument("--task", required=True, help="task whose latest version predicts")
    device.add_argument("--images", required=True, help="folder of image files, cycled in name order")
    device.add_argument("--predictions", type=int, default=1000, help="timed predictions (after one per image)")
    device.add_argument("--runtime", choices=("numpy", "torch"), default="numpy", help="what runs the network")
    device.set_defaults(run=probe_predict_device)
    for sub in (finetune, dense, predict):
        sub.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    from services.tuner.memory import limit_heap_growth  # ctypes only: costs nothing measurable

    limit_heap_growth()  # what `mist` and `mist-tuner` do at start, so the probe measures the same process
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
