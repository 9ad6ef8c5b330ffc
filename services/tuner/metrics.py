"""Prometheus metrics of the `mist-tuner` worker (`mist_tuner_*`), next to the per-RPC ones the server plumbing adds.

They let a dashboard put the feature bytes per image the worker actually received next to what LST, LAST,
Partial-1, linear probing and uncompressed MIST would send for the same backbone (from the extractor's Describe).
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

JobKind = Literal["tune", "predict"]
PREFIX = "mist_tuner"
# Per-image feature sizes range from a CLS vector of a tiny ViT (~100 B) to an f32 ViT-L map (~1.2 MB).
_BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 131072, 262144, 524288, 1048576, 4194304)
# An optimizer step of batch 32 takes ~10 ms for a tiny ViT's features and several seconds on a Pi at ViT-B.
_STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TunerMetrics:
    """The worker's own metrics, registered on the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = PREFIX
        self.jobs = Counter(
            f"{p}_jobs_total",
            "Tune and Predict calls finished, by kind and outcome (a status code "
            "name: OK, INVALID_ARGUMENT, CANCELLED, ...)",
            ["kind", "outcome"],
            registry=registry,
        )
        self.jobs_running = Gauge(
            f"{p}_jobs_running", "Tune and Predict calls being worked on", ["kind"], registry=registry
        )
        self.feature_bytes = Counter(
            f"{p}_feature_bytes_received_total",
            "Serialized feature bytes received from the extractor",
            ["kind"],
            registry=registry,
        )
        self.feature_images = Counter(
            f"{p}_feature_images_received_total",
            "Images whose features were received (bytes / images = bytes per image actually received)",
            ["kind"],
            registry=registry,
        )
        self.bytes_per_image = Histogram(
            f"{p}_feature_bytes_per_image",
            "Mean feature bytes per image of the chosen k, one observation per finished tune",
            registry=registry,
            buckets=_BYTES_BUCKETS,
        )
        self.baseline_bytes_per_image = Gauge(
            f"{p}_baseline_bytes_per_image",
            "Float32 bytes per image each method "
            "would send for the extractor's backbone (lst, last, partial, cls, "
            "mist_f32), from its Describe",
            ["method"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            f"{p}_train_step_duration_seconds",
            "Wall time of one optimizer step (decoding the batch included)",
            ["phase"],
            registry=registry,
            buckets=_STEP_BUCKETS,
        )
        self.images_trained = Counter(
            f"{p}_images_trained_total",
            "Training images processed (each epoch counts every image once)",
            ["phase"],
            registry=registry,
        )
        self.predictions = Counter(
            f"{p}_predictions_total",
            "Images answered by Predict, by outcome (ok, error)",
            ["outcome"],
            registry=registry,
        )
