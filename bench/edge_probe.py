"""Runs INSIDE the tuner-only edge environment: one memory/speed measurement per process, one JSON line out.

bench/edge.py starts it once per measurement, so nothing of the parent's memory counts and each peak RSS is
the whole process's own (VmHWM). It imports torch and the tuner library only, and reports whether timm got loaded.

    .venv-edge/bin/python bench/edge_probe.py import-torch
    .venv-edge/bin/python bench/edge_probe.py finetune --features DIR/train.bin --manifest DIR/manifest.json \
        --epochs 2 --weights-out DIR/edge.safetensors
    .venv-edge/bin/python bench/edge_probe.py predict --features DIR/predict.bin --weights DIR/edge.safetensors
"""

from __future__ import annotations

import argparse
import json
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
        Path(args.weights_out).write_bytes(to_safetensors_bytes(result.model))
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


def probe_predict(args: argparse.Namespace) -> None:
    """One image at a time: parse its message, decode the feature, classify it with weights loaded from a blob."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.client_imports:
        import services.tuner.predict  # noqa: F401  (what `mist predict` loads: grpc, the clients)
    from services.common.pb import feature_pb2
    from services.common.wire.codec import decode_feature
    from services.tuner.edge_network import from_safetensors_bytes
    from services.tuner.training import predict

    rss_after_imports = current_rss_bytes()
    model, _ = from_safetensors_bytes(Path(args.weights).read_bytes())
    records = list(read_records(Path(args.features)))  # a few hundred KB: the "network" of this probe
    if not records:
        raise SystemExit(f"{args.features} holds no features")
    latencies_ms: list[float] = []
    for position in range(args.warmup + args.predictions):
        record = records[position % len(records)]
        started = time.perf_counter()
        feature = torch.from_numpy(decode_feature(feature_pb2.FeatureTensor.FromString(record)))
        probabilities = predict(model, feature)
        int(probabilities.argmax())
        if position >= args.warmup:
            latencies_ms.append((time.perf_counter() - started) * 1e3)
    _finish({
        "mode": "predict",
        **_environment(torch),
        "client_imports": args.client_imports,
        "predictions": len(latencies_ms),
        "rss_after_imports_bytes": rss_after_imports,
        "ms_per_image_mean": statistics.fmean(latencies_ms),
        "ms_per_image_median": statistics.median(latencies_ms),
        "ms_per_image_max": max(latencies_ms),
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
    predict = modes.add_parser("predict", help="classify one image at a time; peak RSS and latency")
    predict.add_argument("--features", required=True, help="framed FeatureTensor messages to classify")
    predict.add_argument("--weights", required=True, help="safetensors blob written by `finetune`")
    predict.add_argument("--predictions", type=int, default=50, help="timed predictions")
    predict.add_argument("--warmup", type=int, default=5, help="untimed predictions first")
    predict.add_argument("--client-imports", action="store_true", help="also import what `mist predict` imports")
    predict.set_defaults(run=probe_predict)
    for sub in (finetune, predict):
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
